"""Muon: torch.optim.Muon's rule, with the Newton–Schulz step batched across same-shape matrices."""

from __future__ import annotations

import pytest
import torch

from nested_learning.benchmark import orthogonal_steps
from nested_learning.optimizers.muon import Muon

SHAPES = [(8, 8), (6, 10), (6, 10), (12, 4), (12, 4), (3, 9)]  # square, wide and tall, with repeats
TALL = [r > c for r, c in SHAPES]


def run(make, steps: int = 4, shapes=SHAPES, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = make(params)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return [p.detach() for p in params]


CONFIGS = [
    dict(lr=0.02),
    dict(lr=0.05, weight_decay=0.0, momentum=0.9, nesterov=False),
    dict(lr=0.01, adjust_lr_fn="match_rms_adamw", ns_steps=3),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("foreach", [False, True])
def test_equals_torch_muon_with_its_compute_dtype(config, foreach):
    ours = run(lambda p: Muon(p, ns_dtype=torch.bfloat16, foreach=foreach, **config))
    theirs = run(lambda p: torch.optim.Muon(p, **config))
    for a, b, tall in zip(ours, theirs, TALL):
        if tall:  # torch's first X Xᵀ reads a transposed view; the sums may round differently
            torch.testing.assert_close(a, b, rtol=0, atol=1e-2 * config["lr"])
        else:
            assert torch.equal(a, b)


@pytest.mark.parametrize("config", CONFIGS)
def test_float32_newton_schulz_is_within_bf16_of_torch(config):
    ours = run(lambda p: Muon(p, ns_dtype=torch.float32, **config))
    theirs = run(lambda p: torch.optim.Muon(p, **config))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0.1 * config["lr"])  # 4 steps of bf16-rounded NS
    assert any(not torch.equal(a, b) for a, b in zip(ours, theirs))


def test_one_step_by_hand():
    # one step from B = 0: B = (1−μ)G, U = (1−μ)G + μB, O = NS(U), W ← W(1 − ηλ) − η·√max(1, r/c)·O
    gen = torch.Generator().manual_seed(5)
    w0, g = torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.randn(6, 3, generator=gen, dtype=torch.float64)
    w = torch.nn.Parameter(w0.clone())
    opt = Muon([w], lr=0.1, weight_decay=0.2, momentum=0.9, ns_dtype=torch.float64)
    w.grad = g
    opt.step()
    u = 0.1 * g + 0.9 * (0.1 * g)
    x = u.T / u.norm()
    for _ in range(5):
        A = x @ x.T
        x = 3.4445 * x + (-4.7750 * A + 2.0315 * A @ A) @ x
    expected = w0 * (1 - 0.1 * 0.2) - 0.1 * 2**0.5 * x.T
    torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], 0.1 * g)


def test_only_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))])
    opt = Muon([torch.nn.Parameter(torch.zeros(2, 2))])
    with pytest.raises(ValueError, match="2-D"):
        opt.add_param_group({"params": (p for p in [torch.nn.Parameter(torch.zeros(2, 2, 2))])})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize(
    "kwargs, argument",
    [({"lr": -1.0}, "lr"), ({"momentum": 1.5}, "momentum"), ({"weight_decay": -0.1}, "weight_decay"),
     ({"ns_steps": 0}, "ns_steps"), ({"ns_coefficients": (1.0, 2.0)}, "ns_coefficients"),
     ({"adjust_lr_fn": "rms"}, "adjust_lr_fn"), ({"nesterov": None}, "nesterov"), ({"eps": -1.0}, "eps"),
     ({"ns_dtype": torch.int32}, "ns_dtype")],
)
def test_bad_hyper_parameters_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        Muon([torch.nn.Parameter(torch.zeros(2, 2))], **kwargs)


@pytest.mark.slow
def test_compiled_step_matches_eager():
    runs = []
    for compiled in (False, True):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES[:4]]
        opt = Muon(params, lr=0.02, ns_dtype=torch.float32)
        step = opt.step
        for i in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            step()
            if compiled and i == 0:
                step = torch.compile(opt.step, fullgraph=True)
        runs.append(params)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_benchmark_runs_on_a_tiny_stack(monkeypatch):
    monkeypatch.delenv(orthogonal_steps.PEER_ENV, raising=False)
    rows = orthogonal_steps.run(model_params=2000, width=4, repeats=1, warmup=0)
    assert [(r["task"], r["optimizer"]) for r in rows] == [
        ("muon", "nested_learning Muon"),
        ("muon", "torch.optim.Muon"),
        ("m3", "nested_learning M3"),
        ("m3 slow_chunk=1", "nested_learning M3"),
    ]
    assert rows[0]["params"] == 10 * 12 * 4**2 and rows[0]["speedup"] > 0 and rows[2]["speedup"] is None
    assert "torch.optim.Muon" in orthogonal_steps.format_table(rows)
