"""Triton ``memory_mlp_momentum`` (``nested_learning.kernels.memory_mlp_momentum``) through the public op against the
float64 reference over several steps, and its shared memory on sm_90 (ahead-of-time compile, no GPU needed).

Accuracy rule (``nested_learning.testing``): every step's outputs are fed back (parameters, momenta, last outputs,
P, accumulated weight gradients; the memory weights move by a small step on each step's gradient); at the end the
relative Frobenius error of the parameters, momenta and last outputs (each concatenated over the group), every
accumulated weight gradient, P and the losses of all steps against the reference run on float64 copies must stay
within 2 × the error of the reference run in the kernel's dtype + the dtype's unit roundoff. Every case mixes tensors
of odd sizes (0-d, 1 element, 0 elements, exactly S, more than S, less than S), has_prev on some tensors only (none
on the first step), steps without compute_grad and nonzero starting weight gradients (the op adds into them). Block
caps of 16 (``tiled``) give several forward, backward and projection tiles, full-block and tail tiles, several
reduction steps over S and several backward splits.

Without a GPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), where the
kernels split the product operands into bf16 parts as the GPU compiler does (bf16x3 / bf16x6); the tensor cores'
accumulation order is not reproduced.
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

from nested_learning import ops, testing  # noqa: E402
from nested_learning.kernels import memory_mlp_momentum as kernels  # noqa: E402
from nested_learning.reference import memory_mlp_momentum as reference  # noqa: E402

pytestmark = pytest.mark.triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
STEPS = 5
SEED = 0
SHARED_MEMORY_SM90 = 232448  # bytes per block (227 KiB)
TARGET = dict(S=4096, h=64)  # the GPU target memory

# name: (S, h, dtype, loss, weight decay, block cap (None: the kernels' own blocks), product precision (None: the
# kernels' own: bf16x3 for bf16, bf16x6 otherwise; 0: exact fp32))
CASES = {
    "fp32-surrogate": (16, 16, torch.float32, "surrogate", 0.01, None, None),
    "fp32-l2": (16, 16, torch.float32, "l2_regression", 0.01, None, None),
    "fp32-dot-nodecay": (16, 16, torch.float32, "dot", 0.0, None, None),
    "bf16-surrogate": (64, 16, torch.bfloat16, "surrogate", 0.01, None, None),
    "bf16-dot": (64, 16, torch.bfloat16, "dot", 0.01, None, None),
    "fp32-surrogate-tiled-h12-ieee": (64, 12, torch.float32, "surrogate", 0.01, 16, 0),
    "bf16-surrogate-tiled-nodecay": (64, 16, torch.bfloat16, "surrogate", 0.0, 16, None),
    "bf16-l2-tiled": (32, 16, torch.bfloat16, "l2_regression", 0.01, 16, None),
    "fp16-dot-tiled": (16, 16, torch.float16, "dot", 0.01, 16, None),
}


def _shapes(S: int) -> list[tuple[int, ...]]:
    """0-d, 1 element, 0 elements, exactly S, a few blocks with a tail, less than S, many full blocks + a tail."""
    return [(), (1,), (0, 3), (S,), (5, 7), (3, 2 * S + 1), (S - 3,), (3 * S + 1, 6)]


class Run:
    """One tensor group and its memory, stepped by one backend (states in float64 for float64 parameters, else fp32)."""

    def __init__(self, S: int, h: int, dtype: torch.dtype, loss: str, weight_decay: float):
        gen = torch.Generator().manual_seed(SEED)
        sd = torch.float64 if dtype == torch.float64 else torch.float32
        r = lambda *s, scale=1.0: torch.randn(s, generator=gen, dtype=torch.float64) * scale  # noqa: E731
        shapes = _shapes(S)
        self.loss, self.weight_decay = loss, weight_decay
        self.params = [r(*s).to(dtype) for s in shapes]
        self.momenta = [r(*s, scale=0.1).to(sd) for s in shapes]
        self.prev = [r(*s, scale=0.1).to(sd) for s in shapes]
        ws = [r(h, 2 * S, scale=(2 * S) ** -0.5), r(h, scale=0.1), r(h, scale=0.1) + 1.0, r(h, scale=0.1),
              r(S, h, scale=h**-0.5), r(S, scale=0.05)]  # fmt: skip
        self.weights = [w.to(sd) for w in ws]
        self.weight_grads = [r(*w.shape, scale=0.01).to(sd) for w in ws]  # nonzero: the op adds into them
        self.projection = (0.1 * torch.eye(S, dtype=torch.float64) + r(S, S, scale=0.01)).to(sd)
        # ‖g‖ = 0.1·√n: the surrogate's gradient scales with 1/‖g‖, so a tensor whose drawn gradient happens to be tiny
        # (likely for a scalar) would dominate every memory gradient with one ill-conditioned output
        unit = lambda x: x * (0.1 * x.numel() ** 0.5 / x.norm()) if x.numel() else x  # noqa: E731
        self.grads = [[unit(r(*s)).to(dtype) for s in shapes] for _ in range(STEPS)]
        self.losses: list[torch.Tensor] = []

    def step(self, i: int, backend: str, device: torch.device) -> None:
        n = len(self.params)
        before = [g.clone() for g in self.weight_grads]
        move = lambda ts: [t.to(device) for t in ts]  # noqa: E731
        state = [move(x) for x in (self.params, self.momenta, self.prev, self.weights, self.weight_grads)]
        proj = self.projection.to(device)
        with ops.use_backend(backend):
            loss = ops.memory_mlp_momentum(
                state[0], move(self.grads[i]), state[1], state[2], [i > 0 and j % 3 != 1 for j in range(n)], state[3],
                state[4], proj, lr=0.05, momentum=0.9, weight_decay=self.weight_decay, loss=self.loss,
                loss_scale=1 / n, compute_grad=i % 3 != 2, projection_lr=0.05,
            )  # fmt: skip
        back = lambda ts: [t.cpu() for t in ts]  # noqa: E731
        self.params, self.momenta, self.prev, self.weights, self.weight_grads = (back(x) for x in state)
        self.projection = proj.cpu()
        self.losses.append(loss.cpu().reshape(1))
        # the memory moves by a small step on this step's gradient
        self.weights = [w - 0.05 * (g - g0) for w, g, g0 in zip(self.weights, self.weight_grads, before)]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Parameters, momenta and last outputs each as one vector over the group (a 1-element tensor alone would
        judge one ill-conditioned scalar against the reference's luck), every weight gradient, P, the losses."""
        flat = lambda ts: torch.cat([t.reshape(-1) for t in ts])  # noqa: E731
        out = {"params": flat(self.params), "momenta": flat(self.momenta), "prev_outputs": flat(self.prev)}
        out.update({f"weight_grads[{k}]": g for k, g in enumerate(self.weight_grads)})
        out.update(projection=self.projection, loss=torch.cat(self.losses))
        return out


