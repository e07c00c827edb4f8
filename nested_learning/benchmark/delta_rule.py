"""``delta_rule`` cases, inputs, baselines and work model for ``check`` and ``bench``."""

from __future__ import annotations

import importlib.util
import itertools
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops, reference
from ..ops.delta_rule import TRITON_MAX_DIM
from .core import Case, Impl, Inputs, Spec

ARGS = ("q", "k", "v", "beta", "g", "scale", "initial_state")


def _case(dtype: torch.dtype, B: int, T: int, H: int, K: int, V: int, gate: bool = True, h0: bool = False) -> Case:
    return Case("delta_rule", (("B", B), ("T", T), ("H", H), ("K", K), ("V", V)), dtype, (("gate", gate), ("h0", h0)))


def _packed(dtype: torch.dtype, lengths: tuple[int, ...], H: int, K: int, V: int, h0: bool = False) -> Case:
    """Sequences of ``lengths`` packed into B = 1 (``cu_seqlens``)."""
    case = _case(dtype, 1, sum(lengths), H, K, V, gate=True, h0=h0)
    return Case(case.op, case.dims, dtype, case.options + (("lengths", lengths),))


def make_inputs(case: Case, device: torch.device, seed: int) -> Inputs:
    """Inputs as models produce them: L2-normalised keys, β = sigmoid, g = logsigmoid."""
    B, T, H, K, V = (case.dim(n) for n in "BTHKV")
    lengths = case.option("lengths")
    N = B if lengths is None else len(lengths)
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32)

    q, k, v = randn(B, T, H, K), F.normalize(randn(B, T, H, K), dim=-1), randn(B, T, H, V)
    beta, g = randn(B, T, H).sigmoid(), F.logsigmoid(randn(B, T, H))
    h0 = randn(N, H, K, V)
    cast = lambda x: x.to(device=device, dtype=case.dtype)  # noqa: E731
    return {
        "q": cast(q),
        "k": cast(k),
        "v": cast(v),
        "beta": cast(beta),
        "g": cast(g) if case.option("gate") else None,
        "scale": None,
        "initial_state": h0.to(device) if case.option("h0") else None,
        "cu_seqlens": None if lengths is None else torch.tensor([0, *itertools.accumulate(lengths)], device=device),
    }


def _with(fn) -> Impl:
    """An implementation taking the op's argument convention, returning (o, final_state)."""

    def run(x: Inputs) -> tuple[Tensor, ...]:
        return tuple(fn(*(x[a] for a in ARGS), output_final_state=True, cu_seqlens=x["cu_seqlens"]))

    return run


call = _with(ops.delta_rule)
recurrent = _with(reference.delta_rule.recurrent)
chunked = _with(reference.delta_rule.chunked)


@lru_cache(maxsize=None)
def _compiled_chunked():
    return torch.compile(reference.delta_rule.chunked)


def _fla(case: Case) -> Optional[Impl]:
    """flash-linear-attention's chunked kernels, when installed (CUDA only)."""
    if importlib.util.find_spec("fla") is None:
        return None
    if case.option("gate"):
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fn
    else:
        from fla.ops.delta_rule import chunk_delta_rule as fn

    def run(x: Inputs) -> tuple[Tensor, ...]:
        kwargs = dict(scale=x["scale"], initial_state=x["initial_state"], output_final_state=True, cu_seqlens=x["cu_seqlens"])
        if case.option("gate"):
            return tuple(fn(x["q"], x["k"], x["v"], x["g"], x["beta"], **kwargs))
        return tuple(fn(x["q"], x["k"], x["v"], x["beta"], **kwargs))

    return run


def baselines(case: Case, device: torch.device) -> dict[str, Impl]:
    """What the op is timed against: the PyTorch chunked form (eager and compiled), the token
    loop (only where it finishes in seconds), and fla's kernels on CUDA when installed."""
    found: dict[str, Impl] = {"reference.chunked": chunked}
    if case.option("lengths") is None:
        found["reference.chunked+compile"] = _with(_compiled_chunked())
    B, T, H = (case.dim(n) for n in "BTH")
    if B * H * T <= 16384 or device.type == "cuda":
        found["token loop"] = recurrent
    if device.type == "cuda" and (fla := _fla(case)) is not None:
        found["fla"] = fla
    return found


