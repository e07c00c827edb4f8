"""cms_accumulate: multi-frequency semantics over a schedule, every backend against the
reference (bit for bit for SGD, by the rule for Adam), grouping, custom-op contract, bad input."""

from __future__ import annotations

import re

import pytest
import torch

from nested_learning import ops, testing
from nested_learning.benchmark import SPECS
from nested_learning.benchmark.core import Checker
from nested_learning.reference.cms_accumulate import Hyper

SPEC = SPECS["cms_accumulate"]
CPU = torch.device("cpu")
BACKENDS = [b for b in ops.BACKENDS if ops.available(b, CPU)[0]]
SHAPES = [(), (1,), (1031,), (17, 23), (3, 5, 7)]
PERIODS = (8, 32, 128)

SGD_VARIANTS = {
    "plain": dict(optimizer="sgd", lr=0.1),
    "momentum": dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3),
    "nesterov-mean": dict(optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, average=True),
    "dampening": dict(optimizer="sgd", lr=0.05, momentum=0.5, dampening=0.3, average=True),
}
ADAM_VARIANTS = {
    "adam": dict(optimizer="adam", lr=1e-2, weight_decay=1e-2, average=True),
    "adamw": dict(optimizer="adamw", lr=1e-2, weight_decay=0.1, beta1=0.8, beta2=0.99, eps=1e-6),
}


class Run:
    """Tensors of three levels (one per period) stepped the way a caller drives the op."""

    def __init__(self, dtype: torch.dtype, kwargs: dict, seed: int = 0, state_dtype: torch.dtype = torch.float32):
        gen = torch.Generator().manual_seed(seed)
        self.kwargs = kwargs
        self.level = [i % len(PERIODS) for i in range(len(SHAPES))]
        self.params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]
        self.accs = [torch.zeros(s, dtype=state_dtype) for s in SHAPES]
        needs_m = kwargs["optimizer"] != "sgd" or kwargs.get("momentum", 0) != 0
        self.m = [torch.zeros(s, dtype=state_dtype) for s in SHAPES] if needs_m else []
        self.v = [torch.zeros(s, dtype=state_dtype) for s in SHAPES] if kwargs["optimizer"] != "sgd" else []
        self.counts, self.steps = [0] * len(SHAPES), [0] * len(SHAPES)
        self.gen = torch.Generator().manual_seed(seed + 1)

    def step(self, i: int, backend: str, periods=PERIODS) -> list[bool]:
        grads = [torch.randn(p.shape, generator=self.gen, dtype=torch.float64).to(p.dtype) for p in self.params]
        due = [i % periods[lvl] == 0 for lvl in self.level]
        with ops.use_backend(backend):
            ops.cms_accumulate(self.params, grads, self.accs, self.m, self.v, self.counts, self.steps, due, **self.kwargs)
        for j, d in enumerate(due):
            self.counts[j], self.steps[j] = (0, self.steps[j] + 1) if d else (self.counts[j] + 1, self.steps[j])
        return due

    def tensors(self) -> list[torch.Tensor]:
        return self.params + self.accs + self.m + self.v


