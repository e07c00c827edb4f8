"""Whole optimizer steps on a transformer-like stack with fixed gradients, timed side by side.

    python -m nested_learning.benchmark.optimizer_steps [--layers 3] [--width 512] [--dtype float32]
        [--device cpu|cuda] [--json out.json]

Times one ``step()`` (median after a warm-up) of DeepMomentumGD (fused and PyTorch paths) and
``torch.optim.AdamW(foreach=True)`` (on CUDA also ``AdamW(fused=True)``, the GPU target's base:
20 layers of width 2048 in bfloat16 are 1.0B parameters); with ``--reference-dmgd FILE`` (the reference library's
``optimizers/deep_momentum.py``, loaded from a local checkout) its DeepMomentumGD too. The
reference feeds only min(n, 4096) coordinates of each tensor through its memory, so the rows
also give time per memory-processed element.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from typing import Any, Callable, Optional

import torch

from .core import median_time
from .runner import device_name

Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def layer_shapes(layers: int, width: int) -> list[tuple[int, ...]]:
    """q, k, v, o [d, d] with biases, fc1 [4d, d], fc2 [d, 4d] with biases, two LayerNorms, per layer."""
    d = width
    layer = [(d, d), (d,)] * 4 + [(4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,), (d,), (d,)]
    return layer * layers


def make_params(shapes: list[tuple[int, ...]], device: torch.device, dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    """Parameters with fixed gradients (N(0, 1e-2)) attached, drawn on ``device`` (a billion
    CPU draws per row would cost more than the rows' timings)."""
    gen = torch.Generator(device).manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=gen, device=device).to(dtype))
        p.grad = (torch.randn(s, generator=gen, device=device) * 1e-2).to(dtype)
        params.append(p)
    return params


def load_file_module(path: str, name: str) -> Any:
    """A module loaded from a source file under a private name (a checkout's package may share ours)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot load a module from {path!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def time_step(factory: Factory, shapes: list[tuple[int, ...]], device: torch.device, dtype: torch.dtype) -> tuple[float, int]:
    """Median seconds of one ``step()`` on fresh parameters (grads fixed), and the number of runs."""
    opt = factory(make_params(shapes, device, dtype))
    return median_time(opt.step, device, min_runs=5, min_seconds=1.0)


def run(layers: int = 3, width: int = 512, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32,
        reference_dmgd: Optional[str] = None) -> list[dict[str, Any]]:
    """One row per optimizer: median ms, elements per step, memory-processed elements, ratios."""
    from ..optimizers.deep_momentum import DeepMomentumGD

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = layer_shapes(layers, width)
    numel = sum(torch.Size(s).numel() for s in shapes)
    candidates: dict[str, tuple[Factory, int]] = {
        "DeepMomentumGD (fused)": (lambda ps: DeepMomentumGD(ps, lr=1e-3, fused=True), numel),
        "DeepMomentumGD (PyTorch, per bucket)": (lambda ps: DeepMomentumGD(ps, lr=1e-3, fused=False), numel),
        "AdamW(foreach)": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True), numel),
    }
    if device.type == "cuda":
        candidates["AdamW(fused)"] = (lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), numel)
    if reference_dmgd:
        ref = load_file_module(reference_dmgd, "_reference_library_deep_momentum")
        processed = sum(min(torch.Size(s).numel(), 4096) for s in shapes)
        candidates["reference library DeepMomentumGD"] = (lambda ps: ref.DeepMomentumGD(ps, lr=1e-3), processed)
    rows = []
    for name, (factory, through_memory) in candidates.items():
        seconds, runs = time_step(factory, shapes, device, dtype)
        rows.append({"optimizer": name, "median_ms": seconds * 1e3, "runs": runs, "params": numel,
                     "memory_elements": through_memory, "ns_per_memory_element": seconds * 1e9 / through_memory,
                     "device": device_name(device), "dtype": str(dtype).replace("torch.", ""),
                     "shapes": f"{layers} layers of width {width}"})
    fused = rows[0]
    for r in rows:
        r["x_fused_time"] = r["median_ms"] / fused["median_ms"]
        r["x_fused_per_element"] = r["ns_per_memory_element"] / fused["ns_per_memory_element"]
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reference-dmgd", help="path of the reference library's optimizers/deep_momentum.py")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    rows = run(args.layers, args.width, torch.device(args.device), getattr(torch, args.dtype), args.reference_dmgd)
    print(f"{rows[0]['device']}, {rows[0]['shapes']} ({rows[0]['params'] / 1e6:.2f}M parameters, {args.dtype})")
    print(f"{'optimizer':40s} {'ms':>9s} {'ns/elem':>8s} {'x time':>7s} {'x per elem':>10s}")
    for r in rows:
        print(f"{r['optimizer']:40s} {r['median_ms']:9.1f} {r['ns_per_memory_element']:8.2f} "
              f"{r['x_fused_time']:7.2f} {r['x_fused_per_element']:10.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
