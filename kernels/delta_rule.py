"""Chunked (WY) Triton kernels of the delta rule, forward and backward.

Notation of :mod:`nested_learning.reference.delta_rule`, per sequence, head and chunk of C = 64 tokens:
G = within-chunk cumulative log-decay, γ = e^G, D_ij = e^{G_i − G_j} for i ≥ j (0 above), G_C = G at the
chunk's last token, A = strict_tril(diag(β) K Kᵀ ⊙ D), T = (I + A)⁻¹, h_c = the state entering chunk c.

Forward, three launches:

- ``_wy_fwd_kernel``     grid (chunks, H):          W = T diag(βγ) K, U = T diag(β) V
- ``_state_fwd_kernel``  grid (N·H·⌈V/BV⌉):         serial over chunks: h_c, Vnew = U − W h_c, final state
- ``_output_kernel``     grid (chunks, H, ⌈V/BV⌉):  O = diag(scale γ) Q h_c + tril(scale Q Kᵀ ⊙ D) Vnew

Backward: the first two again (nothing is kept from the forward), then four launches:

- ``_dv_intra_kernel``   grid (chunks, H, ⌈V/BV⌉):  the intra-chunk part of dVnew, tril(scale Q Kᵀ ⊙ D)ᵀ dO
- ``_state_bwd_kernel``  grid (N·H·⌈V/BV⌉):         serial, last chunk first: dh_c, the full dVnew, dh0
- ``_dqk_kernel``        grid (chunks, H, ⌈K/BK⌉):  dq, the direct part of dk, dW, dL/dG from O and the state
- ``_wy_bwd_kernel``     grid (chunks, H):          back through W, U and T: dk, dv, dβ, dg

Varlen batches are packed token axes; a host-built table maps each chunk to (sequence, chunk in it), and
dense batches use the same table (sequence n spans tokens n·T … n·T + T − 1).

Precision. Accumulators, element-wise math, the running state and its gradient (register tiles) and
T = (I + A)⁻¹ (exact-fp32 block substitution) are fp32. The decay of a token to its chunk's end,
e^{G_C − G_i}, comes from a directly summed suffix (not a difference of prefix sums), which keeps the
fp32 state as accurate as the fp32 token loop (the PyTorch chunked form is about 5× worse there).
fp32 inputs use exact-fp32 ("ieee") matrix products and fp32 intermediates throughout. bf16/fp16
inputs feed every matrix product to the tensor cores with both operands in the input dtype (rounded to
nearest even) and fp32 accumulation, so every operand that is not an input (T, W, Vnew, h_c, the state,
P, ...) is rounded to the input dtype right before its product: a relative error of at most 2⁻⁸ (bf16)
or 2⁻¹¹ (fp16) per element that does not accumulate along the sequence, since the state itself is
carried in fp32. Row scalings (γ, β, decay) go on fp32 accumulators or on the non-input operand, so the
inputs q, k, v, dO reach the tensor cores unrounded. An intermediate is stored in the input dtype only
when every consumer feeds it to such a product (W, Vnew, h_c, dh_c, dVnew, dW): storage then adds no
rounding of its own. U, the intra-chunk dVnew, the partial dk and the dL/dG partials are summed in fp32
by their consumers and are kept fp32. Against the float64 token loop this lands at about 0.4× the test
rule's bound (2 × the fp32 PyTorch references' error + 4e-3 bf16 / 5e-4 fp16), measured under the
interpreter, which reproduces the operand rounding (tests/kernels/test_delta_rule.py).
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

__all__ = ["delta_rule_fwd", "delta_rule_bwd", "CHUNK"]

CHUNK = 64  # tokens per chunk; the kernels hard-code 64 rows (four 16-row blocks for the inverse)
_TARGET_SMS = 132  # H100 SXM: the serial kernels narrow their V block while wider ones would leave SMs idle


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _dot(a, b, DT: tl.constexpr):
    """a @ b, fp32 accumulation, both operands rounded to DT: tensor cores for bf16/fp16, exact fp32 for fp32."""
    a = _to(a, DT)
    b = _to(b, DT)
    if _INTERPRET:
        # the interpreter multiplies 16-bit operands as raw bits: hand it their (exact) fp32 values
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DT == tl.float32:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _mm(a, b):
    """a @ b in exact fp32 (the 16×16 blocks of the triangular inverse)."""
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _ld(ptr, t0, rows, nrows, i_h, cols, H: tl.constexpr, X: tl.constexpr):
    """The tile ptr[t0 + rows, i_h, cols] of a [tokens, H, X] tensor; zeros at rows ≥ nrows and cols ≥ X."""
    mask = (rows[:, None] < nrows) & (cols[None, :] < X)
    return tl.load(ptr + (t0 * H + i_h) * X + rows[:, None] * (H * X) + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _st(ptr, t0, rows, nrows, i_h, cols, H: tl.constexpr, X: tl.constexpr, x):
    """ptr[t0 + rows, i_h, cols] = x (rounded to ptr's dtype) where rows < nrows and cols < X."""
    mask = (rows[:, None] < nrows) & (cols[None, :] < X)
    ptrs = ptr + (t0 * H + i_h) * X + rows[:, None] * (H * X) + cols[None, :]
    tl.store(ptrs, _to(x, ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ld_s(ptr, idx, i_h, ok, ov, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    """The tile ptr[idx, i_h, ok, ov] of an [n, H, K, V] tensor (zeros past K, V)."""
    mask = (ok[:, None] < K) & (ov[None, :] < V)
    return tl.load(ptr + (idx * H + i_h) * (K * V) + ok[:, None] * V + ov[None, :], mask=mask, other=0.0)


@triton.jit
def _st_s(ptr, idx, i_h, ok, ov, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, x):
    """ptr[idx, i_h, ok, ov] = x (rounded to ptr's dtype) within K, V."""
    mask = (ok[:, None] < K) & (ov[None, :] < V)
    tl.store(ptr + (idx * H + i_h) * (K * V) + ok[:, None] * V + ov[None, :], _to(x, ptr.dtype.element_ty), mask=mask)


@triton.jit
def _vec(ptr, t0, nrows, i_h, H: tl.constexpr):
    """ptr[t0 : t0 + 64, i_h] of a [tokens, H] tensor as fp32, zeros past the chunk's valid rows."""
    rows = tl.arange(0, 64)
    return tl.load(ptr + t0 * H + i_h + rows * H, mask=rows < nrows, other=0.0).to(tl.float32)


@triton.jit
def _st_vec(ptr, t0, nrows, i_h, H: tl.constexpr, x):
    """ptr[t0 : t0 + 64, i_h] = x (rounded to ptr's dtype) of a [tokens, H] tensor, valid rows only."""
    rows = tl.arange(0, 64)
    tl.store(ptr + t0 * H + i_h + rows * H, _to(x, ptr.dtype.element_ty), mask=rows < nrows)


@triton.jit
def _chunk(table, cu, i_c):
    """(first token, number of valid rows) of chunk i_c; table rows are (sequence, chunk within it)."""
    i_n = tl.load(table + 2 * i_c)
    j = tl.load(table + 2 * i_c + 1)
    t0 = tl.load(cu + i_n).to(tl.int64) + j * 64
    return t0, tl.minimum(tl.load(cu + i_n + 1).to(tl.int64) - t0, 64)


@triton.jit
def _gates(g, t0, nrows, i_h, H: tl.constexpr, HAS_G: tl.constexpr):
    """(G, G_C − G, G_C) of one chunk, zeros without g. G_i = Σ_{j≤i} g_j; G_C − G_i = Σ_{j>i} g_j is summed
    directly (not as a difference of two long prefix sums), so the decay of recent tokens to the chunk
    end keeps full fp32 accuracy; padding rows have g = 0."""
    if HAS_G:
        x = _vec(g, t0, nrows, i_h, H)
        G = tl.cumsum(x, 0)
        Gc = tl.cumsum(x, 0, reverse=True) - x
        G_last = tl.sum(x, 0)
    else:
        G = tl.zeros([64], dtype=tl.float32)
        Gc = G
        G_last = tl.sum(G, 0)
    return G, Gc, G_last


@triton.jit
def _masked_exp(x, mask):
    """exp(x) where mask, else 0 (masked before exp, so nothing overflows)."""
    return tl.exp(tl.where(mask, x, float("-inf")))


@triton.jit
def _part(x, i: tl.constexpr):
    """x[16 i : 16 i + 16] of a 64-vector."""
    return tl.sum(tl.where((tl.arange(0, 4) == i)[:, None], tl.reshape(x, (4, 16)), 0.0), 0)


@triton.jit
def _place(x, i: tl.constexpr, j: tl.constexpr):
    """The 64×64 matrix holding the 16×16 block x at block position (i, j), zeros elsewhere."""
    tiled = tl.reshape(tl.broadcast_to(x[None, :, None, :], (4, 16, 4, 16)), (64, 64))
    blk = tl.arange(0, 64) // 16
    return tl.where((blk[:, None] == i) & (blk[None, :] == j), tiled, 0.0)


@triton.jit
def _subst_row(T, A, sel):
    """One forward-substitution row of T = (I + A)⁻¹ (A strictly lower, rows above done): T_r = e_r − A_r T."""
    a = tl.sum(tl.where(sel, A, 0.0), 0)
    return tl.where(sel, T - tl.sum(a[:, None] * T, 0)[None, :], T)


@triton.jit
def _wy_inverse(k, t0, nrows, i_h, G, beta, H: tl.constexpr, K: tl.constexpr, BKC: tl.constexpr, DT: tl.constexpr):
    """KKE = strict_tril(K Kᵀ ⊙ D) and T = (I + diag(β) KKE)⁻¹ of one chunk, 64×64 fp32.

    By 16×16 blocks: the ten lower blocks of K Kᵀ, forward substitution inside the four diagonal blocks,
    then T_ij = −T_ii Σ_{j≤m<i} A_im T_mj below them (exact fp32).
    """
    r = tl.arange(0, 16)
    kk00 = tl.zeros([16, 16], dtype=tl.float32)
    kk11 = tl.zeros([16, 16], dtype=tl.float32)
    kk22 = tl.zeros([16, 16], dtype=tl.float32)
    kk33 = tl.zeros([16, 16], dtype=tl.float32)
    kk10 = tl.zeros([16, 16], dtype=tl.float32)
    kk20 = tl.zeros([16, 16], dtype=tl.float32)
    kk21 = tl.zeros([16, 16], dtype=tl.float32)
    kk30 = tl.zeros([16, 16], dtype=tl.float32)
    kk31 = tl.zeros([16, 16], dtype=tl.float32)
    kk32 = tl.zeros([16, 16], dtype=tl.float32)
    for kc in range(0, K, BKC):
        cols = kc + tl.arange(0, BKC)
        k0 = _ld(k, t0, r, nrows, i_h, cols, H, K)
        k1 = _ld(k, t0 + 16, r, nrows - 16, i_h, cols, H, K)
        k2 = _ld(k, t0 + 32, r, nrows - 32, i_h, cols, H, K)
        k3 = _ld(k, t0 + 48, r, nrows - 48, i_h, cols, H, K)
        kk00 += _dot(k0, tl.trans(k0), DT)
        kk11 += _dot(k1, tl.trans(k1), DT)
        kk22 += _dot(k2, tl.trans(k2), DT)
        kk33 += _dot(k3, tl.trans(k3), DT)
        kk10 += _dot(k1, tl.trans(k0), DT)
        kk20 += _dot(k2, tl.trans(k0), DT)
        kk21 += _dot(k2, tl.trans(k1), DT)
        kk30 += _dot(k3, tl.trans(k0), DT)
        kk31 += _dot(k3, tl.trans(k1), DT)
        kk32 += _dot(k3, tl.trans(k2), DT)

    G0, G1, G2, G3 = _part(G, 0), _part(G, 1), _part(G, 2), _part(G, 3)
    b0, b1, b2, b3 = _part(beta, 0), _part(beta, 1), _part(beta, 2), _part(beta, 3)
    tri = r[:, None] > r[None, :]
    kk00 *= _masked_exp(G0[:, None] - G0[None, :], tri)
    kk11 *= _masked_exp(G1[:, None] - G1[None, :], tri)
    kk22 *= _masked_exp(G2[:, None] - G2[None, :], tri)
    kk33 *= _masked_exp(G3[:, None] - G3[None, :], tri)
    kk10 *= tl.exp(G1[:, None] - G0[None, :])
    kk20 *= tl.exp(G2[:, None] - G0[None, :])
    kk21 *= tl.exp(G2[:, None] - G1[None, :])
    kk30 *= tl.exp(G3[:, None] - G0[None, :])
    kk31 *= tl.exp(G3[:, None] - G1[None, :])
    kk32 *= tl.exp(G3[:, None] - G2[None, :])
    a00, a11, a22, a33 = kk00 * b0[:, None], kk11 * b1[:, None], kk22 * b2[:, None], kk33 * b3[:, None]
    a10, a20, a30 = kk10 * b1[:, None], kk20 * b2[:, None], kk30 * b3[:, None]
    a21, a31, a32 = kk21 * b2[:, None], kk31 * b3[:, None], kk32 * b3[:, None]

    eye = (r[:, None] == r[None, :]).to(tl.float32)
    t00, t11, t22, t33 = eye, eye, eye, eye
    for i in range(1, 16):
        sel = (r == i)[:, None]
        t00 = _subst_row(t00, a00, sel)
        t11 = _subst_row(t11, a11, sel)
        t22 = _subst_row(t22, a22, sel)
        t33 = _subst_row(t33, a33, sel)
    t10 = -_mm(t11, _mm(a10, t00))
    t21 = -_mm(t22, _mm(a21, t11))
    t32 = -_mm(t33, _mm(a32, t22))
    t20 = -_mm(t22, _mm(a20, t00) + _mm(a21, t10))
    t31 = -_mm(t33, _mm(a31, t11) + _mm(a32, t21))
    t30 = -_mm(t33, _mm(a30, t00) + _mm(a31, t10) + _mm(a32, t20))

    T = _place(t00, 0, 0) + _place(t11, 1, 1) + _place(t22, 2, 2) + _place(t33, 3, 3)
    T += _place(t10, 1, 0) + _place(t20, 2, 0) + _place(t21, 2, 1)
    T += _place(t30, 3, 0) + _place(t31, 3, 1) + _place(t32, 3, 2)
    KKE = _place(kk00, 0, 0) + _place(kk11, 1, 1) + _place(kk22, 2, 2) + _place(kk33, 3, 3)
    KKE += _place(kk10, 1, 0) + _place(kk20, 2, 0) + _place(kk21, 2, 1)
    KKE += _place(kk30, 3, 0) + _place(kk31, 3, 1) + _place(kk32, 3, 2)
    return KKE, T


# ----------------------------------------------------------------------------- forward kernels


@triton.jit
def _wy_fwd_kernel(
    k, v, beta, g, w, u, table, cu,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BKC: tl.constexpr, BVC: tl.constexpr, HAS_G: tl.constexpr,
):
    """W = T diag(β e^G) K (input dtype) and U = T diag(β) V (fp32) of one (chunk, head)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    DT: tl.constexpr = k.dtype.element_ty
    t0, nrows = _chunk(table, cu, i_c)
    G, Gc, G_last = _gates(g, t0, nrows, i_h, H, HAS_G)
    b = _vec(beta, t0, nrows, i_h, H)
    KKE, T = _wy_inverse(k, t0, nrows, i_h, G, b, H, K, BKC, DT)
    rows = tl.arange(0, 64)
    Tk = T * (b * tl.exp(G))[None, :]
    for kc in range(0, K, BKC):
        x = _dot(Tk, _ld(k, t0, rows, nrows, i_h, kc + tl.arange(0, BKC), H, K), DT)
        _st(w, t0, rows, nrows, i_h, kc + tl.arange(0, BKC), H, K, x)
    Tv = T * b[None, :]
    for vc in range(0, V, BVC):
        x = _dot(Tv, _ld(v, t0, rows, nrows, i_h, vc + tl.arange(0, BVC), H, V), DT)
        _st(u, t0, rows, nrows, i_h, vc + tl.arange(0, BVC), H, V, x)


@triton.jit
def _state_fwd_kernel(
    k, w, u, g, h0, hs, vn, ht, cu, first_chunk,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_G: tl.constexpr, HAS_H0: tl.constexpr,
):
    """Serial over the chunks of one (sequence, head, V-block), S = h_0 (or 0) first:
    store h_c = S, Vnew = U − W S, then S ← e^{G_C} S + Kᵀ diag(e^{G_C − G}) Vnew; ht = the last S."""
    NV: tl.constexpr = (V + BV - 1) // BV
    i_v, i_nh = tl.program_id(0) % NV, tl.program_id(0) // NV
    i_n, i_h = (i_nh // H).to(tl.int64), i_nh % H
    DT: tl.constexpr = k.dtype.element_ty
    bos, eos = tl.load(cu + i_n).to(tl.int64), tl.load(cu + i_n + 1).to(tl.int64)
    first = tl.load(first_chunk + i_n).to(tl.int64)
    rows, ok, ov = tl.arange(0, 64), tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    if HAS_H0:
        S = _ld_s(h0, i_n, i_h, ok, ov, H, K, V)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    for j in range(tl.cdiv(eos - bos, 64)):
        t0 = bos + j * 64
        nrows = tl.minimum(eos - t0, 64)
        _st_s(hs, first + j, i_h, ok, ov, H, K, V, S)
        x = _dot(_ld(w, t0, rows, nrows, i_h, ok, H, K), S, DT)
        x = _ld(u, t0, rows, nrows, i_h, ov, H, V) - x
        _st(vn, t0, rows, nrows, i_h, ov, H, V, x)
        G, Gc, G_last = _gates(g, t0, nrows, i_h, H, HAS_G)
        S = S * tl.exp(G_last) + _dot(tl.trans(_ld(k, t0, rows, nrows, i_h, ok, H, K)), x * tl.exp(Gc)[:, None], DT)
    _st_s(ht, i_n, i_h, ok, ov, H, K, V, S)


@triton.jit
def _output_kernel(
    q, k, vn, hs, g, o, table, cu, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BKC: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr,
):
    """O = diag(scale e^G) Q h_c + tril(scale Q Kᵀ ⊙ D) Vnew of one (chunk, head, V-block)."""
    i_c, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    DT: tl.constexpr = q.dtype.element_ty
    t0, nrows = _chunk(table, cu, i_c)
    rows, ov = tl.arange(0, 64), i_v * BV + tl.arange(0, BV)
    qh = tl.zeros([64, BV], dtype=tl.float32)
    qk = tl.zeros([64, 64], dtype=tl.float32)
    for kc in range(0, K, BKC):
        cols = kc + tl.arange(0, BKC)
        qt = _ld(q, t0, rows, nrows, i_h, cols, H, K)
        kt = _ld(k, t0, rows, nrows, i_h, cols, H, K)
        qh += _dot(qt, _ld_s(hs, i_c.to(tl.int64), i_h, cols, ov, H, K, V), DT)
        qk += _dot(qt, tl.trans(kt), DT)
    G, Gc, G_last = _gates(g, t0, nrows, i_h, H, HAS_G)
    P = qk * _masked_exp(G[:, None] - G[None, :], rows[:, None] >= rows[None, :]) * scale
    out = qh * (scale * tl.exp(G))[:, None] + _dot(P, _ld(vn, t0, rows, nrows, i_h, ov, H, V), DT)
    _st(o, t0, rows, nrows, i_h, ov, H, V, out)


# ----------------------------------------------------------------------------- backward kernels


@triton.jit
def _dv_intra_kernel(
    q, k, do, g, dvi, table, cu, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BKC: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr,
):
    """dVnew_intra = tril(scale Q Kᵀ ⊙ D)ᵀ dO (fp32) of one (chunk, head, V-block)."""
    i_c, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    DT: tl.constexpr = q.dtype.element_ty
    t0, nrows = _chunk(table, cu, i_c)
    rows, ov = tl.arange(0, 64), i_v * BV + tl.arange(0, BV)
    kq = tl.zeros([64, 64], dtype=tl.float32)
    for kc in range(0, K, BKC):
        cols = kc + tl.arange(0, BKC)
        qt = _ld(q, t0, rows, nrows, i_h, cols, H, K)
        kq += _dot(_ld(k, t0, rows, nrows, i_h, cols, H, K), tl.trans(qt), DT)
    G, Gc, G_last = _gates(g, t0, nrows, i_h, H, HAS_G)
    Pt = kq * _masked_exp(G[None, :] - G[:, None], rows[None, :] >= rows[:, None]) * scale
    x = _dot(Pt, _ld(do, t0, rows, nrows, i_h, ov, H, V), DT)
    _st(dvi, t0, rows, nrows, i_h, ov, H, V, x)


@triton.jit
def _state_bwd_kernel(
    q, k, w, do, dvi, g, dht, dh0, dhs, dvn, cu, first_chunk, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_G: tl.constexpr, HAS_DHT: tl.constexpr, HAS_H0: tl.constexpr,
):
    """Serial over the chunks of one (sequence, head, V-block), last first, dS = dht (or 0) first:
    store dh_c = dS (gradient of the state leaving chunk c), dVnew = dVnew_intra + diag(e^{G_C − G}) K dS,
    then dS ← e^{G_C} dS + Qᵀ diag(scale e^G) dO − Wᵀ dVnew; dh0 = the last dS."""
    NV: tl.constexpr = (V + BV - 1) // BV
    i_v, i_nh = tl.program_id(0) % NV, tl.program_id(0) // NV
    i_n, i_h = (i_nh // H).to(tl.int64), i_nh % H
    DT: tl.constexpr = q.dtype.element_ty
    bos, eos = tl.load(cu + i_n).to(tl.int64), tl.load(cu + i_n + 1).to(tl.int64)
    first = tl.load(first_chunk + i_n).to(tl.int64)
    rows, ok, ov = tl.arange(0, 64), tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    if HAS_DHT:
        dS = _ld_s(dht, i_n, i_h, ok, ov, H, K, V)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
    n_chunks = tl.cdiv(eos - bos, 64)
    for jj in range(n_chunks):
        j = n_chunks - 1 - jj
        t0 = bos + j * 64
        nrows = tl.minimum(eos - t0, 64)
        _st_s(dhs, first + j, i_h, ok, ov, H, K, V, dS)
        G, Gc, G_last = _gates(g, t0, nrows, i_h, H, HAS_G)
        x = _dot(_ld(k, t0, rows, nrows, i_h, ok, H, K), dS, DT) * tl.exp(Gc)[:, None]
        x += _ld(dvi, t0, rows, nrows, i_h, ov, H, V)
        _st(dvn, t0, rows, nrows, i_h, ov, H, V, x)
        qt = _ld(q, t0, rows, nrows, i_h, ok, H, K)
        dob = _ld(do, t0, rows, nrows, i_h, ov, H, V) * (scale * tl.exp(G))[:, None]
        dS = dS * tl.exp(G_last) + _dot(tl.trans(qt), dob, DT)
        dS -= _dot(tl.trans(_ld(w, t0, rows, nrows, i_h, ok, H, K)), x, DT)
    if HAS_H0:
        _st_s(dh0, i_n, i_h, ok, ov, H, K, V, dS)


@triton.jit
def _dqk_kernel(
    q, k, vn, dvn, do, hs, dhs, g, dq, dkp, dw, dgp, table, cu, scale, n_tokens,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr,
):
    """For one (chunk, head, K-block), with dP = dO Vnewᵀ ⊙ scale D:
    dq = diag(scale e^G) dO h_cᵀ + dP K,  dk_direct = dPᵀ Q + diag(e^{G_C − G}) Vnew dh_cᵀ,
    dW = −dVnew h_cᵀ, and this K-block's share of dL/dG through O and the chunk-end state (dgp[K-block])."""
    i_c, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    DT: tl.constexpr = q.dtype.element_ty
    t0, nrows = _chunk(table, cu, i_c)
    rows, ok = tl.arange(0, 64), i_k * BK + tl.arange(0, BK)
    acc_q = tl.zeros([64, BK], dtype=tl.float32)
    acc_k = tl.zeros([64, BK], dtype=tl.float32)
    acc_w = tl.zeros([64, BK], dtype=tl.float32)
    dP = tl.zeros([64, 64], dtype=tl.float32)
    hdh = tl.zeros([BK], dtype=tl.float32)
    for vc in range(0, V, BV):
        ov = vc + tl.arange(0, BV)
        hb = _ld_s(hs, i_c.to(tl.int64), i_h, ok, ov, H, K, V)
        dhb = _ld_s(dhs, i_c.to(tl.int64), i_h, ok, ov, H, K, V)
        vnt = _ld(vn, t0, rows, nrows, i_h, ov, H, V)
        dob = _ld(do, t0, rows, nrows, i_h, ov, H, V)
        acc_w += _dot(_ld(dvn, t0, rows, nrows, i_h, ov, H, V), tl.trans(hb), DT)
        acc_q += _dot(dob, tl.trans(hb), DT)
        acc_k += _dot(vnt, tl.trans(dhb), DT)
        dP += _dot(dob, tl.trans(vnt), DT)
        hdh += tl.sum(hb.to(tl.float32) * dhb.to(tl.float32), 1)
    qt = _ld(q, t0, rows, nrows, i_h, ok, H, K)
    kt = _ld(k, t0, rows, nrows, i_h, ok, H, K)
    G, Gc, G_last = _gates(g, t0, nrows, i_h, H, HAS_G)
    dP *= _masked_exp(G[:, None] - G[None, :], rows[:, None] >= rows[None, :]) * scale
    acc_q *= (scale * tl.exp(G))[:, None]
    acc_k *= tl.exp(Gc)[:, None]
    _st(dq, t0, rows, nrows, i_h, ok, H, K, acc_q + _dot(dP, kt, DT))
    _st(dkp, t0, rows, nrows, i_h, ok, H, K, acc_k + _dot(tl.trans(dP), qt, DT))
    _st(dw, t0, rows, nrows, i_h, ok, H, K, -acc_w)
    if HAS_G:
        # O_i ∝ e^{G_i};  P_ij ∝ e^{G_i − G_j};  S_C ∝ e^{G_C} h_c + Σ_i e^{G_C − G_i} k_i Vnew_iᵀ
        X = dP * _dot(qt, tl.trans(kt), DT)
        kdk = tl.sum(kt.to(tl.float32) * acc_k, 1)
        dG = tl.sum(qt.to(tl.float32) * acc_q, 1) + tl.sum(X, 1) - tl.sum(X, 0) - kdk
        dG += tl.where(rows == nrows - 1, tl.sum(kdk, 0) + tl.exp(G_last) * tl.sum(hdh, 0), 0.0)
        _st_vec(dgp + i_k.to(tl.int64) * n_tokens * H, t0, nrows, i_h, H, dG)


@triton.jit
def _wy_bwd_kernel(
    k, v, beta, g, dvn, dw, dkp, dgp, dk, dv, dbeta, dg, table, cu, n_tokens,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, NK: tl.constexpr, BKC: tl.constexpr, BVC: tl.constexpr,
    HAS_G: tl.constexpr,
):
    """Back through U = T diag(β) V, W = T diag(βγ) K and T = (I + A)⁻¹ for one (chunk, head):
    dT = dU (diag(β) V)ᵀ + dW (diag(βγ) K)ᵀ, dA = −Tᵀ dT Tᵀ (strictly lower), Z = dA ⊙ diag(β) D;
    dv = diag(β) Tᵀ dU, dk = dk_direct + diag(βγ) Tᵀ dW + (Z + Zᵀ) K, dβ, and dg = the reverse
    cumulative sum over the chunk of dL/dG (with the _dqk_kernel partials)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    DT: tl.constexpr = k.dtype.element_ty
    t0, nrows = _chunk(table, cu, i_c)
    rows = tl.arange(0, 64)
    G, Gc, G_last = _gates(g, t0, nrows, i_h, H, HAS_G)
    b = _vec(beta, t0, nrows, i_h, H)
    bg = b * tl.exp(G)
    KKE, T = _wy_inverse(k, t0, nrows, i_h, G, b, H, K, BKC, DT)
    dT = tl.zeros([64, 64], dtype=tl.float32)
    db = tl.zeros([64], dtype=tl.float32)
    for vc in range(0, V, BVC):
        cols = vc + tl.arange(0, BVC)
        vt = _ld(v, t0, rows, nrows, i_h, cols, H, V)
        du = _ld(dvn, t0, rows, nrows, i_h, cols, H, V)
        dT += _dot(du, tl.trans(vt), DT) * b[None, :]
        x = _dot(tl.trans(T), du, DT)
        db += tl.sum(x * vt.to(tl.float32), 1)
        _st(dv, t0, rows, nrows, i_h, cols, H, V, x * b[:, None])
    for kc in range(0, K, BKC):
        kt = _ld(k, t0, rows, nrows, i_h, kc + tl.arange(0, BKC), H, K)
        dT += _dot(_ld(dw, t0, rows, nrows, i_h, kc + tl.arange(0, BKC), H, K), tl.trans(kt), DT) * bg[None, :]
    strict = rows[:, None] > rows[None, :]
    dA = tl.where(strict, -_dot(tl.trans(T), _dot(dT, tl.trans(T), DT), DT), 0.0)
    R = dA * KKE
    db += tl.sum(R, 1)
    Z = dA * b[:, None] * _masked_exp(G[:, None] - G[None, :], strict)
    Z += tl.trans(Z)
    dG = tl.sum(R * b[:, None], 1) - tl.sum(R * b[:, None], 0)
    for kc in range(0, K, BKC):
        cols = kc + tl.arange(0, BKC)
        kt = _ld(k, t0, rows, nrows, i_h, cols, H, K)
        x = _dot(tl.trans(T), _ld(dw, t0, rows, nrows, i_h, cols, H, K), DT)
        s = tl.sum(x * kt.to(tl.float32), 1)
        db += s * tl.exp(G)
        dG += s * bg
        x = _ld(dkp, t0, rows, nrows, i_h, cols, H, K) + x * bg[:, None] + _dot(Z, kt, DT)
        _st(dk, t0, rows, nrows, i_h, cols, H, K, x)
    _st_vec(dbeta, t0, nrows, i_h, H, db)
    if HAS_G:
        for i_k in range(NK):  # the _dqk_kernel partials, one [tokens, H] slice per K-block
            dG += _vec(dgp, t0, nrows, i_h, H)
            dgp += n_tokens * H
        dG = tl.cumsum(dG, 0, reverse=True)
        _st_vec(dg, t0, nrows, i_h, H, dG)


# ----------------------------------------------------------------------------- host side


@dataclass(frozen=True)
class _Chunks:
    """The packed token axis cut into chunks: sequences restart the chunking."""

    cu: Tensor  # int [N + 1]: first token of each sequence, then the total
    table: Tensor  # int32 [n_chunks, 2]: (sequence, chunk within it), sequences in order
    first: Tensor  # int32 [N]: global index of each sequence's first chunk
    n_seq: int
    n_chunks: int


def _chunks(batch: int, length: int, cu_seqlens: Optional[Tensor], device: torch.device) -> _Chunks:
    """Chunk table of a dense [batch, length] or a packed (cu_seqlens) batch; only the packed one syncs."""
    if cu_seqlens is None:
        per = triton.cdiv(length, CHUNK)
        idx = torch.arange(batch * per, dtype=torch.int32, device=device)
        seq = torch.arange(batch + 1, dtype=torch.int32, device=device)
        table = torch.stack((idx // max(per, 1), idx % max(per, 1)), 1)
        return _Chunks(seq * length, table, seq[:-1] * per, batch, batch * per)
    bounds = cu_seqlens.tolist()
    counts = [triton.cdiv(hi - lo, CHUNK) for lo, hi in zip(bounds, bounds[1:])]
    pairs = [(n, j) for n, c in enumerate(counts) for j in range(c)]
    firsts = [sum(counts[:n]) for n in range(len(counts))]
    table = torch.tensor(pairs, dtype=torch.int32).reshape(-1, 2).to(device)
    first = torch.tensor(firsts, dtype=torch.int32).to(device)
    return _Chunks(cu_seqlens, table, first, len(counts), len(pairs))


@dataclass(frozen=True)
class _Config:
    """Block sizes and launch options, from the problem shape only; chosen from the register and
    shared-memory figures of the sm_90 compile, not from timings (no GPU was at hand)."""

    BK: int  # K padded to a power of two: the serial kernels hold [BK, BV_STATE] fp32 state tiles
    BKC: int  # K step of the chunk-parallel kernels (and the K-block of _dqk_kernel)
    BVC: int  # V step of the chunk-parallel kernels
    BV_STATE: int  # V block of the serial kernels
    BV_OUT: int  # V block of _output_kernel and _dv_intra_kernel
    serial: dict  # launch options of the serial kernels
    parallel: dict  # launch options of the chunk-parallel kernels


def _config(K: int, V: int, dtype: torch.dtype, n_seq_heads: int) -> _Config:
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, triton.next_power_of_2(V))
    # serial kernels: one program per (sequence, head, V-block); V-blocks of 64 halve the waves of V-blocks
    # of 32 (two programs per SM fit either way), narrower ones only help while SMs would stay idle
    bv_state = min(BV, 64 if n_seq_heads * triton.cdiv(V, 64) >= _TARGET_SMS else 32)
    fp32 = dtype == torch.float32
    # fp32: without a register cap ptxas -O3 squeezes the exact-fp32 (FMA) products into 32 registers
    maxnreg = 255 if fp32 else None
    return _Config(
        BK=BK,
        BKC=min(BK, 64),
        BVC=min(BV, 64),
        BV_STATE=bv_state,
        BV_OUT=min(BV, 128),
        # double-buffered [64, 256] operand tiles overflow shared memory: the serial kernels load three
        serial=dict(num_warps=4 if BK * bv_state <= 128 * 64 and not fp32 else 8, num_stages=1 if BK > 128 else 2,
                    maxnreg=maxnreg),
        parallel=dict(num_warps=8, num_stages=1 if fp32 and BK > 128 else 2, maxnreg=maxnreg),
    )


def _wy_and_states(
    k: Tensor, v: Tensor, beta: Tensor, g: Optional[Tensor], h0: Optional[Tensor], ch: _Chunks, cfg: _Config
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward's first two launches: W, the chunk-start states h_c, Vnew and the final states."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    gate = dict(HAS_G=g is not None)
    g = beta if g is None else g  # never read without HAS_G
    w = torch.empty_like(k)
    u = torch.empty(B, T, H, V, dtype=torch.float32, device=k.device)
    if ch.n_chunks:
        grid = (ch.n_chunks, H)
        _launch(_wy_fwd_kernel, grid, k, v, beta, g, w, u, ch.table, ch.cu,
                H=H, K=K, V=V, BKC=cfg.BKC, BVC=cfg.BVC, **gate, **cfg.parallel)
    hs = torch.empty(ch.n_chunks, H, K, V, dtype=k.dtype, device=k.device)
    vn = torch.empty(B, T, H, V, dtype=k.dtype, device=k.device)
    ht = torch.empty(ch.n_seq, H, K, V, dtype=torch.float32, device=k.device)
    if ch.n_seq:
        grid = (ch.n_seq * H * triton.cdiv(V, cfg.BV_STATE),)
        _launch(_state_fwd_kernel, grid, k, w, u, g, ht if h0 is None else h0, hs, vn, ht, ch.cu, ch.first,
                H=H, K=K, V=V, BK=cfg.BK, BV=cfg.BV_STATE, HAS_H0=h0 is not None, **gate, **cfg.serial)
    return w, hs, vn, ht


@on_input_device
def delta_rule_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Optional[Tensor],
    initial_state: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Chunked delta rule forward: (o [B, T, H, V] in q's dtype, final state [N, H, K, V] fp32)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    ch = _chunks(B, T, cu_seqlens, q.device)
    cfg = _config(K, V, q.dtype, ch.n_seq * H)
    _, hs, vn, ht = _wy_and_states(k, v, beta, g, initial_state, ch, cfg)
    o = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
    if ch.n_chunks:
        grid = (ch.n_chunks, H, triton.cdiv(V, cfg.BV_OUT))
        _launch(_output_kernel, grid, q, k, vn, hs, beta if g is None else g, o, ch.table, ch.cu, float(scale),
                H=H, K=K, V=V, BKC=cfg.BKC, BV=cfg.BV_OUT, HAS_G=g is not None, **cfg.parallel)
    return o, ht


@on_input_device
def delta_rule_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Optional[Tensor],
    initial_state: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    scale: float,
    do: Tensor,
    dht: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Gradients (dq, dk, dv, dbeta, dg or None, dh0 or None) of the forward for upstream do and dht (None: 0)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    ch = _chunks(B, T, cu_seqlens, q.device)
    cfg = _config(K, V, q.dtype, ch.n_seq * H)
    w, hs, vn, _ = _wy_and_states(k, v, beta, g, initial_state, ch, cfg)
    NK = triton.cdiv(K, cfg.BKC)
    f32 = dict(dtype=torch.float32, device=q.device)
    dvi, dkp = torch.empty(B, T, H, V, **f32), torch.empty(B, T, H, K, **f32)
    dgp = dkp if g is None else torch.empty(NK, B, T, H, **f32)
    dhs, dvn, dw = torch.empty_like(hs), torch.empty_like(vn), torch.empty_like(w)
    dq, dk, dv, dbeta = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(beta)
    dg = None if g is None else torch.empty_like(g)
    dh0 = None if initial_state is None else torch.empty(ch.n_seq, H, K, V, **f32)
    gate = dict(HAS_G=g is not None)
    g, dg_out = (beta, dbeta) if g is None else (g, dg)  # never touched without HAS_G

    if ch.n_chunks:
        grid = (ch.n_chunks, H, triton.cdiv(V, cfg.BV_OUT))
        _launch(_dv_intra_kernel, grid, q, k, do, g, dvi, ch.table, ch.cu, float(scale),
                H=H, K=K, V=V, BKC=cfg.BKC, BV=cfg.BV_OUT, **gate, **cfg.parallel)
    if ch.n_seq:
        grid = (ch.n_seq * H * triton.cdiv(V, cfg.BV_STATE),)
        _launch(_state_bwd_kernel, grid, q, k, w, do, dvi, g, dhs if dht is None else dht,
                dhs if dh0 is None else dh0, dhs, dvn, ch.cu, ch.first, float(scale),
                H=H, K=K, V=V, BK=cfg.BK, BV=cfg.BV_STATE, HAS_DHT=dht is not None, HAS_H0=dh0 is not None,
                **gate, **cfg.serial)
    if ch.n_chunks:
        _launch(_dqk_kernel, (ch.n_chunks, H, NK), q, k, vn, dvn, do, hs, dhs, g, dq, dkp, dw, dgp,
                ch.table, ch.cu, float(scale), B * T,
                H=H, K=K, V=V, BK=cfg.BKC, BV=cfg.BVC, **gate, **cfg.parallel)
        _launch(_wy_bwd_kernel, (ch.n_chunks, H), k, v, beta, g, dvn, dw, dkp, dgp, dk, dv, dbeta, dg_out,
                ch.table, ch.cu, B * T,
                H=H, K=K, V=V, NK=NK, BKC=cfg.BKC, BVC=cfg.BVC, **gate, **cfg.parallel)
    return dq, dk, dv, dbeta, dg, dh0
