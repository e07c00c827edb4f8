"""Momentum written by the delta rule (paper Eq. 21–22), and Oja-rule momentum."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ._hyper import number
from .preconditioned import rms_preconditioned
from .simple_momentum import Group, TensorOptimizer, check_momentum_hyper, each, state_list, with_weight_decay, zeros


def matrix_view(t: Tensor) -> Tensor:
    """The [rows, cols] matrix a parameter stands for: [shape[0], -1] when ≥ 2-D, else one row [1, -1]."""
    return t.reshape(t.shape[0], -1) if t.ndim >= 2 else t.reshape(1, -1)


def times_gram(m: Tensor, g: Tensor, scale: float = 1.0) -> Tensor:
    """scale · M (GᵀG) for the matrix views M, G of ``m``, ``g`` (shaped like ``m``). The product
    is associated as (M Gᵀ) G when rows ≤ cols (2·rows²·cols multiply-adds), else as M (GᵀG)
    (2·cols²·rows), so the Gram matrix formed is always the small side's; ``scale`` is applied
    to that small matrix."""
    M, G = matrix_view(m), matrix_view(g)
    if M.shape[0] <= M.shape[1]:
        out = ((M @ G.mT) * scale) @ G
    else:
        out = M @ ((G.mT @ G) * scale)
    return out.view_as(m)


def _check_delta(group: Mapping[str, Any]) -> None:
    check_momentum_hyper(group)
    if not isinstance(group["precondition"], bool):
        raise ValueError(f"precondition must be a bool, got {group['precondition']!r}")
    number("beta2", group["beta2"], 0.0, 1.0, high_open=True)
    number("eps", group["eps"])


class DeltaRuleMomentum(TensorOptimizer):
    """Delta-rule momentum (paper Eq. 21–22): the momentum is a linear memory of gradients,
    written by the delta rule, so the part of m along the current gradient is replaced rather
    than accumulated. For every parameter, with M, G its momentum and gradient as a matrix
    (≥ 2-D tensors as [shape[0], −1]; 1-D and 0-d tensors as one row [1, −1]):

        G ← G + λW
        M ← M (μI − η GᵀG) − η P⊙G
        W ← W + M

    For a row vector the Gram term is ⟨g, m⟩ g, i.e. m ← μm − η⟨g, m⟩g − η P⊙g. With P = 1 the
    first step is W ← W − ηG (descent). The factor μI − ηGᵀG keeps the momentum bounded only
    while η‖G‖₂² < 1 + μ (as the delta rule needs β‖k‖² < 2): large gradients need a small η.

    Differences from the reference library (decided):
      - Sign: the reference applies W ← W − M to M = μM − ... − ηG, i.e. gradient *ascent*, which
        diverges on any quadratic; here W ← W + M as the paper writes.
      - Scale and shape: the reference's Gram term is ⟨g, m⟩g over the flattened tensor and is not
        scaled by η; here it is η·M GᵀG with the Gram matrix of the parameter's matrix view
        (identical to the reference's form for 1-D tensors, up to the η).
      - ``precondition=True``: the reference's P is a constant 1 (a no-op); here P is the
        bias-corrected running RMS preconditioner P = 1 / (√(v / (1−β₂ᵗ)) + ε),
        v ← β₂ v + (1−β₂) G² (``beta2``, ``eps`` are keyword-only additions).

    State: ``momentum_buffer``; with ``precondition``, ``exp_avg_sq`` and ``step``.

    Args:
        params: parameters or parameter groups.
        lr: η ≥ 0.  momentum: μ ∈ [0, 1).  weight_decay: λ ≥ 0 (L2, added to the gradient).
        precondition: use the RMS preconditioner P.  beta2: β₂ ∈ [0, 1).  eps: ε ≥ 0.
        foreach: multi-tensor path for the element-wise work (``None``: on when every
            parameter is on CUDA); the Gram products run per tensor.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        precondition: bool = False,
        *,
        beta2: float = 0.999,
        eps: float = 1e-8,
        foreach: Optional[bool] = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            precondition=precondition,
            beta2=beta2,
            eps=eps,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    check_hyper = staticmethod(_check_delta)

    def update(self, group: Group, params: list[Tensor], grads: list[Tensor], foreach: bool) -> None:
        lr = group["lr"]
        grads = with_weight_decay(grads, params, group["weight_decay"], foreach)
        bufs = state_list(self, params, "momentum_buffer", zeros)
        forget = [times_gram(m, g, -lr) for m, g in zip(bufs, grads)]
        if group["precondition"]:
            grads = rms_preconditioned(self, params, grads, group["beta2"], group["eps"], True, foreach)
        each("mul_", foreach, bufs, group["momentum"])
        each("add_", foreach, bufs, grads, alpha=-lr)
        # The product term comes last, pre-scaled, with alpha = 1: torch 2.13's inductor fuses
        # add(mm(a, b), x, alpha=s) into addmm and drops s, so no alpha may meet an mm result.
        each("add_", foreach, bufs, forget)
        each("add_", foreach, params, bufs)


def _check_oja(group: Mapping[str, Any]) -> None:
    check_momentum_hyper(group)
    number("oja_lr", group["oja_lr"])


class OjaRuleMomentum(TensorOptimizer):
    """Momentum written by Oja's rule (self-normalising Hebbian memory), per parameter tensor:

        g ← g + λW;   m ← μ m + γ (g − ⟨g, m⟩ m);   W ← W − η m

    with γ = ``oja_lr`` and ⟨·,·⟩ over the whole tensor. Difference from the reference library
    (decided): there the decay term is computed in place after m was already updated, i.e.
    −γ⟨g, m_old⟩ m_new; here both m in the Oja term are the previous buffer, as the rule says.
    State: ``momentum_buffer``.

    Args:
        params: parameters or parameter groups.
        lr: η ≥ 0.  momentum: μ ∈ [0, 1).  weight_decay: λ ≥ 0.  oja_lr: γ ≥ 0.
        foreach: multi-tensor path (``None``: on when every parameter is on CUDA).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        oja_lr: float = 0.01,
        *,
        foreach: Optional[bool] = None,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, oja_lr=oja_lr, foreach=foreach)
        super().__init__(params, defaults)

    check_hyper = staticmethod(_check_oja)

    def update(self, group: Group, params: list[Tensor], grads: list[Tensor], foreach: bool) -> None:
        oja_lr = group["oja_lr"]
        grads = with_weight_decay(grads, params, group["weight_decay"], foreach)
        bufs = state_list(self, params, "momentum_buffer", zeros)
        # m ← (μ − γ⟨g, m⟩) m + γ g: the coefficient is taken from the old m before m changes.
        keep = [group["momentum"] - oja_lr * torch.dot(g.reshape(-1), m.reshape(-1)) for g, m in zip(grads, bufs)]
        each("mul_", foreach, bufs, keep)
        each("add_", foreach, bufs, grads, alpha=oja_lr)
        each("add_", foreach, params, bufs, alpha=-group["lr"])
