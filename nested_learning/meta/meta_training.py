"""Meta-training of learned optimizers on a distribution of tasks (MAML-style, first order).

One meta-iteration: for each task of a meta-batch, a fresh model is adapted by K inner steps
of the learned optimizer on one batch of the task (plain ``backward()``, then
``step(create_graph=True)`` to record the step), and its loss on a fresh batch of the task is
the task's meta loss. The meta-gradient of Σ_tasks post-loss over every task and every inner
step (first order, exact through the momentum recursion: see
``NestedDeepMomentumGD.compute_meta_gradients``) is accumulated into the memories that all
tasks share; their gradient is clipped to norm 1 and Adam(memory_lr) steps them.

Differences from the reference library: its meta-gradient reached only the last task's last
inner step, with the wrong sign; the tasks' optimizers had the shared memories swapped in by
position; an optimizer without meta support failed inside the inner loop. Here every task and
step counts, each task's optimizer receives the shared memories as its ``memory_modules``, and
an unsupported ``optimizer_class`` is a TypeError at construction. ``meta_train`` also returns
its (pre, post) history, and ``pretrain_optimizer`` keys the memories by bucket size.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..optimizers._hyper import number, positive_int
from ..optimizers.nested_dmgd import LinearTask

__all__ = ["MetaLearner", "SinusoidTask", "create_regression_tasks", "create_sinusoid_tasks", "pretrain_optimizer"]

Task = Callable[[], tuple[Tensor, Tensor]]


def _check_meta_optimizer(optimizer_class: type) -> None:
    """TypeError unless ``optimizer_class`` takes ``memory_modules``/``memory_optimizer``, has
    ``step(create_graph=...)`` and ``compute_meta_gradients`` (as NestedDeepMomentumGD)."""
    try:
        init_params = inspect.signature(optimizer_class).parameters
        step_params = inspect.signature(optimizer_class.step).parameters
    except (TypeError, ValueError, AttributeError):
        init_params, step_params = {}, {}
    if not ("memory_modules" in init_params and "memory_optimizer" in init_params and "create_graph" in step_params
            and callable(getattr(optimizer_class, "compute_meta_gradients", None))):
        name = getattr(optimizer_class, "__qualname__", repr(optimizer_class))
        raise TypeError(f"optimizer_class={name} has no meta-learning support: MetaLearner needs an optimizer with "
                        "memory_modules= and memory_optimizer= arguments, step(create_graph=True) and "
                        "compute_meta_gradients(), such as NestedDeepMomentumGD")


class MetaLearner:
    """Meta-trains the memories of a learned optimizer, shared by all tasks.

    Args:
        model_fn: makes a fresh model (called once per task, and once here for the shapes).
        optimizer_class: a learned optimizer with meta-learning support (``NestedDeepMomentumGD``);
            anything else is a TypeError.
        optimizer_kwargs: its keyword arguments; ``memory_lr`` (default 1e-4) is the meta
            learning rate.
        device: where models and memories live.

    ``shared_memory_modules`` (an ``nn.ModuleDict`` by bucket size) are the memories every
    task's optimizer uses; ``memory_optimizer`` is Adam over them.
    """

    def __init__(self, model_fn: Callable[[], nn.Module], optimizer_class: type, optimizer_kwargs: dict[str, Any],
                 device: str | torch.device = "cpu"):
        _check_meta_optimizer(optimizer_class)
        self.model_fn = model_fn
        self.optimizer_class = optimizer_class
        self.optimizer_kwargs = dict(optimizer_kwargs)
        self.device = torch.device(device)
        template = optimizer_class(model_fn().to(self.device).parameters(), **self.optimizer_kwargs)
        self.shared_memory_modules: nn.ModuleDict = template.memory_modules
        self.memory_optimizer = torch.optim.Adam(self.shared_memory_modules.parameters(),
                                                 lr=self.optimizer_kwargs.get("memory_lr", 1e-4))

    def get_memory_modules(self) -> nn.ModuleDict:
        """The shared memories, by bucket size (pass them as ``memory_modules=`` to reuse them)."""
        return self.shared_memory_modules

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """A task optimizer over ``model``'s parameters that uses the shared memories."""
        return self.optimizer_class(model.parameters(), **{**self.optimizer_kwargs,
                                                          "memory_modules": self.shared_memory_modules,
                                                          "memory_optimizer": self.memory_optimizer})

    def meta_train_step(self, task_batch: Sequence[Task], num_inner_steps: int = 5,
                        inner_lr: float | None = None) -> tuple[float, float]:
        """Adapt a fresh model to each task by ``num_inner_steps`` steps, then update the shared
        memories on Σ_tasks post-loss; returns the task-mean losses (pre, post) — pre on the
        adaptation batch before adapting, post on a fresh batch after."""
        num_inner_steps = positive_int("num_inner_steps", num_inner_steps)
        if inner_lr is not None:
            inner_lr = number("inner_lr", inner_lr)
        if not task_batch:
            raise ValueError("task_batch must hold at least one task")
        self.memory_optimizer.zero_grad()
        pre_total = post_total = 0.0
        for task in task_batch:
            model = self.model_fn().to(self.device)
            optimizer = self.make_optimizer(model)
            if inner_lr is not None:
                for group in optimizer.param_groups:
                    group["lr"] = inner_lr
            x, y = (t.to(self.device) for t in task())
            model.eval()
            with torch.no_grad():
                pre_total += float(self._compute_loss(model, x, y))
            model.train()
            for _ in range(num_inner_steps):
                optimizer.zero_grad()
                self._compute_loss(model, x, y).backward()
                optimizer.step(create_graph=True)
            x_val, y_val = (t.to(self.device) for t in task())
            post_loss = self._compute_loss(model, x_val, y_val)
            post_total += float(post_loss.detach())
            optimizer.compute_meta_gradients(post_loss)
        nn.utils.clip_grad_norm_(self.shared_memory_modules.parameters(), max_norm=1.0)
        self.memory_optimizer.step()
        return pre_total / len(task_batch), post_total / len(task_batch)

    def meta_train(self, task_distribution: Sequence[Task], num_iterations: int = 1000, meta_batch_size: int = 4,
                   num_inner_steps: int = 5, eval_every: int = 100) -> list[tuple[float, float]]:
        """``num_iterations`` meta-steps on tasks drawn with replacement (global RNG); prints the
        losses every ``eval_every`` iterations and returns every iteration's (pre, post)."""
        num_iterations = positive_int("num_iterations", num_iterations)
        meta_batch_size = positive_int("meta_batch_size", meta_batch_size)
        eval_every = positive_int("eval_every", eval_every)
        if not task_distribution:
            raise ValueError("task_distribution must hold at least one task")
        history = []
        for iteration in range(1, num_iterations + 1):
            picks = torch.randint(0, len(task_distribution), (meta_batch_size,)).tolist()
            pre, post = self.meta_train_step([task_distribution[i] for i in picks], num_inner_steps)
            history.append((pre, post))
            if iteration % eval_every == 0:
                print(f"meta-iteration {iteration}/{num_iterations}: pre-adaptation loss {pre:.4f}, "
                      f"post-adaptation loss {post:.4f}, improvement {pre - post:.4f}")
        return history

    @staticmethod
    def _compute_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Cross-entropy for long targets or 1-d float targets, else MSE (as the reference)."""
        output = model(x)
        if y.dtype == torch.long or (y.is_floating_point() and y.ndim == 1):
            return F.cross_entropy(output, y)
        return F.mse_loss(output, y)


def pretrain_optimizer(optimizer_class: type, optimizer_kwargs: dict[str, Any], task_distribution: Sequence[Task],
                       model_fn: Callable[[], nn.Module], num_iterations: int = 1000, meta_batch_size: int = 4,
                       num_inner_steps: int = 5, device: str | torch.device = "cpu") -> nn.ModuleDict:
    """Meta-train ``optimizer_class``'s memories on ``task_distribution``; returns them.

    The result is keyed by bucket size (``"64"``, ``"256"``, …), not ``memory_i`` per tensor as
    in the reference (the memories are per bucket); pass it as ``memory_modules=`` to a new
    optimizer to use the trained memories.
    """
    learner = MetaLearner(model_fn, optimizer_class, optimizer_kwargs, device)
    learner.meta_train(task_distribution, num_iterations, meta_batch_size, num_inner_steps)
    return learner.get_memory_modules()


def _generator(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(seed)


def create_regression_tasks(num_tasks: int = 100, input_dim: int = 20, output_dim: int = 1, *,
                            seed: int | None = None) -> list[LinearTask]:
    """Linear regression tasks y = X w + b + σ ε, X ~ N(0,1)^{32×in}, w ~ N(0,1)^{in×out},
    b ~ N(0,1)^{out}, σ ~ U(0, 0.1), one draw per task (from ``seed`` when given, else the
    global RNG); batches are drawn per call from the global RNG."""
    num_tasks = positive_int("num_tasks", num_tasks)
    input_dim = positive_int("input_dim", input_dim)
    output_dim = positive_int("output_dim", output_dim)
    gen = _generator(seed)
    tasks = []
    for _ in range(num_tasks):
        weight = torch.randn(input_dim, output_dim, generator=gen)
        bias = torch.randn(output_dim, generator=gen)
        tasks.append(LinearTask(weight, bias, 0.1 * torch.rand(1, generator=gen).item()))
    return tasks


@dataclass(frozen=True)
class SinusoidTask:
    """y = A sin(X + φ) with X ~ U(−5, 5)^{batch_size×1}, drawn per call from the global RNG."""

    amplitude: float
    phase: float
    batch_size: int = 32

    def __call__(self) -> tuple[Tensor, Tensor]:
        x = torch.rand(self.batch_size, 1) * 10 - 5
        return x, self.amplitude * torch.sin(x + self.phase)


def create_sinusoid_tasks(num_tasks: int = 100, *, seed: int | None = None) -> list[SinusoidTask]:
    """The classic MAML sinusoid tasks: A ~ U(0.1, 5.1), φ ~ U(0, π) per task (from ``seed``
    when given, else the global RNG)."""
    num_tasks = positive_int("num_tasks", num_tasks)
    gen = _generator(seed)
    return [SinusoidTask(torch.rand(1, generator=gen).item() * 5.0 + 0.1, torch.rand(1, generator=gen).item() * math.pi)
            for _ in range(num_tasks)]
