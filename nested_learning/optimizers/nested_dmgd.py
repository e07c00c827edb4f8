"""Nested deep momentum gradient descent: a learned momentum memory, meta-trained on the loss
reached after the steps it drives.

Per parameter tensor W with gradient g, momentum m (zero at first), learning rate η and
momentum coefficient μ, one step is::

    d_t = Mem([g_t ; m_{t−1}])       the bucket's LearnedMemoryModule, block-wise (below)
    c_t = μ m_{t−1} + d_t
    m_t = c_t
    W_t = W_{t−1} − η c_t

The memory is block-wise and shared per bucket: a tensor of n elements belongs to bucket
S = the smallest of ``bucket_sizes`` (default 64, 256, 1024, 4096) that is ≥ n, else the
largest, and is cut into ⌈n/S⌉ zero-padded blocks of S coordinates. The bucket's memory
``LearnedMemoryModule(2S, h, S)`` maps each block's context [g_block ; m_block] to d_block, and
the first n outputs are the tensor's d. All blocks of all tensors of a bucket pass through the
memory as one batch, so every coordinate is seen by it.

Meta-learning (the "inner" level of the nested problem): steps taken with
``step(create_graph=True)`` are recorded, back to the last ``meta_step``; ``meta_step(meta_loss)``
then moves the memories by their memory optimizer (Adam(memory_lr) by default) along the
first-order meta-gradient defined in :meth:`NestedDeepMomentumGD.compute_meta_gradients`.

Differences from the reference library (each fixes one of its defects):

- The reference builds one full-width memory ``LearnedMemoryModule(2n, h, n)`` per tensor,
  about 193× the model size for h = 64; here one memory per bucket serves all tensors.
- The reference's meta-gradient has the wrong sign (it trains the memory to anti-align d with
  ∂meta/∂W, so meta-training makes the optimizer diverge) and reaches only the last inner
  step; here the sign descends the meta loss and every recorded step contributes.
- The reference keys the memory state by ``id(param)``, which does not survive a restart;
  here momenta and step counts are keyed by parameter index (as every torch optimizer) and
  memories by bucket size, so a reloaded run continues bit-identically.
- ``create_meta_learning_task_distribution`` makes distinct tasks (the reference's closures
  all read the last task's weights).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torch.optim import Optimizer

from ._blocks import bucket_for, check_bucket_sizes, from_blocks, to_blocks
from ._hyper import choice, number, positive_int

__all__ = ["LearnedMemoryModule", "LinearTask", "NestedDeepMomentumGD", "create_meta_learning_task_distribution"]

TASK_TYPES = ("regression", "classification", "mixed")


class LearnedMemoryModule(nn.Module):
    """The momentum memory: ``depth − 1`` blocks Linear → LayerNorm → ReLU, then a Linear.

    ``forward(grad, momentum)`` returns ``MLP([grad ; momentum])`` on the last dimension
    (input_dim = grad width + momentum width). Every Linear is xavier_uniform with gain 0.01
    and zero bias, so a fresh memory's outputs are small (order 1e-3 to 1e-2) whatever the
    gradient's scale (the LayerNorm removes it); meta-training sets their size.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, depth: int = 2):
        super().__init__()
        input_dim = positive_int("input_dim", input_dim)
        hidden_dim = positive_int("hidden_dim", hidden_dim)
        output_dim = positive_int("output_dim", output_dim)
        depth = positive_int("depth", depth)
        layers: list[nn.Module] = []
        width = input_dim
        for _ in range(depth - 1):
            layers += [nn.Linear(width, hidden_dim), nn.LayerNorm(hidden_dim), nn.ReLU()]
            width = hidden_dim
        layers.append(nn.Linear(width, output_dim))
        self.network = nn.Sequential(*layers)
        for module in self.network:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, gain=0.01)
                nn.init.zeros_(module.bias)

    def forward(self, grad: Tensor, momentum: Tensor) -> Tensor:
        return self.network(torch.cat([grad, momentum], dim=-1))


MemoryOptimizerArg = Optimizer | Callable[[Iterable[nn.Parameter]], Optimizer] | None


