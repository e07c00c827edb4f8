"""C++ CPU cms_chunk_update kernels (``nested_learning::cms_chunk_update_{fwd,bwd}_cpp``), through the
public op, against the float64 reference.

Accuracy rule (``nested_learning.testing``): the relative Frobenius error of o, the final weights and
the gradients of x, target, w1, w2 against the reference in float64 (run on the inputs as the kernel
sees them, 16-bit ones upcast) must stay within 2 × max(error of ``reference.recurrent``, error of
``reference.chunked``, both run on the same inputs in their dtype) + the dtype's unit roundoff. The
residuals the forward keeps for the backward (the start weights of every K-th chunk and the final
weights, per-token z | W2ᵀe | e) are held to the same rule against ``reference.chunked_with_residuals``;
so is the backward for every checkpoint stride K, where it rebuilds the other chunks' start weights.

Two threads are used throughout, so that every schedule runs: B = 2 puts one sequence on each
thread (single-threaded GEMMs); with B = 1 or 3 and h ≥ 64 the two threads split the hidden units
of all sequences (a team, partial sums of O, de and dX reduced between barriers); below that, and
in float64, one thread drives the call and every GEMM uses both.
"""

from __future__ import annotations

import pytest
import torch

import nested_learning as nl
from nested_learning import testing
from nested_learning.ops.cms_chunk_update import checkpoint_every
from nested_learning.reference import cms_chunk_update as reference

if not hasattr(torch.ops.nested_learning, "cms_chunk_update_fwd_cpp"):
    pytest.skip("nested_learning._C was built without the C++ cms_chunk_update kernels", allow_module_level=True)

# name: (B, T, d, h, e, chunk_size, activation, dtype)
CASES = {
    "gelu": (2, 50, 16, 32, 8, 16, "gelu", torch.float32),
    "silu": (2, 50, 16, 32, 8, 16, "silu", torch.float32),
    "relu": (2, 50, 16, 32, 8, 16, "relu", torch.float32),
    "odd-sizes-B3": (3, 37, 5, 7, 3, 8, "gelu", torch.float32),
    "chunk1-B1": (1, 37, 5, 7, 3, 1, "silu", torch.float32),
    "chunk-over-T": (2, 37, 5, 7, 3, 64, "relu", torch.float32),
    "chunk-equals-T-B1": (1, 32, 8, 16, 8, 32, "gelu", torch.float32),
    "wider": (2, 130, 64, 96, 40, 32, "gelu", torch.float32),
    "chunk128-stored": (2, 300, 16, 32, 8, 128, "silu", torch.float32),  # K = 1: every start stored
    "team-B1": (1, 70, 12, 136, 10, 8, "gelu", torch.float32),  # hidden units split 72 + 64
    "team-B3-chunk40": (3, 90, 9, 100, 7, 40, "silu", torch.float32),  # GEMM weight updates, ragged slices
    "team-bf16-B1": (1, 45, 16, 64, 8, 4, "relu", torch.bfloat16),
    "bf16": (2, 50, 16, 32, 8, 16, "gelu", torch.bfloat16),
    "bf16-odd-B3": (3, 37, 5, 7, 3, 8, "silu", torch.bfloat16),
    "fp16": (2, 50, 16, 32, 8, 16, "relu", torch.float16),
    "fp64": (2, 50, 16, 32, 8, 16, "silu", torch.float64),
    "fp64-odd-B3": (3, 37, 5, 7, 3, 8, "gelu", torch.float64),
}
NAMES = ("x", "target", "w1", "w2")


