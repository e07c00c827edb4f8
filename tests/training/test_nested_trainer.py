"""NestedLearningTrainer: CMS levels move only on due steps, by the optimizer's step on the
window gradient (checked against a hand-written loop, fused Adam and the DeepMomentumGD
fallback), everything else every step, pending self-modifying updates after the optimizer step,
model-computed losses, metrics, meta-step cadence, exact resume, evaluation numbers, the setup
helper, and argument errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nested_learning as nl
from nested_learning.optimizers import DeepMomentumGD, NestedDeepMomentumGD
from nested_learning.training import NestedLearningTrainer, create_nested_learning_setup

PERIODS = [1, 2, 4]


class Model(nn.Module):
    """Linear → CMS([1, 2, 4]) → Linear over [B, T, 6], with a recording ``apply_pending_updates``."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(6, 8)
        self.cms = nl.ContinuumMemorySystem(8, 12, num_levels=3, chunk_sizes=list(PERIODS))
        self.out = nn.Linear(8, 2)
        self.pending_calls = 0
        self.seen = []  # parameter values at each apply_pending_updates call

    def forward(self, x):
        return self.out(self.cms(self.inp(x)))

    def apply_pending_updates(self):
        self.pending_calls += 1
        self.seen.append([p.detach().clone() for p in self.parameters()])


def batches(n, seed=0, classes=False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(4, 3, 6, generator=gen)
        y = torch.randint(0, 2, (4, 3), generator=gen) if classes else torch.randn(4, 3, 2, generator=gen)
        out.append((x, y))
    return out


def levels(model):
    return [[p.detach().clone() for p in model.cms.level_parameters(i)] for i in range(3)]


def others(model):
    return [p.detach().clone() for n, p in model.named_parameters() if not n.startswith("cms.mlps")]


def moved(before, after):
    return any(not torch.equal(a, b) for a, b in zip(before, after))


def make_optimizer(name, params):
    if name == "adam (fused)":
        return torch.optim.Adam(params, lr=1e-2)
    torch.manual_seed(123)  # identical memory initialisation for the trainer's and the shadow's DMGD
    return DeepMomentumGD(params, lr=0.05, momentum=0.9, memory_lr=1e-3)


# ---------------------------------------------------------------------- the multi-frequency rule


@pytest.mark.parametrize("name", ["adam (fused)", "dmgd (fallback)"])
def test_levels_move_only_when_due_by_the_optimizer_step_on_the_window_gradient(name):
    model = Model()
    shadow = copy.deepcopy(model)
    trainer = NestedLearningTrainer(model, make_optimizer(name, model.parameters()), device="cpu")
    if name == "adam (fused)":  # one Adam per level, stepped by hand on the window means at due steps
        level_opts = [torch.optim.Adam(shadow.cms.level_parameters(i), lr=1e-2) for i in range(3)]
        rest_opt = torch.optim.Adam([p for n, p in shadow.named_parameters() if not n.startswith("cms.mlps")], lr=1e-2)
    else:  # one DMGD; off-cycle levels get no gradient, due levels the window mean
        shadow_opt = make_optimizer(name, shadow.parameters())
    windows = [[torch.zeros_like(p) for p in shadow.cms.level_parameters(i)] for i in range(3)]
    counts = [0, 0, 0]
    for step, (x, y) in enumerate(batches(12)):
        lv0, rest0 = levels(model), others(model)
        trainer.train_step(x, y, F.mse_loss)
        lv1, rest1 = levels(model), others(model)
        assert moved(rest0, rest1), step  # non-CMS parameters (and level_weights) move every step
        shadow.zero_grad()
        F.mse_loss(shadow(x), y).backward()
        due = [step % c == 0 for c in PERIODS]
        for lvl in range(3):
            assert moved(lv0[lvl], lv1[lvl]) == due[lvl], (step, lvl)
            for w, p in zip(windows[lvl], shadow.cms.level_parameters(lvl)):
                w += p.grad
            counts[lvl] += 1
            for w, p in zip(windows[lvl], shadow.cms.level_parameters(lvl)):
                p.grad = w / counts[lvl] if due[lvl] else None
            if due[lvl]:
                if name == "adam (fused)":
                    level_opts[lvl].step()
                for w in windows[lvl]:
                    w.zero_()
                counts[lvl] = 0
        if name == "adam (fused)":
            rest_opt.step()
        else:
            shadow_opt.step()
        for a, b in zip(model.parameters(), shadow.parameters()):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
    assert model.cms.update_counts == [12, 6, 3]
    assert trainer.get_cms_update_stats()["cms"]["updates_per_level"] == [12, 6, 3]


def test_without_multifreq_every_level_moves_every_step():
    model = Model()
    trainer = NestedLearningTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), device="cpu",
                                    enable_cms_multifreq=False)
    for x, y in batches(3):
        before = levels(model)
        trainer.train_step(x, y, F.mse_loss)
        assert all(moved(b, a) for b, a in zip(before, levels(model)))
    stats = trainer.get_cms_update_stats()["cms"]
    assert stats["updates_per_level"] == [3, 3, 3] and stats["chunk_sizes"] == PERIODS and stats["step_count"] == 3


