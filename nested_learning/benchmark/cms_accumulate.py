"""``cms_accumulate`` cases, inputs, baselines and work model for ``check`` and ``bench``.

A case is one optimizer step over the parameters of an L-level CMS (per level fc1 [h, d],
its bias [h], fc2 [d, h], its bias [d]) with a due pattern: ``none`` (every level mid-window:
the common step), ``first`` (level 0's period ends) or ``all``. The op is compared with the
same step written with ``torch._foreach_*`` ops (eager and compiled) and timed beside a bare
``torch._foreach_add_(accumulators, grads)``, the memory-traffic floor of an accumulate step.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from .. import ops
from ..reference.cms_accumulate import Hyper
from .core import Case, Impl, Inputs, Spec

HYPERS = {
    "sgd": Hyper("sgd", lr=0.05, momentum=0.9, weight_decay=1e-4, average=True),
    "nesterov": Hyper("sgd", lr=0.05, momentum=0.9, nesterov=True, average=False),
    "adam": Hyper("adam", lr=1e-3, weight_decay=1e-2, average=True),
    "adamw": Hyper("adamw", lr=1e-3, weight_decay=1e-2, average=True),
}


def _case(dtype: torch.dtype, L: int, d: int, h: int, optimizer: str, due: str) -> Case:
    return Case("cms_accumulate", (("L", L), ("d", d), ("h", h)), dtype, (("opt", optimizer), ("due", due)))


def _shapes(case: Case) -> list[tuple[int, ...]]:
    d, h = case.dim("d"), case.dim("h")
    return [s for _ in range(case.dim("L")) for s in ((h, d), (h,), (d, h), (d,))]


def make_inputs(case: Case, device: torch.device, seed: int) -> Inputs:
    """Random parameters, gradients and state mid-training (windows 3 gradients deep, 5 steps
    taken); the optimizer state tensors are present only where the optimizer has them."""
    gen = torch.Generator().manual_seed(seed)
    hyper = HYPERS[case.option("opt")]
    shapes = _shapes(case)
    L = case.dim("L")
    due_levels = {"none": [], "first": [0], "all": list(range(L))}[case.option("due")]
    sd = torch.float64 if case.dtype == torch.float64 else torch.float32

    def rand(shape: tuple[int, ...], dtype: torch.dtype, scale: float = 1.0, positive: bool = False) -> Tensor:
        t = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        return (t.abs() if positive else t).to(device=device, dtype=dtype)

    needs_m = hyper.optimizer != "sgd" or hyper.momentum != 0
    return {
        "params": [rand(s, case.dtype) for s in shapes],
        "grads": [rand(s, case.dtype, 1e-2) for s in shapes],
        "accumulators": [rand(s, sd, 3e-2) for s in shapes],
        "exp_avgs": [rand(s, sd, 1e-2) for s in shapes] if needs_m else [],
        "exp_avg_sqs": [rand(s, sd, 1e-4, positive=True) for s in shapes] if hyper.optimizer != "sgd" else [],
        "counts": [3] * len(shapes),
        "steps": [5] * len(shapes),
        "due": [i // 4 in due_levels for i in range(len(shapes))],
        "hyper": hyper,
    }


def call(x: Inputs) -> None:
    h: Hyper = x["hyper"]
    ops.cms_accumulate(
        x["params"], x["grads"], x["accumulators"], x["exp_avgs"], x["exp_avg_sqs"], x["counts"], x["steps"], x["due"],
        optimizer=h.optimizer, lr=h.lr, momentum=h.momentum, dampening=h.dampening, nesterov=h.nesterov,
        beta1=h.beta1, beta2=h.beta2, eps=h.eps, weight_decay=h.weight_decay, average=h.average,
    )


def reference_call(x: Inputs) -> None:
    """The per-tensor reference loop (the ground truth when run in float64)."""
    with ops.use_backend("reference"):
        call(x)


def state(x: Inputs) -> tuple[Tensor, ...]:
    """The updated parameters, accumulators and optimizer moments, each flattened into one vector."""
    return tuple(
        torch.cat([t.reshape(-1) for t in x[name]]) if x[name] else x["params"][0].new_zeros(0)
        for name in ("params", "accumulators", "exp_avgs", "exp_avg_sqs")
    )


def foreach_step(
    params: list[Tensor], grads: list[Tensor], accumulators: list[Tensor], exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor], counts: list[int], steps: list[int], due: list[bool], h: Hyper,
) -> None:
    """The same step in ``torch._foreach_*`` ops (parameters in the state dtype), the way
    torch.optim's multi-tensor optimizers are written: off-cycle tensors accumulate, due ones
    form the window gradient, step and reset."""
    off = [i for i, d in enumerate(due) if not d]
    on = [i for i, d in enumerate(due) if d]
    pick = lambda xs, idx: [xs[i] for i in idx]  # noqa: E731
    if off:
        torch._foreach_add_(pick(accumulators, off), pick(grads, off))
    if not on:
        return
    p, acc = pick(params, on), pick(accumulators, on)
    u = torch._foreach_add(acc, pick(grads, on))
    if h.average:
        torch._foreach_mul_(u, [1.0 / (counts[i] + 1) for i in on])
    if h.optimizer == "adamw":
        torch._foreach_mul_(p, 1.0 - h.lr * h.weight_decay)
    elif h.weight_decay:
        torch._foreach_add_(u, torch._foreach_mul(p, h.weight_decay))
    if h.optimizer == "sgd":
        if h.momentum:
            buf = pick(exp_avgs, on)
            torch._foreach_mul_(buf, h.momentum)
            torch._foreach_add_(buf, torch._foreach_mul(u, 1.0 - h.dampening))
            u = torch._foreach_add(u, torch._foreach_mul(buf, h.momentum)) if h.nesterov else buf
        torch._foreach_sub_(p, torch._foreach_mul(u, h.lr))
    else:
        m, v = pick(exp_avgs, on), pick(exp_avg_sqs, on)
        torch._foreach_lerp_(m, u, 1.0 - h.beta1)
        torch._foreach_mul_(v, h.beta2)
        torch._foreach_addcmul_(v, u, u, 1.0 - h.beta2)
        t = [steps[i] + 1 for i in on]
        denom = torch._foreach_sqrt(v)
        torch._foreach_mul_(denom, [(1.0 - h.beta2**k) ** -0.5 for k in t])
        torch._foreach_add_(denom, h.eps)
        torch._foreach_addcdiv_(p, m, denom, [-h.lr / (1.0 - h.beta1**k) for k in t])
    torch._foreach_zero_(acc)


def _foreach_impl(fn) -> Impl:
    def run(x: Inputs) -> None:
        fn(x["params"], x["grads"], x["accumulators"], x["exp_avgs"], x["exp_avg_sqs"], x["counts"], x["steps"],
           x["due"], x["hyper"])

    return run


@cache
def _compiled_foreach():
    return torch.compile(foreach_step)


def baselines(case: Case, device: torch.device) -> dict[str, Impl]:
    return {"foreach": _foreach_impl(foreach_step), "foreach+compile": _foreach_impl(_compiled_foreach())}


def floors(case: Case, device: torch.device) -> dict[str, Impl]:
    def foreach_add(x: Inputs) -> None:
        torch._foreach_add_(x["accumulators"], x["grads"])

    return {"foreach_add_ floor": foreach_add}


def check_cases(device: torch.device) -> list[Case]:
    f32 = torch.float32
    return [
        _case(f32, 3, 24, 40, "sgd", "first"),
        _case(f32, 2, 17, 33, "nesterov", "all"),
        _case(f32, 2, 24, 40, "adam", "all"),
        _case(f32, 3, 17, 9, "adamw", "first"),
        _case(torch.bfloat16, 2, 24, 40, "sgd", "all"),
        _case(torch.bfloat16, 2, 24, 40, "adamw", "all"),
        _case(torch.float16, 1, 16, 16, "adam", "all"),
    ]


def bench_cases(device: torch.device, quick: bool) -> list[Case]:
    """CPU: 3 levels of d=640, h=2560 (9.8M parameters). GPU: 4 levels of d=4096, h=16384 (0.54B;
    the float64 ground truth and the private copies of every implementation's check must fit
    beside the inputs in 80 GB; the bandwidth fraction is the same as at 1B, far beyond cache)."""
    L, d, h = (4, 4096, 16384) if device.type == "cuda" else (3, 640, 2560)
    main = _case(torch.float32, L, d, h, "sgd", "first")
    if quick:
        return [main]
    return [_case(torch.float32, L, d, h, "sgd", "none"), main, _case(torch.float32, L, d, h, "sgd", "all"),
            _case(torch.float32, L, d, h, "adamw", "all")]


def work(case: Case, mode: str) -> tuple[float, float]:
    """(flop, byte): no flop bound; bytes read and written once: off-cycle g + A (read, write),
    due tensors additionally θ (read, write), A (write zero) and each moment (read, write)."""
    n_level = case.dim("h") * case.dim("d") * 2 + case.dim("h") + case.dim("d")
    L = case.dim("L")
    n_due = {"none": 0, "first": 1, "all": L}[case.option("due")] * n_level
    size = torch.finfo(case.dtype).bits // 8
    hyper = HYPERS[case.option("opt")]
    moments = (hyper.optimizer != "sgd") + (hyper.optimizer != "sgd" or hyper.momentum != 0)
    total = L * n_level
    return 0.0, total * (size + 8) + n_due * (2 * size + 8 * moments)


def backend_supports(backend: str, case: Case) -> bool:
    return not (backend == "triton" and case.dtype == torch.float64)


SPEC = Spec(
    op="cms_accumulate",
    make_inputs=make_inputs,
    differentiable=(),
    outputs=("params", "accumulators", "exp_avgs", "exp_avg_sqs"),
    call=call,
    truth=reference_call,
    references={"reference": reference_call},
    baselines=baselines,
    check_cases=check_cases,
    bench_cases=bench_cases,
    work=work,
    speedup_bases=("reference", "foreach", "foreach+compile", "foreach_add_ floor"),
    backend_supports=backend_supports,
    modes=("step",),
    state=state,
    floors=floors,
)
