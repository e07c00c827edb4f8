"""SimpleMomentumGD, and the torch.optim contract of every optimizer built on the shared shell
(``TensorOptimizer``): foreach == single-tensor, bit-identical resume from a state dict, LR
schedulers, closures, skipped ``None`` gradients, rejected sparse gradients."""

from __future__ import annotations

import io
from typing import Callable

import pytest
import torch

from nested_learning.optimizers.delta_rule import DeltaRuleMomentum, OjaRuleMomentum
from nested_learning.optimizers.m3 import M3
from nested_learning.optimizers.muon import Muon
from nested_learning.optimizers.preconditioned import AdaptivePreconditionedMomentum, PreconditionedMomentum
from nested_learning.optimizers.simple_momentum import SimpleMomentumGD

SHAPES = [(3, 4), (3, 4), (5, 2), (3,)]  # two same-shape matrices (one NS batch), a tall one, a vector
MATRIX_ONLY = {"Muon"}

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "SimpleMomentumGD": lambda p, **kw: SimpleMomentumGD(p, lr=0.05, weight_decay=0.01, **kw),
    "DeltaRuleMomentum": lambda p, **kw: DeltaRuleMomentum(p, lr=0.05, momentum=0.5, weight_decay=0.01, **kw),
    "DeltaRuleMomentum-precondition": lambda p, **kw: DeltaRuleMomentum(p, lr=0.01, precondition=True, **kw),
    "OjaRuleMomentum": lambda p, **kw: OjaRuleMomentum(p, lr=0.05, weight_decay=0.01, **kw),
    "PreconditionedMomentum-diagonal": lambda p, **kw: PreconditionedMomentum(p, lr=1e-3, **kw),
    "PreconditionedMomentum-adam": lambda p, **kw: PreconditionedMomentum(p, lr=1e-3, precondition_type="adam", **kw),
    "PreconditionedMomentum-none": lambda p, **kw: PreconditionedMomentum(p, lr=0.05, precondition_type="none", **kw),
    "AdaptivePreconditionedMomentum": lambda p, **kw: AdaptivePreconditionedMomentum(p, lr=0.01, **kw),
    "Muon": lambda p, **kw: Muon(p, lr=0.02, **kw),
    "M3": lambda p, **kw: M3(p, lr=0.01, slow_chunk=2, weight_decay=0.01, **kw),
}


def make_params(name: str, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [s for s in SHAPES if len(s) == 2] if name in MATRIX_ONLY else SHAPES
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def loss_of(params: list[torch.Tensor]) -> torch.Tensor:
    """A smooth loss whose gradients depend on the parameters (so trajectories can drift apart)."""
    return sum(((p - 0.5) ** 2).sum() + 0.3 * torch.sin(2 * p).sum() for p in params)


def train(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int, schedule=None) -> None:
    for _ in range(steps):
        opt.zero_grad()
        loss_of(params).backward()
        opt.step()
        if schedule is not None:
            schedule.step()


def clone_params(params: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def assert_all_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_foreach_and_single_tensor_paths_agree_bitwise(name):
    runs = []
    for foreach in (False, True):
        params = make_params(name)
        train(OPTIMIZERS[name](params, foreach=foreach), params, 5)
        runs.append(params)
    assert_all_equal(*runs)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_resume_from_state_dict_is_bit_identical(name):
    straight = make_params(name)
    train(OPTIMIZERS[name](straight), straight, 6)

    first = make_params(name)
    opt = OPTIMIZERS[name](first)
    train(opt, first, 3)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = clone_params(saved["params"])
    opt = OPTIMIZERS[name](resumed)
    opt.load_state_dict(saved["optim"])
    train(opt, resumed, 3)
    assert_all_equal(straight, resumed)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_lr_scheduler_drives_the_step(name):
    scheduled = make_params(name)
    opt = OPTIMIZERS[name](scheduled)
    train(opt, scheduled, 4, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1))

    by_hand = make_params(name)
    opt = OPTIMIZERS[name](by_hand)
    base = opt.param_groups[0]["lr"]
    for step in range(4):
        opt.param_groups[0]["lr"] = base * 0.1 ** (step // 2)
        train(opt, by_hand, 1)
    assert_all_equal(scheduled, by_hand)

    constant = make_params(name)
    train(OPTIMIZERS[name](constant), constant, 4)
    assert any(not torch.equal(a, b) for a, b in zip(scheduled, constant))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_closure_none_grads_and_sparse_grads(name):
    params = make_params(name)
    frozen = params[-1]
    opt = OPTIMIZERS[name](params)

    seen = []

    def closure():
        opt.zero_grad()
        loss = loss_of(params[:-1])
        loss.backward()
        seen.append(loss)
        return loss

    before = frozen.detach().clone()
    assert opt.step(closure) is seen[0]
    assert params[0].grad is not None and frozen.grad is None
    assert torch.equal(frozen, before) and len(opt.state[frozen]) == 0
    assert len(opt.state[params[0]]) > 0

    frozen.grad = torch.zeros_like(frozen).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bad_hyper_parameter_in_added_group_is_rejected(name):
    opt = OPTIMIZERS[name](make_params(name))
    extra = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [extra], "lr": -1.0})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert opt.param_groups[1]["lr"] == 0.5


