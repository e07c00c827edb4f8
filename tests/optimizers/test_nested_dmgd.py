"""NestedDeepMomentumGD: the memory module, a step checked by hand, block coverage of odd sizes,
the meta-gradient against an independent float64 computation, meta-training that descends,
bit-identical resume, shared memories, argument checks, and the task distribution."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from nested_learning.optimizers.nested_dmgd import (
    LearnedMemoryModule,
    LinearTask,
    NestedDeepMomentumGD,
    create_meta_learning_task_distribution,
)


@pytest.fixture(autouse=True)
def one_thread():
    """These tests run many tiny ops, for which a thread pool only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blocks(t: torch.Tensor, size: int) -> torch.Tensor:
    """Independent block cut: flatten, zero-pad to a multiple of ``size`` (at least one block)."""
    flat = t.reshape(-1)
    rows = max(1, math.ceil(flat.numel() / size))
    return F.pad(flat, (0, rows * size - flat.numel())).view(rows, size)


def memory_update(memory: nn.Module, g: torch.Tensor, m: torch.Tensor, size: int) -> torch.Tensor:
    """d for one tensor, computed on its own blocks."""
    return memory(blocks(g, size), blocks(m, size)).reshape(-1)[: g.numel()].view(g.shape)


# ---------------------------------------------------------------------- memory module


def test_memory_module_layers_init_and_shapes():
    torch.manual_seed(0)
    mem = LearnedMemoryModule(8, 5, 4, depth=3)
    kinds = [type(m) for m in mem.network]
    assert kinds == [nn.Linear, nn.LayerNorm, nn.ReLU, nn.Linear, nn.LayerNorm, nn.ReLU, nn.Linear]
    for lin in (m for m in mem.network if isinstance(m, nn.Linear)):
        bound = 0.01 * math.sqrt(6 / (lin.in_features + lin.out_features))  # xavier_uniform, gain 0.01
        assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > bound / 2
        assert torch.count_nonzero(lin.bias) == 0
    out = mem(torch.randn(3, 4), torch.randn(3, 4))
    assert out.shape == (3, 4)
    single = LearnedMemoryModule(6, 7, 3, depth=1)
    assert [type(m) for m in single.network] == [nn.Linear]
    assert single(torch.randn(3), torch.randn(3)).shape == (3,)
    with pytest.raises(ValueError, match="depth"):
        LearnedMemoryModule(4, 4, 2, depth=0)


# ---------------------------------------------------------------------- the step


def test_two_steps_by_hand():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt = NestedDeepMomentumGD([w], lr=0.5, momentum=0.9, bucket_sizes=[4], memory_hidden_dim=6)
    mem = opt.memory_modules["4"]
    assert list(opt.memory_modules) == ["4"] and next(mem.parameters()).dtype == torch.float64
    w0 = w.detach().clone()
    g1, g2 = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)

    def pad(v):
        return torch.cat([v, v.new_zeros(1)])

    with torch.no_grad():
        d1 = mem(pad(g1), torch.zeros(4, dtype=torch.float64))[:3]
        c1 = d1
        d2 = mem(pad(g2), pad(c1))[:3]
        c2 = 0.9 * c1 + d2
    w.grad = g1.clone()
    opt.step()
    torch.testing.assert_close(w.detach(), w0 - 0.5 * c1, rtol=0, atol=1e-15)
    w.grad = g2.clone()
    opt.step()
    torch.testing.assert_close(w.detach(), w0 - 0.5 * c1 - 0.5 * c2, rtol=0, atol=1e-15)
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], c2, rtol=0, atol=1e-15)
    assert opt.state[w]["step"] == 2


def test_odd_sizes_update_every_coordinate():
    torch.manual_seed(1)
    shapes = [(), (1,), (70,), (5000,), (3, 5)]  # 0-d, one element, tail block, > largest bucket
    params = [nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    opt = NestedDeepMomentumGD(params, lr=1.0)
    assert sorted(opt.memory_modules, key=int) == ["64", "256", "4096"]
    assert [m is opt.memory_modules[k] for m, k in zip(opt.get_memory_modules(), ["64", "256", "4096"])] == [True] * 3
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p, w0, size in zip(params, before, [64, 64, 256, 4096, 64]):
        with torch.no_grad():
            d = memory_update(opt.memory_modules[str(size)], p.grad, torch.zeros_like(p), size)
        assert bool((p.detach() != w0).all()), f"shape {tuple(p.shape)}: a coordinate did not move"
        torch.testing.assert_close(p.detach(), w0 - d, rtol=1e-12, atol=1e-14)


def test_parameters_without_gradient_are_skipped():
    a, b = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(4))
    opt = NestedDeepMomentumGD([a, b], lr=1.0)
    a.grad = torch.ones(4)
    opt.step()
    assert not torch.equal(a.detach(), torch.ones(4)) and torch.equal(b.detach(), torch.ones(4))
    assert b not in opt.state