class NestedDeepMomentumGD(Optimizer):
    """Momentum SGD whose update d = Mem([g ; m]) comes from meta-trained per-bucket memories.

    Args:
        params: parameters or param groups (per-group ``lr`` and ``momentum``).
        memory_optimizer: what trains the memories in :meth:`meta_step`: an optimizer that
            already holds every memory parameter, a factory called with the memory parameters
            (e.g. ``functools.partial(torch.optim.SGD, lr=0.1)``), or None for
            ``Adam(lr=memory_lr)``. Unused (and not built) when ``meta_learning`` is False.
        lr: η, the step size of the parameters.
        memory_lr: the learning rate of the default memory optimizer.
        momentum: μ ∈ [0, 1).
        memory_depth, memory_hidden_dim: depth and hidden width h of each LearnedMemoryModule
            (optimizer-wide, since a memory serves every group; the reference kept them, with
            ``memory_lr``, in the param-group defaults).
        meta_learning: whether :meth:`meta_step` trains the memories.
        bucket_sizes: the block sizes S, one memory each (default: the sizes of
            ``memory_modules`` when given, else 64, 256, 1024, 4096).
        memory_modules: memories to use instead of fresh ones, an ``nn.ModuleDict`` keyed by
            ``str(S)`` (e.g. another optimizer's ``memory_modules``, shared across tasks by
            :class:`nested_learning.meta.MetaLearner`, or the result of ``pretrain_optimizer``);
            it must hold every bucket the parameters need.
        foreach: run each bucket's memory once on the blocks of all its tensors (``None``:
            True), or once per tensor (the same math, one smaller product per tensor).

    A memory created here takes the device of the first parameter of its bucket and that
    parameter's dtype when float32/float64 (else float32); contexts are cast to the memory's
    dtype and updates back to each parameter's. All parameters must share one device.
    Momentum buffers have the parameter's dtype.

    ``state_dict`` holds, besides the per-parameter momenta and step counts (by parameter
    index), the memories' weights under ``"memory_modules"`` (by bucket size) and the memory
    optimizer's state under ``"memory_optimizer"``. The steps recorded for the next meta step
    are not part of it.
    """

    def __init__(self, params: Iterable[Any], memory_optimizer: MemoryOptimizerArg = None, lr: float = 1e-3,
                 memory_lr: float = 1e-4, momentum: float = 0.9, memory_depth: int = 2, memory_hidden_dim: int = 64,
                 meta_learning: bool = True, *, bucket_sizes: Sequence[int] | None = None,
                 memory_modules: nn.ModuleDict | None = None, foreach: bool | None = None):
        if foreach is not None and not isinstance(foreach, bool):
            raise ValueError(f"foreach must be None, True or False, got {foreach!r}")
        self.foreach = True if foreach is None else foreach
        lr = number("lr", lr)
        momentum = number("momentum", momentum, 0.0, 1.0, high_open=True)
        self.memory_lr = number("memory_lr", memory_lr)
        self.memory_depth = positive_int("memory_depth", memory_depth)
        self.memory_hidden_dim = positive_int("memory_hidden_dim", memory_hidden_dim)
        self.meta_learning = bool(meta_learning)
        if memory_modules is not None and not isinstance(memory_modules, nn.ModuleDict):
            raise TypeError("memory_modules must be an nn.ModuleDict keyed by bucket size, "
                            f"got {type(memory_modules).__name__}")
        if bucket_sizes is None and memory_modules is not None:
            if not all(k.isdigit() for k in memory_modules):
                raise ValueError(f"memory_modules must be keyed by bucket size ('64', ...), "
                                 f"got keys {list(memory_modules)}")
            bucket_sizes = [int(k) for k in memory_modules]
        self.bucket_sizes = check_bucket_sizes(bucket_sizes)
        self._shared_memories = memory_modules is not None
        self.memory_modules = memory_modules if memory_modules is not None else nn.ModuleDict()
        self.memory_optimizer: Optimizer | None = None
        # per parameter, since the last meta step: the momentum c_t and the displacement
        # W_t − W_0 = −Σ η c, both differentiable in the memory weights
        self._trace: dict[Tensor, dict[str, Tensor]] = {}
        super().__init__(params, {"lr": lr, "momentum": momentum})
        if self.meta_learning:
            self.memory_optimizer = self._memory_optimizer(memory_optimizer)

    # ------------------------------------------------------------------ memories

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (as ``torch.optim.Optimizer``) and the memories of its new buckets."""
        super().add_param_group(param_group)
        devices = {p.device for g in self.param_groups for p in g["params"]}
        if len(devices) > 1:
            raise ValueError(f"NestedDeepMomentumGD needs all parameters on one device, "
                             f"got {sorted(map(str, devices))}")
        for p in self.param_groups[-1]["params"]:
            key = str(bucket_for(p.numel(), self.bucket_sizes))
            if key in self.memory_modules:
                continue
            if self._shared_memories:
                raise ValueError(f"memory_modules has no memory for bucket {key} "
                                 f"(it holds {list(self.memory_modules)})")
            dtype = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
            size = int(key)
            memory = LearnedMemoryModule(2 * size, self.memory_hidden_dim, size, self.memory_depth).to(p.device, dtype)
            self.memory_modules[key] = memory
            if self.memory_optimizer is not None:
                self.memory_optimizer.add_param_group({"params": list(memory.parameters())})

    def _memory_optimizer(self, memory_optimizer: MemoryOptimizerArg) -> Optimizer:
        params = [p for m in self.get_memory_modules() for p in m.parameters()]
        if memory_optimizer is None:
            return torch.optim.Adam(params, lr=self.memory_lr)
        if isinstance(memory_optimizer, Optimizer):
            held = {p for g in memory_optimizer.param_groups for p in g["params"]}
            if any(p not in held for p in params):
                raise ValueError("memory_optimizer does not hold every memory parameter "
                                 "(pass a factory, or memory_modules together with their optimizer)")
            return memory_optimizer
        if callable(memory_optimizer):
            return memory_optimizer(params)
        raise TypeError(f"memory_optimizer must be an Optimizer, a factory of one, or None, got {memory_optimizer!r}")

    def get_memory_modules(self) -> list[nn.Module]:
        """The memories, one per bucket in use, by increasing bucket size."""
        return [self.memory_modules[k] for k in sorted(self.memory_modules, key=int)]

    # ------------------------------------------------------------------ step

    def step(self, closure: Callable[[], Any] | None = None, create_graph: bool = False) -> Any:
        """One step of every parameter with a gradient (see the module docstring).

        With ``create_graph=True`` the step is recorded, differentiably in the memory weights,
        for the next :meth:`compute_meta_gradients` / :meth:`meta_step`; the momentum fed to
        the memory is then the recorded (differentiable) one. A step without it ends the
        recording (earlier recorded steps are dropped). Gradients are always used detached.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not create_graph:
            self._trace.clear()
        buckets: dict[int, list[tuple[Tensor, dict[str, Any]]]] = defaultdict(list)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("NestedDeepMomentumGD does not support sparse gradients")
                buckets[bucket_for(p.numel(), self.bucket_sizes)].append((p, group))
        with torch.set_grad_enabled(create_graph):
            for size, entries in buckets.items():
                for chunk in [entries] if self.foreach else [[e] for e in entries]:
                    self._step_bucket(size, chunk, create_graph)
        return loss

    def _step_bucket(self, size: int, entries: list[tuple[Tensor, dict[str, Any]]], create_graph: bool) -> None:
        """The tensors ``entries`` of bucket ``size``, their blocks through its memory at once."""
        memory = self.memory_modules[str(size)]
        dtype = next(memory.parameters()).dtype
        previous, grads, moms = [], [], []
        for p, _ in entries:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            trace = self._trace.get(p) if create_graph else None
            m_prev = trace["momentum"] if trace is not None else state["momentum_buffer"].to(dtype, copy=True)
            previous.append(m_prev)
            grads.append(to_blocks(p.grad.detach().reshape(-1).to(dtype), size))
            moms.append(to_blocks(m_prev.reshape(-1), size))
        d_blocks = memory(torch.cat(grads), torch.cat(moms))
        row = 0
        for (p, group), m_prev, g_blocks in zip(entries, previous, grads):
            rows = g_blocks.shape[0]
            d = from_blocks(d_blocks[row:row + rows], p.numel()).view(p.shape)
            row += rows
            c = group["momentum"] * m_prev + d
            state = self.state[p]
            with torch.no_grad():
                p.add_(c.to(p.dtype), alpha=-group["lr"])
                state["momentum_buffer"].copy_(c)
            state["step"] += 1
            if create_graph:
                trace = self._trace.get(p)
                shift = -group["lr"] * c
                displacement = shift if trace is None else trace["displacement"] + shift
                self._trace[p] = {"momentum": c, "displacement": displacement}

    # ------------------------------------------------------------------ meta-learning

    def compute_meta_gradients(self, meta_loss: Tensor) -> None:
        """Accumulate into the memories' ``.grad`` the first-order meta-gradient of ``meta_loss``.

        With W_0 the parameters before the recorded steps t = 1..K and W_K the current ones,
        the recorded steps give W_K(θ) = W_0 − Σ_t η_t c_t(θ), θ the memory weights. This adds

            Σ_W ⟨∂meta_loss/∂W |_{W_K}, ∂W_K/∂θ⟩

        where ∂W_K/∂θ is exact through the momentum recursion (c_t = μ c_{t−1} + d_t, and
        the memory's momentum input c_{t−1}) with the gradients g_t held fixed — the
        dependence of later gradients on earlier updates is ignored, as in first-order MAML.
        With the momentum input also held fixed this would be ∂W_K/∂d_k = −η Σ_{j=k}^{K} μ^{j−k};
        here that input carries its own path. It is the gradient, at the current θ, of the
        surrogate Σ_W ⟨ḡ, W_K(θ)⟩ with ḡ = ∂meta_loss/∂W_K detached, so descending it descends
        meta_loss to first order. ``meta_loss``'s graph is freed; the recording ends.
        """
        if not self._trace:
            raise RuntimeError("no recorded steps: take inner steps with step(create_graph=True) before a meta step")
        params = list(self._trace)
        traces = [self._trace[p] for p in params]
        self._trace = {}
        meta_grads = torch.autograd.grad(meta_loss, params, allow_unused=True)
        terms = [(g.to(t["displacement"].dtype) * t["displacement"]).sum()
                 for g, t in zip(meta_grads, traces) if g is not None and t["displacement"].requires_grad]
        if terms:
            torch.stack(terms).sum().backward()

    def meta_step(self, meta_loss: Tensor) -> None:
        """One memory update: zero the memory gradients, :meth:`compute_meta_gradients`, clip
        each memory's gradient to norm 1, step the memory optimizer (as the reference). A no-op
        (dropping the recorded steps) when ``meta_learning`` is False."""
        if not self.meta_learning or self.memory_optimizer is None:
            self._trace.clear()
            return
        self.memory_optimizer.zero_grad()
        self.compute_meta_gradients(meta_loss)
        for memory in self.get_memory_modules():
            nn.utils.clip_grad_norm_(memory.parameters(), max_norm=1.0)
        self.memory_optimizer.step()

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["memory_modules"] = {k: m.state_dict() for k, m in self.memory_modules.items()}
        if self.memory_optimizer is not None:
            state["memory_optimizer"] = self.memory_optimizer.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        memories = state_dict.pop("memory_modules", None)
        memory_optimizer = state_dict.pop("memory_optimizer", None)
        if memories is not None:
            if set(memories) != set(self.memory_modules):
                raise ValueError(f"state_dict has memories for buckets {sorted(memories, key=int)}, "
                                 f"this optimizer {sorted(self.memory_modules, key=int)}")
            for key, memory_state in memories.items():
                self.memory_modules[key].load_state_dict(memory_state)
        if memory_optimizer is not None and self.memory_optimizer is not None:
            self.memory_optimizer.load_state_dict(memory_optimizer)
        super().load_state_dict(state_dict)
        self._trace.clear()


