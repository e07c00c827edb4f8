"""DeepMomentumGD: the reference library's step (written out with its modules) on tensors that
fit a bucket, every coordinate through the memory on larger ones, fused = batched = per-tensor
paths, checkpoints, schedulers, closures, bad hyper-parameters, and that it trains."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from nested_learning import ops
from nested_learning.optimizers.deep_momentum import DeepMomentumGD, FactorizedMemoryMLP, MemoryMLP, SharedMemoryPool

CPU = torch.device("cpu")
FUSED_BACKENDS = [b for b in ("reference", "cpp") if ops.available(b, CPU)[0]]


def _model(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3)).to(dtype)


def _data(seed: int = 1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(32, 6, generator=gen).to(dtype), torch.randn(32, 3, generator=gen).to(dtype)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> list[float]:
    x, y = _data(seed, next(model.parameters()).dtype)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().double() for p in model.parameters()])


def _reference_library_step(params, pool: SharedMemoryPool, adam, momenta, history, lr, momentum):
    """The reference library's DeepMomentumGD step (surrogate loss, shared pool), for tensors of
    at most one bucket, written with its modules and autograd."""
    outputs, losses = [], []
    for p in params:
        g, m = p.grad.flatten(), momenta[id(p)].flatten()
        n = g.numel()
        size = pool.get_bucket(n)
        pad = lambda t: torch.cat([t, t.new_zeros(size - n)]).unsqueeze(0)  # noqa: E731
        o = pool.memories[str(size)](pad(g), pad(m)).squeeze(0)[:n]
        loss = 0.1 * (o.norm() / g.norm() - 1).pow(2) + 1 - torch.nn.functional.cosine_similarity(o, g, dim=0)
        if id(p) in history:
            loss = loss + 0.1 * (o - history[id(p)]).pow(2).mean()
        outputs.append(o.detach())
        losses.append(loss)
    adam.zero_grad()
    torch.stack(losses).mean().backward()
    nn.utils.clip_grad_norm_(pool.parameters(), 1.0)
    adam.step()
    with torch.no_grad():
        for p, o in zip(params, outputs):
            momenta[id(p)].mul_(momentum).add_(o.view_as(p))
            p.sub_(lr * momenta[id(p)])
            history[id(p)] = o


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_equals_the_reference_library_step_on_tensors_within_a_bucket(backend):
    """Every tensor ≤ 64 elements: one padded block each, which is the reference library's case."""
    model, twin = _model(), _model()
    torch.manual_seed(5)
    opt = DeepMomentumGD(model.parameters(), lr=0.1, momentum=0.9, memory_lr=1e-3, bucket_sizes=[64])
    pool = copy.deepcopy(opt.shared_memory)
    adam = torch.optim.Adam(pool.parameters(), lr=1e-3)
    momenta = {id(p): torch.zeros_like(p) for p in twin.parameters()}
    history: dict[int, torch.Tensor] = {}
    x, y = _data()
    with ops.use_backend(backend):
        for _ in range(5):
            for net in (model, twin):
                net.zero_grad()
                (net(x) - y).pow(2).mean().backward()
            opt.step()
            _reference_library_step(list(twin.parameters()), pool, adam, momenta, history, 0.1, 0.9)
    torch.testing.assert_close(_flat(model), _flat(twin), rtol=1e-5, atol=1e-6)
    for a, b in zip(opt.shared_memory.parameters(), pool.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_hand_computed_first_step_and_memory_update_frequency():
    """Step 0: W ← W − lr·o with o = Mem(blocks of [g; 0]) — every coordinate of a 300-element
    tensor, past the 256 bucket too; the memory moves at steps 0, 2 but not 1 (freq 2)."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(300, dtype=torch.float64))
    opt = DeepMomentumGD([w], lr=0.5, momentum=0.9, bucket_sizes=[64, 256], memory_update_freq=2, memory_lr=1e-2)
    memory = opt.shared_memory.memories["256"]
    start_memory = copy.deepcopy(memory)
    g = torch.randn(300, dtype=torch.float64)
    w.grad = g.clone()
    start = w.detach().clone()
    opt.step()
    blocks = torch.cat([g, g.new_zeros(212)]).reshape(2, 256)
    o = start_memory(blocks, torch.zeros_like(blocks)).detach().flatten()[:300]
    torch.testing.assert_close(w.detach(), start - 0.5 * o, rtol=1e-12, atol=1e-15)
    moved = [not torch.equal(a, b) for a, b in zip(memory.parameters(), start_memory.parameters())]
    assert any(moved)
    snapshot = copy.deepcopy(memory)
    w.grad = torch.randn_like(g)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(memory.parameters(), snapshot.parameters()))
    w.grad = torch.randn_like(g)
    opt.step()
    assert not all(torch.equal(a, b) for a, b in zip(memory.parameters(), snapshot.parameters()))
    assert opt.get_internal_loss_stats()["step_count"] == 3


@pytest.mark.parametrize("loss", ["surrogate", "l2_regression", "dot"])
def test_fused_batched_and_per_tensor_paths_agree(loss):
    """In float64: Adam on the memory turns rounding-level gradient differences into lr-sized ones."""
    results = []
    for kw in (dict(fused=True), dict(fused=False, foreach=True), dict(fused=False, foreach=False)):
        model = _model(3, torch.float64)
        torch.manual_seed(7)
        opt = DeepMomentumGD(model.parameters(), lr=0.05, internal_loss_mode=loss, weight_decay=0.01, memory_lr=1e-3,
                             bucket_sizes=[16, 64], **kw)
        _train(model, opt, 4)
        results.append((_flat(model), torch.cat([p.detach().flatten() for p in opt.shared_memory.parameters()])))
    for params, memory in results[1:]:
        torch.testing.assert_close(params, results[0][0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(memory, results[0][1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kwargs", [dict(use_shared_memory=False), dict(use_factorized_memory=True, bucket_sizes=[16, 1024]),
                                    dict(memory_depth=3, bucket_sizes=[16, 64])], ids=["individual", "factorized", "depth3"])
def test_other_memories_train(kwargs):
    """Per-tensor memories (fused, one call each); factorized and deeper memories (PyTorch path)."""
    model = _model(4)
    opt = DeepMomentumGD(model.parameters(), lr=0.2, memory_lr=1e-3, **kwargs)
    assert opt.fused == ("use_shared_memory" in kwargs)
    before = [copy.deepcopy(m.state_dict()) for m in opt._memories()]
    start = _flat(model)
    _train(model, opt, 3)
    assert not torch.equal(start, _flat(model))
    assert any(not torch.equal(v, before[i][k]) for i, m in enumerate(opt._memories()) for k, v in m.state_dict().items())
    if "use_shared_memory" in kwargs:
        assert len(opt.get_memory_modules()) == 4
        return
    if "use_factorized_memory" in kwargs:
        assert isinstance(opt.shared_memory.memories["1024"], FactorizedMemoryMLP)
    with pytest.raises(ValueError, match="fused=True needs the default memory"):
        DeepMomentumGD(_model().parameters(), fused=True, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", ["surrogate", "l2_regression"])
def test_resume_is_bit_identical(loss, dtype):
    def make():
        model = _model(6, dtype)
        torch.manual_seed(8)
        return model, DeepMomentumGD(model.parameters(), lr=0.05, internal_loss_mode=loss, memory_lr=1e-3,
                                     bucket_sizes=[16, 64], memory_update_freq=2)

    straight, opt = make()
    _train(straight, opt, 6)
    first, opt1 = make()
    _train(first, opt1, 3)
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(opt1.state_dict())
    resumed, opt2 = make()
    torch.manual_seed(99)  # a different memory initialisation, overwritten by the checkpoint
    resumed.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    assert opt2.step_count == 3
    assert opt2.state[next(resumed.parameters())]["momentum_buffer"].dtype == torch.float32
    _train(resumed, opt2, 3)
    assert torch.equal(_flat(straight), _flat(resumed))


def test_param_groups_scheduler_and_closure():
    model = _model(9)
    opt = DeepMomentumGD([{"params": model[0].parameters(), "lr": 0.0}, {"params": model[2].parameters()}], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    x, y = _data()

    def closure():
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss

    moves = []
    for _ in range(3):
        before = model[2].weight.detach().clone()
        assert isinstance(opt.step(closure), torch.Tensor)
        moves.append(opt.state[model[2].weight]["momentum_buffer"].norm().item())
        sched.step()
        assert not torch.equal(before, model[2].weight)
    assert all(torch.equal(a, b) for a, b in zip(frozen, model[0].parameters()))
    assert opt.param_groups[1]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_compiled_train_step_matches_eager():
    def run(compiled: bool):
        model = _model(10)
        torch.manual_seed(11)
        opt = DeepMomentumGD(model.parameters(), lr=0.1, bucket_sizes=[16, 64])
        x, y = _data()

        def train_step():
            opt.zero_grad()
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            opt.step()
            return loss

        fn = torch.compile(train_step) if compiled else train_step
        for _ in range(3):
            fn()
        return _flat(model)

    torch.testing.assert_close(run(True), run(False), rtol=1e-5, atol=1e-6)


def test_trains_a_small_regression_and_records_the_comparison_with_sgd_momentum():
    """DMGD decreases the loss steadily; at equal lr it trails SGD-momentum, because a fresh memory
    outputs ~1e-3·g and the surrogate loss can at best teach it to reproduce g (documented)."""
    model = _model(12)
    opt = DeepMomentumGD(model.parameters(), lr=0.05, momentum=0.9, bucket_sizes=[16, 64])
    losses = _train(model, opt, 150)
    sgd_model = _model(12)
    sgd = _train(sgd_model, torch.optim.SGD(sgd_model.parameters(), lr=0.05, momentum=0.9), 150)
    assert losses[-1] < 0.8 * losses[0]
    assert sgd[-1] < losses[-1]


BAD = [
    (dict(lr=-1.0), "lr must lie in"),
    (dict(momentum=1.0), "momentum must lie in"),
    (dict(weight_decay=float("nan")), "weight_decay must be a finite number"),
    (dict(memory_lr=-1e-3), "memory_lr must lie in"),
    (dict(memory_update_freq=0), "memory_update_freq must be an integer >= 1"),
    (dict(memory_hidden_dim=0), "memory_hidden_dim must be an integer >= 1"),
    (dict(internal_loss_mode="cosine"), "internal_loss_mode must be one of"),
    (dict(bucket_sizes=[0, 64]), "bucket_sizes must be a non-empty list of positive integers"),
    (dict(l2_projection_lr=-0.1), "l2_projection_lr must lie in"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m for _, m in BAD])
def test_bad_hyper_parameters_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        DeepMomentumGD(_model().parameters(), **kwargs)


def test_bad_param_group_and_mixed_placement_are_rejected():
    model = _model()
    with pytest.raises(ValueError, match="lr must lie in"):
        DeepMomentumGD([{"params": model[0].parameters(), "lr": -1.0}])
    mixed = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3, dtype=torch.float64))]
    with pytest.raises(ValueError, match="params must share one device"):
        DeepMomentumGD(mixed)


def test_memory_modules_match_the_reference_library_layout():
    mem = MemoryMLP(64)
    assert [k for k in mem.state_dict()] == ["network.0.weight", "network.0.bias", "network.1.weight",
                                            "network.1.bias", "network.3.weight", "network.3.bias"]
    assert mem(torch.randn(5, 64), torch.randn(5, 64)).shape == (5, 64)
    pool = SharedMemoryPool()
    assert pool.get_bucket(1) == 64 and pool.get_bucket(65) == 256 and pool.get_bucket(10**6) == 4096
    g = torch.randn(5000)
    assert pool(g, torch.zeros_like(g), 5000).shape == (5000,)
