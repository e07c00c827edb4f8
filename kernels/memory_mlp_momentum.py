"""Triton kernel of ``memory_mlp_momentum``: one deep-momentum step of a tensor group through one bucket memory.

Rule of :mod:`nested_learning.reference.memory_mlp_momentum`. Every tensor (n elements) is cut into ⌈n/S⌉ block
rows x = [g_b ; m_b] ∈ R^{2S} (g = u + λW, zero-padded tail); the memory is, per row::

    a = W1 x + b1;  â = (a − μ(a))·r, r = 1/√(σ²(a) + ε);  z = γ⊙â + β;  s = z·sigmoid(z);  o = W2 s + b2

and ℓ's gradient in o (on the tensor's n real coordinates) is dO = α·g + β·o + κ·(o − o_prev) + ε·e with per-tensor
scalars (``surrogate``: α, β from ‖o‖, ‖g‖, ⟨o, g⟩ and κ = 0.2·s/n where o_prev exists; ``dot``: α = −s;
``l2_regression``: ε = 2s/n, e = o − P g). The backward through the memory is linear in dO, so its W2ᵀ-reduction
ds = W2ᵀ dO = α·W2ᵀg + β·W2ᵀo + κ·W2ᵀ(o − o_prev) + ε·W2ᵀe is assembled from h-vectors that the forward pass
computes before the scalars are known. Hence two passes over the tensors' memory and three small kernels:

1. ``_forward_kernel`` (one program per tile of BM block rows; K loop over the S coordinates, then N loop): reads
   u, W (with λ ≠ 0), m and o_prev; A = X W1ᵀ, W2ᵀg, W2ᵀo_prev on the tensor cores, LayerNorm + SiLU in registers,
   O = S W2ᵀ tile by tile for ‖o‖² and W2ᵀo (``l2_regression``: T = G Pᵀ, e = o − t stored, W2ᵀe); stores per row
   a and the h-vectors, and per row the partial sums ‖o‖², ‖g‖², ⟨o, g⟩ = s·W2ᵀg + b2·g, ‖e‖².
2. ``_tensor_kernel`` (one program per tensor, in fp64): the tensor's sums in a fixed order (deterministic), its
   loss and coefficients α, β, κ, ε and its projection weight λ_P/‖g‖². With one coordinate the cosine is exactly
   ±1 and its gradient exactly 0, and they are set so: from ⟨o, g⟩ above, α·W2ᵀg + β·W2ᵀo would leave a cancellation
   residue there (the rounded o and ⟨o, g⟩ do not come from one product).
3. ``_hidden_kernel`` (per tile): s, and da = r(dâ − mean(dâ) − â·mean(dâ⊙â)) with dâ = γ⊙dz,
   dz = ds ⊙ σ(z)(1 + z(1 − σ(z))); per-tile partial sums of dγ, dβ, db1.
4. ``_projection_kernel`` (``l2_regression`` only; grid: [BP, BP] tiles of P × splits of the block rows, about two
   programs per SM in all): partial sums of Σ_b w_b e_b g_bᵀ, added into P after the launch in split order (P is
   read only by pass 1). At S = 64 P is one tile: the row splits are what keeps the GPU busy.
5. ``_backward_kernel`` (grid: S-coordinate chunks × splits of the block rows; output-stationary): per tile of rows
   recomputes Oᵀ = W2c sᵀ for its BC coordinates, forms dO, accumulates dW2c += dOᵀ s, (dW1 columns)ᵀ += Gᵀ da and
   Mᵀ da, db2 += Σ dO in registers, and updates m ← μm + o, W ← W − lr·m (fp32, rounded once), o_prev ← o.
   Each program writes its partial sums once (no atomics), plus the loss's 0.1·s·Σ(o − o_prev)²/n part.
6. ``_reduce_kernel``: weight_grads += Σ of the partials in a fixed order; the loss s·Σℓ.

So 5 launches (6 with ``l2_regression``) per call, whatever the number of tensors. Memory traffic per element: pass 1
reads u, m (+ W when λ ≠ 0, + o_prev for the surrogate's gradient when some tensor has one), pass 2 reads u, W, m
(+ o_prev) and writes m, W, o_prev; per block row only 1–4 h-vectors and 4 sums go through memory between the passes
(no O buffer: pass 2 recomputes O from s with one h-deep product). ``l2_regression`` also writes and reads e
(fp32, one value per coordinate) and its targets and P update cost 2S products per coordinate each.

Tensors: the group's tensors are separate allocations, reached through a device table of their data pointers
(int64 rows: u, W, m, o_prev, n, has_prev, first full block, tail block) that the kernels load and cast to
pointers (zero-copy; works under the interpreter too). Block rows are numbered full blocks first (tensor by tensor),
then the tails; tiles made of full blocks only take an unmasked-column path (vectorized loads), the others mask
per row. The block list is cached by the tensors' sizes, the pointer table by their pointers and has_prev too.

Precision: states, memory weights, all intermediates and accumulators are fp32; the products run on the bf16
tensor cores with fp32 operands split into bf16 parts (Triton's "bf16x3" for bf16 parameters: about 16 significant
bits per operand, "bf16x6" for fp32 and fp16 parameters: about fp32). tf32 (10-bit mantissas) is not enough: the
memory gradients are sums over all block rows with heavy cancellation (per-tensor gradients of random sign), which
magnified tf32's 5e-4 operand rounding to 6 × the bf16 budget of the test rule on the benchmark's bf16 check case
(bf16x3: 0.03 ×). Under the interpreter the kernels split the operands themselves, so the tests see the GPU's
operand rounding (not its accumulation order).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference.memory_mlp_momentum import LOSSES, NORM_EPS, Hyper
from ._common import INTERPRET as _INTERPRET
from ._common import launch as _launch
from ._common import on_input_device
from ._common import round_to as _to

__all__ = ["MAX_HIDDEN", "memory_mlp_momentum"]

MAX_HIDDEN = 256  # largest memory width h (one h-row lives in registers)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_LOSS = {name: i for i, name in enumerate(LOSSES)}  # surrogate 0, l2_regression 1, dot 2
_SURROGATE, _L2, _DOT = _LOSS["surrogate"], _LOSS["l2_regression"], _LOSS["dot"]
_CACHE_SIZE = 16

assert (_SURROGATE, _L2, _DOT) == (0, 1, 2)


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _bf16(x):
    """x (fp32) rounded to bf16 to nearest even, back in fp32."""
    return _to(x, tl.bfloat16).to(tl.float32)


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    """a @ b with fp32 accumulation; the fp32 operands enter the products as PREC says: 0 exact fp32 ("ieee", CUDA
    cores), 1 "bf16x3" (hi + mid bf16 parts; hi·mid + mid·hi + hi·hi: about 16 significant bits), 2 "bf16x6" (hi,
    mid, lo parts, six products: about fp32), both on the bf16 tensor cores. The interpreter multiplies in full fp32,
    so there the operands are split by hand as the GPU compiler splits them (round to nearest)."""
    a = a.to(tl.float32)
    b = b.to(tl.float32)
    if PREC == 0:
        out = tl.dot(a, b, input_precision="ieee")
    elif not _INTERPRET:
        if PREC == 1:
            out = tl.dot(a, b, input_precision="bf16x3")
        else:
            out = tl.dot(a, b, input_precision="bf16x6")
    else:
        a_hi = _bf16(a)
        b_hi = _bf16(b)
        a_mid = _bf16(a - a_hi)
        b_mid = _bf16(b - b_hi)
        out = tl.dot(a_mid, b_hi, input_precision="ieee")
        out = tl.dot(a_hi, b_mid, out, input_precision="ieee")
        if PREC == 2:
            a_lo = _bf16(a - a_hi - a_mid)
            b_lo = _bf16(b - b_hi - b_mid)
            out = tl.dot(a_mid, b_mid, out, input_precision="ieee")
            out = tl.dot(a_lo, b_hi, out, input_precision="ieee")
            out = tl.dot(a_hi, b_lo, out, input_precision="ieee")
        out = tl.dot(a_hi, b_hi, out, input_precision="ieee")
    return out


@triton.jit
def _block_rows(blk, tab, rows, NB, S: tl.constexpr):
    """(valid, tensor id, block index in the tensor, real coordinates) of block rows ``rows`` (int64)."""
    valid = rows < NB
    tid = tl.load(blk + rows * 2, mask=valid, other=0).to(tl.int64)
    kb = tl.load(blk + rows * 2 + 1, mask=valid, other=0).to(tl.int64)
    n = tl.load(tab + tid * 8 + 4)
    return valid, tid, kb, tl.where(valid, tl.minimum(n - kb * S, S), 0)


@triton.jit
def _row_ptr(tab, tid, kb, FIELD: tl.constexpr, DT: tl.constexpr, S: tl.constexpr, ALIGN: tl.constexpr):
    """Pointers (element type DT) to the first coordinate of each row's block in the tensor of table column FIELD."""
    addr = tl.load(tab + tid * 8 + FIELD)
    if ALIGN > 1:
        addr = tl.multiple_of(addr, ALIGN)
    return addr.to(tl.pointer_type(DT)) + kb * S


