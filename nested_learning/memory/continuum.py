"""Continuum Memory System (CMS): a chain of MLP levels, each with its own update period.

Level l is an MLP with period C_l (e.g. 8, 32, 128). Two ways to use the periods:

- **Training time** (the default): C_l counts optimizer steps. Level l's parameters change
  only on the steps its period names, by the inner optimizer applied to the gradient
  accumulated over its window (``nested_learning.training.ContinuumMemoryTrainer`` drives
  this through the fused op ``cms_accumulate``)::

      θ_l ← θ_l − η Σ_{t=i−C_l+1}^{i} ∇θ_l L_t      if i ≡ 0 (mod C_l), else unchanged

  Steps count from 0, so every level updates at step 0 (a window of one gradient), then
  every C_l steps with full windows. Off-cycle levels and their optimizer state do not move
  (the reference library let the optimizer update every level on every step).
- **In context** (``in_context=True``): C_l counts tokens. Per sequence, level l's two weight
  matrices are fast weights, trained on ½‖MLP(h_t) − W_v h_t‖² and updated every C_l tokens
  (op ``cms_chunk_update``); the tokens of a chunk read the chunk-start weights.

Variants of the chain, with a = softmax(level_weights):

- ``"sequential"`` (default): h_l = h_{l−1} + a_l MLP_l(h_{l−1}); ``forward(x, use_residual=False)``
  gives the plain composition h_l = MLP_l(h_{l−1}).
- ``"nested"``: the composition y = MLP_L(…MLP_1(x)) of the paper's Eq. 30 (with
  ``use_residual``: h_l = h_{l−1} + MLP_l(h_{l−1})).
- ``"independent"``: levels side by side on the same input, y = x + Σ_l a_l MLP_l(x)
  (without ``use_residual``: Σ_l a_l MLP_l(x)).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..ops import _checks
from ..reference.cms_chunk_update import ACTIVATIONS

__all__ = ["ContinuumMLP", "ContinuumMemorySystem", "FastWeightState", "FullyNestedCMS", "VARIANTS"]

VARIANTS = ("sequential", "nested", "independent")
_ACTIVATION_ALIASES = {"swish": "silu"}


def _activation_name(activation: str) -> str:
    name = _ACTIVATION_ALIASES.get(activation, activation)
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {(*ACTIVATIONS, 'swish')}, got {activation!r}")
    return name


def _chunk_sizes(num_levels: int, chunk_sizes: list[int] | None) -> list[int]:
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 1:
        raise ValueError(f"num_levels must be an integer >= 1, got {num_levels!r}")
    sizes = [2 ** (i + 3) for i in range(num_levels)] if chunk_sizes is None else list(chunk_sizes)
    if len(sizes) != num_levels:
        raise ValueError(f"chunk_sizes must have num_levels={num_levels} entries, got {len(sizes)}: {sizes}")
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in sizes):
        raise ValueError(f"chunk_sizes must be positive integers, got {sizes}")
    return sizes


class FastWeightState(NamedTuple):
    """Carried state of an in-context level: the open chunk's start weights and its tokens so far.

    ``w1`` ``[B, h, d]`` and ``w2`` ``[B, e, h]`` (compute dtype), ``x`` ``[B, r, d]`` and
    ``target`` ``[B, r, e]`` with r < chunk_size tokens waiting for the chunk's update.
    """

    w1: Tensor
    w2: Tensor
    x: Tensor
    target: Tensor


class ContinuumMLP(nn.Module):
    """One CMS level: fc1 (d→h) → activation → dropout → fc2 (h→e) → dropout, e = d by default.

    fc1 is Xavier-initialised, fc2 Xavier with gain 0.1 (a small initial contribution), biases
    zero. ``bias=False`` drops both biases (in-context levels: the fast weights are the two
    matrices).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        activation: str = "gelu",
        dropout: float = 0.0,
        bias: bool = True,
        out_dim: int | None = None,
    ):
        super().__init__()
        self.activation_name = _activation_name(activation)
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim, bias=bias)
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.fc1.weight)
        nn.init.xavier_uniform_(self.fc2.weight, gain=0.1)
        if bias:
            nn.init.zeros_(self.fc1.bias)
            nn.init.zeros_(self.fc2.bias)

    def act(self, z: Tensor) -> Tensor:
        if self.activation_name == "gelu":
            return F.gelu(z)
        return F.silu(z) if self.activation_name == "silu" else F.relu(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(x)))))

    def in_context(self, x: Tensor, target: Tensor, lr: float, chunk_size: int) -> Tensor:
        """Outputs of the level as fast weights over each sequence of ``x`` ``[B, T, d]``,
        trained on ½‖MLP(x_t) − target_t‖² and updated every ``chunk_size`` tokens."""
        self._check_bias_free()
        o, _, _ = ops.cms_chunk_update(x, target, self.fc1.weight, self.fc2.weight, lr, chunk_size, self.activation_name)
        return self.dropout(o)

    def in_context_with_state(
        self, x: Tensor, target: Tensor, lr: float, chunk_size: int, state: FastWeightState | None = None
    ) -> tuple[Tensor, FastWeightState]:
        """:meth:`in_context` continued from ``state`` (``None``: the level's own weights), for
        streaming: the tokens of the open chunk are kept and its update applied once it fills,
        so feeding a sequence in pieces gives the outputs of feeding it whole."""
        self._check_bias_free()
        if state is None:
            B = x.shape[0]
            state = FastWeightState(
                self.fc1.weight.expand(B, -1, -1), self.fc2.weight.expand(B, -1, -1), x[:, :0], target[:, :0]
            )
        w1, w2, px, pt = state
        xs, ts = torch.cat([px.to(x.dtype), x], 1), torch.cat([pt.to(target.dtype), target], 1)
        n = xs.shape[1]
        full = n // chunk_size * chunk_size
        outs = []
        if full:
            o, w1, w2 = ops.cms_chunk_update(xs[:, :full], ts[:, :full], w1, w2, lr, chunk_size, self.activation_name)
            outs.append(o)
        if full < n:
            rest = xs[:, full:].to(w1.dtype)
            outs.append(torch.bmm(self.act(torch.bmm(rest, w1.transpose(1, 2))), w2.transpose(1, 2)).to(x.dtype))
        o = torch.cat(outs, 1)[:, px.shape[1]:]
        return self.dropout(o), FastWeightState(w1, w2, xs[:, full:], ts[:, full:])

    def _check_bias_free(self) -> None:
        if self.fc1.bias is not None:
            raise ValueError("in-context levels are bias-free; build the level with bias=False")