# ---------------------------------------------------------------------- self-modifying layers


def test_apply_pending_updates_runs_once_per_step_after_the_optimizer_step():
    model = Model()
    trainer = NestedLearningTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), device="cpu")
    for i, (x, y) in enumerate(batches(4)):
        before = [p.detach().clone() for p in model.parameters()]
        trainer.train_step(x, y, F.mse_loss)
        assert model.pending_calls == i + 1
        after = [p.detach().clone() for p in model.parameters()]
        assert all(torch.equal(s, a) for s, a in zip(model.seen[-1], after))  # saw the stepped weights
        assert moved(before, model.seen[-1])


class Decaying(Model):
    """A self-modifying stand-in: its queued update halves ``out.weight``."""

    def apply_pending_updates(self):
        super().apply_pending_updates()
        with torch.no_grad():
            self.out.weight.mul_(0.5)


def test_pending_update_is_applied_to_the_stepped_weight():
    model = Decaying()
    trainer = NestedLearningTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), device="cpu")
    x, y = batches(1)[0]
    probe = copy.deepcopy(model)
    F.mse_loss(probe(x), y).backward()
    trainer.train_step(x, y, F.mse_loss)
    expected = (probe.out.weight - 0.1 * probe.out.weight.grad) * 0.5  # step, then the queued update
    torch.testing.assert_close(model.out.weight, expected, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------- model outputs and metrics


class OwnLoss(nn.Module):
    """Returns (loss, logits, extra...) computed from the batch alone (labels are never passed)."""

    def __init__(self, extra=0):
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Linear(6, 6)
        self.extra = extra

    def forward(self, x):
        logits = self.net(x)
        return (F.mse_loss(logits, x), logits, *[torch.zeros(1)] * self.extra)


def refuse(*args):
    raise AssertionError("loss_fn must not be called when the model returns its own loss")


@pytest.mark.parametrize("extra", [0, 1])
def test_model_returning_its_own_loss(extra):
    model = OwnLoss(extra)
    trainer = NestedLearningTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), device="cpu")
    x = torch.randn(5, 6)
    expected = float(F.mse_loss(model.net(x), x).detach())
    w0 = model.net.weight.detach().clone()
    metrics = trainer.train_step(x, torch.zeros(5), refuse)
    assert metrics == {"loss": pytest.approx(expected, rel=1e-6), "step": 1}
    assert not torch.equal(w0, model.net.weight)
    # evaluation takes the model's loss too, and scores output[1] (6 classes) against the labels
    labels = model.net(x).argmax(-1).detach()
    result = trainer.evaluate([(x, labels)], refuse)
    assert result["eval_accuracy"] == 1.0 and result["eval_samples"] == 5
    assert result["eval_loss"] == pytest.approx(float(F.mse_loss(model.net(x), x).detach()), rel=1e-6)


class LogitsAndState(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.net = nn.Linear(6, 3)

    def forward(self, x):
        return self.net(x), torch.ones(7, 7)


def test_tuple_output_without_scalar_loss_goes_through_loss_fn():
    model = LogitsAndState()
    trainer = NestedLearningTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), device="cpu")
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    expected = float(F.cross_entropy(model.net(x), y).detach())
    assert trainer.train_step(x, y, F.cross_entropy)["loss"] == pytest.approx(expected, rel=1e-6)
    result = trainer.evaluate([(x, y)], F.cross_entropy)  # accuracy on output[0], not the [7, 7] extra
    assert result["eval_accuracy"] == float((model.net(x).argmax(-1) == y).float().mean())


def test_returned_metrics_include_deep_momentum_stats():
    model = Model()
    trainer = NestedLearningTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), device="cpu")
    x, y = batches(1)[0]
    assert set(trainer.train_step(x, y, F.mse_loss)) == {"loss", "step"}
    model = Model()
    optimizer = DeepMomentumGD(model.parameters(), lr=0.01)
    trainer = NestedLearningTrainer(model, optimizer, device="cpu")
    for i, (x, y) in enumerate(batches(3)):
        metrics = trainer.train_step(x, y, F.mse_loss)
        assert metrics["step"] == i + 1 and metrics["step_count"] == optimizer.step_count == i + 1
        assert metrics["internal_loss_mode"] == "surrogate" and math.isfinite(metrics["internal_loss"])
        assert metrics["num_params_tracked"] == len(list(model.parameters()))