# ---------------------------------------------------------------------- meta-gradient


def test_meta_gradient_matches_independent_float64_computation():
    """compute_meta_gradients = ∇_θ meta(W_K(θ)) with the recorded gradients held fixed, where
    W_K(θ) is recomputed here from scratch (per-tensor forwards, two param groups)."""
    torch.manual_seed(0)
    dt = torch.float64
    a = nn.Parameter(torch.randn(2, 3, dtype=dt))  # 6 elements: two blocks of 4, the second padded
    b = nn.Parameter(torch.randn((), dtype=dt))  # 0-d
    groups = [{"params": [a], "lr": 0.3, "momentum": 0.7}, {"params": [b], "lr": 0.2, "momentum": 0.5}]
    opt = NestedDeepMomentumGD(groups, bucket_sizes=[4], memory_hidden_dim=5)
    mem = opt.memory_modules["4"]
    with torch.no_grad():  # a memory whose steps are not tiny, so the steps interact
        for p in mem.parameters():
            p.mul_(40.0) if p.dim() > 1 else p.add_(0.1 * torch.randn_like(p))
    x, y = torch.randn(5, 3, dtype=dt), torch.randn(5, 2, dtype=dt)
    xv, yv = torch.randn(5, 3, dtype=dt), torch.randn(5, 2, dtype=dt)

    def loss_fn(a_, b_, x_, y_):
        return ((torch.tanh(x_ @ a_.T) + b_ - y_) ** 2).mean() + 0.1 * b_ ** 4

    w0 = [a.detach().clone(), b.detach().clone()]
    grads = []
    for _ in range(3):
        opt.zero_grad()
        loss_fn(a, b, x, y).backward()
        grads.append([a.grad.clone(), b.grad.clone()])
        opt.step(create_graph=True)
    opt.compute_meta_gradients(loss_fn(a, b, xv, yv))
    got = {n: p.grad.clone() for n, p in mem.named_parameters()}

    theta0 = {n: p.detach().clone() for n, p in mem.named_parameters()}
    hyper = [(0.3, 0.7), (0.2, 0.5)]

    def meta_of(theta):
        w, m = list(w0), [torch.zeros_like(v) for v in w0]
        for g_t in grads:
            for i, (lr, mu) in enumerate(hyper):
                d = functional_call(mem, theta, (blocks(g_t[i], 4), blocks(m[i], 4))).reshape(-1)[: w[i].numel()]
                m[i] = mu * m[i] + d.view(w[i].shape)
                w[i] = w[i] - lr * m[i]
        return loss_fn(w[0], w[1], xv, yv), w

    theta = {n: t.clone().requires_grad_() for n, t in theta0.items()}
    meta, w_k = meta_of(theta)
    torch.testing.assert_close(w_k[0].detach(), a.detach(), rtol=0, atol=1e-13)  # same trajectory
    torch.testing.assert_close(w_k[1].detach(), b.detach(), rtol=0, atol=1e-13)
    want = dict(zip(theta, torch.autograd.grad(meta, list(theta.values()))))
    assert max(v.abs().max().item() for v in want.values()) > 1e-3  # a real signal
    for n, value in want.items():
        torch.testing.assert_close(got[n], value, rtol=1e-9, atol=1e-12)
    gen = torch.Generator().manual_seed(0)
    for n in ("network.0.weight", "network.3.weight", "network.3.bias", "network.1.weight"):
        idx = tuple(torch.randint(0, s, (1,), generator=gen).item() for s in theta0[n].shape)
        bumped = []
        for sign in (1.0, -1.0):
            th = {k: v.clone() for k, v in theta0.items()}
            th[n][idx] += sign * 1e-6
            bumped.append(meta_of(th)[0].item())
        fd = (bumped[0] - bumped[1]) / 2e-6
        assert fd == pytest.approx(got[n][idx].item(), rel=1e-5, abs=1e-9), n


