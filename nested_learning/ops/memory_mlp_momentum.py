"""``memory_mlp_momentum``: the deep-momentum step of many tensors through one bucket memory, in place.

Per tensor W with gradient u, momentum m and last memory output o_prev (full rule and the
internal losses in :mod:`nested_learning.reference.memory_mlp_momentum`)::

    g = u + λ·W;  o = m([g ; m]; θ) block-wise (S coordinates per block)
    ∇θ += s·∂ℓ(o, g, o_prev)/∂θ;  m ← μ·m + o;  W ← W − lr·m;  o_prev ← o

The custom op ``nested_learning::memory_mlp_momentum`` runs once per (device, dtype) group and
dispatches to the C++ kernel on CPU (batched GEMMs over every block of the group), the Triton
kernel on CUDA, or the per-tensor PyTorch reference. It returns s·Σℓ.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .. import reference
from ..reference.memory_mlp_momentum import LOSSES, Hyper, compute_dtype
from . import _checks, _library

__all__ = ["memory_mlp_momentum", "BACKEND_FUNCTIONS", "LOSSES", "Hyper", "WEIGHT_NAMES"]

WEIGHT_NAMES = ("w1", "b1", "ln_weight", "ln_bias", "w2", "b2")

# Contract shared by every backend: tensors of one device and one parameter dtype, contiguous;
# momenta, previous outputs, memory weights, their gradients and the projection in the compute
# dtype (float64 for float64 parameters, else float32); 0-element tensors are left alone;
# states are updated in place and s·Σℓ is returned as a 0-d tensor of the compute dtype.
Kernel = Callable[..., Tensor]


def _reference(params, grads, momenta, prev_outputs, has_prev, weights, weight_grads, projection, hyper: Hyper) -> Tensor:
    return reference.memory_mlp_momentum.step(
        params, grads, momenta, prev_outputs, has_prev, weights, weight_grads, projection, hyper
    )


def _cpp(params, grads, momenta, prev_outputs, has_prev, weights, weight_grads, projection, hyper: Hyper) -> Tensor:
    return torch.ops.nested_learning.memory_mlp_momentum_cpp(
        params, grads, momenta, prev_outputs, has_prev, weights, weight_grads, projection, hyper.lr, hyper.momentum,
        hyper.weight_decay, hyper.loss, hyper.loss_scale, hyper.compute_grad, hyper.projection_lr, hyper.ln_eps,
    )


def _triton(params, grads, momenta, prev_outputs, has_prev, weights, weight_grads, projection, hyper: Hyper) -> Tensor:
    from ..kernels import memory_mlp_momentum as kernels  # imports triton: only when this backend runs

    return kernels.memory_mlp_momentum(
        params, grads, momenta, prev_outputs, has_prev, weights, weight_grads, projection, hyper
    )


BACKEND_FUNCTIONS: dict[str, Kernel] = {"reference": _reference, "cpp": _cpp, "triton": _triton}

# Low-level torch.library definition, as for cms_accumulate: a mutating multi-tensor op pays
# ~0.2 ms per call in custom_op's Python layers, against ~0.02 ms here.
_LIB = torch.library.Library("nested_learning", "FRAGMENT")
_LIB.define(
    "memory_mlp_momentum(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momenta, Tensor(c!)[] prev_outputs, "
    "bool[] has_prev, Tensor[] weights, Tensor(d!)[] weight_grads, Tensor(e!) projection, float lr, float momentum, "
    "float weight_decay, str loss, float loss_scale, bool compute_grad, float projection_lr, float ln_eps) -> Tensor"
)


def _impl(params, grads, momenta, prev_outputs, has_prev, weights, weight_grads, projection, *hyper) -> Tensor:
    return BACKEND_FUNCTIONS[_library.select(weights[0].device)](
        params, grads, momenta, prev_outputs, has_prev, weights, weight_grads, projection, Hyper(*hyper)
    )


_LIB.impl("memory_mlp_momentum", _impl, "CompositeExplicitAutograd")


@torch.library.register_fake("nested_learning::memory_mlp_momentum", lib=_LIB)
def _(params, grads, momenta, prev_outputs, has_prev, weights, *rest) -> Tensor:
    return weights[0].new_empty(())


# ----------------------------------------------------------------------------- validation


def _hyper(**values: object) -> Hyper:
    if values["loss"] not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {values['loss']!r}")
    if not isinstance(values["compute_grad"], bool):
        raise TypeError(f"compute_grad must be a bool, got {values['compute_grad']!r}")
    numbers = {k: _checks.finite(k, v) for k, v in values.items() if k not in ("loss", "compute_grad")}
    for name in ("lr", "weight_decay", "loss_scale", "projection_lr"):
        if numbers[name] < 0:
            raise ValueError(f"{name} must be >= 0, got {numbers[name]}")
    if not 0.0 <= numbers["momentum"] <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {numbers['momentum']}")
    if numbers["ln_eps"] <= 0:
        raise ValueError(f"ln_eps must be > 0, got {numbers['ln_eps']}")
    return Hyper(loss=values["loss"], compute_grad=values["compute_grad"], **numbers)


def _check_memory(weights: Sequence[Tensor], weight_grads: Sequence[Tensor], projection: Optional[Tensor], loss: str) -> int:
    """The memory's bucket size S, after checking the weights, their gradients and P."""
    if len(weights) != 6 or len(weight_grads) != 6:
        raise ValueError(f"weights and weight_grads must hold 6 tensors {WEIGHT_NAMES}, got {len(weights)} and {len(weight_grads)}")
    w1 = _checks.tensor("weights[0] (w1)", weights[0], 2)
    h, two_s = w1.shape
    if two_s % 2 or h == 0 or two_s == 0:
        raise ValueError(f"weights[0] (w1) must have shape [h, 2S] with h, S > 0, got {tuple(w1.shape)}")
    size = two_s // 2
    shapes = ((h, two_s), (h,), (h,), (h,), (size, h), (size,))
    layouts = ("[h, 2S]", "[h]", "[h]", "[h]", "[S, h]", "[S]")
    for i, (name, shape, layout) in enumerate(zip(WEIGHT_NAMES, shapes, layouts)):
        for kind, t in (("weights", weights[i]), ("weight_grads", weight_grads[i])):
            label = f"{kind}[{i}] ({name})"
            _checks.tensor(label, t, len(shape))
            _checks.shape(label, t, shape, layout)
            if t.dtype != w1.dtype or t.device != w1.device or not t.is_contiguous():
                raise ValueError(f"{label} must be contiguous with dtype {w1.dtype} on {w1.device}, got {t.dtype} on {t.device}")
    if w1.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the memory weights must be float32 or float64 (the compute dtype), got {w1.dtype}")
    if loss == "l2_regression":
        if projection is None:
            raise ValueError("loss='l2_regression' needs projection, a [S, S] tensor")
        _checks.tensor("projection", projection, 2)
        _checks.shape("projection", projection, (size, size), "[S, S]")
        if projection.dtype != w1.dtype or projection.device != w1.device or not projection.is_contiguous():
            raise ValueError(f"projection must be contiguous with dtype {w1.dtype} on {w1.device}")
    return size


