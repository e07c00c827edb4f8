"""Triton ``cms_chunk_update`` (``nested_learning.kernels.cms_chunk_update``) through the public op against the
float64 reference, and its shared memory on sm_90 (ahead-of-time compile, no GPU needed).

Accuracy rule (``nested_learning.testing``): the relative Frobenius error of o, the final weights, the saved
residuals (the kept chunk-start weights and per-token activations) and all four gradients against ``reference.chunked``
in float64 (on the inputs as the kernels see them, 16-bit ones upcast) must stay within 2 × the error of the
PyTorch references (the token loop and the chunked form, computing from the same inputs) + the dtype's unit
roundoff. The forward without saved residuals must give the same o and final weights, bit for bit. The op keeps
the start weights of one chunk per 128 tokens on CPU, 512 on GPU (here: the first chunk and the final weights)
and the backward rebuilds the others; the raw kernels are also checked with every start kept and with a stride
in between.

Without a GPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), which
reproduces the rounding of 16-bit tensor-core operands but not the products' accumulation order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
if __name__ != "__main__" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import nested_learning  # noqa: E402
from nested_learning import testing  # noqa: E402
from nested_learning.kernels import cms_chunk_update as kernels  # noqa: E402
from nested_learning.ops.cms_chunk_update import checkpoint_every  # noqa: E402
from nested_learning.reference import cms_chunk_update as reference  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LR = 0.02
SHARED_MEMORY_SM90 = 232448  # bytes per block (227 KiB)
TARGET = dict(d=1024, h=4096, e=1024, chunk_size=256)  # the GPU target shape

# name: (B, T, d, h, e, chunk_size, activation, dtype, block cap (None: the kernels' own blocks))
CASES = {
    "fp32-gelu-partial": (2, 10, 5, 7, 3, 4, "gelu", torch.float32, None),
    "fp32-silu-chunk1": (1, 5, 5, 7, 3, 1, "silu", torch.float32, None),
    "fp32-relu-chunk>T": (2, 9, 5, 7, 3, 16, "relu", torch.float32, None),
    "fp32-tiled": (1, 13, 20, 36, 18, 8, "gelu", torch.float32, 16),
    "bf16-gelu-partial": (2, 10, 5, 7, 3, 4, "gelu", torch.bfloat16, None),
    "bf16-silu-chunk1": (1, 6, 5, 7, 3, 1, "silu", torch.bfloat16, None),
    "bf16-relu-chunk>T": (1, 9, 5, 7, 3, 12, "relu", torch.bfloat16, None),
    "bf16-tiled": (2, 13, 20, 36, 18, 8, "silu", torch.bfloat16, 16),
    "fp16-gelu-partial": (1, 10, 6, 9, 4, 4, "gelu", torch.float16, None),
}
NAMES = ("o", "w1_final", "w2_final", "dx", "dtarget", "dw1", "dw2")
RESIDUALS = ("w1_starts", "w2_starts", "activations")


def _inputs(B, T, d, h, e, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return dict(
        x=r(B, T, d).to(dtype), target=r(B, T, e).to(dtype), w1=r(B, h, d) / d**0.5, w2=r(B, e, h) / h**0.5,
        do=r(B, T, e).to(dtype), dw1=r(B, h, d), dw2=r(B, e, h),
    )


def _reference(fn, inp, chunk_size, activation, upcast):
    """o, final weights and the four gradients of a reference formulation through autograd."""
    leaves = [(inp[n].double() if upcast else inp[n].clone()).requires_grad_() for n in ("x", "target", "w1", "w2")]
    o, w1f, w2f = fn(*leaves, LR, chunk_size, activation)
    cot = (inp["do"].to(o.dtype), inp["dw1"].to(w1f.dtype), inp["dw2"].to(w2f.dtype))
    return dict(zip(NAMES, (o, w1f, w2f, *torch.autograd.grad((o, w1f, w2f), leaves, cot))))


def _residuals(inp, chunk_size, activation, upcast, K=None):
    """The reference's residuals as the triton backend keeps them (its own stride K unless given)."""
    K = checkpoint_every(DEVICE, chunk_size) if K is None else K
    args = [inp[n].double() if upcast else inp[n] for n in ("x", "target", "w1", "w2")]
    outs = reference.chunked_with_residuals(*args, LR, chunk_size, activation, K)
    return dict(zip(RESIDUALS, outs[3:]))


