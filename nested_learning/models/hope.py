"""HOPE: blocks of a self-modifying token mixer followed by a Continuum Memory System.

Block (pre-norm residual)::

    x ← x + Mixer(LN₁ x)
    x ← x + CMS(LN₂ x) − LN₂ x        (the CMS chain's own residual path is not counted twice)

Mixers: ``'titans'`` (default), the self-modifying Titans mixer
(:class:`~nested_learning.models.titans_mixer.SelfModifyingTitansMixer`, delta-rule memories on
the fused op); ``'attention'``, the reference library's self-modifying softmax attention, made
causal (or :class:`LinearAttentionWithMemory` when self-modification is off, as there). The CMS
levels are in-context fast weights updated every ``chunk_sizes[l]`` tokens (op
``cms_chunk_update``) unless ``cms_in_context=False``, which gives the reference library's
position-wise levels trained at multi-frequency by the trainers.

HOPE LM = token + learned position embedding → blocks → LayerNorm → head tied to the embedding.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..memory import ContinuumMemorySystem
from .linear_attention import LinearAttentionWithMemory
from .titans import KVCache, SelfModifyingAttention, SelfModifyingLinear, SelfModifyingModule, _check_heads
from .titans_mixer import MixerState, SelfModifyingTitansMixer

__all__ = ["HOPE", "HOPEBlock", "HOPEForSequenceClassification", "HOPEState", "LinearAttentionWithMemory", "MIXERS"]

MIXERS = ("titans", "attention")
DEFAULT_CHUNK_SIZES = [8, 32, 128]


def reference_init(module: nn.Module) -> None:
    """The reference library's HOPE initialisation: Linear and Embedding weights N(0, 0.02²),
    biases 0, LayerNorm (1, 0)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class BlockState(NamedTuple):
    mixer: MixerState | KVCache
    cms: list


class HOPEState(NamedTuple):
    """Carried state of a HOPE model: the number of tokens seen and each block's state."""

    position: int
    blocks: list[BlockState]


class HOPEBlock(SelfModifyingModule):
    """One HOPE block (module docstring).

    Args:
        dim, n_heads, chunk_sizes (default [8, 32, 128]), dropout, use_self_modification,
            self_mod_lr: as in the reference library.
        mixer: ``'titans'`` or ``'attention'``.
        cms_in_context: CMS levels as in-context fast weights (else position-wise MLPs).
        cms_memory_lr: normalized inner step η of the in-context CMS levels: level l steps by
            η / (C_l · dim) on the chunk's summed gradient, i.e. the chunk-mean gradient per unit
            of LayerNorm'd input energy (‖LN x‖² ≈ dim), stable for every chunk size and width.
        cms_hidden_dim: width of the CMS MLPs (default 4·dim).
    """

    def __init__(
        self,
        dim: int,
        n_heads: int = 8,
        chunk_sizes: Optional[list[int]] = None,
        dropout: float = 0.1,
        use_self_modification: bool = True,
        self_mod_lr: float = 0.001,
        mixer: str = "titans",
        cms_in_context: bool = True,
        cms_memory_lr: float = 0.5,
        cms_hidden_dim: Optional[int] = None,
    ):
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f"mixer must be one of {MIXERS}, got {mixer!r}")
        _check_heads(dim, n_heads)
        chunk_sizes = list(DEFAULT_CHUNK_SIZES if chunk_sizes is None else chunk_sizes)
        self.dim, self.n_heads, self.mixer_name = dim, n_heads, mixer
        self.use_self_modification = use_self_modification
        self.ln1 = nn.LayerNorm(dim)
        self.ln2 = nn.LayerNorm(dim)
        self.attention: nn.Module
        if mixer == "titans":
            self.attention = SelfModifyingTitansMixer(
                dim, n_heads, self_modifying=use_self_modification, self_mod_lr=self_mod_lr,
                memory_chunk_size=min(chunk_sizes), dropout=dropout,
            )
        elif use_self_modification:
            self.attention = SelfModifyingAttention(dim, n_heads, self_mod_lr=self_mod_lr, dropout=dropout, causal=True)
        else:
            self.attention = LinearAttentionWithMemory(dim, n_heads, dropout=dropout)
        self.cms = ContinuumMemorySystem(
            dim, cms_hidden_dim or 4 * dim, len(chunk_sizes), chunk_sizes, dropout=dropout,
            in_context=cms_in_context, memory_lr=[cms_memory_lr / (c * dim) for c in chunk_sizes],
        )

    def _mix(self, h: Tensor, enable: bool, state: Any, return_state: bool) -> tuple[Tensor, Any]:
        if isinstance(self.attention, LinearAttentionWithMemory):  # its state: [S | z], kept detached
            if state is not None:
                self.attention.memory = state
            out = self.attention(h, reset_memory=state is None)
            return out, self.attention.memory if return_state else None
        if isinstance(self.attention, SelfModifyingTitansMixer):
            out = self.attention(h, enable, state=state, return_state=return_state)
        else:
            out = self.attention(h, enable, cache=state, return_cache=return_state)
        return out if return_state else (out, None)

    def forward(
        self,
        x: Tensor,
        enable_self_modification: bool = True,
        *,
        state: Optional[BlockState] = None,
        return_state: bool = False,
    ) -> Tensor | tuple[Tensor, BlockState]:
        """``x`` ``[B, T, dim]`` → ``[B, T, dim]``; ``state``/``return_state`` continue sequences."""
        stateful = state is not None or return_state
        m, mixer_state = self._mix(self.ln1(x), enable_self_modification, None if state is None else state.mixer, stateful)
        x = x + m
        h = self.ln2(x)
        if stateful:
            c, cms_state = self.cms(h, state=None if state is None else state.cms, return_state=True)
        else:
            c, cms_state = self.cms(h), None
        x = x + (c - h)
        return (x, BlockState(mixer_state, cms_state)) if return_state else x

    def get_self_mod_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {"use_self_modification": self.use_self_modification, "mixer": self.mixer_name}
        if isinstance(self.attention, SelfModifyingAttention):
            stats["attention_updates"] = {
                n: getattr(self.attention, n).update_count.item() for n in ("W_q", "W_k", "W_v", "W_o")
            }
        stats["cms_stats"] = self.cms.get_level_stats()
        return stats


