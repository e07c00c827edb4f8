"""Deep Momentum Gradient Descent: momentum whose update is the output of a learned memory.

Per parameter W with gradient u (SPEC §2; ``nested_learning.reference.memory_mlp_momentum``)::

    g = u + λ·W;  o = Mem([g ; m_{t−1}]) block-wise, every coordinate
    θ ← Adam(clip_1(∇θ mean_W ℓ(o, g)))         every ``memory_update_freq`` steps
    m_t = μ·m_{t−1} + o;  W ← W − lr·m_t          o computed before θ moves

The fused path runs ``ops.memory_mlp_momentum`` once per (param group, bucket, device, dtype);
the PyTorch path runs the memory modules under autograd, all blocks of a bucket batched
(``foreach=True``) or one tensor at a time (``foreach=False``).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from .. import ops
from ..reference.memory_mlp_momentum import LOSSES, NORM_EPS, compute_dtype, internal_loss, to_blocks
from . import _hyper
from ._blocks import check_bucket_sizes
from .memories import FactorizedMemoryMLP, MemoryMLP, SharedMemoryPool
from .simple_momentum import SimpleMomentumGD

__all__ = [
    "DeepMomentumGD", "SimpleMomentumGD", "MemoryMLP", "FactorizedMemoryMLP", "SharedMemoryPool", "pytorch_memory_step",
]

_INDIVIDUAL_CAP = 4096  # a per-tensor memory (use_shared_memory=False) has S = min(n, 4096)


class DeepMomentumGD(torch.optim.Optimizer):
    """Momentum SGD whose gradient is replaced by a memory MLP's output, the memory trained
    online on an internal loss (the reference library's constructor and defaults).

    ``internal_loss_mode``: 'surrogate' (1 − cos(o, g) + 0.1(‖o‖/‖g‖ − 1)² + 0.1·mean((o − o_prev)²)),
    'l2_regression' (mean((o − P g)²), P per bucket [S, S], moved by the normalized delta rule
    with ``l2_projection_lr``) or 'dot' (−⟨o, g⟩). The memory loss is the mean over tensors,
    its gradient clipped to norm 1 (the shared pool as one group, per-tensor memories one by
    one) and stepped by Adam(``memory_lr``) on steps t ≡ 0 (mod ``memory_update_freq``).

    Decided differences from the reference library:

    - every coordinate goes through the memory: tensors are cut into zero-padded blocks of
      their bucket size, all blocks of a bucket batched (the reference feeds only the first
      4096 entries and passes the rest through raw), and the output is computed once;
    - ``l2_regression`` keeps one [S, S] P per bucket for tensors of any size (no crash on
      mixed sizes); tensors of one call see the P it started with, their updates summed;
    - memories live on the parameters' device, in float32 (float64 for float64 models);
      momenta and last outputs are float32 for 16-bit parameters;
    - memory weights, their Adam state, P, last outputs and the step count are in
      ``state_dict`` (keyed by parameter index), so a resumed run continues bit-identically;
    - ``gradient_checkpointing`` is accepted and changes nothing (no autograd graph is kept);
    - ``fused`` (None: when the memory is the default depth-2 MemoryMLP) runs the fused op;
      ``foreach`` (None: True) batches the PyTorch path per bucket.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.9,
        memory_lr: float = 1e-4,
        memory_hidden_dim: int = 64,
        memory_depth: int = 2,
        memory_update_freq: int = 1,
        use_shared_memory: bool = True,
        bucket_sizes: Optional[list[int]] = None,
        weight_decay: float = 0.0,
        gradient_checkpointing: bool = False,
        use_factorized_memory: bool = False,
        factorized_rank: int = 16,
        internal_loss_mode: str = "surrogate",
        l2_projection_lr: float = 0.01,
        *,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
    ):
        defaults = dict(lr=lr, momentum=momentum, memory_lr=memory_lr, memory_hidden_dim=memory_hidden_dim,
                        memory_depth=memory_depth, weight_decay=weight_decay)
        self._check_group(defaults)
        _hyper.number("memory_lr", memory_lr)
        _hyper.positive_int("memory_hidden_dim", memory_hidden_dim)
        _hyper.positive_int("memory_depth", memory_depth)
        _hyper.positive_int("factorized_rank", factorized_rank)
        self.memory_update_freq = _hyper.positive_int("memory_update_freq", memory_update_freq)
        self.internal_loss_mode = _hyper.choice("internal_loss_mode", internal_loss_mode, LOSSES)
        self.l2_projection_lr = _hyper.number("l2_projection_lr", l2_projection_lr)
        for name, flag in (("foreach", foreach), ("fused", fused)):
            if flag is not None and not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool or None, got {flag!r}")
        super().__init__(params, defaults)
        self.use_shared_memory = use_shared_memory
        self.gradient_checkpointing = gradient_checkpointing
        self.foreach = True if foreach is None else foreach
        self.step_count = 0
        self._l2_projections: dict[int, Tensor] = {}
        self.last_internal_loss: Optional[Tensor] = None
        device, dtype = self._memory_placement()
        if use_shared_memory:
            self.shared_memory: Optional[SharedMemoryPool] = SharedMemoryPool(
                check_bucket_sizes(bucket_sizes), memory_hidden_dim, memory_depth, use_factorized_memory, factorized_rank
            ).to(device, dtype)
            self.memory_modules: nn.ModuleList = nn.ModuleList()
        else:
            self.shared_memory = None
            self.memory_modules = nn.ModuleList(
                MemoryMLP(max(1, min(p.numel(), _INDIVIDUAL_CAP)), memory_hidden_dim, memory_depth).to(device, dtype)
                for p in self._params()
            )
        memories = self._memories()
        fusable = all(m.fused_weights() is not None for m in memories)
        if fused and not fusable:
            raise ValueError("fused=True needs the default memory (MemoryMLP of depth 2, not factorized)")
        self.fused = fusable if fused is None else fused
        self.memory_optimizer = torch.optim.Adam([w for m in memories for w in m.parameters()], lr=memory_lr)

    # ------------------------------------------------------------------ set-up

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        _hyper.number("lr", group["lr"])
        _hyper.number("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        _hyper.number("weight_decay", group["weight_decay"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "memory_optimizer"):
            raise RuntimeError("DeepMomentumGD builds its memories for the parameters given at construction; "
                               "add_param_group afterwards is not supported")
        super().add_param_group(param_group)
        self._check_group({**self.defaults, **param_group})

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _memory_placement(self) -> tuple[torch.device, torch.dtype]:
        params = self._params()
        devices = {p.device for p in params}
        kinds = {compute_dtype(p) for p in params}
        if len(devices) > 1 or len(kinds) > 1:
            raise ValueError(f"params must share one device and be all float64 or all float32/16-bit (the memory's "
                             f"placement), got devices {sorted(map(str, devices))} and dtypes {sorted({str(p.dtype) for p in params})}")
        return params[0].device, kinds.pop()

    def _memories(self) -> list[nn.Module]:
        return list(self.shared_memory.memories.values()) if self.shared_memory is not None else list(self.memory_modules)

    def get_memory_modules(self) -> list[nn.Module]:
        """``[shared_memory]`` or the per-tensor memories (as the reference library)."""
        return [self.shared_memory] if self.shared_memory is not None else list(self.memory_modules)

    def _projection(self, size: int, like: Tensor) -> Tensor:
        if size not in self._l2_projections:
            self._l2_projections[size] = 0.1 * torch.eye(size, device=like.device, dtype=like.dtype)
        return self._l2_projections[size]

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work: dict[tuple[int, int], list[Tensor]] = defaultdict(list)  # (group, memory) → params
        index = 0
        for g_i, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is not None and p.numel() > 0:
                    if p.grad.is_sparse:
                        raise RuntimeError("DeepMomentumGD does not support sparse gradients")
                    work[(g_i, self._memory_index(p, index))].append(p)
                index += 1
        count = sum(len(v) for v in work.values())
        compute_grad = self.step_count % self.memory_update_freq == 0
        memories = self._memories()
        if compute_grad:  # memories no tensor uses this step keep no gradient: Adam skips them
            used = {mem_i for _, mem_i in work}
            for i, m in enumerate(memories):
                for w in m.parameters():
                    w.grad = torch.zeros_like(w) if i in used else None
        total = None
        for (g_i, mem_i), params in work.items():
            part = self._apply(self.param_groups[g_i], memories[mem_i], params, 1.0 / count, compute_grad)
            total = part if total is None else total + part
        if compute_grad and count:
            if self.shared_memory is not None:
                nn.utils.clip_grad_norm_(self.shared_memory.parameters(), 1.0)
            else:
                for m in memories:
                    nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            self.memory_optimizer.step()
        self.last_internal_loss = total
        self.step_count += 1
        return loss

    def _memory_index(self, p: Tensor, index: int) -> int:
        if self.shared_memory is None:
            return index
        return self.shared_memory.bucket_sizes.index(self.shared_memory.get_bucket(p.numel()))

    def _state(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if "momentum_buffer" not in state:
            ct = compute_dtype(p)
            state["momentum_buffer"] = torch.zeros_like(p, dtype=ct, memory_format=torch.contiguous_format)
            state["prev_output"] = torch.zeros_like(p, dtype=ct, memory_format=torch.contiguous_format)
            state["has_prev"] = False
        return state

    def _apply(self, group: dict[str, Any], memory: nn.Module, params: list[Tensor], scale: float, compute_grad: bool) -> Tensor:
        states = [self._state(p) for p in params]
        size = memory.param_dim
        projection = self._projection(size, states[0]["momentum_buffer"]) if self.internal_loss_mode == "l2_regression" else None
        args = (
            params, [p.grad for p in params], [s["momentum_buffer"] for s in states], [s["prev_output"] for s in states],
            [s["has_prev"] for s in states],
        )
        hyper = dict(lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"],
                     loss=self.internal_loss_mode, loss_scale=scale, compute_grad=compute_grad,
                     projection_lr=self.l2_projection_lr)
        if self.fused:
            weights = memory.fused_weights()
            total = ops.memory_mlp_momentum(*self._contiguous(args), weights, [w.grad if compute_grad else torch.zeros_like(w) for w in weights], projection, **hyper)
        else:
            total = pytorch_memory_step(memory, size, *args, projection, self.foreach, **hyper)
        for s in states:
            s["has_prev"] = True
        return total

    @staticmethod
    def _contiguous(args: tuple[list, ...]) -> tuple[list, ...]:
        params, grads, *rest = args
        if not all(p.is_contiguous() for p in params):
            raise ValueError("DeepMomentumGD's fused path needs contiguous parameters")
        return (params, [g.contiguous() for g in grads], *rest)

    def get_internal_loss_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {
            "step_count": self.step_count,
            "num_params_tracked": sum(1 for s in self.state.values() if s.get("has_prev")),
            "internal_loss_mode": self.internal_loss_mode,
        }
        if self.last_internal_loss is not None:
            stats["internal_loss"] = float(self.last_internal_loss)
        if self.internal_loss_mode == "l2_regression":
            stats["num_l2_projections"] = len(self._l2_projections)
        return stats

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["memory"] = [m.state_dict() for m in self._memories()]
        out["memory_optimizer"] = self.memory_optimizer.state_dict()
        out["l2_projections"] = dict(self._l2_projections)
        out["step_count"] = self.step_count
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        memory = state_dict.pop("memory")
        memory_optimizer = state_dict.pop("memory_optimizer")
        projections = state_dict.pop("l2_projections")
        step_count = state_dict.pop("step_count")
        # torch.optim casts floating state to each parameter's dtype; ours stays in the compute dtype
        kept = {k: {n: v for n, v in s.items() if isinstance(v, Tensor)} for k, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = self._params()
        for k, tensors in kept.items():
            p = params[k]
            for name, value in tensors.items():
                self.state[p][name] = value.to(device=p.device, dtype=compute_dtype(p), copy=True)
        for m, sd in zip(self._memories(), memory, strict=True):
            m.load_state_dict(sd)
        self.memory_optimizer.load_state_dict(memory_optimizer)
        self._l2_projections = {int(k): v.clone() for k, v in projections.items()}
        self.step_count = step_count


def pytorch_memory_step(
    memory: Callable[[Tensor, Tensor], Tensor],
    size: int,
    params: list[Tensor],
    grads: list[Tensor],
    momenta: list[Tensor],
    prev_outputs: list[Tensor],
    has_prev: list[bool],
    projection: Optional[Tensor],
    batched: bool,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    loss: str,
    loss_scale: float,
    compute_grad: bool,
    projection_lr: float,
) -> Tensor:
    """The step of ``ops.memory_mlp_momentum`` in PyTorch through any memory ``memory(g_blocks,
    m_blocks)`` under autograd (the gradients of its leaves accumulate in ``.grad``): all
    tensors' blocks in one forward when ``batched``, else one tensor at a time."""
    start = projection.clone() if projection is not None else None
    chunks = [list(range(len(params)))] if batched else [[i] for i in range(len(params))]
    total = momenta[0].new_zeros(())
    for chunk in chunks:
        gs = [(grads[i].to(momenta[i].dtype) + weight_decay * params[i].to(momenta[i].dtype)).flatten() for i in chunk]
        g_blocks = [to_blocks(g, size) for g in gs]
        m_blocks = [to_blocks(momenta[i].flatten(), size) for i in chunk]
        with torch.enable_grad():
            out = memory(torch.cat(g_blocks), torch.cat(m_blocks))
            pieces = out.split([b.shape[0] for b in g_blocks])
            losses = []
            for i, g, gb, o_blocks in zip(chunk, gs, g_blocks, pieces):
                n = g.numel()
                o = o_blocks.flatten()[:n]
                target = (gb @ start.T).flatten()[:n] if start is not None else None
                losses.append(internal_loss(loss, o, g, prev_outputs[i].flatten() if has_prev[i] else None, target))
                if start is not None:
                    g_sq = g.pow(2).sum()
                    if g_sq > NORM_EPS:
                        projection.add_(to_blocks(o.detach() - target, size).T @ gb, alpha=projection_lr / g_sq.item())
            chunk_loss = torch.stack(losses).sum() * loss_scale
            if compute_grad:
                chunk_loss.backward()
        total += chunk_loss.detach()
        for i, o_blocks in zip(chunk, pieces):
            o = o_blocks.detach().flatten()[: params[i].numel()].view_as(momenta[i])
            momenta[i].mul_(momentum).add_(o)
            params[i].copy_(params[i].to(momenta[i].dtype) - lr * momenta[i])
            prev_outputs[i].copy_(o)
    return total
