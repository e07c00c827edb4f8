"""``cms_chunk_update`` cases, inputs, baselines and work model for ``check`` and ``bench``.

Ground truth is the chunked reference in float64 (the tests prove it equal to the token loop
to 1e-15); the token loop is also a baseline on small cases.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

from .. import ops, reference
from .core import Case, Impl, Inputs, Spec

ARGS = ("x", "target", "w1", "w2", "lr", "chunk_size", "activation")


def _case(dtype: torch.dtype, B: int, T: int, d: int, h: int, C: int, activation: str = "gelu", e: int | None = None) -> Case:
    return Case(
        "cms_chunk_update", (("B", B), ("T", T), ("d", d), ("h", h), ("e", e or d), ("C", C)), dtype,
        (("act", activation),),
    )


def make_inputs(case: Case, device: torch.device, seed: int) -> Inputs:
    """Unit-variance tokens and targets, Xavier-scaled shared start weights, lr = 0.5/(C·d): a
    chunk's summed gradient grows like C·‖x‖² = C·d, so the fast weights move but stay stable."""
    B, T, d, h, e, C = (case.dim(n) for n in ("B", "T", "d", "h", "e", "C"))
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * scale

    cast = lambda t: t.to(device=device, dtype=case.dtype)  # noqa: E731
    return {
        "x": cast(randn(B, T, d)),
        "target": cast(randn(B, T, e)),
        "w1": randn(h, d, scale=(2.0 / (h + d)) ** 0.5).to(device),
        "w2": randn(e, h, scale=(2.0 / (h + e)) ** 0.5).to(device),
        "lr": 0.5 / (min(C, T) * d),
        "chunk_size": C,
        "activation": case.option("act"),
    }


def _with(fn) -> Impl:
    def run(x: Inputs) -> tuple[Tensor, ...]:
        w1, w2 = x["w1"], x["w2"]
        if fn is not ops.cms_chunk_update:  # the references take per-sequence weights
            B = x["x"].shape[0]
            w1, w2 = w1.expand(B, *w1.shape), w2.expand(B, *w2.shape)
        return tuple(fn(x["x"], x["target"], w1, w2, *(x[a] for a in ARGS[4:])))

    return run


call = _with(ops.cms_chunk_update)
recurrent = _with(reference.cms_chunk_update.recurrent)
chunked = _with(reference.cms_chunk_update.chunked)


@cache
def _compiled_chunked():
    return torch.compile(reference.cms_chunk_update.chunked)


def baselines(case: Case, device: torch.device) -> dict[str, Impl]:
    """The chunked PyTorch form (eager, and compiled up to 64 chunks: compilation unrolls the
    chunk loop and takes minutes beyond); the token loop on small cases."""
    found: dict[str, Impl] = {"reference.chunked": chunked}
    if case.dim("T") <= 64 * case.dim("C"):
        found["reference.chunked+compile"] = _with(_compiled_chunked())
    if case.dim("B") * case.dim("T") <= 512:
        found["token loop"] = recurrent
    return found


def check_cases(device: torch.device) -> list[Case]:
    """Odd sizes, T not a multiple of C, per-token updates, one chunk, each activation, dtypes."""
    f32 = torch.float32
    return [
        _case(f32, 2, 100, 24, 40, 16, "gelu", e=12),
        _case(f32, 1, 37, 5, 7, 1, "silu", e=3),
        _case(f32, 3, 20, 16, 32, 64, "relu"),
        _case(torch.bfloat16, 2, 96, 32, 64, 32, "gelu"),
        _case(torch.float16, 1, 80, 20, 48, 24, "silu"),
    ]


def bench_cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type == "cuda":
        main = _case(torch.bfloat16, 4, 4096, 1024, 4096, 256)
        return [main] if quick else [main, _case(torch.float32, 4, 4096, 1024, 4096, 256), _case(torch.bfloat16, 8, 2048, 512, 2048, 64)]
    main = _case(torch.float32, 2, 2048, 256, 1024, 64)
    if quick:
        return [main]
    return [main, _case(torch.float32, 2, 2048, 256, 1024, 16), _case(torch.bfloat16, 2, 2048, 256, 1024, 64),
            _case(torch.float32, 4, 1024, 128, 512, 64, "silu"),
            _case(torch.float32, 4, 1024, 256, 1024, 8)]  # HOPE's shortest level at the block benchmark's size


def work(case: Case, mode: str) -> tuple[float, float]:
    """(flop, byte) lower bounds: a GEMM unit is 2·B·T·h·(d or e); the forward needs five (z, o,
    W2ᵀe, both weight gradients), the backward ten adjoint products. Bytes: tokens in and out
    once, the start and final weights once per sequence."""
    B, T, d, h, e, C = (case.dim(n) for n in ("B", "T", "d", "h", "e", "C"))
    unit = 2.0 * B * T * h * (d + e) / 2
    size = torch.finfo(case.dtype).bits // 8
    weights = 4.0 * B * h * (d + e) * 2
    fwd_bytes = B * T * (d + 2 * e) * size + weights
    if mode == "fwd":
        return 5 * unit, fwd_bytes
    return 15 * unit, 2 * fwd_bytes + B * T * (d + e) * size


def backend_supports(backend: str, case: Case) -> bool:
    return not (backend == "triton" and case.dtype == torch.float64)


SPEC = Spec(
    op="cms_chunk_update",
    make_inputs=make_inputs,
    differentiable=("x", "target", "w1", "w2"),
    outputs=("o", "w1_final", "w2_final"),
    call=call,
    truth=chunked,
    references={"reference.chunked": chunked},
    baselines=baselines,
    check_cases=check_cases,
    bench_cases=bench_cases,
    work=work,
    speedup_bases=("reference.chunked", "reference.chunked+compile", "token loop"),
    backend_supports=backend_supports,
)
