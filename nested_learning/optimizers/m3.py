"""M3, the Multi-scale Momentum Muon of the Nested Learning paper (Algorithm 1)."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from ._hyper import number, positive_int
from .delta_rule import matrix_view
from .muon import check_ns_hyper
from .newton_schulz import NS_COEFFICIENTS, NS_EPS, orthogonalize
from .simple_momentum import Group, TensorOptimizer, advance_steps, each, state_list, zeros


def orthogonalized(tensors: list[Tensor], group: Group) -> list[Tensor]:
    """NS of every tensor's matrix view ([shape[0], −1]) for ≥ 2-D tensors, batched across
    shapes equal up to transposition, in the tensor's shape and the NS compute dtype; ≤ 1-D
    tensors are returned as they are."""
    matrices = [i for i, t in enumerate(tensors) if t.ndim >= 2]
    ortho = orthogonalize(
        [matrix_view(tensors[i]) for i in matrices],
        group["ns_steps"],
        NS_COEFFICIENTS,
        NS_EPS,
        group["ns_dtype"],
    )
    out = list(tensors)
    for i, o in zip(matrices, ortho):
        out[i] = o.reshape(tensors[i].shape)
    return out


def _check_m3(group: Mapping[str, Any]) -> None:
    number("lr", group["lr"])
    for name in ("beta1", "beta2", "beta3"):
        number(name, group[name], 0.0, 1.0)
    number("alpha", group["alpha"])
    number("eps", group["eps"])
    positive_int("slow_chunk", group["slow_chunk"])
    number("weight_decay", group["weight_decay"])
    check_ns_hyper({**group, "ns_coefficients": NS_COEFFICIENTS})


class M3(TensorOptimizer):
    """Multi-scale Momentum Muon (paper Algorithm 1), with f = ``slow_chunk``:

        W ← W (1 − η λ)                                   decoupled weight decay
        M1 ← M1 + β₁ g;   V ← V + β₂ g²;   S ← S + g        fast momentum, second moment, chunk sum
        W ← W − η (NS(M1) + α O2) / (√V + ε)
        every f-th step of the parameter, after the update:
            M2 ← M2 + β₃ S;   S ← 0;   O2 ← NS(M2)          slow momentum, used by the next f steps

    O2 starts at 0, so the first f steps are driven by M1 alone. M1, M2 and V accumulate without
    decay, exactly as Algorithm 1 writes them (V is AdaGrad's sum of squares, so steps shrink
    like 1/√t). NS is the quintic Newton–Schulz iteration (3.4445, −4.7750, 2.0315) with
    ``ns_steps`` iterations, run on a ≥ 2-D tensor's matrix view [shape[0], −1] and batched
    across the tensors of a group whose matrix views share a shape (up to transposition);
    ≤ 1-D tensors are not orthogonalised (NS is the identity for them).
    State: ``step``, ``m1``, ``m2``, ``v``, ``slow_buffer`` (S), ``o2``.

    Differences from kmccleary3301/nested_learning's ``M3`` (the peer; same recurrences and the
    same cadence — O2 refreshed after the f-th step's update):
      - NS: the peer runs the cubic iteration X ← X(3I − XᵀX)/2 in the parameter dtype, with the
        Gram matrix on the columns' side; here the quintic one in bf16 (see
        :func:`~.newton_schulz.default_dtype`), Gram on the smaller side, normalised with
        ε = 1e-7 instead of the optimizer's ``eps``. With 3 steps the cubic iteration lifts a small
        singular value by 3.4×, the quintic one by about 41×, so NS(M) is much closer to
        orthogonal.
      - Weight decay: the peer adds λW to the gradient, which the orthogonalisation then
        normalises away; here it is decoupled (as in AdamW and Muon).

    Args:
        params: parameters or parameter groups.
        lr: η ≥ 0.  beta1, beta2, beta3: β₁, β₂, β₃ ∈ [0, 1].  alpha: α ≥ 0 (slow-momentum weight).
        eps: ε ≥ 0.  ns_steps: Newton–Schulz iterations ≥ 1.  slow_chunk: f ≥ 1.
        weight_decay: λ ≥ 0 (decoupled).
        ns_dtype: Newton–Schulz compute dtype (``None``: :func:`~.newton_schulz.default_dtype`).
        foreach: multi-tensor path for the element-wise work (``None``: on when every
            parameter is on CUDA).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        beta1: float = 0.9,
        beta2: float = 0.999,
        beta3: float = 0.9,
        alpha: float = 1.0,
        eps: float = 1e-8,
        ns_steps: int = 3,
        slow_chunk: int = 100,
        weight_decay: float = 0.0,
        *,
        ns_dtype: Optional[torch.dtype] = None,
        foreach: Optional[bool] = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            beta3=beta3,
            alpha=alpha,
            eps=eps,
            ns_steps=ns_steps,
            slow_chunk=slow_chunk,
            weight_decay=weight_decay,
            ns_dtype=ns_dtype,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    check_hyper = staticmethod(_check_m3)

    def update(self, group: Group, params: list[Tensor], grads: list[Tensor], foreach: bool) -> None:
        lr = group["lr"]
        m1, m2, v, slow, o2 = (state_list(self, params, k, zeros) for k in ("m1", "m2", "v", "slow_buffer", "o2"))
        steps = advance_steps(self, params)
        if group["weight_decay"] != 0:
            each("mul_", foreach, params, 1 - lr * group["weight_decay"])
        each("add_", foreach, m1, grads, alpha=group["beta1"])
        each("addcmul_", foreach, v, grads, grads, value=group["beta2"])
        each("add_", foreach, slow, grads)
        direction = each("add", foreach, orthogonalized(m1, group), o2, alpha=group["alpha"])
        denom = each("sqrt", foreach, v)
        each("add_", foreach, denom, group["eps"])
        each("addcdiv_", foreach, params, direction, denom, value=-lr)
        due = [i for i, t in enumerate(steps) if t % group["slow_chunk"] == 0]
        if due:
            self._refresh_slow([m2[i] for i in due], [slow[i] for i in due], [o2[i] for i in due], group, foreach)

    @staticmethod
    def _refresh_slow(m2: list[Tensor], slow: list[Tensor], o2: list[Tensor], group: Group, foreach: bool) -> None:
        """M2 ← M2 + β₃ S;  S ← 0;  O2 ← NS(M2), for the parameters whose chunk just ended."""
        each("add_", foreach, m2, slow, alpha=group["beta3"])
        each("zero_", foreach, slow)
        each("copy_", foreach, o2, orthogonalized(m2, group))
