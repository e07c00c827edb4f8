"""Device helpers shared by the Triton kernel modules."""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Kernels branch on this where the interpreter (TRITON_INTERPRET=1, the CPU test mode) differs
# from the GPU; it is read once, at import, like triton itself reads it.
INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def round_to(x, DT: tl.constexpr):
    """x converted to DT, rounding to nearest even. The interpreter truncates fp32 → bf16, so
    under it the bits are rounded by hand (NaN stays NaN)."""
    if INTERPRET:
        if DT == tl.bfloat16:
            if x.dtype == tl.float32:
                bits = x.to(tl.uint32, bitcast=True)
                up = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
                x = tl.where(x != x, x, up)
    return x.to(DT)
