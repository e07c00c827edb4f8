"""Triton kernel of ``cms_accumulate``: one multi-frequency CMS optimizer step, tensor by tensor.

Rule of :mod:`nested_learning.reference.cms_accumulate` (A: fp32 accumulator, k: inner steps taken)::

    off-cycle:  A ← A + g
    on-cycle:   u = A + g (× 1/n with ``average``);  θ ← Opt(θ, u);  A ← 0
    sgd:        u ← u + λθ;  b ← u (k = 0) or μb + (1−τ)u;  u ← u + μb (nesterov) or b;  θ ← θ − ηu
    adam(w):    u ← u + λθ (adam) or θ ← θ(1 − ηλ) (adamw);  m ← β1 m + (1−β1) u;  v ← β2 v + (1−β2) u²
                θ ← θ − (m / (√v · c2 + ε)) · c1,   c1 = η/(1−β1^{k+1}),  c2 = 1/√(1−β2^{k+1})

One launch per tensor of a 1-D blocked element-wise kernel: the optimizer, the tensor's phase and
the rule's options are compile-time flags, its scalars (rounded to fp32 on the host, like the
reference's) runtime arguments. Every product and sum is rounded on its own (no FMA contraction:
``enable_fp_fusion=False``), ÷ and √ are the IEEE-rounded ones, and θ is rounded back to its dtype
once, to nearest even; so SGD reproduces the reference bit for bit. Adam's √ differs from an MKL
build's CPU ``torch.sqrt`` by at most 1 ulp (CUDA's ``torch.sqrt`` and ÷ are IEEE-rounded, so on
the GPU Adam should match the reference too; unverified). Parameters are fp32, bf16 or fp16 (state fp32).
"""

from __future__ import annotations

import array
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference.cms_accumulate import Hyper
from ._common import on_input_device, round_to

__all__ = ["BLOCK", "cms_accumulate"]

BLOCK = 4096  # elements per program: 16 per thread at 8 warps, in 4-element (16-byte fp32) accesses
_NUM_WARPS = 8
_RULES = {"sgd": 0, "adam": 1, "adamw": 2}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FLAGS = ("DUE", "RULE", "AVERAGE", "WEIGHT_DECAY", "MOMENTUM", "FIRST", "NESTEROV")
_OFF_CYCLE = dict.fromkeys(_FLAGS, False)  # one compiled variant for every off-cycle tensor

@triton.jit
def _cms_accumulate_kernel(
    param_ptr, grad_ptr, acc_ptr, m_ptr, v_ptr, n,
    scale, lr, weight_decay, momentum, keep, beta1, one_minus_beta1, beta2, one_minus_beta2, c1, c2, eps, decay,
    DUE: tl.constexpr, RULE: tl.constexpr, AVERAGE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
    MOMENTUM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    offs = tl.max_contiguous(offs, 4)  # 4-element accesses for every dtype: one register layout, no shuffles
    mask = offs < n
    acc = tl.load(acc_ptr + offs, mask=mask, other=0.0)
    u = acc + tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if not DUE:
        tl.store(acc_ptr + offs, u, mask=mask)
    else:
        if AVERAGE:
            u = u * scale
        p = tl.load(param_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if RULE == 0:  # sgd
            if WEIGHT_DECAY:
                u = u + p * weight_decay
            if MOMENTUM:
                if FIRST:
                    b = u
                else:
                    b = tl.load(m_ptr + offs, mask=mask, other=0.0) * momentum + u * keep
                tl.store(m_ptr + offs, b, mask=mask)
                if NESTEROV:
                    u = u + b * momentum
                else:
                    u = b
            p = p - u * lr
        else:  # adam (1), adamw (2)
            if RULE == 2:
                p = p * decay
            elif WEIGHT_DECAY:
                u = u + p * weight_decay
            m = tl.load(m_ptr + offs, mask=mask, other=0.0) * beta1 + u * one_minus_beta1
            v = tl.load(v_ptr + offs, mask=mask, other=0.0) * beta2 + (u * u) * one_minus_beta2
            tl.store(m_ptr + offs, m, mask=mask)
            tl.store(v_ptr + offs, v, mask=mask)
            p = p - tl.math.div_rn(m, tl.math.sqrt_rn(v) * c2 + eps) * c1
        tl.store(param_ptr + offs, round_to(p, param_ptr.dtype.element_ty), mask=mask)
        tl.store(acc_ptr + offs, tl.zeros_like(acc), mask=mask)


def _f32(value: float) -> float:
    """``value`` rounded to fp32 to nearest (the reference's rounding of its scalar operands)."""
    return array.array("f", (value,))[0]


def _scalars(h: Hyper, count: int, step: int) -> tuple[float, ...]:
    """The kernel's runtime scalars for a due tensor: s, η, λ, μ, 1−τ, β1, 1−β1, β2, 1−β2, c1, c2, ε, 1−ηλ."""
    t = step + 1
    return tuple(
        _f32(x)
        for x in (
            1.0 / (count + 1), h.lr, h.weight_decay, h.momentum, 1.0 - h.dampening,
            h.beta1, 1.0 - h.beta1, h.beta2, 1.0 - h.beta2,
            h.lr / (1.0 - h.beta1**t), 1.0 / math.sqrt(1.0 - h.beta2**t), h.eps, 1.0 - h.lr * h.weight_decay,
        )
    )  # fmt: skip


@on_input_device
def cms_accumulate(
    params: list[Tensor],
    grads: list[Tensor],
    accumulators: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    counts: list[int],
    steps: list[int],
    due: list[bool],
    hyper: Hyper,
) -> None:
    """One step of the rule (module docstring) in place: a launch per non-empty tensor (two when its size is
    not a multiple of 16: the vector-aligned part, then the rest).

    Arguments as :func:`nested_learning.reference.cms_accumulate.step`; the caller has validated
    them (contiguous, one device, fp32 state).
    """
    if params and params[0].dtype not in _DTYPES:
        raise ValueError(f"the triton backend of cms_accumulate takes fp32, bf16 or fp16 params, got {params[0].dtype}")
    h = hyper
    momentum = h.optimizer == "sgd" and h.momentum != 0.0
    for i, (p, g, acc) in enumerate(zip(params, grads, accumulators)):
        n = p.numel()
        m = exp_avgs[i] if exp_avgs else acc  # acc: a placeholder the kernel never touches
        v = exp_avg_sqs[i] if exp_avg_sqs else acc
        if due[i]:
            scalars = _scalars(h, counts[i], steps[i])
            values = (True, _RULES[h.optimizer], h.average, h.weight_decay != 0.0 and h.optimizer != "adamw",
                      momentum, momentum and steps[i] == 0, momentum and h.nesterov)  # fmt: skip
            flags = dict(zip(_FLAGS, values))
        else:
            scalars, flags = (0.0,) * 13, _OFF_CYCLE
        # a multiple of 16 elements first (vector loads), then the rest
        head = n // 16 * 16
        for start, end in ((0, head), (head, n)):
            if end > start:
                ts = [x.view(-1)[start:end] if 0 < start or end < n else x for x in (p, g, acc, m, v)]
                _cms_accumulate_kernel[(triton.cdiv(end - start, BLOCK),)](
                    *ts, end - start, *scalars, **flags, BLOCK=BLOCK, num_warps=_NUM_WARPS, enable_fp_fusion=False
                )
