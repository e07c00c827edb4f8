"""Device helpers shared by the Triton kernel modules."""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Optional, TypeVar

import torch
import triton
import triton.language as tl
from triton.runtime.jit import KernelInterface

F = TypeVar("F", bound=Callable[..., Any])

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


def launch(kernel: KernelInterface, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
    """Every kernel launch of the package (a module's ``_launch``, which the ahead-of-time compile
    tests replace to record the launches)."""
    kernel[grid](*args, **meta)


def first_device(args: Any) -> Optional[torch.device]:
    """The device of the first tensor in ``args`` (searched depth first through lists and tuples)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (list, tuple)):
            found = first_device(a)
            if found is not None:
                return found
    return None


def on_input_device(fn: F) -> F:
    """``fn`` run with the CUDA device of its first tensor argument current: Triton launches on
    the current device, which need not be the inputs' (cuda:1 tensors under a cuda:0 default)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        device = first_device(args)
        if device is None or device.type != "cuda":
            return fn(*args, **kwargs)
        with torch.cuda.device(device):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