@triton.jit
def _cmask(lens, cols, FULL: tl.constexpr, S: tl.constexpr, T: tl.constexpr):
    """Mask of the tile (rows × cols, or cols × rows with T) of block rows with ``lens`` real coordinates; a FULL
    tile holds full blocks only, so its mask is per column and constant along rows (vectorized access)."""
    if FULL:
        m = cols < S
        if T:
            out = m[:, None]
        else:
            out = m[None, :]
    else:
        if T:
            out = cols[:, None] < lens[None, :]
        else:
            out = cols[None, :] < lens[:, None]
    return out


@triton.jit
def _tile_ptr(rowp, cols, T: tl.constexpr):
    if T:
        out = rowp[None, :] + cols[:, None]
    else:
        out = rowp[:, None] + cols[None, :]
    return out


@triton.jit
def _load_g(gp, pp, cols, mask, weight_decay, WD: tl.constexpr, T: tl.constexpr):
    """g = u + λ·W on the tile (fp32; 0 outside the mask)."""
    g = tl.load(_tile_ptr(gp, cols, T), mask=mask, other=0.0).to(tl.float32)
    if WD:
        g += weight_decay * tl.load(_tile_ptr(pp, cols, T), mask=mask, other=0.0).to(tl.float32)
    return g


@triton.jit
def _ln_silu(a, gam, bet, hh, H: tl.constexpr, ln_eps):
    """(â, r, z, sigmoid(z), s) of pre-activations a [rows, HP] (columns ≥ H are padding and come out 0)."""
    hm = (hh < H)[None, :]
    mu = tl.sum(tl.where(hm, a, 0.0), 1) / H
    d = tl.where(hm, a - mu[:, None], 0.0)
    r = 1.0 / tl.sqrt(tl.sum(d * d, 1) / H + ln_eps)
    ah = d * r[:, None]
    z = ah * tl.load(gam + hh, mask=hh < H, other=0.0)[None, :] + tl.load(bet + hh, mask=hh < H, other=0.0)[None, :]
    sg = tl.sigmoid(z)
    return ah, r, z, sg, z * sg


@triton.jit
def _weight_tile(w, rows, hh, n_rows, H: tl.constexpr):
    """w[rows, hh] of a row-major [n_rows, H] weight, zeros outside."""
    return tl.load(w + rows[:, None] * H + hh[None, :], mask=(rows < n_rows)[:, None] & (hh < H)[None, :], other=0.0)


# ----------------------------------------------------------------------------- pass 1: forward


