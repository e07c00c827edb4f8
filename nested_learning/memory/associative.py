"""Associative memories: maps from keys to values learned online (paper Definition 1,
M* = argmin_M L̃(M(K); V)), in three forms.

- :class:`AssociativeMemory`: an explicit memory, a matrix M ← M + VᵀK read as Q Mᵀ, or a FIFO
  ring of key/value slots read by softmax attention.
- :class:`LinearAttention`: projections of x written into a per-sequence matrix memory token by
  token (paper Eq. 12–14), computed chunk-parallel (:func:`causal_linear_attention`).
- :class:`DeltaRuleMemory`: the same memory trained by the delta rule (op ``delta_rule``).

States kept between calls are detached: gradients flow from a call's outputs to that call's
inputs, never into earlier calls.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import ops

__all__ = ["OBJECTIVES", "AssociativeMemory", "DeltaRuleMemory", "LinearAttention", "causal_linear_attention"]

OBJECTIVES = ("dot_product", "l2", "cosine")


# ----------------------------------------------------------------------------- validation


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _floating(
    name: str, x: object, width: int, rank: int | None, like: Tensor | None = None, like_name: str = "the module"
) -> Tensor:
    """``x`` as a floating tensor of rank ``rank`` (any rank >= 1 for ``None``) whose last dim is
    ``width``; when ``like`` is given, also of its dtype (unless autocast is on) and device."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if (x.dim() != rank if rank is not None else x.dim() < 1) or x.shape[-1] != width:
        layout = f"[{', '.join(['…'] * (rank - 1) + [str(width)])}]" if rank is not None else f"[…, {width}]"
        raise ValueError(f"{name} must have shape {layout}, got {tuple(x.shape)}")
    if like is not None:
        if x.dtype != like.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"{name} must have the dtype of {like_name}, {like.dtype}, got {x.dtype}")
        if x.device != like.device:
            raise ValueError(f"{name} is on {x.device} but {like_name} is on {like.device}")
    return x


def _sequence(name: str, x: object, width: int, like: Tensor | None, like_name: str = "the module") -> Tensor:
    """A ``[B, T, width]`` input with B, T >= 1."""
    x = _floating(name, x, width, 3, like, like_name)
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must have batch and sequence length >= 1, got shape {tuple(x.shape)}")
    return x


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _carried(state: Tensor | None, x: Tensor, dtype: torch.dtype) -> Tensor | None:
    """A carried ``[B, dv, dk]`` state as the ``[B, dk, dv]`` initial state of a call on ``x``
    ``[B, …]``, or ``None`` (start from zero) when there is none or it tracks another batch size."""
    if state is None or state.shape[0] != x.shape[0]:
        return None
    return state.transpose(-1, -2).to(device=x.device, dtype=dtype)


# ----------------------------------------------------------------------------- chunked linear attention


def _chunks(x: Tensor, chunk_size: int) -> Tensor:
    """``[..., T, d]`` → ``[..., N, C, d]``, zero-padded to N·C tokens (zero keys and values write
    nothing, zero queries read nothing)."""
    return F.pad(x, (0, 0, 0, -x.shape[-2] % chunk_size)).unflatten(-2, (-1, chunk_size))


