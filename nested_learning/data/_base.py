"""What every task shares: the sampling contract, argument checks and the scoring rule.

Labels follow the causal-LM convention: the loss is
``cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=IGNORE_INDEX)``, so ``labels[:, t]``
is the token that the logits at position ``t - 1`` must predict. Where a position is scored its
label equals ``input_ids[:, t]``; elsewhere it is ``IGNORE_INDEX``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

IGNORE_INDEX = -100


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int, or a ValueError naming ``name`` when it is not an int ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class Task(ABC):
    """A generator of ``(input_ids, labels)`` batches, both int64 ``[batch_size, seq_len]``."""

    name: str
    vocab_size: int
    seq_len: int

    def sample(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """A fresh batch drawn with ``generator`` (a CPU generator; the global RNG when None),
        moved to ``device``. The same generator state always gives the same batch."""
        check_int("batch_size", batch_size, 1)
        input_ids, labels = self._generate(batch_size, generator)
        return input_ids.to(device), labels.to(device)

    @abstractmethod
    def _generate(self, batch_size: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """The batch on the CPU."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, seq_len={self.seq_len})"


def shifted_accuracy(logits: Tensor, labels: Tensor) -> tuple[int, int]:
    """``(correct, scored)``: how many scored positions the argmax of the previous position's
    logits predicts, and how many positions are scored. ``logits`` is ``[batch, seq, vocab]``,
    ``labels`` is ``[batch, seq]``."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [batch, seq, vocab] and labels [batch, seq], got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    correct = (logits[:, :-1].argmax(dim=-1) == targets) & scored
    return int(correct.sum()), int(scored.sum())
