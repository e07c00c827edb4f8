"""Learning, not just running: the default ``nested-learning train`` run (a small HOPE on MQAR,
fixed seed) recalls ≥ 90 % of the queried values and beats a same-size Transformer trained for
the same steps on the same batches."""

from __future__ import annotations

import pytest

from nested_learning.training.task_training import TrainConfig, train


@pytest.mark.slow
def test_hope_learns_mqar_and_beats_a_same_size_transformer():
    hope = train(TrainConfig())
    transformer = train(TrainConfig(model="transformer"))
    assert abs(transformer["params"] - hope["params"]) <= 0.01 * hope["params"]
    assert hope["final"]["eval_accuracy"] >= 0.9, hope["history"]
    assert hope["final"]["eval_accuracy"] >= transformer["final"]["eval_accuracy"] + 0.2, transformer["history"]