@triton.jit
def _forward_tile(
    tab, blk, w1, b1, gam, bet, w2, b2, proj, vecs, bsc, err, rows, NB, weight_decay, ln_eps,
    S: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, NV: tl.constexpr, PDT: tl.constexpr, LOSS: tl.constexpr,
    GRAD: tl.constexpr, PREV: tl.constexpr, WD: tl.constexpr, PREC: tl.constexpr, ALIGN: tl.constexpr,
    FULL: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    valid, tid, kb, lens = _block_rows(blk, tab, rows, NB, S)
    gp = _row_ptr(tab, tid, kb, 0, PDT, S, ALIGN)
    pp = _row_ptr(tab, tid, kb, 1, PDT, S, ALIGN)
    mp = _row_ptr(tab, tid, kb, 2, tl.float32, S, ALIGN)
    vp = _row_ptr(tab, tid, kb, 3, tl.float32, S, ALIGN)
    has_prev = tl.load(tab + tid * 8 + 5) != 0
    hh = tl.arange(0, HP)
    ks = tl.arange(0, BK)
    acc_a = tl.zeros((BM, HP), dtype=tl.float32)  # W1 x
    acc_q = tl.zeros((BM, HP), dtype=tl.float32)  # W2ᵀ g
    acc_p = tl.zeros((BM, HP), dtype=tl.float32)  # W2ᵀ o_prev
    acc_r = tl.zeros((BM, HP), dtype=tl.float32)  # W2ᵀ o (surrogate) or W2ᵀ e (l2_regression)
    gg = tl.zeros((BM,), dtype=tl.float32)
    gb = tl.zeros((BM,), dtype=tl.float32)
    oo = tl.zeros((BM,), dtype=tl.float32)
    ee = tl.zeros((BM,), dtype=tl.float32)
    for k0 in range(0, S, BK):
        cols = k0 + ks
        mask = _cmask(lens, cols, FULL, S, False)
        g = _load_g(gp, pp, cols, mask, weight_decay, WD, False)
        m = tl.load(_tile_ptr(mp, cols, False), mask=mask, other=0.0)
        w1t = w1 + hh[None, :] * (2 * S) + cols[:, None]  # W1ᵀ rows k0.., [BK, HP]
        w1m = (cols < S)[:, None] & (hh < H)[None, :]
        acc_a += _mm(g, tl.load(w1t, mask=w1m, other=0.0), PREC)
        acc_a += _mm(m, tl.load(w1t + S, mask=w1m, other=0.0), PREC)
        if LOSS != 1:
            w2k = _weight_tile(w2, cols, hh, S, H)
            acc_q += _mm(g, w2k, PREC)
            gb += tl.sum(g * tl.load(b2 + cols, mask=cols < S, other=0.0)[None, :], 1)
            if PREV:
                v = tl.load(_tile_ptr(vp, cols, False), mask=mask & has_prev[:, None], other=0.0)
                acc_p += _mm(v, w2k, PREC)
        if LOSS != 2:
            gg += tl.sum(g * g, 1)
    a = acc_a + tl.load(b1 + hh, mask=hh < H, other=0.0)[None, :]
    vb = vecs + rows[:, None] * (NV * HP) + hh[None, :]
    vm = valid[:, None]
    tl.store(vb, a, mask=vm)  # stored before the N loop: fewer live registers there
    if GRAD:
        if LOSS != 1:
            tl.store(vb + HP, acc_q, mask=vm)
        if PREV:
            tl.store(vb + 3 * HP, acc_p, mask=vm)
    ah, r, z, sg, s = _ln_silu(a, gam, bet, hh, H, ln_eps)
    c = tl.sum(s * acc_q, 1) + gb  # ⟨o, g⟩ = s·W2ᵀg + b2·g (g is 0 past the tensor's end)
    if LOSS != 2:
        ns = tl.arange(0, BN)
        for n0 in range(0, S, BN):
            cols = n0 + ns
            mask = _cmask(lens, cols, FULL, S, False)
            w2n = _weight_tile(w2, cols, hh, S, H)  # [BN, HP]
            o = _mm(s, tl.trans(w2n), PREC) + tl.load(b2 + cols, mask=cols < S, other=0.0)[None, :]
            o = tl.where(mask, o, 0.0)
            if LOSS == 0:
                oo += tl.sum(o * o, 1)
                if GRAD:
                    acc_r += _mm(o, w2n, PREC)
            else:
                t = tl.zeros((BM, BN), dtype=tl.float32)  # targets P g (P as the call started)
                for k0 in range(0, S, BK):
                    kc = k0 + ks
                    g = _load_g(gp, pp, kc, _cmask(lens, kc, FULL, S, False), weight_decay, WD, False)
                    pt = tl.load(proj + cols[None, :] * S + kc[:, None], mask=(kc < S)[:, None] & (cols < S)[None, :],
                                 other=0.0)  # fmt: skip
                    t += _mm(g, pt, PREC)
                e = tl.where(mask, o - t, 0.0)
                ee += tl.sum(e * e, 1)
                tl.store(err + rows[:, None] * S + cols[None, :], e, mask=valid[:, None] & (cols < S)[None, :])
                if GRAD:
                    acc_r += _mm(e, w2n, PREC)
    if GRAD:
        if LOSS == 0:
            tl.store(vb + 2 * HP, acc_r, mask=vm)
        elif LOSS == 1:
            tl.store(vb + HP, acc_r, mask=vm)
    sb = bsc + rows * 4
    tl.store(sb, oo, mask=valid)
    tl.store(sb + 1, gg, mask=valid)
    tl.store(sb + 2, c, mask=valid)
    tl.store(sb + 3, ee, mask=valid)


@triton.jit
def _forward_kernel(
    tab, blk, w1, b1, gam, bet, w2, b2, proj, vecs, bsc, err, NB, NF, weight_decay, ln_eps,
    S: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, NV: tl.constexpr, PDT: tl.constexpr, LOSS: tl.constexpr,
    GRAD: tl.constexpr, PREV: tl.constexpr, WD: tl.constexpr, PREC: tl.constexpr, ALIGN: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """Per tile of BM block rows: a, the h-vectors (W2ᵀg | W2ᵀo or W2ᵀe | W2ᵀo_prev) and the row sums
    (‖o‖², ‖g‖², ⟨o, g⟩, ‖e‖²); ``l2_regression`` also stores e = o − P g."""
    tile = tl.program_id(0).to(tl.int64)
    rows = tile * BM + tl.arange(0, BM)
    if (tile + 1) * BM <= NF:
        _forward_tile(tab, blk, w1, b1, gam, bet, w2, b2, proj, vecs, bsc, err, rows, NB, weight_decay, ln_eps,
                      S, H, HP, NV, PDT, LOSS, GRAD, PREV, WD, PREC, ALIGN, True, BM, BK, BN)  # fmt: skip
    else:
        _forward_tile(tab, blk, w1, b1, gam, bet, w2, b2, proj, vecs, bsc, err, rows, NB, weight_decay, ln_eps,
                      S, H, HP, NV, PDT, LOSS, GRAD, PREV, WD, PREC, ALIGN, False, BM, BK, BN)  # fmt: skip


# ----------------------------------------------------------------------------- per-tensor scalars


@triton.jit
def _tensor_kernel(
    tab, bsc, coef, closs, scale, projection_lr, S: tl.constexpr, LOSS: tl.constexpr, EPS: tl.constexpr,
    BLK: tl.constexpr,
):  # fmt: skip
    """One tensor: its row sums (full blocks in order, then the tail), its loss s·ℓ (without the o_prev term, into
    closs) and its coefficients α, β, κ, ε, λ_P/‖g‖² (into coef). This scalar tail runs in fp64: a few flops per
    tensor, and the returned loss keeps only the roundings of the row sums."""
    t = tl.program_id(0).to(tl.int64)
    row = tab + t * 8
    n = tl.load(row + 4)
    first = tl.load(row + 6)
    tail = tl.load(row + 7)
    nf = n // S
    q = tl.arange(0, 4)
    bs = tl.arange(0, BLK)
    acc = tl.zeros((BLK, 4), dtype=tl.float64)
    for b0 in range(0, nf, BLK):
        b = b0 + bs
        acc += tl.load(bsc + (first + b)[:, None] * 4 + q[None, :], mask=(b < nf)[:, None], other=0.0).to(tl.float64)
    sums = tl.sum(acc, 0) + tl.load(bsc + tail * 4 + q, mask=(q < 4) & (tail >= 0), other=0.0).to(tl.float64)
    scale = scale + tl.zeros((), dtype=tl.float64)  # fp64 (a float argument is fp32 on the GPU)
    oo = tl.sum(tl.where(q == 0, sums, 0.0))
    gg = tl.sum(tl.where(q == 1, sums, 0.0))
    c = tl.sum(tl.where(q == 2, sums, 0.0))
    ee = tl.sum(tl.where(q == 3, sums, 0.0))
    nr = n.to(tl.float64)
    zero = oo * 0.0
    alpha, beta, kappa, eps, wp = zero, zero, zero, zero, zero
    if LOSS == 0:
        on = tl.sqrt(oo)
        gn = tl.sqrt(gg)
        cos_on = (on > EPS) & (gn > EPS)
        g_on = gn > EPS
        inv = tl.where(cos_on, 1.0 / (on * gn), 0.0)
        ratio = tl.where(g_on, on / tl.where(g_on, gn, 1.0), 0.0) - 1.0
        # ⟨o, g⟩ comes from s·W2ᵀg + b2·g, not from the rounded o: with one coordinate, where the cosine is exactly
        # ±1 and its gradient −(g − (c/‖o‖²)·o)/(‖o‖‖g‖) exactly 0, both are set so (no cancellation residue)
        one = n == 1
        cos = tl.where(one, tl.where(c > 0.0, 1.0, -1.0), c * inv)
        loss = tl.where(cos_on, 1.0 - cos, 0.0) + tl.where(g_on, 0.1 * ratio * ratio, 0.1 * oo)
        grad_cos = cos_on & (n != 1)
        alpha = tl.where(grad_cos, -scale * inv, 0.0)
        mag = tl.where(g_on, tl.where(on > 0.0, 0.2 * ratio / tl.where(on > 0.0, on * gn, 1.0), 0.0), 0.2)
        beta = scale * (tl.where(grad_cos, c * inv / tl.where(cos_on, oo, 1.0), 0.0) + mag)
        kappa = tl.where(tl.load(row + 5) != 0, 0.2 * scale / nr, 0.0)
    elif LOSS == 1:
        loss = ee / nr
        eps = 2.0 * scale / nr
        wp = tl.where(gg > EPS, (projection_lr + tl.zeros((), dtype=tl.float64)) / tl.where(gg > EPS, gg, 1.0), 0.0)
    else:
        loss = -c
        alpha = zero - scale
    cb = coef + t * 8
    tl.store(cb + 0, alpha)
    tl.store(cb + 1, beta)
    tl.store(cb + 2, kappa)
    tl.store(cb + 3, eps)
    tl.store(cb + 4, wp)
    tl.store(closs + t, loss * scale)


# ----------------------------------------------------------------------------- hidden layer backward


@triton.jit
def _hidden_kernel(
    blk, coef, vecs, hpart, gam, bet, NB, ln_eps, H: tl.constexpr, HP: tl.constexpr, NV: tl.constexpr,
    LOSS: tl.constexpr, GRAD: tl.constexpr, PREV: tl.constexpr, BM: tl.constexpr,
):  # fmt: skip
    """Per tile: a → s (in place), and with GRAD ds → da (in place of the first h-vector), plus the tile's
    partial sums of dγ = Σ dz⊙â, dβ = Σ dz, db1 = Σ da."""
    tile = tl.program_id(0).to(tl.int64)
    rows = tile * BM + tl.arange(0, BM)
    valid = rows < NB
    hh = tl.arange(0, HP)
    vb = vecs + rows[:, None] * (NV * HP) + hh[None, :]
    vm = valid[:, None]
    ah, r, z, sg, s = _ln_silu(tl.load(vb, mask=vm, other=0.0), gam, bet, hh, H, ln_eps)
    tl.store(vb, s, mask=vm)
    if GRAD:
        cb = coef + tl.load(blk + rows * 2, mask=valid, other=0).to(tl.int64) * 8
        v1 = tl.load(vb + HP, mask=vm, other=0.0)
        if LOSS == 0:
            ds = tl.load(cb + 0)[:, None] * v1
            v2 = tl.load(vb + 2 * HP, mask=vm, other=0.0)
            ds += tl.load(cb + 1)[:, None] * v2
            if PREV:
                ds += tl.load(cb + 2)[:, None] * (v2 - tl.load(vb + 3 * HP, mask=vm, other=0.0))
        elif LOSS == 1:
            ds = tl.load(cb + 3)[:, None] * v1
        else:
            ds = tl.load(cb + 0)[:, None] * v1
        hm = vm & (hh < H)[None, :]
        dz = tl.where(hm, ds * sg * (1.0 + z * (1.0 - sg)), 0.0)
        dah = dz * tl.load(gam + hh, mask=hh < H, other=0.0)[None, :]
        m1 = tl.sum(dah, 1) / H
        m2 = tl.sum(dah * ah, 1) / H
        da = tl.where(hm, r[:, None] * (dah - m1[:, None] - ah * m2[:, None]), 0.0)
        tl.store(vb + HP, da, mask=vm)
        hb = hpart + tile * (3 * HP) + hh
        tl.store(hb, tl.sum(dz * ah, 0))
        tl.store(hb + HP, tl.sum(dz, 0))
        tl.store(hb + 2 * HP, tl.sum(da, 0))


# ----------------------------------------------------------------------------- l2_regression: P update


@triton.jit
def _projection_tile(
    tab, blk, coef, err, rows, ii, jj, acc, NB, weight_decay, S: tl.constexpr, PDT: tl.constexpr, WD: tl.constexpr,
    PREC: tl.constexpr, ALIGN: tl.constexpr, FULL: tl.constexpr,
):  # fmt: skip
    valid, tid, kb, lens = _block_rows(blk, tab, rows, NB, S)
    gp = _row_ptr(tab, tid, kb, 0, PDT, S, ALIGN)
    pp = _row_ptr(tab, tid, kb, 1, PDT, S, ALIGN)
    w = tl.load(coef + tid * 8 + 4)  # λ_P/‖g‖² of the row's tensor (0 when ‖g‖² ≤ 1e-8)
    e = tl.load(err + rows[:, None] * S + ii[None, :], mask=valid[:, None] & (ii < S)[None, :], other=0.0)
    g = _load_g(gp, pp, jj, _cmask(lens, jj, FULL, S, False), weight_decay, WD, False)
    return acc + _mm(tl.trans(e * w[:, None]), g, PREC)


@triton.jit
def _projection_kernel(
    tab, blk, coef, err, part, NB, NF, per_split, weight_decay, S: tl.constexpr, PDT: tl.constexpr, WD: tl.constexpr,
    PREC: tl.constexpr, ALIGN: tl.constexpr, BP: tl.constexpr, BB: tl.constexpr,
):  # fmt: skip
    """part[split][tile] = Σ_b w_b e_b g_bᵀ over the block rows of row tiles [split · per_split, …) (summed into P
    after the launch)."""
    ii = tl.program_id(0) * BP + tl.arange(0, BP)
    jj = tl.program_id(1) * BP + tl.arange(0, BP)
    split = tl.program_id(2)
    acc = tl.zeros((BP, BP), dtype=tl.float32)
    for tile in range(split * per_split, tl.minimum((split + 1) * per_split, tl.cdiv(NB, BB))):
        rows = tile * BB + tl.arange(0, BB).to(tl.int64)
        if (tile + 1) * BB <= NF:
            acc = _projection_tile(tab, blk, coef, err, rows, ii, jj, acc, NB, weight_decay, S, PDT, WD, PREC, ALIGN,
                                   True)  # fmt: skip
        else:
            acc = _projection_tile(tab, blk, coef, err, rows, ii, jj, acc, NB, weight_decay, S, PDT, WD, PREC, ALIGN,
                                   False)  # fmt: skip
    mask = (ii < S)[:, None] & (jj < S)[None, :]
    tl.store(part + split.to(tl.int64) * S * S + ii[:, None] * S + jj[None, :], acc, mask=mask)


# ----------------------------------------------------------------------------- pass 2: backward + update


@triton.jit
def _backward_tile(
    tab, blk, coef, vecs, err, w2c, b2c, cols, rows, acc_w2, acc_g, acc_m, acc_b2, acc_l, NB, lr, momentum,
    weight_decay, S: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, NV: tl.constexpr, PDT: tl.constexpr,
    LOSS: tl.constexpr, GRAD: tl.constexpr, PREV: tl.constexpr, WD: tl.constexpr, PREC: tl.constexpr,
    ALIGN: tl.constexpr, FULL: tl.constexpr,
):  # fmt: skip
    """One tile of block rows × the program's BC coordinates, in coordinate-major layout [BC, BB]."""
    valid, tid, kb, lens = _block_rows(blk, tab, rows, NB, S)
    gp = _row_ptr(tab, tid, kb, 0, PDT, S, ALIGN)
    pp = _row_ptr(tab, tid, kb, 1, PDT, S, ALIGN)
    mp = _row_ptr(tab, tid, kb, 2, tl.float32, S, ALIGN)
    vp = _row_ptr(tab, tid, kb, 3, tl.float32, S, ALIGN)
    mask = _cmask(lens, cols, FULL, S, True)
    hh = tl.arange(0, HP)
    vb = vecs + rows[:, None] * (NV * HP) + hh[None, :]
    s = tl.load(vb, mask=valid[:, None], other=0.0)  # [BB, HP]
    o = _mm(w2c, tl.trans(s), PREC) + b2c[:, None]  # [BC, BB]
    m = tl.load(_tile_ptr(mp, cols, True), mask=mask, other=0.0)
    p = tl.load(_tile_ptr(pp, cols, True), mask=mask, other=0.0).to(tl.float32)
    cb = coef + tid * 8
    if PREV:
        pmask = mask & (tl.load(tab + tid * 8 + 5) != 0)[None, :]
        v = tl.load(_tile_ptr(vp, cols, True), mask=pmask, other=0.0)
        kappa = tl.load(cb + 2)
        dv = tl.where(pmask, o - v, 0.0)
        acc_l += tl.sum(dv * dv, 0) * (0.5 * kappa)  # 0.1·s·Σ(o − o_prev)²/n
    if GRAD:
        g = tl.load(_tile_ptr(gp, cols, True), mask=mask, other=0.0).to(tl.float32)
        if WD:
            g += weight_decay * p
        if LOSS == 0:
            do = tl.load(cb + 0)[None, :] * g + tl.load(cb + 1)[None, :] * o
            if PREV:
                do += kappa[None, :] * dv
        elif LOSS == 1:
            e = tl.load(err + rows[None, :] * S + cols[:, None], mask=valid[None, :] & (cols < S)[:, None], other=0.0)
            do = tl.load(cb + 3)[None, :] * e
        else:
            do = tl.load(cb + 0)[None, :] * g
        do = tl.where(mask, do, 0.0)
        acc_w2 += _mm(do, s, PREC)
        acc_b2 += tl.sum(do, 1)
        da = tl.load(vb + HP, mask=valid[:, None], other=0.0)  # [BB, HP]
        acc_g += _mm(g, da, PREC)
        acc_m += _mm(m, da, PREC)
    m = m * momentum + o
    tl.store(_tile_ptr(mp, cols, True), m, mask=mask)
    tl.store(_tile_ptr(pp, cols, True), _to(p - lr * m, PDT), mask=mask)
    tl.store(_tile_ptr(vp, cols, True), o, mask=mask)
    return acc_w2, acc_g, acc_m, acc_b2, acc_l


@triton.jit
def _backward_kernel(
    tab, blk, coef, vecs, err, w2, b2, part, lpart, NB, NF, tiles_per_split, lr, momentum, weight_decay,
    S: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, NV: tl.constexpr, PDT: tl.constexpr, LOSS: tl.constexpr,
    GRAD: tl.constexpr, PREV: tl.constexpr, WD: tl.constexpr, PREC: tl.constexpr, ALIGN: tl.constexpr,
    BB: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    """Program (j, split): coordinates j·BC.. of every block row in the split's tiles. Accumulates
    dW2[cols] += dOᵀ s, dW1[:, cols]ᵀ += Gᵀ da, dW1[:, S + cols]ᵀ += Mᵀ da, db2[cols] += Σ dO, updates m, W, o_prev,
    and writes its partial sums to part[split] (same layout as w1 | w2 | b2) and lpart[split, j]."""
    j = tl.program_id(0)
    sp = tl.program_id(1)
    cols = j * BC + tl.arange(0, BC)
    hh = tl.arange(0, HP)
    w2c = _weight_tile(w2, cols, hh, S, H)  # [BC, HP]
    b2c = tl.load(b2 + cols, mask=cols < S, other=0.0)
    acc_w2 = tl.zeros((BC, HP), dtype=tl.float32)
    acc_g = tl.zeros((BC, HP), dtype=tl.float32)
    acc_m = tl.zeros((BC, HP), dtype=tl.float32)
    acc_b2 = tl.zeros((BC,), dtype=tl.float32)
    acc_l = tl.zeros((BB,), dtype=tl.float32)
    first = sp * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(NB, BB))
    for tile in range(first, last):
        rows = tile * BB + tl.arange(0, BB).to(tl.int64)
        if (tile + 1) * BB <= NF:
            acc_w2, acc_g, acc_m, acc_b2, acc_l = _backward_tile(
                tab, blk, coef, vecs, err, w2c, b2c, cols, rows, acc_w2, acc_g, acc_m, acc_b2, acc_l, NB, lr,
                momentum, weight_decay, S, H, HP, NV, PDT, LOSS, GRAD, PREV, WD, PREC, ALIGN, True)  # fmt: skip
        else:
            acc_w2, acc_g, acc_m, acc_b2, acc_l = _backward_tile(
                tab, blk, coef, vecs, err, w2c, b2c, cols, rows, acc_w2, acc_g, acc_m, acc_b2, acc_l, NB, lr,
                momentum, weight_decay, S, H, HP, NV, PDT, LOSS, GRAD, PREV, WD, PREC, ALIGN, False)  # fmt: skip
    tl.store(lpart + sp * tl.num_programs(0) + j, tl.sum(acc_l))
    if GRAD:
        pb = part + sp.to(tl.int64) * (3 * S * H + S)
        wm = (cols < S)[:, None] & (hh < H)[None, :]
        w1p = pb + hh[None, :] * (2 * S) + cols[:, None]
        tl.store(w1p, acc_g, mask=wm)
        tl.store(w1p + S, acc_m, mask=wm)
        tl.store(pb + 2 * S * H + cols[:, None] * H + hh[None, :], acc_w2, mask=wm)
        tl.store(pb + 3 * S * H + cols, acc_b2, mask=cols < S)


# ----------------------------------------------------------------------------- final reduction


@triton.jit
def _accumulate(dst, offs, lo, n, x):
    """dst[offs − lo] += x where lo ≤ offs < lo + n."""
    mask = (offs >= lo) & (offs < lo + n)
    ptrs = dst + (offs - lo)
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + x, mask=mask)


@triton.jit
def _reduce_kernel(
    part, hpart, closs, lpart, gw1, gb1, ggam, gbet, gw2, gb2, out, n_split, n_tiles, T, n_lpart, n_big, loss_pid,
    S: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, GRAD: tl.constexpr, RB: tl.constexpr, RH: tl.constexpr,
    RT: tl.constexpr,
):  # fmt: skip
    """Programs 0..n_big−1: w1 | w2 | b2 grads += Σ over splits; program n_big: b1, γ, β grads += Σ over tiles;
    the last program: the loss (per-tensor terms + the o_prev terms of pass 2)."""
    pid = tl.program_id(0)
    ar = tl.arange(0, RB)
    if GRAD:
        if pid < n_big:
            offs = pid.to(tl.int64) * RB + ar
            total = 3 * S * H + S
            acc = tl.zeros((RB,), dtype=tl.float32)
            for sp in range(0, n_split):
                acc += tl.load(part + sp * total + offs, mask=offs < total, other=0.0)
            _accumulate(gw1, offs, 0, 2 * S * H, acc)
            _accumulate(gw2, offs, 2 * S * H, S * H, acc)
            _accumulate(gb2, offs, 3 * S * H, S, acc)
        if pid == n_big:
            q = tl.arange(0, RH)
            rt = tl.arange(0, RT)
            acc2 = tl.zeros((RT, RH), dtype=tl.float32)
            for t0 in range(0, n_tiles, RT):
                t = t0 + rt
                acc2 += tl.load(hpart + t[:, None] * (3 * HP) + q[None, :], mask=(t < n_tiles)[:, None]
                                & (q < 3 * HP)[None, :], other=0.0)  # fmt: skip
            acc1 = tl.sum(acc2, 0)
            seg = q // HP
            hq = q % HP
            mg = (seg == 0) & (hq < H)
            tl.store(ggam + hq, tl.load(ggam + hq, mask=mg, other=0.0) + acc1, mask=mg)
            mb = (seg == 1) & (hq < H)
            tl.store(gbet + hq, tl.load(gbet + hq, mask=mb, other=0.0) + acc1, mask=mb)
            m1 = (seg == 2) & (hq < H)
            tl.store(gb1 + hq, tl.load(gb1 + hq, mask=m1, other=0.0) + acc1, mask=m1)
    if pid == loss_pid:
        tot = tl.zeros((RB,), dtype=tl.float64)
        for t0 in range(0, T, RB):
            tot += tl.load(closs + t0 + ar, mask=t0 + ar < T, other=0.0)
        for l0 in range(0, n_lpart, RB):
            tot += tl.load(lpart + l0 + ar, mask=l0 + ar < n_lpart, other=0.0).to(tl.float64)
        tl.store(out, tl.sum(tot).to(tl.float32))


# ----------------------------------------------------------------------------- host side


@dataclass(frozen=True)
class _Config:
    """Largest block per role and launch options; each launch takes min(cap, next power of two of its dimension,
    at least 16). Sized for sm_90 shared memory (≤ 227 KB, checked by the ahead-of-time compile test), not tuned
    on a GPU."""

    BM: int  # block rows of a forward tile
    BH: int  # block rows of a hidden-kernel tile
    BK: int  # forward reduction step over the S coordinates
    BN: int  # forward output coordinates per step
    BB: int  # block rows per backward / projection step (the K of the weight-gradient products)
    BC: int  # coordinates per backward program
    BP: int  # rows and columns of a projection tile
    prec: int  # operand precision of the products: 0 exact fp32, 1 bf16x3, 2 bf16x6 (see _mm)
    forward: dict  # launch options
    backward: dict
    projection: dict


def _config(dtype: torch.dtype) -> _Config:
    """The block caps, product precision and launch options for parameters of this dtype. The row-gather tiles (a
    64-bit pointer per element) and the operand splits dominate the registers, so the reduction steps over coordinates
    and block rows are 16. ptxas (sm_90a, S = 4096, h = 64, bf16) spills ≤ 52 bytes in the backward and 548 in the
    surrogate forward (BM = 64 removes those at twice the L2 reads of W1, W2 per coordinate); fp32: ≤ 320 and 264."""
    if dtype == torch.bfloat16:
        return _Config(BM=128, BH=32, BK=16, BN=64, BB=16, BC=64, BP=128, prec=1,
                       forward=dict(num_warps=8, num_stages=2), backward=dict(num_warps=8, num_stages=2),
                       projection=dict(num_warps=8, num_stages=3))  # fmt: skip
    return _Config(BM=64, BH=32, BK=16, BN=64, BB=16, BC=64, BP=64, prec=2,
                   forward=dict(num_warps=8, num_stages=2), backward=dict(num_warps=8, num_stages=2),
                   projection=dict(num_warps=4, num_stages=2))  # fmt: skip


def _pow2(n: int, cap: int) -> int:
    """The block for a dimension of n: its next power of two, at least 16 (tl.dot), at most cap."""
    return max(16, min(cap, triton.next_power_of_2(n)))


@dataclass(frozen=True)
class _Layout:
    """The device tables of one call: tensor table [T, 8] int64 (u, W, m, o_prev pointers, n, has_prev, first full
    block row, tail block row or −1) and block rows [NB, 2] int32 (tensor, block index): full blocks first."""

    tab: Tensor
    blk: Tensor
    T: int
    NB: int
    NF: int
    align: int  # 16 when every base pointer is 16-byte aligned (vectorization hint), else 1


_blocks: "OrderedDict[tuple, tuple]" = OrderedDict()
_layouts: "OrderedDict[tuple, _Layout]" = OrderedDict()


def _cached(cache: OrderedDict, key: tuple, make):
    hit = cache.get(key)
    if hit is None:
        hit = cache[key] = make()
        if len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    cache.move_to_end(key)
    return hit


def _block_list(ns: tuple[int, ...], S: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, int]:
    """(block rows [NB, 2] int32 on the device, first full block row and tail block row (or −1) of every tensor,
    number of full blocks), for tensors of ns elements."""
    T = len(ns)
    n = torch.tensor(ns, dtype=torch.int64)
    nf = n // S
    first = torch.cumsum(nf, 0) - nf
    NF = int(nf.sum())
    tails = torch.nonzero(n % S).flatten()
    tail_row = torch.full((T,), -1, dtype=torch.int64)
    tail_row[tails] = NF + torch.arange(tails.numel())
    blk = torch.stack([
        torch.cat([torch.repeat_interleave(torch.arange(T), nf), tails]),
        torch.cat([torch.arange(NF) - torch.repeat_interleave(first, nf), nf[tails]]),
    ], 1).to(torch.int32)  # fmt: skip
    return blk.to(device), first, tail_row, NF


def _layout(ts: list[tuple[Tensor, Tensor, Tensor, Tensor]], has_prev: list[bool], S: int) -> _Layout:
    """The tables of a call: the block list is cached by the tensors' sizes, the small pointer table by the pointers
    too (gradients that are new allocations every step only rebuild the latter)."""
    ptrs = tuple(tuple(x.data_ptr() for x in t) for t in ts)
    ns = tuple(t[0].numel() for t in ts)
    device = ts[0][0].device
    blk, first, tail_row, NF = _cached(_blocks, (device, S, ns), lambda: _block_list(ns, S, device))

    def make() -> _Layout:
        tab = torch.cat([torch.tensor(ptrs, dtype=torch.int64).reshape(len(ts), 4),
                         torch.stack([torch.tensor(ns), torch.tensor(has_prev, dtype=torch.int64), first, tail_row],
                                     1)], 1)  # fmt: skip
        align = 16 if all(x % 16 == 0 for p in ptrs for x in p) else 1
        return _Layout(tab.to(device), blk, len(ts), blk.shape[0], NF, align)

    return _cached(_layouts, (device, S, ptrs, ns, tuple(has_prev)), make)


def _splits(tiles: int, chunks: int, device: torch.device) -> int:
    """Splits of ``tiles`` row tiles for a launch of ``chunks`` programs per split: about two programs per SM on a
    GPU (one partial sum each)."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 2 * chunks  # the interpreter: exercise the cross-split reduction
    return max(1, min(tiles, round(target / chunks)))


@on_input_device
def memory_mlp_momentum(
    params: list[Tensor],
    grads: list[Tensor],
    momenta: list[Tensor],
    prev_outputs: list[Tensor],
    has_prev: list[bool],
    weights: list[Tensor],
    weight_grads: list[Tensor],
    projection: Tensor,
    hyper: Hyper,
) -> Tensor:
    """One step of the rule over one (device, dtype) group, in place; returns s·Σℓ as a 0-d fp32 tensor.

    Arguments as :func:`nested_learning.reference.memory_mlp_momentum.step`; the caller has validated them
    (contiguous, one device, fp32 states, memory weights and projection)."""
    w1, b1, gam, bet, w2, b2 = weights
    H, S = w1.shape[0], w1.shape[1] // 2
    dev, f32 = w1.device, torch.float32
    live = [i for i, p in enumerate(params) if p.numel() > 0]
    if not live:
        return torch.zeros((), dtype=f32, device=dev)
    dtype = params[live[0]].dtype
    if dtype not in _DTYPES:
        raise ValueError(f"the triton backend of memory_mlp_momentum takes fp32, bf16 or fp16 params, got {dtype}")
    if H > MAX_HIDDEN:
        raise ValueError(f"the triton backend of memory_mlp_momentum supports h ≤ {MAX_HIDDEN}, got h = {H}")
    tensors = [(grads[i], params[i], momenta[i], prev_outputs[i]) for i in live]
    lay = _layout(tensors, [bool(has_prev[i]) for i in live], S)
    T, NB, NF = lay.T, lay.NB, lay.NF
    loss, grad = _LOSS[hyper.loss], bool(hyper.compute_grad)
    prev = loss == _SURROGATE and any(has_prev[i] for i in live)
    nv = (3 + prev if loss == _SURROGATE else 2) if grad else 1
    cfg = _config(dtype)
    HP = max(16, triton.next_power_of_2(H))
    wd = float(hyper.weight_decay)
    flags = dict(S=S, PDT=_TL[dtype], WD=wd != 0.0, PREC=cfg.prec, ALIGN=lay.align)
    vecs = torch.empty(NB, nv, HP, dtype=f32, device=dev)
    bsc = torch.empty(NB, 4, dtype=f32, device=dev)
    coef = torch.empty(T, 8, dtype=f32, device=dev)
    closs = torch.empty(T, dtype=torch.float64, device=dev)
    err = torch.empty(NB, S, dtype=f32, device=dev) if loss == _L2 else bsc  # bsc: a placeholder never touched
    out = torch.empty((), dtype=f32, device=dev)  # written by the reduction
    proj = projection if loss == _L2 else w1

    BM = _pow2(NB, cfg.BM)
    tiles = triton.cdiv(NB, BM)
    _launch(_forward_kernel, (tiles,), lay.tab, lay.blk, w1, b1, gam, bet, w2, b2, proj, vecs, bsc, err, NB, NF, wd,
            float(hyper.ln_eps), H=H, HP=HP, NV=nv, LOSS=loss, GRAD=grad, PREV=prev and grad, BM=BM,
            BK=_pow2(S, cfg.BK), BN=_pow2(S, cfg.BN), **flags, **cfg.forward)  # fmt: skip
    _launch(_tensor_kernel, (T,), lay.tab, bsc, coef, closs, float(hyper.loss_scale), float(hyper.projection_lr), S=S,
            LOSS=loss, EPS=NORM_EPS, BLK=256)  # fmt: skip
    BH = _pow2(NB, cfg.BH)
    hidden_tiles = triton.cdiv(NB, BH)
    hpart = torch.empty(hidden_tiles, 3, HP, dtype=f32, device=dev) if grad else bsc
    _launch(_hidden_kernel, (hidden_tiles,), lay.blk, coef, vecs, hpart, gam, bet, NB, float(hyper.ln_eps), H=H, HP=HP,
            NV=nv, LOSS=loss, GRAD=grad, PREV=prev and grad, BM=BH)  # fmt: skip
    BB = _pow2(NB, cfg.BB)
    if loss == _L2:  # the P tiles alone are too few programs at small S: the block rows are split too
        BP = _pow2(S, cfg.BP)
        p_tiles, row_tiles = triton.cdiv(S, BP), triton.cdiv(NB, BB)
        per_split = triton.cdiv(row_tiles, _splits(row_tiles, p_tiles * p_tiles, dev))
        p_splits = triton.cdiv(row_tiles, per_split)
        p_part = torch.empty(p_splits, S, S, dtype=f32, device=dev)
        _launch(_projection_kernel, (p_tiles, p_tiles, p_splits), lay.tab, lay.blk, coef, err, p_part, NB, NF,
                per_split, wd, BP=BP, BB=BB, **flags, **cfg.projection)  # fmt: skip
        projection.add_(p_part.sum(0))
    BC = _pow2(S, cfg.BC)
    chunks, row_tiles = triton.cdiv(S, BC), triton.cdiv(NB, BB)
    per_split = triton.cdiv(row_tiles, _splits(row_tiles, chunks, dev))
    splits = triton.cdiv(row_tiles, per_split)
    total = 3 * S * H + S
    part = torch.empty(splits, total, dtype=f32, device=dev) if grad else bsc
    lpart = torch.empty(splits * chunks, dtype=f32, device=dev)
    _launch(_backward_kernel, (chunks, splits), lay.tab, lay.blk, coef, vecs, err, w2, b2, part, lpart, NB, NF,
            per_split, float(hyper.lr), float(hyper.momentum), wd, H=H, HP=HP, NV=nv, LOSS=loss, GRAD=grad, PREV=prev,
            BB=BB, BC=BC, **flags, **cfg.backward)  # fmt: skip
    RB = 1024
    n_big = triton.cdiv(total, RB) if grad else 0
    loss_pid = n_big + 1 if grad else 0
    _launch(_reduce_kernel, (loss_pid + 1,), part, hpart, closs, lpart, *weight_grads, out, splits, hidden_tiles, T,
            splits * chunks, n_big, loss_pid, S=S, H=H, HP=HP, GRAD=grad, RB=RB, RH=triton.next_power_of_2(3 * HP),
            RT=32)  # fmt: skip
    return out
