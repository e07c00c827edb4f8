"""Everything only a GPU can tell about the package, in one command that fits a time budget.

    python -m nested_learning.benchmark.device_suite --out DIR [--budget 540] [--parts a,b,...]
        [--quick] [--device cuda] [--peer DIR] [--peer-m3 FILE] [--reference-library DIR] [--list]

A GPU is usually lent for a few minutes. The suite runs its parts most important first:
correctness of the compiled kernels, then the speed targets of the optimizers, then those of
the models, then every op's table. Each part runs in its own subprocess under its own time
limit, so a crash, a hang or an out-of-memory error costs that part only. A part starts only
when the time left in the budget covers its ``minimum``. For each part it writes
``DIR/<part>.log`` (stdout and stderr) and, for the benchmarks, ``DIR/<part>.json`` (their
rows). It writes ``DIR/summary.json`` after every part, so a run that is cut off still says
what finished. ``--quick`` runs the same commands at toy sizes: that is the CPU smoke test
of the suite and a first sanity pass on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .orthogonal_steps import PEER_ENV


@dataclass(frozen=True)
class Options:
    """What the parts' commands are built from."""

    out: Path
    device: str
    quick: bool = False
    peer: Optional[str] = None
    peer_m3: Optional[str] = None
    reference_library: Optional[str] = None


@dataclass(frozen=True)
class Part:
    """One subprocess: ``argv(options)`` is its Python argument list (``None``:
    nothing to run in this setting); it gets at most ``limit`` seconds and starts only when
    ``minimum`` seconds of the budget are left."""

    name: str
    purpose: str
    argv: Callable[[Options], Optional[list[str]]]
    limit: float
    minimum: float
    env: Callable[[Options], dict[str, str]] = field(default=lambda o: {})


def _json(o: Options, name: str) -> list[str]:
    return ["--json", str(o.out / f"{name}.json")]


def _tests(o: Options) -> Optional[list[str]]:
    if o.device != "cuda":  # under the interpreter these are the ordinary test suite's job
        return None
    return ["-m", "pytest", "-q", "-m", "triton", "-p", "no:cacheprovider", "tests", f"--junitxml={o.out / 'triton_tests.xml'}"]


def _check(o: Options) -> list[str]:
    return ["-m", "nested_learning.cli", "check", "--device", o.device] + (["--op", "delta_rule"] if o.quick else [])


def _optimizer_steps(o: Options) -> list[str]:
    size = ["--layers", "1", "--width", "64"] if o.quick else ["--layers", "20", "--width", "2048"]
    return ["-m", "nested_learning.benchmark.optimizer_steps", "--device", o.device, "--dtype", "bfloat16", *size,
            *_json(o, "optimizer_steps")]


def _orthogonal_steps(o: Options) -> list[str]:
    size = ["--params", "50000", "--width", "32", "--repeats", "2", "--warmup", "1"] if o.quick else \
        ["--params", "1000000000", "--width", "2048"]
    return ["-m", "nested_learning.benchmark.orthogonal_steps", "--device", o.device, *size, *_json(o, "orthogonal_steps")]


def _model_throughput(o: Options) -> list[str]:
    size = ["--dim", "32", "--layers", "1", "--heads", "2", "--seq-len", "64", "--repeats", "2", "--warmup", "1"] \
        if o.quick else ["--repeats", "3", "--warmup", "1"]  # the script's defaults are the GPU target
    return ["-m", "nested_learning.benchmark.model_throughput", "--device", o.device, *size, *_json(o, "model_throughput")]


def _hope_block(o: Options) -> list[str]:
    size = ["--batch", "1", "--seq-len", "64", "--dim", "32", "--heads", "2", "--titans-batch", "1",
            "--titans-seq-len", "32", "--titans-dim", "32", "--titans-heads", "2", "--repeats", "1", "--warmup", "0"] \
        if o.quick else ["--repeats", "3"]
    external = [*(["--peer", o.peer] if o.peer else []),
                *(["--reference-library", o.reference_library] if o.reference_library else [])]
    return ["-m", "nested_learning.benchmark.hope_block", "--device", o.device, "--quiet", *size, *external,
            *_json(o, "hope_block")]


def _bench_ops(o: Options) -> Optional[list[str]]:
    if o.device != "cuda":  # CPU tables come from `nested-learning bench`, without a budget to fit
        return None
    return ["-m", "nested_learning.cli", "bench", "--device", o.device, "--quick", *(["--op", "delta_rule"] if o.quick else []),
            *_json(o, "bench_ops")]


def _peer_m3(o: Options) -> dict[str, str]:
    return {PEER_ENV: o.peer_m3} if o.peer_m3 else {}


