"""nested_learning: the Nested Learning library (HOPE, self-modifying Titans, the Continuum
Memory System, deep momentum optimizers) on fused kernels.

The top-level names are the reference library's (phlong3105/nested_learning).

Hot paths are torch custom ops in :mod:`nested_learning.ops`; their plain-PyTorch ground truth
lives in :mod:`nested_learning.reference`.
"""

from . import data, memory, meta, models, ops, optimizers, reference, training
from .memory import AssociativeMemory, ContinuumMemorySystem, LinearAttention
from .models import HOPE, HOPEBlock, SelfModifyingAttention, SelfModifyingTitan
from .ops import EXT_ERROR, HAS_EXT, HAS_TRITON, cms_accumulate, cms_chunk_update, delta_rule, memory_mlp_momentum
from .optimizers import DeepMomentumGD, DeltaRuleMomentum, PreconditionedMomentum, SimpleMomentumGD
from .training import ContinuumMemoryTrainer, NestedLearningTrainer, create_nested_learning_setup

__version__ = "0.1.0"

__all__ = [
    "AssociativeMemory",
    "HOPE",
    "HOPEBlock",
    "LinearAttention",
    "NestedLearningTrainer",
    "SelfModifyingAttention",
    "SelfModifyingTitan",
    "create_nested_learning_setup",
    "data",
    "models",
    "DeepMomentumGD",
    "DeltaRuleMomentum",
    "PreconditionedMomentum",
    "SimpleMomentumGD",
    "memory_mlp_momentum",
    "meta",
    "optimizers",
    "ContinuumMemorySystem",
    "ContinuumMemoryTrainer",
    "EXT_ERROR",
    "HAS_EXT",
    "HAS_TRITON",
    "__version__",
    "cms_accumulate",
    "cms_chunk_update",
    "delta_rule",
    "memory",
    "ops",
    "reference",
    "training",
]
