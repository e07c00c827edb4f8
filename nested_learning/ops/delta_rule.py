"""``delta_rule``: the delta-rule outer-product weight update as a torch custom op.

Per (sequence, head), state S ∈ R^{K×V}, decay α_t = exp(g_t), step β_t::

    S_t = α_t S_{t-1} + β_t k_t (v_t − α_t S_{t-1}ᵀ k_t)ᵀ  =  α_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ
    o_t = S_tᵀ (scale · q_t)

Forward and backward are the custom ops ``nested_learning::delta_rule`` and
``nested_learning::delta_rule_bwd``; each dispatches to the backend chosen by
:mod:`nested_learning.ops._library` (C++ on CPU, Triton on CUDA, the PyTorch reference
otherwise). Both are opaque to ``torch.compile`` and carry fake (meta) implementations.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .. import reference
from . import _checks, _library

__all__ = ["delta_rule", "BACKEND_FUNCTIONS"]

TRITON_MAX_DIM = 256


class _Backend(NamedTuple):
    forward: Callable[..., tuple[Tensor, Tensor]]
    backward: Callable[..., tuple[Optional[Tensor], ...]]


# ----------------------------------------------------------------------------- backends
# Contract shared by every backend: contiguous inputs; q, k, v of one dtype D; beta, g,
# initial_state in the compute dtype (float64 when D is float64, else float32); returns o in
# D and the final state in the compute dtype; gradients in the dtype of their input, None for
# an absent g or initial_state.


def _reference_forward(q, k, v, beta, g, initial_state, cu_seqlens, scale):
    with torch.no_grad():
        return reference.delta_rule.chunked(q, k, v, beta, g, scale, initial_state, True, cu_seqlens)


def _reference_backward(q, k, v, beta, g, initial_state, cu_seqlens, scale, do, dht):
    return reference.delta_rule.chunked_backward(q, k, v, beta, g, scale, initial_state, cu_seqlens, do, dht)


def _cpp_forward(q, k, v, beta, g, initial_state, cu_seqlens, scale):
    return torch.ops.nested_learning.delta_rule_fwd_cpp(q, k, v, beta, g, initial_state, cu_seqlens, scale)


def _cpp_backward(q, k, v, beta, g, initial_state, cu_seqlens, scale, do, dht):
    dq, dk, dv, dbeta, dg, dh0 = torch.ops.nested_learning.delta_rule_bwd_cpp(
        q, k, v, beta, g, initial_state, cu_seqlens, scale, do, dht
    )
    return dq, dk, dv, dbeta, dg if g is not None else None, dh0 if initial_state is not None else None


def _triton_kernels():
    from ..kernels import delta_rule as kernels  # imports triton: only when this backend runs

    return kernels


def _triton_forward(q, k, v, beta, g, initial_state, cu_seqlens, scale):
    return _triton_kernels().delta_rule_fwd(q, k, v, beta, g, initial_state, cu_seqlens, scale)


def _triton_backward(q, k, v, beta, g, initial_state, cu_seqlens, scale, do, dht):
    return _triton_kernels().delta_rule_bwd(q, k, v, beta, g, initial_state, cu_seqlens, scale, do, dht)


BACKEND_FUNCTIONS: dict[str, _Backend] = {
    "reference": _Backend(_reference_forward, _reference_backward),
    "cpp": _Backend(_cpp_forward, _cpp_backward),
    "triton": _Backend(_triton_forward, _triton_backward),
}


def _backend(q: Tensor, v: Tensor) -> _Backend:
    name = _library.select(q.device)
    if name == "triton" and (max(q.shape[-1], v.shape[-1]) > TRITON_MAX_DIM or q.dtype == torch.float64):
        raise ValueError(
            f"the triton delta_rule supports K, V <= {TRITON_MAX_DIM} and fp32/bf16/fp16 inputs, got "
            f"K={q.shape[-1]}, V={v.shape[-1]}, dtype {q.dtype}; use NL_BACKEND=reference for these"
        )
    return BACKEND_FUNCTIONS[name]


# ----------------------------------------------------------------------------- custom ops


def _compute_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _check_values(beta: Tensor, g: Optional[Tensor], cu_seqlens: Optional[Tensor], length: int) -> None:
    """Data-dependent checks; they run inside the op so that compiled graphs stay whole."""
    bounds = {"beta": (beta, 0.0, 2.0)}
    if g is not None:
        bounds["g"] = (g, float("-inf"), 0.0)
    _checks.values_in(bounds)
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0 or bounds[-1] != length or any(b < a for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"cu_seqlens must rise from 0 to T={length} without decreasing, got {bounds}")


@torch.library.custom_op("nested_learning::delta_rule", mutates_args=())
def _delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Optional[Tensor],
    initial_state: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    scale: float,
) -> tuple[Tensor, Tensor]:
    _check_values(beta, g, cu_seqlens, q.shape[1])
    with _library.autocast_off(q.device):
        o, final_state = _backend(q, v).forward(q, k, v, beta, g, initial_state, cu_seqlens, scale)
    return o.contiguous(), final_state.contiguous()


@_delta_rule.register_fake
def _(q, k, v, beta, g, initial_state, cu_seqlens, scale):
    B, T, H, K = q.shape
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return q.new_empty(B, T, H, v.shape[-1]), q.new_empty(N, H, K, v.shape[-1], dtype=_compute_dtype(q))


@torch.library.custom_op("nested_learning::delta_rule_bwd", mutates_args=())
def _delta_rule_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Optional[Tensor],
    initial_state: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    scale: float,
    do: Tensor,
    dht: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    with _library.autocast_off(q.device):
        grads = _backend(q, v).backward(q, k, v, beta, g, initial_state, cu_seqlens, scale, do.contiguous(),
                                        dht.contiguous())
    # an empty tensor stands for the gradient of an absent g / initial_state
    return tuple(q.new_empty(0) if x is None else x.contiguous() for x in grads)  # type: ignore[return-value]


@_delta_rule_bwd.register_fake
def _(q, k, v, beta, g, initial_state, cu_seqlens, scale, do, dht):
    return tuple(q.new_empty(0) if x is None else torch.empty_like(x) for x in (q, k, v, beta, g, initial_state))


def _setup_context(ctx, inputs, output):
    q, k, v, beta, g, initial_state, cu_seqlens, scale = inputs
    ctx.save_for_backward(q, k, v, beta, g, initial_state, cu_seqlens)
    ctx.scale = scale


def _backward(ctx, do, dht):
    q, k, v, beta, g, initial_state, cu_seqlens = ctx.saved_tensors
    dq, dk, dv, dbeta, dg, dh0 = _delta_rule_bwd(q, k, v, beta, g, initial_state, cu_seqlens, ctx.scale, do, dht)
    return dq, dk, dv, dbeta, dg if g is not None else None, dh0 if initial_state is not None else None, None, None


_delta_rule.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API


def delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Optional[Tensor] = None,
    scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[Tensor] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """Delta-rule memory over a sequence (module docstring), chunked on the fused backends.

    Args:
        q, k: ``[B, T, H, K]`` queries and keys (keys are usually L2-normalised).
        v: ``[B, T, H, V]`` values; q, k, v share one dtype (float32, bfloat16, float16, float64);
            under autocast, those of 16/32 bits are cast to the autocast dtype first.
        beta: ``[B, T, H]`` step sizes in [0, 2].
        g: ``[B, T, H]`` finite log-decays (≤ 0), α = exp(g); ``None`` means no decay.
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` state before the first token (zeros when ``None``).
        output_final_state: return the ``[N, H, K, V]`` state after the last token.
        cu_seqlens: ``[N + 1]`` integer offsets packing N sequences along T (then B must be 1).

    Returns:
        ``(o, final_state)``: ``o`` is ``[B, T, H, V]`` in q's dtype; ``final_state`` is float32
        (float64 for float64 inputs), or ``None`` unless ``output_final_state``.
        Differentiable in q, k, v, beta, g and initial_state.
    """
    q = _checks.tensor("q", q, 4)
    B, T, H, K = q.shape
    if min(B, T, H, K) < 1:
        raise ValueError(f"q must have B, T, H, K >= 1, got shape {tuple(q.shape)}")
    _checks.shape("k", _checks.tensor("k", k, 4), (B, T, H, K), "[B, T, H, K]")
    V = _checks.tensor("v", v, 4).shape[-1]
    _checks.shape("v", v, (B, T, H, V), "[B, T, H, V]")
    if V < 1:
        raise ValueError(f"v must have V >= 1, got shape {tuple(v.shape)}")
    q, k, v = _library.autocast(q, k, v)
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    _checks.shape("beta", _checks.tensor("beta", beta, 3), (B, T, H), "[B, T, H]")
    if g is not None:
        _checks.shape("g", _checks.tensor("g", g, 3), (B, T, H), "[B, T, H]")
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
            raise TypeError("cu_seqlens must be a 1-D integer tensor of sequence offsets")
        if cu_seqlens.numel() < 2 or B != 1:
            raise ValueError(
                f"cu_seqlens needs B == 1 and at least 2 offsets, got B={B} and {cu_seqlens.numel()} offsets"
            )
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None:
        _checks.shape("initial_state", _checks.tensor("initial_state", initial_state, 4), (N, H, K, V), "[N, H, K, V]")
    _checks.same_device("q", q, k=k, v=v, beta=beta, g=g, initial_state=initial_state, cu_seqlens=cu_seqlens)
    scale = K**-0.5 if scale is None else _checks.finite("scale", scale)

    ct = _compute_dtype(q)
    o, final_state = _delta_rule(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        beta.to(ct).contiguous(),
        None if g is None else g.to(ct).contiguous(),
        None if initial_state is None else initial_state.to(ct).contiguous(),
        None if cu_seqlens is None else cu_seqlens.to(torch.int64),
        scale,
    )
    return o, (final_state if output_final_state else None)
