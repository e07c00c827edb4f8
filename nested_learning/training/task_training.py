"""Train a language model on one of the embedded tasks: what ``nested-learning train`` runs.

A run samples fresh batches from the task (``nested_learning.data``) every step, minimises the
next-token cross-entropy on the task's scored positions, evaluates on a fixed held-out set
every ``eval_every`` steps, and returns the curves and final metrics. The defaults (a small
HOPE on multi-query associative recall) finish in a few minutes on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from .. import data
from ..models import HOPE, Transformer
from ..optimizers import M3, DeepMomentumGD

__all__ = ["TrainConfig", "MODELS", "OPTIMIZERS", "build_model", "build_optimizer", "evaluate", "train", "plot_history"]

MODELS = ("hope", "transformer", "titans")
# MQAR with every pair queried three times on average: the same recall problem with three times the
# supervision per token, which a small model learns within the default budget.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {"mqar": {"num_pairs": 8, "seq_len": 64, "num_queries": 24}}
LR_DEFAULTS = {"adamw": 3e-3, "dmgd": 3e-3, "m3": 1e-3}
# M3 divides the orthogonalised momentum (entries ~ 1/√n whatever the gradient's scale) by √V + ε,
# so a matrix whose gradients are tiny — e.g. the value projections of in-context levels, reached
# only through the inner learning rate — takes steps of size η/(√n ε); ε = 1e-8 makes them
# explode, 1e-3 bounds them.
M3_EPS = 1e-3
OPTIMIZERS = ("adamw", "dmgd", "m3")


@dataclass
class TrainConfig:
    """One run. ``task_kwargs`` go to the task's constructor, over ``TASK_DEFAULTS`` (e.g.
    ``num_pairs`` for MQAR); ``lr`` defaults per optimizer (``LR_DEFAULTS``)."""

    model: str = "hope"
    task: str = "mqar"
    optimizer: str = "adamw"
    steps: int = 600
    batch_size: int = 64
    lr: Optional[float] = None
    weight_decay: float = 0.1
    warmup: float = 0.1
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    eval_every: int = 50
    eval_size: int = 256
    seed: int = 0
    task_kwargs: Optional[dict[str, Any]] = None

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.task not in data.TASKS:
            raise ValueError(f"task must be one of {tuple(data.TASKS)}, got {self.task!r}")
        for name in ("steps", "batch_size", "dim", "n_layers", "n_heads", "eval_every", "eval_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.lr is None:
            self.lr = LR_DEFAULTS[self.optimizer]
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup!r}")


def build_model(config: TrainConfig, vocab_size: int, seq_len: int) -> nn.Module:
    """``hope``: HOPE (Titans mixer, in-context CMS levels every 8/32/128 tokens, those that fit
    in ``seq_len``, MLP width 2·dim); ``titans``: the same blocks with one position-wise MLP
    instead of the CMS chain; ``transformer``: a causal softmax Transformer of the same width,
    depth and heads whose MLP width gives it HOPE's parameter count (a same-size baseline)."""
    common = dict(dim=config.dim, n_layers=config.n_layers, n_heads=config.n_heads, vocab_size=vocab_size,
                  max_seq_len=seq_len, dropout=0.0)
    if config.model == "titans":
        return HOPE(**common, chunk_sizes=[1], cms_in_context=False)
    chunk_sizes = [c for c in (8, 32, 128) if c <= seq_len] or [seq_len]
    hope = HOPE(**common, chunk_sizes=chunk_sizes, cms_hidden_dim=2 * config.dim)
    if config.model == "hope":
        return hope
    d = config.dim
    per_block = (_count(hope) - _count(Transformer(**common, mlp_dim=1))) // config.n_layers + 2 * d + 1
    return Transformer(**common, mlp_dim=max(1, per_block // (2 * d + 1)))


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (weight decay on matrices only); DeepMomentumGD; or M3 on the blocks' matrices with
    AdamW on embeddings and vectors (as Muon is used: an embedding row that no token of the batch
    hit has V = 0, and M3's division by √V + ε would blow it up)."""
    if config.optimizer == "dmgd":
        return DeepMomentumGD(model.parameters(), lr=config.lr, weight_decay=0.0)
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    matrices = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in embeddings]
    others = [p for p in model.parameters() if p.dim() < 2 or id(p) in embeddings]
    if config.optimizer == "adamw":
        decayed = [p for p in model.parameters() if p.dim() >= 2]
        rest = [p for p in model.parameters() if p.dim() < 2]
        return torch.optim.AdamW([{"params": decayed, "weight_decay": config.weight_decay},
                                  {"params": rest, "weight_decay": 0.0}], lr=config.lr)
    return _Combined([M3(matrices, lr=config.lr, eps=M3_EPS, weight_decay=config.weight_decay),
                      torch.optim.AdamW(others, lr=LR_DEFAULTS["adamw"], weight_decay=0.0)])


class _Combined(torch.optim.Optimizer):
    """Several optimizers stepped as one (their groups exposed, so schedulers reach them all)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        self.param_groups = [g for o in optimizers for g in o.param_groups]
        self.defaults = {}
        self.state = {}  # type: ignore[assignment]

    def step(self, closure: Optional[Callable[[], float]] = None) -> None:  # type: ignore[override]
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        for o, s in zip(self.optimizers, state_dict["optimizers"], strict=True):
            o.load_state_dict(s)


@torch.no_grad()
def evaluate(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], chunk: int = 64) -> dict[str, float]:
    """Mean loss over the scored positions and their next-token accuracy."""
    model.eval()
    ids, labels = batch
    loss_sum, correct, total = 0.0, 0, 0
    for i in range(0, ids.shape[0], chunk):
        logits = model(ids[i:i + chunk])
        lab = labels[i:i + chunk]
        scored = lab[:, 1:] != -100
        n = int(scored.sum())
        loss_sum += torch.nn.functional.cross_entropy(logits[:, :-1][scored], lab[:, 1:][scored], reduction="sum").item()
        c, _ = data.shifted_accuracy(logits, lab)
        correct, total = correct + c, total + n
    model.train()
    return {"loss": loss_sum / max(total, 1), "accuracy": correct / max(total, 1)}


def _schedule(config: TrainConfig) -> Callable[[int], float]:
    warm = max(1, int(config.warmup * config.steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, config.steps - warm)))

    return factor


def build_task(config: TrainConfig) -> data.Task:
    """The task of ``config``: its ``task_kwargs`` over ``TASK_DEFAULTS``."""
    return data.make_task(config.task, **{**TASK_DEFAULTS.get(config.task, {}), **(config.task_kwargs or {})})


def train(config: TrainConfig, progress: Optional[Callable[[int, dict[str, float]], None]] = None) -> dict[str, Any]:
    """Run ``config``; returns ``{"config", "params", "history", "final", "seconds", "tokens_per_second"}``.

    ``progress(step, metrics)`` is called after every step (metrics: ``loss``, and ``eval_*``
    on evaluation steps).
    """
    torch.manual_seed(config.seed)
    task = build_task(config)
    model = build_model(config, task.vocab_size, task.seq_len)
    optimizer = build_optimizer(config, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    train_gen = torch.Generator().manual_seed(config.seed + 1)
    eval_batch = task.sample(config.eval_size, generator=torch.Generator().manual_seed(10_000 + config.seed))
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    for step in range(config.steps):
        ids, labels = task.sample(config.batch_size, generator=train_gen)
        loss, _ = model(ids, labels=labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if hasattr(model, "apply_pending_updates"):
            model.apply_pending_updates()
        metrics = {"step": step, "loss": loss.item()}
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            metrics.update({f"eval_{k}": v for k, v in evaluate(model, eval_batch).items()})
            history.append(metrics)
        if progress is not None:
            progress(step, metrics)
    seconds = time.perf_counter() - start
    return {
        "config": dataclasses.asdict(config),
        "params": sum(p.numel() for p in model.parameters()),
        "history": history,
        "final": {k: history[-1][k] for k in ("eval_loss", "eval_accuracy")},
        "seconds": seconds,
        "tokens_per_second": config.steps * config.batch_size * task.seq_len / seconds,
    }


def plot_history(runs: dict[str, dict[str, Any]], path: str) -> None:
    """Eval loss and accuracy curves of one or more runs (keyed by label) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for label, run in runs.items():
        steps = [h["step"] + 1 for h in run["history"]]
        ax_loss.plot(steps, [h["eval_loss"] for h in run["history"]], marker="o", label=label)
        ax_acc.plot(steps, [h["eval_accuracy"] for h in run["history"]], marker="o", label=label)
    ax_loss.set(xlabel="step", ylabel="eval loss (scored positions)")
    ax_acc.set(xlabel="step", ylabel="eval accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
