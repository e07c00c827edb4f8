"""One HOPE block, forward + backward, and the self-modifying Titans update, timed against the
reference library and the peer implementation.

    python -m nested_learning.benchmark.hope_block [--reference-library DIR] [--peer DIR]
        [--json FILE] [--threads N] [--repeats K] [--external-repeats K2]

Rows (fp32; median of ``repeats`` timed calls after ``warmup`` untimed ones, round-robin
within a group so load from other processes spreads over its rows alike):

1. A HOPE block on ``[B, T, d]`` (default 4 × 1024 × 256, 4 heads, in-context CMS chunk sizes
   8/32/128, hidden 4·d, dropout 0), forward then the gradients of the sum of the outputs to the
   input and every parameter:

   - ``1a`` ours, ``HOPEBlock(d, n_heads, chunk_sizes, dropout=0.0)``, ops on their default
     backend (``cpp`` on CPU, ``triton`` on CUDA);
   - ``1b`` the same block with every op on its pure-PyTorch reference (``use_backend('reference')``);
   - ``1e`` ours in the reference library's architecture, ``HOPEBlock(..., mixer='attention',
     cms_in_context=False)`` (self-modifying softmax attention, made causal, and position-wise
     CMS MLPs: no in-context memory), and ``1f`` the same with ``use_self_modification=False``
     (``LinearAttentionWithMemory``, chunked);
   - ``1c`` with ``--reference-library DIR`` (a checkout of phlong3105/nested_learning, package
     in ``DIR/src``): its ``HOPEBlock(dim, n_heads, chunk_sizes, dropout=0.0)`` (non-causal
     softmax attention with self-modifying projections, position-wise CMS MLPs), compared with
     ``1e``; ``1g`` its block with ``use_self_modification=False`` (its
     ``LinearAttentionWithMemory`` loops over tokens), compared with ``1f``;
   - ``1d`` with ``--peer DIR`` (a checkout of kmccleary3301/nested_learning): its
     ``HOPESelfModBlock`` (self-modifying Titans → CMS, the paper's HOPE block) with CMS levels
     of update periods 8/32/128, hidden 4·d, self-modifying Titans chunk 8 (its ``M_memory``
     and other memories written every 8 tokens, as our generator memory), other fields default;
     one training step as its trainer runs it with a per-context fast state: the
     differentiable read pass (forward + backward) then the ``no_grad`` update pass that writes
     the memories (``1d``), and the read pass alone (``1d-read``, no memory writes).

2. The self-modifying Titans update alone (memories written per chunk), forward under
   ``no_grad``, tokens/s on ``[B, T, d]`` (default 4 × 128 × 128): ours
   ``SelfModifyingTitansMixer(d, num_heads=4, memory_chunk_size=C)`` for each C (default 8, 16);
   with ``--peer``, its ``SelfModifyingTitans(SelfModifyingTitansConfig(dim=d,
   chunk_size_other=C, chunk_size_memory=C)).forward_with_updates(x, init_fast_state())`` for
   the same C and once with its default config (chunk 1).

The external implementations share our package's name, so each runs in a subprocess
(``_hope_block_external.py`` with ``PYTHONPATH=DIR/src``, working directory outside this
repository) and hands its timings back as JSON; ours run in this process. ``ours_speedup`` of a
row is its median over the median of the ours row it is compared with (``compared_with``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .. import ops
from ..models.hope import HOPEBlock
from ..models.titans_mixer import SelfModifyingTitansMixer
from .orthogonal_steps import time_steps
from .runner import device_name

WORKER = Path(__file__).with_name("_hope_block_external.py")


def _grads_step(module: torch.nn.Module, x: torch.Tensor, backend: Optional[str]) -> Callable[[], Any]:
    """Forward, then the gradients of the sum of the outputs to ``x`` and every parameter, with
    ``backend`` forced for both passes (``None``: the default choice)."""
    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> Any:
        with ops.use_backend(backend):
            return torch.autograd.grad(module(x).sum(), [x, *params], allow_unused=True)

    return step


def _no_grad_forward(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    def forward() -> Any:
        with torch.no_grad():
            return module(x)

    return forward


def _row(group: str, rid: str, implementation: str, config: str, shape: tuple[int, int, int], times: Sequence[float],
         device: torch.device, **extra: Any) -> dict[str, Any]:
    B, T, d = shape
    median = statistics.median(times)
    return dict(
        group=group, id=rid, implementation=implementation, config=config, shape=f"B={B} T={T} d={d}",
        dtype="fp32", device=device_name(device), threads=torch.get_num_threads(), runs=len(times),
        median_ms=median * 1e3, min_ms=min(times) * 1e3, max_ms=max(times) * 1e3,
        tokens_per_s=B * T / median, load_avg_1m=_load(), **extra,
    )


def _load() -> Optional[float]:
    """The 1-minute load average when a row's timing ended (others' work on a shared machine)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _error_row(group: str, rid: str, implementation: str, shape: tuple[int, int, int], device: torch.device,
               error: str, compared_with: Optional[str] = None) -> dict[str, Any]:
    B, T, d = shape
    return dict(group=group, id=rid, implementation=implementation, config=None, shape=f"B={B} T={T} d={d}",
                dtype="fp32", device=device_name(device), threads=torch.get_num_threads(), runs=0,
                median_ms=None, min_ms=None, max_ms=None, tokens_per_s=None, compared_with=compared_with,
                error=error)