def _chunk_states(
    q: Tensor, k: Tensor, v: Tensor, initial_state: Tensor | None, chunk_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Chunk-parallel causal linear attention over ``[..., T, ·]``; returns the outputs
    ``[..., T, V]``, the chunk-start states ``[..., N, K, V]`` and the final state ``[..., K, V]``.

    With chunks c of C tokens and S_c the state before chunk c (S_0 = initial state):
    S_{c+1} = S_c + K_cᵀ V_c and O_c = Q_c S_c + tril(Q_c K_cᵀ) V_c (diagonal included).
    """
    T = q.shape[-2]
    qc, kc, vc = _chunks(q, chunk_size), _chunks(k, chunk_size), _chunks(v, chunk_size)
    sums = kc.transpose(-1, -2) @ vc
    ends = torch.cumsum(sums, dim=-3)
    starts = torch.cat([torch.zeros_like(sums[..., :1, :, :]), ends[..., :-1, :, :]], dim=-3)
    final = ends[..., -1, :, :]
    if initial_state is not None:
        starts = starts + initial_state.unsqueeze(-3)
        final = final + initial_state
    mask = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    scores = (qc @ kc.transpose(-1, -2)).masked_fill(~mask, 0.0)
    o = qc @ starts + scores @ vc
    return o.flatten(-3, -2)[..., :T, :], starts, final


def causal_linear_attention(
    q: Tensor, k: Tensor, v: Tensor, initial_state: Tensor | None = None, chunk_size: int = 64
) -> tuple[Tensor, Tensor]:
    """Unnormalised causal linear attention, chunk-parallel (no per-token loop)::

        S_t = S_{t−1} + k_t v_tᵀ,   o_t = S_tᵀ q_t          (S_0 = initial_state or 0)

    ``q``, ``k`` ``[..., T, K]``, ``v`` ``[..., T, V]``, ``initial_state`` ``[..., K, V]``;
    returns ``(o [..., T, V], S_T [..., K, V])`` in the inputs' dtype. Memory is
    O(T/C · K·V + T·C) per sequence, never one state per token.
    """
    o, _, final = _chunk_states(q, k, v, initial_state, _positive_int("chunk_size", chunk_size))
    return o, final


def _running_states(k: Tensor, v: Tensor, start: Tensor) -> Tensor:
    """The states M_t = start + Σ_{s≤t} k_s v_sᵀ of one chunk: k ``[B, C, K]``, v ``[B, C, V]``,
    start ``[B, K, V]`` → ``[B, C, K, V]``."""
    return start.unsqueeze(1) + torch.cumsum(k.unsqueeze(-1) * v.unsqueeze(-2), dim=1)


class _AbsNormalizer(torch.autograd.Function):
    """n_t = Σ_{i,j} |M_t|_{ij} |q_t|_i for chunked q, k ``[B, N, C, K]``, v ``[B, N, C, V]`` and
    chunk-start states ``[B, N, K, V]``.

    |M_t| (elementwise) of a running sum has no chunk-level closed form, so each chunk's C states
    are built by a cumulative sum and dropped; backward rebuilds them one chunk at a time, so only
    O(C·K·V) per sequence is ever live. Gradients (R_s = Σ_{t≥s in chunk} sign(M_t) ⊙ |q_t| 1ᵀ · n̄_t)::

        q̄_t = sign(q_t) ⊙ (|M_t| 1) n̄_t,   k̄_s = R_s v_s,   v̄_s = R_sᵀ k_s,   start̄ = R_first
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, starts: Tensor) -> Tensor:
        ctx.save_for_backward(q, k, v, starts)
        norms = [
            (_running_states(k[:, c], v[:, c], starts[:, c]).abs().sum(-1) * q[:, c].abs()).sum(-1)
            for c in range(q.shape[1])
        ]
        return torch.stack(norms, dim=1)

    @staticmethod
    @once_differentiable
    def backward(ctx, dn: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        q, k, v, starts = ctx.saved_tensors
        dq, dk, dv, dstarts = (torch.empty_like(t) for t in (q, k, v, starts))
        for c in range(q.shape[1]):
            m = _running_states(k[:, c], v[:, c], starts[:, c])
            dq[:, c] = q[:, c].sign() * m.abs().sum(-1) * dn[:, c, :, None]
            g = m.sign() * (q[:, c].abs() * dn[:, c, :, None]).unsqueeze(-1)
            r = g.flip(1).cumsum(1).flip(1)
            dk[:, c] = (r @ v[:, c].unsqueeze(-1)).squeeze(-1)
            dv[:, c] = (k[:, c].unsqueeze(-2) @ r).squeeze(-2)
            dstarts[:, c] = r[:, 0]
        return dq, dk, dv, dstarts


# ----------------------------------------------------------------------------- modules


class AssociativeMemory(nn.Module):
    """An explicit key → value memory.

    Args:
        dim_key, dim_value: d_k and d_v.
        objective: similarity of slot retrieval, ``'dot_product'`` (q·k), ``'l2'`` (−‖q − k‖₂)
            or ``'cosine'``.
        memory_size: ``None`` for the matrix memory, else the number m of slots.

    Matrix mode: buffer ``memory`` M ``[d_v, d_k]``; ``store(K, V)`` does M ← M + VᵀK and
    ``retrieve(Q)`` returns Q Mᵀ.

    Slot mode: buffers ``keys`` ``[m, d_k]``, ``values`` ``[m, d_v]`` and ``memory_ptr``, a FIFO
    ring; ``retrieve(Q)`` returns softmax(sim(Q, keys)) · values, with empty (zero) slots taking
    part in the softmax as in the reference library. Pair i of a store lands in slot
    (ptr + i) mod m; unlike the reference library (a shape error), a store of more than m pairs
    keeps the last m, and the pointer always stays in [0, m).

    Differences from the reference library: the buffers are detached, so ``forward``'s output is
    differentiable in that call's query, keys and values but no graph spans calls; an unknown
    objective fails at construction; keys without values (or the reverse) is an error rather
    than a silent skip.
    """

    def __init__(self, dim_key: int, dim_value: int, objective: str = "dot_product", memory_size: int | None = None):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        self.dim_key = _positive_int("dim_key", dim_key)
        self.dim_value = _positive_int("dim_value", dim_value)
        self.objective = objective
        self.memory_size = None if memory_size is None else _positive_int("memory_size", memory_size)
        if memory_size is None:
            self.register_buffer("memory", torch.zeros(dim_value, dim_key))
        else:
            self.register_buffer("keys", torch.zeros(memory_size, dim_key))
            self.register_buffer("values", torch.zeros(memory_size, dim_value))
            self.register_buffer("memory_ptr", torch.zeros(1, dtype=torch.long))

    def _state(self) -> tuple[Tensor, ...]:
        return (self.memory,) if self.memory_size is None else (self.keys, self.values)

    def compute_similarity(self, query: Tensor, keys: Tensor) -> Tensor:
        """sim(query ``[..., d_k]``, keys ``[m, d_k]``) → ``[..., m]``."""
        if self.objective == "dot_product":
            return query @ keys.T
        if self.objective == "cosine":
            return F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).T
        flat = query.reshape(-1, query.shape[-1])
        return -torch.cdist(flat, keys, p=2).reshape(*query.shape[:-1], keys.shape[0])

    def _check_pairs(self, keys: object, values: object) -> tuple[Tensor, Tensor]:
        like = self._state()[0]
        keys = _floating("keys", keys, self.dim_key, 2, like)
        values = _floating("values", values, self.dim_value, 2, like)
        if keys.shape[0] != values.shape[0]:
            raise ValueError(
                f"keys and values must hold the same number of pairs, got {keys.shape[0]} and {values.shape[0]}"
            )
        return keys.to(like.dtype), values.to(like.dtype)

    def _written(self, keys: Tensor, values: Tensor) -> tuple[tuple[Tensor, ...], int]:
        """The state after storing the pairs (differentiable in them) and the new pointer."""
        if self.memory_size is None:
            return (self.memory + values.T @ keys,), 0
        m, n = self.memory_size, keys.shape[0]
        ptr = int(self.memory_ptr.item())
        slots = (ptr + torch.arange(n, device=keys.device)) % m
        last = slice(max(n - m, 0), n)
        new_keys = self.keys.index_copy(0, slots[last], keys[last])
        new_values = self.values.index_copy(0, slots[last], values[last])
        return (new_keys, new_values), (ptr + n) % m

    @torch.no_grad()
    def _commit(self, state: tuple[Tensor, ...], ptr: int) -> None:
        for buffer, new in zip(self._state(), state):
            buffer.copy_(new)
        if self.memory_size is not None:
            self.memory_ptr.fill_(ptr)

    def _read(self, query: Tensor, state: tuple[Tensor, ...]) -> Tensor:
        if self.memory_size is None:
            return query @ state[0].T
        keys, values = state
        return torch.softmax(self.compute_similarity(query, keys), dim=-1) @ values

    def store(self, keys: Tensor, values: Tensor) -> None:
        """Write N pairs, keys ``[N, d_k]`` and values ``[N, d_v]`` (class docstring)."""
        self._commit(*self._written(*self._check_pairs(keys, values)))

    def retrieve(self, query: Tensor) -> Tensor:
        """Read ``query`` ``[..., d_k]`` → ``[..., d_v]``: Q Mᵀ, or slot attention."""
        return self._read(self._check_query(query), self._state())

    def _check_query(self, query: object) -> Tensor:
        return _floating("query", query, self.dim_key, None, self._state()[0])

    def forward(
        self, query: Tensor, keys: Tensor | None = None, values: Tensor | None = None, store: bool = True
    ) -> Tensor:
        """Store ``keys``/``values`` (when given and ``store``), then retrieve ``query``."""
        query = self._check_query(query)
        if (keys is None) != (values is None):
            raise ValueError("keys and values must be given together")
        if not store or keys is None:
            return self._read(query, self._state())
        state, ptr = self._written(*self._check_pairs(keys, values))
        self._commit(state, ptr)
        return self._read(query, state)


