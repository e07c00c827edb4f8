"""The model-throughput benchmark times one training step of HOPE and of its same-size
Transformer at a tiny shape, on CPU, under both autocast dtypes."""

import math

import pytest
import torch

from nested_learning.benchmark import model_throughput

TINY = dict(dim=16, layers=1, heads=2, seq_len=32, batch=2, device="cpu", repeats=2, warmup=1)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_rows_are_well_formed(dtype):
    rows = model_throughput.run(**TINY, dtype=dtype)
    assert [r["model"] for r in rows] == ["hope", "transformer"]
    hope, transformer = rows
    assert abs(hope["params"] - transformer["params"]) / hope["params"] < 0.02  # same size
    for r in rows:
        assert r["dtype"] == dtype and r["runs"] == 2 and 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert math.isclose(r["tokens_per_s"], 2 * 32 / (r["median_ms"] / 1e3))
    assert math.isclose(hope["hope_vs_transformer"], hope["tokens_per_s"] / transformer["tokens_per_s"])


def test_a_step_trains_every_parameter():
    model = model_throughput.build_model(model_throughput.TrainConfig(model="hope", dim=16, n_layers=1, n_heads=2),
                                         model_throughput.VOCAB, 32)
    before = [p.detach().clone() for p in model.parameters()]
    model_throughput._train_step(model, torch.randint(0, model_throughput.VOCAB, (2, 32)), torch.float32)()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_bad_dtype_is_an_error():
    with pytest.raises(ValueError, match="dtype must be"):
        model_throughput.run(**TINY, dtype="fp16")
