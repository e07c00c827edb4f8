"""PreconditionedMomentum ('diagonal' | 'adam' | 'none') and AdaptivePreconditionedMomentum (Adam)."""

from __future__ import annotations

import pytest
import torch

from nested_learning.optimizers.preconditioned import AdaptivePreconditionedMomentum, PreconditionedMomentum

f64 = dict(dtype=torch.float64)


def literal(w0, grads, lr, momentum, weight_decay, kind, eps, beta2):
    """The reference library's PreconditionedMomentum loop, written out in float64."""
    w, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    for t, g in enumerate(grads, start=1):
        g = g + weight_decay * w
        v = beta2 * v + (1 - beta2) * g * g
        if kind == "diagonal":
            g = g / (v.sqrt() + eps)
        elif kind == "adam":
            g = g / ((v / (1 - beta2**t)).sqrt() + eps)
        m = momentum * m - lr * g
        w = w + m
    return w


@pytest.mark.parametrize("kind", ["diagonal", "adam", "none"])
def test_matches_the_reference_rule(kind):
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(3, 4, generator=gen, **f64)
    grads = [torch.randn(3, 4, generator=gen, **f64) for _ in range(5)]
    hyper = dict(lr=0.01, momentum=0.8, weight_decay=0.05, eps=1e-8, beta2=0.99)
    w = torch.nn.Parameter(w0.clone())
    opt = PreconditionedMomentum([w], precondition_type=kind, **hyper)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    torch.testing.assert_close(w.detach(), literal(w0, grads, kind=kind, **hyper), rtol=1e-12, atol=1e-12)
    assert ("exp_avg_sq" in opt.state[w]) == (kind != "none")


def test_none_two_steps_by_hand():
    w = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]], **f64))
    opt = PreconditionedMomentum([w], lr=0.1, momentum=0.5, precondition_type="none")
    w.grad = torch.tensor([[1.0, 0.0], [0.0, 1.0]], **f64)
    opt.step()  # m = −0.1 g
    w.grad = torch.tensor([[0.0, 1.0], [1.0, 0.0]], **f64)
    opt.step()  # m = [[−0.05, −0.1], [−0.1, −0.05]]
    torch.testing.assert_close(w.detach(), torch.tensor([[0.85, 1.9], [2.9, 3.85]], **f64))


@pytest.mark.parametrize("foreach", [False, True])
def test_adaptive_equals_torch_adam_bitwise(foreach):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)]
    grads = [[torch.randn_like(x) for x in init] for _ in range(5)]
    runs = []
    for make in (
        lambda ps: AdaptivePreconditionedMomentum(
            ps, lr=0.01, weight_decay=0.1, beta1=0.8, beta2=0.99, foreach=foreach
        ),
        lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.1, betas=(0.8, 0.99), foreach=False),
    ):
        params = [torch.nn.Parameter(x.clone()) for x in init]
        opt = make(params)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        runs.append(params)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, argument",
    [({"precondition_type": "full"}, "precondition_type"), ({"beta2": 1.0}, "beta2"), ({"eps": -1.0}, "eps"),
     ({"lr": float("nan")}, "lr"), ({"momentum": -0.1}, "momentum"), ({"momentum": 1.0}, "momentum"),
     ({"momentum": 2.0}, "momentum")],
)
def test_bad_hyper_parameters_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        PreconditionedMomentum([torch.nn.Parameter(torch.zeros(2))], **kwargs)


@pytest.mark.parametrize("kwargs, argument", [({"beta1": 1.0}, "beta1"), ({"weight_decay": -1.0}, "weight_decay")])
def test_adaptive_bad_hyper_parameters(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        AdaptivePreconditionedMomentum([torch.nn.Parameter(torch.zeros(2))], **kwargs)


@pytest.mark.slow
def test_compiled_step_matches_eager():
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(3, 4, generator=gen), torch.randn(4, generator=gen)]
    grads = [[torch.randn_like(x) for x in init] for _ in range(4)]
    runs = []
    for compiled in (False, True):
        params = [torch.nn.Parameter(x.clone()) for x in init]
        opt = PreconditionedMomentum(params, lr=0.01, precondition_type="adam")
        step = opt.step
        for i, gs in enumerate(grads):
            for p, g in zip(params, gs):
                p.grad = g.clone()
            step()
            if compiled and i == 0:
                step = torch.compile(opt.step, fullgraph=True)
        runs.append(params)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_oja_rule_momentum_at_the_reference_library_module_path():
    from nested_learning.optimizers import OjaRuleMomentum
    from nested_learning.optimizers import preconditioned

    assert preconditioned.OjaRuleMomentum is OjaRuleMomentum
