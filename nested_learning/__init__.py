"""nested_learning: the Nested Learning library (HOPE, self-modifying Titans, the Continuum
Memory System, deep momentum optimizers) on fused kernels.

Hot paths are torch custom ops in :mod:`nested_learning.ops`; their plain-PyTorch ground truth
lives in :mod:`nested_learning.reference`.
"""

from . import ops, reference
from .ops import EXT_ERROR, HAS_EXT, HAS_TRITON, delta_rule

__version__ = "0.1.0"

__all__ = ["ops", "reference", "delta_rule", "HAS_EXT", "EXT_ERROR", "HAS_TRITON", "__version__"]