# ---------------------------------------------------------------------- meta-learning


class MetaSGD(torch.optim.SGD):
    """SGD with a recording ``meta_step``."""

    def __init__(self, params, model, val):
        super().__init__(params, lr=0.05)
        self.model, self.val, self.calls = model, val, []

    def meta_step(self, meta_loss):
        with torch.no_grad():
            expected = sum(float(F.mse_loss(self.model(x), y)) for x, y in self.val[:3]) / 3
        self.calls.append((self.model.trainer_steps(), float(meta_loss.detach()), meta_loss.requires_grad,
                           self.model.training, expected))


class Counting:
    """An iterable that counts the items handed out."""

    def __init__(self, items):
        self.items, self.served = items, 0

    def __iter__(self):
        for item in self.items:
            self.served += 1
            yield item


def meta_setup(enable=True, meta_step=True, meta_val_steps=5):
    model = Model()
    val = batches(5, seed=9)
    opt = MetaSGD(model.parameters(), model, val) if meta_step else torch.optim.SGD(model.parameters(), lr=0.05)
    trainer = NestedLearningTrainer(model, opt, device="cpu", enable_meta_learning=enable, meta_val_steps=meta_val_steps)
    model.trainer_steps = lambda: trainer.step_count
    return model, opt, trainer, val


def test_meta_step_every_meta_val_steps_on_the_mean_of_three_val_batches():
    model, opt, trainer, val = meta_setup()
    loader = Counting(val)
    trainer.train_epoch(batches(7), F.mse_loss, 1, val_dataloader=loader)
    trainer.train_epoch(batches(7, seed=1), F.mse_loss, val_dataloader=loader)  # the count is global
    assert [c[0] for c in opt.calls] == [5, 10]
    assert loader.served == 6  # three batches per meta step
    for _, loss, requires_grad, training, expected in opt.calls:
        assert requires_grad and not training  # a differentiable loss, model in eval mode
        assert loss == pytest.approx(expected, rel=1e-5)
    assert model.training and trainer.epoch_count == 2
    # the reference's positional form train_epoch(loader, loss_fn, val_dataloader) also meta-steps
    trainer.train_epoch(batches(5, seed=2), F.mse_loss, val)
    assert [c[0] for c in opt.calls] == [5, 10, 15] and trainer.epoch_count == 3


def test_meta_learning_is_a_no_op_when_disabled_or_unsupported():
    _, opt, trainer, val = meta_setup(enable=False)
    trainer.train(batches(6), F.mse_loss, 2, val_loader=val)
    assert opt.calls == []
    _, _, trainer, val = meta_setup(meta_step=False, meta_val_steps=1)
    loader = Counting(val)
    trainer.train_epoch(batches(4), F.mse_loss, val_dataloader=loader)
    assert loader.served == 0  # no validation forward without meta_step
    model, opt, trainer, val = meta_setup(meta_val_steps=2)
    trainer.train(batches(4), F.mse_loss, 1, val_loader=val)  # train() hands val_loader to the meta steps
    assert [c[0] for c in opt.calls] == [2, 4]


def test_nested_deep_momentum_meta_learns_through_the_trainer():
    model = Model()
    opt = NestedDeepMomentumGD(model.parameters(), lr=0.01, memory_lr=1e-2)
    trainer = NestedLearningTrainer(model, opt, device="cpu", enable_meta_learning=True, meta_val_steps=2)
    memory0 = [p.detach().clone() for m in opt.get_memory_modules() for p in m.parameters()]
    trainer.train_epoch(batches(4), F.mse_loss, val_dataloader=batches(3, seed=9))
    memory1 = [p.detach().clone() for m in opt.get_memory_modules() for p in m.parameters()]
    assert moved(memory0, memory1)
    assert model.cms.update_counts == [4, 2, 1]
    # without a validation loader nothing is recorded and the memories stay put
    trainer.train_epoch(batches(4, seed=3), F.mse_loss)
    assert not moved(memory1, [p.detach() for m in opt.get_memory_modules() for p in m.parameters()])