def _triton(inp, chunk_size, activation):
    """The public op under the triton backend: outputs, gradients, and the saved residuals of the raw op (whose
    run without residuals must agree bit for bit and return empty ones)."""
    dev = {n: t.to(DEVICE) for n, t in inp.items()}
    leaves = [dev[n].clone().requires_grad_() for n in ("x", "target", "w1", "w2")]
    with nested_learning.ops.use_backend("triton"):
        o, w1f, w2f = nested_learning.ops.cms_chunk_update(*leaves, LR, chunk_size, activation)
        grads = torch.autograd.grad((o, w1f, w2f), leaves, (dev["do"], dev["dw1"], dev["dw2"]))
        raw, bare = (torch.ops.nested_learning.cms_chunk_update(
            dev["x"], dev["target"], dev["w1"], dev["w2"], LR, chunk_size, activation, save) for save in (True, False))
    assert all(torch.equal(s, b) for s, b in zip(raw[:3], bare[:3]))
    assert all(t.shape == (0,) and t.dtype == torch.float32 for t in bare[3:])
    out = dict(zip(NAMES, (o, w1f, w2f, *grads)))
    out.update(zip(RESIDUALS, raw[3:]))
    return {n: t.detach().cpu() for n, t in out.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, monkeypatch):
    B, T, d, h, e, chunk_size, activation, dtype, cap = CASES[case]
    if cap is not None:  # small blocks: several row, column and reduction tiles with ragged edges
        small = dataclasses.replace(kernels._config(dtype), BM=cap, BN=cap, BK=cap, BW=cap, BKW=cap)
        monkeypatch.setattr(kernels, "_config", lambda _dtype: small)
    inp = _inputs(B, T, d, h, e, dtype)
    mine = _triton(inp, chunk_size, activation)
    exact = _reference(reference.chunked, inp, chunk_size, activation, upcast=True)
    refs = [_reference(fn, inp, chunk_size, activation, upcast=False)
            for fn in (reference.chunked, reference.recurrent)]
    for name, want in exact.items():
        assert mine[name].dtype == refs[0][name].dtype and mine[name].shape == want.shape, name
    verdicts = testing.judge(mine, exact, refs, dtype)
    verdicts += testing.judge(mine, _residuals(inp, chunk_size, activation, True),
                              [_residuals(inp, chunk_size, activation, False)], dtype)
    failures = [v for v in verdicts if not v.passed]
    assert not failures, f"{case}: {failures}"


@pytest.mark.parametrize("case", ["fp32-gelu-partial", "bf16-tiled"])
@pytest.mark.parametrize("K", [1, 2])
def test_stride_of_kept_starts(case, K, monkeypatch):
    # the raw kernels with every start kept (K = 1) and with every second one: residuals and gradients
    B, T, d, h, e, chunk_size, activation, dtype, cap = CASES[case]
    if cap is not None:
        small = dataclasses.replace(kernels._config(dtype), BM=cap, BN=cap, BK=cap, BW=cap, BKW=cap)
        monkeypatch.setattr(kernels, "_config", lambda _dtype: small)
    inp = _inputs(B, T, d, h, e, dtype)
    dev = {n: t.to(DEVICE) for n, t in inp.items()}
    args = (dev["x"], dev["target"], dev["w1"], dev["w2"], LR, chunk_size, activation)
    outs = kernels.cms_chunk_update_fwd(*args, True, K)
    grads = kernels.cms_chunk_update_bwd(*args[:2], *outs[3:], *args[4:], dev["do"], dev["dw1"], dev["dw2"], K)
    mine = {n: t.cpu() for n, t in zip(RESIDUALS + NAMES[3:], (*outs[3:], *grads))}
    exact = _reference(reference.chunked, inp, chunk_size, activation, upcast=True)
    refs = [_reference(fn, inp, chunk_size, activation, upcast=False) for fn in (reference.chunked, reference.recurrent)]
    pick = lambda r: {n: r[n] for n in NAMES[3:]}  # noqa: E731
    verdicts = testing.judge({n: mine[n] for n in NAMES[3:]}, pick(exact), [pick(r) for r in refs], dtype)
    verdicts += testing.judge({n: mine[n] for n in RESIDUALS}, _residuals(inp, chunk_size, activation, True, K),
                              [_residuals(inp, chunk_size, activation, False, K)], dtype)
    failures = [v for v in verdicts if not v.passed]
    assert not failures, f"{case}, K={K}: {failures}"


