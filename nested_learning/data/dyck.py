"""Dyck-language recognition: is a bracket string balanced? ``s = yes|no``; only the answer is scored.

Balanced strings are drawn uniformly among those of the given length whose nesting depth stays
within ``depth`` (each opening bracket's type uniform). Each sample is corrupted with
probability 1/2 by substituting one random position with a different bracket token, which
always unbalances it: a flipped direction breaks the count, a changed type breaks the match.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import IGNORE_INDEX, Task, check_int


def _open_probabilities(length: int, depth: int) -> Tensor:
    """``p[i, h]``: probability that step ``i`` opens a bracket, at height ``h``, for a uniform
    balanced string of ``length`` brackets with depth ``<= depth``."""
    # completions[h] = number of ways to finish from height h with the remaining steps
    completions = [1] + [0] * depth
    rows = []
    for _ in range(length):
        previous = completions
        completions = [
            (previous[h + 1] if h < depth else 0) + (previous[h - 1] if h > 0 else 0) for h in range(depth + 1)
        ]
        # exact integer counts, rounded once by the division
        rows.append([previous[h + 1] / completions[h] if completions[h] else 0.0 for h in range(depth)] + [0.0])
    return torch.tensor(rows[::-1], dtype=torch.float64)


class Dyck(Task):
    """Token ids: type ``t`` opens with ``2t`` and closes with ``2t + 1`` (``num_types`` of 1 or
    2), then ``EQUALS``, ``NO``, ``YES``. ``length`` is the (even) number of brackets, ``depth``
    the largest nesting allowed in the balanced strings; ``seq_len = length + 2``."""

    name = "dyck"

    def __init__(self, length: int = 32, depth: int = 8, num_types: int = 2):
        self.length = check_int("length", length, 2)
        if length % 2:
            raise ValueError(f"length must be even, got {length}")
        self.depth = check_int("depth", depth, 1)
        if check_int("num_types", num_types, 1) > 2:
            raise ValueError(f"num_types must be 1 or 2, got {num_types}")
        self.num_types = num_types
        self.EQUALS = 2 * num_types
        self.NO = self.EQUALS + 1
        self.YES = self.EQUALS + 2
        self.vocab_size = self.EQUALS + 3
        self.seq_len = length + 2
        self._open_prob = _open_probabilities(length, depth)

    def _balanced(self, batch_size: int, generator: torch.Generator | None) -> Tensor:
        rows = torch.arange(batch_size)
        uniform = torch.rand(batch_size, self.length, generator=generator, dtype=torch.float64)
        types = torch.randint(self.num_types, (batch_size, self.length), generator=generator)
        stack = torch.zeros(batch_size, self.depth, dtype=torch.long)
        height = torch.zeros(batch_size, dtype=torch.long)
        brackets = torch.empty(batch_size, self.length, dtype=torch.long)
        for i in range(self.length):
            opens = uniform[:, i] < self._open_prob[i, height]
            top = (height - 1).clamp(min=0)
            kind = torch.where(opens, types[:, i], stack[rows, top])
            stack[rows[opens], height[opens]] = types[opens, i]
            height = torch.where(opens, height + 1, height - 1)
            brackets[:, i] = 2 * kind + (~opens).long()
        return brackets

    def _generate(self, batch_size: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        brackets = self._balanced(batch_size, generator)
        corrupt = torch.rand(batch_size, generator=generator) < 0.5
        position = torch.randint(self.length, (batch_size,), generator=generator)
        kinds = 2 * self.num_types
        shift = torch.randint(1, kinds, (batch_size,), generator=generator)
        rows = torch.arange(batch_size)
        edited = (brackets[rows, position] + shift) % kinds
        brackets[rows[corrupt], position[corrupt]] = edited[corrupt]
        answer = torch.where(corrupt, self.NO, self.YES)
        equals = torch.full((batch_size, 1), self.EQUALS, dtype=torch.long)
        input_ids = torch.cat([brackets, equals, answer[:, None]], dim=1)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, -1] = answer
        return input_ids, labels
