"""Plain-PyTorch ground truth of every hot-path op, one module per op (same stem as ``ops``)."""

from . import cms_accumulate, cms_chunk_update, delta_rule, memory_mlp_momentum

__all__ = ["cms_accumulate", "cms_chunk_update", "delta_rule", "memory_mlp_momentum"]
