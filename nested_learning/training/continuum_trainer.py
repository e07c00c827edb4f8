"""Training with multi-frequency CMS updates, on the fused op ``cms_accumulate``.

Per step i (counted from 0) every CMS level l adds its gradient into an fp32 window sum; when
i ≡ 0 (mod C_l) the level takes one inner-optimizer step on the window's sum (or mean, the
default) and the window restarts. Off-cycle levels and their optimizer state do not move:

    θ_l ← Opt(θ_l, Σ_{t=i−C_l+1}^{i} g_t [/ n])    if i ≡ 0 (mod C_l), else unchanged

The inner optimizer is the trainer's own: for ``torch.optim.SGD``, ``Adam`` and ``AdamW``
the whole update (accumulate, step, reset) is one fused pass per (device, dtype) group, with
the optimizer's hyper-parameters and its state slots (``momentum_buffer`` / ``exp_avg``,
``exp_avg_sq``, ``step``); any other optimizer gets the window gradient through its own
``step()`` (parameters that are not due keep ``grad = None`` so it skips them). Parameters
outside the CMS levels are stepped by the optimizer every step.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .. import ops
from ..memory import ContinuumMemorySystem

__all__ = ["ContinuumMemoryTrainer", "visualize_update_schedule", "update_schedule"]


def _progress(iterable: Iterable, description: str) -> Iterable:
    """A progress bar over ``iterable``: tqdm, else rich, else none."""
    try:
        from tqdm import tqdm
    except ImportError:
        try:
            from rich.progress import track
        except ImportError:
            return iterable
        return track(iterable, description=description, transient=True)
    return tqdm(iterable, desc=description, leave=False)


def _fused_hyper(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> dict[str, Any] | None:
    """``cms_accumulate`` keywords for a param group of SGD/Adam/AdamW, or None when the fused
    path cannot express the group (other optimizers, amsgrad, maximize, tensor lr…)."""
    if group.get("maximize") or group.get("amsgrad") or group.get("differentiable") or isinstance(group["lr"], Tensor):
        return None
    if type(optimizer) is torch.optim.SGD:
        return {"optimizer": "sgd", "lr": group["lr"], "momentum": group["momentum"], "dampening": group["dampening"],
                "nesterov": group["nesterov"], "weight_decay": group["weight_decay"]}
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        decoupled = type(optimizer) is torch.optim.AdamW or group.get("decoupled_weight_decay", False)
        beta1, beta2 = group["betas"]
        return {"optimizer": "adamw" if decoupled else "adam", "lr": group["lr"], "beta1": beta1, "beta2": beta2,
                "eps": group["eps"], "weight_decay": group["weight_decay"]}
    return None


def _find_cms_modules(model: nn.Module) -> dict[str, ContinuumMemorySystem]:
    """Every ContinuumMemorySystem in ``model``, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ContinuumMemorySystem)}


def _check_levels_held(cms_modules: dict[str, ContinuumMemorySystem], optimizer: torch.optim.Optimizer) -> None:
    """ValueError unless ``optimizer`` holds every parameter of every (training-time) CMS level."""
    held = {p for g in optimizer.param_groups for p in g["params"]}
    for name, cms in cms_modules.items():
        if cms.in_context:
            continue
        missing = [i for i in range(cms.num_levels) for p in cms.level_parameters(i) if p not in held]
        if missing:
            raise ValueError(f"optimizer does not hold the parameters of {name or 'the CMS'} level(s) {sorted(set(missing))}")


def _multifreq_update(optimizer: torch.optim.Optimizer, cms_modules: dict[str, ContinuumMemorySystem], step: int,
                      average: bool = True) -> None:
    """The multi-frequency rule of the module docstring for step ``step``, between ``backward()``
    and ``optimizer.step()``: every training-time level's gradient goes into its window; due
    levels are stepped (fused) or handed their window gradient (fallback), and every level's
    ``.grad`` that ``optimizer.step()`` must not apply is set to None."""
    for cms in cms_modules.values():
        if not cms.in_context:
            _cms_update(optimizer, cms, step, average)