# ----------------------------------------------------------------------------- sm_90 shared memory


def _compile_sm90(dtype: torch.dtype) -> list[dict]:
    """Compile, for sm_90, every kernel launch of a forward (with and without saved residuals) and a backward at
    the target shape over a full and a partial chunk, with the pointer alignment the launcher specializes on."""
    from triton.backends.compiler import GPUTarget

    types = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    launches = {}

    def record(kernel, grid, *args, **meta):
        options = {n: meta.pop(n) for n in ("num_warps", "num_stages") if n in meta}
        signature, attrs = {}, {}
        for i, (name, arg) in enumerate(zip(kernel.arg_names, args)):
            tensor = isinstance(arg, torch.Tensor)
            signature[name] = "*" + types[arg.dtype] if tensor else "i32" if isinstance(arg, int) else "fp32"
            if tensor or (isinstance(arg, int) and arg % 16 == 0):
                attrs[(i,)] = [["tt.divisibility", 16]]
        signature.update({name: "constexpr" for name in meta})
        launches[repr((kernel.__name__, signature, meta, options))] = (kernel, signature, meta, options, attrs)

    kernels._launch = record
    d, h, e, C = TARGET["d"], TARGET["h"], TARGET["e"], TARGET["chunk_size"]
    x, v = torch.zeros(1, C + 16, d, dtype=dtype), torch.zeros(1, C + 16, e, dtype=dtype)
    w1, w2 = torch.zeros(1, h, d), torch.zeros(1, e, h)
    K = 2  # two chunks: the first start kept, the second rebuilt
    kernels.cms_chunk_update_fwd(x, v, w1, w2, LR, C, "gelu", False, K)
    _, _, _, s1, s2, acts = kernels.cms_chunk_update_fwd(x, v, w1, w2, LR, C, "gelu", True, K)
    kernels.cms_chunk_update_bwd(x, v, s1, s2, acts, LR, C, "gelu", v, w1, w2, K)
    report = []
    for kernel, signature, meta, options, attrs in launches.values():
        source = triton.compiler.ASTSource(kernel, signature, meta, attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        report.append(dict(kernel=kernel.__name__, meta={k: str(m) for k, m in meta.items()}, options=options,
                           shared=compiled.metadata.shared))
    return report


@pytest.mark.parametrize("dtype", ["bfloat16", pytest.param("float32", marks=pytest.mark.slow)])
def test_shared_memory_fits_sm90(dtype):
    # a fresh interpreter without TRITON_INTERPRET, where @triton.jit makes compilable kernels
    env = {n: v for n, v in os.environ.items() if n != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__, dtype], env=env, capture_output=True, text=True,
                         timeout=900, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.splitlines()[-1])
    assert {r["kernel"] for r in report} == {n for n in vars(kernels) if n.endswith("_kernel")}
    too_big = [r for r in report if r["shared"] > SHARED_MEMORY_SM90]
    assert not too_big, too_big


if __name__ == "__main__":
    print(json.dumps(_compile_sm90(getattr(torch, sys.argv[1]))))