class ContinuumMemorySystem(nn.Module):
    """Multi-frequency MLP chain (module docstring).

    Args:
        dim: model width d.
        hidden_dim: MLP width (default 4·d).
        num_levels: number of levels L.
        chunk_sizes: update period of each level (default 2^(l+3): [8, 16, 32, …]; the paper's
            HOPE uses [8, 32, 128]). Optimizer steps, or tokens when ``in_context``.
        activation: ``'gelu'``, ``'relu'``, ``'silu'`` or ``'swish'``.
        dropout: dropout inside each level.
        variant: ``'sequential'``, ``'nested'`` or ``'independent'`` (module docstring).
        in_context: levels are per-sequence fast weights updated every ``chunk_sizes[l]``
            tokens through ``cms_chunk_update``; each level gets a value projection W_v.
        memory_lr: inner learning rate of the in-context levels (one for all, or one per level).

    ``level_weights`` (trainable, outside every level) are updated by the outer optimizer on
    every step, as in the reference library. The window accumulators, their counts and the
    per-level update counters are part of ``state_dict`` (extra state).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int | None = None,
        num_levels: int = 3,
        chunk_sizes: list[int] | None = None,
        activation: str = "gelu",
        dropout: float = 0.0,
        variant: str = "sequential",
        in_context: bool = False,
        memory_lr: float | list[float] = 0.01,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.dim = dim
        self.hidden_dim = hidden_dim or 4 * dim
        self.num_levels = num_levels
        self.chunk_sizes = _chunk_sizes(num_levels, chunk_sizes)
        self.variant = variant
        self.in_context = in_context
        self.memory_lr = memory_lr
        lrs = [memory_lr] * num_levels if isinstance(memory_lr, (int, float)) else list(memory_lr)
        if len(lrs) != num_levels:
            raise ValueError(f"memory_lr must be a number or num_levels={num_levels} numbers, got {memory_lr!r}")
        self.memory_lrs = [_checks.finite("memory_lr", lr) for lr in lrs]
        self.mlps = nn.ModuleList(
            ContinuumMLP(dim, self.hidden_dim, activation, dropout, bias=not in_context) for _ in range(num_levels)
        )
        self.values = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(num_levels)) if in_context else None
        self.level_weights = nn.Parameter(torch.ones(num_levels) / num_levels)
        self.register_buffer("step_count", torch.zeros(1, dtype=torch.long))
        self.clear_all_accumulators()
        self.update_counts = [0] * num_levels

    # ------------------------------------------------------------------ forward

    def _level(self, i: int, h: Tensor, state: list | None = None) -> Tensor:
        if not self.in_context:
            return self.mlps[i](h)
        assert self.values is not None
        target = self.values[i](h)
        if state is None:
            return self.mlps[i].in_context(h, target, self.memory_lrs[i], self.chunk_sizes[i])
        y, state[i] = self.mlps[i].in_context_with_state(h, target, self.memory_lrs[i], self.chunk_sizes[i], state[i])
        return y

    def forward(
        self, x: Tensor, use_residual: bool = True, *, state: list | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, list]:
        """``x`` ``[B, T, d]`` → ``[B, T, d]`` through the levels in the chosen variant.

        With ``return_state`` (in-context levels) also returns the per-level
        :class:`FastWeightState` list; pass it back as ``state`` to continue the sequences.
        """
        if return_state or state is not None:
            state = list(state) if state is not None else [None] * self.num_levels
            if len(state) != self.num_levels:
                raise ValueError(f"state must have num_levels={self.num_levels} entries, got {len(state)}")
        a = torch.softmax(self.level_weights, dim=0)
        if self.variant == "independent":
            out = sum(a[i] * self._level(i, x, state) for i in range(self.num_levels))
            h = x + out if use_residual else out
        else:
            h = x
            for i in range(self.num_levels):
                y = self._level(i, h, state)
                if not use_residual:
                    h = y
                else:
                    h = h + (a[i] * y if self.variant == "sequential" else y)
        if self.training:
            self.step_count += 1
        return (h, state) if return_state else h

    def forward_hierarchical(self, x: Tensor) -> list[Tensor]:
        """Every level's output h_l = h_{l−1} + MLP_l(h_{l−1}) (unweighted residuals)."""
        outputs, h = [], x
        for i in range(self.num_levels):
            h = h + self._level(i, h)
            outputs.append(h)
        return outputs

    # ------------------------------------------------------------------ multi-frequency bookkeeping

    def level_parameters(self, level: int) -> list[nn.Parameter]:
        self._check_level(level)
        return list(self.mlps[level].parameters())

    def _check_level(self, level: int) -> None:
        if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < self.num_levels:
            raise ValueError(f"level must be an integer in [0, {self.num_levels}), got {level!r}")

    def get_update_levels(self, step: int) -> list[bool]:
        """Which levels' periods end at optimizer step ``step`` (counted from 0): step % C_l == 0."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        return [step % c == 0 for c in self.chunk_sizes]

    def accumulators(self, level: int) -> list[Tensor]:
        """The level's fp32 window sums (created on first use, one per parameter)."""
        self._check_level(level)
        if self._accumulators[level] is None:
            self._accumulators[level] = [
                torch.zeros_like(p, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32)
                for p in self.level_parameters(level)
            ]
        return self._accumulators[level]

    def accumulate_gradients(self, level: int) -> None:
        """Add the level's current ``.grad`` into its window sum (count += 1)."""
        params = self.level_parameters(level)
        with torch.no_grad():
            for p, acc in zip(params, self.accumulators(level)):
                if p.grad is not None:
                    acc.add_(p.grad)
        self.accumulated_counts[level] += 1

    def apply_accumulated_gradients(self, level: int) -> None:
        """Set each parameter's ``.grad`` to the window mean and clear the window (the reference
        library's manual API; a following ``optimizer.step()`` applies it)."""
        self._check_level(level)
        if self._accumulators[level] is None or self.accumulated_counts[level] == 0:
            return
        n = self.accumulated_counts[level]
        for p, acc in zip(self.level_parameters(level), self._accumulators[level]):
            p.grad = (acc / n).to(p.dtype)
            acc.zero_()
        self.accumulated_counts[level] = 0

    def clear_all_accumulators(self) -> None:
        self._accumulators: list[list[Tensor] | None] = [None] * self.num_levels
        self.accumulated_counts = [0] * self.num_levels

    def get_level_stats(self) -> dict[str, Any]:
        a = torch.softmax(self.level_weights.detach(), dim=0)
        return {
            "step_count": int(self.step_count.item()),
            "levels": [
                {
                    "level": i,
                    "chunk_size": c,
                    "updates_so_far": self.update_counts[i],
                    "weight": float(a[i]),
                    "accumulated_steps": self.accumulated_counts[i],
                    "num_params": sum(p.numel() for p in self.mlps[i].parameters()),
                }
                for i, c in enumerate(self.chunk_sizes)
            ],
        }

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "accumulators": [None if a is None else [t.clone() for t in a] for a in self._accumulators],
            "accumulated_counts": list(self.accumulated_counts),
            "update_counts": list(self.update_counts),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._accumulators = [None if a is None else [t.clone() for t in a] for a in state["accumulators"]]
        self.accumulated_counts = list(state["accumulated_counts"])
        self.update_counts = list(state["update_counts"])


class FullyNestedCMS(ContinuumMemorySystem):
    """The nested composition y = MLP_L(…MLP_1(x)) (paper Eq. 30), h ← h + MLP(h) with
    ``use_residual``. Unlike the reference library's class it is a ContinuumMemorySystem, so
    the trainers find it and give it multi-frequency updates."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int | None = None,
        num_levels: int = 3,
        chunk_sizes: list[int] | None = None,
        activation: str = "gelu",
        dropout: float = 0.0,
        use_residual: bool = False,
    ):
        super().__init__(dim, hidden_dim, num_levels, chunk_sizes, activation, dropout, variant="nested")
        self.use_residual = use_residual

    def forward(self, x: Tensor, use_residual: bool | None = None) -> Tensor:
        return super().forward(x, self.use_residual if use_residual is None else use_residual)
