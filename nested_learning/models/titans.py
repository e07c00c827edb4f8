"""Self-modifying layers: linear maps that rewrite their own weights, attention and a recurrent
Titan built on them, and L2-regression (delta-rule) attention.

Two update rules for a weight W (out × in):

- **batch** (the reference library's rule, the default): one rank-1 update per forward call
  from the mean input x̄ over all B·T tokens, computed with the pre-update W::

      ΔW = η (W x̄) x̄ᵀ / (‖x̄‖² + 1e-8)    (normalized)        ΔW = η (W x̄) x̄ᵀ    (not normalized)

  skipped when ‖x̄‖² ≤ 1e-8, then W ← clamp(W − ΔW, −10, 10), at once (``immediate_update``)
  or when :meth:`SelfModifyingLinear.apply_pending_updates` is called.
- **sequence** (the paper's in-context rule, Eq. 28–29): every sequence carries its own fast
  weight, one normalized gradient step per token on ½‖W x_t − v_t‖² through the fused
  ``delta_rule`` op::

      W_t = W_{t−1} − β_t (W_{t−1} x_t − v_t) x_tᵀ,   β_t = η / (1 + η‖x_t‖²) (or η),   y_t = W_t x_t + b
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..ops import _checks

__all__ = ["SelfModifyingLinear", "SelfModifyingModule", "SelfModifyingAttention", "SelfModifyingTitan", "L2RegressionAttention", "KVCache"]

MODES = ("batch", "sequence")
_CLAMP = 10.0
_EPS = 1e-8


def _check_input(name: str, x: object, width: int, ranks: tuple[int, ...]) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() not in ranks or x.shape[-1] != width:
        layout = " or ".join(f"[{', '.join(['…'] * (r - 1) + [str(width)])}]" for r in ranks)
        raise ValueError(f"{name} must have shape {layout}, got {tuple(x.shape)}")
    return x


def _check_heads(dim: int, num_heads: int) -> int:
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
        raise ValueError(f"num_heads must be a positive integer dividing dim={dim}, got {num_heads!r}")
    return dim // num_heads


class SelfModifyingLinear(nn.Module):
    """Linear layer y = W x + b that updates W online (module docstring for both rules).

    Args:
        in_features, out_features: sizes of x and y.
        self_mod_lr: η of the update.
        use_bias: learn b (never self-modified).
        immediate_update: batch mode applies ΔW inside ``forward``; otherwise ΔW is added to one
            running buffer, so repeated calls (inference, generation) never grow memory.
        normalized: divide by ‖x̄‖² (batch) / use β = η/(1+η‖x_t‖²) (sequence).
        mode: ``'batch'`` (default, the reference library's rule, bit-compatible with it for one
            queued update; several queued updates are summed before subtracting) or
            ``'sequence'``.

    ``W`` is initialised N(0, 0.01²) as in the reference library; ``update_count`` counts the
    batch updates made.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        self_mod_lr: float = 0.01,
        use_bias: bool = True,
        immediate_update: bool = False,
        normalized: bool = True,
        mode: str = "batch",
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        for name, n in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be a positive integer, got {n!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.self_mod_lr = _checks.finite("self_mod_lr", self_mod_lr)
        self.immediate_update = immediate_update
        self.normalized = normalized
        self.mode = mode
        self.weight = nn.Parameter(torch.randn(out_features, in_features) * 0.01)
        self.bias = nn.Parameter(torch.zeros(out_features)) if use_bias else None
        self.register_buffer("update_count", torch.zeros(1))
        self.register_buffer("pending_update", None, persistent=False)
        self.num_pending_updates = 0

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"self_mod_lr={self.self_mod_lr}, mode={self.mode}, normalized={self.normalized}"
        )

    def forward(self, x: Tensor, update_weights: bool = True, target: Optional[Tensor] = None) -> Tensor:
        """``x`` ``[B, T, in]`` or ``[N, in]`` → ``[…, out]``.

        Batch mode: y from the pre-update W, then the update (queued or immediate).
        Sequence mode: y_t from each sequence's fast weight after token t (an ``[N, in]`` input
        is one sequence); ``target`` ``[…, out]`` is v_t (zeros, the seed's pure decay, by
        default). ``update_weights=False`` is a plain linear map in both modes.
        """
        x = _check_input("x", x, self.in_features, (2, 3))
        if target is not None:
            if self.mode != "sequence":
                raise ValueError("target is only used in mode='sequence'")
            _check_input("target", target, self.out_features, (x.dim(),))
            if target.shape[:-1] != x.shape[:-1]:
                raise ValueError(f"target must have shape {(*x.shape[:-1], self.out_features)}, got {tuple(target.shape)}")
        if not update_weights:
            return F.linear(x, self.weight, self.bias)
        if self.mode == "sequence":
            return self._sequence_forward(x, target)
        y = F.linear(x, self.weight, self.bias)
        with torch.no_grad():
            self._batch_update(x.detach())
        return y

    def _batch_update(self, x: Tensor) -> None:
        w = self.weight
        x_mean = x.reshape(-1, self.in_features).to(w.dtype).mean(dim=0)
        norm_sq = (x_mean**2).sum()
        outer = torch.outer(w @ x_mean, x_mean)
        update = outer / (norm_sq + _EPS) * self.self_mod_lr if self.normalized else outer * self.self_mod_lr
        taken = norm_sq > _EPS  # a tensor, not a Python branch: no device sync, no graph break
        if self.immediate_update:
            w.copy_(torch.where(taken, (w - update).clamp(-_CLAMP, _CLAMP), w))
        else:
            update = torch.where(taken, update, torch.zeros_like(update))
            if self.pending_update is None:
                self.pending_update = update
            else:
                self.pending_update.add_(update)
            self.num_pending_updates += 1
        self.update_count += taken

    def _sequence_forward(self, x: Tensor, target: Optional[Tensor]) -> Tensor:
        seq = x if x.dim() == 3 else x.unsqueeze(0)
        B, T, _ = seq.shape
        k = seq.unsqueeze(2)
        v = torch.zeros(B, T, 1, self.out_features, dtype=x.dtype, device=x.device) if target is None else (
            (target if target.dim() == 3 else target.unsqueeze(0)).to(x.dtype).unsqueeze(2)
        )
        lr = self.self_mod_lr
        kc = k if k.dtype == torch.float64 else k.float()
        beta = lr / (1 + lr * (kc**2).sum(-1)) if self.normalized else torch.full_like(kc[..., 0], lr)
        w0 = self.weight.t().unsqueeze(0).unsqueeze(0).expand(B, 1, self.in_features, self.out_features)
        y, _ = ops.delta_rule(k, k, v, beta, scale=1.0, initial_state=w0)
        y = y.squeeze(2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y if x.dim() == 3 else y.squeeze(0)

    @torch.no_grad()
    def apply_pending_updates(self) -> None:
        """W ← clamp(W − Σ queued ΔW, −10, 10); call after ``optimizer.step()``."""
        if self.pending_update is not None:
            self.weight.copy_((self.weight - self.pending_update).clamp(-_CLAMP, _CLAMP))
        self.clear_pending_updates()

    def clear_pending_updates(self) -> None:
        """Drop the queued updates."""
        self.pending_update = None
        self.num_pending_updates = 0


class SelfModifyingModule(nn.Module):
    """A module holding :class:`SelfModifyingLinear` layers: applies or drops all their queued
    updates at once."""

    def self_modifying_linears(self) -> list[SelfModifyingLinear]:
        return [m for m in self.modules() if isinstance(m, SelfModifyingLinear)]

    def apply_pending_updates(self) -> None:
        """Apply every layer's queued updates (call after ``optimizer.step()``)."""
        for layer in self.self_modifying_linears():
            layer.apply_pending_updates()

    def clear_pending_updates(self) -> None:
        for layer in self.self_modifying_linears():
            layer.clear_pending_updates()

    @contextmanager
    def kept_pending_updates(self) -> Iterator[None]:
        """Inside, layers queue updates as usual; on exit every queue is back to what it held on
        entry (inference, e.g. ``generate``, leaves nothing for the next apply to write)."""
        saved = [(layer, None if layer.pending_update is None else layer.pending_update.clone(),  # added to in place
                  layer.num_pending_updates) for layer in self.self_modifying_linears()]
        try:
            yield
        finally:
            for layer, pending, count in saved:
                layer.pending_update, layer.num_pending_updates = pending, count


class KVCache(NamedTuple):
    """Keys and values ``[B, H, T, d_h]`` of the tokens seen so far."""

    keys: Tensor
    values: Tensor


class SelfModifyingAttention(SelfModifyingModule):
    """Multi-head softmax attention whose four projections are bias-free
    :class:`SelfModifyingLinear` maps (batch rule): softmax(Q Kᵀ/√d_h + mask) V → W_o.

    ``causal=True`` (default) masks the future, unlike the reference library, whose attention
    saw it; softmax runs through ``scaled_dot_product_attention``. W_q, W_k, W_v update from the
    mean input, W_o from the mean attention output.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        self_mod_lr: float = 0.001,
        dropout: float = 0.1,
        normalized: bool = True,
        causal: bool = True,
    ):
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, _check_heads(dim, num_heads)
        self.causal = causal
        self.dropout_p = dropout
        self.scale = self.head_dim**-0.5
        self.W_q, self.W_k, self.W_v, self.W_o = (
            SelfModifyingLinear(dim, dim, self_mod_lr, use_bias=False, normalized=normalized) for _ in range(4)
        )
        self.dropout = nn.Dropout(dropout)

    def _heads(self, t: Tensor) -> Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        enable_self_modification: bool = True,
        *,
        cache: Optional[KVCache] = None,
        return_cache: bool = False,
    ) -> Tensor | tuple[Tensor, KVCache]:
        """``x`` ``[B, T, d]`` → ``[B, T, d]``; with ``cache`` the tokens attend to the cached
        ones too (incremental decoding), ``return_cache`` also returns the extended cache."""
        _check_input("x", x, self.dim, (3,))
        B, T, _ = x.shape
        q, k, v = (self._heads(w(x, update_weights=enable_self_modification)) for w in (self.W_q, self.W_k, self.W_v))
        mask = None
        if cache is not None:
            k, v = torch.cat([cache.keys, k], 2), torch.cat([cache.values, v], 2)
            if self.causal:
                past = k.shape[2] - T
                mask = torch.arange(k.shape[2], device=x.device) <= past + torch.arange(T, device=x.device)[:, None]
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=self.causal and mask is None, scale=self.scale,
        )
        out = self.W_o(o.transpose(1, 2).reshape(B, T, self.dim), update_weights=enable_self_modification)
        return (out, KVCache(k, v)) if return_cache else out


class SelfModifyingTitan(SelfModifyingModule):
    """The reference library's recurrent Titan: input_proj (self-modifying) → ReLU → dropout →
    GRU (or LSTM) → LayerNorm → output_proj (self-modifying). Returns ``(output, hidden)``.
    The recurrent core is a standard GRU/LSTM; the self-modification is the two projections'
    batch rule (two rank-1 updates queued per call)."""

    def __init__(
        self,
        input_dim: int = 512,
        hidden_dim: int = 512,
        output_dim: int = 512,
        num_layers: int = 2,
        self_mod_lr: float = 0.001,
        dropout: float = 0.1,
        use_gru: bool = True,
    ):
        super().__init__()
        self.input_dim, self.hidden_dim, self.output_dim, self.num_layers = input_dim, hidden_dim, output_dim, num_layers
        self.input_proj = SelfModifyingLinear(input_dim, hidden_dim, self_mod_lr=self_mod_lr)
        rnn = nn.GRU if use_gru else nn.LSTM
        self.rnn = rnn(hidden_dim, hidden_dim, num_layers=num_layers, dropout=dropout if num_layers > 1 else 0.0,
                       batch_first=True)
        self.output_proj = SelfModifyingLinear(hidden_dim, output_dim, self_mod_lr=self_mod_lr)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(hidden_dim)

    def forward(
        self, x: Tensor, hidden: Optional[Tensor | tuple[Tensor, Tensor]] = None, enable_self_modification: bool = True
    ) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor]]:
        """``x`` ``[B, T, input_dim]`` → ``([B, T, output_dim], h_n)``."""
        _check_input("x", x, self.input_dim, (3,))
        h = self.dropout(torch.relu(self.input_proj(x, update_weights=enable_self_modification)))
        h, hidden = self.rnn(h, hidden)
        return self.output_proj(self.layer_norm(h), update_weights=enable_self_modification), hidden

    def get_update_stats(self) -> dict[str, float]:
        return {
            "input_proj_updates": self.input_proj.update_count.item(),
            "output_proj_updates": self.output_proj.update_count.item(),
        }


class L2RegressionAttention(SelfModifyingModule):
    """Delta-rule attention: per head a memory M trained online on ½‖M k_t − v_t‖²::

        M_t = M_{t−1} + β (v_t − M_{t−1} k_t) k_tᵀ,   o_t = M_t q_t,   β = memory_lr

    then heads → W_o → dropout. Unlike the reference library, every sequence has its own memory
    (starting at zero each call, never shared across the batch or calls) and the memory runs
    through the differentiable ``delta_rule`` op, so W_k and W_v receive gradients.
    ``reset_memory`` is accepted for compatibility and has nothing to reset.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        memory_lr: float = 0.1,
        self_mod_lr: float = 0.001,
        dropout: float = 0.1,
        normalized: bool = True,
    ):
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, _check_heads(dim, num_heads)
        self.memory_lr = _checks.finite("memory_lr", memory_lr)
        self.W_q, self.W_k, self.W_v, self.W_o = (
            SelfModifyingLinear(dim, dim, self_mod_lr, use_bias=False, normalized=normalized) for _ in range(4)
        )
        self.dropout = nn.Dropout(dropout)

    def reset_memory(self) -> None:
        """Nothing to reset: the memory lives for one call."""

    def forward(self, x: Tensor, enable_self_modification: bool = True, reset_memory: bool = False) -> Tensor:
        _check_input("x", x, self.dim, (3,))
        B, T, _ = x.shape
        q, k, v = (
            w(x, update_weights=enable_self_modification).view(B, T, self.num_heads, self.head_dim)
            for w in (self.W_q, self.W_k, self.W_v)
        )
        beta = torch.full((B, T, self.num_heads), self.memory_lr, device=x.device,
                          dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        o, _ = ops.delta_rule(q, k, v, beta, scale=1.0)
        return self.dropout(self.W_o(o.reshape(B, T, self.dim), update_weights=enable_self_modification))
