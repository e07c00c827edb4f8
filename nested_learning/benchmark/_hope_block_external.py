"""Worker of :mod:`nested_learning.benchmark.hope_block` that times an external implementation.

Both external packages are called ``nested_learning`` like this one, so the benchmark runs this
file as a script in a subprocess with ``PYTHONPATH=<checkout>/src`` and a working directory
outside this repository; the worker then imports nothing of ours (which is also why it keeps
its own few-line timing loop, the same protocol as the in-process rows: ``warmup`` untimed
calls of each function, then ``repeats`` timed calls, round-robin).

    python _hope_block_external.py SPEC.json OUT.json

SPEC holds ``task`` (``reference_block``, ``peer_block`` or ``peer_titans``), ``package_root``
(the directory the imported ``nested_learning`` must come from), ``threads``, ``repeats``,
``warmup``, ``seed`` and the task's shapes. OUT receives ``{"module_file": ..., "rows": [...]}``,
each row ``{"key", "config", "times_s"}``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # never resolve imports next to this file (our package's benchmark folder)


def _time(fns: list[Callable[[], Any]], repeats: int, warmup: int) -> list[list[float]]:
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return times


def _grads_step(module: Any, x: Any) -> Callable[[], Any]:
    """Forward, then the gradients of the sum of the outputs to the input and every parameter."""
    import torch

    params = [p for p in module.parameters() if p.requires_grad]

    def step() -> Any:
        out = module(x)
        return torch.autograd.grad(out.sum(), [x, *params], allow_unused=True)

    return step


def reference_block(spec: dict) -> list[dict]:
    """The reference library's ``HOPEBlock``, forward + backward (train mode)."""
    import torch
    from nested_learning.models.hope import HOPEBlock

    B, T, d = spec["batch"], spec["seq_len"], spec["dim"]
    kwargs = dict(dim=d, n_heads=spec["heads"], chunk_sizes=list(spec["chunk_sizes"]), dropout=0.0,
                  use_self_modification=spec.get("use_self_modification", True))
    block = HOPEBlock(**kwargs)
    x = torch.randn(B, T, d, generator=torch.Generator().manual_seed(spec["seed"]), requires_grad=True)
    grads = _grads_step(block, x)

    def step() -> Any:
        out = grads()
        for m in block.modules():  # its self-modifying linears queue one update per call; drop them
            clear = getattr(m, "clear_pending_updates", None)
            if callable(clear) and m is not block:
                clear()
        return out

    (times,) = _time([step], spec["repeats"], spec["warmup"])
    config = "HOPEBlock(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + "), train mode"
    return [dict(key="block", config=config, times_s=times)]


