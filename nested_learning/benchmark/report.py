"""Tables (rich when installed, plain text otherwise), JSON files and bar-chart plots."""

from __future__ import annotations

import contextlib
import datetime
import json
import subprocess
import sys
from typing import Any, Callable, Iterator, Sequence

import torch

from .. import __version__


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "PASS" if value else "FAIL"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.2f}"
    return str(value)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[_fmt(v) for v in row] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
        print(title)
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
        for r in cells:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
        return
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="left" if c in ("case", "implementation", "backend", "quantity", "mode") else "right")
    for r in cells:
        table.add_row(*r)
    Console(width=None if sys.stdout.isatty() else 250).print(table)


@contextlib.contextmanager
def progress(description: str) -> Iterator[Callable[[str], None]]:
    """A progress bar (rich) or one line per step on stderr; yields ``advance(label)``."""
    try:
        from rich.progress import Progress
    except ImportError:
        yield lambda label: print(f"  {label}", file=sys.stderr)
        return
    with Progress(transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda label: bar.update(task, advance=1, description=f"{description}: {label}")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_json(path: str, rows: list[dict[str, Any]], device: str) -> None:
    meta = {
        "nested_learning": __version__,
        "torch": torch.__version__,
        "device": device,
        "threads": torch.get_num_threads(),
        "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)


def plot(path: str, rows: list[dict[str, Any]], title: str) -> None:
    """Bar chart of median time per implementation, one panel per case and mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise SystemExit(f"--plot needs matplotlib ({err}); pip install matplotlib") from err
    panels = sorted({(r["case"], r["mode"]) for r in rows if r["median_ms"]}, key=lambda p: (p[0], p[1]))
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.2 * len(panels) + 0.6), squeeze=False)
    for ax, (case, mode) in zip(axes[:, 0], panels):
        sel = [r for r in rows if r["case"] == case and r["mode"] == mode and r["median_ms"]]
        names = [r["implementation"] for r in sel]
        times = [r["median_ms"] for r in sel]
        colors = ["tab:blue" if r["kind"] == "backend" else "tab:gray" for r in sel]
        ax.barh(names, times, color=colors)
        ax.set_xscale("log")
        ax.set_title(f"{case}  [{mode}]", fontsize=8)
        ax.tick_params(labelsize=7)
        for y, t in enumerate(times):
            ax.text(t, y, f" {t:.3g} ms", va="center", fontsize=7)
    axes[-1, 0].set_xlabel("median time (ms, log scale); blue = nested_learning backends")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    fig.savefig(path, dpi=120)