def _cms_update(optimizer: torch.optim.Optimizer, cms: ContinuumMemorySystem, step: int, average: bool) -> None:
    """One CMS: fused groups (SGD/Adam/AdamW param groups) through ``cms_accumulate``, the rest by fallback."""
    due_levels = cms.get_update_levels(step)
    fused: dict[tuple, list[tuple[int, nn.Parameter, Tensor]]] = defaultdict(list)
    fallback: list[tuple[int, nn.Parameter, Tensor]] = []
    # the optimizer's current groups (load_state_dict and schedulers replace or edit them)
    groups = optimizer.param_groups
    hypers = {p: h for g in groups for h in [_fused_hyper(optimizer, g)] for p in g["params"]}
    for level in range(cms.num_levels):
        for p, acc in zip(cms.level_parameters(level), cms.accumulators(level)):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            hyper = hypers[p]
            if hyper is None:
                fallback.append((level, p, acc))
            else:
                fused[tuple(sorted(hyper.items()))].append((level, p, acc))
    for key, items in fused.items():
        _fused_step(optimizer, dict(key), items, due_levels, cms, average)
    _fallback_step(fallback, due_levels, cms, average)
    for level, due in enumerate(due_levels):
        if due:
            cms.update_counts[level] += 1
            cms.accumulated_counts[level] = 0
        else:
            cms.accumulated_counts[level] += 1


def _state(
    optimizer: torch.optim.Optimizer, p: nn.Parameter, kind: str, momentum: float
) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """The optimizer's state slots for ``p`` in torch.optim's names (fp32 buffers)."""
    state = optimizer.state[p]
    ct = torch.float64 if p.dtype == torch.float64 else torch.float32
    if "step" not in state:
        state["step"] = torch.zeros((), dtype=torch.float32)
    if kind == "sgd":
        if momentum == 0:
            return None, None, state["step"]
        if state.get("momentum_buffer") is None:
            state["momentum_buffer"] = torch.zeros_like(p, dtype=ct)
        return state["momentum_buffer"], None, state["step"]
    for name in ("exp_avg", "exp_avg_sq"):
        if name not in state:
            state[name] = torch.zeros_like(p, dtype=ct)
    return state["exp_avg"], state["exp_avg_sq"], state["step"]


def _fused_step(optimizer: torch.optim.Optimizer, hyper: dict[str, Any], items: list, due_levels: list[bool],
                cms: ContinuumMemorySystem, average: bool) -> None:
    m, v, steps, params, grads, accs, counts, due = [], [], [], [], [], [], [], []
    for level, p, acc in items:
        exp_avg, exp_avg_sq, step = _state(optimizer, p, hyper["optimizer"], hyper.get("momentum", 0.0))
        if exp_avg is not None:
            m.append(exp_avg)
        if exp_avg_sq is not None:
            v.append(exp_avg_sq)
        params.append(p.data)
        grads.append(p.grad)
        accs.append(acc)
        counts.append(cms.accumulated_counts[level])
        steps.append(int(step.item()))
        due.append(due_levels[level])
    ops.cms_accumulate(params, grads, accs, m, v, counts, steps, due, average=average, **hyper)
    for (level, p, _), is_due in zip(items, due):
        if is_due:
            optimizer.state[p]["step"] += 1
        p.grad = None


def _fallback_step(items: list, due_levels: list[bool], cms: ContinuumMemorySystem, average: bool) -> None:
    """Any other optimizer: window gradient into ``.grad`` of due parameters, None elsewhere."""
    with torch.no_grad():
        for level, p, acc in items:
            acc.add_(p.grad)
            if due_levels[level]:
                n = cms.accumulated_counts[level] + 1
                p.grad = (acc * (1.0 / n) if average else acc.clone()).to(p.dtype)
                acc.zero_()
            else:
                p.grad = None