def peer_block(spec: dict) -> list[dict]:
    """The peer's ``HOPESelfModBlock`` with a per-call fast state (its paper-faithful training mode,
    ``train.use_fast_state=true``): the differentiable read pass (forward + backward of the sum,
    gradients to the input and every parameter), then the stop-gradient update pass under
    ``no_grad`` that writes the self-modifying Titans and CMS fast weights, with the block's
    teach signal (the gradient of the loss to the block output, as its per-layer teach signal)."""
    import torch
    from nested_learning.fast_state import build_block_fast_state
    from nested_learning.hope.block import HOPESelfModBlock, HOPESelfModBlockConfig
    from nested_learning.levels import LevelSpec

    B, T, d = spec["batch"], spec["seq_len"], spec["dim"]
    levels = [LevelSpec(name=f"cms_{i}", update_period=int(c)) for i, c in enumerate(spec["chunk_sizes"])]
    chunk = int(spec["selfmod_chunk_size"])
    config = HOPESelfModBlockConfig(
        dim=d,
        cms_levels=levels,
        cms_hidden_multiplier=int(spec["hidden_multiplier"]),
        selfmod_chunk_size=chunk,
        selfmod_chunk_size_memory=chunk,
    )
    block = HOPESelfModBlock(config)
    x = torch.randn(B, T, d, generator=torch.Generator().manual_seed(spec["seed"]), requires_grad=True)
    params = [p for p in block.parameters() if p.requires_grad]

    def fast_state() -> Any:
        return build_block_fast_state(
            titan_module=None,
            cms_blocks=dict(block.cms.blocks.items()),
            selfmod_module=block.selfmod,
            specs=list(config.cms_levels),
            optimizer_configs=config.optimizer_configs,
            default_lr=config.self_mod_lr,
        )

    def read(state: Any) -> Any:
        out = block(x, fast_state=state)
        grads = torch.autograd.grad(out.sum(), [out, x, *params], allow_unused=True)
        return grads[0]  # the teach signal: d loss / d block output

    def read_only() -> Any:
        return read(fast_state())

    def full_step() -> Any:
        state = fast_state()
        teach = read(state)
        with torch.no_grad():
            block(x, teach_signal=teach, fast_state=state)
        return state

    described = (
        f"HOPESelfModBlock(HOPESelfModBlockConfig(dim={d}, cms_levels=[" + ", ".join(
            f"LevelSpec({s.name!r}, update_period={s.update_period})" for s in levels
        ) + f"], cms_hidden_multiplier={config.cms_hidden_multiplier}, selfmod_chunk_size={chunk}, "
        f"selfmod_chunk_size_memory={chunk}; other fields default: qk_l2_norm={config.qk_l2_norm}, "
        f"selfmod_local_conv_window={config.selfmod_local_conv_window}, eta_scale={config.eta_scale}, "
        f"selfmod_use_skip={config.selfmod_use_skip}, selfmod_use_rank1_precond="
        f"{config.selfmod_use_rank1_precond}, selfmod_use_alpha={config.selfmod_use_alpha}, "
        f"selfmod_momentum={config.selfmod_momentum}, cms_chunk_reduction={config.cms_chunk_reduction!r}, "
        f"optimizer_configs={{}} (levels: DeepMomentum 'preconditioned', lr={config.self_mod_lr}))); "
        "fresh build_block_fast_state(...) per call"
    )
    (read_times,) = _time([read_only], spec["repeats"], spec["warmup"])
    (full_times,) = _time([full_step], spec["slow_repeats"], spec["warmup"])
    return [
        dict(key="full", config=described + "; read pass fwd+bwd, then no_grad update pass with teach_signal",
             times_s=full_times),
        dict(key="read", config=described + "; read pass fwd+bwd only (no memory writes)", times_s=read_times),
    ]


def peer_titans(spec: dict) -> list[dict]:
    """The peer's ``SelfModifyingTitans.forward_with_updates`` under ``no_grad`` from a fresh
    ``init_fast_state()``, per chunk size (``None``: the config's defaults)."""
    import torch
    from nested_learning.titan.self_modifying import SelfModifyingTitans, SelfModifyingTitansConfig

    B, T, d = spec["batch"], spec["seq_len"], spec["dim"]
    x = torch.randn(B, T, d, generator=torch.Generator().manual_seed(spec["seed"]))
    fns, rows = [], []
    for chunk in spec["chunks"]:
        kwargs: dict = {"dim": d}
        if chunk is not None:
            kwargs.update(chunk_size_other=chunk, chunk_size_memory=chunk)
        module = SelfModifyingTitans(SelfModifyingTitansConfig(**kwargs))
        cfg = module.config
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())

        def forward(module: Any = module) -> Any:
            with torch.no_grad():
                return module.forward_with_updates(x, module.init_fast_state())

        fns.append(forward)
        rows.append(dict(
            key="default" if chunk is None else f"C{chunk}",
            config=f"SelfModifyingTitans(SelfModifyingTitansConfig({args}))"
            f" [chunk_size_other={cfg.chunk_size_other}, chunk_size_memory={cfg.chunk_size_memory}, "
            f"use_skip={cfg.use_skip}, local_conv_window={cfg.local_conv_window}]"
            ".forward_with_updates(x, init_fast_state()) under no_grad",
        ))
    for row, times in zip(rows, _time(fns, spec["repeats"], spec["warmup"])):
        row["times_s"] = times
    return rows


TASKS = {"reference_block": reference_block, "peer_block": peer_block, "peer_titans": peer_titans}


def main(argv: list[str]) -> None:
    spec_path, out_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    import torch

    torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(int(spec["seed"]))
    import nested_learning

    module_file = os.path.abspath(nested_learning.__file__)
    root = os.path.abspath(spec["package_root"])
    if not module_file.startswith(root + os.sep):
        raise ImportError(f"imported nested_learning from {module_file}, expected a package under {root}")
    rows = TASKS[spec["task"]](spec)
    with open(out_path, "w") as f:
        json.dump({"module_file": module_file, "torch": torch.__version__, "rows": rows}, f)


if __name__ == "__main__":
    main(sys.argv[1:])
