"""What every task promises: shapes, determinism, the label convention; the registry and scoring."""

from __future__ import annotations

import pytest
import torch

from nested_learning import data
from nested_learning.data import IGNORE_INDEX, shifted_accuracy

SMALL = {
    "mqar": {"num_pairs": 4, "seq_len": 32},
    "copy": {"length": 8, "vocab": 5},
    "parity": {"length": 10},
    "dyck": {"length": 12, "depth": 3},
    "text": {"seq_len": 40},
}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(params=sorted(data.TASKS))
def task(request):
    return data.make_task(request.param, **SMALL[request.param])


def test_registry_names_every_task():
    assert set(data.TASKS) == {"mqar", "copy", "parity", "dyck", "text"}
    for name, cls in data.TASKS.items():
        assert cls.name == name


def test_sample_shapes_dtypes_and_vocabulary(task):
    ids, labels = task.sample(5, generator=_gen(0))
    for t in (ids, labels):
        assert t.dtype == torch.int64
        assert t.shape == (5, task.seq_len)
    assert int(ids.min()) >= 0 and int(ids.max()) < task.vocab_size
    assert ids.device.type == "cpu"


def test_sample_is_deterministic_per_seed(task):
    a = task.sample(6, generator=_gen(3))
    b = task.sample(6, generator=_gen(3))
    c = task.sample(6, generator=_gen(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_consecutive_batches_from_one_generator_differ(task):
    g = _gen(5)
    assert not torch.equal(task.sample(4, generator=g)[0], task.sample(4, generator=g)[0])


def test_labels_follow_the_causal_lm_convention(task):
    ids, labels = task.sample(8, generator=_gen(1))
    scored = labels != IGNORE_INDEX
    assert not scored[:, 0].any()
    assert scored[:, 1:].sum(dim=1).min() >= 1
    assert torch.equal(labels[scored], ids[scored])
    # the HF loss on these labels is finite, i.e. something is scored
    logits = torch.zeros(*ids.shape, task.vocab_size)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, task.vocab_size), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    assert torch.isclose(loss, torch.log(torch.tensor(float(task.vocab_size))))


def test_sample_moves_to_device(task):
    ids, labels = task.sample(2, generator=_gen(0), device="meta")
    assert ids.device.type == "meta" and labels.device.type == "meta"


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, True])
def test_bad_batch_size_raises(task, batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        task.sample(batch_size)


def test_make_task_rejects_unknown_names():
    with pytest.raises(ValueError, match="'nope'") as info:
        data.make_task("nope")
    for name in data.TASKS:
        assert name in str(info.value)


def test_make_task_passes_kwargs():
    task = data.make_task("copy", length=3, vocab=4)
    assert isinstance(task, data.Copy) and task.seq_len == 7
    with pytest.raises(TypeError, match=r"task 'parity' takes length; got unknown argument\(s\) num_pairs"):
        data.make_task("parity", num_pairs=3)


@pytest.mark.parametrize(
    "cls, kwargs, argument",
    [
        (data.MQAR, {"num_pairs": 0}, "num_pairs"),
        (data.MQAR, {"num_pairs": 4, "num_keys": 3}, "num_keys"),
        (data.MQAR, {"num_pairs": 4, "num_values": 0}, "num_values"),
        (data.MQAR, {"num_pairs": 4, "seq_len": 20, "num_queries": 7}, "seq_len"),
        (data.MQAR, {"num_pairs": 4, "num_queries": 0}, "num_queries"),
        (data.Copy, {"length": 0}, "length"),
        (data.Copy, {"vocab": 0}, "vocab"),
        (data.Copy, {"length": 4, "seq_len": 8}, "seq_len"),
        (data.Parity, {"length": 0}, "length"),
        (data.Parity, {"length": 1.5}, "length"),
        (data.Dyck, {"length": 7}, "length"),
        (data.Dyck, {"length": 0}, "length"),
        (data.Dyck, {"depth": 0}, "depth"),
        (data.Dyck, {"num_types": 3}, "num_types"),
        (data.Text, {"seq_len": 1}, "seq_len"),
        (data.Text, {"split": "test"}, "split"),
    ],
)
def test_constructors_validate_arguments(cls, kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        cls(**kwargs)


def test_shifted_accuracy_compares_previous_position_predictions():
    labels = torch.tensor([[IGNORE_INDEX, 2, IGNORE_INDEX, 1], [IGNORE_INDEX, IGNORE_INDEX, 0, 0]])
    predictions = torch.tensor([[2, 0, 1, 3], [3, 0, 1, 2]])  # argmax per position
    logits = torch.nn.functional.one_hot(predictions, 4).float()
    # row 0: pos 0 predicts 2 (label[1]=2, right); pos 2 predicts 1 (label[3]=1, right)
    # row 1: pos 1 predicts 0 (label[2]=0, right); pos 2 predicts 1 (label[3]=0, wrong)
    assert shifted_accuracy(logits, labels) == (3, 4)
    # the unshifted comparison would score differently: make sure the shift matters
    assert shifted_accuracy(torch.nn.functional.one_hot(labels.clamp(min=0), 4).float(), labels) != (4, 4)


def test_shifted_accuracy_ignores_everything_when_nothing_is_scored():
    logits = torch.randn(2, 5, 3)
    assert shifted_accuracy(logits, torch.full((2, 5), IGNORE_INDEX)) == (0, 0)


def test_shifted_accuracy_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        shifted_accuracy(torch.zeros(2, 5, 3), torch.zeros(2, 4, dtype=torch.long))