class HOPE(SelfModifyingModule):
    """HOPE language model (module docstring); arguments as the reference library's, plus the
    block options ``mixer``, ``cms_in_context``, ``cms_memory_lr`` and ``cms_hidden_dim``.

    Linear and embedding weights are drawn N(0, 0.02²) and LayerNorms set to (1, 0), as in the
    reference library (the self-modifying linears keep their own initialisation; the Titans
    mixers' gates are re-initialised after).
    """

    def __init__(
        self,
        dim: int = 512,
        n_layers: int = 12,
        n_heads: int = 8,
        vocab_size: int = 50257,
        chunk_sizes: Optional[list[int]] = None,
        max_seq_len: int = 2048,
        dropout: float = 0.1,
        use_self_modification: bool = True,
        self_mod_lr: float = 0.001,
        mixer: str = "titans",
        cms_in_context: bool = True,
        cms_memory_lr: float = 0.5,
        cms_hidden_dim: Optional[int] = None,
    ):
        super().__init__()
        for name, n in (("dim", dim), ("n_layers", n_layers), ("vocab_size", vocab_size), ("max_seq_len", max_seq_len)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be a positive integer, got {n!r}")
        self.dim, self.n_layers, self.n_heads = dim, n_layers, n_heads
        self.vocab_size, self.max_seq_len = vocab_size, max_seq_len
        self.use_self_modification = use_self_modification
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.pos_embedding = nn.Embedding(max_seq_len, dim)
        self.blocks = nn.ModuleList(
            HOPEBlock(dim, n_heads, chunk_sizes, dropout, use_self_modification, self_mod_lr, mixer, cms_in_context,
                      cms_memory_lr, cms_hidden_dim)
            for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight
        self.apply(reference_init)
        for m in self.modules():
            if isinstance(m, SelfModifyingTitansMixer):
                m.reset_gates()

    def _check_ids(self, input_ids: Tensor, position: int) -> None:
        if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int64, torch.int32) or input_ids.dim() != 2:
            raise TypeError(
                f"input_ids must be an int64 [batch, seq_len] tensor, got "
                f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} {tuple(getattr(input_ids, 'shape', ()))}"
            )
        B, T = input_ids.shape
        if B < 1 or T < 1:
            raise ValueError(f"input_ids must have batch and seq_len >= 1, got {tuple(input_ids.shape)}")
        if position + T > self.max_seq_len:
            raise ValueError(f"sequence length {position + T} exceeds max_seq_len={self.max_seq_len}")

    def hidden_states(
        self,
        input_ids: Tensor,
        enable_self_modification: bool = True,
        *,
        state: Optional[HOPEState] = None,
        return_state: bool = False,
    ) -> Tensor | tuple[Tensor, HOPEState]:
        """Final hidden states ``[B, T, dim]`` (after ``ln_f``), optionally continuing ``state``."""
        position = 0 if state is None else state.position
        self._check_ids(input_ids, position)
        if state is not None and len(state.blocks) != self.n_layers:
            raise ValueError(f"state must hold {self.n_layers} block states, got {len(state.blocks)}")
        T = input_ids.shape[1]
        positions = torch.arange(position, position + T, device=input_ids.device)
        x = self.token_embedding(input_ids) + self.pos_embedding(positions)
        block_states = []
        for i, block in enumerate(self.blocks):
            if state is None and not return_state:
                x = block(x, enable_self_modification)
            else:
                x, s = block(x, enable_self_modification, state=None if state is None else state.blocks[i],
                             return_state=True)
                block_states.append(s)
        x = self.ln_f(x)
        return (x, HOPEState(position + T, block_states)) if return_state else x

    def forward(
        self,
        input_ids: Tensor,
        labels: Optional[Tensor] = None,
        enable_self_modification: bool = True,
        *,
        state: Optional[HOPEState] = None,
        return_state: bool = False,
    ) -> Any:
        """Logits ``[B, T, vocab]``; with ``labels`` ``(loss, logits)``, the loss being the
        cross-entropy of the next token (``labels`` shifted by one, ``-100`` ignored). With
        ``return_state`` the carried :class:`HOPEState` is appended to the result."""
        out = self.hidden_states(input_ids, enable_self_modification, state=state, return_state=return_state)
        hidden, new_state = out if return_state else (out, None)
        logits = self.head(hidden)
        result: tuple = (logits,)
        if labels is not None:
            if not isinstance(labels, Tensor) or labels.shape != input_ids.shape:
                raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)}, got "
                                 f"{tuple(getattr(labels, 'shape', ()))}")
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, self.vocab_size), labels[:, 1:].reshape(-1), ignore_index=-100
            )
            result = (loss, logits)
        if return_state:
            result = (*result, new_state)
        return result[0] if len(result) == 1 else result

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int = 100,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        enable_self_modification: bool = True,
    ) -> Tensor:
        """Sample ``max_new_tokens`` tokens after ``input_ids`` ``[B, T]``.

        The prompt runs once; every new token then runs alone against the carried state (fast
        weights, delta-rule memories, convolution and KV caches), so the logits equal those of
        a full-sequence forward. The total length must fit ``max_seq_len``. The batch-rule
        layers' queued updates (``mixer='attention'``) are left as they were before the call:
        sampled tokens never reach the weights through a later ``apply_pending_updates``.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        self._check_ids(input_ids, max_new_tokens)
        with self.kept_pending_updates():
            logits, state = self(input_ids, enable_self_modification=enable_self_modification, return_state=True)
            out = input_ids
            for _ in range(max_new_tokens):
                last = logits[:, -1, :] / temperature
                if top_k is not None:
                    kth = torch.topk(last, min(top_k, last.shape[-1])).values[:, -1:]
                    last = last.masked_fill(last < kth, float("-inf"))
                token = torch.multinomial(torch.softmax(last, dim=-1), num_samples=1)
                out = torch.cat([out, token], dim=1)
                logits, state = self(token, enable_self_modification=enable_self_modification, state=state,
                                     return_state=True)
        return out

    def get_cms_modules(self) -> list[ContinuumMemorySystem]:
        return [block.cms for block in self.blocks]

    def get_self_mod_stats(self) -> dict[str, Any]:
        return {"blocks": [{**block.get_self_mod_stats(), "block_idx": i} for i, block in enumerate(self.blocks)]}

    def get_self_mod_state(self) -> dict[str, Tensor]:
        """Clones of every self-modifying linear's weight and bias, keyed by module path."""
        state = {}
        for name, module in self.named_modules():
            if isinstance(module, SelfModifyingLinear):
                state[f"{name}.weight"] = module.weight.detach().clone()
                if module.bias is not None:
                    state[f"{name}.bias"] = module.bias.detach().clone()
        return state

    @torch.no_grad()
    def set_self_mod_state(self, state: dict[str, Tensor]) -> None:
        for name, module in self.named_modules():
            if isinstance(module, SelfModifyingLinear):
                if f"{name}.weight" in state:
                    module.weight.copy_(state[f"{name}.weight"])
                if module.bias is not None and f"{name}.bias" in state:
                    module.bias.copy_(state[f"{name}.bias"])

    @contextmanager
    def adaptation_scope(self, enable_self_modification: bool = True) -> Iterator[None]:
        """Temporary online adaptation: self-modifying weights are snapshotted and pending
        updates cleared on entry, and both restored/cleared on exit. The argument is accepted
        for compatibility (in-context memories never outlive a call anyway)."""
        saved = self.get_self_mod_state()
        self.clear_pending_updates()
        try:
            yield
        finally:
            self.clear_pending_updates()
            self.set_self_mod_state(saved)


class HOPEForSequenceClassification(SelfModifyingModule):
    """HOPE with a classifier on the mean of its final hidden states (the reference library
    pooled a vocabulary-logit row and failed on a shape mismatch): Linear → GELU → dropout →
    Linear. ``forward`` returns logits, or ``(loss, logits)`` with class ``labels``."""

    def __init__(
        self,
        num_classes: int,
        dim: int = 512,
        n_layers: int = 6,
        n_heads: int = 8,
        vocab_size: int = 50257,
        max_seq_len: int = 512,
        dropout: float = 0.1,
        use_self_modification: bool = True,
        **hope_kwargs: Any,
    ):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.hope = HOPE(dim=dim, n_layers=n_layers, n_heads=n_heads, vocab_size=vocab_size, max_seq_len=max_seq_len,
                         dropout=dropout, use_self_modification=use_self_modification, **hope_kwargs)
        self.classifier = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, num_classes))

    def forward(self, input_ids: Tensor, labels: Optional[Tensor] = None, enable_self_modification: bool = True) -> Any:
        hidden = self.hope.hidden_states(input_ids, enable_self_modification)
        logits = self.classifier(hidden.mean(dim=1))
        if labels is None:
            return logits
        return F.cross_entropy(logits, labels), logits