class _CarriedState(nn.Module):
    """The optional per-sequence state ``[B, d_v, d_k]`` carried (detached) between calls."""

    _persistent_memory: Tensor | None

    def reset_memory(self) -> None:
        """Zero the carried state (if enabled); a fresh tensor, so memories returned earlier
        (which share its storage) keep their values."""
        if self._persistent_memory is not None:
            self._persistent_memory = torch.zeros_like(self._persistent_memory)

    def set_persistent_memory(
        self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> None:
        """Enable RNN-like use: each call starts from the state the previous call ended with
        (zero at first) for a batch of ``batch_size`` sequences."""
        self._persistent_memory = torch.zeros(
            _positive_int("batch_size", batch_size), self.dim_value, self.dim_key, device=device, dtype=dtype
        )

    def _keep(self, final: Tensor) -> Tensor:
        """``final`` ``[B, d_k, d_v]`` as the returned ``[B, d_v, d_k]`` memory; stored detached
        when the carried state is enabled."""
        memory = final.transpose(-1, -2)
        if self._persistent_memory is not None:
            self._persistent_memory = memory.detach()
        return memory


class LinearAttention(_CarriedState):
    """Linear attention as an associative memory (paper Eq. 12–14), per sequence::

        q_t, k_t, v_t = W_q x_t, W_k x_t, W_v x_t
        M_t = M_{t−1} + v_t k_tᵀ      ([d_v, d_k], M_0 = 0 or the carried state)
        y_t = M_t q_t                 (inclusive of token t, causal)
        normalize=True:  y_t ← y_t / (Σ_{i,j} |M_t|_{ij} |q_t|_j + 1e-6)
        out_t = W_o y_t

    All projections are bias-free. Computed chunk-parallel (:func:`causal_linear_attention`)
    instead of the reference library's per-token loop, which kept T states of d_v×d_k for
    backward; the result is the same recurrence. The ``normalize`` denominator uses the
    elementwise |M_t|, which has no chunk-level closed form: it is formed chunk by chunk from a
    cumulative sum over the chunk's tokens, and rebuilt the same way in backward, so memory
    stays O(chunk_size·d_k·d_v) per sequence. Half-precision inputs accumulate in float32.

    Args:
        dim: model width.
        dim_key, dim_value: d_k and d_v (default ``dim``).
        normalize: divide by the |M_t|-weighted query norm above.
        chunk_size: tokens per chunk of the parallel form (keyword only; not in the reference).

    ``set_persistent_memory(B)`` carries the per-sequence state between calls (detached), as
    in the reference library: a call whose batch size differs from the carried state's starts
    from zero and then replaces it. ``reset_memory()`` zeroes it.
    """

    def __init__(
        self,
        dim: int,
        dim_key: int | None = None,
        dim_value: int | None = None,
        normalize: bool = False,
        *,
        chunk_size: int = 64,
    ):
        super().__init__()
        self.dim = _positive_int("dim", dim)
        self.dim_key = _positive_int("dim_key", dim_key or dim)
        self.dim_value = _positive_int("dim_value", dim_value or dim)
        self.normalize = normalize
        self.chunk_size = _positive_int("chunk_size", chunk_size)
        self.W_q = nn.Linear(dim, self.dim_key, bias=False)
        self.W_k = nn.Linear(dim, self.dim_key, bias=False)
        self.W_v = nn.Linear(dim, self.dim_value, bias=False)
        self.W_o = nn.Linear(self.dim_value, dim, bias=False)
        self._persistent_memory = None

    def forward(
        self, x: Tensor, reset_memory: bool = False, return_memory: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``x`` ``[B, T, dim]`` → ``[B, T, dim]``; with ``return_memory`` also M_T ``[B, d_v, d_k]``
        (float32 for half inputs). ``reset_memory`` zeroes the carried state first."""
        x = _sequence("x", x, self.dim, self.W_q.weight)
        if reset_memory:
            self.reset_memory()
        ct = _compute_dtype(x)
        q, k, v = self.W_q(x).to(ct), self.W_k(x).to(ct), self.W_v(x).to(ct)
        C = self.chunk_size
        y, starts, final = _chunk_states(q, k, v, _carried(self._persistent_memory, x, ct), C)
        if self.normalize:
            norm = _AbsNormalizer.apply(_chunks(q, C), _chunks(k, C), _chunks(v, C), starts)
            y = y / (norm.flatten(1)[:, : x.shape[1], None] + 1e-6)
        out = self.W_o(y.to(x.dtype))
        memory = self._keep(final)
        return (out, memory) if return_memory else out


class DeltaRuleMemory(_CarriedState):
    """Matrix memory trained online by the delta rule (a gradient step on ½‖M k_t − v_t‖² per
    token, β = ``learning_rate``), read after each write::

        M_t = M_{t−1} + β (v_t − M_{t−1} k_t) k_tᵀ       ([d_v, d_k], M_0 = 0 or the carried state)
        y_t = M_t q_t

    Runs through the fused op ``delta_rule`` (H = 1, scale 1, keys used as given), so it is
    chunk-parallel and differentiable in keys, values and queries.

    Difference from the reference library: there, one buffer M was shared by the whole batch
    (each token applied the batch-mean update (β/B) Σ_b (v_b − M k_b) k_bᵀ) and carried across
    every call, in a per-token loop without gradients through M. Here every sequence has its
    own memory starting from zero; ``set_persistent_memory(B)`` / ``reset_memory()`` carry it
    between calls (detached), as for :class:`LinearAttention`. β must lie in [0, 2], the
    range where the step contracts along k_t for unit keys.
    """

    def __init__(self, dim_key: int, dim_value: int, learning_rate: float = 0.1):
        super().__init__()
        self.dim_key = _positive_int("dim_key", dim_key)
        self.dim_value = _positive_int("dim_value", dim_value)
        self.learning_rate = learning_rate
        self._check_learning_rate()
        self._persistent_memory = None

    def _check_learning_rate(self) -> float:
        lr = self.learning_rate
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0.0 <= lr <= 2.0:
            raise ValueError(f"learning_rate must be a number in [0, 2], got {lr!r}")
        return float(lr)

    def forward(
        self,
        keys: Tensor,
        values: Tensor,
        queries: Tensor,
        *,
        reset_memory: bool = False,
        return_memory: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """keys, queries ``[B, T, d_k]`` and values ``[B, T, d_v]`` → y ``[B, T, d_v]``; with
        ``return_memory`` also M_T ``[B, d_v, d_k]`` (float32, float64 for float64 inputs)."""
        keys = _sequence("keys", keys, self.dim_key, None)
        values = _sequence("values", values, self.dim_value, keys, "keys")
        queries = _sequence("queries", queries, self.dim_key, keys, "keys")
        if values.shape[:2] != keys.shape[:2] or queries.shape[:2] != keys.shape[:2]:
            raise ValueError(
                f"keys, values and queries must share [B, T], got {tuple(keys.shape[:2])}, "
                f"{tuple(values.shape[:2])} and {tuple(queries.shape[:2])}"
            )
        lr = self._check_learning_rate()
        if reset_memory:
            self.reset_memory()
        B, T, _ = keys.shape
        ct = _compute_dtype(keys)
        initial = _carried(self._persistent_memory, keys, ct)
        o, final = ops.delta_rule(
            queries.unsqueeze(2),
            keys.unsqueeze(2),
            values.unsqueeze(2),
            keys.new_full((B, T, 1), lr, dtype=ct),
            scale=1.0,
            initial_state=None if initial is None else initial.unsqueeze(1),
            output_final_state=True,
        )
        memory = self._keep(final.squeeze(1))
        out = o.squeeze(2)
        return (out, memory) if return_memory else out