def _check_tensors(params, grads, momenta, prev_outputs, has_prev, weights: Sequence[Tensor]) -> None:
    n = len(params)
    for name, values in (("grads", grads), ("momenta", momenta), ("prev_outputs", prev_outputs), ("has_prev", has_prev)):
        if len(values) != n:
            raise ValueError(f"{name} must have {n} entries (one per parameter), got {len(values)}")
    w = weights[0]
    for i, p in enumerate(params):
        if not isinstance(p, Tensor) or not p.is_floating_point():
            raise TypeError(f"params[{i}] must be a floating torch.Tensor, got {type(p).__name__}")
        if compute_dtype(p) != w.dtype or p.device != w.device:
            raise ValueError(
                f"params[{i}] ({p.dtype} on {p.device}) needs memory weights of dtype {compute_dtype(p)} on {p.device}, "
                f"got {w.dtype} on {w.device}"
            )
        for name, t, dtype in (("grads", grads[i], p.dtype), ("momenta", momenta[i], w.dtype), ("prev_outputs", prev_outputs[i], w.dtype)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
            if t.shape != p.shape or t.dtype != dtype or t.device != p.device:
                raise ValueError(
                    f"{name}[{i}] must match params[{i}]: shape {tuple(p.shape)}, dtype {dtype}, device {p.device}; "
                    f"got shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"
                )
        for name, t in (("params", p), ("grads", grads[i]), ("momenta", momenta[i]), ("prev_outputs", prev_outputs[i])):
            if not t.is_contiguous():
                raise ValueError(f"{name}[{i}] must be contiguous")
        if not isinstance(has_prev[i], bool):
            raise TypeError(f"has_prev[{i}] must be a bool, got {has_prev[i]!r}")


# ----------------------------------------------------------------------------- public API


def memory_mlp_momentum(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momenta: Sequence[Tensor],
    prev_outputs: Sequence[Tensor],
    has_prev: Sequence[bool],
    weights: Sequence[Tensor],
    weight_grads: Sequence[Tensor],
    projection: Optional[Tensor] = None,
    *,
    lr: float,
    momentum: float,
    weight_decay: float = 0.0,
    loss: str = "surrogate",
    loss_scale: float = 1.0,
    compute_grad: bool = True,
    projection_lr: float = 0.01,
    ln_eps: float = 1e-5,
) -> Tensor:
    """One deep-momentum step of ``params`` through the memory ``weights`` = (W1 [h, 2S], b1 [h],
    γ [h], β [h], W2 [S, h], b2 [S]), in place; returns s·Σℓ (s = ``loss_scale``).

    Updates ``params``, ``momenta``, ``prev_outputs`` (set to this step's outputs), adds s·∂ℓ/∂θ
    into ``weight_grads`` when ``compute_grad``, and moves ``projection`` (P [S, S], needed by
    ``loss='l2_regression'``). ``has_prev[i]`` says whether ``prev_outputs[i]`` holds an output
    yet (the surrogate's smoothness term needs one). Tensors of one (device, dtype) group all
    see the P their group started with. Every input is checked before anything moves.
    """
    hyper = _hyper(lr=lr, momentum=momentum, weight_decay=weight_decay, loss=loss, loss_scale=loss_scale,
                   compute_grad=compute_grad, projection_lr=projection_lr, ln_eps=ln_eps)
    weights, weight_grads = list(weights), list(weight_grads)
    _check_memory(weights, weight_grads, projection, loss)
    _check_tensors(params, grads, momenta, prev_outputs, has_prev, weights)
    if hyper.loss != "l2_regression" or projection is None:
        projection = weights[0].new_empty(0, 0)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, p in enumerate(params):
        groups[(p.device, p.dtype)].append(i)
    total = weights[0].new_zeros(())
    for idx in groups.values():
        total = total + torch.ops.nested_learning.memory_mlp_momentum(
            [params[i] for i in idx], [grads[i] for i in idx], [momenta[i] for i in idx],
            [prev_outputs[i] for i in idx], [has_prev[i] for i in idx], weights, weight_grads, projection,
            hyper.lr, hyper.momentum, hyper.weight_decay, hyper.loss, hyper.loss_scale, hyper.compute_grad,
            hyper.projection_lr, hyper.ln_eps,
        )
    return total