@pytest.fixture(autouse=True)
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _inputs(B, T, d, h, e, C, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    ct = reference.compute_dtype(torch.empty(0, dtype=dtype))
    return dict(
        x=(r(B, T, d) / d**0.5).to(dtype),
        target=r(B, T, e).to(dtype),
        w1=(r(B, h, d) / d**0.5).to(ct),
        w2=(r(B, e, h) / h**0.5).to(ct),
        lr=0.5 / min(C, T),  # a chunk's update stays a moderate step
        do=r(B, T, e).to(dtype),
        dw1=r(B, h, d).to(ct),
        dw2=r(B, e, h).to(ct),
    )


def _run(fn, inp, C, act, upcast=False):
    """o, final weights and the four gradients of ``fn`` through autograd."""
    leaves = [(inp[n].double() if upcast else inp[n]).detach().clone().requires_grad_() for n in NAMES]
    o, w1f, w2f = fn(*leaves, inp["lr"], C, act)
    cot = (inp["do"].to(o.dtype), inp["dw1"].to(w1f.dtype), inp["dw2"].to(w2f.dtype))
    grads = torch.autograd.grad((o, w1f, w2f), leaves, cot)
    return {"o": o, "w1_final": w1f, "w2_final": w2f, **{"d" + n: g for n, g in zip(NAMES, grads)}}


def _cpp(*args):
    with nl.ops.use_backend("cpp"):
        return nl.ops.cms_chunk_update(*args)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case):
    B, T, d, h, e, C, act, dtype = CASES[case]
    inp = _inputs(B, T, d, h, e, C, dtype)
    exact = _run(reference.recurrent, inp, C, act, upcast=True)
    assert all(torch.isfinite(t).all() for t in exact.values())
    refs = [_run(fn, inp, C, act) for fn in (reference.recurrent, reference.chunked)]
    with nl.ops.use_backend("cpp"):
        mine = _run(nl.ops.cms_chunk_update, inp, C, act)
    for name, want in refs[0].items():
        assert mine[name].dtype == want.dtype and mine[name].shape == want.shape, name
    failures = [v for v in testing.judge(mine, exact, refs, dtype) if not v.passed]
    assert not failures, f"{case} ({dtype}): {failures}"


def _residuals(outs):
    return dict(zip(("w1_starts", "w2_starts", "activations"), outs[3:]))


