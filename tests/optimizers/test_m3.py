"""M3 (Multi-scale Momentum Muon, paper Algorithm 1)."""

from __future__ import annotations

import pytest
import torch

from nested_learning.optimizers.m3 import M3
from nested_learning.optimizers.newton_schulz import newton_schulz

f64 = dict(dtype=torch.float64)
SHAPES = [(4, 6), (4, 6), (6, 3), (2, 3, 4), (5,)]


def ns(x: torch.Tensor, steps: int) -> torch.Tensor:
    """NS of the matrix view [shape[0], −1] for ≥ 2-D tensors; the identity for vectors."""
    if x.ndim < 2:
        return x
    return newton_schulz(x.reshape(x.shape[0], -1), steps, dtype=torch.float64).reshape(x.shape)


def literal(w0, grads, lr, beta1, beta2, beta3, alpha, eps, ns_steps, slow_chunk, weight_decay):
    """Algorithm 1, one parameter at a time, in float64."""
    out = []
    for i, w in enumerate(w0):
        m1, m2, v, s, o2 = (torch.zeros_like(w) for _ in range(5))
        for t, gs in enumerate(grads, start=1):
            g = gs[i]
            w = w * (1 - lr * weight_decay)
            m1, v, s = m1 + beta1 * g, v + beta2 * g * g, s + g
            w = w - lr * (ns(m1, ns_steps) + alpha * o2) / (v.sqrt() + eps)
            if t % slow_chunk == 0:
                m2, s = m2 + beta3 * s, torch.zeros_like(s)
                o2 = ns(m2, ns_steps)
        out.append(w)
    return out


def data(steps: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w0 = [torch.randn(s, generator=gen, **f64) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen, **f64) for s in SHAPES] for _ in range(steps)]
    return w0, grads


def run(w0, grads, **hyper):
    params = [torch.nn.Parameter(w.clone()) for w in w0]
    opt = M3(params, ns_dtype=torch.float64, **hyper)
    history = []
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        history.append({k: v.clone() for k, v in opt.state[params[0]].items() if torch.is_tensor(v)})
    return [p.detach() for p in params], history, opt


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_algorithm_1(weight_decay):
    hyper = dict(lr=0.01, beta1=0.9, beta2=0.999, beta3=0.8, alpha=0.5, eps=1e-8, ns_steps=3, slow_chunk=2,
                 weight_decay=weight_decay)
    w0, grads = data(5)
    got, _, _ = run(w0, grads, **hyper)
    for a, b in zip(got, literal(w0, grads, **hyper)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_slow_momentum_changes_only_every_slow_chunk_steps():
    w0, grads = data(7)
    beta3 = 0.7
    _, history, _ = run(w0, grads, slow_chunk=3, beta3=beta3)
    g = [gs[0] for gs in grads]
    zero = torch.zeros(SHAPES[0], **f64)
    for t, state in enumerate(history, start=1):
        done = 3 * (t // 3)  # steps folded into M2 so far
        expected_m2 = beta3 * sum(g[:done], zero)
        torch.testing.assert_close(state["m2"], expected_m2, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state["slow_buffer"], sum(g[done:t], zero), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state["o2"], ns(expected_m2, 3) if done else zero, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state["m1"], 0.9 * sum(g[:t], zero), rtol=1e-12, atol=1e-12)


def test_the_first_chunk_is_driven_by_the_fast_momentum_alone():
    w0, grads = data(4)
    with_slow, _, _ = run(w0, grads[:3], slow_chunk=3, alpha=1.0)
    without, _, _ = run(w0, grads[:3], slow_chunk=3, alpha=0.0)
    for a, b in zip(with_slow, without):
        assert torch.equal(a, b)
    with_slow, _, _ = run(w0, grads, slow_chunk=3, alpha=1.0)
    without, _, _ = run(w0, grads, slow_chunk=3, alpha=0.0)
    assert all(not torch.equal(a, b) for a, b in zip(with_slow, without))


def test_vector_parameters_are_not_orthogonalised():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], **f64))
    opt = M3([w], lr=0.1, beta1=0.5, beta2=0.25, eps=0.0)
    w.grad = torch.tensor([2.0, -4.0], **f64)
    opt.step()  # (β₁g) / √(β₂g²) = sign(g)
    torch.testing.assert_close(w.detach(), torch.tensor([0.9, -1.9], **f64))


@pytest.mark.parametrize(
    "kwargs, argument",
    [({"slow_chunk": 0}, "slow_chunk"), ({"beta3": 1.5}, "beta3"), ({"alpha": -1.0}, "alpha"),
     ({"ns_steps": 0}, "ns_steps"), ({"lr": -1.0}, "lr"), ({"eps": float("nan")}, "eps"),
     ({"beta1": -0.1}, "beta1"), ({"weight_decay": -1.0}, "weight_decay")],
)
def test_bad_hyper_parameters_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        M3([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)


@pytest.mark.slow
def test_compiled_step_matches_eager():
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(5)]
    runs = []
    for compiled in (False, True):
        params = [torch.nn.Parameter(x.clone()) for x in init]
        opt = M3(params, lr=0.01, slow_chunk=2, ns_dtype=torch.float32)
        step = opt.step
        for i, gs in enumerate(grads):
            for p, g in zip(params, gs):
                p.grad = g.clone()
            step()
            if compiled and i == 0:
                step = torch.compile(opt.step, fullgraph=True)
        runs.append(params)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
