"""The self-modifying Titans mixer of HOPE (SPEC §4): per-head delta-rule memories whose keys,
values, steps and decays are produced per token by an in-context memory.

Per token t, with u_t = SiLU(causal depthwise conv_w(x)_t) (window w = 4)::

    q_t = norm(W_q u_t)                                        a fixed projection
    [k̃_t, v_t, b_t, a_t] = W_g u_t + M_g^(c)(u_t)              the generator memory
    k_t = norm(k̃_t),  β_t = sigmoid(b_t),  α_t = sigmoid(a_t) = exp(g_t)
    S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,  o_t = S_tᵀ q_t / √d_k   (op ``delta_rule``, per head)
    y_t = W_o RMSNorm(o_t)

norm is the L2 normalisation of each head's vector. M_g is the self-modifying part: a
two-layer MLP whose weights are per-sequence fast weights, written once per chunk of C =
``memory_chunk_size`` tokens by the step (η/C) Σ_t ∇½‖M_g(u_t) − W_t u_t‖² (op
``cms_chunk_update``; the tokens of a chunk read the chunk-start weights). The paper's memories
regress their own outputs on the values; here the target is a learned projection W_t u_t,
because the fused op needs its targets before the pass. ``self_modifying=False`` drops M_g
(a gated delta-rule mixer).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..ops import _checks
from ..memory.continuum import ContinuumMLP, FastWeightState
from .titans import _check_heads, _check_input

__all__ = ["SelfModifyingTitansMixer", "MixerState"]


class MixerState(NamedTuple):
    """Carried state per sequence: the last w − 1 inputs of the convolution ``[B, w−1, d]``, the
    delta-rule memories ``[B, H, d_k, d_k]`` and the generator's fast weights (or ``None``)."""

    conv: Tensor
    memory: Tensor
    generator: Optional[FastWeightState]


def _l2_normalize(t: Tensor, eps: float = 1e-6) -> Tensor:
    return t * torch.rsqrt((t * t).sum(-1, keepdim=True) + eps)


class SelfModifyingTitansMixer(nn.Module):
    """Token mixer of HOPE (module docstring), ``[B, T, dim]`` → ``[B, T, dim]``, causal.

    Args:
        dim: model width.
        num_heads: H; the head width d_k is ``dim // num_heads``.
        conv_size: window of the causal depthwise convolution (1 disables it).
        self_modifying: keep the in-context generator memory M_g.
        self_mod_lr: inner step of M_g, applied to the chunk-mean gradient (the op's summed
            gradient scaled by 1 / memory_chunk_size).
        memory_chunk_size: tokens per write of M_g.
        dropout: dropout on the output.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        conv_size: int = 4,
        self_modifying: bool = True,
        self_mod_lr: float = 0.001,
        memory_chunk_size: int = 16,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, _check_heads(dim, num_heads)
        for name, n in (("conv_size", conv_size), ("memory_chunk_size", memory_chunk_size)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be a positive integer, got {n!r}")
        self.conv_size = conv_size
        self.self_mod_lr = _checks.finite("self_mod_lr", self_mod_lr)
        self.memory_chunk_size = memory_chunk_size
        H, dk = num_heads, self.head_dim
        self.split = (H * dk, H * dk, H, H)
        self.conv_weight = nn.Parameter(torch.empty(dim, 1, conv_size))
        nn.init.kaiming_uniform_(self.conv_weight, a=math.sqrt(5))
        self.q_proj = nn.Linear(dim, H * dk, bias=False)
        self.generator = nn.Linear(dim, sum(self.split))
        self.generator_memory = (
            ContinuumMLP(dim, dim, "silu", bias=False, out_dim=sum(self.split)) if self_modifying else None
        )
        self.generator_target = nn.Linear(dim, sum(self.split), bias=False) if self_modifying else None
        self.o_norm = nn.RMSNorm(dk, eps=1e-5)
        self.o_proj = nn.Linear(H * dk, dim, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.reset_gates()

    @torch.no_grad()
    def reset_gates(self) -> None:
        """β starts at 1/2 and the heads' decays spread over 1 − α ∈ [1e-3, 1e-1] (long to short
        memories); called again by models whose blanket initialisation overwrites them."""
        H = self.num_heads
        bias = self.generator.bias
        bias.zero_()
        forget = torch.logspace(-3, -1, H) if H > 1 else torch.tensor([1e-2])
        bias[-H:] = torch.log1p(-forget) - torch.log(forget)  # sigmoid(a) = 1 − forget

    @property
    def _inner_lr(self) -> float:
        return self.self_mod_lr / self.memory_chunk_size

    def _convolve(self, x: Tensor, cache: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        w = self.conv_size
        past = x.new_zeros(x.shape[0], w - 1, self.dim) if cache is None else cache.to(x.dtype)
        xs = torch.cat([past, x], 1)
        u = F.conv1d(xs.transpose(1, 2), self.conv_weight.to(x.dtype), groups=self.dim).transpose(1, 2)
        return F.silu(u), xs[:, xs.shape[1] - (w - 1):]

    def forward(
        self,
        x: Tensor,
        enable_self_modification: bool = True,
        *,
        state: Optional[MixerState] = None,
        return_state: bool = False,
    ) -> Tensor | tuple[Tensor, MixerState]:
        """Mix the tokens of ``x`` ``[B, T, dim]``; ``state`` continues earlier tokens of the same
        sequences, ``return_state`` also returns the state after the last token.
        ``enable_self_modification=False`` reads M_g without writing it."""
        _check_input("x", x, self.dim, (3,))
        B, T, _ = x.shape
        H, dk = self.num_heads, self.head_dim
        u, conv_cache = self._convolve(x, None if state is None else state.conv)
        q = _l2_normalize(self.q_proj(u).view(B, T, H, dk))
        z = self.generator(u)
        gen_state = None if state is None else state.generator
        if self.generator_memory is not None:
            memory = self.generator_memory
            if not enable_self_modification:
                z = z + memory(u)
            elif state is None and not return_state:
                z = z + memory.in_context(u, self.generator_target(u), self._inner_lr, self.memory_chunk_size)
            else:
                corr, gen_state = memory.in_context_with_state(
                    u, self.generator_target(u), self._inner_lr, self.memory_chunk_size, gen_state
                )
                z = z + corr
        k, v, b, a = z.split(self.split, -1)
        k = _l2_normalize(k.reshape(B, T, H, dk))
        v = v.reshape(B, T, H, dk)
        o, memory_state = ops.delta_rule(
            q, k, v, torch.sigmoid(b), F.logsigmoid(a),
            initial_state=None if state is None else state.memory, output_final_state=return_state,
        )
        y = self.dropout(self.o_proj(self.o_norm(o).reshape(B, T, H * dk)))
        if not return_state:
            return y
        assert memory_state is not None
        return y, MixerState(conv_cache, memory_state, gen_state)
