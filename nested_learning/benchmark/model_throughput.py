"""Training throughput of the HOPE language model against a same-size softmax Transformer.

    python -m nested_learning.benchmark.model_throughput [--device cuda] [--dtype bf16]
        [--dim 1024] [--layers 4] [--heads 16] [--seq-len 4096] [--batch 1] [--json FILE]

One training step = forward with next-token loss, backward, AdamW step (``foreach``; fused on
CUDA), on random tokens; the matmuls run under autocast in ``--dtype`` (bf16 or fp32), weights and
optimizer state stay fp32. Rows, timed round-robin (median of ``repeats`` steps after ``warmup``):

- ``hope``: ``HOPE`` as ``nested-learning train --model hope`` builds it (Titans mixer, in-context
  CMS levels every 8/32/128 tokens of width 2·dim), ops on their default backend;
- ``transformer``: the causal Transformer of ``nested-learning train --model transformer``, same
  width, depth and heads, attention through ``scaled_dot_product_attention``, MLP width chosen
  so that its parameter count matches HOPE's.

``tokens_per_s`` is batch · seq-len over the step's median; ``hope_vs_transformer`` is HOPE's
tokens/s over the Transformer's (the GPU target of HOPE is ≥ 0.8 at bf16, d = 1024, T = 4096).
"""

from __future__ import annotations

import argparse
import json
import statistics
from contextlib import nullcontext
from typing import Callable, Optional

import torch

from ..training.task_training import TrainConfig, build_model
from .orthogonal_steps import time_steps
from .runner import device_name

MODELS = ("hope", "transformer")
VOCAB = 256  # byte-level: the head stays small against the blocks


def _train_step(model: torch.nn.Module, tokens: torch.Tensor, dtype: torch.dtype) -> Callable[[], None]:
    """One forward (next-token loss) + backward + AdamW step of ``model`` on ``tokens``."""
    device = tokens.device
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    def step() -> None:
        with autocast:
            loss, _ = model(tokens, labels=tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run(
    dim: int = 1024,
    layers: int = 4,
    heads: int = 16,
    seq_len: int = 4096,
    batch: int = 1,
    dtype: str = "bf16",
    device: str = "cuda",
    repeats: int = 5,
    warmup: int = 2,
    seed: int = 0,
) -> list[dict]:
    """Time one training step of each model; one dict per row (module docstring)."""
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"dtype must be 'bf16' or 'fp32', got {dtype!r}")
    dev, amp = torch.device(device), torch.bfloat16 if dtype == "bf16" else torch.float32
    torch.manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, seq_len), device=dev)
    models = {name: build_model(TrainConfig(model=name, dim=dim, n_layers=layers, n_heads=heads), VOCAB, seq_len)
              .to(dev).train() for name in MODELS}
    times = time_steps([_train_step(m, tokens, amp) for m in models.values()], dev, repeats, warmup)
    rows = []
    for (name, model), t in zip(models.items(), times):
        median = statistics.median(t)
        rows.append(dict(model=name, params=sum(p.numel() for p in model.parameters()), dim=dim, layers=layers,
                         heads=heads, seq_len=seq_len, batch=batch, dtype=dtype, device=device_name(dev),
                         runs=len(t), median_ms=median * 1e3, min_ms=min(t) * 1e3, max_ms=max(t) * 1e3,
                         tokens_per_s=batch * seq_len / median))
    rows[0]["hope_vs_transformer"] = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="autocast dtype of the matmuls")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", metavar="FILE", help="write the rows here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.dim, args.layers, args.heads, args.seq_len, args.batch, args.dtype, args.device, args.repeats,
               args.warmup)
    print("| model | parameters | median ms | tokens/s |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['params']:,} | {r['median_ms']:.1f} | {r['tokens_per_s']:,.0f} |")
    print(f"\nHOPE / Transformer tokens/s: {rows[0]['hope_vs_transformer']:.2f} ({rows[0]['dtype']}, "
          f"B {args.batch} × T {args.seq_len}, d {args.dim}, {args.layers} layers, {rows[0]['device']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
