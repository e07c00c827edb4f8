"""Memory modules: associative memories (matrix, slots, linear attention, delta rule) and the
Continuum Memory System (multi-frequency MLP levels)."""

from .associative import AssociativeMemory, DeltaRuleMemory, LinearAttention
from .continuum import VARIANTS, ContinuumMemorySystem, ContinuumMLP, FullyNestedCMS

__all__ = [
    "VARIANTS",
    "AssociativeMemory",
    "ContinuumMLP",
    "ContinuumMemorySystem",
    "DeltaRuleMemory",
    "FullyNestedCMS",
    "LinearAttention",
]
