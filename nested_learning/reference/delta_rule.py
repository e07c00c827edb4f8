"""Delta-rule outer-product weight update in plain PyTorch: the ground truth.

Per (sequence, head), with state S ∈ R^{K×V}, decay α_t = exp(g_t) and step β_t::

    S_t = α_t S_{t-1} + β_t k_t (v_t − α_t S_{t-1}ᵀ k_t)ᵀ
    o_t = S_tᵀ (scale · q_t)

``recurrent`` is the literal token loop. ``chunked`` is the best pure-PyTorch chunked (WY)
formulation: inside a chunk of C tokens with cumulative log-decay G_i = Σ_{j≤i} g_j,
D_ij = exp(G_i − G_j) for j ≤ i (0 above the diagonal) and Q already scaled,

    A     = strict_tril(diag(β) K Kᵀ ⊙ D),   L = I + A
    U     = L⁻¹ diag(β) V,                   W = L⁻¹ diag(β e^G) K
    Vnew  = U − W S_0
    O     = (e^G ⊙ Q) S_0 + (Q Kᵀ ⊙ D) Vnew
    S_C   = e^{G_C} S_0 + (e^{G_C − G} ⊙ K)ᵀ Vnew

``chunked_backward`` is the analytic gradient of ``chunked`` (recomputing chunk-start states,
one reverse sweep over chunks for the state adjoint, everything else batched).

All compute in float32 (float64 when any input is float64), return ``o`` in ``q``'s dtype and
states in the compute dtype. ``recurrent`` and ``chunked`` are differentiable by autograd.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["recurrent", "chunked", "chunked_backward", "compute_dtype"]


def compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """float64 when any given tensor is float64, else float32 (the state/accumulator precision)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _segments(cu_seqlens: Optional[Tensor]) -> list[tuple[slice, slice]]:
    """(state rows, token span) of each sequence: the whole batch, or each packed segment."""
    if cu_seqlens is None:
        return [(slice(None), slice(None))]
    bounds = cu_seqlens.tolist()
    return [(slice(i, i + 1), slice(bounds[i], bounds[i + 1])) for i in range(len(bounds) - 1)]


def _per_segment(one: Callable, tokens: list, states: list, cu_seqlens, ct, *args) -> list:
    """Run ``one`` on every segment: ``tokens`` sliced on T, ``states`` on their first axis, all
    cast to ``ct``; returns the results zipped per output."""
    results = [
        one(
            *(None if x is None else x[:, span].to(ct) for x in tokens),
            *(x[rows].to(ct) for x in states),
            *args,
        )
        for rows, span in _segments(cu_seqlens)
    ]
    return list(zip(*results))


def _forward(one, q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens, *args):
    B, T, H, K = q.shape
    ct = compute_dtype(q, k, v, beta, g, initial_state)
    scale = K**-0.5 if scale is None else scale
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    h0 = initial_state if initial_state is not None else q.new_zeros(N, H, K, v.shape[-1], dtype=ct)
    outs, finals = _per_segment(one, [q, k, v, beta, g], [h0], cu_seqlens, ct, scale, *args)
    return torch.cat(outs, 1).to(q.dtype), (torch.cat(finals, 0) if output_final_state else None)


# ----------------------------------------------------------------------------- token loop


def _recurrent_one(q, k, v, beta, g, S, scale):
    outs = []
    for t in range(q.shape[1]):
        if g is not None:
            S = S * g[:, t].exp()[..., None, None]
        prediction = torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        S = S + torch.einsum("bhk,bhv->bhkv", k[:, t], beta[:, t, :, None] * (v[:, t] - prediction))
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, S))
    o = torch.stack(outs, 1) if outs else v.new_zeros(v.shape)
    return o, S


def recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Optional[Tensor] = None,
    scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[Tensor] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Token-by-token delta rule (module docstring); layouts as :func:`nested_learning.ops.delta_rule`."""
    return _forward(_recurrent_one, q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens)


# ----------------------------------------------------------------------------- chunked (WY)


class _Chunked(NamedTuple):
    """Forward quantities of one segment, chunked to [B, H, N, C, ·] (module docstring names)."""

    q: Tensor  # scaled queries
    k: Tensor
    v: Tensor
    beta: Tensor
    G: Tensor  # within-chunk cumulative log-decay
    D: Tensor  # exp(G_i − G_j), causal
    L: Tensor  # I + A
    U: Tensor
    W: Tensor
    states: Tensor  # chunk-start states S_0, [B, H, N, K, V]
    vnew: Tensor
    final: Tensor


def _to_chunks(x: Tensor, C: int) -> Tensor:
    """[B, T, H, ...] → [B, H, N, C, ...], zero-padding T up to a multiple of C."""
    B, T = x.shape[:2]
    N = -(-T // C)
    x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, N * C - T))
    return x.reshape(B, N, C, *x.shape[2:]).movedim(3, 1)


def _from_chunks(x: Tensor, T: int) -> Tensor:
    """Inverse of :func:`_to_chunks`: [B, H, N, C, ...] → [B, T, H, ...]."""
    B, H, N, C = x.shape[:4]
    return x.movedim(1, 3).reshape(B, N * C, H, *x.shape[4:])[:, :T]


def _chunked_forward(q, k, v, beta, g, S, scale, C) -> _Chunked:
    # padded tokens have β = 0 and g = 0: they leave the state unchanged
    q, k, v, beta = _to_chunks(q, C) * scale, _to_chunks(k, C), _to_chunks(v, C), _to_chunks(beta, C)
    G = _to_chunks(g, C).cumsum(-1) if g is not None else torch.zeros_like(beta)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    D = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # masked before exp

    A = (beta[..., None] * (k @ k.transpose(-1, -2)) * D).tril(-1)
    L = A + torch.eye(C, dtype=q.dtype, device=q.device)
    rhs = torch.cat([beta[..., None] * v, (beta * G.exp())[..., None] * k], -1)
    U, W = torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True).split([v.shape[-1], k.shape[-1]], -1)
    k_to_end = k * (G[..., -1:] - G).exp()[..., None]
    decay_end = G[..., -1].exp()[..., None, None]

    states, new_values = [], []
    for n in range(q.shape[2]):  # the only sequential part: one state per chunk
        states.append(S)
        vn = U[:, :, n] - W[:, :, n] @ S
        new_values.append(vn)
        S = decay_end[:, :, n] * S + k_to_end[:, :, n].transpose(-1, -2) @ vn
    empty = k.new_zeros(*k.shape[:2], 0, k.shape[-1], v.shape[-1])
    states = torch.stack(states, 2) if states else empty
    vnew = torch.stack(new_values, 2) if new_values else v
    return _Chunked(q, k, v, beta, G, D, L, U, W, states, vnew, S)


def _chunked_one(q, k, v, beta, g, S, scale, C):
    c = _chunked_forward(q, k, v, beta, g, S, scale, C)
    o = (c.q * c.G.exp()[..., None]) @ c.states + ((c.q @ c.k.transpose(-1, -2)) * c.D) @ c.vnew
    return _from_chunks(o, q.shape[1]), c.final


def chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Optional[Tensor] = None,
    scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[Tensor] = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Optional[Tensor]]:
    """Chunked WY delta rule (module docstring); the best pure-PyTorch formulation."""
    return _forward(_chunked_one, q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size)


def _rows(x: Tensor, y: Tensor) -> Tensor:
    """Σ_j x_ij y_ij over the last dimension."""
    return (x * y).sum(-1)


def _chunked_backward_one(q, k, v, beta, g, do, S, dht, scale, C):
    T = q.shape[1]
    if T == 0:
        return q, k, v, beta, g, dht
    c = _chunked_forward(q, k, v, beta, g, S, scale, C)
    do = _to_chunks(do, C)
    eG = c.G.exp()
    decay_end = c.G[..., -1].exp()  # [B, H, N]
    to_end = (c.G[..., -1:] - c.G).exp()
    k_to_end = c.k * to_end[..., None]
    P = (c.q @ c.k.transpose(-1, -2)) * c.D

    # reverse sweep: adjoint of each chunk's end state and of its new values
    dS = dht
    d_end, d_vnew = [], []
    for n in reversed(range(c.q.shape[2])):
        dvn = P[:, :, n].transpose(-1, -2) @ do[:, :, n] + k_to_end[:, :, n] @ dS
        d_end.append(dS)
        d_vnew.append(dvn)
        dS = (
            (c.q[:, :, n] * eG[:, :, n, :, None]).transpose(-1, -2) @ do[:, :, n]
            + decay_end[:, :, n, None, None] * dS
            - c.W[:, :, n].transpose(-1, -2) @ dvn
        )
    d_end = torch.stack(d_end[::-1], 2)
    dvnew = torch.stack(d_vnew[::-1], 2)

    # O = (e^G ⊙ Q) S_0 + P Vnew,  P = Q Kᵀ ⊙ D
    dq_inter = do @ c.states.transpose(-1, -2)
    dG = eG * _rows(dq_inter, c.q)
    dq = eG[..., None] * dq_inter
    dP = (do @ c.vnew.transpose(-1, -2)) * c.D
    dq = dq + dP @ c.k
    dk = dP.transpose(-1, -2) @ c.q
    Z = dP * (c.q @ c.k.transpose(-1, -2))
    dG = dG + Z.sum(-1) - Z.sum(-2)
    # S_C = e^{G_C} S_0 + (e^{G_C − G} ⊙ K)ᵀ Vnew
    dk_to_end = c.vnew @ d_end.transpose(-1, -2)
    dk = dk + to_end[..., None] * dk_to_end
    y = _rows(dk_to_end, k_to_end)
    dG = dG - y
    dG[..., -1] += y.sum(-1) + decay_end * (d_end * c.states).sum((-1, -2))
    # Vnew = U − W S_0;  U = L⁻¹ diag(β) V,  W = L⁻¹ diag(β e^G) K
    dW = -dvnew @ c.states.transpose(-1, -2)
    dRv, dRk = torch.linalg.solve_triangular(
        c.L.transpose(-1, -2), torch.cat([dvnew, dW], -1), upper=True, unitriangular=True
    ).split([c.v.shape[-1], c.k.shape[-1]], -1)
    dA = -(dRv @ c.U.transpose(-1, -2) + dRk @ c.W.transpose(-1, -2)).tril(-1)
    bk = (c.beta * eG)[..., None] * c.k
    dv = c.beta[..., None] * dRv
    dbeta = _rows(dRv, c.v) + _rows(dRk, eG[..., None] * c.k)
    dk = dk + (c.beta * eG)[..., None] * dRk
    dG = dG + _rows(dRk, bk)
    # A = (diag(β) K Kᵀ) ⊙ D, strictly lower
    dAm = dA * c.D
    dbk = dAm @ c.k
    dk = dk + c.beta[..., None] * dbk + dAm.transpose(-1, -2) @ (c.beta[..., None] * c.k)
    dbeta = dbeta + _rows(dbk, c.k)
    Z2 = dA * c.L.tril(-1)
    dG = dG + Z2.sum(-1) - Z2.sum(-2)

    dg = None if g is None else _from_chunks(dG.flip(-1).cumsum(-1).flip(-1), T)  # G = cumsum(g)
    return (
        _from_chunks(dq * scale, T),
        _from_chunks(dk, T),
        _from_chunks(dv, T),
        _from_chunks(dbeta, T),
        dg,
        dS,
    )


def chunked_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Optional[Tensor],
    scale: Optional[float],
    initial_state: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    do: Tensor,
    dht: Optional[Tensor],
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Gradients ``(dq, dk, dv, dbeta, dg, dh0)`` of :func:`chunked` for upstream ``do``, ``dht``.

    ``dg`` is None when ``g`` is None and ``dh0`` is None when ``initial_state`` is None; every
    gradient has the dtype of its input.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    ct = compute_dtype(q, k, v, beta, g, initial_state)
    scale = K**-0.5 if scale is None else scale
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    h0 = initial_state if initial_state is not None else q.new_zeros(N, H, K, V, dtype=ct)
    dht = dht if dht is not None else q.new_zeros(N, H, K, V, dtype=ct)
    dq, dk, dv, dbeta, dg, dh0 = _per_segment(
        _chunked_backward_one, [q, k, v, beta, g, do], [h0, dht], cu_seqlens, ct, scale, chunk_size
    )
    return (
        torch.cat(dq, 1).to(q.dtype),
        torch.cat(dk, 1).to(k.dtype),
        torch.cat(dv, 1).to(v.dtype),
        torch.cat(dbeta, 1).to(beta.dtype),
        None if g is None else torch.cat(dg, 1).to(g.dtype),
        None if initial_state is None else torch.cat(dh0, 0).to(initial_state.dtype),
    )
