"""One trainer for the whole Nested Learning stack: a learned optimizer, multi-frequency CMS
levels, self-modifying layers and (optionally) validation-driven meta-learning.

One :meth:`NestedLearningTrainer.train_step`, at step i (counted from 0):

1. forward on the batch and the loss (the model's own scalar loss when it returns
   ``(loss, logits)``, else ``loss_fn(output, labels)``), ``zero_grad``, backward;
2. with ``enable_cms_multifreq``: the multi-frequency CMS rule of
   :class:`~nested_learning.training.ContinuumMemoryTrainer` (the same code, fused op
   ``cms_accumulate``): every level l adds its gradient into its window, and only when
   i ≡ 0 (mod C_l) does it take one optimizer step on the window mean; off-cycle levels and
   their optimizer state do not move::

       θ_l ← Opt(θ_l, (1/n) Σ_{t=i−n+1}^{i} g_t)   if i ≡ 0 (mod C_l), else unchanged

   (fused for SGD/Adam/AdamW; any other optimizer, e.g. DeepMomentumGD, gets the window mean
   in ``.grad`` of the due levels and ``grad = None`` elsewhere, so it skips them);
3. ``optimizer.step()`` for everything else (every step), the learned optimizer training its
   memory on its internal loss inside it;
4. ``model.apply_pending_updates()`` when the model has it (self-modifying layers queue their
   updates during the forward so that backward sees the weights the forward used).

Meta-learning (``enable_meta_learning`` and an optimizer with ``meta_step``, such as
:class:`~nested_learning.optimizers.NestedDeepMomentumGD`): in :meth:`train_epoch` with a
``val_dataloader``, after every step whose count (1-based, global across epochs) is a multiple
of ``meta_val_steps``, ``optimizer.meta_step`` gets the mean loss of the first ≤ 3 validation
batches (model in eval mode, graph kept). When the optimizer's ``step`` takes
``create_graph`` (NestedDeepMomentumGD), the steps between two meta steps are taken with
``create_graph=True`` so that the meta step has them to differentiate through (the reference
trainer stepped without it, leaving the meta step nothing to learn from). Without
``meta_step`` it is a no-op and no validation batch is read.

Decided differences from the reference library's trainer:

- the CMS rule above is the intended one; the reference let every level move on every step
  (a due level's gradient replaced by the window mean, an off-cycle level's left raw);
- ``train_epoch(dataloader, loss_fn, epoch=None, val_dataloader=None)``: an explicit epoch
  number as :class:`ContinuumMemoryTrainer`'s (None: the next one); the reference's form
  ``train_epoch(dataloader, loss_fn, val_dataloader)`` still works (a non-integer third
  argument is taken as the validation loader);
- batches are ``(inputs, …, labels)`` = ``(data[0], data[-1])`` for tuples/lists and
  ``(data, data)`` for a tensor, in training as in evaluation (the reference trained a
  3-tuple as self-supervised on ``data[0]`` but evaluated it against ``data[-1]``);
- a tuple output whose first element is a scalar is ``(loss, logits, …)`` whatever its length
  (the reference required length 2 in training), and its logits are ``output[1]``; a tuple
  whose first element is not a scalar is ``(logits, …)`` (the reference scored accuracy on
  ``output[1]`` there);
- ``evaluate``'s accuracy is correct predictions over predictions made (one per row of the
  logits, e.g. per token for ``[B, T, V]``) — the reference divided by the batch size, giving
  accuracies above 1 for sequences — and it is reported whenever classification-shaped logits
  (last dim > 1) met labels of matching shape, also at 0 (the reference dropped the key when
  nothing was right); the loss stays the batch-size-weighted mean of batch losses;
- forwards in :meth:`evaluate` and in the meta step queue self-modifying updates; the trainer
  drops them (``model.clear_pending_updates()`` when the model has it) instead of letting
  validation data into the weights at the next training step;
- ``get_cms_update_stats()['updates_per_level']`` counts the updates each level really took
  (⌈i/C_l⌉ after i steps; every step without ``enable_cms_multifreq``), the reference's
  ⌊i/C_l⌋ missed the one at step 0;
- ``train(..., save_path=...)`` writes the best epoch by validation loss, or every epoch's end
  when there is no ``val_loader`` (the reference then never wrote anything); the checkpoint is
  :meth:`state_dict` plus ``epoch`` and ``metrics``;
- :meth:`state_dict` / :meth:`load_state_dict` hold the model (with the CMS window sums and
  counters), the optimizer and the trainer's counters, so a resumed run continues
  bit-identically; the model is moved to ``device`` once, at construction, as the reference;
- bad arguments raise ValueError/TypeError naming the argument; no banners are printed.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .continuum_trainer import _check_levels_held, _find_cms_modules, _multifreq_update, _progress

__all__ = ["NestedLearningTrainer", "create_nested_learning_setup"]

_META_VAL_BATCHES = 3  # validation batches averaged into one meta loss (as the reference)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch.device (None: CUDA when available, else CPU)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str, a torch.device or None, got {type(device).__name__}")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"device must name a torch device, got {device!r} ({err})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for CUDA, which is not available here")
    return resolved


def _check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _check_loss_fn(loss_fn: object) -> None:
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")


def _split_batch(data: Any) -> tuple[Any, Any]:
    """``(inputs, labels)`` of one loader item: ``(data[0], data[-1])`` or ``(data, data)``."""
    if isinstance(data, (tuple, list)):
        if not data:
            raise ValueError("a dataloader yielded an empty batch")
        return data[0], data[-1]
    return data, data


def _loss_and_logits(output: Any, labels: Tensor, loss_fn: Callable) -> tuple[Tensor, Any]:
    """The loss to minimise and the logits to score, from a model's output (module docstring)."""
    if isinstance(output, (tuple, list)):
        if not output:
            raise ValueError("the model returned an empty tuple")
        first = output[0]
        if isinstance(first, Tensor) and first.dim() == 0:
            return first, (output[1] if len(output) > 1 else None)
        return loss_fn(first, labels), first
    return loss_fn(output, labels), output


