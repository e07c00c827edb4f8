"""Hot-path ops, one module per op; each is a torch custom op that picks its backend.

``nested_learning.ops.<op>`` is the function of the op of that name (its module stays
importable as ``nested_learning.ops.<op>`` through ``sys.modules``).
"""

from ._library import BACKENDS, EXT_ERROR, HAS_EXT, HAS_TRITON, available, select, use_backend
from .cms_accumulate import cms_accumulate
from .cms_chunk_update import cms_chunk_update
from .delta_rule import delta_rule
from .memory_mlp_momentum import memory_mlp_momentum

__all__ = [
    "BACKENDS",
    "EXT_ERROR",
    "HAS_EXT",
    "HAS_TRITON",
    "available",
    "select",
    "use_backend",
    "cms_accumulate",
    "cms_chunk_update",
    "delta_rule",
    "memory_mlp_momentum",
]
