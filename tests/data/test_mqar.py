"""MQAR: the context, the queries and their answers, checked one sequence at a time."""

from __future__ import annotations

import pytest
import torch

from nested_learning.data import IGNORE_INDEX, MQAR


def _batch(task: MQAR, n: int = 16, seed: int = 0):
    return task.sample(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_pairs": 8, "seq_len": 64},
        {"num_pairs": 5, "seq_len": 20},
        {"num_pairs": 6, "seq_len": 40, "num_queries": 3},
        {"num_pairs": 4, "seq_len": 40, "num_queries": 13},
    ],
)
def test_every_scored_value_is_the_value_paired_with_the_query_key(kwargs):
    task = MQAR(**kwargs)
    ids, labels = _batch(task)
    context = 2 * task.num_pairs
    for row, lab in zip(ids.tolist(), labels.tolist()):
        pairs = dict(zip(row[0:context:2], row[1:context:2]))
        assert len(pairs) == task.num_pairs  # keys distinct
        assert all(task.first_key <= k < task.first_value for k in pairs)
        assert all(task.first_value <= v < task.vocab_size for v in pairs.values())
        scored = [t for t in range(task.seq_len) if lab[t] != IGNORE_INDEX]
        assert len(scored) == task.num_queries
        assert all(t > context for t in scored)
        queried = [row[t - 1] for t in scored]
        if task.num_queries <= task.num_pairs:
            assert len(set(queried)) == task.num_queries  # each pair queried at most once
        else:
            assert set(queried) == set(pairs)  # every pair queried, some more than once
        for t in scored:
            assert lab[t] == row[t] == pairs[row[t - 1]]
        # queries are non-overlapping two-token blocks; the rest of the tail is filler
        occupied = [p for t in scored for p in (t - 1, t)]
        assert len(set(occupied)) == len(occupied)
        assert all(row[p] == MQAR.PAD for p in range(context, task.seq_len) if p not in occupied)


def test_default_query_count_covers_every_pair():
    task = MQAR(num_pairs=8, seq_len=64)
    ids, labels = _batch(task)
    query_positions = (labels != IGNORE_INDEX).roll(-1, dims=1)
    queried_keys = ids[query_positions]
    assert queried_keys.numel() == 16 * 8
    assert torch.equal(queried_keys.view(16, 8).sort(dim=1).values, ids[:, 0:16:2].sort(dim=1).values)


def test_query_positions_and_order_vary():
    ids, labels = _batch(MQAR(num_pairs=4, seq_len=64), n=64)
    first_answer = (labels != IGNORE_INDEX).float().argmax(dim=1)
    assert first_answer.unique().numel() > 5
    first_query = ids[torch.arange(64), first_answer - 1]
    assert (first_query != ids[:, 0]).any()  # not always the first pair's key


def test_tight_sequence_packs_queries_back_to_back():
    task = MQAR(num_pairs=3, seq_len=12)
    _, labels = _batch(task)
    assert ((labels != IGNORE_INDEX).nonzero()[:, 1].view(-1, 3) == torch.tensor([7, 9, 11])).all()


def test_vocabulary_defaults_and_overrides():
    task = MQAR(num_pairs=8, seq_len=64)
    assert (task.num_keys, task.num_values, task.num_queries) == (64, 64, 8)
    assert task.vocab_size == 1 + 64 + 64
    assert MQAR(num_pairs=40, seq_len=160).num_keys == 80
    small = MQAR(num_pairs=4, seq_len=16, num_keys=4, num_values=2)
    ids, _ = small.sample(32, generator=torch.Generator().manual_seed(0))
    assert small.vocab_size == 7
    assert torch.equal(ids[:, 0:8:2].sort(dim=1).values, torch.arange(1, 5).expand(32, 4))


@pytest.mark.parametrize("seq_len", [4 * 8 - 1, 10])
def test_too_short_sequences_raise(seq_len):
    with pytest.raises(ValueError, match="seq_len"):
        MQAR(num_pairs=8, seq_len=seq_len)


def test_recall_counts_scored_values_only():
    task = MQAR(num_pairs=4, seq_len=24)
    _, labels = _batch(task, n=4)
    perfect = torch.nn.functional.one_hot(labels.clamp(min=0).roll(-1, dims=1), task.vocab_size).float()
    assert task.recall(perfect, labels) == 1.0
    wrong = perfect.clone()
    answers = (labels != IGNORE_INDEX).nonzero()
    row, col = answers[0].tolist()
    wrong[row, col - 1] = 0.0  # the prediction for the first answer becomes token 0 (argmax tie)
    assert task.recall(wrong, labels) == pytest.approx(1 - 1 / (4 * 4))
    with pytest.raises(ValueError):
        task.recall(perfect, torch.full_like(labels, IGNORE_INDEX))
