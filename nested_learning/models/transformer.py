"""A pre-norm causal Transformer language model: the baseline HOPE is compared with.

Block: x ← x + W_o softmax(Q Kᵀ/√d_h + causal mask) V (``scaled_dot_product_attention``) of LN₁ x,
then x ← x + W₂ GELU(W₁ LN₂ x). Token + learned position embedding, final LayerNorm, head tied
to the embedding; ``forward`` has HOPE's signature (``labels`` → ``(loss, logits)``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .hope import reference_init
from .titans import _check_heads

__all__ = ["Transformer"]


class _Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, _check_heads(dim, n_heads)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim), nn.Dropout(dropout))
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        x = x + self.proj(o.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """Causal Transformer LM (module docstring); ``mlp_dim`` defaults to 4·dim."""

    def __init__(
        self,
        dim: int = 512,
        n_layers: int = 12,
        n_heads: int = 8,
        vocab_size: int = 50257,
        max_seq_len: int = 2048,
        dropout: float = 0.1,
        mlp_dim: Optional[int] = None,
    ):
        super().__init__()
        self.vocab_size, self.max_seq_len = vocab_size, max_seq_len
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.pos_embedding = nn.Embedding(max_seq_len, dim)
        self.blocks = nn.ModuleList(_Block(dim, n_heads, mlp_dim or 4 * dim, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight
        for m in self.modules():
            reference_init(m)

    def forward(self, input_ids: Tensor, labels: Optional[Tensor] = None, enable_self_modification: bool = True) -> Any:
        """Logits ``[B, T, vocab]``, or ``(loss, logits)`` with next-token ``labels``
        (``enable_self_modification`` is accepted for HOPE's signature; nothing here self-modifies)."""
        T = input_ids.shape[1]
        if T > self.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.max_seq_len}")
        x = self.token_embedding(input_ids) + self.pos_embedding(torch.arange(T, device=input_ids.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if labels is None:
            return logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, self.vocab_size), labels[:, 1:].reshape(-1), ignore_index=-100)
        return loss, logits
