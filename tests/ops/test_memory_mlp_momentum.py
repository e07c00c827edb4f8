"""memory_mlp_momentum: the reference's semantics (block-wise memory, losses, projection), every
backend against float64 over 20 steps, grouping, custom-op contract, bad input."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from nested_learning import ops, testing
from nested_learning.benchmark import SPECS
from nested_learning.benchmark.core import Checker
from nested_learning.optimizers.memories import MemoryMLP
from nested_learning.reference import memory_mlp_momentum as reference

SPEC = SPECS["memory_mlp_momentum"]
CPU = torch.device("cpu")
BACKENDS = [b for b in ops.BACKENDS if ops.available(b, CPU)[0]]
S, H = 16, 8
SHAPES = [(), (1,), (0,), (S,), (5, 7), (3, 2 * S + 1), (S - 3,)]
LOSSES = reference.LOSSES


def _memory(seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(H, 2 * S), (H,), (H,), (H,), (S, H), (S,)]
    scales = [(2 * S) ** -0.5, 0.1, 0.1, 0.1, H**-0.5, 0.05]
    ws = [torch.randn(s, generator=gen, dtype=torch.float64) * c for s, c in zip(shapes, scales)]
    ws[2] += 1.0
    return [w.to(dtype) for w in ws]


class Run:
    """Tensors of odd sizes stepped through one memory that itself moves by clipped SGD on its gradient."""

    def __init__(self, dtype: torch.dtype, loss: str, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        sd = torch.float64 if dtype == torch.float64 else torch.float32
        self.loss = loss
        self.params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]
        self.momenta = [torch.zeros(s, dtype=sd) for s in SHAPES]
        self.prev = [torch.zeros(s, dtype=sd) for s in SHAPES]
        self.weights = _memory(seed, sd)
        self.grads_w = [torch.zeros_like(w) for w in self.weights]
        self.projection = 0.1 * torch.eye(S, dtype=sd)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.losses: list[torch.Tensor] = []

    def step(self, i: int, backend: str) -> None:
        grads = [(torch.randn(p.shape, generator=self.gen, dtype=torch.float64) * 0.1).to(p.dtype) for p in self.params]
        has_prev = [i > 0 and j % 3 != 1 for j in range(len(SHAPES))]
        for g in self.grads_w:
            g.zero_()
        with ops.use_backend(backend):
            loss = ops.memory_mlp_momentum(
                self.params, grads, self.momenta, self.prev, has_prev, self.weights, self.grads_w, self.projection,
                lr=0.05, momentum=0.9, weight_decay=0.01, loss=self.loss, loss_scale=1 / 6, compute_grad=i % 4 != 3,
                projection_lr=0.05,
            )
        self.losses.append(loss.reshape(1))
        norm = torch.sqrt(sum(g.double().pow(2).sum() for g in self.grads_w))
        for w, g in zip(self.weights, self.grads_w):  # clipped SGD on the memory, as DeepMomentumGD clips
            w.sub_(0.05 * g / max(1.0, norm.item()))

    def tensors(self) -> dict[str, torch.Tensor]:
        flat = lambda ts: torch.cat([t.reshape(-1).double() for t in ts])  # noqa: E731
        return {"params": flat(self.params), "momenta": flat(self.momenta), "prev": flat(self.prev),
                "weights": flat(self.weights), "projection": self.projection.double().flatten(), "loss": flat(self.losses)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_within_rule_of_float64_over_20_steps(backend, loss, dtype):
    runs = {"got": Run(dtype, loss), "ref": Run(dtype, loss), "exact": Run(torch.float64, loss)}
    for i in range(20):
        for name, b in (("got", backend), ("ref", "reference"), ("exact", "reference")):
            runs[name].step(i, b)
    exact, ref = runs["exact"].tensors(), runs["ref"].tensors()
    for verdict in testing.judge(runs["got"].tensors(), exact, [ref], dtype):
        assert verdict.passed, verdict


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SPEC.check_cases(CPU), ids=lambda c: c.name)
def test_backend_within_budget_of_float64_truth(backend, case):
    if not SPEC.backend_supports(backend, case):
        pytest.skip(f"{backend} does not support {case.name}")
    result = Checker(SPEC, case, CPU).check_backend(backend)
    assert result.error is None, result.error
    assert all(v.passed for v in result.verdicts), result.verdicts


def test_every_coordinate_goes_through_the_bucket_memory():
    """o = MemoryMLP(blocks of [g ; m])[:n]: one tensor of 2S + 5 elements, momentum 0, lr 1, so
    W moves by exactly −o; every coordinate (past the first block too) differs from −g."""
    torch.manual_seed(0)
    mem = MemoryMLP(S, hidden_dim=H).double()
    w = [p.detach() for p in mem.fused_weights()]
    p = torch.randn(2 * S + 5, dtype=torch.float64)
    g = torch.randn_like(p)
    m = torch.randn_like(p)
    start, m_start = p.clone(), m.clone()
    ops.memory_mlp_momentum([p], [g], [m], [torch.zeros_like(p)], [False], w, [torch.zeros_like(t) for t in w],
                            lr=1.0, momentum=0.0)
    blocks = lambda t: F.pad(t, (0, 3 * S - t.numel())).reshape(3, S)  # noqa: E731
    o = mem(blocks(g), blocks(m_start)).detach().flatten()[: p.numel()]
    torch.testing.assert_close(start - p, o, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(m, o, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss", LOSSES)
def test_memory_gradient_is_the_mean_loss_gradient(loss):
    """weight_grads = ∇θ of s·Σℓ with ℓ written out by hand, on two tensors (float64)."""
    w = _memory(3, torch.float64)
    gen = torch.Generator().manual_seed(4)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in ((5, 7), (S + 2,))]
    grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    prev = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    P = 0.1 * torch.eye(S, dtype=torch.float64) + 0.01 * torch.randn(S, S, generator=gen, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in w]
    total = 0
    for p, g, o_prev in zip(params, grads, prev):
        n = p.numel()
        nb = -(-n // S)
        pad = lambda t: F.pad(t.flatten(), (0, nb * S - n)).reshape(nb, S)  # noqa: E731
        x = torch.cat([pad(g), torch.zeros(nb, S, dtype=torch.float64)], 1)
        hidden = F.silu(F.layer_norm(x @ leaves[0].T + leaves[1], (H,), leaves[2], leaves[3], 1e-5))
        o = (hidden @ leaves[4].T + leaves[5]).flatten()[:n]
        gf = g.flatten()
        if loss == "dot":
            ell = -(o * gf).sum()
        elif loss == "l2_regression":
            ell = ((o - (pad(g) @ P.T).flatten()[:n]) ** 2).mean()
        else:
            ell = 1 - F.cosine_similarity(o, gf, dim=0) + 0.1 * (o.norm() / gf.norm() - 1) ** 2 + 0.1 * ((o - o_prev.flatten()) ** 2).mean()
        total = total + ell
    expected = torch.autograd.grad(total / 2, leaves)
    acc = [torch.zeros_like(t) for t in w]
    value = ops.memory_mlp_momentum(params, grads, [torch.zeros_like(p) for p in params], prev, [True, True], w, acc,
                                    P.clone(), lr=0.1, momentum=0.9, loss=loss, loss_scale=0.5)
    torch.testing.assert_close(value, total.detach() / 2, rtol=1e-12, atol=1e-14)
    for got, want in zip(acc, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def test_l2_projection_moves_by_the_normalized_delta_rule_and_mixed_sizes_share_it():
    w = _memory(5, torch.float64)
    gen = torch.Generator().manual_seed(6)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in ((3,), (S + 4,))]  # two sizes, one bucket
    grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    P0 = 0.1 * torch.eye(S, dtype=torch.float64)
    P = P0.clone()
    momenta = [torch.zeros_like(p) for p in params]
    ops.memory_mlp_momentum(params, grads, momenta, [torch.zeros_like(p) for p in params], [False, False], w,
                            [torch.zeros_like(t) for t in w], P, lr=0.1, momentum=0.0, loss="l2_regression",
                            projection_lr=0.2)
    delta = torch.zeros(S, S, dtype=torch.float64)
    for g, o in zip(grads, momenta):  # momentum 0: m = o
        n = g.numel()
        nb = -(-n // S)
        gb = F.pad(g, (0, nb * S - n)).reshape(nb, S)
        err = F.pad(o - (gb @ P0.T).flatten()[:n], (0, nb * S - n)).reshape(nb, S)
        delta += err.T @ gb / g.pow(2).sum()
    torch.testing.assert_close(P, P0 + 0.2 * delta, rtol=1e-12, atol=1e-15)


def test_compute_grad_false_leaves_gradients_and_zero_size_tensors_alone():
    w = _memory(1)
    acc = [torch.full_like(t, 7.0) for t in w]
    empty = torch.zeros(0, 3)
    p = torch.randn(5)
    ops.memory_mlp_momentum([p, empty], [torch.randn(5), torch.zeros(0, 3)], [torch.zeros(5), torch.zeros(0, 3)],
                            [torch.zeros(5), torch.zeros(0, 3)], [False, False], w, acc, lr=0.1, momentum=0.9,
                            compute_grad=False)
    assert all(torch.equal(a, torch.full_like(a, 7.0)) for a in acc)


def test_mixed_dtypes_are_grouped_and_each_group_matches():
    w = _memory(2)
    gen = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32]
    params = [torch.randn(9 + 4 * i, generator=gen).to(dt) for i, dt in enumerate(dtypes)]
    grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]

    def run(idx):
        ps = [params[i].clone() for i in idx]
        ms, pv = [torch.ones(p.shape) for p in ps], [torch.zeros(p.shape) for p in ps]
        acc = [torch.zeros_like(t) for t in w]
        loss = ops.memory_mlp_momentum(ps, [grads[i] for i in idx], ms, pv, [False] * len(idx), w, acc, lr=0.1, momentum=0.9)
        return ps, ms, pv, acc, loss

    ps, ms, pv, acc, loss = run(range(4))
    parts = [run([i for i, p in enumerate(params) if p.dtype == dt]) for dt in (torch.float32, torch.bfloat16, torch.float16)]
    order = [0, 3, 1, 2]
    for k, i in enumerate(order):
        part = parts[[0, 0, 1, 2][k]]
        j = [0, 1, 0, 0][k]
        assert torch.equal(ps[i], part[0][j]) and torch.equal(ms[i], part[1][j]) and torch.equal(pv[i], part[2][j])
    for t, *rest in zip(acc, *(p[3] for p in parts)):
        torch.testing.assert_close(t, sum(rest), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(loss, sum(p[4] for p in parts), rtol=1e-6, atol=1e-9)


def _op_args(loss: str = "surrogate"):
    w = _memory(0)
    p = [torch.randn(5, 3), torch.randn(S + 1)]
    return (p, [torch.randn_like(t) for t in p], [torch.zeros_like(t) for t in p], [torch.randn_like(t) for t in p],
            [True, False], w, [torch.zeros_like(t) for t in w], 0.1 * torch.eye(S) if loss == "l2_regression" else torch.zeros(0, 0),
            0.1, 0.9, 0.01, loss, 0.5, True, 0.01, 1e-5)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_opcheck(backend, loss):
    with ops.use_backend(backend):
        torch.library.opcheck(torch.ops.nested_learning.memory_mlp_momentum.default, _op_args(loss))


def _good():
    w = _memory(0)
    p = [torch.randn(4, 3), torch.randn(5)]
    return {"params": p, "grads": [torch.randn_like(t) for t in p], "momenta": [torch.zeros_like(t) for t in p],
            "prev_outputs": [torch.zeros_like(t) for t in p], "has_prev": [False, True], "weights": w,
            "weight_grads": [torch.zeros_like(t) for t in w], "projection": None}


def _set(key, i, value):
    return lambda a, k: a[key].__setitem__(i, value)


BAD = [
    ("lengths", lambda a, k: a.update(grads=a["grads"][:1]), ValueError, "grads must have 2 entries"),
    ("has_prev length", lambda a, k: a.update(has_prev=[True]), ValueError, "has_prev must have 2 entries"),
    ("momentum shape", _set("momenta", 1, torch.zeros(4)), ValueError, "momenta[1] must match params[1]"),
    ("momentum dtype", _set("momenta", 0, torch.zeros(4, 3, dtype=torch.bfloat16)), ValueError, "momenta[0] must match"),
    ("grad dtype", _set("grads", 0, torch.zeros(4, 3, dtype=torch.float64)), ValueError, "grads[0] must match"),
    ("contiguous", _set("params", 0, torch.randn(3, 4).T), ValueError, "params[0] must be contiguous"),
    ("has_prev type", lambda a, k: a.update(has_prev=[1, 0]), TypeError, "has_prev[0] must be a bool"),
    ("weights count", lambda a, k: a.update(weights=a["weights"][:5]), ValueError, "weights and weight_grads must hold 6"),
    ("w2 shape", _set("weights", 4, torch.zeros(S + 1, H)), ValueError, "weights[4] (w2) must have shape [S, h]"),
    ("grad buffer dtype", _set("weight_grads", 1, torch.zeros(H, dtype=torch.float64)), ValueError, "weight_grads[1] (b1) must be contiguous with dtype"),
    ("float64 param", _set("params", 0, torch.zeros(4, 3, dtype=torch.float64)), ValueError, "params[0] (torch.float64 on cpu) needs memory weights"),
    ("no projection", lambda a, k: k.update(loss="l2_regression"), ValueError, "loss='l2_regression' needs projection"),
    ("projection shape", lambda a, k: (k.update(loss="l2_regression"), a.update(projection=torch.eye(S + 1))), ValueError, "projection must have shape [S, S]"),
    ("loss", lambda a, k: k.update(loss="cosine"), ValueError, "loss must be one of"),
    ("lr", lambda a, k: k.update(lr=-1.0), ValueError, "lr must be >= 0"),
    ("momentum", lambda a, k: k.update(momentum=1.5), ValueError, "momentum must lie in [0, 1]"),
    ("ln_eps", lambda a, k: k.update(ln_eps=0.0), ValueError, "ln_eps must be > 0"),
    ("nan", lambda a, k: k.update(weight_decay=float("nan")), ValueError, "weight_decay must be a finite number"),
    ("compute_grad", lambda a, k: k.update(compute_grad=1), TypeError, "compute_grad must be a bool"),
]


@pytest.mark.parametrize("name,mutate,error,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument_and_mutates_nothing(name, mutate, error, message):
    args, kwargs = _good(), {"lr": 0.1, "momentum": 0.9}
    mutate(args, kwargs)
    keys = ("params", "momenta", "prev_outputs", "weight_grads")
    before = [t.clone() for key in keys for t in args[key]]
    with pytest.raises(error, match=re.escape(message)):
        ops.memory_mlp_momentum(*args.values(), **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(before, [t for key in keys for t in args[key]]))


def test_hyper_defaults_match_the_op_defaults():
    import inspect

    defaults = {k: v.default for k, v in inspect.signature(ops.memory_mlp_momentum).parameters.items()
                if v.default is not inspect.Parameter.empty and k != "projection"}
    assert defaults == {k: getattr(reference.Hyper(lr=0.0, momentum=0.0), k) for k in defaults}


def test_compile_fullgraph_matches_eager():
    w = _memory(0)

    def step(p, g, m, prev, acc):
        return ops.memory_mlp_momentum(p, g, m, prev, [True, False], w, acc, lr=0.1, momentum=0.9, weight_decay=0.01)

    gen = torch.Generator().manual_seed(0)
    p = [torch.randn(s, generator=gen) for s in ((5, 3), (S + 2,))]
    g = [torch.randn(t.shape, generator=gen) for t in p]
    make = lambda: ([t.clone() for t in p], g, [torch.ones_like(t) for t in p], [torch.zeros_like(t) for t in p],  # noqa: E731
                    [torch.zeros_like(t) for t in w])
    eager, compiled = make(), make()
    le = step(*eager)
    lc = torch.compile(step, fullgraph=True)(*compiled)
    torch.testing.assert_close(lc, le, rtol=0, atol=0)
    for a, b in zip([t for xs in eager for t in xs], [t for xs in compiled for t in xs]):
        assert torch.equal(a, b)
