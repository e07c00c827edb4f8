"""``nested-learning train``: configuration, models and optimizers, a short run end to end."""

from __future__ import annotations

import json
import re

import pytest
import torch

from nested_learning import cli
from nested_learning.models import HOPE, Transformer
from nested_learning.optimizers import DeepMomentumGD
from nested_learning.training import task_training
from nested_learning.training.task_training import TrainConfig

TINY = dict(steps=4, batch_size=4, dim=16, n_layers=1, n_heads=2, eval_every=2, eval_size=8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model": "rnn"}, "model must be one of"),
        ({"optimizer": "sgd"}, "optimizer must be one of"),
        ({"task": "translation"}, "task must be one of"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"lr": float("inf")}, "lr must be"),
        ({"warmup": 1.0}, "warmup"),
    ],
)
def test_bad_configuration_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_models_and_optimizers():
    config = TrainConfig(**TINY)
    hope = task_training.build_model(config, 11, 32)
    assert isinstance(hope, HOPE) and hope.blocks[0].cms.in_context
    titans = task_training.build_model(TrainConfig(**TINY, model="titans"), 11, 32)
    assert isinstance(titans, HOPE) and not titans.blocks[0].cms.in_context and titans.blocks[0].cms.num_levels == 1
    assert isinstance(task_training.build_model(TrainConfig(**TINY, model="transformer"), 11, 32), Transformer)
    assert isinstance(task_training.build_optimizer(TrainConfig(**TINY, optimizer="dmgd"), hope), DeepMomentumGD)
    m3 = task_training.build_optimizer(TrainConfig(**TINY, optimizer="m3"), hope)
    covered = {id(p) for g in m3.param_groups for p in g["params"]}
    assert covered == {id(p) for p in hope.parameters()}
    embedding = hope.token_embedding.weight
    assert not any(p is embedding for g in m3.optimizers[0].param_groups for p in g["params"])  # M3: blocks only
    ids = torch.randint(0, 11, (2, 32))
    hope(ids, labels=ids)[0].backward()
    m3.step()
    saved = m3.state_dict()
    fresh = task_training.build_optimizer(TrainConfig(**TINY, optimizer="m3"), hope)
    fresh.load_state_dict(saved)
    def keys(opt):
        return [o.state_dict()["state"].keys() for o in opt.optimizers]

    assert keys(fresh) == keys(m3) and len(keys(m3)[0]) > 0


@pytest.mark.parametrize("optimizer", ["adamw", "dmgd", "m3"])
def test_a_short_run_trains_and_reports(optimizer):
    seen = []
    result = task_training.train(TrainConfig(**TINY, optimizer=optimizer), progress=lambda s, m: seen.append(s))
    assert seen == [0, 1, 2, 3]
    assert [h["step"] for h in result["history"]] == [1, 3]
    assert 0.0 <= result["final"]["eval_accuracy"] <= 1.0 and result["final"]["eval_loss"] > 0
    assert result["tokens_per_second"] > 0 and result["params"] > 0


def test_runs_are_reproducible():
    a = task_training.train(TrainConfig(**TINY))
    b = task_training.train(TrainConfig(**TINY))
    assert a["history"] == b["history"]


def test_evaluate_counts_only_scored_positions():
    model = Transformer(dim=16, n_layers=1, n_heads=2, vocab_size=5, max_seq_len=6, dropout=0.0)
    ids = torch.tensor([[1, 2, 3, 4, 0, 1]])
    labels = torch.full_like(ids, -100)
    labels[0, 3] = 4
    with torch.no_grad():
        logits = model(ids)
    metrics = task_training.evaluate(model, (ids, labels))
    expected = torch.nn.functional.cross_entropy(logits[0, 2:3], torch.tensor([4])).item()
    assert metrics["loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["accuracy"] == float(logits[0, 2].argmax() == 4)


def test_cli_train_prints_metrics_and_writes_files(tmp_path, capsys):
    out_json, out_png = tmp_path / "run.json", tmp_path / "run.png"
    args = ["train", "--steps", "3", "--batch-size", "4", "--dim", "16", "--n-layers", "1", "--n-heads", "2",
            "--eval-every", "3", "--task", "parity", "--json", str(out_json), "--plot", str(out_png)]
    assert cli.main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["final"]) == {"eval_loss", "eval_accuracy"} and printed["config"]["task"] == "parity"
    assert json.loads(out_json.read_text())["history"][0]["step"] == 2
    assert out_png.stat().st_size > 1000


def test_cli_task_args_reach_the_task(capsys):
    args = ["train", "--steps", "1", "--batch-size", "2", "--dim", "16", "--n-layers", "1", "--n-heads", "2",
            "--eval-every", "1", "--task", "mqar", "--task-arg", "num_pairs=4", "--task-arg", "seq_len=32",
            "--task-arg", "num_queries=6"]
    assert cli.main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["config"]["task_kwargs"] == {"num_pairs": 4, "seq_len": 32, "num_queries": 6}
    task = task_training.build_task(task_training.TrainConfig(task_kwargs=printed["config"]["task_kwargs"]))
    assert (task.num_pairs, task.seq_len, task.num_queries) == (4, 32, 6)


@pytest.mark.parametrize("arg, message", [
    ("num_pairs", "--task-arg must be KEY=VALUE, got 'num_pairs'"),
    ("colour=3", "task 'mqar' takes num_pairs, seq_len, num_keys, num_values, num_queries; got unknown argument(s) colour"),
    ("num_pairs=200", "seq_len=64 is too short for 200 pairs"),
])
def test_cli_bad_task_args_are_named_before_training(arg, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        cli.main(["train", "--task", "mqar", "--task-arg", arg])
