"""Triton kernels of ``cms_chunk_update``: a two-layer MLP memory whose fast weights are updated every chunk.

Notation of :mod:`nested_learning.reference.cms_chunk_update`, per sequence and chunk c of C tokens (X [C, d],
V [C, e]), start weights W1 [h, d], W2 [e, h] (fp32), activation σ, and in the backward the adjoints dW of the
next chunk-start weights with dG = −lr dW. The fast weights do not fit on chip, so the host loops over chunks
and each step launches a few tiled GEMMs over all B sequences at once (grid = (row tiles × column tiles, B)),
the element-wise math fused into their epilogues.

The per-token residuals R = (z | p | ē), rows of 2h + e, are stored by the forward kernels that produce them:
into the op's ``activations`` output when it saves residuals, else into a one-chunk buffer. The backward reads
them back and takes σ(z), σ'(z), σ''(z) element-wise from z, so it redoes no forward GEMM.

Forward, per chunk:

- ``_hidden_kernel``  [C, h], K = d:  z = X W1ᵀ → R.z, a = σ(z)
- ``_output_kernel``  [C, e], K = h:  o = a W2ᵀ → o, R.ē = o − v
- ``_delta_kernel``   [C, h], K = e:  p = ē W2 → R.p, δ = p ⊙ σ'(z)
- ``_update_kernel``  [e, h] and [h, d], K = C:  W2' = W2 − lr ēᵀ a,  W1' = W1 − lr δᵀ X

Backward, per chunk, last first (ten products):

- ``_hidden_kernel``  [C, h], K = d:  dq = X dG1ᵀ → a = σ(z), dp = dq ⊙ σ'(z), δ = p ⊙ σ'(z),
                                      dz = dq ⊙ p ⊙ σ''(z)
- ``_output_kernel``  [C, e], K = h:  de = a dG2ᵀ + dp W2ᵀ → dō = do + de, dv = −de
- ``_delta_kernel``   [C, h], K = e:  da = ē dG2 + dō W2 → dz += da ⊙ σ'(z)
- ``_dx_kernel``      [C, d], K = h:  dX = δ dG1 + dz W1
- ``_update_kernel``: dW1 += dzᵀ X,  dW2 += ēᵀ dp + dōᵀ a  (in place, after every reader of dG)

The forward updates the weights in place. When the residuals are kept it also copies the start weights of every
K-th chunk (K = ``checkpoint_every``) into ``w_starts`` and, when K > 1, the final weights into its last slot. The
backward reads a chunk's start weights from there or rebuilds them from the next chunk's by undoing that chunk's
update with the update kernel (W1 = W1' + lr δᵀ X, W2 = W2' + lr ēᵀ a; δ and a come from the hidden kernel's
backward pass), into one buffer per weight: stored weights grow with T / K rather than T.

Precision. Weights, adjoints, residuals, chunk intermediates, accumulators and the element-wise math are fp32;
only o, dx and dtarget are stored in the input dtype. bf16 inputs run every product on the tf32 tensor cores
(operands rounded to a 10-bit mantissa, fp32 accumulation; bf16 inputs convert exactly). Products with both
operands rounded to bf16 are not used: the chain X → z → a → ē → δ → dz → dW rounds six operands in a row and
lands at 0.8–1.1 × the test rule's bf16 budget (2 × the fp32 reference's error + 2⁻⁸), against about 0.25 × with
tf32. fp32 and fp16 inputs use exact-fp32 ("ieee") products (tf32's roundoff equals fp16's budget floor).
The kernels round tf32 operands to nearest even themselves, on the GPU too: the tensor cores would read the
top 19 bits of an fp32 register (truncation, a bias that builds up over hundreds of chunk updates), and the
interpreter multiplies in full fp32; rounded first, both multiply the same tf32 values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import INTERPRET as _INTERPRET
from ._common import launch as _launch
from ._common import on_input_device
from ._common import round_to as _to

__all__ = ["cms_chunk_update_bwd", "cms_chunk_update_fwd"]

_ACTIVATIONS = ("gelu", "silu", "relu")  # index = the kernels' ACT


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _sigma(z, ACT: tl.constexpr):
    """σ(z), σ'(z), σ''(z) of exact GELU (ACT 0), SiLU (1) or ReLU (2)."""
    if ACT == 0:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        f, d1, d2 = z * cdf, cdf + z * pdf, pdf * (2.0 - z * z)
    elif ACT == 1:
        s = tl.sigmoid(z)
        f, d1, d2 = z * s, s * (1.0 + z * (1.0 - s)), s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))
    else:
        pos = z > 0.0
        f, d1, d2 = tl.where(pos, z, 0.0), tl.where(pos, 1.0, 0.0), tl.zeros_like(z)
    return f, d1, d2


