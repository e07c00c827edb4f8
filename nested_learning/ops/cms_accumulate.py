"""``cms_accumulate``: one multi-frequency CMS optimizer step over many tensors, in place.

Per tensor (θ, gradient g, fp32 accumulator A; :mod:`nested_learning.reference.cms_accumulate`
has the full rule)::

    off-cycle:  A ← A + g
    on-cycle:   u = A + g (× 1/n with ``average``);  θ ← Opt(θ, u) with Opt ∈ {SGD(momentum), Adam, AdamW};  A ← 0

The custom op ``nested_learning::cms_accumulate`` runs once per (device, dtype) group and
dispatches to the C++ kernel on CPU (one OpenMP pass over every element of the group), the
Triton kernel on CUDA, or the per-tensor PyTorch reference.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Sequence

import torch
from torch import Tensor

from .. import reference
from ..reference.cms_accumulate import OPTIMIZERS, Hyper, compute_dtype
from . import _checks, _library

__all__ = ["cms_accumulate", "BACKEND_FUNCTIONS", "OPTIMIZERS", "Hyper"]

# Contract shared by every backend: contiguous tensors of one device and one parameter dtype;
# accumulators and optimizer state in the compute dtype (float64 for float64 parameters, else
# float32); everything is updated in place; nothing is returned.
Kernel = Callable[..., None]


def _reference(params, grads, accumulators, exp_avgs, exp_avg_sqs, counts, steps, due, hyper: Hyper) -> None:
    reference.cms_accumulate.step(params, grads, accumulators, exp_avgs, exp_avg_sqs, counts, steps, due, hyper)


def _cpp(params, grads, accumulators, exp_avgs, exp_avg_sqs, counts, steps, due, hyper: Hyper) -> None:
    torch.ops.nested_learning.cms_accumulate_cpp(
        params, grads, accumulators, exp_avgs, exp_avg_sqs, counts, steps, due, hyper.optimizer, hyper.lr,
        hyper.momentum, hyper.dampening, hyper.nesterov, hyper.beta1, hyper.beta2, hyper.eps, hyper.weight_decay,
        hyper.average,
    )


def _triton(params, grads, accumulators, exp_avgs, exp_avg_sqs, counts, steps, due, hyper: Hyper) -> None:
    from ..kernels import cms_accumulate as kernels  # imports triton: only when this backend runs

    kernels.cms_accumulate(params, grads, accumulators, exp_avgs, exp_avg_sqs, counts, steps, due, hyper)


BACKEND_FUNCTIONS: dict[str, Kernel] = {"reference": _reference, "cpp": _cpp, "triton": _triton}


# The op is defined with the low-level torch.library API rather than ``custom_op``: for a
# mutating multi-tensor op the latter's per-call Python layers (default filling, autograd and
# in-place redispatch) cost ~0.2 ms, against ~0.02 ms here — a tenth of a 10M-parameter step.
_LIB = torch.library.Library("nested_learning", "FRAGMENT")
_LIB.define(
    "cms_accumulate(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] accumulators, Tensor(c!)[] exp_avgs, "
    "Tensor(d!)[] exp_avg_sqs, int[] counts, int[] steps, bool[] due, str optimizer, float lr, float momentum, "
    "float dampening, bool nesterov, float beta1, float beta2, float eps, float weight_decay, bool average) -> ()"
)


def _cms_accumulate_impl(params, grads, accumulators, exp_avgs, exp_avg_sqs, counts, steps, due, *hyper) -> None:
    BACKEND_FUNCTIONS[_library.select(params[0].device)](
        params, grads, accumulators, exp_avgs, exp_avg_sqs, counts, steps, due, Hyper(*hyper)
    )


_LIB.impl("cms_accumulate", _cms_accumulate_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("nested_learning::cms_accumulate", lib=_LIB)
def _(*args) -> None:
    return None


# ----------------------------------------------------------------------------- validation


def _hyper(optimizer: str, **values: float | bool) -> Hyper:
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    for name in ("nesterov", "average"):
        if not isinstance(values[name], bool):
            raise TypeError(f"{name} must be a bool, got {values[name]!r}")
    h = Hyper(optimizer, **{k: v if isinstance(v, bool) else _checks.finite(k, v) for k, v in values.items()})
    for name in ("lr", "momentum", "weight_decay", "eps"):
        if getattr(h, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(h, name)}")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(h, name) < 1.0:
            raise ValueError(f"{name} must lie in [0, 1), got {getattr(h, name)}")
    if not 0.0 <= h.dampening <= 1.0:
        raise ValueError(f"dampening must lie in [0, 1], got {h.dampening}")
    if h.nesterov and (optimizer != "sgd" or h.momentum <= 0 or h.dampening != 0):
        raise ValueError("nesterov needs optimizer='sgd', momentum > 0 and dampening = 0")
    return h


def _check_lists(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    accumulators: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    counts: Sequence[int],
    steps: Sequence[int],
    due: Sequence[bool],
    hyper: Hyper,
) -> None:
    n = len(params)
    needs_m = hyper.optimizer != "sgd" or hyper.momentum != 0.0
    needs_v = hyper.optimizer != "sgd"
    lengths = {"grads": (grads, n), "accumulators": (accumulators, n), "counts": (counts, n), "steps": (steps, n),
               "due": (due, n), "exp_avgs": (exp_avgs, n if needs_m else 0), "exp_avg_sqs": (exp_avg_sqs, n if needs_v else 0)}
    for name, (values, expected) in lengths.items():
        if len(values) != expected:
            raise ValueError(f"{name} must have {expected} entries (one per parameter), got {len(values)}")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor) or not p.is_floating_point():
            raise TypeError(f"params[{i}] must be a floating torch.Tensor, got {type(p).__name__}")
        ct = compute_dtype(p)
        named = {"grads": (grads[i], p.dtype), "accumulators": (accumulators[i], ct)}
        if needs_m:
            named["exp_avgs"] = (exp_avgs[i], ct)
        if needs_v:
            named["exp_avg_sqs"] = (exp_avg_sqs[i], ct)
        for name, (t, dtype) in named.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
            if t.shape != p.shape or t.dtype != dtype or t.device != p.device:
                raise ValueError(
                    f"{name}[{i}] must match params[{i}]: shape {tuple(p.shape)}, dtype {dtype}, device {p.device}; "
                    f"got shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"
                )
        for name, t in (("params", p), *((n, t) for n, (t, _) in named.items())):
            if not t.is_contiguous():
                raise ValueError(f"{name}[{i}] must be contiguous")
        if not isinstance(counts[i], int) or counts[i] < 0 or not isinstance(steps[i], int) or steps[i] < 0:
            raise ValueError(f"counts[{i}] and steps[{i}] must be integers >= 0, got {counts[i]!r} and {steps[i]!r}")
        if not isinstance(due[i], bool):
            raise TypeError(f"due[{i}] must be a bool, got {due[i]!r}")


# ----------------------------------------------------------------------------- public API


@torch.no_grad()
def cms_accumulate(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    accumulators: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    counts: Sequence[int],
    steps: Sequence[int],
    due: Sequence[bool],
    *,
    optimizer: str = "sgd",
    lr: float = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    average: bool = False,
) -> None:
    """Accumulate every gradient; step and reset the tensors whose period ends (module docstring).

    Args:
        params: parameters θ (float32, bfloat16, float16 or float64), updated in place when due.
        grads: their gradients, same shapes and dtypes.
        accumulators: fp32 window sums (float64 for float64 params), same shapes.
        exp_avgs: SGD momentum buffers, or Adam's first moments; ``[]`` for SGD without momentum.
        exp_avg_sqs: Adam's second moments; ``[]`` for SGD.
        counts: gradients already accumulated per tensor (the window length is ``count + 1``).
        steps: inner-optimizer steps already taken per tensor (Adam bias correction; SGD's first
            momentum step copies u).
        due: per tensor, whether its period ends at this step.
        optimizer: ``'sgd'``, ``'adam'`` or ``'adamw'``; the other keywords are its
            hyper-parameters, with torch.optim's meanings.
        average: step on the window mean instead of the window sum.

    The caller owns the counters: after the call a due tensor has count 0 and one more step, the
    others one more count. Every argument is checked before any tensor is written; tensors are
    grouped by (device, dtype) and each group is one op call.
    """
    hyper = _hyper(
        optimizer, lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, beta1=beta1, beta2=beta2,
        eps=eps, weight_decay=weight_decay, average=average,
    )
    _check_lists(params, grads, accumulators, exp_avgs, exp_avg_sqs, counts, steps, due, hyper)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        groups[(p.device, p.dtype)].append(i)
    for idx in groups.values():
        pick = lambda xs: [xs[i] for i in idx] if len(xs) else []  # noqa: E731
        torch.ops.nested_learning.cms_accumulate(
            pick(params), pick(grads), pick(accumulators), pick(exp_avgs), pick(exp_avg_sqs), pick(counts),
            pick(steps), pick(due), hyper.optimizer, hyper.lr, hyper.momentum, hyper.dampening, hyper.nesterov,
            hyper.beta1, hyper.beta2, hyper.eps, hyper.weight_decay, hyper.average,
        )
