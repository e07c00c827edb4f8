"""Op-independent machinery shared by ``nested-learning check``, ``nested-learning bench`` and
the pytest-benchmark suites in ``bench/``: cases, evaluation (outputs and gradients),
the correctness verdict and timing."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .. import testing
from ..ops import use_backend

Inputs = dict[str, Any]
Impl = Callable[[Inputs], tuple[Tensor, ...]]

DTYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Case:
    """One problem: an op, its sizes, dtype and options (e.g. gate on/off, packed lengths)."""

    op: str
    dims: tuple[tuple[str, int], ...]
    dtype: torch.dtype
    options: tuple[tuple[str, Any], ...] = ()

    def dim(self, name: str) -> int:
        return dict(self.dims)[name]

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)

    @property
    def shape(self) -> str:
        return " ".join(f"{k}{v}" for k, v in self.dims)

    @property
    def name(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return f"{self.op}/{self.shape.replace(' ', '-')}/{DTYPE_NAMES[self.dtype]}" + (f"/{opts}" if opts else "")


@dataclass
class Spec:
    """What the runners need to know of one op.

    ``call`` runs the op (through ``nested_learning.ops``); ``truth`` is the reference formulation
    that is run in float64 as ground truth; ``references`` are the PyTorch formulations whose
    same-dtype error sets the budget; ``baselines`` are what the op is timed against.
    """

    op: str
    make_inputs: Callable[[Case, torch.device, int], Inputs]
    differentiable: tuple[str, ...]
    outputs: tuple[str, ...]
    call: Impl
    truth: Impl
    references: dict[str, Impl]
    baselines: Callable[[Case, torch.device], dict[str, Impl]]
    check_cases: Callable[[torch.device], list[Case]]
    bench_cases: Callable[[torch.device, bool], list[Case]]
    work: Callable[[Case, str], tuple[float, float]]  # (flop, byte) of one call in a mode
    speedup_bases: tuple[str, ...]  # baselines every row is compared with (x <base> columns)
    backend_supports: Callable[[str, Case], bool] = lambda backend, case: True
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")
    # in-place ops: implementations return None and these are the outputs (the updated state)
    state: Optional[Callable[[Inputs], tuple[Tensor, ...]]] = None
    # timed reference points that compute something else (e.g. a bandwidth floor): never checked
    floors: Callable[[Case, torch.device], dict[str, Impl]] = lambda case, device: {}


def cotangents(outputs: tuple[Tensor, ...], seed: int) -> tuple[Tensor, ...]:
    """Fixed random upstream gradients for ``outputs`` (same for every implementation)."""
    gen = torch.Generator().manual_seed(seed + 1)
    return tuple(torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype) for o in outputs)


def _copy(value: Any, dtype: Optional[torch.dtype]) -> Any:
    """A private copy of a tensor (or list of tensors), floating ones cast to ``dtype`` if given."""
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(v, dtype) for v in value)
    if not isinstance(value, Tensor):
        return value
    return value.to(dtype) if dtype is not None and value.is_floating_point() else value.clone()


def _leaves(spec: Spec, inputs: Inputs, dtype: Optional[torch.dtype]) -> tuple[Inputs, dict[str, Tensor]]:
    """Private copies of the inputs (optionally cast to ``dtype``; in-place ops then never touch
    the shared ones), the differentiable ones as fresh leaves."""
    cast = {k: _copy(v, dtype) for k, v in inputs.items()}
    leaves = {n: cast[n].detach().requires_grad_() for n in spec.differentiable if cast.get(n) is not None}
    return {**cast, **leaves}, leaves


def evaluate(
    spec: Spec,
    impl: Impl,
    inputs: Inputs,
    seed: int,
    dtype: Optional[torch.dtype] = None,
    backend: Optional[str] = None,
) -> dict[str, Tensor]:
    """Outputs and gradients (``d<input>``) of ``impl`` for the spec's fixed cotangents; forward
    and backward run with ``backend`` forced (``None``: the default choice)."""
    args, leaves = _leaves(spec, inputs, dtype)
    with use_backend(backend):
        outs = impl(args)
        if spec.state is not None:
            outs = spec.state(args)
        grads = ()
        if leaves:
            grads = torch.autograd.grad(outs, list(leaves.values()), cotangents(outs, seed), allow_unused=True)
    result = {name: out.detach() for name, out in zip(spec.outputs, outs)}
    for name, grad in zip(leaves, grads):
        result["d" + name] = grad if grad is not None else torch.zeros_like(leaves[name])
    return result


@dataclass
class CheckResult:
    case: Case
    implementation: str
    verdicts: list[testing.Verdict]
    error: Optional[str] = None  # an exception message when the implementation failed to run

    @property
    def passed(self) -> bool:
        return self.error is None and all(v.passed for v in self.verdicts)

    @property
    def worst(self) -> Optional[testing.Verdict]:
        return max(self.verdicts, key=lambda v: v.ratio) if self.verdicts else None


class Checker:
    """Ground truth and reference errors of one case, computed once, then any implementation."""

    def __init__(self, spec: Spec, case: Case, device: torch.device, seed: int = 0):
        self.spec, self.case, self.seed = spec, case, seed
        self.inputs = spec.make_inputs(case, device, seed)
        self.truth = evaluate(spec, spec.truth, self.inputs, seed, dtype=torch.float64)
        self.references = [evaluate(spec, ref, self.inputs, seed) for ref in spec.references.values()]

    def check(self, name: str, impl: Impl, backend: Optional[str] = None) -> CheckResult:
        try:
            got = evaluate(self.spec, impl, self.inputs, self.seed, backend=backend)
        except Exception as err:  # reported as a failed check, with its message
            return CheckResult(self.case, name, [], f"{type(err).__name__}: {err}")
        return CheckResult(self.case, name, testing.judge(got, self.truth, self.references, self.case.dtype))

    def check_backend(self, backend: str) -> CheckResult:
        return self.check(backend, self.spec.call, backend)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(
    fn: Callable[[], Any], device: torch.device, min_runs: int = 5, min_seconds: float = 0.5, max_runs: int = 200
) -> tuple[float, int]:
    """Median wall time of ``fn`` in seconds after one warm-up call, and the number of runs
    (at least ``min_runs``, 3 when one call takes over a second, until ``min_seconds`` passed)."""
    t0 = time.perf_counter()
    fn()
    sync(device)
    if time.perf_counter() - t0 > 1.0:
        min_runs = min(min_runs, 3)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < min_seconds):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def timed_call(
    spec: Spec, impl: Impl, inputs: Inputs, mode: str, seed: int = 0, backend: Optional[str] = None
) -> Callable[[], Any]:
    """A zero-argument callable running ``impl`` once in ``mode``: 'fwd+bwd' runs the forward and
    the backward, any other mode ('fwd', 'step') the call alone without autograd, on private
    copies of the inputs."""
    args, leaves = _leaves(spec, inputs, None)
    if mode != "fwd+bwd":

        def forward() -> Any:
            with torch.no_grad(), use_backend(backend):
                return impl(args)

        return forward
    with use_backend(backend):
        cots = cotangents(impl(args), seed)
    wrt = list(leaves.values())

    def forward_backward() -> Any:
        with use_backend(backend):
            return torch.autograd.grad(impl(args), wrt, cots, allow_unused=True)

    return forward_backward
