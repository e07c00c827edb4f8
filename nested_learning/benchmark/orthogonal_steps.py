"""Time one optimizer step of the orthogonalising optimizers on a ~10M-parameter weight stack.

The model is a stack of transformer-style layers of 2-D weights, width d (default 384): per
layer four [d, d] attention projections, an MLP up-projection [4d, d] and a down-projection
[d, 4d] (12·d² parameters: 1,769,472 for d = 384); ``model_params`` picks the number of layers
(6 layers = 10,616,832 parameters for the default 10M; a small ``width`` gives many small
matrices, where batching the Newton–Schulz step matters most). Parameters are fp32 with fixed
random gradients; each optimizer is warmed up, then ``repeats`` single ``step()`` calls of
each are timed, round-robin, and the median (with min and max) reported. Rows:

  - ``nested_learning Muon`` and ``torch.optim.Muon`` (defaults; both orthogonalise in bf16
    where bf16 GEMMs are native);
  - ``nested_learning M3`` and, when the environment variable ``NL_PEER_M3_FILE`` names the
    peer's ``m3.py`` (kmccleary3301/nested_learning), that ``M3`` (loaded under a private
    module name), once at a step inside a slow chunk and once with ``slow_chunk=1``, where
    every step also refreshes the slow momentum (a second Newton–Schulz pass).

    python -m nested_learning.benchmark.orthogonal_steps [--params N] [--width D] [--repeats R] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from typing import Any, Callable, Optional

import torch

from ..optimizers.m3 import M3
from ..optimizers.muon import Muon
from ..optimizers.newton_schulz import default_dtype

WIDTH = 384
PEER_ENV = "NL_PEER_M3_FILE"


def layer_shapes(width: int = WIDTH) -> list[tuple[int, int]]:
    """One layer's weights: 4 attention projections [d, d], MLP up [4d, d] and down [d, 4d]."""
    return [(width, width)] * 4 + [(4 * width, width), (width, 4 * width)]


def model_shapes(model_params: int, width: int = WIDTH) -> list[tuple[int, int]]:
    """The weight shapes of the layer stack with about ``model_params`` parameters (≥ 1 layer)."""
    per_layer = sum(r * c for r, c in layer_shapes(width))
    return layer_shapes(width) * max(1, round(model_params / per_layer))


def load_peer_m3(path: str) -> type:
    """The ``M3`` class of the Python file at ``path``, imported under a private module name."""
    spec = importlib.util.spec_from_file_location("_nl_benchmark_peer_m3", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load a module from {path!r}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.M3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(steps: list[Callable[[], Any]], device: torch.device, repeats: int, warmup: int) -> list[list[float]]:
    """Wall times in seconds of ``repeats`` calls of every function in ``steps``, after ``warmup``
    untimed calls of each; the calls go round-robin, so load from other processes on the
    machine spreads over all of them alike."""
    for step in steps:
        for _ in range(warmup):
            step()
    _sync(device)
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for step, out in zip(steps, times):
            start = time.perf_counter()
            step()
            _sync(device)
            out.append(time.perf_counter() - start)
    return times


def run(
    model_params: int = 10_000_000,
    repeats: int = 5,
    warmup: int = 2,
    width: int = WIDTH,
    device: str = "cpu",
    seed: int = 0,
) -> list[dict]:
    """Time one step of each optimizer; one dict per row (see the module docstring)."""
    dev = torch.device(device)
    shapes = model_shapes(model_params, width)
    layers = len(shapes) // len(layer_shapes(width))
    described = f"{layers} x (4x[{width},{width}], [{4 * width},{width}], [{width},{4 * width}])"
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(s, generator=gen).mul_(s[1] ** -0.5).to(dev) for s in shapes]
    grads = [torch.randn(s, generator=gen).mul_(1e-3).to(dev) for s in shapes]
    ns_dtype = str(default_dtype(dev)).removeprefix("torch.")
    candidates: list[tuple[str, str, Callable[[list[torch.Tensor]], torch.optim.Optimizer], str]] = [
        ("muon", "nested_learning Muon", lambda p: Muon(p, lr=0.02), ns_dtype),
        ("muon", "torch.optim.Muon", lambda p: torch.optim.Muon(p, lr=0.02), "bfloat16"),
        ("m3", "nested_learning M3", lambda p: M3(p), ns_dtype),
        ("m3 slow_chunk=1", "nested_learning M3", lambda p: M3(p, slow_chunk=1), ns_dtype),
    ]
    peer_file: Optional[str] = os.environ.get(PEER_ENV)
    if peer_file:
        peer = load_peer_m3(peer_file)
        candidates += [
            ("m3", "peer M3", lambda p: peer(p), "float32"),
            ("m3 slow_chunk=1", "peer M3", lambda p: peer(p, slow_chunk=1), "float32"),
        ]
    steps = []
    for _, _, make, _ in candidates:
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        steps.append(make(params).step)
    rows = [
        dict(
            task=task,
            optimizer=name,
            device=str(dev),
            threads=torch.get_num_threads(),
            params=sum(w.numel() for w in weights),
            shapes=described,
            param_dtype="float32",
            ns_dtype=dtype,
            median_s=statistics.median(times),
            min_s=min(times),
            max_s=max(times),
            runs=len(times),
        )
        for (task, name, _, dtype), times in zip(candidates, time_steps(steps, dev, repeats, warmup))
    ]
    _add_speedups(rows)
    return rows


def _add_speedups(rows: list[dict]) -> None:
    """``speedup``: the baseline's median over this row's (baseline: torch.optim.Muon for Muon,
    the peer M3 for M3, when timed)."""
    baselines = {"torch.optim.Muon", "peer M3"}
    base = {r["task"]: r["median_s"] for r in rows if r["optimizer"] in baselines}
    for r in rows:
        r["speedup"] = base[r["task"]] / r["median_s"] if r["task"] in base else None


def format_table(rows: list[dict]) -> str:
    head = f"{'task':<16} {'optimizer':<22} {'ns dtype':<9} {'median s':>9} {'min s':>8} {'max s':>8} {'speed-up':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
        lines.append(
            f"{r['task']:<16} {r['optimizer']:<22} {r['ns_dtype']:<9} {r['median_s']:>9.3f} "
            f"{r['min_s']:>8.3f} {r['max_s']:>8.3f} {speedup:>9}"
        )
    first = rows[0]
    lines.append(f"{first['params']:,} fp32 parameters: {first['shapes']}")
    lines.append(f"device {first['device']}, {first['threads']} threads; median of {first['runs']} steps after warm-up")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=10_000_000, help="model size (parameters)")
    parser.add_argument("--width", type=int, default=WIDTH, help="layer width d")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = run(args.params, args.repeats, args.warmup, args.width, args.device)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
