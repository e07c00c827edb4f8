"""Memory modules: the Continuum Memory System (multi-frequency MLP levels)."""

from .continuum import VARIANTS, ContinuumMemorySystem, ContinuumMLP, FullyNestedCMS

__all__ = ["VARIANTS", "ContinuumMLP", "ContinuumMemorySystem", "FullyNestedCMS"]
