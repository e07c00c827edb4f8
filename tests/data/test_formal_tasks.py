"""Copy, parity and Dyck: every answer recomputed here, independently of the generators."""

from __future__ import annotations

import collections

import pytest
import torch

from nested_learning.data import IGNORE_INDEX, Copy, Dyck, Parity


def _batch(task, n: int, seed: int = 0):
    return task.sample(n, generator=torch.Generator().manual_seed(seed))


def _scored_positions(labels: torch.Tensor) -> list[list[int]]:
    return [[t for t, v in enumerate(row) if v != IGNORE_INDEX] for row in labels.tolist()]


# --- copy -----------------------------------------------------------------------------------


@pytest.mark.parametrize("length, vocab, seq_len", [(8, 5, None), (5, 3, 16), (1, 1, None)])
def test_copy_repeats_the_string_after_the_separator(length, vocab, seq_len):
    task = Copy(length=length, vocab=vocab, seq_len=seq_len)
    assert task.seq_len == (2 * length + 1 if seq_len is None else seq_len)
    assert task.vocab_size == vocab + 2
    ids, labels = _batch(task, 32)
    for row, scored in zip(ids.tolist(), _scored_positions(labels)):
        x = row[:length]
        assert all(Copy.FIRST_TOKEN <= tok < task.vocab_size for tok in x)
        assert row[length] == Copy.SEP
        assert row[length + 1:2 * length + 1] == x
        assert all(tok == Copy.PAD for tok in row[2 * length + 1:])
        assert scored == list(range(length + 1, 2 * length + 1))


def test_copy_uses_the_whole_content_vocabulary():
    ids, _ = _batch(Copy(length=16, vocab=6), 16)
    assert set(ids[:, :16].unique().tolist()) == set(range(2, 8))


# --- parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 7, 32])
def test_parity_answer_is_the_xor_of_the_bits(length):
    task = Parity(length=length)
    ids, labels = _batch(task, 64)
    assert task.seq_len == length + 2
    answers = []
    for row, lab, scored in zip(ids.tolist(), labels.tolist(), _scored_positions(labels)):
        bits = row[:length]
        assert set(bits) <= {0, 1}
        assert row[length] == Parity.EQUALS
        assert scored == [length + 1]
        expected = 0
        for b in bits:
            expected ^= b
        assert row[-1] == lab[-1] == expected
        answers.append(expected)
    assert set(answers) == {0, 1}


# --- dyck -----------------------------------------------------------------------------------


def _balanced(brackets: list[int]) -> bool:
    """Stack check; type t opens with 2t and closes with 2t + 1."""
    stack: list[int] = []
    for tok in brackets:
        if tok % 2 == 0:
            stack.append(tok // 2)
        elif not stack or stack.pop() != tok // 2:
            return False
    return not stack


def _max_depth(brackets: list[int]) -> int:
    depth = best = 0
    for tok in brackets:
        depth += 1 if tok % 2 == 0 else -1
        best = max(best, depth)
    return best


def test_stack_checker_itself():
    assert _balanced([0, 2, 3, 1]) and _balanced([0, 1, 2, 3])
    assert not _balanced([0, 2, 1, 3]) and not _balanced([1, 0]) and not _balanced([0, 0, 1])


@pytest.mark.parametrize("length, depth, num_types", [(12, 3, 2), (32, 8, 2), (20, 10, 1), (8, 1, 2)])
def test_dyck_answers_match_a_stack_check(length, depth, num_types):
    task = Dyck(length=length, depth=depth, num_types=num_types)
    ids, labels = _batch(task, 400)
    assert task.seq_len == length + 2 and task.vocab_size == 2 * num_types + 3
    balanced = 0
    for row, scored in zip(ids.tolist(), _scored_positions(labels)):
        brackets = row[:length]
        assert all(0 <= tok < 2 * num_types for tok in brackets)
        assert row[length] == task.EQUALS
        assert scored == [length + 1]
        is_balanced = _balanced(brackets)
        assert row[-1] == (task.YES if is_balanced else task.NO)
        if is_balanced:
            balanced += 1
            assert _max_depth(brackets) <= depth
    assert 0.4 < balanced / 400 < 0.6


def test_dyck_corruptions_are_one_substitution_away_from_balanced():
    task = Dyck(length=12, depth=4)
    ids, _ = _batch(task, 200, seed=1)
    corrupted = [row[:12] for row in ids.tolist() if row[-1] == task.NO]
    assert corrupted
    for brackets in corrupted:
        repairs = (brackets[:i] + [tok] + brackets[i + 1:] for i in range(12) for tok in range(4) if tok != brackets[i])
        assert any(_balanced(repaired) for repaired in repairs)


def test_dyck_draws_balanced_strings_uniformly():
    # length 6, one type, depth 3: the 5 balanced strings should be equally likely
    task = Dyck(length=6, depth=3, num_types=1)
    ids, _ = _batch(task, 4000, seed=2)
    counts = collections.Counter(tuple(row[:6]) for row in ids.tolist() if row[-1] == task.YES)
    assert len(counts) == 5
    total = sum(counts.values())
    assert all(0.15 < c / total < 0.25 for c in counts.values()), counts


def test_dyck_depth_bound_excludes_deep_strings():
    task = Dyck(length=6, depth=1, num_types=1)
    ids, _ = _batch(task, 200)
    balanced = {tuple(row[:6]) for row in ids.tolist() if row[-1] == task.YES}
    assert balanced == {(0, 1, 0, 1, 0, 1)}


def test_dyck_uses_both_bracket_types_and_deep_nesting():
    task = Dyck(length=32, depth=8)
    ids, _ = _batch(task, 200)
    brackets = ids[:, :32]
    assert set(brackets.unique().tolist()) == {0, 1, 2, 3}
    depths = [_max_depth(row) for row, last in zip(brackets.tolist(), ids[:, -1].tolist()) if last == task.YES]
    assert max(depths) >= 6 and min(depths) <= 3