# ---------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class LinearTask:
    """A synthetic task: each call draws X ~ N(0, 1)^{batch_size×in} and returns (X, y) with
    y = X w + b + σ ε (regression) or y = 1[X w + b > 0] as floats (classification).
    Batches come from the global RNG (``torch.manual_seed`` makes them reproducible)."""

    weight: Tensor
    bias: Tensor
    noise_std: float = 0.0
    classification: bool = False
    batch_size: int = 32

    def __call__(self) -> tuple[Tensor, Tensor]:
        x = torch.randn(self.batch_size, self.weight.shape[0])
        y = x @ self.weight + self.bias
        if self.classification:
            return x, (y > 0).float()
        return x, y + self.noise_std * torch.randn(self.batch_size, self.weight.shape[1])


def create_meta_learning_task_distribution(num_tasks: int = 100, input_dim: int = 10, output_dim: int = 1,
                                           task_type: str = "regression", *,
                                           seed: int | None = None) -> list[LinearTask]:
    """``num_tasks`` distinct random linear tasks for meta-training an optimizer.

    Each task has its own w ~ N(0, 1)^{in×out} and, for regression, noise σ ~ U(0, 0.5);
    ``"mixed"`` picks regression or binary classification with probability ½ per task. Task
    parameters are drawn now — from ``torch.Generator().manual_seed(seed)`` when ``seed`` is
    given (the same seed gives the same tasks), else from the global RNG. The reference
    library's closures all shared the last task's weights; these tasks are distinct.
    """
    num_tasks = positive_int("num_tasks", num_tasks)
    input_dim = positive_int("input_dim", input_dim)
    output_dim = positive_int("output_dim", output_dim)
    task_type = choice("task_type", task_type, TASK_TYPES)
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(num_tasks):
        classification = task_type == "classification" or (
            task_type == "mixed" and torch.rand(1, generator=gen).item() >= 0.5)
        weight = torch.randn(input_dim, output_dim, generator=gen)
        noise = 0.0 if classification else 0.5 * torch.rand(1, generator=gen).item()
        tasks.append(LinearTask(weight, torch.zeros(output_dim), noise, classification))
    return tasks
