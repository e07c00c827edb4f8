"""``memory_mlp_momentum`` cases, inputs, baselines and work model for ``check`` and ``bench``.

A case is one DeepMomentumGD step (gradients given, before the memory's clip + Adam) over a
transformer-like stack of L layers of width d: per layer q, k, v, o [d, d] with biases, fc1
[4d, d], fc2 [d, 4d] with biases, two LayerNorms. Tensors go to the bucket memories of sizes
``buckets`` (hidden width h), one op call per bucket. Baselines: the same step in per-tensor
PyTorch (the reference), batched per bucket (one autograd graph per bucket, no per-tensor
branching), that batched form under ``torch.compile``; AdamW(foreach) on the same parameters is
timed as a reference point.
"""

from __future__ import annotations

from functools import cache
from typing import Callable

import torch
from torch import Tensor

from .. import ops
from ..optimizers._blocks import bucket_for, num_blocks
from ..reference.memory_mlp_momentum import NORM_EPS, memory_forward, to_blocks
from .core import Case, Impl, Inputs, Spec

LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 1e-4


def _case(dtype: torch.dtype, L: int, d: int, h: int, buckets: tuple[int, ...], loss: str = "surrogate") -> Case:
    return Case("memory_mlp_momentum", (("L", L), ("d", d), ("h", h)), dtype, (("buckets", buckets), ("loss", loss)))


def _shapes(case: Case) -> list[tuple[int, ...]]:
    d = case.dim("d")
    layer = [(d, d), (d,)] * 4 + [(4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,), (d,), (d,)]
    return layer * case.dim("L") + [(), (1,)]  # plus a 0-d and a 1-element tensor


def make_inputs(case: Case, device: torch.device, seed: int) -> Inputs:
    """Parameters, gradients, momenta and last outputs mid-training; one memory per bucket
    (weights at a trained-looking scale, LayerNorm affine near identity); P = 0.1·I plus noise."""
    gen = torch.Generator().manual_seed(seed)
    h, buckets = case.dim("h"), case.option("buckets")
    sd = torch.float64 if case.dtype == torch.float64 else torch.float32

    def rand(shape: tuple[int, ...], dtype: torch.dtype, scale: float = 1.0, shift: float = 0.0) -> Tensor:
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift).to(device=device, dtype=dtype)

    shapes = _shapes(case)
    memories = [[rand((h, 2 * S), sd, (2 * S) ** -0.5), rand((h,), sd, 0.1), rand((h,), sd, 0.1, 1.0), rand((h,), sd, 0.1),
                 rand((S, h), sd, 0.1 * h**-0.5), rand((S,), sd, 1e-3)] for S in buckets]
    return {
        "params": [rand(s, case.dtype) for s in shapes],
        "grads": [rand(s, case.dtype, 1e-2) for s in shapes],
        "momenta": [rand(s, sd, 1e-2) for s in shapes],
        "prev_outputs": [rand(s, sd, 1e-2) for s in shapes],
        "has_prev": [i % 7 != 3 for i in range(len(shapes))],
        "bucket": [buckets.index(bucket_for(max(1, torch.Size(s).numel()), buckets)) for s in shapes],
        "weights": memories,
        "weight_grads": [[torch.zeros_like(w) for w in m] for m in memories],
        "projections": [0.1 * torch.eye(S, device=device, dtype=sd) + rand((S, S), sd, 1e-3) for S in buckets],
        "loss": case.option("loss"),
        "loss_scale": 1.0 / len(shapes),
    }


def _per_bucket(x: Inputs):
    """(bucket index, tensor indices) for every bucket that holds a tensor."""
    for b in range(len(x["weights"])):
        idx = [i for i, k in enumerate(x["bucket"]) if k == b]
        if idx:
            yield b, idx


def call(x: Inputs) -> None:
    for b, idx in _per_bucket(x):
        ops.memory_mlp_momentum(
            [x["params"][i] for i in idx], [x["grads"][i] for i in idx], [x["momenta"][i] for i in idx],
            [x["prev_outputs"][i] for i in idx], [x["has_prev"][i] for i in idx], x["weights"][b], x["weight_grads"][b],
            x["projections"][b], lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, loss=x["loss"],
            loss_scale=x["loss_scale"],
        )


def reference_call(x: Inputs) -> None:
    """The per-tensor reference (autograd per tensor; the ground truth when run in float64)."""
    with ops.use_backend("reference"):
        call(x)


