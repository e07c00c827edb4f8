"""Triton delta-rule kernels (``nested_learning.kernels.delta_rule``) against the float64 token loop,
and their shared memory on sm_90 (ahead-of-time compile, no GPU needed).

Accuracy rule: the relative Frobenius error of o, the final state and every gradient against
``reference.recurrent`` in float64 (run on the inputs as the kernels see them, 16-bit ones upcast)
must stay within 2 × max(error of ``reference.recurrent``, error of ``reference.chunked``, both
computing in fp32 from the same inputs) + the dtype's unit roundoff (``nested_learning.testing``).

Without a GPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
The kernels round 16-bit tensor-core operands to nearest even themselves there, so the rounding that
bf16/fp16 products make on the GPU is reproduced; the products' accumulation order is not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
if __name__ != "__main__" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from nested_learning import testing  # noqa: E402
from nested_learning.kernels import delta_rule as kernels  # noqa: E402
from nested_learning.reference import delta_rule as reference  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SCALE = 0.3
SHARED_MEMORY_SM90 = 232448  # bytes per block (227 KiB)

# name: (B, T, H, K, V, cu_seqlens, dtype of q/k/v, dtype of beta/g, gate, initial state, dht)
CASES = {
    "T1": (1, 1, 2, 16, 16, None, torch.float32, torch.float32, True, True, True),
    "T100-plain": (2, 100, 1, 16, 16, None, torch.float32, torch.float32, False, False, False),
    "T130-K24-V40": (1, 130, 1, 24, 40, None, torch.float32, torch.float32, True, True, True),
    "varlen-empty": (1, 150, 1, 16, 16, [0, 30, 30, 150], torch.float32, torch.float32, True, True, True),
    "K100-V100": (1, 70, 1, 100, 100, None, torch.float32, torch.float32, True, True, False),
    "fp16": (1, 130, 1, 24, 40, None, torch.float16, torch.float32, True, True, True),
    "fp16-gates": (2, 64, 1, 16, 16, None, torch.float16, torch.float16, True, False, True),
    "bf16-varlen": (1, 100, 1, 32, 32, [0, 70, 70, 100], torch.bfloat16, torch.bfloat16, True, False, True),
}


def _inputs(B, T, H, K, V, cu, dtype, gate_dtype, gate, h0, dht, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    N = B if cu is None else len(cu) - 1
    return dict(
        q=r(B, T, H, K).to(dtype),
        k=F.normalize(r(B, T, H, K), dim=-1).to(dtype),
        v=r(B, T, H, V).to(dtype),
        beta=r(B, T, H).sigmoid().to(gate_dtype),
        g=F.logsigmoid(r(B, T, H)).to(gate_dtype) if gate else None,
        initial_state=r(N, H, K, V) if h0 else None,
        cu_seqlens=None if cu is None else torch.tensor(cu, dtype=torch.int32),
        do=r(B, T, H, V).to(dtype),
        dht=r(N, H, K, V) if dht else None,
    )


def _reference(fn, x, upcast):
    """o, final state and the gradients of the present inputs of a reference through autograd."""
    names = ("q", "k", "v", "beta", "g", "initial_state")
    leaves = {n: None if x[n] is None else (x[n].double() if upcast else x[n].detach()).requires_grad_() for n in names}
    o, ht = fn(*(leaves[n] for n in names[:5]), SCALE, leaves["initial_state"], True, x["cu_seqlens"])
    dht = torch.zeros_like(ht) if x["dht"] is None else x["dht"].to(ht.dtype)
    wrt = [n for n in names if leaves[n] is not None]
    grads = torch.autograd.grad((o, ht), [leaves[n] for n in wrt], (x["do"].to(o.dtype), dht))
    return {"o": o, "ht": ht, **{"d" + n: gr for n, gr in zip(wrt, grads)}}


def _kernels(x):
    dev = {n: None if t is None else t.to(DEVICE) for n, t in x.items()}
    args = [dev[n] for n in ("q", "k", "v", "beta", "g", "initial_state", "cu_seqlens")] + [SCALE]
    o, ht = kernels.delta_rule_fwd(*args)
    grads = kernels.delta_rule_bwd(*args, dev["do"], dev["dht"])
    names = ("dq", "dk", "dv", "dbeta", "dg", "dinitial_state")
    return {"o": o, "ht": ht, **{n: gr for n, gr in zip(names, grads) if gr is not None}}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case):
    x = _inputs(*CASES[case])
    dtype = x["q"].dtype
    exact = _reference(reference.recurrent, x, upcast=True)
    fp32 = [_reference(fn, x, upcast=False) for fn in (reference.recurrent, reference.chunked)]
    mine = _kernels(x)
    assert set(mine) == set(exact)
    for name, want in exact.items():
        expected_dtype = torch.float32 if name == "ht" else fp32[0][name].dtype
        assert mine[name].dtype == expected_dtype and mine[name].shape == want.shape, name
    failures = [v for v in testing.judge({n: t.cpu() for n, t in mine.items()}, exact, fp32, dtype) if not v.passed]
    assert not failures, f"{case} ({dtype}): {failures}"


# ----------------------------------------------------------------------------- sm_90 shared memory


def _compile_sm90(K: int, dtype: torch.dtype) -> list[dict]:
    """Compile, for sm_90, every kernel launch that K = V = K inputs of this dtype make (both V-block
    widths of the serial kernels), with the pointer alignment the launcher would specialize on."""
    from triton.backends.compiler import GPUTarget

    types = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32"}
    launches = {}

    def record(kernel, grid, *args, **meta):
        options = {n: meta.pop(n) for n in ("num_warps", "num_stages", "maxnreg") if meta.get(n) is not None}
        meta.pop("maxnreg", None)
        signature, attrs = {}, {}
        for i, (name, arg) in enumerate(zip(kernel.arg_names, args)):
            tensor = isinstance(arg, torch.Tensor)
            signature[name] = "*" + types[arg.dtype] if tensor else "i32" if isinstance(arg, int) else "fp32"
            if tensor or (isinstance(arg, int) and arg % 16 == 0):
                attrs[(i,)] = [["tt.divisibility", 16]]
        signature.update({name: "constexpr" for name in meta})
        launches[repr((kernel.__name__, signature, meta, options))] = (kernel, signature, meta, options, attrs)

    kernels._launch = record
    for heads in (1, kernels._TARGET_SMS):
        q, v = torch.zeros(1, 64, heads, K, dtype=dtype), torch.zeros(1, 64, heads, K, dtype=dtype)
        beta, h0 = torch.zeros(1, 64, heads), torch.zeros(1, heads, K, K)
        kernels.delta_rule_fwd(q, q, v, beta, beta, h0, None, 1.0)
        kernels.delta_rule_bwd(q, q, v, beta, beta, h0, None, 1.0, v, h0)
    report = []
    for kernel, signature, meta, options, attrs in launches.values():
        source = triton.compiler.ASTSource(kernel, signature, meta, attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        report.append(dict(kernel=kernel.__name__, meta=meta, options=options, shared=compiled.metadata.shared))
    return report


@pytest.mark.parametrize("dtype", ["bfloat16", pytest.param("float32", marks=pytest.mark.slow)])
def test_shared_memory_fits_sm90(dtype):
    # fresh interpreters without TRITON_INTERPRET (where @triton.jit makes compilable kernels), K = 128
    # and K = 256 side by side
    env = {n: v for n, v in os.environ.items() if n != "TRITON_INTERPRET"}
    runs = [
        subprocess.Popen([sys.executable, __file__, str(K), dtype], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for K in (128, 256)
    ]
    report = []
    for run in runs:
        out, err = run.communicate(timeout=900)
        assert run.returncode == 0, err[-3000:]
        report += json.loads(out.splitlines()[-1])
    assert {r["kernel"] for r in report} == {n for n in vars(kernels) if n.endswith("_kernel")}
    too_big = [r for r in report if r["shared"] > SHARED_MEMORY_SM90]
    assert not too_big, too_big


if __name__ == "__main__":
    print(json.dumps(_compile_sm90(int(sys.argv[1]), getattr(torch, sys.argv[2]))))
