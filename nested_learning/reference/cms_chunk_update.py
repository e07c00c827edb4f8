"""In-context CMS level in plain PyTorch: a two-layer MLP whose weights are fast weights,
updated every ``chunk_size`` tokens. The ground truth of ``cms_chunk_update``.

Per sequence, with fast weights W1 ∈ R^{h×d}, W2 ∈ R^{e×h} (e = output width), activation σ
and local loss ℓ_t = ½‖o_t − v_t‖², the tokens of chunk c (positions cC … cC+C−1) use the
chunk-start weights W^(c):

    z_t = W1^(c) x_t,   a_t = σ(z_t),   o_t = W2^(c) a_t,   e_t = o_t − v_t
    δ_t = (W2^(c)ᵀ e_t) ⊙ σ'(z_t)
    W2^(c+1) = W2^(c) − lr Σ_{t∈c} e_t a_tᵀ,   W1^(c+1) = W1^(c) − lr Σ_{t∈c} δ_t x_tᵀ

The last chunk may be partial; its update is applied too, so the final weights have seen
every token (outputs of a chunk never see its own update). ``recurrent`` is the literal
token loop, ``chunked`` the best pure-PyTorch form (five batched GEMMs per chunk),
``chunked_backward`` the analytic gradient of ``chunked``: given what the forward kept
(``chunked_with_residuals``: the weights at each chunk start, never per token, and the
per-token activations z, W2ᵀe, e), one reverse sweep over chunks propagates the weight adjoint
with ten GEMMs per chunk and no forward recompute.

All math runs in float32 (float64 for float64 inputs); outputs come back in x's dtype, the
final weights in the compute dtype.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

__all__ = ["ACTIVATIONS", "activation", "recurrent", "chunked", "chunked_with_residuals", "chunked_backward", "compute_dtype"]

ACTIVATIONS = ("gelu", "silu", "relu")


class Activation(NamedTuple):
    """σ and its first two derivatives, elementwise."""

    f: Callable[[Tensor], Tensor]
    d1: Callable[[Tensor], Tensor]
    d2: Callable[[Tensor], Tensor]


def _gelu_parts(z: Tensor) -> tuple[Tensor, Tensor]:
    """Φ(z) and φ(z) of the exact (erf) GELU, σ(z) = z Φ(z)."""
    return 0.5 * (1.0 + torch.erf(z * (0.5**0.5))), torch.exp(-0.5 * z * z) * (0.5 / math.pi) ** 0.5


def _gelu(z: Tensor) -> Tensor:
    return z * _gelu_parts(z)[0]


def _gelu_d1(z: Tensor) -> Tensor:
    cdf, pdf = _gelu_parts(z)
    return cdf + z * pdf


def _gelu_d2(z: Tensor) -> Tensor:
    return _gelu_parts(z)[1] * (2.0 - z * z)


def _silu_d1(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def _silu_d2(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))


_ACTIVATIONS = {
    "gelu": Activation(_gelu, _gelu_d1, _gelu_d2),
    "silu": Activation(lambda z: z * torch.sigmoid(z), _silu_d1, _silu_d2),
    "relu": Activation(torch.relu, lambda z: (z > 0).to(z.dtype), torch.zeros_like),
}


def activation(name: str) -> Activation:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return _ACTIVATIONS[name]


def compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def recurrent(
    x: Tensor, target: Tensor, w1: Tensor, w2: Tensor, lr: float, chunk_size: int, activation_name: str = "gelu"
) -> tuple[Tensor, Tensor, Tensor]:
    """The token loop. x ``[B, T, d]``, target ``[B, T, e]``, w1 ``[B, h, d]``, w2 ``[B, e, h]``;
    returns ``(o [B, T, e], w1_final, w2_final)``; differentiable by autograd."""
    act = activation(activation_name)
    ct = compute_dtype(x)
    xs, vs = x.to(ct), target.to(ct)
    W1, W2 = w1.to(ct), w2.to(ct)
    g1, g2 = torch.zeros_like(W1), torch.zeros_like(W2)
    outputs = []
    T = x.shape[1]
    for t in range(T):
        z = torch.einsum("bhd,bd->bh", W1, xs[:, t])
        a = act.f(z)
        o = torch.einsum("beh,bh->be", W2, a)
        e = o - vs[:, t]
        delta = torch.einsum("beh,be->bh", W2, e) * act.d1(z)
        g2 = g2 + e[:, :, None] * a[:, None, :]
        g1 = g1 + delta[:, :, None] * xs[:, t, None, :]
        outputs.append(o)
        if (t + 1) % chunk_size == 0 or t == T - 1:
            W1, W2 = W1 - lr * g1, W2 - lr * g2
            g1, g2 = torch.zeros_like(W1), torch.zeros_like(W2)
    return torch.stack(outputs, 1).to(x.dtype), W1, W2


def _spans(T: int, C: int) -> list[slice]:
    return [slice(s, min(s + C, T)) for s in range(0, T, C)]


class _Chunk(NamedTuple):
    z: Tensor
    a: Tensor
    o: Tensor
    e: Tensor
    p: Tensor  # W2ᵀ e, before the σ' factor
    g1: Tensor
    g2: Tensor


def _chunk_forward(act: Activation, X: Tensor, V: Tensor, W1: Tensor, W2: Tensor) -> _Chunk:
    """One chunk with its start weights: X ``[B, C, d]``, V ``[B, C, e]``."""
    z = X @ W1.transpose(1, 2)
    a = act.f(z)
    o = a @ W2.transpose(1, 2)
    e = o - V
    p = e @ W2
    g1 = (p * act.d1(z)).transpose(1, 2) @ X
    g2 = e.transpose(1, 2) @ a
    return _Chunk(z, a, o, e, p, g1, g2)


def chunked_with_residuals(
    x: Tensor, target: Tensor, w1: Tensor, w2: Tensor, lr: float, chunk_size: int, activation_name: str = "gelu",
    checkpoint_every: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`chunked` that also returns what the backward reads: the chunk-start weights
    ``w1_starts [B, N, h, d]`` and ``w2_starts [B, N, e, h]`` (N = ⌈T / chunk_size⌉; index 0
    holds w1, w2) and the per-token activations ``[B, T, 2h + e]`` = (z | p | e), with
    z = W1 x, p = W2ᵀ e and e = o − v, all in the compute dtype. With ``checkpoint_every`` K > 1
    the starts are those a backend keeps when it rebuilds the others: chunks 0, K, 2K, … and then
    the final weights."""
    act = activation(activation_name)
    ct = compute_dtype(x)
    X, V = x.to(ct), target.to(ct)
    W1, W2 = w1.to(ct), w2.to(ct)
    outputs, starts1, starts2, acts = [], [], [], []
    for span in _spans(x.shape[1], chunk_size):
        starts1.append(W1)
        starts2.append(W2)
        c = _chunk_forward(act, X[:, span], V[:, span], W1, W2)
        outputs.append(c.o)
        acts.append(torch.cat([c.z, c.p, c.e], -1))
        W1, W2 = W1 - lr * c.g1, W2 - lr * c.g2
    K = checkpoint_every
    if K > 1:
        starts1, starts2 = starts1[::K] + [W1], starts2[::K] + [W2]
    starts = torch.stack(starts1, 1), torch.stack(starts2, 1)
    return torch.cat(outputs, 1).to(x.dtype), W1, W2, *starts, torch.cat(acts, 1)


