"""Parity: ``b1 ... bn = p`` where ``p`` is the XOR of the bits; only ``p`` is scored."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import IGNORE_INDEX, Task, check_int


class Parity(Task):
    """Token ids: bits ``0`` and ``1``, ``EQUALS`` (2). The answer is a bit token:
    ``1`` when the number of ones is odd. ``seq_len = length + 2``."""

    name = "parity"
    EQUALS = 2
    vocab_size = 3

    def __init__(self, length: int = 32):
        self.length = check_int("length", length, 1)
        self.seq_len = length + 2

    def _generate(self, batch_size: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        bits = torch.randint(2, (batch_size, self.length), generator=generator)
        answer = bits.sum(dim=1) % 2
        equals = torch.full((batch_size, 1), self.EQUALS, dtype=torch.long)
        input_ids = torch.cat([bits, equals, answer[:, None]], dim=1)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, -1] = answer
        return input_ids, labels