def check_cases(device: torch.device) -> list[Case]:
    """Small cases covering every feature: gate, initial state, packing, odd sizes, dtypes."""
    f32 = torch.float32
    return [
        _case(f32, 2, 100, 3, 24, 40, gate=True, h0=True),
        _case(f32, 2, 130, 2, 32, 32, gate=False),
        _case(f32, 1, 1, 1, 16, 16, gate=True, h0=True),
        _packed(f32, (37, 0, 64, 1), 2, 16, 24, h0=True),
        _case(torch.bfloat16, 2, 96, 2, 64, 64, gate=True),
        _case(torch.float16, 1, 80, 2, 100, 100, gate=True, h0=True),
    ]


def bench_cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type == "cuda":
        main = _case(torch.bfloat16, 8, 4096, 16, 128, 128)
        if quick:
            return [main]
        return [main, _case(torch.bfloat16, 8, 4096, 16, 128, 128, gate=False), _case(torch.float32, 4, 2048, 16, 128, 128),
                _case(torch.bfloat16, 8, 4096, 16, 256, 256), _case(torch.bfloat16, 4, 2048, 16, 64, 64),
                _packed(torch.bfloat16, (1000, 3000, 17, 4079, 8192), 16, 128, 128)]
    main = _case(torch.float32, 2, 2048, 4, 64, 64)
    if quick:
        return [main]
    return [
        main,
        _case(torch.float32, 2, 2048, 4, 64, 64, gate=False),
        _case(torch.bfloat16, 2, 2048, 4, 64, 64),
        _case(torch.float32, 1, 512, 1, 64, 64),
        _case(torch.float32, 1, 1024, 2, 128, 128),
        _case(torch.float32, 1, 1024, 2, 256, 256),
        _packed(torch.float32, (100, 700, 1, 1247), 4, 64, 64),
    ]


def work(case: Case, mode: str) -> tuple[float, float]:
    """(flop, byte) lower bounds of one call of the chunked algorithm (chunk 64).

    Forward flop per chunk: 2·(C²K [KKᵀ] + C²(K+V)/2 [triangular solve] + CKV [W S] + C²K [QKᵀ]
    + CKV [Q S] + C²V [P Vnew] + CKV [state update]). Backward is counted as 2× forward. Bytes:
    inputs read and outputs written once (states, chunk-local tensors excluded).
    """
    B, T, H, K, V = (case.dim(n) for n in "BTHKV")
    C = 64
    chunks = B * H * -(-T // C)
    fwd_flop = 2 * chunks * (C * C * K + C * C * (K + V) / 2 + 3 * C * K * V + C * C * K + C * C * V)
    e = torch.finfo(case.dtype).bits // 8
    tokens = B * T * H
    fwd_bytes = tokens * (e * (2 * K + 2 * V) + 4 * (1 + bool(case.option("gate"))))
    if mode == "fwd":
        return fwd_flop, fwd_bytes
    return 3 * fwd_flop, fwd_bytes + tokens * (e * (2 * K + 3 * V) + 4 * 2 * (1 + bool(case.option("gate"))))


def backend_supports(backend: str, case: Case) -> bool:
    if backend == "triton":
        return case.dtype != torch.float64 and max(case.dim("K"), case.dim("V")) <= TRITON_MAX_DIM
    return True


SPEC = Spec(
    op="delta_rule",
    make_inputs=make_inputs,
    differentiable=("q", "k", "v", "beta", "g", "initial_state"),
    outputs=("o", "final_state"),
    call=call,
    truth=recurrent,
    references={"reference.recurrent": recurrent, "reference.chunked": chunked},
    baselines=baselines,
    check_cases=check_cases,
    bench_cases=bench_cases,
    work=work,
    speedup_bases=("reference.chunked", "reference.chunked+compile", "token loop"),
    backend_supports=backend_supports,
)
