"""Character-level language modelling on a public-domain novel shipped with the package.

The corpus (``corpus/persuasion.txt.gz``) is *Persuasion* by Jane Austen, published in December
1817 (dated 1818 on its title page), the year of her death. It is in the public domain: the
work is two centuries old and its author died more than 100 years ago. The text is that of
Project Gutenberg's eBook #105, with the Gutenberg header and footer removed, as shipped in the
Debian package ``r-cran-janeaustenr`` (the R package janeaustenr's data); its lines are joined
with ``\\n`` and the file is gzip-compressed (467 KB of ASCII text, 171 KB on disk).

The vocabulary is the sorted set of characters of the whole corpus. The first 90% of the text
is the ``"train"`` split, the last 10% the ``"val"`` split; a sample is a batch of random
windows of one split, every position but the first scored.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
from collections.abc import Sequence

import torch
from torch import Tensor

from ._base import IGNORE_INDEX, Task, check_int

CORPUS = "persuasion"
SPLITS = ("train", "val")
TRAIN_FRACTION = 0.9


@functools.cache
def load_corpus(name: str = CORPUS) -> str:
    """The text of ``corpus/<name>.txt.gz``, read on first use and cached."""
    compressed = importlib.resources.files(__package__).joinpath(f"corpus/{name}.txt.gz").read_bytes()
    return gzip.decompress(compressed).decode("utf-8")


def _code_points(text: str) -> Tensor:
    if not text:
        return torch.zeros(0, dtype=torch.long)
    return torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).long()


@functools.cache
def _vocabulary(name: str = CORPUS) -> tuple[str, Tensor, Tensor]:
    """``(chars, lookup, ids)``: the sorted characters, a code point -> id table (-1 for
    characters not in the corpus) and the whole corpus encoded."""
    text = load_corpus(name)
    chars = "".join(sorted(set(text)))
    codes = _code_points(chars)
    lookup = torch.full((int(codes.max()) + 1,), -1, dtype=torch.long)
    lookup[codes] = torch.arange(len(chars))
    return chars, lookup, lookup[_code_points(text)]


class Text(Task):
    """Random ``seq_len``-character windows of one split of the corpus; ``labels`` equal
    ``input_ids`` except ``labels[:, 0] = -100``."""

    name = "text"

    def __init__(self, seq_len: int = 128, split: str = "train"):
        self.seq_len = check_int("seq_len", seq_len, 2)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.split = split
        self.chars, self._lookup, ids = _vocabulary()
        self.vocab_size = len(self.chars)
        cut = int(TRAIN_FRACTION * len(ids))
        self.data = ids[:cut] if split == "train" else ids[cut:]
        if seq_len > len(self.data):
            raise ValueError(f"seq_len={seq_len} exceeds the {len(self.data)} characters of the {split!r} split")

    def encode(self, text: str) -> Tensor:
        """Token ids (int64, 1-D) of ``text``; ValueError for a character outside the vocabulary."""
        codes = _code_points(text)
        known = codes < len(self._lookup)
        ids = torch.full_like(codes, -1)
        ids[known] = self._lookup[codes[known]]
        if (ids < 0).any():
            unknown = sorted({text[i] for i in (ids < 0).nonzero().flatten().tolist()})
            raise ValueError(f"characters not in the vocabulary: {unknown!r}")
        return ids

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """The characters of the 1-D token ids ``ids``."""
        values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        bad = [i for i in values if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids outside [0, {self.vocab_size}): {bad[:5]}")
        return "".join(self.chars[i] for i in values)

    def _generate(self, batch_size: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        starts = torch.randint(len(self.data) - self.seq_len + 1, (batch_size, 1), generator=generator)
        input_ids = self.data[starts + torch.arange(self.seq_len)]
        labels = input_ids.clone()
        labels[:, 0] = IGNORE_INDEX
        return input_ids, labels