@triton.jit
def _tf32(x):
    """x (fp32) rounded to tf32 (10-bit mantissa), to nearest even."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _mm(a, b, TF32: tl.constexpr):
    """a @ b in fp32: tf32 tensor cores (fp32 accumulation) with TF32, else exact fp32 ("ieee")."""
    a = a.to(tl.float32)
    b = b.to(tl.float32)
    if TF32:  # operands rounded here (module docstring); the interpreter's fp32 product of them is exact
        out = tl.dot(_tf32(a), _tf32(b), input_precision="ieee" if _INTERPRET else "tf32")
    else:
        out = tl.dot(a, b, input_precision="ieee")
    return out


@triton.jit
def _tile(ptr, i, j, s_i, s_j, n_i, n_j):
    """The tile ptr[i · s_i + j · s_j] over index vectors i, j; zeros where i ≥ n_i or j ≥ n_j."""
    mask = (i[:, None] < n_i) & (j[None, :] < n_j)
    return tl.load(ptr + i[:, None] * s_i + j[None, :] * s_j, mask=mask, other=0.0)


@triton.jit
def _put(ptr, i, j, s_i, n_i, n_j, x):
    """ptr[i · s_i + j] = x (rounded to ptr's dtype) where i < n_i and j < n_j."""
    mask = (i[:, None] < n_i) & (j[None, :] < n_j)
    tl.store(ptr + i[:, None] * s_i + j[None, :], _to(x, ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ids(n_rows, BM: tl.constexpr, BN: tl.constexpr):
    """(batch, row indices, column indices) of this program; row tiles vary fastest, so neighbouring
    programs share the weight tile."""
    n_m = tl.cdiv(n_rows, BM)
    pid = tl.program_id(0)
    return tl.program_id(1).to(tl.int64), (pid % n_m) * BM + tl.arange(0, BM), (pid // n_m) * BN + tl.arange(0, BN)


# ----------------------------------------------------------------------------- kernels
# R (the residuals): per token a row of 2H + E fp32 values, z at column 0, p at H, ē at 2H; the kernels get the
# chunk's first row as r + b · s_r + o_r.


@triton.jit
def _hidden_kernel(
    x, w, r, a, dp, delta, dz, t0, n, scale, T, s_w, o_w, s_r, o_r,
    D: tl.constexpr, H: tl.constexpr, E: tl.constexpr, CB: tl.constexpr, ACT: tl.constexpr, BWD: tl.constexpr,
    TF32: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """y = scale · X Wᵀ. Forward (W1, scale 1): z = y → R.z, a = σ(z). Backward (dW1, scale −lr): dq = y with
    z, p from R → a = σ(z), dp = dq ⊙ σ'(z), δ = p ⊙ σ'(z), dz = dq ⊙ p ⊙ σ''(z) (the delta kernel adds the rest)."""
    b, rows, cols = _ids(n, BM, BN)
    ks = tl.arange(0, BK)
    x += (b * T + t0) * D
    w += b * s_w + o_w
    r += b * s_r + o_r
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        acc += _mm(_tile(x, rows, k0 + ks, D, 1, n, D), _tile(w, k0 + ks, cols, 1, D, D, H), TF32)
    acc *= scale
    buf = b * (CB * H)
    if BWD:
        f, d1, d2 = _sigma(_tile(r, rows, cols, 2 * H + E, 1, n, H), ACT)
        p = _tile(r + H, rows, cols, 2 * H + E, 1, n, H)
        _put(dp + buf, rows, cols, H, n, H, acc * d1)
        _put(delta + buf, rows, cols, H, n, H, p * d1)
        _put(dz + buf, rows, cols, H, n, H, acc * p * d2)
    else:
        _put(r, rows, cols, 2 * H + E, n, H, acc)
        f, d1, d2 = _sigma(acc, ACT)
    _put(a + buf, rows, cols, H, n, H, f)


@triton.jit
def _output_kernel(
    a, w2, dw2, dp, r, v, do, o, dob, dv, t0, n, lr, T, s_w2, o_w2, s_r, o_r,
    H: tl.constexpr, E: tl.constexpr, CB: tl.constexpr, BWD: tl.constexpr, TF32: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """Forward: o = a W2ᵀ → o, R.ē = o − v. Backward: de = a dG2ᵀ + dp W2ᵀ → dō = do + de, dv = −de."""
    b, rows, cols = _ids(n, BM, BN)
    ks = tl.arange(0, BK)
    buf = b * (CB * H)
    a += buf
    dp += buf
    w2 += b * s_w2 + o_w2
    dw2 += b * (E * H)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, H, BK):
        at = _tile(a, rows, k0 + ks, H, 1, n, H)
        wt = _tile(w2, k0 + ks, cols, 1, H, H, E)
        if BWD:
            acc += _mm(at, _tile(dw2, k0 + ks, cols, 1, H, H, E) * -lr, TF32)
            acc += _mm(_tile(dp, rows, k0 + ks, H, 1, n, H), wt, TF32)
        else:
            acc += _mm(at, wt, TF32)
    seq = (b * T + t0) * E
    if BWD:
        dobar = _tile(do + seq, rows, cols, E, 1, n, E).to(tl.float32) + acc
        _put(dob + b * (CB * E), rows, cols, E, n, E, dobar)
        _put(dv + seq, rows, cols, E, n, E, -acc)
    else:
        _put(o + seq, rows, cols, E, n, E, acc)
        ebar = acc - _tile(v + seq, rows, cols, E, 1, n, E).to(tl.float32)
        _put(r + b * s_r + o_r + 2 * H, rows, cols, 2 * H + E, n, E, ebar)


@triton.jit
def _delta_kernel(
    r, w2, dw2, dob, delta, dz, n, lr, s_w2, o_w2, s_r, o_r,
    H: tl.constexpr, E: tl.constexpr, CB: tl.constexpr, ACT: tl.constexpr, BWD: tl.constexpr, TF32: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """Forward: p = ē W2 → R.p, δ = p ⊙ σ'(z). Backward: da = ē dG2 + dō W2 → dz += da ⊙ σ'(z) (ē, z from R)."""
    b, rows, cols = _ids(n, BM, BN)
    ks = tl.arange(0, BK)
    r += b * s_r + o_r
    dob += b * (CB * E)
    w2 += b * s_w2 + o_w2
    dw2 += b * (E * H)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, E, BK):
        et = _tile(r + 2 * H, rows, k0 + ks, 2 * H + E, 1, n, E)
        wt = _tile(w2, k0 + ks, cols, H, 1, E, H)
        if BWD:
            acc += _mm(et, _tile(dw2, k0 + ks, cols, H, 1, E, H) * -lr, TF32)
            acc += _mm(_tile(dob, rows, k0 + ks, E, 1, n, E), wt, TF32)
        else:
            acc += _mm(et, wt, TF32)
    _, d1, _ = _sigma(_tile(r, rows, cols, 2 * H + E, 1, n, H), ACT)
    buf = b * (CB * H)
    if BWD:
        _put(dz + buf, rows, cols, H, n, H, acc * d1 + _tile(dz + buf, rows, cols, H, 1, n, H))
    else:
        _put(r + H, rows, cols, 2 * H + E, n, H, acc)
        _put(delta + buf, rows, cols, H, n, H, acc * d1)


@triton.jit
def _dx_kernel(
    delta, dw1, dz, w1, dx, t0, n, lr, T, s_w1, o_w1,
    D: tl.constexpr, H: tl.constexpr, CB: tl.constexpr, TF32: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """dX = δ dG1 + dz W1 (dG1 = −lr dW1)."""
    b, rows, cols = _ids(n, BM, BN)
    ks = tl.arange(0, BK)
    buf = b * (CB * H)
    delta += buf
    dz += buf
    w1 += b * s_w1 + o_w1
    dw1 += b * (H * D)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, H, BK):
        acc += _mm(_tile(delta, rows, k0 + ks, H, 1, n, H), _tile(dw1, k0 + ks, cols, D, 1, H, D) * -lr, TF32)
        acc += _mm(_tile(dz, rows, k0 + ks, H, 1, n, H), _tile(w1, k0 + ks, cols, D, 1, H, D), TF32)
    _put(dx + (b * T + t0) * D, rows, cols, D, n, D, acc)


@triton.jit
def _update_kernel(
    a1, s_a1, o_a1, r_a1, b1, s_b1, o_b1, r_b1, a2, s_a2, o_a2, r_a2, b2, s_b2, o_b2, r_b2,
    w_in, s_in, o_in, w_out, s_out, o_out, n, alpha,
    M: tl.constexpr, N: tl.constexpr, PAIR2: tl.constexpr, TF32: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """W_out = W_in + α (A1ᵀ B1 + A2ᵀ B2) over the chunk's n rows: A [n, M], B [n, N], W [M, N] (row-major); per
    sequence, an operand starts at ptr + b · s + o and its rows are r apart (W's N); the second pair only with PAIR2."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    b = tl.program_id(1).to(tl.int64)
    rows = (pid % n_m) * BM + tl.arange(0, BM)
    cols = (pid // n_m) * BN + tl.arange(0, BN)
    ts = tl.arange(0, BK)
    a1 += b * s_a1 + o_a1
    b1 += b * s_b1 + o_b1
    a2 += b * s_a2 + o_a2
    b2 += b * s_b2 + o_b2
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for t in range(0, n, BK):
        acc += _mm(_tile(a1, rows, t + ts, 1, r_a1, M, n), _tile(b1, t + ts, cols, r_b1, 1, n, N), TF32)
        if PAIR2:
            acc += _mm(_tile(a2, rows, t + ts, 1, r_a2, M, n), _tile(b2, t + ts, cols, r_b2, 1, n, N), TF32)
    w = _tile(w_in + b * s_in + o_in, rows, cols, N, 1, M, N)
    _put(w_out + b * s_out + o_out, rows, cols, N, M, N, w + alpha * acc)


# ----------------------------------------------------------------------------- host side


@dataclass(frozen=True)
class _Config:
    """Largest block per role and launch options; each launch takes min(cap, next power of two of its
    dimension, at least 16). Sized for sm_90 shared memory (≤ 227 KB, checked by the ahead-of-time compile
    test), not tuned on a GPU."""

    BM: int  # token rows of the row kernels (hidden, output, delta, dx)
    BN: int  # their output columns
    BK: int  # their reduction step
    BW: int  # weight rows and columns of the update kernel
    BKW: int  # its reduction step over the chunk's tokens
    tf32: bool  # products on the tf32 tensor cores (bf16 inputs), else exact fp32
    rows: dict  # launch options of the row kernels
    update: dict  # launch options of the update kernel


def _pow2(n: int, cap: int) -> int:
    """The block for a dimension of n: its next power of two, at least 16 (tl.dot), at most cap."""
    return max(16, min(cap, triton.next_power_of_2(n)))


def _config(dtype: torch.dtype) -> _Config:
    """The block caps, product precision and launch options for inputs of this dtype."""
    if dtype != torch.bfloat16:  # exact-fp32 products (fp32, and fp16 whose unit roundoff tf32 only matches)
        return _Config(BM=64, BN=64, BK=32, BW=64, BKW=32, tf32=False,
                       rows=dict(num_warps=4, num_stages=2), update=dict(num_warps=4, num_stages=2))
    # tf32 operands: 128-wide tiles for wgmma
    return _Config(BM=128, BN=128, BK=32, BW=128, BKW=32, tf32=True,
                   rows=dict(num_warps=8, num_stages=2), update=dict(num_warps=8, num_stages=3))


def _update(
    cfg: _Config, B: int, C: int, n: int, alpha: float, pair1: tuple, pair2: Optional[tuple], w_in: tuple, w_out: tuple,
    M: int, N: int,
) -> None:
    """W_out = W_in + α (A1ᵀ B1 [+ A2ᵀ B2]); every A, B is (tensor, batch stride, offset, row stride), every W
    (tensor, batch stride, offset); pair2 may be None."""
    BM, BN = _pow2(M, cfg.BW), _pow2(N, cfg.BW)
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN), B)
    _launch(_update_kernel, grid, *pair1[0], *pair1[1], *(pair2 or pair1)[0], *(pair2 or pair1)[1], *w_in, *w_out,
            n, float(alpha), M=M, N=N, PAIR2=pair2 is not None, TF32=cfg.tf32, BM=BM, BN=BN,
            BK=_pow2(C, cfg.BKW), **cfg.update)


def _grid(n: int, cols: int, blocks: dict, B: int) -> tuple[int, int]:
    """(row tiles × column tiles, B) of a row kernel over n tokens."""
    return triton.cdiv(n, blocks["BM"]) * triton.cdiv(cols, blocks["BN"]), B


def _blocks(cfg: _Config, C: int, cols: int, K: int) -> dict:
    """Block sizes, precision and launch options of a row kernel over C token rows with `cols` output columns
    and reduction length K."""
    return dict(BM=_pow2(C, cfg.BM), BN=_pow2(cols, cfg.BN), BK=_pow2(K, cfg.BK), TF32=cfg.tf32, **cfg.rows)


@on_input_device
def cms_chunk_update_fwd(
    x: Tensor, target: Tensor, w1: Tensor, w2: Tensor, lr: float, chunk_size: int, activation: str,
    save_residuals: bool, checkpoint_every: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(o [B, T, e] in x's dtype, w1_final [B, h, d], w2_final [B, e, h], w1_starts [B, S, h, d],
    w2_starts [B, S, e, h], activations [B, T, 2h + e] = (z | p | ē)), all but o fp32; the last three are empty
    [0] tensors unless save_residuals. Slot j of the starts holds chunk jK's start weights (K =
    checkpoint_every), a last slot the final weights when K > 1."""
    B, T, D = x.shape
    H, E = w1.shape[1], w2.shape[1]
    R = 2 * H + E  # residual row width
    C = min(chunk_size, T)
    n_chunks = triton.cdiv(T, chunk_size)
    cfg = _config(x.dtype)
    dev, f32 = x.device, torch.float32
    w1f, w2f = w1.to(f32).clone(), w2.to(f32).clone()
    K = checkpoint_every
    if save_residuals:
        slots = triton.cdiv(n_chunks, K) + (K > 1)
        starts1 = torch.empty(B, slots, H, D, dtype=f32, device=dev)
        starts2 = torch.empty(B, slots, E, H, dtype=f32, device=dev)
        acts = torch.empty(B, T, R, dtype=f32, device=dev)
    else:
        starts1, starts2, acts = (torch.empty(0, dtype=f32, device=dev) for _ in range(3))
        chunk_residuals = torch.empty(B, C, R, dtype=f32, device=dev)
    o = torch.empty(B, T, E, dtype=x.dtype, device=dev)
    a, delta = (torch.empty(B, C, H, dtype=f32, device=dev) for _ in range(2))
    act = _ACTIVATIONS.index(activation)
    hid, out, dlt = _blocks(cfg, C, H, D), _blocks(cfg, C, E, H), _blocks(cfg, C, H, E)
    for c in range(n_chunks):
        t0 = c * chunk_size
        n = min(chunk_size, T - t0)
        # (tensor, batch stride, offset) of the chunk's residual rows, its start weights and the next ones
        r = (acts, T * R, t0 * R) if save_residuals else (chunk_residuals, C * R, 0)
        if save_residuals and c % K == 0:
            starts1[:, c // K], starts2[:, c // K] = w1f, w2f
        src1 = dst1 = (w1f, H * D, 0)
        src2 = dst2 = (w2f, E * H, 0)
        _launch(_hidden_kernel, _grid(n, H, hid, B), x, src1[0], r[0], a, a, a, a, t0, n, 1.0, T, *src1[1:], *r[1:],
                D=D, H=H, E=E, CB=C, ACT=act, BWD=False, **hid)
        _launch(_output_kernel, _grid(n, E, out, B), a, src2[0], w2f, a, r[0], target, x, o, a, target, t0, n, 0.0, T,
                *src2[1:], *r[1:], H=H, E=E, CB=C, BWD=False, **out)
        _launch(_delta_kernel, _grid(n, H, dlt, B), r[0], src2[0], w2f, a, delta, a, n, 0.0, *src2[1:], *r[1:],
                H=H, E=E, CB=C, ACT=act, BWD=False, **dlt)
        _update(cfg, B, C, n, -lr, ((r[0], r[1], r[2] + 2 * H, R), (a, C * H, 0, H)), None, src2, dst2, E, H)
        _update(cfg, B, C, n, -lr, ((delta, C * H, 0, H), (x, T * D, t0 * D, D)), None, src1, dst1, H, D)
    if save_residuals and K > 1:
        starts1[:, -1], starts2[:, -1] = w1f, w2f
    return o, w1f, w2f, starts1, starts2, acts


@on_input_device
def cms_chunk_update_bwd(
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
    checkpoint_every: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx in x's dtype, dtarget in target's, dw1 [B, h, d], dw2 [B, e, h] fp32): one reverse sweep over the
    chunks, reading each chunk's residuals and its stored or rebuilt start weights."""
    B, T, D = x.shape
    n_chunks, H, E = triton.cdiv(T, chunk_size), w1_starts.shape[2], w2_starts.shape[2]
    K, slots = checkpoint_every, w1_starts.shape[1]
    R = 2 * H + E  # residual row width
    C = min(chunk_size, T)
    cfg = _config(x.dtype)
    dev, f32 = x.device, torch.float32
    dw1, dw2 = dw1_final.to(f32).clone(), dw2_final.to(f32).clone()
    dx, dv = torch.empty_like(x), torch.empty_like(target)
    a, dp, delta, dz = (torch.empty(B, C, H, dtype=f32, device=dev) for _ in range(4))
    dob = torch.empty(B, C, E, dtype=f32, device=dev)
    act = _ACTIVATIONS.index(activation)
    hid, out, dlt, dxb = _blocks(cfg, C, H, D), _blocks(cfg, C, E, H), _blocks(cfg, C, H, E), _blocks(cfg, C, D, H)
    w1r, w2r = (torch.empty_like(dw1), torch.empty_like(dw2)) if K > 1 else (None, None)  # rebuilt start weights
    lr = float(lr)

    def stored(c: int) -> tuple[tuple, tuple]:
        """(W1, W2) as (tensor, batch stride, offset) of the stored start weights of chunk c (jK or the end)."""
        j = slots - 1 if c == n_chunks else c // K
        return (w1_starts, slots * H * D, j * H * D), (w2_starts, slots * E * H, j * E * H)

    for c in reversed(range(n_chunks)):
        t0 = c * chunk_size
        n = min(chunk_size, T - t0)
        o_r = t0 * R
        _launch(_hidden_kernel, _grid(n, H, hid, B), x, dw1, activations, a, dp, delta, dz, t0, n, -lr, T, H * D, 0,
                T * R, o_r, D=D, H=H, E=E, CB=C, ACT=act, BWD=True, **hid)
        if c % K == 0:
            (w1c, s_w1, o_w1), (w2c, s_w2, o_w2) = stored(c)
        else:  # undo chunk c's update on the next chunk's start weights
            nxt1, nxt2 = stored(c + 1) if (c + 1) % K == 0 or c + 1 == n_chunks else ((w1r, H * D, 0), (w2r, E * H, 0))
            (w1c, s_w1, o_w1), (w2c, s_w2, o_w2) = (w1r, H * D, 0), (w2r, E * H, 0)
            _update(cfg, B, C, n, lr, ((activations, T * R, o_r + 2 * H, R), (a, C * H, 0, H)), None, nxt2,
                    (w2r, E * H, 0), E, H)
            _update(cfg, B, C, n, lr, ((delta, C * H, 0, H), (x, T * D, t0 * D, D)), None, nxt1, (w1r, H * D, 0),
                    H, D)
        _launch(_output_kernel, _grid(n, E, out, B), a, w2c, dw2, dp, activations, target, do, do, dob, dv,
                t0, n, lr, T, s_w2, o_w2, T * R, o_r, H=H, E=E, CB=C, BWD=True, **out)
        _launch(_delta_kernel, _grid(n, H, dlt, B), activations, w2c, dw2, dob, delta, dz, n, lr, s_w2, o_w2,
                T * R, o_r, H=H, E=E, CB=C, ACT=act, BWD=True, **dlt)
        _launch(_dx_kernel, _grid(n, D, dxb, B), delta, dw1, dz, w1c, dx, t0, n, lr, T, s_w1, o_w1,
                D=D, H=H, CB=C, **dxb)
        _update(cfg, B, C, n, 1.0, ((dz, C * H, 0, H), (x, T * D, t0 * D, D)), None, (dw1, H * D, 0), (dw1, H * D, 0),
                H, D)
        _update(cfg, B, C, n, 1.0, ((activations, T * R, o_r + 2 * H, R), (dp, C * H, 0, H)),
                ((dob, C * E, 0, E), (a, C * H, 0, H)), (dw2, E * H, 0), (dw2, E * H, 0), E, H)
    return dx, dv, dw1, dw2