PARTS: tuple[Part, ...] = (
    Part("doctor", "what was built and which backend serves the device", lambda o: ["-m", "nested_learning.cli", "doctor"],
         limit=30, minimum=5),
    Part("check", "every backend against float64 on the registry's cases", _check, limit=120, minimum=30),
    Part("triton_tests", "the kernel tests compiled for the GPU (not interpreted)", _tests, limit=180, minimum=60),
    Part("optimizer_steps", "DeepMomentumGD step at 1B bf16 vs AdamW(fused)", _optimizer_steps, limit=150, minimum=60),
    Part("orthogonal_steps", "Muon / M3 steps at 1B vs torch.optim.Muon (and the peer's M3)", _orthogonal_steps,
         limit=90, minimum=30, env=_peer_m3),
    Part("model_throughput", "HOPE vs a same-size SDPA Transformer, bf16, d 1024, T 4096", _model_throughput,
         limit=180, minimum=60),
    Part("hope_block", "HOPE block rows (fused vs PyTorch path, peer and reference library when given)", _hope_block,
         limit=180, minimum=60),
    Part("bench_ops", "every op's table: backends vs eager and compiled PyTorch", _bench_ops, limit=240, minimum=60),
)


def run_part(part: Part, options: Options, seconds: float) -> dict:
    """Run ``part`` for at most ``seconds``; its outcome: status 'ok' | 'failed' | 'timeout' | 'not run here'."""
    argv = part.argv(options)
    if argv is None:
        return {"status": "not run here", "seconds": 0.0}
    command = [sys.executable, *argv]
    start = time.perf_counter()
    with open(options.out / f"{part.name}.log", "w") as log:
        log.write(" ".join(command) + "\n\n")
        log.flush()
        try:
            rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=seconds,
                                env={**os.environ, **part.env(options)}).returncode
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            rc, status = None, "timeout"
    return {"status": status, "returncode": rc, "seconds": round(time.perf_counter() - start, 1), "command": command}


def run(options: Options, budget: float, parts: tuple[Part, ...] = PARTS) -> dict[str, dict]:
    """Run ``parts`` in order within ``budget`` seconds; their outcomes by name (also written
    to ``out/summary.json`` after each part)."""
    options.out.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + budget
    summary: dict[str, dict] = {}
    for part in parts:
        left = deadline - time.perf_counter()
        if left < part.minimum:
            summary[part.name] = {"status": "no time left", "seconds": 0.0}
        else:
            print(f"[{part.name}] {part.purpose} (≤ {min(part.limit, left):.0f} s)", file=sys.stderr, flush=True)
            summary[part.name] = {"purpose": part.purpose, **run_part(part, options, min(part.limit, left))}
            print(f"[{part.name}] {summary[part.name]['status']} in {summary[part.name]['seconds']} s",
                  file=sys.stderr, flush=True)
        (options.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def select(names: Optional[str]) -> tuple[Part, ...]:
    """The parts named in the comma-separated ``names`` (all when ``None``), in suite order."""
    if not names:
        return PARTS
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {p.name for p in PARTS}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"parts must be among {sorted(known)}, got unknown {unknown}")
    return tuple(p for p in PARTS if p.name in wanted)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for the logs, JSON rows and summary.json")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for the whole suite")
    parser.add_argument("--parts", help="comma-separated part names (default: all, in suite order)")
    parser.add_argument("--quick", action="store_true", help="toy sizes (smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peer", metavar="DIR", help="checkout of kmccleary3301/nested_learning")
    parser.add_argument("--peer-m3", metavar="FILE", help="the peer's M3 source file (orthogonal_steps' peer rows)")
    parser.add_argument("--reference-library", metavar="DIR", help="checkout of phlong3105/nested_learning")
    parser.add_argument("--list", action="store_true", help="print the parts and exit")
    args = parser.parse_args(argv)
    try:
        parts = select(args.parts)
    except ValueError as err:
        parser.error(str(err))
    if args.list:
        for p in parts:
            print(f"{p.name:18s} ≤ {p.limit:4.0f} s  {p.purpose}")
        return 0
    if args.out is None:
        parser.error("--out is required")
    if not args.budget > 0:
        parser.error(f"--budget must be positive, got {args.budget}")
    options = Options(args.out, args.device, args.quick, args.peer, args.peer_m3, args.reference_library)
    summary = run(options, args.budget, parts)
    for name, s in summary.items():
        print(f"{name:18s} {s['status']:13s} {s['seconds']:7.1f} s")
    return 0 if all(s["status"] in ("ok", "not run here") for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