def test_parameters_change_exactly_on_their_periods_and_equal_accumulate_then_step():
    """Periods (8, 32, 128): a level moves only at steps ≡ 0 (mod C), by lr × its window sum."""
    run = Run(torch.float32, dict(optimizer="sgd", lr=0.1))
    window = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    expected = [p.double().clone() for p in run.params]
    gen = torch.Generator().manual_seed(1)
    for i in range(130):
        before = [p.clone() for p in run.params]
        due = run.step(i, "reference")
        grads = [torch.randn(s, generator=gen, dtype=torch.float64).float().double() for s in SHAPES]
        for j, d in enumerate(due):
            window[j] += grads[j]
            if d:
                expected[j] -= 0.1 * window[j]
                window[j].zero_()
            changed = not torch.equal(run.params[j], before[j])
            assert changed == d or (d and window[j].abs().sum() == 0), (i, j)
        assert due == [i % PERIODS[lvl] == 0 for lvl in run.level]
    for p, e in zip(run.params, expected):
        torch.testing.assert_close(p.double(), e, rtol=1e-5, atol=1e-5)
    assert run.steps[:3] == [130 // 8 + 1, 130 // 32 + 1, 130 // 128 + 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", list(SGD_VARIANTS))
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_sgd_bit_identical_to_reference_over_20_steps(backend, variant, dtype):
    kwargs = SGD_VARIANTS[variant]
    fused, ref = Run(dtype, kwargs), Run(dtype, kwargs)
    for i in range(20):
        fused.step(i, backend, periods=(1, 3, 5))
        ref.step(i, "reference", periods=(1, 3, 5))
        for a, b in zip(fused.tensors(), ref.tensors()):
            assert torch.equal(a, b), (i, variant)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", list(ADAM_VARIANTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_adam_within_rule_of_float64_over_20_steps(backend, variant, dtype):
    kwargs = ADAM_VARIANTS[variant]
    fused, ref, exact = Run(dtype, kwargs), Run(dtype, kwargs), Run(torch.float64, kwargs, state_dtype=torch.float64)
    for i in range(20):
        for run, b in ((fused, backend), (ref, "reference"), (exact, "reference")):
            run.step(i, b, periods=(1, 3, 5))
    names = ["param"] * len(SHAPES) + ["acc"] * len(SHAPES) + ["m"] * len(SHAPES) + ["v"] * len(SHAPES)
    for j, (a, r, x) in enumerate(zip(fused.tensors(), ref.tensors(), exact.tensors())):
        verdict = testing.judge({"t": a}, {"t": x}, [{"t": r}], dtype)[0]
        assert verdict.passed, (names[j], j, verdict)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SPEC.check_cases(CPU), ids=lambda c: c.name)
def test_backend_within_budget_of_float64_truth(backend, case):
    if not SPEC.backend_supports(backend, case):
        pytest.skip(f"{backend} does not support {case.name}")
    result = Checker(SPEC, case, CPU).check_backend(backend)
    assert result.error is None, result.error
    assert all(v.passed for v in result.verdicts), result.verdicts


def test_mixed_dtypes_are_grouped_and_each_group_matches():
    """One call over fp32, bf16 and fp64 tensors equals three single-dtype calls."""
    gen = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float32, torch.bfloat16]
    params = [torch.randn(9 + i, generator=gen).to(dt) for i, dt in enumerate(dtypes)]
    grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]
    sd = lambda p: torch.float64 if p.dtype == torch.float64 else torch.float32  # noqa: E731
    accs = [torch.randn(p.shape, generator=gen).to(sd(p)) for p in params]
    m = [torch.zeros(p.shape, dtype=sd(p)) for p in params]
    due = [True, False, True, True, True]
    kw = dict(optimizer="sgd", lr=0.1, momentum=0.9)
    together = [t.clone() for t in params + accs + m]
    ops.cms_accumulate(together[:5], grads, together[5:10], together[10:], [], [2] * 5, [0] * 5, due, **kw)
    for dt in (torch.float32, torch.bfloat16, torch.float64):
        idx = [i for i, p in enumerate(params) if p.dtype == dt]
        p, a, b = ([t.clone() for t in (xs[i] for i in idx)] for xs in (params, accs, m))
        ops.cms_accumulate(p, [grads[i] for i in idx], a, b, [], [2] * len(idx), [0] * len(idx), [due[i] for i in idx], **kw)
        for k, i in enumerate(idx):
            assert torch.equal(together[i], p[k]) and torch.equal(together[5 + i], a[k]) and torch.equal(together[10 + i], b[k])


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_opcheck(backend):
    p = [torch.randn(5, 3), torch.randn(4)]
    args = (p, [torch.randn_like(t) for t in p], [torch.randn_like(t) for t in p], [torch.zeros_like(t) for t in p],
            [torch.zeros_like(t) for t in p], [1, 2], [0, 3], [True, False], "adam", 1e-3, 0.0, 0.0, False, 0.9,
            0.999, 1e-8, 0.0, True)
    with ops.use_backend(backend):
        torch.library.opcheck(torch.ops.nested_learning.cms_accumulate.default, args)


