"""Optimizers of the Nested Learning library: deep (learned-memory) momentum, its classical
special cases, and the orthogonalising Muon / M3 (module paths as in the reference library)."""

from .deep_momentum import DeepMomentumGD, FactorizedMemoryMLP, MemoryMLP, SharedMemoryPool, SimpleMomentumGD
from .delta_rule import DeltaRuleMomentum, OjaRuleMomentum
from .m3 import M3
from .muon import Muon
from .nested_dmgd import LearnedMemoryModule, NestedDeepMomentumGD, create_meta_learning_task_distribution
from .newton_schulz import newton_schulz, orthogonalize
from .preconditioned import AdaptivePreconditionedMomentum, PreconditionedMomentum

__all__ = [
    "AdaptivePreconditionedMomentum",
    "DeepMomentumGD",
    "DeltaRuleMomentum",
    "FactorizedMemoryMLP",
    "LearnedMemoryModule",
    "M3",
    "MemoryMLP",
    "Muon",
    "NestedDeepMomentumGD",
    "OjaRuleMomentum",
    "PreconditionedMomentum",
    "SharedMemoryPool",
    "SimpleMomentumGD",
    "create_meta_learning_task_distribution",
    "newton_schulz",
    "orthogonalize",
]
