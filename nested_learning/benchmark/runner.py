"""Correctness checks and timings over the case registry (``nested-learning check`` / ``bench``)."""

from __future__ import annotations

import os
import platform
from typing import Any, Callable, Iterable, Optional

import torch

from .. import ops
from . import SPECS
from .core import Case, Checker, CheckResult, Spec, median_time, timed_call

Progress = Callable[[str], None]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def backends_for(spec: Spec, case: Case, device: torch.device, wanted: Optional[Iterable[str]] = None) -> list[str]:
    """The backends that can run ``case`` on ``device`` (optionally restricted to ``wanted``)."""
    names = list(wanted) if wanted else list(ops.BACKENDS)
    return [b for b in names if ops.available(b, device)[0] and spec.backend_supports(b, case)]


def timing_backends(spec: Spec, case: Case, device: torch.device, wanted: Optional[Iterable[str]] = None) -> list[str]:
    """Backends worth timing: available ones, minus Triton interpreted on CPU (a test mode)."""
    return [b for b in backends_for(spec, case, device, wanted) if not (b == "triton" and device.type == "cpu")]


def run_checks(
    op_names: Iterable[str], device: torch.device, wanted: Optional[Iterable[str]] = None, progress: Progress = lambda s: None
) -> list[CheckResult]:
    """Every available backend of every op against the float64 reference on the check cases."""
    results = []
    for op in op_names:
        spec = SPECS[op]
        for case in spec.check_cases(device):
            progress(case.name)
            checker = Checker(spec, case, device)
            results.extend(checker.check_backend(b) for b in backends_for(spec, case, device, wanted))
    return results


# GPU peaks (dense) used for the floor: (bytes/s, {dtype: flop/s}); NL_PEAK_GBPS / NL_PEAK_TFLOPS override.
_PEAKS = {
    "H100 PCIe": (2.0e12, {torch.bfloat16: 756e12, torch.float16: 756e12, torch.float32: 51e12}),
    "H100": (3.35e12, {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12}),
    "H200": (4.8e12, {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12}),
}


def _peaks(device: torch.device, dtype: torch.dtype) -> Optional[tuple[float, float]]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    found = next((v for k, v in _PEAKS.items() if k in name), None)
    bw = float(os.environ["NL_PEAK_GBPS"]) * 1e9 if "NL_PEAK_GBPS" in os.environ else (found[0] if found else None)
    fl = float(os.environ["NL_PEAK_TFLOPS"]) * 1e12 if "NL_PEAK_TFLOPS" in os.environ else (found[1].get(dtype) if found else None)
    return (bw, fl) if bw and fl else None


def run_bench(
    op_names: Iterable[str],
    device: torch.device,
    quick: bool = False,
    wanted: Optional[Iterable[str]] = None,
    progress: Progress = lambda s: None,
) -> list[dict[str, Any]]:
    """Median times of every backend and baseline that passed the correctness check, per case and mode.

    Each row: op, case, shape, dtype, device, mode, implementation, kind (backend, baseline or
    floor), median_ms, runs, the worst error/budget ratio, ``speedups`` (time of each of the
    spec's speed-up bases / this time), and on GPU the fraction of the floor
    max(flop / peak flop/s, byte / peak byte/s) that the time reaches. Floors (reference points
    computing something else, such as a bare memory pass) are timed without a check.
    """
    rows: list[dict[str, Any]] = []
    dev_name = device_name(device)
    for op in op_names:
        spec = SPECS[op]
        for case in spec.bench_cases(device, quick):
            progress(f"{case.name}: reference in float64")
            checker = Checker(spec, case, device)
            candidates = [(b, spec.call, b, "backend") for b in timing_backends(spec, case, device, wanted)]
            candidates += [(n, impl, None, "baseline") for n, impl in spec.baselines(case, device).items()]
            candidates += [(n, impl, None, "floor") for n, impl in spec.floors(case, device).items()]
            case_rows = []
            for name, impl, backend, kind in candidates:
                progress(f"{case.name}: {name}")
                verdict = checker.check(name, impl, backend) if kind != "floor" else None
                for mode in spec.modes:
                    row = {
                        "op": op, "case": case.name, "shape": case.shape, "dtype": str(case.dtype).replace("torch.", ""),
                        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in case.options},
                        "device": dev_name, "mode": mode, "implementation": name, "kind": kind,
                        "passed": verdict.passed if verdict else None,
                        "error_ratio": verdict.worst.ratio if verdict and verdict.worst else None,
                        "error": verdict.error if verdict else None, "median_ms": None, "runs": 0,
                    }
                    if verdict is None or verdict.passed:  # timed only after it passed on these inputs
                        seconds, runs = median_time(timed_call(spec, impl, checker.inputs, mode, backend=backend), device)
                        row.update(median_ms=seconds * 1e3, runs=runs)
                        peaks = _peaks(device, case.dtype)
                        if peaks:
                            flop, byte = spec.work(case, mode)
                            row["floor_fraction"] = max(flop / peaks[1], byte / peaks[0]) / seconds
                    case_rows.append(row)
            _add_speedups(spec, case_rows)
            rows.extend(case_rows)
    return rows


def _add_speedups(spec: Spec, rows: list[dict[str, Any]]) -> None:
    for mode in spec.modes:
        mode_rows = [r for r in rows if r["mode"] == mode]
        base = {r["implementation"]: r["median_ms"] for r in mode_rows}
        for r in mode_rows:
            r["speedups"] = {
                name: base[name] / r["median_ms"] for name in spec.speedup_bases if r["median_ms"] and base.get(name)
            }