def _good():
    p = [torch.randn(4, 3), torch.randn(5)]
    return {"params": p, "grads": [torch.randn_like(t) for t in p], "accumulators": [torch.zeros_like(t) for t in p],
            "exp_avgs": [torch.zeros_like(t) for t in p], "exp_avg_sqs": [], "counts": [0, 1], "steps": [0, 0],
            "due": [True, False]}


BAD = [
    ("lengths", lambda a, k: a.update(grads=a["grads"][:1]), ValueError, "grads must have 2 entries"),
    ("due length", lambda a, k: a.update(due=[True]), ValueError, "due must have 2 entries"),
    ("acc shape", lambda a, k: a["accumulators"].__setitem__(1, torch.zeros(4)), ValueError, "accumulators[1] must match params[1]"),
    ("acc dtype", lambda a, k: a["accumulators"].__setitem__(0, torch.zeros(4, 3, dtype=torch.bfloat16)), ValueError,
     "accumulators[0] must match params[0]"),
    ("grad dtype", lambda a, k: a["grads"].__setitem__(0, a["grads"][0].double()), ValueError, "grads[0] must match"),
    ("contiguous", lambda a, k: a["params"].__setitem__(0, torch.randn(3, 4).T), ValueError, "params[0] must be contiguous"),
    ("count", lambda a, k: a.update(counts=[0, -1]), ValueError, "counts[1] and steps[1] must be integers >= 0"),
    ("momentum bufs", lambda a, k: a.update(exp_avgs=[]), ValueError, "exp_avgs must have 2 entries"),
    ("adam v", lambda a, k: k.update(optimizer="adam"), ValueError, "exp_avg_sqs must have 2 entries"),
    ("optimizer", lambda a, k: k.update(optimizer="lion"), ValueError, "optimizer must be one of"),
    ("lr", lambda a, k: k.update(lr=-1.0), ValueError, "lr must be >= 0"),
    ("lr nan", lambda a, k: k.update(lr=float("nan")), ValueError, "lr must be a finite number"),
    ("beta2", lambda a, k: k.update(beta2=1.0), ValueError, "beta2 must lie in [0, 1)"),
    ("nesterov", lambda a, k: k.update(nesterov=True, dampening=0.1), ValueError, "nesterov needs"),
    ("due type", lambda a, k: a.update(due=[1, 0]), TypeError, "due[0] must be a bool"),
]


@pytest.mark.parametrize("name,mutate,error,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument_and_mutates_nothing(name, mutate, error, message):
    args, kwargs = _good(), {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9}
    mutate(args, kwargs)
    before = [t.clone() for key in ("params", "accumulators", "exp_avgs") for t in args[key]]
    with pytest.raises(error, match=re.escape(message)):
        ops.cms_accumulate(*args.values(), **kwargs)
    after = [t for key in ("params", "accumulators", "exp_avgs") for t in args[key]]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_hyper_defaults_match_the_op_defaults():
    import inspect

    defaults = {k: v.default for k, v in inspect.signature(ops.cms_accumulate).parameters.items()
                if v.default is not inspect.Parameter.empty}
    assert defaults == {k: getattr(Hyper(), k) for k in defaults}


def test_compile_fullgraph_matches_eager():
    def step(p, g, a, m):
        ops.cms_accumulate(p, g, a, m, [], [1, 0, 4], [2, 0, 1], [True, False, True], optimizer="sgd", lr=0.1,
                           momentum=0.9, average=True)

    gen = torch.Generator().manual_seed(0)
    p = [torch.randn(s, generator=gen) for s in ((5, 3), (4,), (7,))]
    g = [torch.randn(t.shape, generator=gen) for t in p]
    eager = ([t.clone() for t in p], [torch.ones_like(t) for t in p], [torch.full_like(t, 0.5) for t in p])
    compiled = tuple([t.clone() for t in xs] for xs in eager)
    step(eager[0], g, *eager[1:])
    torch.compile(step, fullgraph=True)(compiled[0], g, *compiled[1:])
    for a, b in zip(sum(eager, []), sum(compiled, [])):
        assert torch.equal(a, b)
