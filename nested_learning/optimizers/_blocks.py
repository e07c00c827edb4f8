"""Bucketed, block-wise view of parameter tensors used by the learned-memory optimizers.

A tensor of n elements belongs to the bucket S = the smallest bucket size ≥ n (the largest
bucket when n exceeds all of them) and is cut into ⌈n/S⌉ row-major blocks of S coordinates,
the tail block zero-padded. One memory per bucket then runs on every block of every tensor in
that bucket as one batch — every coordinate passes through the memory.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from ..reference.memory_mlp_momentum import to_blocks

__all__ = ["DEFAULT_BUCKET_SIZES", "bucket_for", "check_bucket_sizes", "from_blocks", "num_blocks", "to_blocks"]

DEFAULT_BUCKET_SIZES = (64, 256, 1024, 4096)


def check_bucket_sizes(bucket_sizes: Sequence[int] | None) -> tuple[int, ...]:
    """Sorted, de-duplicated positive bucket sizes (``None`` → 64, 256, 1024, 4096)."""
    if bucket_sizes is None:
        return DEFAULT_BUCKET_SIZES
    sizes = tuple(bucket_sizes)
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in sizes):
        raise ValueError(f"bucket_sizes must be a non-empty list of positive integers, got {bucket_sizes!r}")
    return tuple(sorted(set(sizes)))


def bucket_for(numel: int, bucket_sizes: Sequence[int]) -> int:
    """The smallest bucket size ≥ ``numel``, or the largest bucket size."""
    return next((s for s in bucket_sizes if numel <= s), bucket_sizes[-1])


def num_blocks(numel: int, size: int) -> int:
    """⌈numel / size⌉ blocks, at least one (a 0-element tensor has one all-padding block)."""
    return max(1, -(-numel // size))


def from_blocks(blocks: Tensor, numel: int) -> Tensor:
    """The first ``numel`` coordinates of [rows, size] blocks, as a 1-d tensor."""
    return blocks.reshape(-1)[:numel]
