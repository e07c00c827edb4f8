"""ContinuumMemoryTrainer: levels move only on their periods, by the inner optimizer on the
window gradient (checked against torch.optim stepping the same windows), resume mid-period,
the fallback path, the loops, and the update schedule."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nested_learning as nl
from nested_learning.training import ContinuumMemoryTrainer, update_schedule, visualize_update_schedule

PERIODS = [8, 32, 128]


class Model(nn.Module):
    def __init__(self, periods=PERIODS):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 8)
        self.cms = nl.ContinuumMemorySystem(8, 12, num_levels=len(periods), chunk_sizes=list(periods))
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.cms(self.inp(x)))


def batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 6, generator=gen), torch.randn(4, 3, 2, generator=gen)) for _ in range(n)]


def level_snapshot(model):
    return [[p.detach().clone() for p in model.cms.level_parameters(i)] for i in range(model.cms.num_levels)]


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
    "rmsprop (fallback)": lambda p: torch.optim.RMSprop(p, lr=1e-3),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_levels_change_exactly_on_their_periods_and_match_torch_optim_on_windows(name):
    """Trajectory of every level = torch.optim stepping the window means at the due steps."""
    model = Model()
    shadow = copy.deepcopy(model)  # stepped by hand: windows of raw gradients into torch.optim
    trainer = ContinuumMemoryTrainer(model, OPTIMIZERS[name](model.parameters()))
    level_opts = [OPTIMIZERS[name](shadow.cms.level_parameters(i)) for i in range(3)]
    rest = [p for n, p in shadow.named_parameters() if not n.startswith("cms.mlps")]
    rest_opt = OPTIMIZERS[name](rest)
    windows = [[torch.zeros_like(p) for p in shadow.cms.level_parameters(i)] for i in range(3)]
    counts = [0, 0, 0]
    for step, (x, y) in enumerate(batches(40)):
        before = level_snapshot(model)
        trainer.train_step(x, y, F.mse_loss)
        after = level_snapshot(model)
        shadow.zero_grad()
        F.mse_loss(shadow(x), y).backward()
        for lvl in range(3):
            params = shadow.cms.level_parameters(lvl)
            for w, p in zip(windows[lvl], params):
                w += p.grad
            counts[lvl] += 1
            due = step % PERIODS[lvl] == 0
            moved = any(not torch.equal(a, b) for a, b in zip(before[lvl], after[lvl]))
            assert moved == due, (name, step, lvl)
            if due:
                for w, p in zip(windows[lvl], params):
                    p.grad = w / counts[lvl]
                level_opts[lvl].step()
                for w in windows[lvl]:
                    w.zero_()
                counts[lvl] = 0
        rest_opt.step()
    for a, b in zip(model.parameters(), shadow.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
    assert model.cms.update_counts == [5, 2, 1]
    assert model.cms.get_level_stats()["levels"][0]["updates_so_far"] == 5


def test_sum_mode_steps_on_the_window_sum():
    model = Model(periods=[1, 4])
    trainer = ContinuumMemoryTrainer(model, torch.optim.SGD(model.parameters(), lr=0.01), average=False)
    start = level_snapshot(model)[1]
    grads = [torch.zeros_like(p) for p in model.cms.level_parameters(1)]
    probe = copy.deepcopy(model)
    for step, (x, y) in enumerate(batches(5)):
        probe.load_state_dict(model.state_dict())
        probe.zero_grad()
        F.mse_loss(probe(x), y).backward()
        if step >= 1:
            for g, p in zip(grads, probe.cms.level_parameters(1)):
                g += p.grad
        trainer.train_step(x, y, F.mse_loss)
        if step == 0:
            start = level_snapshot(model)[1]
    for p0, g, p in zip(start, grads, model.cms.level_parameters(1)):
        torch.testing.assert_close(p, p0 - 0.01 * g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_resume_mid_period_continues_bit_identically(name, tmp_path):
    data = batches(23)
    model = Model()
    trainer = ContinuumMemoryTrainer(model, OPTIMIZERS[name](model.parameters()))
    for x, y in data:
        trainer.train_step(x, y, F.mse_loss)
    first = Model()
    t1 = ContinuumMemoryTrainer(first, OPTIMIZERS[name](first.parameters()))
    for x, y in data[:11]:  # stop mid-window for every level
        t1.train_step(x, y, F.mse_loss)
    torch.save(t1.state_dict(), tmp_path / "ckpt.pt")
    resumed = Model()
    t2 = ContinuumMemoryTrainer(resumed, OPTIMIZERS[name](resumed.parameters()))
    t2.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=False))
    assert t2.step_count == 11 and resumed.cms.accumulated_counts == first.cms.accumulated_counts
    for x, y in data[11:]:
        t2.train_step(x, y, F.mse_loss)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)


def test_loops_report_history_and_evaluate():
    model = Model(periods=[1, 2])
    trainer = ContinuumMemoryTrainer(model, torch.optim.Adam(model.parameters(), lr=1e-2))
    data = batches(6)
    first = trainer.evaluate(data, F.mse_loss)
    history = trainer.train(data, data, F.mse_loss, num_epochs=4)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4] and history[-1]["step_count"] == 24
    assert history[-1]["val_loss"] < first
    assert history[-1]["level_updates"]["cms"] == [24, 12]


def test_optimizer_must_hold_the_level_parameters():
    model = Model()
    with pytest.raises(ValueError, match="optimizer does not hold the parameters of cms level"):
        ContinuumMemoryTrainer(model, torch.optim.SGD(model.out.parameters(), lr=0.1))


def test_update_schedule_text():
    text = visualize_update_schedule([8, 32, 128], 40)
    assert text.splitlines()[:3] == ["Step 0: Updated levels: [0, 1, 2]", "Step 8: Updated levels: [0]",
                                     "Step 16: Updated levels: [0]"]
    assert "Step 32: Updated levels: [0, 1]" in text and "Step 1:" not in text
    assert update_schedule([2, 3], 7) == [[0, 1], [], [0], [1], [0], [], [0, 1]]
    with pytest.raises(ValueError, match="chunk_sizes must be a non-empty list of positive integers"):
        update_schedule([8, 0], 10)


def test_update_schedule_plot_goes_where_asked(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "schedule.png"
    visualize_update_schedule([8, 32, 128], 300, path=str(path))
    assert path.stat().st_size > 1000 and not (tmp_path / "results").exists()


def test_schedulers_and_loaded_state_reach_the_fused_levels():
    model = Model(periods=[1, 2])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = ContinuumMemoryTrainer(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5 if epoch >= 1 else 1.0)
    data = batches(5)
    trainer.train_step(*data[0], F.mse_loss)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.05
    before = [p.detach().clone() for p in model.cms.level_parameters(0)]
    probe = copy.deepcopy(model)
    probe.zero_grad()
    F.mse_loss(probe(data[1][0]), data[1][1]).backward()
    trainer.train_step(*data[1], F.mse_loss)
    for p0, p, g in zip(before, model.cms.level_parameters(0), probe.cms.level_parameters(0)):
        torch.testing.assert_close(p, p0 - 0.05 * g.grad, rtol=1e-5, atol=1e-7)
    state = optimizer.state_dict()
    state["param_groups"][0]["lr"] = 0.0  # a checkpoint's hyper-parameters replace the group dicts
    optimizer.load_state_dict(state)
    frozen = [p.detach().clone() for p in model.parameters()]
    for x, y in data[2:]:
        trainer.train_step(x, y, F.mse_loss)
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.parameters()))