def test_per_tensor_path_equals_the_batched_one():
    """foreach=False runs the memory once per tensor: same trajectory and meta-gradient in float64."""
    results = []
    for foreach in (True, False):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in [(3, 5), (7,), (2, 2), ()]]
        opt = NestedDeepMomentumGD(params, lr=0.2, bucket_sizes=[4, 16], memory_hidden_dim=6, foreach=foreach)
        with torch.no_grad():
            for p in opt.memory_modules.parameters():
                p.mul_(30.0)
        calls = []
        for memory in opt.memory_modules.values():
            memory.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
        for _ in range(3):
            opt.zero_grad()
            sum(((p - 1) ** 2).sum() for p in params).backward()
            opt.step(create_graph=True)
        opt.compute_meta_gradients(sum((p ** 2).sum() for p in params))
        results.append(([p.detach() for p in params], [p.grad for p in opt.memory_modules.parameters()]))
        # blocks per memory call in one step: bucket 4 holds (2, 2) and (), bucket 16 the rest
        assert sorted(calls[: len(calls) // 3]) == ([1, 1, 1, 1] if not foreach else [2, 2])
    (w_a, g_a), (w_b, g_b) = results
    assert max(g.abs().max().item() for g in g_a) > 1e-3
    for x, y in zip(w_a + g_a, w_b + g_b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_recording_rules():
    w = nn.Parameter(torch.randn(5))
    opt = NestedDeepMomentumGD([w], lr=0.1)
    with pytest.raises(RuntimeError, match="create_graph"):
        opt.meta_step(w.sum())
    w.grad = torch.ones(5)
    opt.step(create_graph=True)
    opt.step()  # a step without create_graph ends the recording
    with pytest.raises(RuntimeError, match="create_graph"):
        opt.compute_meta_gradients(w.sum())
    opt.step(create_graph=True)
    memory_before = [p.detach().clone() for p in opt.memory_modules["64"].parameters()]
    opt.meta_step((w ** 2).sum())
    assert any(not torch.equal(p, q) for p, q in zip(opt.memory_modules["64"].parameters(), memory_before))
    with pytest.raises(RuntimeError):  # the recording was consumed
        opt.meta_step((w ** 2).sum())
    frozen = NestedDeepMomentumGD([w], meta_learning=False)
    assert frozen.memory_optimizer is None
    frozen.step(create_graph=True)
    before = [p.detach().clone() for p in frozen.get_memory_modules()[0].parameters()]
    frozen.meta_step((w ** 2).sum())  # a no-op, as the reference
    assert all(torch.equal(p, q) for p, q in zip(frozen.get_memory_modules()[0].parameters(), before))


def _quadratic_episode(opt_factory, w0, target, steps, create_graph):
    w = nn.Parameter(w0.clone())
    opt = opt_factory([w])
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * ((w - target) ** 2).sum()).backward()
        opt.step(create_graph=create_graph)
    return opt, w, 0.5 * ((w - target) ** 2).sum()


def test_meta_training_descends_on_a_quadratic():
    """Meta-training moves the memory towards d ∝ g (the reference drove cos(d, g) to −1 and
    made the optimizer diverge): the loss after K steps drops and cos(d, g) > 0."""
    torch.manual_seed(0)
    n, steps = 20, 5
    shared = NestedDeepMomentumGD([nn.Parameter(torch.zeros(n))], lr=0.1, memory_lr=1e-2)

    def make(params):
        return NestedDeepMomentumGD(params, lr=0.1, momentum=0.9, memory_modules=shared.memory_modules,
                                    memory_optimizer=shared.memory_optimizer)

    gen = torch.Generator().manual_seed(123)
    evals = [(torch.randn(n, generator=gen), torch.randn(n, generator=gen)) for _ in range(8)]

    def eval_loss():
        return sum(_quadratic_episode(make, w0, t, steps, False)[2].item() for w0, t in evals) / len(evals)

    before = eval_loss()
    for _ in range(150):
        opt, _, meta_loss = _quadratic_episode(make, torch.randn(n), torch.randn(n), steps, True)
        opt.meta_step(meta_loss)
    after = eval_loss()
    assert after < 0.75 * before, (before, after)  # 0.42-0.61 over seeds 0-7
    g = torch.randn(n)
    w = nn.Parameter(torch.zeros(n))
    opt = make([w])
    w.grad = g.clone()
    opt.step()
    d = opt.state[w]["momentum_buffer"]  # c_1 = d_1 (zero initial momentum)
    assert F.cosine_similarity(d, g, dim=0) > 0.4  # 0.66-0.89 over seeds 0-7


# ---------------------------------------------------------------------- state


def _train(model, opt, batches, start):
    for i, (x, y) in enumerate(batches, start):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step(create_graph=True)
        if i % 3 == 2:
            opt.zero_grad()
            opt.meta_step(F.mse_loss(model(x), y))


def test_state_dict_resume_is_bit_identical():
    def make_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 1))

    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 5, generator=gen), torch.randn(8, 1, generator=gen)) for _ in range(12)]
    model = make_model()
    opt = NestedDeepMomentumGD(model.parameters(), lr=0.05, memory_lr=1e-2, bucket_sizes=[16, 64])
    _train(model, opt, batches[:6], 0)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    saved = opt.state_dict()
    assert set(saved["state"]) == set(range(4)) and set(saved["memory_modules"]) == {"16", "64"}
    assert "memory_optimizer" in saved
    _train(model, opt, batches[6:], 6)

    buf.seek(0)
    checkpoint = torch.load(buf)
    resumed_model = make_model()
    with torch.no_grad():
        for p in resumed_model.parameters():
            p.add_(1.0)  # the checkpoint, not the seed, must set everything
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = NestedDeepMomentumGD(resumed_model.parameters(), lr=0.05, memory_lr=1e-2, bucket_sizes=[16, 64])
    resumed.load_state_dict(checkpoint["opt"])
    _train(resumed_model, resumed, batches[6:], 6)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(opt.memory_modules.parameters(), resumed.memory_modules.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="buckets"):
        NestedDeepMomentumGD(resumed_model.parameters(), bucket_sizes=[64]).load_state_dict(copy.deepcopy(saved))