class ContinuumMemoryTrainer:
    """Train a model whose ``ContinuumMemorySystem`` levels update at their own periods.

    Args:
        model: any module containing ContinuumMemorySystem modules (found by ``named_modules``).
        optimizer: the optimizer over all of the model's parameters.
        device: where batches are moved.
        average: step each level on the window mean (default, as the reference library) or sum.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: str | torch.device = "cpu",
                 average: bool = True):
        self.model = model
        self.optimizer = optimizer
        self.device = torch.device(device)
        self.average = average
        self.step_count = 0
        self.cms_modules = _find_cms_modules(model)
        _check_levels_held(self.cms_modules, optimizer)

    # ------------------------------------------------------------------ one step

    def train_step(self, batch: Tensor, labels: Tensor, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> float:
        """Forward, backward, multi-frequency CMS update, optimizer step for the rest; returns the loss."""
        self.model.train()
        output = self.model(batch.to(self.device))
        loss = loss_fn(output, labels.to(self.device))
        self.optimizer.zero_grad()
        loss.backward()
        _multifreq_update(self.optimizer, self.cms_modules, self.step_count, self.average)
        self.optimizer.step()
        self.step_count += 1
        return float(loss.detach())

    # ------------------------------------------------------------------ loops

    def train_epoch(self, dataloader: Iterable, loss_fn: Callable, epoch: int) -> float:
        """One pass over ``dataloader`` of (batch, labels) pairs; returns the mean loss."""
        total, n = 0.0, 0
        bar = _progress(dataloader, f"epoch {epoch}")
        for batch, labels in bar:
            total += self.train_step(batch, labels, loss_fn)
            n += 1
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=total / n)
        return total / max(n, 1)

    @torch.no_grad()
    def evaluate(self, dataloader: Iterable, loss_fn: Callable) -> float:
        self.model.eval()
        losses = [float(loss_fn(self.model(b.to(self.device)), y.to(self.device))) for b, y in dataloader]
        return sum(losses) / max(len(losses), 1)

    def train(self, train_loader: Iterable, val_loader: Iterable | None, loss_fn: Callable, num_epochs: int,
              log_every: int = 1) -> list[dict[str, Any]]:
        """Train for ``num_epochs``; returns one history entry per epoch."""
        history = []
        for epoch in range(1, num_epochs + 1):
            train_loss = self.train_epoch(train_loader, loss_fn, epoch)
            val_loss = self.evaluate(val_loader, loss_fn) if val_loader is not None else None
            entry = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "step_count": self.step_count,
                     "level_updates": {n: list(c.update_counts) for n, c in self.cms_modules.items()}}
            history.append(entry)
            if epoch % log_every == 0:
                val = "" if val_loss is None else f", val loss {val_loss:.4f}"
                print(f"epoch {epoch}/{num_epochs}: train loss {train_loss:.4f}{val}")
        return history

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Model (with the CMS window sums and counters), optimizer and the step counter."""
        return {"step_count": self.step_count, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step_count"])


def update_schedule(chunk_sizes: list[int], num_steps: int) -> list[list[int]]:
    """Levels updating at each step 0 … num_steps−1 (step % C_l == 0)."""
    if any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in chunk_sizes) or not chunk_sizes:
        raise ValueError(f"chunk_sizes must be a non-empty list of positive integers, got {chunk_sizes!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    return [[lvl for lvl, c in enumerate(chunk_sizes) if s % c == 0] for s in range(num_steps)]


def visualize_update_schedule(chunk_sizes: list[int], num_steps: int = 1000, path: str | None = None) -> str:
    """The update schedule as text (one line per step where some level updates, as in
    ``Step 8: Updated levels: [0]``), and a PNG of the level × step update grid at ``path``
    when given (needs matplotlib). Returns the text."""
    schedule = update_schedule(chunk_sizes, num_steps)
    lines = [f"Step {s}: Updated levels: {lv}" for s, lv in enumerate(schedule) if lv]
    text = "\n".join(lines)
    if path is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as err:
            raise RuntimeError(f"visualize_update_schedule(path=...) needs matplotlib ({err})") from err
        grid = torch.zeros(len(chunk_sizes), num_steps)
        for s, levels in enumerate(schedule):
            grid[levels, s] = 1.0
        fig, ax = plt.subplots(figsize=(10, 0.6 * len(chunk_sizes) + 1.4))
        ax.imshow(grid.numpy(), aspect="auto", cmap="Blues", interpolation="nearest", vmin=0, vmax=1)
        ax.set_yticks(range(len(chunk_sizes)), [f"level {i} (C={c})" for i, c in enumerate(chunk_sizes)])
        ax.set_xlabel("optimizer step")
        ax.set_title(f"CMS update schedule, periods {chunk_sizes} ({math.fsum(1 / c for c in chunk_sizes):.3g} level updates/step)")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return text