class NestedLearningTrainer:
    """Train a model with a (learned) optimizer, multi-frequency CMS updates, self-modifying
    layers and optional meta-learning (module docstring).

    Args:
        model: the model; its ContinuumMemorySystem modules are found by ``named_modules``.
            It is moved to ``device``.
        optimizer: a ``torch.optim.Optimizer`` over the model's parameters (e.g.
            DeepMomentumGD); with ``enable_cms_multifreq`` it must hold every CMS level.
        device: where the model and batches go (None: CUDA when available, else CPU).
        enable_cms_multifreq: give CMS levels their multi-frequency updates (else every
            parameter is stepped every step).
        enable_meta_learning: call ``optimizer.meta_step`` on validation losses in
            :meth:`train_epoch` (needs an optimizer with ``meta_step``; a no-op otherwise).
        meta_val_steps: steps between two meta steps.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: str | torch.device | None = None,
        enable_cms_multifreq: bool = True,
        enable_meta_learning: bool = False,
        meta_val_steps: int = 5,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.device = _resolve_device(device)
        self.enable_cms_multifreq = _check_flag("enable_cms_multifreq", enable_cms_multifreq)
        self.enable_meta_learning = _check_flag("enable_meta_learning", enable_meta_learning)
        self.meta_val_steps = _check_positive_int("meta_val_steps", meta_val_steps)
        self.model = model.to(self.device)
        self.optimizer = optimizer
        self.cms_modules = _find_cms_modules(self.model)
        if enable_cms_multifreq:
            _check_levels_held(self.cms_modules, optimizer)
        self.step_count = 0
        self.epoch_count = 0
        self.metrics_history: list[dict[str, Any]] = []
        try:
            self._step_records = "create_graph" in inspect.signature(optimizer.step).parameters
        except (TypeError, ValueError):  # a step without an inspectable signature
            self._step_records = False
        self._recording = False  # steps taken with create_graph=True for the next meta step

    # ------------------------------------------------------------------ one step

    def train_step(self, batch: Tensor, labels: Tensor, loss_fn: Callable[[Any, Tensor], Tensor]) -> dict[str, Any]:
        """Forward, backward, multi-frequency CMS update, optimizer step, pending self-modifying
        updates. Returns ``{'loss', 'step'}`` (``step``: steps taken so far) plus the optimizer's
        ``get_internal_loss_stats()`` when it has one."""
        if not isinstance(batch, Tensor):
            raise TypeError(f"batch must be a Tensor, got {type(batch).__name__}")
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a Tensor, got {type(labels).__name__}")
        _check_loss_fn(loss_fn)
        self.model.train()
        labels = labels.to(self.device)
        loss, _ = _loss_and_logits(self.model(batch.to(self.device)), labels, loss_fn)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn must return a single-element Tensor, got "
                             f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}")
        self.optimizer.zero_grad()
        loss.backward()
        if self.enable_cms_multifreq:
            _multifreq_update(self.optimizer, self.cms_modules, self.step_count)
        if self._recording:
            self.optimizer.step(create_graph=True)
        else:
            self.optimizer.step()
        apply = getattr(self.model, "apply_pending_updates", None)
        if callable(apply):
            apply()
        self.step_count += 1
        metrics: dict[str, Any] = {"loss": float(loss.detach()), "step": self.step_count}
        stats = getattr(self.optimizer, "get_internal_loss_stats", None)
        if callable(stats):
            metrics.update(stats())
        return metrics

    # ------------------------------------------------------------------ meta-learning

    def _meta_active(self, val_dataloader: Iterable | None) -> bool:
        return self.enable_meta_learning and val_dataloader is not None and callable(getattr(self.optimizer, "meta_step", None))

    def _meta_learning_step(self, val_dataloader: Iterable, loss_fn: Callable) -> None:
        """``optimizer.meta_step(mean loss of the first ≤ 3 validation batches)``, model in eval mode."""
        self.model.eval()
        total, n = None, 0
        try:
            with torch.enable_grad():
                for data in val_dataloader:
                    batch, labels = _split_batch(data)
                    labels = labels.to(self.device)
                    loss, _ = _loss_and_logits(self.model(batch.to(self.device)), labels, loss_fn)
                    total = loss if total is None else total + loss
                    n += 1
                    if n >= _META_VAL_BATCHES:
                        break
            if n:
                self.optimizer.meta_step(total / n)
        finally:
            self._drop_pending_updates()
            self.model.train()

    def _drop_pending_updates(self) -> None:
        clear = getattr(self.model, "clear_pending_updates", None)
        if callable(clear):
            clear()

    # ------------------------------------------------------------------ loops

    def train_epoch(self, dataloader: Iterable, loss_fn: Callable, epoch: int | None = None,
                    val_dataloader: Iterable | None = None) -> dict[str, Any]:
        """One pass over ``dataloader``; returns ``{'epoch', 'train_loss' (mean), 'total_steps'}``
        (also appended to ``metrics_history``). ``val_dataloader`` feeds the meta steps."""
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
            if val_dataloader is None and isinstance(epoch, Iterable) and not isinstance(epoch, str):
                epoch, val_dataloader = None, epoch  # the reference's train_epoch(dataloader, loss_fn, val_dataloader)
            else:
                raise TypeError(f"epoch must be an integer or None, got {epoch!r}")
        _check_loss_fn(loss_fn)
        self.epoch_count = self.epoch_count + 1 if epoch is None else epoch
        meta = self._meta_active(val_dataloader)
        self._recording = meta and self._step_records
        total, n = 0.0, 0
        bar = _progress(dataloader, f"Epoch {self.epoch_count}")
        try:
            for data in bar:
                batch, labels = _split_batch(data)
                metrics = self.train_step(batch, labels, loss_fn)
                total += metrics["loss"]
                n += 1
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", avg=f"{total / n:.4f}")
                if meta and self.step_count % self.meta_val_steps == 0:
                    self._meta_learning_step(val_dataloader, loss_fn)
        finally:
            self._recording = False
        if n == 0:
            raise ValueError("dataloader yielded no batches")
        metrics = {"epoch": self.epoch_count, "train_loss": total / n, "total_steps": self.step_count}
        self.metrics_history.append(metrics)
        return metrics

    @torch.no_grad()
    def evaluate(self, dataloader: Iterable, loss_fn: Callable) -> dict[str, Any]:
        """``{'eval_loss', 'eval_samples'[, 'eval_accuracy']}``: the batch-size-weighted mean of
        the batch losses, the number of samples (first dimension), and, for classification
        logits (last dim > 1) against class labels (or one-hot/score labels of the logits'
        shape, taken by argmax), the fraction of correct argmax predictions."""
        _check_loss_fn(loss_fn)
        self.model.eval()
        total_loss, samples, correct, predictions = 0.0, 0, 0, 0
        try:
            for data in dataloader:
                batch, labels = _split_batch(data)
                batch, labels = batch.to(self.device), labels.to(self.device)
                loss, logits = _loss_and_logits(self.model(batch), labels, loss_fn)
                total_loss += float(loss) * batch.size(0)
                samples += batch.size(0)
                if isinstance(logits, Tensor) and logits.dim() > 1 and logits.size(-1) > 1:
                    preds = logits.argmax(dim=-1)
                    targets = labels.argmax(dim=-1) if labels.dim() == logits.dim() else labels
                    if targets.shape == preds.shape:
                        correct += int((preds == targets).sum())
                        predictions += preds.numel()
        finally:
            self._drop_pending_updates()
        metrics: dict[str, Any] = {"eval_loss": total_loss / samples if samples else 0.0, "eval_samples": samples}
        if predictions:
            metrics["eval_accuracy"] = correct / predictions
        return metrics

    def train(self, train_loader: Iterable, loss_fn: Callable, num_epochs: int, val_loader: Iterable | None = None,
              log_every: int = 1, save_path: str | None = None) -> list[dict[str, Any]]:
        """``num_epochs`` epochs (meta steps on ``val_loader`` when meta-learning), each followed
        by :meth:`evaluate` on ``val_loader``; returns one dict per epoch (train and eval
        metrics). ``save_path``: checkpoint of the best epoch by validation loss (every epoch
        without ``val_loader``)."""
        _check_positive_int("num_epochs", num_epochs)
        _check_positive_int("log_every", log_every)
        _check_loss_fn(loss_fn)
        best = math.inf
        history = []
        for i in range(num_epochs):
            metrics = self.train_epoch(train_loader, loss_fn, val_dataloader=val_loader if self.enable_meta_learning else None)
            if val_loader is not None:
                metrics.update(self.evaluate(val_loader, loss_fn))
            if (i + 1) % log_every == 0:
                line = f"Epoch {i + 1}/{num_epochs} | Train Loss: {metrics['train_loss']:.4f}"
                if "eval_loss" in metrics:
                    line += f" | Val Loss: {metrics['eval_loss']:.4f}"
                if "eval_accuracy" in metrics:
                    line += f" | Val Acc: {metrics['eval_accuracy']:.4f}"
                print(line)
            if save_path is not None and ("eval_loss" not in metrics or metrics["eval_loss"] < best):
                best = metrics.get("eval_loss", best)
                torch.save({**self.state_dict(), "epoch": i, "metrics": dict(metrics)}, save_path)
            history.append(metrics)
        return history

    # ------------------------------------------------------------------ statistics and checkpoints

    def get_cms_update_stats(self) -> dict[str, dict[str, Any]]:
        """Per CMS: ``num_levels``, ``chunk_sizes``, ``step_count`` (its training forwards),
        ``updates_per_level`` (updates taken) and ``accumulated_steps`` (gradients waiting in
        each window)."""
        stats = {}
        for name, cms in self.cms_modules.items():
            multifreq = self.enable_cms_multifreq and not cms.in_context
            stats[name] = {
                "num_levels": cms.num_levels,
                "chunk_sizes": list(cms.chunk_sizes),
                "step_count": int(cms.step_count.item()),
                "updates_per_level": list(cms.update_counts) if multifreq else [self.step_count] * cms.num_levels,
                "accumulated_steps": list(cms.accumulated_counts) if multifreq else [0] * cms.num_levels,
            }
        return stats

    def state_dict(self) -> dict[str, Any]:
        """Model (with the CMS window sums and counters), optimizer, step and epoch counters and
        the epoch history (the reference's checkpoint key names for model and optimizer)."""
        return {
            "model_state_dict": self.model.state_dict(),
            "optimizer_state_dict": self.optimizer.state_dict(),
            "step_count": self.step_count,
            "epoch_count": self.epoch_count,
            "metrics_history": [dict(m) for m in self.metrics_history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from NestedLearningTrainer.state_dict(), got {type(state).__name__}")
        missing = [k for k in ("model_state_dict", "optimizer_state_dict", "step_count") if k not in state]
        if missing:
            raise ValueError(f"state is missing {missing} (expected NestedLearningTrainer.state_dict())")
        self.model.load_state_dict(state["model_state_dict"])
        self.optimizer.load_state_dict(state["optimizer_state_dict"])
        self.step_count = int(state["step_count"])
        self.epoch_count = int(state.get("epoch_count", 0))
        self.metrics_history = [dict(m) for m in state.get("metrics_history", [])]


def create_nested_learning_setup(
    model: nn.Module,
    lr: float = 1e-3,
    momentum: float = 0.9,
    memory_lr: float = 1e-4,
    device: str | torch.device | None = None,
    enable_cms_multifreq: bool = True,
) -> tuple[nn.Module, torch.optim.Optimizer, NestedLearningTrainer]:
    """``(model on device, DeepMomentumGD with a shared memory pool, NestedLearningTrainer)``
    (``device`` None: CUDA when available, else CPU)."""
    from ..optimizers import DeepMomentumGD

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    resolved = _resolve_device(device)
    _check_flag("enable_cms_multifreq", enable_cms_multifreq)
    model = model.to(resolved)  # before the optimizer: its memories live on the parameters' device
    optimizer = DeepMomentumGD(model.parameters(), lr=lr, momentum=momentum, memory_lr=memory_lr, use_shared_memory=True)
    trainer = NestedLearningTrainer(model, optimizer, device=resolved, enable_cms_multifreq=enable_cms_multifreq)
    return model, optimizer, trainer
