"""Multi-head causal linear attention with a fast-weight memory (Katharopoulos et al. 2020),
the attention of HOPE blocks without self-modification.

Per head, with φ(z) = ELU(z) + 1 on queries and keys::

    S_t = S_{t−1} + φ(k_t) v_tᵀ,   z_t = z_{t−1} + φ(k_t)            (S_0, z_0 = 0 or carried)
    y_t = S_tᵀ φ(q_t) / (z_tᵀ φ(q_t) + 1e-6)
    out = dropout(W_o [y^1 … y^H])
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..memory.associative import _positive_int, _sequence, causal_linear_attention
from .titans import _check_heads

__all__ = ["LinearAttentionWithMemory"]


class LinearAttentionWithMemory(nn.Module):
    """Causal multi-head linear attention (module docstring), ``[B, T, dim]`` → ``[B, T, dim]``.

    Args:
        dim: model width; each of the ``n_heads`` heads has width ``dim // n_heads``.
        n_heads: number of heads H.
        dropout: dropout on the output.
        chunk_size: tokens per chunk of the parallel form (keyword only; not in the reference).

    S and z are computed together as one state ``[d_h, d_h + 1]`` per head (z is the state of a
    constant value 1), chunk-parallel by :func:`~nested_learning.memory.associative.causal_linear_attention`;
    the reference library ran a per-token loop and also computed an unused full-sequence KᵀV.
    Half-precision inputs accumulate in float32.

    ``forward(x, reset_memory=True)`` keeps the reference library's signature. There the
    argument was documented as "always True for this impl" and ignored; here it works: every
    call keeps its final state ``memory`` ``[B, H, d_h, d_h + 1]`` (detached, not in
    ``state_dict``), and ``reset_memory=False`` continues from it, so a sequence fed in pieces
    gives the outputs of feeding it whole. The default starts from zero, as the reference did.
    ``reset_memory()`` (the method) drops the kept state.
    """

    memory: Tensor | None

    def __init__(self, dim: int, n_heads: int = 8, dropout: float = 0.1, *, chunk_size: int = 64):
        super().__init__()
        self.dim = _positive_int("dim", dim)
        self.n_heads = n_heads
        self.head_dim = _check_heads(dim, n_heads)
        self.chunk_size = _positive_int("chunk_size", chunk_size)
        self.W_q = nn.Linear(dim, dim, bias=False)
        self.W_k = nn.Linear(dim, dim, bias=False)
        self.W_v = nn.Linear(dim, dim, bias=False)
        self.W_o = nn.Linear(dim, dim, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.memory = None

    @staticmethod
    def feature_map(x: Tensor) -> Tensor:
        """φ(x) = ELU(x) + 1 > 0."""
        return F.elu(x) + 1

    def reset_memory(self) -> None:
        """Drop the state kept from the last call."""
        self.memory = None

    def forward(self, x: Tensor, reset_memory: bool = True) -> Tensor:
        """Attend causally over ``x`` ``[B, T, dim]``; ``reset_memory=False`` continues the
        sequences of the previous call (class docstring)."""
        x = _sequence("x", x, self.dim, self.W_q.weight)
        B, T, _ = x.shape
        H, dh = self.n_heads, self.head_dim
        initial = None if reset_memory else self.memory
        if initial is not None and initial.shape[0] != B:
            raise ValueError(
                f"x has batch size {B} but the kept memory tracks {initial.shape[0]} sequences; "
                "pass reset_memory=True to start new ones"
            )
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32

        def heads(t: Tensor) -> Tensor:
            return t.view(B, T, H, dh).transpose(1, 2).to(ct)

        q, k = heads(self.feature_map(self.W_q(x))), heads(self.feature_map(self.W_k(x)))
        v = heads(self.W_v(x))
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
        o, final = causal_linear_attention(
            q, k, v, None if initial is None else initial.to(device=x.device, dtype=ct), self.chunk_size
        )
        self.memory = final.detach()
        y = o[..., :dh] / (o[..., dh:] + 1e-6)
        return self.dropout(self.W_o(y.transpose(1, 2).reshape(B, T, self.dim).to(x.dtype)))