def _strides(C, T):
    """The default stride for chunk C, 1 (every start stored), 3, and one stride past the last chunk."""
    return sorted({checkpoint_every(torch.device("cpu"), C), 1, 3, -(-T // C) + 1})


@pytest.mark.parametrize("case", list(CASES))
def test_saved_residuals_match_reference(case):
    B, T, d, h, e, C, act, dtype = CASES[case]
    inp = _inputs(B, T, d, h, e, C, dtype)
    args = [inp[n] for n in NAMES]
    for K in _strides(C, T):
        exact = _residuals(reference.chunked_with_residuals(*(t.double() for t in args), inp["lr"], C, act, K))
        want = _residuals(reference.chunked_with_residuals(*args, inp["lr"], C, act, K))
        mine = _residuals(torch.ops.nested_learning.cms_chunk_update_fwd_cpp(*args, inp["lr"], C, act, True, K))
        for name, w in want.items():
            assert mine[name].dtype == w.dtype and mine[name].shape == w.shape, (name, K)
        failures = [v for v in testing.judge(mine, exact, [want], dtype) if not v.passed]
        assert not failures, f"{case} ({dtype}), K={K}: {failures}"


@pytest.mark.parametrize("case", ["gelu", "odd-sizes-B3", "chunk1-B1", "wider", "bf16-odd-B3", "fp64-odd-B3"])
def test_backward_rebuilds_starts_for_every_stride(case):
    # the backward from checkpoints every K chunks (the rest rebuilt) against float64, for several K
    B, T, d, h, e, C, act, dtype = CASES[case]
    inp = _inputs(B, T, d, h, e, C, dtype)
    exact = _run(reference.recurrent, inp, C, act, upcast=True)
    refs = [_run(fn, inp, C, act) for fn in (reference.recurrent, reference.chunked)]
    grads = [f"d{n}" for n in NAMES]
    args = [inp[n] for n in NAMES]
    cot = (inp["do"], inp["dw1"], inp["dw2"])
    ops = torch.ops.nested_learning
    for K in _strides(C, T):
        outs = ops.cms_chunk_update_fwd_cpp(*args, inp["lr"], C, act, True, K)
        mine = dict(zip(grads, ops.cms_chunk_update_bwd_cpp(*args[:2], *outs[3:], inp["lr"], C, act, *cot, K)))
        failures = [v for v in testing.judge(mine, {g: exact[g] for g in grads}, [{g: r[g] for g in grads}
                                                                                    for r in refs], dtype)
                    if not v.passed]
        assert not failures, f"{case} ({dtype}), K={K}: {failures}"


@pytest.mark.parametrize("B", [1, 2, 3])
def test_forward_without_grad_matches(B):
    # no chunk-start weights are kept without grad; the outputs are the same bits
    inp = _inputs(B, 45, 8, 24, 8, 16, torch.float32)
    args = (inp["x"], inp["target"], inp["w1"], inp["w2"], inp["lr"], 16, "silu")
    with torch.no_grad():
        plain = _cpp(*args)
    leaves = [inp["w1"].clone().requires_grad_(), inp["w2"].clone().requires_grad_()]
    kept = _cpp(*args[:2], *leaves, *args[4:])
    for a, b in zip(plain, kept):
        assert torch.equal(a, b.detach())


def test_residuals_layout_and_shared_weights():
    inp = _inputs(2, 45, 8, 24, 8, 16, torch.float32)
    w1, w2 = inp["w1"][0], inp["w2"][0]
    fwd = torch.ops.nested_learning.cms_chunk_update_fwd_cpp
    o, w1f, w2f, s1, s2, acts = fwd(inp["x"], inp["target"], w1.expand(2, -1, -1).contiguous(),
                                    w2.expand(2, -1, -1).contiguous(), inp["lr"], 16, "gelu", True, 1)
    assert s1.shape == (2, 3, 24, 8) and s2.shape == (2, 3, 8, 24) and acts.shape == (2, 45, 2 * 24 + 8)
    assert torch.equal(s1[:, 0], w1.expand(2, -1, -1)) and torch.equal(s2[:, 0], w2.expand(2, -1, -1))
    torch.testing.assert_close(acts[..., 48:], o - inp["target"], rtol=0, atol=0)  # e = o − v
    z = torch.cat([inp["x"][:, c * 16:(c + 1) * 16] @ s1[:, c].transpose(1, 2) for c in range(3)], 1)
    torch.testing.assert_close(acts[..., :24], z, rtol=1e-5, atol=1e-6)  # z with each chunk's start W1
    # every second chunk's start (chunks 0 and 2) and the final weights, the same bits
    k1, k2 = fwd(inp["x"], inp["target"], w1.expand(2, -1, -1).contiguous(), w2.expand(2, -1, -1).contiguous(),
                 inp["lr"], 16, "gelu", True, 2)[3:5]
    assert torch.equal(k1, torch.stack([s1[:, 0], s1[:, 2], w1f], 1))
    assert torch.equal(k2, torch.stack([s2[:, 0], s2[:, 2], w2f], 1))
    none = fwd(inp["x"], inp["target"], inp["w1"], inp["w2"], inp["lr"], 16, "gelu", False, 1)
    assert all(t.shape == (0,) and t.dtype == torch.float32 for t in none[3:])
    # [h, d] / [e, h] weights shared by the batch give the per-sequence result
    shared = _cpp(inp["x"], inp["target"], w1, w2, inp["lr"], 16, "gelu")
    expanded = _cpp(inp["x"], inp["target"], w1.expand(2, -1, -1), w2.expand(2, -1, -1), inp["lr"], 16, "gelu")
    for a, b in zip(shared, expanded):
        assert torch.equal(a, b)


def test_backward_checks_activations_shape():
    inp = _inputs(2, 20, 4, 6, 3, 8, torch.float32)
    args = [inp[n] for n in NAMES]
    ops = torch.ops.nested_learning
    _, _, _, s1, s2, acts = ops.cms_chunk_update_fwd_cpp(*args, inp["lr"], 8, "gelu", True, 3)
    with pytest.raises(RuntimeError, match=r"activations must be \[B, T, 2h \+ e\]"):
        ops.cms_chunk_update_bwd_cpp(inp["x"], inp["target"], s1, s2, acts[..., :-1], inp["lr"], 8, "gelu",
                                     inp["do"], inp["dw1"], inp["dw2"], 3)
    with pytest.raises(RuntimeError, match=r"w1_starts must be \[B, S, h, d\]"):  # slots kept for another K
        ops.cms_chunk_update_bwd_cpp(inp["x"], inp["target"], s1, s2, acts, inp["lr"], 8, "gelu",
                                     inp["do"], inp["dw1"], inp["dw2"], 1)
    with pytest.raises(RuntimeError, match="checkpoint_every must be >= 1"):
        ops.cms_chunk_update_fwd_cpp(*args, inp["lr"], 8, "gelu", True, 0)


def test_bad_activation_is_an_error():
    inp = _inputs(1, 8, 4, 4, 4, 4, torch.float32)
    with pytest.raises(RuntimeError, match="activation"):
        torch.ops.nested_learning.cms_chunk_update_fwd_cpp(
            inp["x"], inp["target"], inp["w1"], inp["w2"], 0.1, 4, "tanh", False, 1
        )