# ---------------------------------------------------------------------- memories and arguments


def test_shared_memory_modules():
    first = NestedDeepMomentumGD([nn.Parameter(torch.zeros(10)), nn.Parameter(torch.zeros(300))])
    second = NestedDeepMomentumGD([nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(1000))],
                                  memory_modules=first.memory_modules, memory_optimizer=first.memory_optimizer)
    assert second.memory_modules is first.memory_modules and second.memory_optimizer is first.memory_optimizer
    inferred = NestedDeepMomentumGD([nn.Parameter(torch.zeros(2000))], memory_modules=first.memory_modules)
    assert inferred.bucket_sizes == (64, 1024)  # the shared memories' sizes
    with pytest.raises(ValueError, match="bucket 4096"):
        NestedDeepMomentumGD([nn.Parameter(torch.zeros(2000))], memory_modules=first.memory_modules,
                             bucket_sizes=[64, 1024, 4096])
    with pytest.raises(TypeError, match="memory_modules"):
        NestedDeepMomentumGD([nn.Parameter(torch.zeros(3))], memory_modules=list(first.memory_modules.values()))
    with pytest.raises(ValueError, match="memory_optimizer"):
        NestedDeepMomentumGD([nn.Parameter(torch.zeros(3))],
                             memory_optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(1))]))
    sgd = NestedDeepMomentumGD([nn.Parameter(torch.zeros(3))], memory_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    assert isinstance(sgd.memory_optimizer, torch.optim.SGD)
    grown = NestedDeepMomentumGD([nn.Parameter(torch.zeros(3))])
    grown.add_param_group({"params": [nn.Parameter(torch.zeros(1000))], "lr": 0.1})
    assert sorted(grown.memory_modules, key=int) == ["64", "1024"]
    held = {p for g in grown.memory_optimizer.param_groups for p in g["params"]}
    assert all(p in held for p in grown.memory_modules.parameters())


@pytest.mark.parametrize("kwargs, name", [
    ({"lr": -1.0}, "lr"),
    ({"momentum": 1.0}, "momentum"),
    ({"momentum": float("nan")}, "momentum"),
    ({"memory_lr": -1e-3}, "memory_lr"),
    ({"memory_depth": 0}, "memory_depth"),
    ({"memory_hidden_dim": 2.5}, "memory_hidden_dim"),
    ({"bucket_sizes": [0, 8]}, "bucket_sizes"),
    ({"foreach": "yes"}, "foreach"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        NestedDeepMomentumGD([nn.Parameter(torch.zeros(3))], **kwargs)


# ---------------------------------------------------------------------- tasks


def test_task_distribution_is_distinct_and_seedable():
    tasks = create_meta_learning_task_distribution(num_tasks=6, input_dim=4, output_dim=2, seed=3)
    assert len(tasks) == 6 and all(isinstance(t, LinearTask) for t in tasks)
    assert not torch.equal(tasks[0].weight, tasks[1].weight)  # the reference's were all the same
    assert len({t.noise_std for t in tasks}) == 6
    again = create_meta_learning_task_distribution(num_tasks=6, input_dim=4, output_dim=2, seed=3)
    assert all(torch.equal(t.weight, u.weight) and t.noise_std == u.noise_std for t, u in zip(tasks, again))
    torch.manual_seed(0)
    x0, y0 = tasks[0]()
    torch.manual_seed(0)
    x1, y1 = tasks[1]()
    assert x0.shape == (32, 4) and y0.shape == (32, 2) and torch.equal(x0, x1) and not torch.allclose(y0, y1)
    cls = create_meta_learning_task_distribution(num_tasks=3, input_dim=4, task_type="classification", seed=0)
    _, y = cls[0]()
    assert y.shape == (32, 1) and set(y.unique().tolist()) <= {0.0, 1.0}
    mixed = create_meta_learning_task_distribution(num_tasks=40, task_type="mixed", seed=0)
    assert {t.classification for t in mixed} == {True, False}
    with pytest.raises(ValueError, match="task_type"):
        create_meta_learning_task_distribution(task_type="ranking")
    with pytest.raises(ValueError, match="num_tasks"):
        create_meta_learning_task_distribution(num_tasks=0)