def run_external(task: str, checkout: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run the worker on ``task`` against the checkout at ``checkout`` (its package in ``src``);
    the worker's output dict, or ``{"error": reason}``."""
    root = Path(checkout).resolve() / "src"
    if not (root / "nested_learning" / "__init__.py").is_file():
        return {"error": f"no package at <checkout>/src/nested_learning (checkout {checkout!r})"}
    with tempfile.TemporaryDirectory(prefix="nl_hope_block_") as tmp:
        spec_path, out_path = Path(tmp, "spec.json"), Path(tmp, "out.json")
        spec_path.write_text(json.dumps({**spec, "task": task, "package_root": str(root / "nested_learning")}))
        threads = str(spec["threads"])
        env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        try:
            proc = subprocess.run([sys.executable, str(WORKER), str(spec_path), str(out_path)], cwd=tmp, env=env,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"error": f"exit status {proc.returncode}: " + " | ".join(tail)}
        return json.loads(out_path.read_text())


def run(
    batch: int = 4,
    seq_len: int = 1024,
    dim: int = 256,
    heads: int = 4,
    chunk_sizes: Sequence[int] = (8, 32, 128),
    titans_batch: int = 4,
    titans_seq_len: int = 128,
    titans_dim: int = 128,
    titans_heads: int = 4,
    titans_chunks: Sequence[int] = (8, 16),
    repeats: int = 5,
    external_repeats: Optional[int] = None,
    warmup: int = 1,
    reference_library: Optional[str] = None,
    peer: Optional[str] = None,
    external_timeout: float = 7200.0,
    seed: int = 0,
    device: str = "cpu",
    progress: Callable[[str], None] = lambda s: None,
) -> list[dict[str, Any]]:
    """Time every row (module docstring); one dict per row."""
    dev = torch.device(device)
    slow_repeats = repeats if external_repeats is None else external_repeats
    chunk_sizes, titans_chunks = [int(c) for c in chunk_sizes], [int(c) for c in titans_chunks]
    block_shape, titans_shape = (batch, seq_len, dim), (titans_batch, titans_seq_len, titans_dim)
    gen = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []

    # 1. HOPE block forward + backward
    torch.manual_seed(seed)
    block = HOPEBlock(dim, heads, chunk_sizes, dropout=0.0).to(dev)
    x = torch.randn(block_shape, generator=gen).to(dev).requires_grad_()
    ours_cfg = f"HOPEBlock({dim}, n_heads={heads}, chunk_sizes={chunk_sizes}, dropout=0.0), defaults otherwise " \
               f"(mixer='titans', memory_chunk_size={block.attention.memory_chunk_size}, cms_in_context=True, " \
               f"cms_hidden_dim={4 * dim}), train mode"
    default_backend = ops.select(dev)
    progress(f"1a/1b: ours, {default_backend} and reference ops")
    fused, reference = time_steps([_grads_step(block, x, None), _grads_step(block, x, "reference")], dev, repeats,
                                  warmup)
    rows.append(_row("hope_block", "1a", f"ours, fused ops ({default_backend})", ours_cfg, block_shape, fused, dev,
                     compared_with="1a"))
    rows.append(_row("hope_block", "1b", "ours, reference ops (use_backend('reference'))", ours_cfg, block_shape,
                     reference, dev, compared_with="1a"))
    same_arch = {"1e": dict(mixer="attention", cms_in_context=False),
                 "1f": dict(mixer="attention", cms_in_context=False, use_self_modification=False)}
    progress("1e/1f: ours in the reference library's architecture")
    steps = []
    for kwargs in same_arch.values():
        torch.manual_seed(seed)
        steps.append(_grads_step(HOPEBlock(dim, heads, chunk_sizes, dropout=0.0, **kwargs).to(dev), x, None))
    for (rid, kwargs), times in zip(same_arch.items(), time_steps(steps, dev, repeats, warmup)):
        cfg = f"HOPEBlock({dim}, n_heads={heads}, chunk_sizes={chunk_sizes}, dropout=0.0, " + \
              ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + "), train mode"
        name = "ours, reference library's architecture" + (", self-modification off" if rid == "1f" else "")
        rows.append(_row("hope_block", rid, name, cfg, block_shape, times, dev, compared_with=rid))
    del block, x, steps
    common = dict(threads=torch.get_num_threads(), warmup=warmup, seed=seed, batch=batch, seq_len=seq_len, dim=dim,
                  heads=heads, chunk_sizes=chunk_sizes)
    if reference_library:
        for rid, base, self_mod in (("1c", "1e", True), ("1g", "1f", False)):
            name = "reference library HOPEBlock (phlong3105/nested_learning)" + ("" if self_mod else
                                                                                 ", self-modification off")
            progress(f"{rid}: {name}")
            out = run_external("reference_block", reference_library,
                               {**common, "repeats": slow_repeats, "use_self_modification": self_mod}, external_timeout)
            if "error" in out:
                rows.append(_error_row("hope_block", rid, name, block_shape, dev, out["error"], base))
            else:
                (r,) = out["rows"]
                rows.append(_row("hope_block", rid, name, r["config"], block_shape, r["times_s"], dev,
                                 compared_with=base))
    if peer:
        progress("1d: peer HOPESelfModBlock (slow: its update pass loops over tokens)")
        out = run_external("peer_block", peer, {**common, "repeats": repeats, "slow_repeats": slow_repeats,
                                                "hidden_multiplier": 4, "selfmod_chunk_size": min(chunk_sizes)},
                           external_timeout)
        names = {"full": ("1d", "peer HOPESelfModBlock (kmccleary3301/nested_learning), read fwd+bwd + update pass"),
                 "read": ("1d-read", "peer HOPESelfModBlock, read pass fwd+bwd only (no memory writes)")}
        if "error" in out:
            for rid, name in names.values():
                rows.append(_error_row("hope_block", rid, name, block_shape, dev, out["error"], "1a"))
        else:
            for r in out["rows"]:
                rid, name = names[r["key"]]
                rows.append(_row("hope_block", rid, name, r["config"], block_shape, r["times_s"], dev,
                                 compared_with="1a"))

    # 2. self-modifying Titans update, forward under no_grad
    xt = torch.randn(titans_shape, generator=gen).to(dev)
    mixers = []
    for c in titans_chunks:
        torch.manual_seed(seed)
        mixers.append(SelfModifyingTitansMixer(titans_dim, num_heads=titans_heads, memory_chunk_size=c).to(dev))
    progress("2: ours, SelfModifyingTitansMixer")
    for c, times in zip(titans_chunks, time_steps([_no_grad_forward(m, xt) for m in mixers], dev, repeats, warmup)):
        cfg = f"SelfModifyingTitansMixer({titans_dim}, num_heads={titans_heads}, memory_chunk_size={c}), " \
              f"no_grad forward, ops on {default_backend}"
        rows.append(_row("titans_update", f"2-ours-C{c}", f"ours, fused ops ({default_backend}), C={c}", cfg,
                         titans_shape, times, dev, compared_with=f"2-ours-C{c}"))
    if peer:
        progress("2: peer SelfModifyingTitans.forward_with_updates")
        spec = dict(threads=torch.get_num_threads(), warmup=warmup, seed=seed, repeats=repeats, batch=titans_batch,
                    seq_len=titans_seq_len, dim=titans_dim, chunks=[*titans_chunks, None])
        out = run_external("peer_titans", peer, spec, external_timeout)
        ours_default = f"2-ours-C{titans_chunks[0]}"
        keys = {f"C{c}": (f"2-peer-C{c}", f"peer SelfModifyingTitans, C={c}", f"2-ours-C{c}") for c in titans_chunks}
        keys["default"] = ("2-peer-default", "peer SelfModifyingTitans, default config (chunk 1)", ours_default)
        if "error" in out:
            for rid, name, base in keys.values():
                rows.append(_error_row("titans_update", rid, name, titans_shape, dev, out["error"], base))
        else:
            for r in out["rows"]:
                rid, name, base = keys[r["key"]]
                rows.append(_row("titans_update", rid, name, r["config"], titans_shape, r["times_s"], dev,
                                 compared_with=base))
    _add_speedups(rows)
    return rows


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    """``ours_speedup``: this row's median over the median of the row named in ``compared_with``."""
    medians = {r["id"]: r["median_ms"] for r in rows}
    for r in rows:
        base = medians.get(r.get("compared_with"))
        r["ours_speedup"] = r["median_ms"] / base if r["median_ms"] is not None and base else None


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the rows, then each row's configuration and any errors."""
    lines = [
        "| row | implementation | shape | runs | median ms | min–max ms | tokens/s | ours faster (vs) | load |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["median_ms"] is None:
            lines.append(f"| {r['id']} | {r['implementation']} | {r['shape']} | 0 | – | – | – | not run | – |")
            continue
        speedup = f"{r['ours_speedup']:.2f}× ({r['compared_with']})" if r["ours_speedup"] is not None else "–"
        lines.append(
            f"| {r['id']} | {r['implementation']} | {r['shape']} | {r['runs']} | {r['median_ms']:.1f} | "
            f"{r['min_ms']:.1f}–{r['max_ms']:.1f} | {r['tokens_per_s']:,.0f} | {speedup} | {r['load_avg_1m']} |"
        )
    first = rows[0]
    note = (f"fp32, {first['device']}; torch {torch.__version__}; load: the machine's 1-minute load average "
            "when the row's timing ended.")
    lines += ["", note, ""]
    for r in rows:
        lines.append(f"- {r['id']}: " + (f"not run: {r['error']}" if r.get("error") else r["config"]))
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-library", metavar="DIR", help="checkout of phlong3105/nested_learning")
    parser.add_argument("--peer", metavar="DIR", help="checkout of kmccleary3301/nested_learning")
    parser.add_argument("--json", metavar="FILE", help="write the rows here")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row")
    parser.add_argument("--external-repeats", type=int, help="timed calls of the slow external block rows "
                        "(1c, 1d; default: --repeats)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per row first")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--chunk-sizes", type=_ints, default=[8, 32, 128], help="CMS chunk sizes, e.g. 8,32,128")
    parser.add_argument("--titans-batch", type=int, default=4)
    parser.add_argument("--titans-seq-len", type=int, default=128)
    parser.add_argument("--titans-dim", type=int, default=128)
    parser.add_argument("--titans-heads", type=int, default=4)
    parser.add_argument("--titans-chunks", type=_ints, default=[8, 16], help="memory chunk sizes C, e.g. 8,16")
    parser.add_argument("--external-timeout", type=float, default=7200.0, help="seconds per external subprocess")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(
        args.batch, args.seq_len, args.dim, args.heads, args.chunk_sizes, args.titans_batch, args.titans_seq_len,
        args.titans_dim, args.titans_heads, args.titans_chunks, args.repeats, args.external_repeats, args.warmup,
        args.reference_library, args.peer, args.external_timeout, device=args.device,
        progress=(lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True)),
    )
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
