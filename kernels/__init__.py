"""Triton kernels, one module per op; installed as ``nested_learning.kernels``.

Modules here import triton at their top; import them only when triton is installed.
"""
