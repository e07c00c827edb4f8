"""delta_rule: every backend against the float64 token loop, gradients, custom-op contract,
torch.compile, and bad input."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nested_learning as nl
from nested_learning import ops, testing
from nested_learning.benchmark import SPECS
from nested_learning.benchmark.core import Checker
from nested_learning.benchmark.delta_rule import _case, _packed
from nested_learning.reference import delta_rule as ref

SPEC = SPECS["delta_rule"]
CPU = torch.device("cpu")
BACKENDS = [b for b in ops.BACKENDS if ops.available(b, CPU)[0]]
FUSED = [b for b in BACKENDS if b != "reference"]


def inputs(B=2, T=50, H=2, K=8, V=12, dtype=torch.float64, gate=True, h0=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x = dict(
        q=r(B, T, H, K), k=F.normalize(r(B, T, H, K), dim=-1), v=r(B, T, H, V), beta=r(B, T, H).sigmoid(),
        g=F.logsigmoid(r(B, T, H)) if gate else None, initial_state=r(B, H, K, V) if h0 else None,
    )
    return {n: (t.to(dtype) if t is not None and n != "initial_state" else t) for n, t in x.items()}


def grads_of(fn, x, **kw):
    """Outputs and gradients of every present input of ``fn`` for fixed cotangents."""
    leaves = {n: t.clone().requires_grad_() for n, t in x.items() if t is not None}
    args = {n: leaves.get(n) for n in x}
    o, ht = fn(args["q"], args["k"], args["v"], args["beta"], args["g"], initial_state=args["initial_state"],
               output_final_state=True, **kw)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    dht = torch.randn(ht.shape, generator=gen, dtype=torch.float64).to(ht.dtype)
    grads = torch.autograd.grad((o, ht), list(leaves.values()), (do, dht))
    return [o, ht, *grads]


# ----------------------------------------------------------------------------- the reference itself


@pytest.mark.parametrize("chunk_size", [1, 16, 64])
@pytest.mark.parametrize("gate,h0", [(True, True), (False, False), (True, False)])
def test_chunked_equals_token_loop_in_float64(chunk_size, gate, h0):
    x = inputs(T=70, K=24, V=40, gate=gate, h0=h0)
    loop = grads_of(ref.recurrent, x)
    chunked = grads_of(ref.chunked, x, chunk_size=chunk_size)
    for a, b in zip(chunked, loop):
        assert testing.relative_error(a, b) < 1e-13


def test_chunked_backward_equals_autograd_in_float64_with_packing():
    x = inputs(B=1, T=90, gate=True, h0=False)
    cu = torch.tensor([0, 30, 30, 31, 90])
    x["initial_state"] = torch.randn(4, 2, 8, 12, dtype=torch.float64)
    loop = grads_of(ref.recurrent, x, cu_seqlens=cu)
    o, ht = loop[:2]
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    dht = torch.randn(ht.shape, generator=gen, dtype=torch.float64)
    manual = ref.chunked_backward(x["q"], x["k"], x["v"], x["beta"], x["g"], None, x["initial_state"], cu, do, dht, 16)
    for a, b in zip(manual, loop[2:]):
        assert testing.relative_error(a, b) < 1e-13


def test_reference_gradcheck():
    x = inputs(B=1, T=9, H=1, K=3, V=4)
    fn = lambda *a: ref.chunked(*a[:5], initial_state=a[5], output_final_state=True, chunk_size=4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in x.values()))


def test_recurrence_definition_by_hand():
    """One token from a known state: S₁ = α S₀ + β k (v − α S₀ᵀk)ᵀ, o = S₁ᵀ(scale q)."""
    K, V = 3, 2
    S0 = torch.arange(6.0, dtype=torch.float64).reshape(1, 1, K, V)
    f64 = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    q, k, v, beta, g = f64(1.0, 2.0, 3.0), f64(0.0, 1.0, 0.0), f64(5.0, -1.0), 0.5, -0.1
    a = torch.tensor(g, dtype=torch.float64).exp()
    S1 = a * S0[0, 0] + beta * torch.outer(k, v - a * S0[0, 0].T @ k)
    o_expected = S1.T @ (0.7 * q)
    view = lambda t, *s: t.reshape(*s)  # noqa: E731
    for backend in (b for b in BACKENDS if b != "triton"):  # float64 is not a triton dtype
        with ops.use_backend(backend):
            o, ht = nl.delta_rule(view(q, 1, 1, 1, K), view(k, 1, 1, 1, K), view(v, 1, 1, 1, V),
                                  torch.full((1, 1, 1), beta, dtype=torch.float64),
                                  torch.full((1, 1, 1), g, dtype=torch.float64), scale=0.7,
                                  initial_state=S0, output_final_state=True)
        torch.testing.assert_close(ht[0, 0], S1, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(o[0, 0, 0], o_expected, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- every backend by the rule

CHECK_CASES = SPEC.check_cases(CPU) + [
    _case(torch.float32, 3, 64, 1, 7, 5, gate=False, h0=True),  # T = one chunk exactly
    _packed(torch.float32, (1, 65, 128), 1, 20, 16),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CHECK_CASES, ids=lambda c: c.name)
def test_backend_within_budget_of_float64_truth(backend, case):
    if not SPEC.backend_supports(backend, case):
        pytest.skip(f"{backend} does not support {case.name}")
    if backend == "triton":
        pytest.importorskip("triton")
    result = Checker(SPEC, case, CPU).check_backend(backend)
    assert result.error is None, result.error
    failures = [v for v in result.verdicts if not v.passed]
    assert not failures, failures
    assert {v.quantity for v in result.verdicts} >= {"o", "final_state", "dq", "dk", "dv", "dbeta"}


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_backend_float64_gradcheck(backend):
    x = inputs(B=1, T=11, H=2, K=3, V=4)

    def fn(q, k, v, beta, g, h0):
        with ops.use_backend(backend):
            return nl.delta_rule(q, k, v, beta, g, initial_state=h0, output_final_state=True)

    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in x.values()))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 2), T=st.integers(1, 150), H=st.integers(1, 3), K=st.integers(1, 40), V=st.integers(1, 40),
    gate=st.booleans(), h0=st.booleans(), backend=st.sampled_from([b for b in BACKENDS if b != "triton"]),
)
def test_random_shapes_within_budget(B, T, H, K, V, gate, h0, backend):
    case = _case(torch.float32, B, T, H, K, V, gate=gate, h0=h0)
    result = Checker(SPEC, case, CPU, seed=T).check_backend(backend)
    assert result.passed, (result.error, result.worst)


@pytest.mark.parametrize("backend", BACKENDS)
def test_special_values(backend):
    """β = 0 leaves the state alone; g = −200 wipes it; zero queries read zero; huge values stay exact."""
    x = inputs(B=1, T=5, H=1, K=4, V=4, dtype=torch.float32)
    h0 = x["initial_state"].float()
    with ops.use_backend(backend):
        o, ht = nl.delta_rule(x["q"], x["k"], x["v"], torch.zeros_like(x["beta"]), None, initial_state=h0, output_final_state=True)
        torch.testing.assert_close(ht, h0)
        wipe = torch.full_like(x["g"], -200.0)
        _, ht = nl.delta_rule(x["q"], x["k"], x["v"], torch.zeros_like(x["beta"]), wipe, initial_state=h0, output_final_state=True)
        assert torch.count_nonzero(ht) == 0
        o, _ = nl.delta_rule(torch.zeros_like(x["q"]), x["k"], x["v"], x["beta"], x["g"], initial_state=h0)
        assert torch.count_nonzero(o) == 0
        big = {n: t for n, t in x.items()}
        big["v"], big["initial_state"] = x["v"] * 1e6, h0 * 1e6
        o, ht = nl.delta_rule(big["q"], big["k"], big["v"], big["beta"], big["g"], initial_state=big["initial_state"], output_final_state=True)
    o64, ht64 = ref.recurrent(*(t.double() for t in (big["q"], big["k"], big["v"], big["beta"], big["g"])),
                              initial_state=big["initial_state"].double(), output_final_state=True)
    assert torch.isfinite(o).all() and testing.relative_error(o, o64) < 1e-5
    assert testing.relative_error(ht, ht64) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_and_untouched_state(backend):
    x = inputs(B=2, T=40, H=3, K=8, V=8, dtype=torch.float32)
    h0 = x["initial_state"].float()
    h0_copy = h0.clone()
    strided = {n: t.transpose(1, 2).contiguous().transpose(1, 2) for n, t in x.items() if n in ("q", "k", "v")}
    assert not strided["q"].is_contiguous()
    with ops.use_backend(backend):
        a = nl.delta_rule(strided["q"], strided["k"], strided["v"], x["beta"], x["g"], initial_state=h0, output_final_state=True)
        b = nl.delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], initial_state=h0, output_final_state=True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(h0, h0_copy)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_autocast_runs_q_k_v_in_its_dtype(backend):
    # under autocast, mixed fp32/bf16 q, k, v (normalised keys stay fp32 there) run as bf16; the
    # op's body computes as without autocast
    x = inputs(B=1, T=20, H=2, K=4, V=6, dtype=torch.float32)
    beta, g = x["beta"].float(), x["g"].float()
    with ops.use_backend(backend):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o, state = nl.delta_rule(x["q"].bfloat16(), x["k"], x["v"].bfloat16(), beta, g, output_final_state=True)
        want = nl.delta_rule(x["q"].bfloat16(), x["k"].bfloat16(), x["v"].bfloat16(), beta, g,
                             output_final_state=True)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert torch.equal(o, want[0]) and torch.equal(state, want[1])
    with pytest.raises(TypeError, match="q, k, v must share one dtype"):  # outside autocast: an error
        nl.delta_rule(x["q"].bfloat16(), x["k"], x["v"].bfloat16(), beta, g)


# ----------------------------------------------------------------------------- custom-op contract


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_opcheck(backend):
    x = inputs(B=1, T=20, H=2, K=4, V=6, dtype=torch.float32)
    x["initial_state"] = x["initial_state"].float()
    cu = torch.tensor([0, 7, 20])
    h0_packed = torch.randn(2, 2, 4, 6)
    fwd_args = [
        (x["q"], x["k"], x["v"], x["beta"], x["g"], x["initial_state"], None, 0.5),
        (x["q"], x["k"], x["v"], x["beta"], None, None, None, 0.5),
        (x["q"], x["k"], x["v"], x["beta"], x["g"], h0_packed, cu, 0.5),
    ]
    with ops.use_backend(backend):
        for args in fwd_args:
            args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
            torch.library.opcheck(torch.ops.nested_learning.delta_rule.default, args)
        do, dht = torch.randn_like(x["v"]), torch.randn(1, 2, 4, 6)
        bwd = (x["q"], x["k"], x["v"], x["beta"], x["g"], x["initial_state"], None, 0.5, do, dht)
        torch.library.opcheck(torch.ops.nested_learning.delta_rule_bwd.default, bwd, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    class Mixer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 4 * 8 * 3 + 4)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v, b = self.proj(x).split([32, 32, 32, 4], -1)
            q, k, v = (t.reshape(B, T, 4, 8) for t in (q, k, v))
            o, _ = nl.delta_rule(q, F.normalize(k, dim=-1), v, b.sigmoid(), F.logsigmoid(b))
            return o.sum(-2)

    torch.manual_seed(0)
    model, x = Mixer(), torch.randn(2, 33, 16)
    compiled = torch.compile(model, fullgraph=True)
    eager_out = model(x)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), list(model.parameters()))
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out, eager_out)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- bad input


def _good():
    x = inputs(B=1, T=6, H=2, K=4, V=4, dtype=torch.float32)
    x["initial_state"] = x["initial_state"].float()
    return x


BAD = [
    ("q", lambda x: x.update(q=x["q"][0]), ValueError, "q must have 4 dimensions"),
    ("k", lambda x: x.update(k=x["k"][..., :3]), ValueError, "k must have shape"),
    ("v", lambda x: x.update(v=x["v"][:, :5]), ValueError, "v must have shape"),
    ("dtype", lambda x: x.update(k=x["k"].double()), TypeError, "q, k, v must share one dtype"),
    ("int", lambda x: x.update(v=x["v"].int()), TypeError, "v must have a floating dtype"),
    ("beta shape", lambda x: x.update(beta=x["beta"][..., None]), ValueError, "beta must have 3 dimensions"),
    ("beta range", lambda x: x.update(beta=x["beta"] + 2.5), ValueError, "beta must hold finite values in [0.0, 2.0]"),
    ("beta nan", lambda x: x["beta"].__setitem__((0, 0, 0), float("nan")), ValueError, "beta must hold finite"),
    ("g positive", lambda x: x.update(g=x["g"].abs() + 0.1), ValueError, "g must hold finite values in [-inf, 0.0]"),
    ("g -inf", lambda x: x["g"].__setitem__((0, 1, 1), float("-inf")), ValueError, "g must hold finite values"),
    ("state", lambda x: x.update(initial_state=x["initial_state"][:, :1]), ValueError, "initial_state must have shape"),
    ("scale", lambda x: x.update(scale=float("nan")), ValueError, "scale must be a finite number"),
    ("cu float", lambda x: x.update(cu_seqlens=torch.tensor([0.0, 6.0])), TypeError, "cu_seqlens must be a 1-D integer"),
    ("cu end", lambda x: x.update(cu_seqlens=torch.tensor([0, 5])), ValueError, "cu_seqlens must rise from 0 to T=6"),
    ("cu order", lambda x: x.update(cu_seqlens=torch.tensor([0, 4, 2, 6]), initial_state=None), ValueError, "cu_seqlens must rise"),
    ("not a tensor", lambda x: x.update(q=[1.0]), TypeError, "q must be a torch.Tensor"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,mutate,error,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(backend, name, mutate, error, message):
    x = dict(_good(), scale=None, cu_seqlens=None)
    mutate(x)
    state_before = None if x["initial_state"] is None else x["initial_state"].clone()
    with ops.use_backend(backend), pytest.raises(error, match=re.escape(message)):
        nl.delta_rule(x["q"], x["k"], x["v"], x["beta"], x["g"], scale=x["scale"], initial_state=x["initial_state"],
                      cu_seqlens=x["cu_seqlens"])
    if state_before is not None:
        assert torch.equal(x["initial_state"], state_before)


def test_unknown_or_unavailable_backend_is_an_error(monkeypatch):
    x = _good()
    monkeypatch.setenv("NL_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="NL_BACKEND must be one of"):
        nl.delta_rule(x["q"], x["k"], x["v"], x["beta"])
    monkeypatch.setenv("NL_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend 'triton' was forced but cannot run"):
        nl.delta_rule(x["q"], x["k"], x["v"], x["beta"])
    with pytest.raises(ValueError, match="backend must be one of"):
        with ops.use_backend("fast"):
            pass


def test_default_backend_on_cpu(monkeypatch):
    monkeypatch.delenv("NL_BACKEND", raising=False)
    assert ops.select(CPU) == ("cpp" if ops.HAS_EXT else "reference")