def chunked(
    x: Tensor, target: Tensor, w1: Tensor, w2: Tensor, lr: float, chunk_size: int, activation_name: str = "gelu"
) -> tuple[Tensor, Tensor, Tensor]:
    """Same contract as :func:`recurrent`, five batched GEMMs per chunk (autograd-differentiable)."""
    return chunked_with_residuals(x, target, w1, w2, lr, chunk_size, activation_name)[:3]


def chunked_backward(
    x: Tensor,
    target: Tensor,
    w1_starts: Tensor,
    w2_starts: Tensor,
    activations: Tensor,
    lr: float,
    chunk_size: int,
    activation_name: str,
    do: Tensor,
    dw1_final: Tensor,
    dw2_final: Tensor,
    checkpoint_every: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dx, dtarget, dw1, dw2)`` of :func:`chunked` for cotangents ``do`` of the
    outputs and ``dw1_final``/``dw2_final`` of the final weights, given the chunk-start weights
    and activations of :func:`chunked_with_residuals` (dx, dtarget in x's and target's dtypes,
    dw in the compute dtype). No forward GEMM is redone: a = σ(z) is elementwise. With
    ``checkpoint_every`` K > 1 the starts hold every K-th chunk's and the final weights; the other
    chunks' starts are rebuilt from the next chunk's by undoing its update:
    W1^(c) = W1^(c+1) + lr δᵀ X,  W2^(c) = W2^(c+1) + lr eᵀ a.

    Reverse sweep per chunk, with dW^(c+1) the adjoint of the next chunk-start weights,
    dG = −lr dW^(c+1) and q = p ⊙ σ'(z) = δ:

        dq = X dG1ᵀ;  dp = dq ⊙ σ'(z);  dz = dq ⊙ p ⊙ σ''(z)
        de = a dG2ᵀ + dp W2;  dō = do + de  (ō = o − v, so dv = −de)
        da = e dG2 + dō W2;   dz += da ⊙ σ'(z)
        dX = δ dG1 + dz W1
        dW1^(c) = dW1^(c+1) + dzᵀ X;   dW2^(c) = dW2^(c+1) + eᵀ dp + dōᵀ a
    """
    act = activation(activation_name)
    ct = compute_dtype(x)
    X = x.to(ct)
    h = w1_starts.shape[2]
    Z, P, E = activations.split([h, h, activations.shape[-1] - 2 * h], -1)
    spans = _spans(x.shape[1], chunk_size)
    dO = do.to(ct)
    dW1, dW2 = dw1_final.to(ct), dw2_final.to(ct)
    dX, dV = torch.empty_like(X), torch.empty(target.shape, dtype=ct, device=x.device)
    K = checkpoint_every
    W1, W2 = w1_starts[:, -1], w2_starts[:, -1]  # when K > 1: the final weights, chunk N's start
    for i in reversed(range(len(spans))):
        span = spans[i]
        Xc, z, p, e = X[:, span], Z[:, span], P[:, span], E[:, span]
        a, s1 = act.f(z), act.d1(z)
        if i % K == 0:
            W1, W2 = w1_starts[:, i // K], w2_starts[:, i // K]
        else:
            W1, W2 = W1 + lr * (p * s1).transpose(1, 2) @ Xc, W2 + lr * e.transpose(1, 2) @ a
        dG1, dG2 = -lr * dW1, -lr * dW2
        dq = Xc @ dG1.transpose(1, 2)
        dp = dq * s1
        de = a @ dG2.transpose(1, 2) + dp @ W2.transpose(1, 2)
        dobar = dO[:, span] + de
        dz = (e @ dG2 + dobar @ W2) * s1 + dq * p * act.d2(z)
        dX[:, span] = (p * s1) @ dG1 + dz @ W1
        dV[:, span] = -de
        dW1 = dW1 + dz.transpose(1, 2) @ Xc
        dW2 = dW2 + e.transpose(1, 2) @ dp + dobar.transpose(1, 2) @ a
    return dX.to(x.dtype), dV.to(target.dtype), dW1, dW2