# ---------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name", ["adam (fused)", "dmgd (fallback)"])
def test_resume_mid_window_is_bit_identical(name, tmp_path):
    data = batches(9)
    straight = Model()
    t0 = NestedLearningTrainer(straight, make_optimizer(name, straight.parameters()), device="cpu")
    for x, y in data:
        t0.train_step(x, y, F.mse_loss)
    first = Model()
    t1 = NestedLearningTrainer(first, make_optimizer(name, first.parameters()), device="cpu")
    for x, y in data[:6]:  # levels 1 and 2 hold open windows
        t1.train_step(x, y, F.mse_loss)
    torch.save(t1.state_dict(), tmp_path / "ckpt.pt")
    resumed = Model(seed=7)
    t2 = NestedLearningTrainer(resumed, make_optimizer(name, resumed.parameters()), device="cpu")
    t2.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=False))
    assert t2.step_count == 6 and resumed.cms.accumulated_counts == first.cms.accumulated_counts == [0, 1, 1]
    for x, y in data[6:]:
        t2.train_step(x, y, F.mse_loss)
    assert t2.step_count == 9
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), k
    assert straight.cms.update_counts == resumed.cms.update_counts == [9, 5, 3]


# ---------------------------------------------------------------------- evaluation and loops


def test_evaluate_weighted_loss_and_accuracy():
    torch.manual_seed(3)
    model = nn.Linear(4, 3)
    trainer = NestedLearningTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), device="cpu")
    xs = [torch.randn(3, 4), torch.randn(5, 4)]
    ys = [torch.randint(0, 3, (3,)), torch.randint(0, 3, (5,))]
    w0 = model.weight.detach().clone()
    result = trainer.evaluate(list(zip(xs, ys)), F.cross_entropy)
    with torch.no_grad():
        losses = [float(F.cross_entropy(model(x), y)) for x, y in zip(xs, ys)]
        correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in zip(xs, ys))
    assert result["eval_loss"] == pytest.approx((3 * losses[0] + 5 * losses[1]) / 8, rel=1e-6)
    assert result["eval_samples"] == 8 and result["eval_accuracy"] == correct / 8
    assert torch.equal(w0, model.weight)
    # one-hot labels are scored by argmax; nothing right still reports 0.0
    onehot = F.one_hot(ys[0], 3).float()
    assert trainer.evaluate([(xs[0], onehot)], F.cross_entropy)["eval_accuracy"] == result_for(model, xs[0], ys[0])
    wrong = (model(xs[0]).argmax(-1) + 1) % 3
    assert trainer.evaluate([(xs[0], wrong)], F.cross_entropy)["eval_accuracy"] == 0.0
    # regression outputs (last dim 1) report no accuracy
    reg = nn.Linear(4, 1)
    assert "eval_accuracy" not in NestedLearningTrainer(reg, torch.optim.SGD(reg.parameters(), lr=0.1), device="cpu").evaluate(
        [(xs[0], torch.randn(3, 1))], F.mse_loss)


def result_for(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def test_evaluate_sequence_accuracy_is_per_prediction_and_drops_pending_updates():
    model = Model()
    model.cleared = 0
    model.clear_pending_updates = lambda: setattr(model, "cleared", model.cleared + 1)
    trainer = NestedLearningTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), device="cpu")
    data = batches(3, classes=True)  # logits [4, 3, 2], labels [4, 3]

    def ce(logits, y):
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    result = trainer.evaluate(data, ce)
    with torch.no_grad():
        correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in data)
    assert result["eval_accuracy"] == correct / 36 and 0.0 <= result["eval_accuracy"] <= 1.0
    assert result["eval_samples"] == 12 and model.cleared == 1 and model.pending_calls == 0


def test_train_history_and_best_checkpoint(tmp_path, capsys):
    model = Model()
    trainer = NestedLearningTrainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), device="cpu")
    train, val = batches(4), batches(2, seed=5)
    path = tmp_path / "best.pt"
    history = trainer.train(train, F.mse_loss, num_epochs=3, val_loader=val, log_every=2, save_path=str(path))
    assert [h["epoch"] for h in history] == [1, 2, 3] and history[-1]["total_steps"] == 12
    assert {"train_loss", "eval_loss", "eval_samples"} <= set(history[-1])
    assert trainer.metrics_history[-1]["train_loss"] == history[-1]["train_loss"]
    out = capsys.readouterr().out
    assert "Epoch 2/3" in out and "Epoch 1/3" not in out
    ckpt = torch.load(path, weights_only=False)
    best = min(range(3), key=lambda i: history[i]["eval_loss"])
    assert ckpt["epoch"] == best and ckpt["metrics"]["eval_loss"] == history[best]["eval_loss"]
    fresh = Model(seed=4)
    t2 = NestedLearningTrainer(fresh, torch.optim.Adam(fresh.parameters(), lr=1e-2), device="cpu")
    t2.load_state_dict(ckpt)
    assert t2.step_count == 4 * (best + 1) and t2.epoch_count == best + 1
    # without a validation loader the last epoch is written
    path2 = tmp_path / "last.pt"
    trainer.train(train, F.mse_loss, num_epochs=2, save_path=str(path2))
    assert torch.load(path2, weights_only=False)["step_count"] == 20


