"""Momentum with a diagonal (running-RMS) preconditioner, and its Adam relative."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import Tensor
from torch.optim.optimizer import ParamsT

from ._hyper import choice, number
from .simple_momentum import (
    Group,
    TensorOptimizer,
    advance_steps,
    check_momentum_hyper,
    each,
    state_list,
    with_weight_decay,
    zeros,
)

PRECONDITION_TYPES = ("diagonal", "adam", "none")


def rms_preconditioned(
    optimizer: TensorOptimizer,
    params: list[Tensor],
    grads: list[Tensor],
    beta2: float,
    eps: float,
    bias_correction: bool,
    foreach: bool,
) -> list[Tensor]:
    """P ⊙ g with the running diagonal RMS preconditioner: v ← β₂ v + (1−β₂) g² (state
    ``exp_avg_sq``), P = 1 / (√v + ε), or 1 / (√(v / (1−β₂ᵗ)) + ε) with ``bias_correction``
    (t = state ``step``, counted here)."""
    v = state_list(optimizer, params, "exp_avg_sq", zeros)
    each("mul_", foreach, v, beta2)
    each("addcmul_", foreach, v, grads, grads, value=1 - beta2)
    denom = each("sqrt", foreach, v)
    if bias_correction:
        each("div_", foreach, denom, [(1 - beta2**t) ** 0.5 for t in advance_steps(optimizer, params)])
    each("add_", foreach, denom, eps)
    return each("div", foreach, grads, denom)


def _check_preconditioned(group: Mapping[str, Any]) -> None:
    check_momentum_hyper(group)
    choice("precondition_type", group["precondition_type"], PRECONDITION_TYPES)
    number("eps", group["eps"])
    number("beta2", group["beta2"], 0.0, 1.0, high_open=True)


class PreconditionedMomentum(TensorOptimizer):
    """Momentum on a preconditioned gradient (paper Eq. 19–20):

        g ← g + λW;   m ← μ m − η P⊙g;   W ← W + m

    with ``precondition_type``
      - ``'diagonal'``: P = 1 / (√v + ε), v ← β₂ v + (1−β₂) g² (no bias correction);
      - ``'adam'``: P = 1 / (√(v / (1−β₂ᵗ)) + ε);
      - ``'none'``: P = 1 (momentum SGD with the sign convention m ← μm − ηg).

    Same math as the reference library (its P⊙g is computed here as g / (√v + ε), one
    rounding fewer). State: ``momentum_buffer``; ``exp_avg_sq`` and ``step`` unless ``'none'``.

    Args:
        params: parameters or parameter groups.
        lr: η ≥ 0.  momentum: μ ∈ [0, 1) (at μ ≥ 1 the buffer never forgets a step).
        weight_decay: λ ≥ 0 (L2, added to the gradient).
        precondition_type: ``'diagonal'``, ``'adam'`` or ``'none'``.
        eps: ε ≥ 0.  beta2: β₂ ∈ [0, 1).
        foreach: multi-tensor path (``None``: on when every parameter is on CUDA).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        precondition_type: str = "diagonal",
        eps: float = 1e-8,
        beta2: float = 0.999,
        *,
        foreach: Optional[bool] = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            precondition_type=precondition_type,
            eps=eps,
            beta2=beta2,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    check_hyper = staticmethod(_check_preconditioned)

    def update(self, group: Group, params: list[Tensor], grads: list[Tensor], foreach: bool) -> None:
        grads = with_weight_decay(grads, params, group["weight_decay"], foreach)
        kind = group["precondition_type"]
        if kind != "none":
            grads = rms_preconditioned(self, params, grads, group["beta2"], group["eps"], kind == "adam", foreach)
        bufs = state_list(self, params, "momentum_buffer", zeros)
        each("mul_", foreach, bufs, group["momentum"])
        each("add_", foreach, bufs, grads, alpha=-group["lr"])
        each("add_", foreach, params, bufs)


def _check_adaptive(group: Mapping[str, Any]) -> None:
    check_momentum_hyper(group)
    number("eps", group["eps"])
    number("beta1", group["beta1"], 0.0, 1.0, high_open=True)
    number("beta2", group["beta2"], 0.0, 1.0, high_open=True)


class AdaptivePreconditionedMomentum(TensorOptimizer):
    """Adam with L2 weight decay (the reference library's "adaptive preconditioned momentum"):

        g ← g + λW;  m ← β₁ m + (1−β₁) g;  v ← β₂ v + (1−β₂) g²
        W ← W − η/(1−β₁ᵗ) · m / (√v / √(1−β₂ᵗ) + ε)

    computed with the same operations as ``torch.optim.Adam(weight_decay=λ)`` (single-tensor
    path), so the two agree bit for bit. ``momentum`` is accepted for signature compatibility
    with the reference library and, as there, unused (β₁ is the momentum rate). State:
    ``exp_avg``, ``exp_avg_sq``, ``step``.

    Args:
        params: parameters or parameter groups.
        lr: η ≥ 0.  momentum: unused, in [0, 1).  weight_decay: λ ≥ 0.  eps: ε ≥ 0.
        beta1, beta2: β₁, β₂ ∈ [0, 1).
        foreach: multi-tensor path (``None``: on when every parameter is on CUDA).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        beta1: float = 0.9,
        beta2: float = 0.999,
        *,
        foreach: Optional[bool] = None,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps, beta1=beta1, beta2=beta2, foreach=foreach
        )
        super().__init__(params, defaults)

    check_hyper = staticmethod(_check_adaptive)

    def update(self, group: Group, params: list[Tensor], grads: list[Tensor], foreach: bool) -> None:
        beta1, beta2 = group["beta1"], group["beta2"]
        grads = with_weight_decay(grads, params, group["weight_decay"], foreach)
        m = state_list(self, params, "exp_avg", zeros)
        v = state_list(self, params, "exp_avg_sq", zeros)
        steps = advance_steps(self, params)
        each("lerp_", foreach, m, grads, 1 - beta1)
        each("mul_", foreach, v, beta2)
        each("addcmul_", foreach, v, grads, grads, value=1 - beta2)
        denom = each("sqrt", foreach, v)
        each("div_", foreach, denom, [(1 - beta2**t) ** 0.5 for t in steps])
        each("add_", foreach, denom, group["eps"])
        each("addcdiv_", foreach, params, m, denom, value=[-group["lr"] / (1 - beta1**t) for t in steps])


def __getattr__(name: str) -> Any:
    """``OjaRuleMomentum`` at the reference library's module path (it lives beside the delta rule)."""
    if name == "OjaRuleMomentum":
        from .delta_rule import OjaRuleMomentum

        return OjaRuleMomentum
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