def _run(case: tuple, backend: str, dtype: torch.dtype, device: torch.device) -> Run:
    S, h, _, loss, wd, _, _ = case
    run = Run(S, h, dtype, loss, wd)
    for i in range(STEPS):
        run.step(i, backend, device)
    return run


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, monkeypatch):
    S, h, dtype, loss, wd, cap, prec = CASES[case]
    cfg = kernels._config(dtype)
    if cap is not None:  # small blocks: several tiles of every kind, full-block and tail tiles, several splits
        cfg = dataclasses.replace(cfg, BM=cap, BH=cap, BK=cap, BN=cap, BB=cap, BC=cap, BP=cap)
    if prec is not None:
        cfg = dataclasses.replace(cfg, prec=prec)
    monkeypatch.setattr(kernels, "_config", lambda _dtype: cfg)
    mine = _run(CASES[case], "triton", dtype, DEVICE)
    exact = _run(CASES[case], "reference", torch.float64, torch.device("cpu"))
    same = _run(CASES[case], "reference", dtype, torch.device("cpu"))
    got = mine.tensors()
    for name, want in same.tensors().items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
    verdicts = testing.judge(got, exact.tensors(), [same.tensors()], dtype)
    failures = [v for v in verdicts if not v.passed]
    assert not failures, f"{case}: {failures}"


