"""The C++ and Triton backends of ``cms_accumulate`` against ``reference.cms_accumulate.step``.

Each case runs 20 steps of a multi-frequency schedule (tensors of periods 1, 3, 5, 2, ...: a tensor
is due when (t + 1) % period == 0) over tensors of odd sizes, advancing counts and steps as a
caller does. SGD must match the reference bit for bit (torch.equal on params, accumulators and
momentum buffers); Adam/AdamW must pass the shared correctness rule against the reference run in
float64 (``nested_learning.testing``), and the C++ kernel matches the reference bit for bit there too.

The Triton kernel runs under the interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1), at
small sizes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

from nested_learning import ops, testing
from nested_learning.reference import cms_accumulate as reference
from nested_learning.reference.cms_accumulate import Hyper

STEPS = 20
SMALL = [(), (1,), (0, 3), (1037,), (33, 70)]
LARGE = SMALL + [(70001,)]  # several C++ work blocks, so several threads
CPU = torch.device("cpu")
Data = tuple[list[Tensor], list[list[Tensor]]]  # initial params, gradients of every step
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

SGD = {
    "plain": Hyper("sgd", lr=0.1),
    "momentum-average": Hyper("sgd", lr=0.05, momentum=0.9, average=True),
    "nesterov-decay": Hyper("sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "dampening-decay-average": Hyper("sgd", lr=0.07, momentum=0.8, dampening=0.3, weight_decay=0.02, average=True),
    "decay-average": Hyper("sgd", lr=0.1, weight_decay=0.05, average=True),
}
ADAM = {
    "adam-average": Hyper("adam", lr=1e-2, average=True),
    "adam-decay": Hyper("adam", lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.01),
    "adamw-average": Hyper("adamw", lr=1e-2, weight_decay=0.1, average=True),
}


def _data(shapes: list[tuple[int, ...]], dtype: torch.dtype, seed: int = 0) -> Data:
    """Initial parameters and the gradients of every step, drawn in fp32 and rounded to ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    draw = lambda: [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    return draw(), [draw() for _ in range(STEPS)]


def _run(backend: str, hyper: Hyper, data: Data, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    """Final params and state after the schedule; ``backend='reference'`` calls the reference directly."""
    init, grads = data
    params = [p.to(device, dtype, copy=True) for p in init]
    ct = reference.compute_dtype(params[0])
    state = lambda: [torch.zeros_like(p, dtype=ct) for p in params]
    accs = state()
    exp_avgs = state() if hyper.optimizer != "sgd" or hyper.momentum != 0.0 else []
    exp_avg_sqs = state() if hyper.optimizer != "sgd" else []
    n = len(params)
    counts, steps = [0] * n, [0] * n
    for t in range(STEPS):
        g = [x.to(device, dtype) for x in grads[t]]
        due = [(t + 1) % (1, 3, 5, 2)[i % 4] == 0 for i in range(n)]
        if backend == "reference":
            reference.step(params, g, accs, exp_avgs, exp_avg_sqs, counts, steps, due, hyper)
        else:
            with ops.use_backend(backend):
                ops.cms_accumulate(params, g, accs, exp_avgs, exp_avg_sqs, counts, steps, due,
                                   **dataclasses.asdict(hyper))  # fmt: skip
        for i in range(n):
            counts[i], steps[i] = (0, steps[i] + 1) if due[i] else (counts[i] + 1, steps[i])
    named = {"params": params, "accumulators": accs, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    return {f"{name}[{i}]": x.cpu() for name, xs in named.items() for i, x in enumerate(xs)}


def _assert_bitwise(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert got.keys() == want.keys()
    bad = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not bad, f"not bit-identical to the reference: {bad}"


def _assert_rule(backend: str, hyper: Hyper, shapes: list[tuple[int, ...]], dtype: torch.dtype,
                 device: torch.device) -> None:  # fmt: skip
    """The backend passes the shared correctness rule against the float64 reference."""
    data = _data(shapes, dtype)
    truth = _run("reference", hyper, data, torch.float64, CPU)
    same_dtype = _run("reference", hyper, data, dtype, device)
    got = _run(backend, hyper, data, dtype, device)
    failed = [v for v in testing.judge(got, truth, [same_dtype], dtype) if not v.passed]
    assert not failed, failed


def _cpp_available() -> tuple[bool, str]:
    ok, why = ops.available("cpp", CPU)
    if ok and not hasattr(torch.ops.nested_learning, "cms_accumulate_cpp"):
        return False, "nested_learning._C was built without cms_accumulate"
    return ok, why


cpp_ok, cpp_why = _cpp_available()
needs_cpp = pytest.mark.skipif(not cpp_ok, reason=cpp_why)
triton_ok, triton_why = ops.available("triton", TRITON_DEVICE)
needs_triton = pytest.mark.skipif(not triton_ok, reason=triton_why)


# ------------------------------------------------------------------------------------- C++


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("case", [*SGD, *ADAM])
def test_cpp_bitwise(case: str, dtype: torch.dtype) -> None:
    hyper = {**SGD, **ADAM}[case]
    data = _data(LARGE, dtype)
    _assert_bitwise(_run("cpp", hyper, data, dtype, CPU), _run("reference", hyper, data, dtype, CPU))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(ADAM))
def test_cpp_adam_rule(case: str, dtype: torch.dtype) -> None:
    _assert_rule("cpp", ADAM[case], LARGE, dtype, CPU)


@needs_cpp
def test_cpp_rejects_mismatched_state() -> None:
    p, g = torch.zeros(4), torch.zeros(4)
    acc = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"accumulators\[0\]"):
        torch.ops.nested_learning.cms_accumulate_cpp(
            [p], [g], [acc], [], [], [0], [0], [True], "sgd", 0.1, 0.0, 0.0, False, 0.9, 0.999, 1e-8, 0.0, False
        )


# ----------------------------------------------------------------------------------- Triton


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(SGD))
def test_triton_sgd_bitwise(case: str, dtype: torch.dtype) -> None:
    data = _data(SMALL, dtype)
    want = _run("reference", SGD[case], data, dtype, TRITON_DEVICE)
    _assert_bitwise(_run("triton", SGD[case], data, dtype, TRITON_DEVICE), want)


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(ADAM))
def test_triton_adam_rule(case: str, dtype: torch.dtype) -> None:
    _assert_rule("triton", ADAM[case], SMALL, dtype, TRITON_DEVICE)


@pytest.mark.triton
@needs_triton
def test_triton_fp16_sgd_bitwise() -> None:
    data = _data(SMALL, torch.float16)
    hyper = SGD["dampening-decay-average"]
    want = _run("reference", hyper, data, torch.float16, TRITON_DEVICE)
    _assert_bitwise(_run("triton", hyper, data, torch.float16, TRITON_DEVICE), want)


@pytest.mark.triton
@needs_triton
def test_triton_rejects_float64() -> None:
    p = torch.zeros(4, dtype=torch.float64, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="float64"), ops.use_backend("triton"):
        ops.cms_accumulate([p], [p.clone()], [p.clone()], [], [], [0], [0], [True], lr=0.1)
