"""nested_learning: the Nested Learning library on fused kernels."""

__version__ = "0.1.0"
