"""Muon with batched Newton–Schulz: ``torch.optim.Muon``'s rule, all same-shape matrices at once."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Mapping, Optional

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ._hyper import choice, number, positive_int
from .newton_schulz import NS_COEFFICIENTS, NS_EPS, orthogonalize
from .simple_momentum import Group, TensorOptimizer, each, state_list, zeros

ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


def adjusted_lr(lr: float, adjust_lr_fn: Optional[str], shape: torch.Size) -> float:
    """η·√max(1, rows/cols) (``None``/``'original'``) or η·0.2·√max(rows, cols) (``'match_rms_adamw'``)."""
    rows, cols = shape[0], shape[1]
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1, rows / cols))


def check_ns_hyper(group: Mapping[str, Any]) -> None:
    """``ns_steps`` ≥ 1, ``ns_coefficients`` three finite numbers, ``ns_dtype`` a floating dtype or None."""
    positive_int("ns_steps", group["ns_steps"])
    coefficients = group["ns_coefficients"]
    if not isinstance(coefficients, (tuple, list)) or len(coefficients) != 3:
        raise ValueError(f"ns_coefficients must be three numbers (a, b, c), got {coefficients!r}")
    for c in coefficients:
        number("ns_coefficients", c, -math.inf)
    dtype = group["ns_dtype"]
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"ns_dtype must be a floating-point torch.dtype or None, got {dtype!r}")


def _check_muon(group: Mapping[str, Any]) -> None:
    number("lr", group["lr"])
    number("weight_decay", group["weight_decay"])
    number("momentum", group["momentum"], 0.0, 1.0)
    if not isinstance(group["nesterov"], bool):
        raise ValueError(f"nesterov must be a bool, got {group['nesterov']!r}")
    number("eps", group["eps"])
    choice("adjust_lr_fn", group["adjust_lr_fn"], ADJUST_LR_FNS)
    check_ns_hyper(group)


class Muon(TensorOptimizer):
    """MomentUm Orthogonalized by Newton–Schulz — the rule of ``torch.optim.Muon``:

        B ← μ B + (1−μ) G                        (``momentum_buffer``, a lerp)
        U ← (1−μ) G + μ B  if nesterov, else B
        O ← NS(U)                                quintic Newton–Schulz (a, b, c), ``ns_steps``
        W ← W (1 − η λ) − η' O                  decoupled weight decay; η' = adjusted lr

    with η' = η·√max(1, rows/cols) (``adjust_lr_fn`` ``None``/``'original'``) or
    η·0.2·√max(rows, cols) (``'match_rms_adamw'``). Same constructor as ``torch.optim.Muon``
    (plus keyword-only ``ns_dtype``, ``foreach``), same state (``momentum_buffer``), same
    2-D-only restriction (a ValueError, also for groups added later).

    Difference from ``torch.optim.Muon`` (decided): the matrices of a group that share a shape
    (up to transposition) are orthogonalised as one stacked batch (:func:`~.newton_schulz.orthogonalize`) instead of
    one at a time. With ``ns_dtype=torch.bfloat16`` (torch's choice, and the default where bf16
    GEMMs are native) the results equal torch's exactly for wide and square matrices and to bf16
    rounding for tall ones (torch's first X Xᵀ reads a transposed view, summed in another order).

    Args:
        params: 2-D parameters or parameter groups.
        lr: η ≥ 0.  weight_decay: λ ≥ 0 (decoupled).  momentum: μ ∈ [0, 1].
        nesterov: Nesterov look-ahead.  ns_coefficients: (a, b, c).  eps: Frobenius-norm floor.
        ns_steps: Newton–Schulz iterations ≥ 1.  adjust_lr_fn: ``None``, ``'original'``,
            ``'match_rms_adamw'``.
        ns_dtype: Newton–Schulz compute dtype (``None``: :func:`~.newton_schulz.default_dtype`).
        foreach: multi-tensor path for the element-wise work (``None``: on when every
            parameter is on CUDA).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = NS_EPS,
        ns_steps: int = 5,
        adjust_lr_fn: Optional[str] = None,
        *,
        ns_dtype: Optional[torch.dtype] = None,
        foreach: Optional[bool] = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            ns_dtype=ns_dtype,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    check_hyper = staticmethod(_check_muon)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            if p.ndim != 2:
                self.param_groups.pop()
                raise ValueError(f"Muon only supports 2-D parameters, got a parameter of shape {tuple(p.shape)}")

    def update(self, group: Group, params: list[Tensor], grads: list[Tensor], foreach: bool) -> None:
        lr, momentum = group["lr"], group["momentum"]
        bufs = state_list(self, params, "momentum_buffer", zeros)
        each("lerp_", foreach, bufs, grads, 1 - momentum)
        directions = each("lerp", foreach, grads, bufs, momentum) if group["nesterov"] else bufs
        ortho = orthogonalize(
            directions, group["ns_steps"], tuple(group["ns_coefficients"]), group["eps"], group["ns_dtype"]
        )
        if group["weight_decay"] != 0:
            each("mul_", foreach, params, 1 - lr * group["weight_decay"])
        by_lr: dict[float, list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            by_lr[adjusted_lr(lr, group["adjust_lr_fn"], p.shape)].append(i)
        for step_size, indices in by_lr.items():
            each("add_", foreach, [params[i] for i in indices], [ortho[i] for i in indices], alpha=-step_size)
