"""Text: the shipped corpus, the character vocabulary, the splits and the windows."""

from __future__ import annotations

import gzip
import importlib.resources
import subprocess
import sys

import pytest
import torch

from nested_learning.data import IGNORE_INDEX, Text
from nested_learning.data.text import CORPUS, load_corpus


def test_corpus_ships_gzipped_within_size_bounds():
    path = importlib.resources.files("nested_learning.data").joinpath(f"corpus/{CORPUS}.txt.gz")
    compressed = path.read_bytes()
    assert compressed[:2] == b"\x1f\x8b"
    text = gzip.decompress(compressed).decode("utf-8")
    assert 150_000 <= len(text.encode("utf-8")) <= 600_000
    assert len(compressed) < len(text) / 2
    assert text == load_corpus()


def test_corpus_is_the_plain_novel():
    text = load_corpus()
    assert "\r" not in text
    assert text.startswith("Persuasion\n") and text.rstrip().endswith("Finis")
    assert "Anne Elliot" in text and "Captain Wentworth" in text
    assert "gutenberg" not in text.lower() and "***" not in text


def test_corpus_is_loaded_lazily_and_cached():
    code = "import nested_learning.data.text as t; assert t.load_corpus.cache_info().currsize == 0"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert load_corpus() is load_corpus()
    assert Text(seq_len=16).data.data_ptr() == Text(seq_len=64).data.data_ptr()


def test_vocabulary_is_the_sorted_character_set_of_the_corpus():
    task = Text()
    text = load_corpus()
    assert task.chars == "".join(sorted(set(text)))
    assert task.vocab_size == len(task.chars) == len(set(text))
    everything = task.encode(text)
    assert everything.dtype == torch.int64 and everything.shape == (len(text),)
    assert task.decode(everything) == text


def test_encode_decode_round_trip():
    task = Text()
    s = "It was Anne's opinion, however; and so, (1814) - \"Yes!\"\n"
    ids = task.encode(s)
    assert ids.tolist() == [task.chars.index(c) for c in s]
    assert task.decode(ids) == s
    assert task.decode(ids.tolist()) == s
    assert task.encode("").numel() == 0 and task.decode(torch.tensor([], dtype=torch.long)) == ""


def test_encode_and_decode_reject_what_is_outside_the_vocabulary():
    task = Text()
    with pytest.raises(ValueError, match="€"):
        task.encode("price: 5€")
    with pytest.raises(ValueError):
        task.decode(torch.tensor([0, task.vocab_size]))
    with pytest.raises(ValueError):
        task.decode([IGNORE_INDEX])


def test_splits_partition_the_corpus_ninety_ten():
    train, val = Text(split="train"), Text(split="val")
    full = train.encode(load_corpus())
    assert torch.equal(torch.cat([train.data, val.data]), full)
    assert len(val.data) == len(full) - int(0.9 * len(full))
    assert train.vocab_size == val.vocab_size


def test_windows_come_from_their_own_split():
    text = load_corpus()
    cut = int(0.9 * len(text))
    train_text, val_text = text[:cut], text[cut:]
    val = Text(seq_len=200, split="val")
    ids, _ = val.sample(20, generator=torch.Generator().manual_seed(0))
    for row in ids:
        window = val.decode(row)
        assert window in val_text and window not in train_text
    train = Text(seq_len=200, split="train")
    ids, _ = train.sample(20, generator=torch.Generator().manual_seed(0))
    for row in ids:
        window = train.decode(row)
        assert window in train_text and window not in val_text


def test_every_position_but_the_first_is_scored():
    task = Text(seq_len=32)
    ids, labels = task.sample(8, generator=torch.Generator().manual_seed(1))
    assert (labels[:, 0] == IGNORE_INDEX).all()
    assert torch.equal(labels[:, 1:], ids[:, 1:])


def test_windows_start_all_over_the_split():
    task = Text(seq_len=40, split="val")
    val_text = task.decode(task.data)
    ids, _ = task.sample(32, generator=torch.Generator().manual_seed(2))
    starts = [val_text.find(task.decode(row)) for row in ids]
    assert min(starts) >= 0
    assert max(starts) - min(starts) > len(val_text) // 2


def test_seq_len_longer_than_the_split_raises():
    with pytest.raises(ValueError, match="seq_len"):
        Text(seq_len=len(load_corpus()), split="val")
