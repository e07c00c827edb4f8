"""Plain-PyTorch ground truth of every hot-path op, one module per op (same stem as ``ops``)."""

from . import delta_rule

__all__ = ["delta_rule"]
