"""cms_chunk_update: the reference forms agree, every backend against float64 by the rule,
edge cases of the chunking, custom-op contract, torch.compile, and bad input."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import nested_learning as nl
from nested_learning import ops, testing
from nested_learning.benchmark import SPECS
from nested_learning.benchmark.cms_chunk_update import _case
from nested_learning.benchmark.core import Checker
from nested_learning.reference import cms_chunk_update as ref

SPEC = SPECS["cms_chunk_update"]
CPU = torch.device("cpu")
BACKENDS = [b for b in ops.BACKENDS if ops.available(b, CPU)[0]]
NOT_TRITON = [b for b in BACKENDS if b != "triton"]  # float64 is not a triton dtype


def inputs(B=2, T=23, d=5, h=6, e=3, dtype=torch.float64, seed=0, shared=False):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    w1, w2 = (0.5 * r(h, d), 0.5 * r(e, h)) if shared else (0.5 * r(B, h, d), 0.5 * r(B, e, h))
    return r(B, T, d).to(dtype), r(B, T, e).to(dtype), w1, w2


def outputs_and_grads(fn, x, v, w1, w2, lr, C, act, seed=1):
    leaves = [t.clone().requires_grad_() for t in (x, v, w1, w2)]
    outs = fn(*leaves, lr, C, act)
    gen = torch.Generator().manual_seed(seed)
    cots = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o in outs]
    return [*outs, *torch.autograd.grad(outs, leaves, cots)]


# ----------------------------------------------------------------------------- the reference itself


@pytest.mark.parametrize("activation", ref.ACTIVATIONS)
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 23, 40])
def test_chunked_and_analytic_backward_equal_token_loop_in_float64(activation, chunk_size):
    x, v, w1, w2 = inputs()
    loop = outputs_and_grads(ref.recurrent, x, v, w1, w2, 0.1, chunk_size, activation)
    chunked = outputs_and_grads(ref.chunked, x, v, w1, w2, 0.1, chunk_size, activation)
    for a, b in zip(chunked, loop):
        assert testing.relative_error(a, b) < 1e-13
    _, _, _, s1, s2, acts = ref.chunked_with_residuals(x, v, w1, w2, 0.1, chunk_size, activation)
    gen = torch.Generator().manual_seed(1)
    cots = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in loop[:3]]
    manual = ref.chunked_backward(x, v, s1, s2, acts, 0.1, chunk_size, activation, *cots)
    for a, b in zip(manual, loop[3:]):
        assert testing.relative_error(a, b) < 1e-13
    for K in (2, 3, 64):  # starts kept every K chunks (and the final weights), the others rebuilt
        _, _, _, k1, k2, _ = ref.chunked_with_residuals(x, v, w1, w2, 0.1, chunk_size, activation, K)
        assert k1.shape[1] == -(-s1.shape[1] // K) + 1
        rebuilt = ref.chunked_backward(x, v, k1, k2, acts, 0.1, chunk_size, activation, *cots, K)
        for a, b in zip(rebuilt, loop[3:]):
            assert testing.relative_error(a, b) < 1e-13


def test_one_token_by_hand():
    """Chunk of one: o = W2 σ(W1 x) with the start weights, then W2 −= lr e aᵀ, W1 −= lr δ xᵀ."""
    x, v = torch.tensor([[[1.0, -2.0]]], dtype=torch.float64), torch.tensor([[[0.5]]], dtype=torch.float64)
    w1 = torch.tensor([[[0.3, 0.1], [-0.2, 0.4]]], dtype=torch.float64)
    w2 = torch.tensor([[[1.5, -0.5]]], dtype=torch.float64)
    z = w1[0] @ x[0, 0]
    a = z.relu()
    o = w2[0] @ a
    err = o - v[0, 0]
    delta = (w2[0].T @ err) * (z > 0).double()
    for backend in NOT_TRITON:
        with ops.use_backend(backend):
            out, w1f, w2f = nl.cms_chunk_update(x, v, w1, w2, 0.25, 1, "relu")
        torch.testing.assert_close(out[0, 0], o, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(w2f[0], w2[0] - 0.25 * torch.outer(err, a), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(w1f[0], w1[0] - 0.25 * torch.outer(delta, x[0, 0]), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- every backend by the rule

CHECK_CASES = SPEC.check_cases(CPU) + [
    _case(torch.float32, 2, 64, 16, 24, 64, "gelu"),  # T = one chunk exactly
    _case(torch.float32, 1, 70, 8, 8, 1, "relu"),  # per-token updates
    _case(torch.float32, 2, 30, 12, 20, 200, "silu", e=7),  # chunk > T: no update inside
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CHECK_CASES, ids=lambda c: c.name)
def test_backend_within_budget_of_float64_truth(backend, case):
    if not SPEC.backend_supports(backend, case):
        pytest.skip(f"{backend} does not support {case.name}")
    result = Checker(SPEC, case, CPU).check_backend(backend)
    assert result.error is None, result.error
    failures = [v for v in result.verdicts if not v.passed]
    assert not failures, failures
    assert {v.quantity for v in result.verdicts} == {"o", "w1_final", "w2_final", "dx", "dtarget", "dw1", "dw2"}


@pytest.mark.parametrize("backend", NOT_TRITON)
def test_backend_float64_gradcheck(backend):
    x, v, w1, w2 = inputs(B=2, T=9, d=3, h=4, e=2, shared=True)

    def fn(x, v, w1, w2):
        with ops.use_backend(backend):
            return nl.cms_chunk_update(x, v, w1, w2, 0.2, 4, "gelu")

    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (x, v, w1, w2)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunk_at_least_T_reads_start_weights_and_applies_one_update(backend):
    x, v, w1, w2 = (t.float() for t in inputs(B=2, T=10, d=6, h=8, e=6, shared=True))
    with ops.use_backend(backend):
        o, w1f, w2f = nl.cms_chunk_update(x, v, w1, w2, 0.05, 16, "gelu")
    torch.testing.assert_close(o, F.gelu(x @ w1.T) @ w2.T, rtol=1e-5, atol=1e-5)
    e = o - v
    g2 = torch.einsum("bte,bth->beh", e, F.gelu(x @ w1.T))
    torch.testing.assert_close(w2f, w2 - 0.05 * g2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_lr_is_a_plain_mlp_and_weights_stay(backend):
    x, v, w1, w2 = (t.float() for t in inputs(B=1, T=33, d=4, h=5, e=4, shared=True))
    with ops.use_backend(backend):
        o, w1f, w2f = nl.cms_chunk_update(x, v, w1, w2, 0.0, 8, "silu")
    torch.testing.assert_close(o, F.silu(x @ w1.T) @ w2.T, rtol=1e-5, atol=1e-5)
    assert torch.equal(w1f[0], w1) and torch.equal(w2f[0], w2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_autograd_no_saved_residuals_and_inputs_untouched(backend):
    x, v, w1, w2 = (t.float() for t in inputs(B=2, T=20, d=4, h=6, e=4))
    copies = [t.clone() for t in (x, v, w1, w2)]
    with ops.use_backend(backend), torch.no_grad():
        o, w1f, _ = nl.cms_chunk_update(x, v, w1, w2, 0.1, 8)
        outs = torch.ops.nested_learning.cms_chunk_update(x, v, w1, w2, 0.1, 8, "gelu", False)
    assert all(t.numel() == 0 for t in outs[3:])
    for a, b in zip((x, v, w1, w2), copies):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- custom-op contract


@pytest.mark.parametrize("backend", NOT_TRITON)
def test_opcheck(backend):
    x, v, w1, w2 = (t.float() for t in inputs(B=2, T=13, d=4, h=6, e=3))
    with ops.use_backend(backend):
        for save in (True, False):
            args = (x.requires_grad_(save), v, w1, w2, 0.1, 5, "gelu", save)
            torch.library.opcheck(torch.ops.nested_learning.cms_chunk_update.default, args)
        _, _, _, s1, s2, acts = torch.ops.nested_learning.cms_chunk_update(x.detach(), v, w1, w2, 0.1, 5, "gelu", True)
        bwd = (x.detach(), v, s1, s2, acts, 0.1, 5, "gelu", torch.randn(2, 13, 3), torch.randn_like(w1),
               torch.randn_like(w2))
        torch.library.opcheck(torch.ops.nested_learning.cms_chunk_update_bwd.default, bwd,
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    cms = nl.ContinuumMemorySystem(12, 24, num_levels=2, chunk_sizes=[4, 16], in_context=True)
    x = torch.randn(2, 37, 12)
    compiled = torch.compile(cms, fullgraph=True)
    eager = cms(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), list(cms.parameters()))
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), list(cms.parameters()))
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- bad input

BAD = [
    ("x rank", lambda a: a.update(x=a["x"][0]), ValueError, "x must have 3 dimensions"),
    ("target shape", lambda a: a.update(target=a["target"][:, :5]), ValueError, "target must have shape"),
    ("target dtype", lambda a: a.update(target=a["target"].double()), TypeError, "target must have x's dtype"),
    ("w1 shape", lambda a: a.update(w1=a["w1"][:, :3]), ValueError, "w1 must have shape [h, d]"),
    ("w2 batch", lambda a: a.update(w2=a["w2"].expand(3, *a["w2"].shape)), ValueError, "w2 must have shape [B, e, h]"),
    ("w rank", lambda a: a.update(w1=a["w1"][0]), ValueError, "w1 must be a [h, d] or [B, h, d] tensor"),
    ("int x", lambda a: a.update(x=a["x"].int()), TypeError, "x must have a floating dtype"),
    ("lr", lambda a: a.update(lr=float("inf")), ValueError, "lr must be a finite number"),
    ("chunk 0", lambda a: a.update(chunk_size=0), ValueError, "chunk_size must be an integer >= 1"),
    ("chunk float", lambda a: a.update(chunk_size=2.0), ValueError, "chunk_size must be an integer >= 1"),
    ("activation", lambda a: a.update(activation="tanh"), ValueError, "activation must be one of"),
]


@pytest.mark.parametrize("name,mutate,error,message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(name, mutate, error, message):
    x, v, w1, w2 = (t.float() for t in inputs(B=2, T=8, d=4, h=6, e=3, shared=True))
    args = {"x": x, "target": v, "w1": w1, "w2": w2, "lr": 0.1, "chunk_size": 4, "activation": "gelu"}
    mutate(args)
    with pytest.raises(error, match=re.escape(message)):
        nl.cms_chunk_update(**args)


@pytest.mark.parametrize("backend", NOT_TRITON)
def test_autocast_runs_the_activations_in_its_dtype(backend):
    # under autocast, fp32 x with a bf16 target (a Linear's output) run as bf16, as if cast by hand;
    # the op's body computes as without autocast
    x, v, w1, w2 = inputs(dtype=torch.float32)
    w1, w2 = w1.float(), w2.float()
    with ops.use_backend(backend):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o, w1f, w2f = ops.cms_chunk_update(x, v.bfloat16(), w1, w2, 0.1, 4)
        want = ops.cms_chunk_update(x.bfloat16(), v.bfloat16(), w1, w2, 0.1, 4)
    assert o.dtype == torch.bfloat16 and w1f.dtype == torch.float32
    for a, b in zip((o, w1f, w2f), want):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match="target must have x's dtype"):  # outside autocast: an error
        ops.cms_chunk_update(x, v.bfloat16(), w1, w2, 0.1, 4)
