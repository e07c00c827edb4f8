"""Multi-frequency CMS gradient accumulation in plain PyTorch: the ground truth of ``cms_accumulate``.

Level l of a Continuum Memory System has period C_l; its parameters change only on the steps
its period names, by the inner optimizer applied to the gradient summed (or averaged) over
the window since its last update:

    off-cycle:  A ← A + g                                   (fp32 accumulator; θ and optimizer state untouched)
    on-cycle:   u = A + g  (× 1/n with ``average``, n = gradients in the window);  θ ← Opt(θ, u);  A ← 0

Inner optimizers, with torch.optim's update rules (accumulators and state in fp32, float64 for
float64 parameters; k = inner steps taken before this one):

    sgd:    u ← u + λθ;  b ← u (k = 0) or μb + (1−τ)u;  u ← u + μb (nesterov) or b;  θ ← θ − η u
    adam:   u ← u + λθ                       (adamw instead: θ ← θ (1 − ηλ))
            m ← β1 m + (1−β1) u;  v ← β2 v + (1−β2) u²
            θ ← θ − (η / (1 − β1^{k+1})) · m / (√v / √(1 − β2^{k+1}) + ε)

Every product and sum is its own fp32 rounding (no fused multiply-add), so a kernel doing
the same operations in the same order matches this loop bit for bit (for Adam also the same
square root: ``torch.sqrt`` on x86 CPUs is MKL's, which is not always correctly rounded); scalars are rounded to
fp32 once (1/n for the mean, 1/√(1−β2^{k+1}), η/(1−β1^{k+1}) and 1 − ηλ are formed in float64
first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["OPTIMIZERS", "Hyper", "compute_dtype", "step"]

OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class Hyper:
    """Inner-optimizer hyper-parameters of one call (SGD reads momentum, dampening, nesterov;
    Adam(W) reads beta1, beta2, eps; both read lr and weight_decay)."""

    optimizer: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    average: bool = False


def _rounded(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` (what a kernel in that precision multiplies by)."""
    return float(torch.tensor(value, dtype=dtype))


def compute_dtype(param: Tensor) -> torch.dtype:
    """The accumulator/state precision: float64 for float64 parameters, else float32."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def _sgd(p: Tensor, u: Tensor, buf: Tensor | None, k: int, h: Hyper) -> Tensor:
    if h.weight_decay != 0.0:
        u = u + p * h.weight_decay
    if h.momentum != 0.0:
        assert buf is not None
        if k == 0:
            buf.copy_(u)
        else:
            buf.copy_(buf * h.momentum + u * (1.0 - h.dampening))
        u = u + buf * h.momentum if h.nesterov else buf.clone()
    return p - u * h.lr


def _adam(p: Tensor, u: Tensor, m: Tensor, v: Tensor, k: int, h: Hyper) -> Tensor:
    if h.optimizer == "adamw":
        p = p * _rounded(1.0 - h.lr * h.weight_decay, p.dtype)
    elif h.weight_decay != 0.0:
        u = u + p * h.weight_decay
    m.copy_(m * h.beta1 + u * (1.0 - h.beta1))
    v.copy_(v * h.beta2 + (u * u) * (1.0 - h.beta2))
    t = k + 1
    step_size = h.lr / (1.0 - h.beta1**t)
    denom = v.sqrt() * _rounded(1.0 / math.sqrt(1.0 - h.beta2**t), p.dtype) + h.eps
    return p - (m / denom) * step_size


@torch.no_grad()
def step(
    params: list[Tensor],
    grads: list[Tensor],
    accumulators: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    counts: list[int],
    steps: list[int],
    due: list[bool],
    hyper: Hyper,
) -> None:
    """One optimizer step of the multi-frequency rule (module docstring), tensor by tensor, in place.

    ``counts[i]``: gradients already in ``accumulators[i]``; ``steps[i]``: inner-optimizer steps
    taken so far; ``exp_avgs`` holds the SGD momentum buffers (empty list without momentum) or
    Adam's first moments, ``exp_avg_sqs`` Adam's second moments (empty for SGD). The caller
    advances ``counts`` and ``steps``.
    """
    for i, (p, g, acc) in enumerate(zip(params, grads, accumulators)):
        ct = compute_dtype(p)
        g32 = g.to(ct)
        if not due[i]:
            acc.add_(g32)
            continue
        u = acc + g32
        if hyper.average:
            u = u * _rounded(1.0 / (counts[i] + 1), ct)
        p32 = p.to(ct)
        if hyper.optimizer == "sgd":
            p32 = _sgd(p32, u, exp_avgs[i] if exp_avgs else None, steps[i], hyper)
        else:
            p32 = _adam(p32, u, exp_avgs[i], exp_avg_sqs[i], steps[i], hyper)
        p.copy_(p32)
        acc.zero_()
