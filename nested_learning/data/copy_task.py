"""Copying: ``x SEP x`` for a uniform random string ``x``; the second ``x`` is scored."""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import IGNORE_INDEX, Task, check_int


class Copy(Task):
    """Token ids: ``PAD`` (0), ``SEP`` (1), then the ``vocab`` content tokens ``2 .. vocab + 1``.

    A sequence is ``x SEP x`` with ``len(x) == length``, padded with ``PAD`` (unscored) up to
    ``seq_len`` (default and minimum ``2 * length + 1``).
    """

    name = "copy"
    PAD = 0
    SEP = 1
    FIRST_TOKEN = 2

    def __init__(self, length: int = 32, vocab: int = 16, seq_len: int | None = None):
        self.length = check_int("length", length, 1)
        self.vocab = check_int("vocab", vocab, 1)
        self.seq_len = check_int("seq_len", 2 * length + 1 if seq_len is None else seq_len, 2 * length + 1)
        self.vocab_size = self.FIRST_TOKEN + vocab

    def _generate(self, batch_size: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        n = self.length
        x = torch.randint(self.vocab, (batch_size, n), generator=generator) + self.FIRST_TOKEN
        input_ids = torch.full((batch_size, self.seq_len), self.PAD, dtype=torch.long)
        input_ids[:, :n] = x
        input_ids[:, n] = self.SEP
        input_ids[:, n + 1:2 * n + 1] = x
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, n + 1:2 * n + 1] = x
        return input_ids, labels
