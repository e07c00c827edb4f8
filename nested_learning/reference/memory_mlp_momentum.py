"""Reference (plain PyTorch, per tensor) of the deep-momentum step ``memory_mlp_momentum``.

One bucket memory m(·; θ) = Linear(2S→h) → LayerNorm(h) → SiLU → Linear(h→S) serves every
tensor of a call. Per tensor W (n elements) with gradient u, momentum m and last output o_prev::

    g = u + λ·W                                  weight decay into the gradient (not decoupled)
    X = blocks([g ; m]),  O = m(X; θ)            S-coordinate blocks, zero-padded tail
    o = O[:n]                                    one output per coordinate of W
    ∇θ += s · ∂ℓ(o, g, o_prev)/∂θ                internal loss ℓ, scale s (1/#tensors: the mean)
    m ← μ·m + o;  W ← W − lr·m;  o_prev ← o      o is computed before the memory moves

Internal losses ℓ (per tensor, over its n coordinates):

- ``surrogate``: (1 − cos(o, g)) + 0.1·(‖o‖/‖g‖ − 1)² + 0.1·mean((o − o_prev)²); the cosine term
  is 0 when ‖o‖ or ‖g‖ ≤ 1e-8, the magnitude term is 0.1·‖o‖² when ‖g‖ ≤ 1e-8, the last term
  only once o_prev exists;
- ``l2_regression``: mean((o − P g)²) with P [S, S] applied block-wise; P then moves by the
  normalized delta rule P ← P + λ_P · Σ_tensors Σ_blocks (o_b − P g_b) g_bᵀ / ‖g‖² (tensors with
  ‖g‖² ≤ 1e-8 skipped), every tensor seeing the P the call started with;
- ``dot``: −⟨o, g⟩.

The memory gradient is written out (:func:`memory_backward`, :func:`internal_loss_grad`; the
tests check both against autograd), one tensor at a time: autograd inside a custom op's body
does not survive dispatch modes such as ``opcheck``'s schema check. States (momenta, last outputs,
memory weights, their gradients, P) are in the compute dtype: float64 for float64 parameters,
else float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Hyper", "LOSSES", "NORM_EPS", "compute_dtype", "to_blocks", "memory_forward", "memory_backward", "internal_loss",
           "internal_loss_grad", "step"]

LOSSES = ("surrogate", "l2_regression", "dot")
NORM_EPS = 1e-8  # norms at or below this switch the surrogate's terms off, as in the reference library


@dataclass(frozen=True)
class Hyper:
    """Hyper-parameters of one call (see the module docstring for the symbols)."""

    lr: float
    momentum: float
    weight_decay: float = 0.0
    loss: str = "surrogate"
    loss_scale: float = 1.0  # s: multiplies every tensor's loss (1/#tensors gives the mean)
    compute_grad: bool = True  # accumulate ∂ℓ/∂θ into the weight gradients this step
    projection_lr: float = 0.01  # λ_P of the l2_regression projection
    ln_eps: float = 1e-5


def compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def memory_forward(x: Tensor, weights: Sequence[Tensor], ln_eps: float) -> Tensor:
    """O = W2·SiLU(LayerNorm(W1·x + b1)) + b2 on rows x [N, 2S] → [N, S]; ``weights`` =
    (W1 [h, 2S], b1 [h], γ [h], β [h], W2 [S, h], b2 [S])."""
    w1, b1, ln_w, ln_b, w2, b2 = weights
    hidden = F.layer_norm(F.linear(x, w1, b1), (w1.shape[0],), ln_w, ln_b, ln_eps)
    return F.linear(F.silu(hidden), w2, b2)


def memory_backward(x: Tensor, d_out: Tensor, weights: Sequence[Tensor], ln_eps: float) -> list[Tensor]:
    """∂/∂(W1, b1, γ, β, W2, b2) of Σ d_out ⊙ O(x), written out (a = W1x + b1, â its normalised
    form with 1/σ = r, z = γâ + β, s = SiLU(z))::

        dW2 = d_outᵀ s;  ds = d_out W2;  dz = ds ⊙ σ(z)(1 + z(1 − σ(z)));  dγ = Σ dz ⊙ â;  dβ = Σ dz
        dâ = dz ⊙ γ;  da = r (dâ − mean(dâ) − â · mean(dâ ⊙ â));  dW1 = daᵀ x;  db1 = Σ da
    """
    w1, b1, ln_w, ln_b, w2, b2 = weights
    a = F.linear(x, w1, b1)
    mean = a.mean(1, keepdim=True)
    rstd = ((a - mean).pow(2).mean(1, keepdim=True) + ln_eps).rsqrt()
    a_hat = (a - mean) * rstd
    z = a_hat * ln_w + ln_b
    sig = torch.sigmoid(z)
    dz = (d_out @ w2) * sig * (1 + z * (1 - sig))
    da_hat = dz * ln_w
    da = rstd * (da_hat - da_hat.mean(1, keepdim=True) - a_hat * (da_hat * a_hat).mean(1, keepdim=True))
    return [da.T @ x, da.sum(0), (dz * a_hat).sum(0), dz.sum(0), d_out.T @ (z * sig), d_out.sum(0)]


def internal_loss(mode: str, o: Tensor, g: Tensor, prev: Optional[Tensor], target: Optional[Tensor]) -> Tensor:
    """ℓ(o) of one tensor (1-d o, g; ``prev`` the last output or None; ``target`` = P g for
    ``l2_regression``); differentiable in o."""
    if mode == "dot":
        return -(o * g).sum()
    if mode == "l2_regression":
        return (o - target).pow(2).mean()
    g_norm, o_norm = g.norm(), o.norm()
    loss = o.new_zeros(())
    if g_norm > NORM_EPS and o_norm > NORM_EPS:
        loss = loss + 1 - (o * g).sum() / (o_norm * g_norm)
    loss = loss + 0.1 * ((o_norm / g_norm - 1).pow(2) if g_norm > NORM_EPS else o_norm.pow(2))
    if prev is not None:
        loss = loss + 0.1 * (o - prev).pow(2).mean()
    return loss


def internal_loss_grad(mode: str, o: Tensor, g: Tensor, prev: Optional[Tensor], target: Optional[Tensor]) -> Tensor:
    """∂ℓ/∂o of :func:`internal_loss`, written out: dot −g; l2 2(o − t)/n; surrogate
    −g/(‖o‖‖g‖) + ⟨o,g⟩ o/(‖o‖³‖g‖) + 0.2(‖o‖/‖g‖ − 1) o/(‖o‖‖g‖) + 0.2(o − o_prev)/n (with the
    same switches as the loss; the magnitude term is 0.2·o when ‖g‖ ≤ 1e-8)."""
    n = o.numel()
    if mode == "dot":
        return -g
    if mode == "l2_regression":
        return 2 * (o - target) / n
    g_norm, o_norm = g.norm(), o.norm()
    grad = 0.2 * (o - prev) / n if prev is not None else torch.zeros_like(o)
    if g_norm > NORM_EPS and o_norm > NORM_EPS:
        grad = grad - g / (o_norm * g_norm) + (o * g).sum() * o / (o_norm.pow(3) * g_norm)
    if g_norm <= NORM_EPS:
        grad = grad + 0.2 * o
    elif o_norm > 0:
        grad = grad + 0.2 * (o_norm / g_norm - 1) / (o_norm * g_norm) * o
    return grad


def to_blocks(flat: Tensor, size: int) -> Tensor:
    """A 1-d tensor as [⌈n/size⌉, size] rows (at least one), the tail zero-padded."""
    n = flat.numel()
    rows = max(1, -(-n // size))
    return flat.reshape(rows, size) if rows * size == n else F.pad(flat, (0, rows * size - n)).reshape(rows, size)


@torch.no_grad()
def step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momenta: Sequence[Tensor],
    prev_outputs: Sequence[Tensor],
    has_prev: Sequence[bool],
    weights: Sequence[Tensor],
    weight_grads: Sequence[Tensor],
    projection: Tensor,
    hyper: Hyper,
) -> Tensor:
    """One step over every tensor, in place (see the module docstring); returns s·Σ ℓ."""
    size = weights[4].shape[0]
    projection_start = projection.clone() if hyper.loss == "l2_regression" else None
    total = weights[0].new_zeros(())
    for p, u, m, prev, seen in zip(params, grads, momenta, prev_outputs, has_prev):
        n = p.numel()
        if n == 0:
            continue
        ct = m.dtype
        g = u.to(ct).flatten() + hyper.weight_decay * p.to(ct).flatten()
        g_blocks = to_blocks(g, size)
        x = torch.cat([g_blocks, to_blocks(m.flatten(), size)], dim=1)
        target = (g_blocks @ projection_start.T).flatten()[:n] if projection_start is not None else None
        o = memory_forward(x, weights, hyper.ln_eps).flatten()[:n]
        o_prev = prev.flatten() if seen else None
        total += internal_loss(hyper.loss, o, g, o_prev, target) * hyper.loss_scale
        if hyper.compute_grad:
            d_out = to_blocks(internal_loss_grad(hyper.loss, o, g, o_prev, target) * hyper.loss_scale, size)
            for acc, d in zip(weight_grads, memory_backward(x, d_out, weights, hyper.ln_eps)):
                acc.add_(d)
        if projection_start is not None:
            g_sq = g.pow(2).sum()
            if g_sq > NORM_EPS:
                error = to_blocks(o - target, size)
                projection.add_(error.T @ g_blocks, alpha=hyper.projection_lr / g_sq.item())
        m.mul_(hyper.momentum).add_(o.view_as(m))
        p.copy_(p.to(ct) - hyper.lr * m)
        prev.copy_(o.view_as(prev))
    return total