def test_equals_torch_sgd_bitwise():
    for foreach in (False, True):
        ours, theirs = make_params("SimpleMomentumGD"), make_params("SimpleMomentumGD")
        groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.02, "weight_decay": 0.0}]
        train(SimpleMomentumGD(groups(ours), lr=0.05, momentum=0.8, weight_decay=0.01, foreach=foreach), ours, 5)
        sgd = torch.optim.SGD(groups(theirs), lr=0.05, momentum=0.8, weight_decay=0.01, foreach=foreach)
        train(sgd, theirs, 5)
        assert_all_equal(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fused_equals_torch_fused_sgd_bitwise(dtype):
    ours = [torch.nn.Parameter(p.detach().to(dtype)) for p in make_params("SimpleMomentumGD")]
    theirs = clone_params(ours)
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.02, "weight_decay": 0.0}]
    opt = SimpleMomentumGD(groups(ours), lr=0.05, momentum=0.8, weight_decay=0.01, fused=True)
    train(opt, ours, 5)
    train(torch.optim.SGD(groups(theirs), lr=0.05, momentum=0.8, weight_decay=0.01, fused=True), theirs, 5)
    assert_all_equal(ours, theirs)
    unfused = clone_params(make_params("SimpleMomentumGD"))
    train(SimpleMomentumGD(groups(unfused), lr=0.05, momentum=0.8, weight_decay=0.01), unfused, 5)
    for a, b in zip(ours, unfused):  # the same rule, rounded once per step instead of per operation
        torch.testing.assert_close(a.float(), b, **({} if dtype != torch.bfloat16 else dict(rtol=2e-2, atol=2e-2)))


def test_fused_resume_is_bit_identical():
    whole, first = make_params("SimpleMomentumGD"), make_params("SimpleMomentumGD")
    train(SimpleMomentumGD(whole, lr=0.05, fused=True), whole, 6)
    opt = SimpleMomentumGD(first, lr=0.05, fused=True)
    train(opt, first, 3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    second = clone_params(first)
    resumed = SimpleMomentumGD(second, lr=0.05, fused=True)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    train(resumed, second, 3)
    assert_all_equal(whole, second)


def test_fused_rejects_integer_parameters_before_moving_anything():
    w, n = torch.nn.Parameter(torch.ones(2)), torch.ones(2, dtype=torch.int64)
    w.grad = torch.ones(2)
    opt = SimpleMomentumGD([w], lr=0.1, fused=True)
    opt.param_groups[0]["params"].append(n)
    n.grad = torch.ones(2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="floating-point parameters, got torch.int64"):
        opt.step()
    assert torch.equal(w.detach(), torch.ones(2)) and not opt.state


def test_two_steps_by_hand():
    w = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64))
    opt = SimpleMomentumGD([w], lr=0.1, momentum=0.9, weight_decay=0.5)
    w.grad = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    opt.step()  # m = g + λW = [[1.5, 1], [1.5, 3]]
    torch.testing.assert_close(w.detach(), torch.tensor([[0.85, 1.9], [2.85, 3.7]], dtype=torch.float64))
    w.grad = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    opt.step()  # m = 0.9 m + g + λW = [[1.775, 2.85], [3.775, 4.55]]
    torch.testing.assert_close(w.detach(), torch.tensor([[0.6725, 1.615], [2.4725, 3.245]], dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, argument",
    [({"lr": -0.1}, "lr"), ({"momentum": 1.0}, "momentum"), ({"weight_decay": float("nan")}, "weight_decay"),
     ({"lr": "0.1"}, "lr"), ({"foreach": "yes"}, "foreach"), ({"fused": "yes"}, "fused"),
     ({"fused": True, "foreach": True}, "fused and foreach")],
)
def test_bad_hyper_parameters_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        SimpleMomentumGD([torch.nn.Parameter(torch.zeros(2))], **kwargs)


@pytest.mark.slow
def test_compiled_step_matches_eager():
    eager, compiled = make_params("SimpleMomentumGD"), make_params("SimpleMomentumGD")
    opt_e = SimpleMomentumGD(eager, lr=0.05, weight_decay=0.01)
    opt_c = SimpleMomentumGD(compiled, lr=0.05, weight_decay=0.01)
    train(opt_e, eager, 1)
    train(opt_c, compiled, 1)
    step = torch.compile(opt_c.step, fullgraph=True)
    for _ in range(3):
        train(opt_e, eager, 1)
        opt_c.zero_grad()
        loss_of(compiled).backward()
        step()
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
