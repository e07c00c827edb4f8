"""Input validation shared by the ops: every message names the argument, expected and actual."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, value: object, ndim: int) -> Tensor:
    """``value`` as a floating tensor of rank ``ndim``, else TypeError/ValueError naming ``name``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOATING:
        raise TypeError(f"{name} must have a floating dtype {FLOATING}, got {value.dtype}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    return value


def shape(name: str, value: Tensor, expected: Sequence[int], layout: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {layout} = {tuple(expected)}, got {tuple(value.shape)}")


def same_device(reference_name: str, reference: Tensor, **named: Optional[Tensor]) -> None:
    for name, value in named.items():
        if value is not None and value.device != reference.device:
            raise ValueError(
                f"{name} is on {value.device} but {reference_name} is on {reference.device}; all inputs must share a device"
            )


def finite(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def values_in(bounds: dict[str, tuple[Tensor, float, float]]) -> None:
    """Every element of each named tensor is finite and lies in its [low, high]; one device sync
    for all of them (``bounds`` maps name → (tensor, low, high))."""
    present = {n: b for n, b in bounds.items() if b[0].numel() > 0}
    if not present:
        return
    extremes = torch.stack([torch.stack(torch.aminmax(t.detach().float())) for t, _, _ in present.values()]).tolist()
    for (name, (_, low, high)), (lo, hi) in zip(present.items(), extremes):
        if not (low <= lo and hi <= high and math.isfinite(lo) and math.isfinite(hi)):  # NaN fails too
            raise ValueError(f"{name} must hold finite values in [{low}, {high}], got values in [{lo}, {hi}]")