def state(x: Inputs) -> tuple[Tensor, ...]:
    """Parameters, momenta, last outputs, memory gradients and projections, each one vector."""
    flat = lambda ts: torch.cat([t.reshape(-1).to(x["momenta"][0].dtype) for t in ts])  # noqa: E731
    return (flat(x["params"]), flat(x["momenta"]), flat(x["prev_outputs"]),
            flat([w for m in x["weight_grads"] for w in m]),
            flat(x["projections"]) if x["loss"] == "l2_regression" else x["momenta"][0].new_zeros(0))


def batched_bucket_step(
    params: list[Tensor], grads: list[Tensor], momenta: list[Tensor], prev_outputs: list[Tensor], has_prev: list[bool],
    weights: list[Tensor], weight_grads: list[Tensor], projection: Tensor, loss: str, loss_scale: float,
) -> None:
    """One bucket's step in PyTorch with no per-tensor branching: every block in one autograd
    graph, the per-tensor norms as segment sums, the loss switches as ``torch.where`` (so
    ``torch.compile`` sees one graph)."""
    size, ct = weights[4].shape[0], momenta[0].dtype
    sizes = [p.numel() for p in params]
    rows = [max(1, -(-n // size)) for n in sizes]
    seg = torch.repeat_interleave(torch.arange(len(params), device=params[0].device), torch.tensor(rows, device=params[0].device))
    g = torch.cat([to_blocks(u.to(ct).flatten() + WEIGHT_DECAY * p.to(ct).flatten(), size) for p, u in zip(params, grads)])
    m = torch.cat([to_blocks(t.flatten(), size) for t in momenta])
    prev = torch.cat([to_blocks(t.flatten(), size) for t in prev_outputs])
    mask = torch.cat([to_blocks(torch.ones(n, device=g.device, dtype=ct), size) for n in sizes])
    n = torch.tensor(sizes, device=g.device, dtype=ct)
    seen = torch.tensor(has_prev, device=g.device)
    per_tensor = lambda rowwise: torch.zeros(len(params), device=g.device, dtype=ct).index_add(0, seg, rowwise)  # noqa: E731
    leaves = [w.detach().requires_grad_() for w in weights]
    with torch.enable_grad():
        out = memory_forward(torch.cat([g, m], dim=1), leaves, 1e-5)
        o = out * mask
        if loss == "dot":
            ell = -per_tensor((o * g).sum(1))
        elif loss == "l2_regression":
            target = g @ projection.T
            ell = per_tensor(((o - target * mask) ** 2).sum(1)) / n
        else:
            on, gn = per_tensor((o * o).sum(1)).clamp_min(1e-30).sqrt(), per_tensor((g * g).sum(1)).sqrt()
            both = (on > NORM_EPS) & (gn > NORM_EPS)
            gn_safe = torch.where(gn > NORM_EPS, gn, torch.ones_like(gn))
            cosine = torch.where(both, 1 - per_tensor((o * g).sum(1)) / (on * gn_safe), torch.zeros_like(on))
            magnitude = torch.where(gn > NORM_EPS, (on / gn_safe - 1) ** 2, on**2)
            smooth = torch.where(seen, per_tensor(((o - prev * mask) ** 2).sum(1)) / n, torch.zeros_like(on))
            ell = cosine + 0.1 * magnitude + 0.1 * smooth
        for acc, d in zip(weight_grads, torch.autograd.grad(ell.sum() * loss_scale, leaves)):
            acc.add_(d)
    out = out.detach()
    if loss == "l2_regression":
        g_sq = per_tensor((g * g).sum(1))
        scale = torch.where(g_sq > NORM_EPS, 0.01 / torch.where(g_sq > NORM_EPS, g_sq, torch.ones_like(g_sq)), torch.zeros_like(g_sq))
        projection.add_(((out - target.detach()) * mask * scale[seg, None]).T @ g)
    new_m = MOMENTUM * m + out
    for i, block in enumerate(new_m.split(rows)):
        flat = block.flatten()[: sizes[i]].view_as(momenta[i])
        momenta[i].copy_(flat)
        params[i].copy_(params[i].to(ct) - LR * flat)
        prev_outputs[i].copy_(out.split(rows)[i].flatten()[: sizes[i]].view_as(prev_outputs[i]))


def bucketed_step(x: Inputs, step: Callable[..., None] = batched_bucket_step) -> None:
    """Every bucket through :func:`batched_bucket_step` (or ``step``, e.g. its compiled form)."""
    for b, idx in _per_bucket(x):
        pick = lambda key: [x[key][i] for i in idx]  # noqa: E731
        step(pick("params"), pick("grads"), pick("momenta"), pick("prev_outputs"), pick("has_prev"), x["weights"][b],
             x["weight_grads"][b], x["projections"][b], x["loss"], x["loss_scale"])


@cache
def _compiled_bucket_step() -> Callable[..., None]:
    return torch.compile(batched_bucket_step)


def compiled_bucketed_step(x: Inputs) -> None:
    """:func:`bucketed_step` with each bucket's step compiled (a graph per bucket: the recompile
    limit is raised to hold every bucket of every case)."""
    with torch._dynamo.config.patch(recompile_limit=64):
        bucketed_step(x, _compiled_bucket_step())


def baselines(case: Case, device: torch.device) -> dict[str, Impl]:
    """The batched PyTorch step, and its compiled form on multi-layer cases only (compiling the
    quick single-layer case costs minutes of a CI run for a baseline that is never shipped)."""
    found: dict[str, Impl] = {"bucketed": bucketed_step}
    if case.dim("L") > 1:
        found["bucketed+compile"] = compiled_bucketed_step
    return found


def floors(case: Case, device: torch.device) -> dict[str, Impl]:
    def adamw_foreach(x: Inputs) -> None:
        if "_adamw" not in x:
            x["_adamw"] = torch.optim.AdamW([p.requires_grad_() for p in x["params"]], lr=1e-3, foreach=True)
            for p, g in zip(x["params"], x["grads"]):
                p.grad = g
        x["_adamw"].step()

    return {"AdamW(foreach)": adamw_foreach}


def check_cases(device: torch.device) -> list[Case]:
    f32, small = torch.float32, (16, 64)
    return [
        _case(f32, 1, 24, 16, small, "surrogate"),
        _case(f32, 1, 24, 16, small, "l2_regression"),
        _case(f32, 1, 24, 16, small, "dot"),
        _case(torch.bfloat16, 1, 20, 16, small, "surrogate"),
        _case(torch.float16, 1, 12, 16, small, "l2_regression"),
        _case(f32, 1, 40, 64, (64, 256), "surrogate"),
    ]


def bench_cases(device: torch.device, quick: bool) -> list[Case]:
    """CPU: 3 layers of d=512 (9.45M parameters) through the default buckets 64/256/1024/4096
    at h=64. GPU: 8 layers of d=2048 (0.4B parameters; the float64 ground truth fits in 80 GB)."""
    buckets = (64, 256, 1024, 4096)
    L, d = (8, 2048) if device.type == "cuda" else (3, 512)
    main = _case(torch.float32, L, d, 64, buckets, "surrogate")
    if quick:
        return [_case(torch.float32, 1, 64, 16, (64, 256), "surrogate")]
    cases = [main, _case(torch.float32, L, d, 64, buckets, "dot"), _case(torch.bfloat16, L, d, 64, buckets, "surrogate")]
    return cases + ([] if device.type == "cuda" else [_case(torch.float32, 1, d, 64, buckets, "l2_regression")])


def work(case: Case, mode: str) -> tuple[float, float]:
    """(flop, byte): 14·S·h flop per block (forward 6, backward 8) over every block; bytes:
    W and g read, W written (parameter dtype), m and o_prev read and written (fp32)."""
    h, buckets = case.dim("h"), case.option("buckets")
    flop, elems = 0.0, 0
    for s in _shapes(case):
        n = max(1, torch.Size(s).numel())
        S = bucket_for(n, buckets)
        flop += 14.0 * S * h * num_blocks(n, S)
        elems += n
    size = torch.finfo(case.dtype).bits // 8
    return flop, elems * (3 * size + 16)


def backend_supports(backend: str, case: Case) -> bool:
    return not (backend == "triton" and case.dtype == torch.float64)


SPEC = Spec(
    op="memory_mlp_momentum",
    make_inputs=make_inputs,
    differentiable=(),
    outputs=("params", "momenta", "prev_outputs", "weight_grads", "projections"),
    call=call,
    truth=reference_call,
    references={"reference": reference_call},
    baselines=baselines,
    check_cases=check_cases,
    bench_cases=bench_cases,
    work=work,
    speedup_bases=("reference", "bucketed", "bucketed+compile", "AdamW(foreach)"),
    backend_supports=backend_supports,
    modes=("step",),
    state=state,
    floors=floors,
)
