"""Multi-query associative recall (MQAR), the recall benchmark of the Zoology study.

A sequence opens with ``num_pairs`` key-value pairs ``k1 v1 k2 v2 ...`` (keys distinct, values
drawn with replacement). The rest is filler, except for ``num_queries`` two-token queries
``k v`` at random non-overlapping places: ``k`` is a key of the context, ``v`` its value. Only
the ``v`` of each query is scored, so a model must recall what followed ``k`` earlier on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._base import IGNORE_INDEX, Task, check_int, shifted_accuracy


class MQAR(Task):
    """Token ids: ``PAD`` (0, the filler), keys ``1 .. num_keys``, then values
    ``num_keys + 1 .. num_keys + num_values``; ``vocab_size = 1 + num_keys + num_values``.

    Defaults sized for a small CPU model: ``num_keys = max(2 * num_pairs, 64)`` (so each
    sequence uses at most half the keys), ``num_values = 64``, ``num_queries = num_pairs``
    (every pair queried once, in random order). With ``num_queries <= num_pairs`` the queried
    pairs are distinct; with more, every pair is queried at least once and the extra queries
    repeat pairs drawn uniformly (denser supervision per token, the same recall problem).
    ``seq_len`` must hold ``2 * (num_pairs + num_queries)`` tokens.
    """

    name = "mqar"
    PAD = 0

    def __init__(
        self,
        num_pairs: int = 32,
        seq_len: int = 256,
        num_keys: int | None = None,
        num_values: int | None = None,
        num_queries: int | None = None,
    ):
        self.num_pairs = check_int("num_pairs", num_pairs, 1)
        self.num_keys = check_int("num_keys", max(2 * num_pairs, 64) if num_keys is None else num_keys, 1)
        if self.num_keys < num_pairs:
            raise ValueError(f"num_keys must be >= num_pairs={num_pairs} (keys are distinct), got {num_keys}")
        self.num_values = check_int("num_values", 64 if num_values is None else num_values, 1)
        self.num_queries = check_int("num_queries", num_pairs if num_queries is None else num_queries, 1)
        needed = 2 * (num_pairs + self.num_queries)
        if check_int("seq_len", seq_len, 1) < needed:
            raise ValueError(
                f"seq_len={seq_len} is too short for {num_pairs} pairs and {self.num_queries} queries (needs {needed})"
            )
        self.seq_len = seq_len
        self.first_key = 1
        self.first_value = 1 + self.num_keys
        self.vocab_size = 1 + self.num_keys + self.num_values

    def _generate(self, batch_size: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        pairs, queries = self.num_pairs, self.num_queries
        context = 2 * pairs
        keys = torch.rand(batch_size, self.num_keys, generator=generator).argsort(dim=1)[:, :pairs] + self.first_key
        values = torch.randint(self.num_values, (batch_size, pairs), generator=generator) + self.first_value
        if queries <= pairs:
            queried = torch.rand(batch_size, pairs, generator=generator).argsort(dim=1)[:, :queries]
        else:
            extra = torch.randint(pairs, (batch_size, queries - pairs), generator=generator)
            queried = torch.cat([torch.arange(pairs).expand(batch_size, pairs), extra], dim=1)
            queried = queried.gather(1, torch.rand(batch_size, queries, generator=generator).argsort(dim=1))
        # Uniform placement of `queries` blocks of 2 in `free` cells: choose sorted distinct
        # c_i from range(free - queries); block i starts at c_i + i.
        free = self.seq_len - context
        offsets = torch.rand(batch_size, free - queries, generator=generator).argsort(dim=1)[:, :queries]
        starts = context + offsets.sort(dim=1).values + torch.arange(queries)

        input_ids = torch.full((batch_size, self.seq_len), self.PAD, dtype=torch.long)
        input_ids[:, 0:context:2] = keys
        input_ids[:, 1:context:2] = values
        rows = torch.arange(batch_size)[:, None]
        input_ids[rows, starts] = keys.gather(1, queried)
        input_ids[rows, starts + 1] = values.gather(1, queried)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[rows, starts + 1] = input_ids[rows, starts + 1]
        return input_ids, labels

    @staticmethod
    def recall(logits: Tensor, labels: Tensor) -> float:
        """Fraction of the queried values predicted correctly."""
        correct, scored = shifted_accuracy(logits, labels)
        if scored == 0:
            raise ValueError("labels have no scored position")
        return correct / scored
