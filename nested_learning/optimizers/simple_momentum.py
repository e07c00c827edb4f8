"""Momentum SGD, and the optimizer shell that the non-learned optimizers of this package share.

The shell (:class:`TensorOptimizer`) does what every ``torch.optim`` optimizer does around its
rule: hyper-parameter checks (at construction and in ``add_param_group``), the closure, skipping
parameters without a gradient, rejecting sparse and complex gradients, and choosing between the
single-tensor and the multi-tensor (``torch._foreach_*``) path. A rule is written once, as a
sequence of :func:`each` calls; both paths run the same element-wise operations in the same
order, so they give bit-identical results.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from ._hyper import number

Group = dict[str, Any]


def each(name: str, foreach: bool, tensors: list[Tensor], *args: Any, **kwargs: Any) -> list[Tensor]:
    """``Tensor.<name>`` applied to every tensor of ``tensors`` — one ``torch._foreach_<name>``
    call when ``foreach``, else a loop. List arguments (and a list ``value=`` of
    ``addcmul_``/``addcdiv_``) are zipped with ``tensors``; other arguments are passed to every
    call. Returns the results (the tensors themselves for an in-place ``name``)."""
    if foreach:
        if isinstance(kwargs.get("value"), list):  # the foreach overload takes per-tensor scalars positionally
            args = (*args, kwargs.pop("value"))
        out = getattr(torch, "_foreach_" + name)(tensors, *args, **kwargs)
        return tensors if out is None else list(out)

    def pick(a: Any, i: int) -> Any:
        return a[i] if isinstance(a, list) else a

    return [
        getattr(t, name)(*(pick(a, i) for a in args), **{k: pick(v, i) for k, v in kwargs.items()})
        for i, t in enumerate(tensors)
    ]


def with_weight_decay(grads: list[Tensor], params: list[Tensor], weight_decay: float, foreach: bool) -> list[Tensor]:
    """g + λ·W (new tensors; the ``.grad`` tensors are left alone), or g itself when λ = 0."""
    return each("add", foreach, grads, params, alpha=weight_decay) if weight_decay != 0 else grads


def state_list(optimizer: Optimizer, params: list[Tensor], key: str, init: Callable[[Tensor], Any]) -> list[Any]:
    """``optimizer.state[p][key]`` for every ``p``, created with ``init(p)`` where missing."""
    out = []
    for p in params:
        state = optimizer.state[p]
        if key not in state:
            state[key] = init(p)
        out.append(state[key])
    return out


def zeros(p: Tensor) -> Tensor:
    return torch.zeros_like(p, memory_format=torch.preserve_format)


def advance_steps(optimizer: Optimizer, params: list[Tensor]) -> list[int]:
    """Increment and return the per-parameter step count ``state[p]['step']`` (a Python int)."""
    steps = state_list(optimizer, params, "step", lambda p: 0)
    for p, t in zip(params, steps):
        optimizer.state[p]["step"] = t + 1
    return [t + 1 for t in steps]


class TensorOptimizer(Optimizer):
    """Base of the rule-based optimizers: subclasses define ``check_hyper`` (raise ValueError
    naming a bad hyper-parameter of a group) and ``update`` (apply the rule to one group's
    parameters that have gradients)."""

    def __init__(self, params: ParamsT, defaults: Mapping[str, Any]) -> None:
        self._check_group(defaults)
        super().__init__(params, dict(defaults))

    @staticmethod
    def check_hyper(group: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def _check_group(self, group: Mapping[str, Any]) -> None:
        self.check_hyper(group)
        if group["foreach"] not in (None, True, False):
            raise ValueError(f"foreach must be None, True or False, got {group['foreach']!r}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._check_group({**self.defaults, **param_group})
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)

    def update(self, group: Group, params: list[Tensor], grads: list[Tensor], foreach: bool) -> None:
        raise NotImplementedError

    def _with_grads(self, group: Group) -> tuple[list[Tensor], list[Tensor]]:
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            if torch.is_complex(p):
                raise RuntimeError(f"{type(self).__name__} does not support complex parameters")
            params.append(p)
            grads.append(p.grad)
        return params, grads

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One optimisation step; ``closure`` (re-evaluating the loss, with gradients enabled)
        is called first and its loss returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads = self._with_grads(group)
            if params:
                foreach = group["foreach"]
                if foreach is None:
                    foreach = all(p.device.type == "cuda" for p in params)
                self.update(group, params, grads, foreach)
        return loss


def check_momentum_hyper(group: Mapping[str, Any]) -> None:
    """lr ≥ 0, momentum ∈ [0, 1), weight_decay ≥ 0."""
    number("lr", group["lr"])
    number("momentum", group["momentum"], 0.0, 1.0, high_open=True)
    number("weight_decay", group["weight_decay"])


def _check_simple(group: Mapping[str, Any]) -> None:
    check_momentum_hyper(group)
    if group["fused"] not in (None, True, False):
        raise ValueError(f"fused must be None, True or False, got {group['fused']!r}")
    if group["fused"] and group["foreach"]:
        raise ValueError("fused and foreach cannot both be True")


class SimpleMomentumGD(TensorOptimizer):
    """Heavy-ball momentum:  g ← g + λW;  m ← μ m + g;  W ← W − η m.

    Equal (bit for bit) to ``torch.optim.SGD(momentum=μ, dampening=0, weight_decay=λ)``, and to
    the reference library's ``SimpleMomentumGD``. State: ``momentum_buffer`` per parameter.

    Args:
        params: parameters or parameter groups.
        lr: η ≥ 0.  momentum: μ ∈ [0, 1).  weight_decay: λ ≥ 0 (L2, added to the gradient).
        foreach: multi-tensor path (``None``: on when every parameter is on CUDA).
        fused: the whole rule in one kernel per (device, dtype), torch's fused SGD kernel (CPU
            and CUDA, floating-point parameters); ``None``: off, as in ``torch.optim.SGD``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
    ) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=foreach, fused=fused))

    check_hyper = staticmethod(_check_simple)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("fused", None)

    def update(self, group: Group, params: list[Tensor], grads: list[Tensor], foreach: bool) -> None:
        if group["fused"]:
            self._fused_update(group, params, grads)
            return
        grads = with_weight_decay(grads, params, group["weight_decay"], foreach)
        bufs = state_list(self, params, "momentum_buffer", zeros)
        each("mul_", foreach, bufs, group["momentum"])
        each("add_", foreach, bufs, grads)
        each("add_", foreach, params, bufs, alpha=-group["lr"])

    def _fused_update(self, group: Group, params: list[Tensor], grads: list[Tensor]) -> None:
        """torch's fused SGD per (device, dtype); with the buffers starting at zero, its
        non-first-step rule m ← μm + g is the rule above from the first step on."""
        bad = next((p.dtype for p in params if not p.is_floating_point()), None)
        if bad is not None:  # before any state is made
            raise RuntimeError(f"fused=True needs floating-point parameters, got {bad}")
        bufs = state_list(self, params, "momentum_buffer", zeros)
        for (ps, gs, ms), _ in self._group_tensors_by_device_and_dtype([params, grads, bufs]).values():
            torch._fused_sgd_(ps, gs, ms, weight_decay=group["weight_decay"], momentum=group["momentum"],
                              lr=group["lr"], dampening=0.0, nesterov=False, maximize=False, is_first_step=False)
