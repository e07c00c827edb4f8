"""DeltaRuleMomentum (sign-fixed delta-rule momentum) and OjaRuleMomentum (aliasing fixed)."""

from __future__ import annotations

import pytest
import torch

from nested_learning.optimizers.delta_rule import DeltaRuleMomentum, OjaRuleMomentum, times_gram

f64 = dict(dtype=torch.float64)


def steps_with(opt: torch.optim.Optimizer, w: torch.nn.Parameter, grads: list[list[float]]) -> list[torch.Tensor]:
    out = []
    for g in grads:
        w.grad = torch.tensor(g, **f64)
        opt.step()
        out.append(w.detach().clone())
    return out


def test_matrix_steps_by_hand():
    w = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]], **f64))
    opt = DeltaRuleMomentum([w], lr=0.1, momentum=0.5)
    w1, w2 = steps_with(opt, w, [[[1.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [0.0, 1.0]]])
    # m1 = −ηG1 = [[−0.1, 0], [0, −0.2]]
    torch.testing.assert_close(w1, torch.tensor([[0.9, 2.0], [3.0, 3.8]], **f64))
    # m2 = m1 (μI − η G2ᵀG2) − η G2, G2ᵀG2 = [[1, 1], [1, 2]] → [[−0.14, −0.09], [0.02, −0.16]]
    torch.testing.assert_close(w2, torch.tensor([[0.76, 1.91], [3.02, 3.64]], **f64))


def test_vector_steps_by_hand():
    w = torch.nn.Parameter(torch.tensor([1.0, 1.0], **f64))
    opt = DeltaRuleMomentum([w], lr=0.1, momentum=0.5)
    w1, w2 = steps_with(opt, w, [[1.0, 2.0], [1.0, -1.0]])
    torch.testing.assert_close(w1, torch.tensor([0.9, 0.8], **f64))  # m1 = [−0.1, −0.2]
    # m2 = μ m1 − η⟨g2, m1⟩ g2 − η g2 = [−0.05, −0.1] − 0.01·[1, −1] − 0.1·[1, −1]
    torch.testing.assert_close(w2, torch.tensor([0.74, 0.81], **f64))


@pytest.mark.parametrize("shape", [(2, 5), (5, 2), (3, 2, 2), (4,), ()])
def test_gram_product_either_association(shape):
    gen = torch.Generator().manual_seed(0)
    m, g = torch.randn(shape, generator=gen, **f64), torch.randn(shape, generator=gen, **f64)
    M = m.reshape(shape[0], -1) if len(shape) >= 2 else m.reshape(1, -1)
    G = g.reshape(M.shape)
    expected = -0.3 * M @ (G.T @ G)
    torch.testing.assert_close(times_gram(m, g, -0.3), expected.reshape(shape), rtol=1e-12, atol=1e-12)


def test_descends_on_a_quadratic_where_the_reference_rule_diverges():
    gen = torch.Generator().manual_seed(0)
    target, w0 = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    lr, momentum = 0.03, 0.3

    def loss(w):
        return ((w - target) ** 2).sum()

    w = torch.nn.Parameter(w0.clone())
    opt = DeltaRuleMomentum([w], lr=lr, momentum=momentum)
    losses = []
    for _ in range(50):
        opt.zero_grad()
        value = loss(w)
        value.backward()
        losses.append(value.item())
        opt.step()
    losses.append(loss(w).item())
    assert all(b < a for a, b in zip(losses, losses[1:]))
    assert losses[-1] < 0.01 * losses[0]

    # the reference library's rule: m ← μm − g⟨g, m⟩ − ηg, W ← W − m
    w, m = w0.clone(), torch.zeros_like(w0)
    for _ in range(5):
        g = 2 * (w - target)
        m = momentum * m - g * (g.flatten() @ m.flatten()) - lr * g
        w = w - m
    assert loss(w).item() > 1e6 * losses[0]


def test_precondition_first_step_is_a_sign_step():
    gen = torch.Generator().manual_seed(0)
    w0, g = torch.randn(3, 4, generator=gen, **f64), torch.randn(3, 4, generator=gen, **f64)
    w = torch.nn.Parameter(w0.clone())
    opt = DeltaRuleMomentum([w], lr=0.1, precondition=True, eps=0.0)
    w.grad = g
    opt.step()  # bias-corrected v = g², so P⊙g = sign(g)
    torch.testing.assert_close(w.detach(), w0 - 0.1 * g.sign())
    assert set(opt.state[w]) == {"momentum_buffer", "exp_avg_sq", "step"}


def test_oja_uses_the_old_momentum_in_the_decay_term():
    w = torch.nn.Parameter(torch.tensor([0.0, 0.0], **f64))
    opt = OjaRuleMomentum([w], lr=1.0, momentum=0.5, oja_lr=0.1)
    w1, w2 = steps_with(opt, w, [[1.0, 2.0], [3.0, -1.0]])
    torch.testing.assert_close(w1, torch.tensor([-0.1, -0.2], **f64))  # m1 = γ g1
    # m2 = μ m1 + γ (g2 − ⟨g2, m1⟩ m1) = [0.05, 0.1] + 0.1·([3, −1] − 0.1·[0.1, 0.2]) = [0.349, −0.002]
    # (the reference's in-place version gives 0.99·[0.35, 0] = [0.3465, 0])
    torch.testing.assert_close(w2, w1 - torch.tensor([0.349, -0.002], **f64))


@pytest.mark.parametrize(
    "kwargs, argument",
    [({"lr": -1.0}, "lr"), ({"momentum": 1.5}, "momentum"), ({"weight_decay": -0.1}, "weight_decay"),
     ({"precondition": "yes"}, "precondition"), ({"beta2": 1.0}, "beta2"), ({"eps": float("inf")}, "eps")],
)
def test_bad_hyper_parameters_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        DeltaRuleMomentum([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_oja_bad_hyper_parameter():
    with pytest.raises(ValueError, match="oja_lr"):
        OjaRuleMomentum([torch.nn.Parameter(torch.zeros(2))], oja_lr=-0.1)


@pytest.mark.slow
def test_compiled_step_matches_eager():
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5, 2), (3,)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(4)]
    runs = []
    for compiled in (False, True):
        params = [torch.nn.Parameter(x.clone()) for x in init]
        opt = DeltaRuleMomentum(params, lr=0.05, momentum=0.5, precondition=True)
        step = opt.step
        for i, gs in enumerate(grads):
            for p, g in zip(params, gs):
                p.grad = g.clone()
            step()
            if compiled and i == 0:  # state exists from here on
                step = torch.compile(opt.step, fullgraph=True)
        runs.append(params)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
