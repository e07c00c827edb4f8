"""``cms_chunk_update``: an in-context CMS level, a two-layer MLP with per-sequence fast weights
updated every ``chunk_size`` tokens, as a torch custom op.

Tokens of chunk c use the chunk-start weights W^(c); the summed per-token gradients of
ℓ_t = ½‖W2 σ(W1 x_t) − v_t‖² are applied at the chunk's end
(:mod:`nested_learning.reference.cms_chunk_update` has every equation)::

    o_t = W2^(c) σ(W1^(c) x_t)
    W^(c+1) = W^(c) − lr Σ_{t∈c} ∇_W ℓ_t(W^(c))

Forward and backward are the custom ops ``nested_learning::cms_chunk_update`` and
``::cms_chunk_update_bwd``. When gradients are needed the forward keeps the residuals: the
per-token activations (z, W2ᵀe, e) and chunk-start weights (never per token); the backward is
then one reverse sweep of ten GEMMs per chunk with no forward recompute. A backend may keep the
start weights of every K-th chunk only (plus the final ones) and rebuild the others in its
backward by undoing one chunk's update, W^(c) = W^(c+1) + lr Σ_{t∈c} ∇_W ℓ_t(W^(c)). Every backend
keeps the same layout for a device, so a compiled graph never depends on the backend: on CPU one
start per 128 tokens, which cuts the residuals K-fold (1 GiB to 72 MiB for a width-1024 level over
4 × 1024 tokens in chunks of 8) and lets the C++ backend keep its weights in cache; on GPU one per
512 tokens, so that a level of width 4096 over 4096 tokens keeps 9 weight pairs per sequence rather
than 512 (288 MiB rather than 16 GiB).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .. import reference
from ..reference.cms_chunk_update import ACTIVATIONS, compute_dtype
from . import _checks, _library

__all__ = ["cms_chunk_update", "BACKEND_FUNCTIONS", "ACTIVATIONS"]


class _Backend(NamedTuple):
    forward: Callable[..., tuple[Tensor, ...]]
    backward: Callable[..., tuple[Tensor, ...]]


# Tokens per kept chunk start: CPU measured (the C++ backward as fast as with every start stored),
# GPU sized for memory and not timed.
_SEGMENT_TOKENS = {"cpu": 128, "cuda": 512}


def checkpoint_every(device: torch.device, chunk_size: int) -> int:
    """K: the backward reads the start weights of every K-th chunk and rebuilds the others."""
    return max(1, _SEGMENT_TOKENS.get(device.type, 1) // chunk_size)


def _weight_slots(n_chunks: int, checkpoint_every: int) -> int:
    """Chunk-start weight pairs kept: every K-th chunk's, and the final weights when K > 1."""
    return -(-n_chunks // checkpoint_every) + (checkpoint_every > 1)


# ----------------------------------------------------------------------------- backends
# Contract shared by every backend: contiguous x [B, T, d] and target [B, T, e] of one dtype D;
# w1 [B, h, d] and w2 [B, e, h] in the compute dtype (float64 when D is float64, else float32).
# forward(x, target, w1, w2, lr, chunk_size, activation, save_residuals, checkpoint_every) returns
#   (o [B, T, e] in D, w1_final, w2_final, w1_starts [B, S, h, d], w2_starts [B, S, e, h],
#    activations [B, T, 2h + e] = (z | W2ᵀe | e)), all but o in the compute dtype; the last three
#   are empty [0] tensors when not save_residuals. With K = checkpoint_every (the device's
#   checkpoint_every(device, chunk_size)) and N = ceil(T / chunk_size) chunks, slot j of the starts is
#   chunk jK's start weights, and a last slot holds the final weights when K > 1:
#   S = _weight_slots(N, K);
# backward(x, target, w1_starts, w2_starts, activations, lr, chunk_size, activation, do,
#   dw1_final, dw2_final, checkpoint_every) returns (dx in D, dtarget in D, dw1, dw2 in the
#   compute dtype).


def _reference_forward(x, target, w1, w2, lr, chunk_size, activation, save_residuals, checkpoint_every):
    outs = reference.cms_chunk_update.chunked_with_residuals(x, target, w1, w2, lr, chunk_size, activation,
                                                             checkpoint_every)
    return outs if save_residuals else (*outs[:3], *(w1.new_empty(0) for _ in range(3)))


def _reference_backward(*args):
    return reference.cms_chunk_update.chunked_backward(*args)


def _cpp_forward(*args):
    return torch.ops.nested_learning.cms_chunk_update_fwd_cpp(*args)


def _cpp_backward(*args):
    return torch.ops.nested_learning.cms_chunk_update_bwd_cpp(*args)


def _triton_kernels():
    from ..kernels import cms_chunk_update as kernels  # imports triton: only when this backend runs

    return kernels


def _triton_forward(*args):
    return _triton_kernels().cms_chunk_update_fwd(*args)


def _triton_backward(*args):
    return _triton_kernels().cms_chunk_update_bwd(*args)


BACKEND_FUNCTIONS: dict[str, _Backend] = {
    "reference": _Backend(_reference_forward, _reference_backward),
    "cpp": _Backend(_cpp_forward, _cpp_backward),
    "triton": _Backend(_triton_forward, _triton_backward),
}


def _backend(x: Tensor) -> _Backend:
    name = _library.select(x.device)
    if name == "triton" and x.dtype == torch.float64:
        raise ValueError("the triton cms_chunk_update supports fp32/bf16/fp16 inputs; use NL_BACKEND=reference for float64")
    return BACKEND_FUNCTIONS[name]


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("nested_learning::cms_chunk_update", mutates_args=())
def _cms_chunk_update(
    x: Tensor, target: Tensor, w1: Tensor, w2: Tensor, lr: float, chunk_size: int, activation: str, save_residuals: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    with _library.autocast_off(x.device):
        outs = _backend(x).forward(x, target, w1, w2, lr, chunk_size, activation, save_residuals,
                                   checkpoint_every(x.device, chunk_size))
    return tuple(t.contiguous() for t in outs)  # type: ignore[return-value]


def _n_chunks(T: int, chunk_size: int) -> int:
    return -(-T // chunk_size)


@_cms_chunk_update.register_fake
def _(x, target, w1, w2, lr, chunk_size, activation, save_residuals):
    B, T, _ = x.shape
    S = _weight_slots(_n_chunks(T, chunk_size), checkpoint_every(x.device, chunk_size))
    h, e = w1.shape[1], w2.shape[1]
    residuals = (
        (w1.new_empty(B, S, h, x.shape[-1]), w2.new_empty(B, S, e, h), w1.new_empty(B, T, 2 * h + e))
        if save_residuals
        else (w1.new_empty(0), w1.new_empty(0), w1.new_empty(0))
    )
    return x.new_empty(B, T, e), torch.empty_like(w1), torch.empty_like(w2), *residuals


@torch.library.custom_op("nested_learning::cms_chunk_update_bwd", mutates_args=())
def _cms_chunk_update_bwd(
    x: Tensor,
    target: Tensor,
    w1_starts: Tensor,
    w2_starts: Tensor,
    activations: Tensor,
    lr: float,
    chunk_size: int,
    activation: str,
    do: Tensor,
    dw1_final: Tensor,
    dw2_final: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    with _library.autocast_off(x.device):
        grads = _backend(x).backward(
            x, target, w1_starts, w2_starts, activations, lr, chunk_size, activation, do.contiguous(),
            dw1_final.contiguous(), dw2_final.contiguous(), checkpoint_every(x.device, chunk_size),
        )
    return tuple(g.contiguous() for g in grads)  # type: ignore[return-value]


@_cms_chunk_update_bwd.register_fake
def _(x, target, w1_starts, w2_starts, activations, lr, chunk_size, activation, do, dw1_final, dw2_final):
    return torch.empty_like(x), torch.empty_like(target), torch.empty_like(dw1_final), torch.empty_like(dw2_final)


def _setup_context(ctx, inputs, output):
    x, target, w1, w2, lr, chunk_size, activation, save_residuals = inputs
    ctx.save_for_backward(x, target, *output[3:])
    ctx.lr, ctx.chunk_size, ctx.activation = lr, chunk_size, activation
    ctx.mark_non_differentiable(*output[3:])
    ctx.set_materialize_grads(False)  # else autograd fills zero gradients for the (large) residuals


def _backward(ctx, do, dw1_final, dw2_final, *_residuals):
    x, target, w1_starts, w2_starts, activations = ctx.saved_tensors
    if w1_starts.numel() == 0:
        raise RuntimeError("cms_chunk_update: backward through a call that ran without save_residuals")
    B, _, h, d = w1_starts.shape
    e = w2_starts.shape[2]
    do = torch.zeros(*x.shape[:2], e, dtype=x.dtype, device=x.device) if do is None else do
    dw1_final = w1_starts.new_zeros(B, h, d) if dw1_final is None else dw1_final
    dw2_final = w2_starts.new_zeros(B, e, h) if dw2_final is None else dw2_final
    dx, dt, dw1, dw2 = _cms_chunk_update_bwd(
        x, target, w1_starts, w2_starts, activations, ctx.lr, ctx.chunk_size, ctx.activation, do, dw1_final, dw2_final
    )
    return dx, dt, dw1, dw2, None, None, None, None


_cms_chunk_update.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API


def _weights(name: str, w: Tensor, B: int, rows: int, cols: int, layout: str) -> Tensor:
    """``w`` as ``[B, rows, cols]``: per-sequence weights as given, shared ``[rows, cols]`` expanded."""
    if w.dim() == 2:
        _checks.shape(name, w, (rows, cols), layout)
        return w.expand(B, rows, cols)
    _checks.shape(name, _checks.tensor(name, w, 3), (B, rows, cols), f"[B, {layout[1:]}")
    return w


def cms_chunk_update(
    x: Tensor,
    target: Tensor,
    w1: Tensor,
    w2: Tensor,
    lr: float,
    chunk_size: int,
    activation: str = "gelu",
) -> tuple[Tensor, Tensor, Tensor]:
    """Run an in-context MLP memory over sequences, updating it every ``chunk_size`` tokens.

    Args:
        x: ``[B, T, d]`` inputs (float32, bfloat16, float16 or float64).
        target: ``[B, T, e]`` regression targets v_t of the local loss, x's dtype (under
            autocast, x and target of 16/32 bits are cast to the autocast dtype first).
        w1: ``[h, d]`` (shared) or ``[B, h, d]`` (per sequence) first-layer start weights.
        w2: ``[e, h]`` or ``[B, e, h]`` second-layer start weights.
        lr: inner learning rate of the fast weights (finite).
        chunk_size: tokens per update (≥ 1; 1 updates after every token, ≥ T once at the end).
        activation: ``'gelu'`` (exact), ``'silu'`` or ``'relu'``.

    Returns:
        ``(o, w1_final, w2_final)``: outputs ``[B, T, e]`` in x's dtype (chunk c read with the
        chunk-start weights), and the ``[B, h, d]``, ``[B, e, h]`` weights after every token's
        update, in float32 (float64 for float64 x). Differentiable in x, target, w1 and w2.
    """
    x = _checks.tensor("x", x, 3)
    B, T, d = x.shape
    if min(B, T, d) < 1:
        raise ValueError(f"x must have B, T, d >= 1, got shape {tuple(x.shape)}")
    target = _checks.tensor("target", target, 3)
    e = target.shape[-1]
    _checks.shape("target", target, (B, T, e), "[B, T, e]")
    x, target = _library.autocast(x, target)
    if target.dtype != x.dtype:
        raise TypeError(f"target must have x's dtype {x.dtype}, got {target.dtype}")
    if not isinstance(w1, Tensor) or w1.dim() not in (2, 3):
        raise ValueError(f"w1 must be a [h, d] or [B, h, d] tensor, got {getattr(w1, 'shape', type(w1).__name__)}")
    if not isinstance(w2, Tensor) or w2.dim() not in (2, 3):
        raise ValueError(f"w2 must be a [e, h] or [B, e, h] tensor, got {getattr(w2, 'shape', type(w2).__name__)}")
    h = _checks.tensor("w1", w1, w1.dim()).shape[-2]
    w1 = _weights("w1", w1, B, h, d, "[h, d]")
    w2 = _weights("w2", _checks.tensor("w2", w2, w2.dim()), B, e, h, "[e, h]")
    if min(h, e) < 1:
        raise ValueError(f"w1 and w2 must have h, e >= 1, got h={h}, e={e}")
    _checks.same_device("x", x, target=target, w1=w1, w2=w2)
    lr = _checks.finite("lr", lr)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")

    ct = compute_dtype(x)
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (x, target, w1, w2))
    o, w1f, w2f, *_ = _cms_chunk_update(
        x.contiguous(), target.contiguous(), w1.to(ct).contiguous(), w2.to(ct).contiguous(), lr, chunk_size,
        activation, save,
    )
    return o, w1f, w2f
