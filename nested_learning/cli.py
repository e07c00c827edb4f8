"""The ``nested-learning`` command: ``train``, ``doctor``, ``check`` and ``bench``.

    nested-learning train [--model M] [--task T] [--task-arg KEY=VALUE] [--optimizer O] [--steps N]
                          [--plot FILE] [--json FILE]
                                                train a model on an embedded task, print metrics as JSON
    nested-learning doctor                      what is available (torch, triton, _C, device)
    nested-learning check [--op NAME]           every backend vs the float64 reference
    nested-learning bench [--op NAME] [--quick] [--json FILE] [--plot FILE]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from typing import Optional, Sequence

import torch

from . import __version__, ops
from .benchmark import SPECS, report, runner
from .data import TASKS
from .training import task_training


def _device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return device


def _ops(name: Optional[str]) -> list[str]:
    if name is None:
        return list(SPECS)
    if name not in SPECS:
        raise SystemExit(f"--op must be one of {sorted(SPECS)}, got {name!r}")
    return [name]


def doctor(args: argparse.Namespace) -> int:
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "not installed"
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"
    rows = [
        ("nested_learning", __version__),
        ("torch", torch.__version__),
        ("triton", triton_version),
        ("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "unset")),
        ("nested_learning._C (C++ CPU kernels)", "loaded" if ops.HAS_EXT else f"not loaded: {ops.EXT_ERROR}"),
        ("CUDA device", cuda),
        ("CPU", runner.device_name(torch.device("cpu"))),
        ("NL_BACKEND", os.environ.get("NL_BACKEND", "unset")),
    ]
    for dev in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        try:
            rows.append((f"backend serving {dev} tensors", ops.select(torch.device(dev))))
        except (RuntimeError, ValueError) as err:
            rows.append((f"backend serving {dev} tensors", f"error: {err}"))
    for backend in ops.BACKENDS:
        for dev in ("cpu", "cuda"):
            ok, why = ops.available(backend, torch.device(dev))
            rows.append((f"backend {backend} on {dev}", "available" if ok else why))
    report.print_table("nested_learning doctor", ("item", "status"), rows)
    return 0


def check(args: argparse.Namespace) -> int:
    device = _device(args.device)
    names = _ops(args.op)
    with report.progress("checking") as advance:
        results = runner.run_checks(names, device, args.backend, advance)
    rows = []
    for r in results:
        w = r.worst
        rows.append(
            (r.case.name, r.implementation, r.passed, w.quantity if w else (r.error or "")[:80], w.error if w else None,
             w.reference_error if w else None, w.budget if w else None)
        )
    report.print_table(
        f"check on {runner.device_name(device)}: worst quantity per case and backend (error = relative to float64)",
        ("case", "backend", "verdict", "quantity", "error", "ref error", "budget"),
        rows,
    )
    failed = [r for r in results if not r.passed]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed or not results else 0


def bench(args: argparse.Namespace) -> int:
    device = _device(args.device)
    names = _ops(args.op)
    if args.threads:
        torch.set_num_threads(args.threads)
    with report.progress("benchmarking") as advance:
        rows = runner.run_bench(names, device, args.quick, args.backend, advance)
    dev = runner.device_name(device)
    for op in names:
        bases = SPECS[op].speedup_bases
        table = [
            (r["case"], r["mode"], r["implementation"], r["median_ms"], *(r["speedups"].get(b) for b in bases),
             r.get("floor_fraction"), r["passed"] if r["kind"] != "floor" else "floor")
            for r in rows if r["op"] == op
        ]
        report.print_table(
            f"{op} bench on {dev}: median ms; x <base> = base time / this time",
            ("case", "mode", "implementation", "median ms", *(f"x {b}" for b in bases), "floor frac", "check"),
            table,
        )
    if args.json:
        report.write_json(args.json, rows, dev)
        print(f"wrote {args.json}")
    if args.plot:
        report.plot(args.plot, rows, f"nested_learning bench on {dev}")
        print(f"wrote {args.plot}")
    return 1 if any(not r["passed"] and r["kind"] == "backend" for r in rows) else 0


def _task_args(pairs: Optional[list[str]]) -> Optional[dict[str, object]]:
    """``KEY=VALUE`` strings as task constructor arguments (integers and floats parsed)."""
    if not pairs:
        return None
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.isidentifier():
            raise SystemExit(f"--task-arg must be KEY=VALUE, got {pair!r}")
        value: object = text
        for kind in (int, float):
            try:
                value = kind(text)
                break
            except ValueError:
                pass
        out[key] = value
    return out


def train(args: argparse.Namespace) -> int:
    import json

    overrides = {k: v for k, v in vars(args).items() if k in _TRAIN_FIELDS and v is not None}
    try:
        config = task_training.TrainConfig(**overrides, task_kwargs=_task_args(args.task_arg))
        task_training.build_task(config)  # bad task arguments fail here, before any work
    except (TypeError, ValueError) as err:
        raise SystemExit(f"nested-learning train: {err}") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = _train_progress(config.steps)
    result = task_training.train(config, progress=progress)
    print(json.dumps({k: result[k] for k in ("final", "params", "seconds", "tokens_per_second", "config")}, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot:
        task_training.plot_history({f"{config.model} / {config.optimizer}": result}, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


_TRAIN_FIELDS = ("model", "task", "optimizer", "steps", "batch_size", "lr", "dim", "n_layers", "n_heads",
                 "eval_every", "seed")


def _train_progress(steps: int):
    """A one-line progress report on stderr: step, loss, last eval."""
    last_eval: dict[str, float] = {}

    def report(step: int, metrics: dict[str, float]) -> None:
        last_eval.update({k: v for k, v in metrics.items() if k.startswith("eval_")})
        if step % 10 and step + 1 != steps:
            return
        evals = " ".join(f"{k} {v:.3f}" for k, v in last_eval.items())
        bar = "#" * (30 * (step + 1) // steps)
        print(f"\r[{bar:<30}] step {step + 1}/{steps} loss {metrics['loss']:.3f} {evals}", end="", file=sys.stderr)
        if step + 1 == steps:
            print(file=sys.stderr)

    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="nested-learning", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model on an embedded task (defaults: HOPE on MQAR, a few minutes)")
    t.add_argument("--model", choices=task_training.MODELS)
    t.add_argument("--task", choices=tuple(TASKS))
    t.add_argument("--task-arg", action="append", metavar="KEY=VALUE",
                   help="task constructor argument over the defaults, e.g. num_pairs=32 (repeatable)")
    t.add_argument("--optimizer", choices=task_training.OPTIMIZERS)
    for name, kind in (("steps", int), ("batch-size", int), ("lr", float), ("dim", int), ("n-layers", int),
                       ("n-heads", int), ("eval-every", int), ("seed", int)):
        t.add_argument(f"--{name}", type=kind)
    t.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    t.add_argument("--plot", metavar="FILE", help="write loss/accuracy curves as PNG (needs matplotlib)")
    t.add_argument("--json", metavar="FILE", help="write the whole run (curves included) as JSON")
    sub.add_parser("doctor", help="what is available: torch, triton, the C++ extension, the device")
    for name, helptext in (("check", "every backend vs the float64 reference"), ("bench", "time every backend and baseline")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--op", help=f"one op ({', '.join(SPECS)}); default all")
        p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
        p.add_argument("--backend", action="append", choices=ops.BACKENDS, help="restrict to this backend (repeatable)")
    b = sub.choices["bench"]
    b.add_argument("--quick", action="store_true", help="the headline case only")
    b.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    b.add_argument("--plot", metavar="FILE", help="write a PNG bar chart (needs matplotlib)")
    b.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    return {"train": train, "doctor": doctor, "check": check, "bench": bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