def test_empty_group_returns_zero_and_touches_nothing():
    S, h = 16, 16
    ws = [torch.randn(h, 2 * S), torch.randn(h), torch.randn(h), torch.randn(h), torch.randn(S, h), torch.randn(S)]
    acc = [torch.ones_like(w) for w in ws]
    empty = [torch.zeros(0, 2, device=DEVICE)]
    ws, acc = [w.to(DEVICE) for w in ws], [a.to(DEVICE) for a in acc]
    loss = kernels.memory_mlp_momentum(empty, [e.clone() for e in empty], [e.clone() for e in empty],
                                       [e.clone() for e in empty], [True], ws, acc, ws[0].new_empty(0, 0),
                                       reference.Hyper(lr=0.1, momentum=0.9))  # fmt: skip
    assert loss.shape == () and loss.dtype == torch.float32 and loss.item() == 0.0
    assert all(torch.equal(a, torch.ones_like(a)) for a in acc)


def test_rejects_float64():
    S, h = 16, 16
    ws = [torch.zeros(h, 2 * S), *(torch.zeros(h) for _ in range(3)), torch.zeros(S, h), torch.zeros(S)]
    ws = [w.double().to(DEVICE) for w in ws]
    p = torch.zeros(4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="float64"):
        kernels.memory_mlp_momentum([p], [p.clone()], [p.clone()], [p.clone()], [False], ws, [w.clone() for w in ws],
                                    ws[0].new_empty(0, 0), reference.Hyper(lr=0.1, momentum=0.9))  # fmt: skip


# ----------------------------------------------------------------------------- sm_90 shared memory

_AOT_CASES = [("surrogate", True), ("l2_regression", True)]  # dot: a subset of the surrogate kernels


def _compile_sm90(dtype: torch.dtype) -> list[dict]:
    """Compile, for sm_90, every kernel launch of a step at the target memory (S = 4096, h = 64) for the surrogate and
    l2_regression losses with compute_grad (the largest variants), over tensors with full-block and tail tiles, with
    the pointer alignment and integer divisibility the launcher specializes on."""
    from triton.backends.compiler import GPUTarget

    types = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
             torch.int64: "i64", torch.int32: "i32"}  # fmt: skip
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
    S, h = TARGET["S"], TARGET["h"]
    numels = [130 * S + 5, 100, S, 1]
    for loss, grad in _AOT_CASES:
        params = [torch.zeros(n, dtype=dtype) for n in numels]
        state = lambda: [torch.zeros(n) for n in numels]  # noqa: E731
        ws = [torch.zeros(h, 2 * S), torch.zeros(h), torch.ones(h), torch.zeros(h), torch.zeros(S, h), torch.zeros(S)]
        hyper = reference.Hyper(lr=0.1, momentum=0.9, weight_decay=0.01, loss=loss, compute_grad=grad)
        kernels.memory_mlp_momentum(params, [p.clone() for p in params], state(), state(), [True, False, True, True],
                                    ws, [w.clone() for w in ws], torch.zeros(S, S), hyper)  # fmt: skip
    report = []
    for kernel, signature, meta, options, attrs in launches.values():
        source = triton.compiler.ASTSource(kernel, signature, meta, attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        report.append(dict(kernel=kernel.__name__, meta={k: str(m) for k, m in meta.items()}, options=options,
                           shared=compiled.metadata.shared))  # fmt: skip
    return report


@pytest.mark.parametrize("dtype", ["bfloat16", pytest.param("float32", marks=pytest.mark.slow)])
def test_shared_memory_fits_sm90(dtype):
    # a fresh interpreter without TRITON_INTERPRET, where @triton.jit makes compilable kernels
    env = {n: v for n, v in os.environ.items() if n != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, __file__, dtype], env=env, capture_output=True, text=True,
                         timeout=900, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.splitlines()[-1])
    assert {r["kernel"] for r in report} == {n for n in vars(kernels) if n.endswith("_kernel")}
    too_big = [r for r in report if r["shared"] > SHARED_MEMORY_SM90]
    assert not too_big, too_big


if __name__ == "__main__":
    print(json.dumps(_compile_sm90(getattr(torch, sys.argv[1]))))