# ---------------------------------------------------------------------- setup helper


def test_create_nested_learning_setup_trains_a_hope_model():
    from nested_learning.models import HOPE

    model = HOPE(dim=16, n_layers=1, n_heads=2, vocab_size=11, max_seq_len=16, dropout=0.0,
                 chunk_sizes=[1, 2], cms_in_context=False, mixer="attention")
    same, optimizer, trainer = create_nested_learning_setup(model, lr=1e-2, device="cpu")
    assert same is model and isinstance(optimizer, DeepMomentumGD) and optimizer.shared_memory is not None
    assert trainer.optimizer is optimizer and trainer.device == torch.device("cpu") and trainer.cms_modules
    name, cms = next(iter(trainer.cms_modules.items()))
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 11, (2, 8), generator=gen) for _ in range(3)]

    def lm_loss(logits, y):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), y[:, 1:].flatten())

    pending = [m for m in model.modules() if hasattr(m, "num_pending_updates")]
    assert pending
    for step, x in enumerate(ids):
        before = levels_of(cms)
        metrics = trainer.train_step(x, x, lm_loss)
        assert math.isfinite(metrics["loss"]) and metrics["step_count"] == step + 1
        assert moved(before[1], levels_of(cms)[1]) == (step % 2 == 0)
        assert all(m.num_pending_updates == 0 for m in pending)  # applied after every step
    assert trainer.get_cms_update_stats()[name]["updates_per_level"] == [3, 2]


def levels_of(cms):
    return [[p.detach().clone() for p in cms.level_parameters(i)] for i in range(cms.num_levels)]


# ---------------------------------------------------------------------- argument errors


def test_bad_arguments_name_the_argument():
    model = Model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        NestedLearningTrainer(object(), sgd)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        NestedLearningTrainer(model, object())
    with pytest.raises(ValueError, match="meta_val_steps must be an integer >= 1"):
        NestedLearningTrainer(model, sgd, device="cpu", meta_val_steps=0)
    with pytest.raises(TypeError, match="enable_meta_learning must be a bool"):
        NestedLearningTrainer(model, sgd, device="cpu", enable_meta_learning="yes")
    with pytest.raises(TypeError, match="enable_cms_multifreq must be a bool"):
        NestedLearningTrainer(model, sgd, device="cpu", enable_cms_multifreq=1)
    with pytest.raises(ValueError, match="device"):
        NestedLearningTrainer(model, sgd, device="warp-drive")
    with pytest.raises(ValueError, match="optimizer does not hold the parameters of cms level"):
        NestedLearningTrainer(model, torch.optim.SGD(model.out.parameters(), lr=0.1), device="cpu")
    NestedLearningTrainer(model, torch.optim.SGD(model.out.parameters(), lr=0.1), device="cpu", enable_cms_multifreq=False)
    trainer = NestedLearningTrainer(model, sgd, device="cpu")
    x, y = batches(1)[0]
    with pytest.raises(TypeError, match="batch must be a Tensor"):
        trainer.train_step([x], y, F.mse_loss)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        trainer.train_step(x, y, "mse")
    with pytest.raises(ValueError, match="loss_fn must return a single-element Tensor"):
        trainer.train_step(x, y, lambda o, t: (o - t) ** 2)
    with pytest.raises(TypeError, match="epoch must be an integer or None"):
        trainer.train_epoch(batches(1), F.mse_loss, True)
    with pytest.raises(ValueError, match="dataloader yielded no batches"):
        trainer.train_epoch([], F.mse_loss)
    with pytest.raises(ValueError, match="num_epochs must be an integer >= 1"):
        trainer.train(batches(1), F.mse_loss, 0)
    with pytest.raises(ValueError, match="log_every must be an integer >= 1"):
        trainer.train(batches(1), F.mse_loss, 1, log_every=0)
    with pytest.raises(ValueError, match="state is missing"):
        trainer.load_state_dict({"step_count": 3})
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        create_nested_learning_setup("model")
    with pytest.raises(ValueError, match="^lr must"):
        create_nested_learning_setup(Model(), lr=-1.0, device="cpu")
    with pytest.raises(ValueError, match="momentum"):
        create_nested_learning_setup(Model(), momentum=1.0, device="cpu")
    assert trainer.step_count == 0  # nothing was stepped by the failed calls
