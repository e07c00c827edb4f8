"""Delta-rule outer-product weight update in plain PyTorch: the ground truth.

Per (sequence, head), with state S ∈ R^{K×V}, decay α_t = exp(g_t) and step β_t::

    S_t = α_t S_{t-1} + β_t k_t (v_t − α_t S_{t-1}ᵀ k_t)ᵀ
    o_t = S_tᵀ (scale · q_t)

``recurrent`` is the literal token loop. ``chunked`` is the best pure-PyTorch chunked (WY)
formulation: inside a chunk of C tokens with cumulative log-decay G_i = Σ_{j≤i} g_j,

    A     = strict_tril(diag(β) K Kᵀ ⊙ exp(G_i − G_j))
    U     = (I + A)⁻¹ diag(β) V,     W = (I + A)⁻¹ diag(β e^G) K
    Vnew  = U − W S_0
    O     = (e^G ⊙ scale Q) S_0 + tril(scale Q Kᵀ ⊙ exp(G_i − G_j)) Vnew
    S_C   = e^{G_C} S_0 + (e^{G_C − G} ⊙ K)ᵀ Vnew

Both compute in float32 (float64 when any input is float64), return ``o`` in ``q``'s dtype
and the final state in the compute dtype, and are differentiable by autograd.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["recurrent", "chunked", "compute_dtype"]


def compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """float64 when any given tensor is float64, else float32 (the state/accumulator precision)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _run(single, q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens, **kw):
    """Apply ``single`` to the whole batch, or to each ``cu_seqlens`` segment of a packed batch."""
    B, T, H, K = q.shape
    ct = compute_dtype(q, k, v, beta, g, initial_state)
    scale = K**-0.5 if scale is None else scale
    if cu_seqlens is None:
        segments = [(slice(None), slice(None))]
    else:
        bounds = cu_seqlens.tolist()
        segments = [(slice(i, i + 1), slice(bounds[i], bounds[i + 1])) for i in range(len(bounds) - 1)]
    n_seq = B if cu_seqlens is None else len(segments)
    h0 = initial_state if initial_state is not None else q.new_zeros(n_seq, H, K, v.shape[-1])
    outs, finals = [], []
    for rows, span in segments:
        o, h = single(
            *(x[:, span].to(ct) for x in (q, k, v, beta)),
            None if g is None else g[:, span].to(ct),
            scale,
            h0[rows].to(ct),
            **kw,
        )
        outs.append(o)
        finals.append(h)
    o = torch.cat(outs, 1)
    return o.to(q.dtype), (torch.cat(finals, 0) if output_final_state else None)


def _recurrent_one(q, k, v, beta, g, scale, S):
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
    return _run(_recurrent_one, q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens)


def _chunked_one(q, k, v, beta, g, scale, S, chunk_size):
    B, T, H, K = k.shape
    V = v.shape[-1]
    C = chunk_size
    N = -(-T // C)
    if N == 0:
        return v.new_zeros(B, 0, H, V), S
    pad = N * C - T
    if pad:  # padded tokens have β = 0 and g = 0: they leave the state unchanged
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        beta = torch.nn.functional.pad(beta, (0, 0, 0, pad))
        g = None if g is None else torch.nn.functional.pad(g, (0, 0, 0, pad))

    def chunks(x):  # [B, N*C, H, ...] -> [B, H, N, C, ...]
        return x.reshape(B, N, C, *x.shape[2:]).movedim(3, 1)

    q, k, v, beta = chunks(q) * scale, chunks(k), chunks(v), chunks(beta)
    G = chunks(g).cumsum(-1) if g is not None else torch.zeros_like(beta)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # exp(G_i - G_j) on and below the diagonal, 0 above (masked before exp: no overflow)
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()

    A = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).tril(-1)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    rhs = torch.cat([beta[..., None] * v, (beta * G.exp())[..., None] * k], -1)
    UW = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    U, W = UW[..., :V], UW[..., V:]
    k_to_end = k * (G[..., -1:] - G).exp()[..., None]
    g_end = G[..., -1].exp()

    states, new_values = [], []
    for n in range(N):
        states.append(S)
        vn = U[:, :, n] - W[:, :, n] @ S
        new_values.append(vn)
        S = g_end[:, :, n, None, None] * S + k_to_end[:, :, n].transpose(-1, -2) @ vn
    h = torch.stack(states, 2)
    vnew = torch.stack(new_values, 2)
    o = (q * G.exp()[..., None]) @ h + ((q @ k.transpose(-1, -2)) * decay) @ vnew  # [B, H, N, C, V]
    o = o.movedim(1, 3).reshape(B, N * C, H, V)[:, :T]
    return o, S


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
    return _run(
        _chunked_one, q, k, v, beta, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size=chunk_size
    )
