// In-context CMS level (cms_chunk_update): CPU forward and backward kernels.
//
// Per sequence, fast weights W1 ∈ R^{h×d}, W2 ∈ R^{e×h}; the tokens of chunk c (rows of X, V) use
// the chunk-start weights W^(c):
//     Z = X W1ᵀ,  A = σ(Z),  O = A W2ᵀ,  E = O − V,  P = E W2,  Q = P ⊙ σ'(Z)
//     W1^(c+1) = W1^(c) − lr Qᵀ X,        W2^(c+1) = W2^(c) − lr Eᵀ A
// When gradients are needed the forward keeps the per-token activations (Z | P | E), written in
// place as it computes them, and the weights at the start of every K-th chunk (K =
// checkpoint_every), plus the final weights when K > 1.
//
// Backward (reverse over chunks; dW1, dW2 the adjoints of the next chunk-start weights; Z, P, E
// read back, σ, σ', σ'' elementwise from Z: no forward GEMM is redone). A chunk's start weights
// are a checkpoint, or are rebuilt from the next chunk's by undoing its update,
//     W1^(c) = W1^(c+1) + lr Qᵀ X,   W2^(c) = W2^(c+1) + lr Eᵀ A,
// two rank-L updates of cache-resident weights instead of reading a stored copy from memory;
// restarting from a checkpoint every K chunks bounds the rounding of the rebuilt weights.
//     dq = −lr X dW1ᵀ;  dp = dq ⊙ σ'(Z)
//     de = dp W2ᵀ − lr A dW2ᵀ;  dŌ = dO + de;  dV = −de
//     da = dŌ W2 − lr E dW2;  dz = da ⊙ σ'(Z) + dq ⊙ P ⊙ σ''(Z);  δ = P ⊙ σ'(Z)
//     dX = dz W1 − lr δ dW1
//     dW1 += dzᵀ X;  dW2 += Eᵀ dp + dŌᵀ A
// Ten products per chunk (twelve on rebuilt chunks), five in the forward.
//
// Products into token rows are batched GEMMs (ATen's bmm/baddbmm: the BLAS torch was built
// with); the weight and adjoint updates are rank-L products, one fused register-tiled pass
// (rank_update) for chunks of up to 16 tokens, else a GEMM and an add. The elementwise work
// between two products is one vectorised pass over the chunk's rows. When the B sequences split
// evenly over the intra-op threads, each thread runs its own sequences one after the other, with
// single-threaded GEMMs and no synchronisation inside the chunk loop, so that one sequence's
// weights, updates and adjoints (4(hd + eh) floats) stay in cache; otherwise (B = 1, say) a team
// of threads splits the hidden units of all sequences, each member running the products of its
// slice and the sums over h (O, de, dX) reduced from partial sums between barriers (Team). Chunk
// buffers are allocated once per call and viewed compactly as [B, L, ·] per chunk (L its length).
//
// Tokens of any input dtype are converted to the compute dtype (float64 for float64 x, else
// float32) once, before the chunk loop.

// at::vec::Vectorized's AVX2 implementations (Sleef exp/erf) when compiled for AVX2 + FMA.
#if defined(__AVX2__) && defined(__FMA__) && !defined(CPU_CAPABILITY)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <string_view>
#include <tuple>
#include <type_traits>

#if defined(__GNUC__) && !defined(__clang__)
// Vectorized<double> passed by value: GCC notes an ABI difference under AVX-512; all such
// functions here are internal and inlined.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace {

using at::Tensor;
template <typename T>
using Vec = at::vec::Vectorized<T>;

enum class Act { kGelu, kSilu, kRelu };

Act parse_activation(std::string_view name) {
  if (name == "gelu") return Act::kGelu;
  if (name == "silu") return Act::kSilu;
  if (name == "relu") return Act::kRelu;
  TORCH_CHECK(false, "cms_chunk_update_cpp: activation must be 'gelu', 'silu' or 'relu', got '", name, "'");
}

// σ(z), σ'(z) and (when kSecond) σ''(z):
//   gelu (exact): σ = zΦ,  σ' = Φ + zφ,  σ'' = φ(2 − z²)      (Φ, φ: the normal cdf and pdf)
//   silu: s = 1/(1+e^{−z}),  σ = zs,  σ' = s(1 + z(1−s)),  σ'' = s(1−s)(2 + z(1−2s))
//   relu: σ = max(z, 0),  σ' = [z > 0],  σ'' = 0
template <Act A, bool kSecond, typename T>
inline void activate(const Vec<T>& z, Vec<T>& f, Vec<T>& d1, Vec<T>& d2) {
  const Vec<T> one(T(1));
  if constexpr (A == Act::kGelu) {
    const Vec<T> cdf = Vec<T>(T(0.5)) * (one + (z * Vec<T>(T(0.70710678118654752440))).erf());
    const Vec<T> pdf = (z * z * Vec<T>(T(-0.5))).exp() * Vec<T>(T(0.39894228040143267794));
    f = z * cdf;
    d1 = at::vec::fmadd(z, pdf, cdf);
    if constexpr (kSecond) d2 = pdf * (Vec<T>(T(2)) - z * z);
  } else if constexpr (A == Act::kSilu) {
    const Vec<T> s = one / (one + z.neg().exp());
    const Vec<T> u = one - s;
    f = z * s;
    d1 = s * at::vec::fmadd(z, u, one);
    if constexpr (kSecond) d2 = s * u * at::vec::fmadd(z, u - s, Vec<T>(T(2)));
  } else {
    const Vec<T> zero(T(0));
    f = at::vec::maximum(z, zero);
    d1 = z.gt(zero);
    if constexpr (kSecond) d2 = zero;
  }
}

template <typename T>
inline Vec<T> load(const T* p, int64_t n) {
  return n == Vec<T>::size() ? Vec<T>::loadu(p) : Vec<T>::loadu(p, n);
}

template <typename T>
inline void store(const Vec<T>& x, T* p, int64_t n) {
  if (n == Vec<T>::size()) {
    x.store(p);
  } else {
    x.store(p, static_cast<int>(n));
  }
}

// f(r) for each of `rows` rows of `width` elements, split across the intra-op threads.
template <typename F>
void for_rows(int64_t rows, int64_t width, const F& f) {
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / width);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) f(r);
  });
}

// f(j, n) over the vectors of a row of `width` elements: n lanes from column j. The row's pointers
// are best captured by value, so that they stay in registers across the (aliasing) vector stores.
template <typename T, typename F>
inline void for_lanes(int64_t width, const F& f) {
  constexpr int64_t kLanes = Vec<T>::size();
  int64_t j = 0;
  for (; j + kLanes <= width; j += kLanes) f(j, kLanes);
  if (j < width) f(j, width - j);
}

struct Sizes {
  int64_t B, T, d, e, h, C, N;
};

// One chunk: tokens [t0, t0 + L) of every sequence. Row r of a chunk buffer is token
// t0 + r % L of sequence r / L; token(r) is its row index in a [B, T, ·] tensor.
struct Chunk {
  int64_t t0, L, T;
  int64_t token(int64_t r) const { return (r / L) * T + t0 + r % L; }
};

// A compact [B, L, width] view of a chunk buffer, starting `offset` elements in, rows `stride` apart.
Tensor rows(const Tensor& buffer, int64_t B, int64_t L, int64_t width, int64_t stride = -1, int64_t offset = 0) {
  if (stride < 0) stride = width;
  return buffer.as_strided({B, L, width}, {L * stride, stride, 1}, offset);
}

Tensor tr(const Tensor& x) { return x.transpose(1, 2); }

// at::empty, asking Linux to back the allocation with transparent huge pages where it grants them
// on request: a fresh output (the chunk-start weights reach 64 MiB, the activations 36 MiB) is then
// first touched 2 MiB rather than 4 KiB per page fault, which otherwise costs as much as a third
// of the forward.
Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  Tensor t = at::empty(sizes, opts);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr()), end = begin + t.nbytes();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // a hint only
#endif
  return t;
}

// dst[b] ← src[b] + α G[b] over [B, rows, cols] matrices (unit column stride, rows of any stride;
// G compact; dst may be src). The weight update, rounded once per element as in the reference: a
// BLAS given beta = 1 may add the product into C term by term (MKL does for narrow matrices), which
// loses the small update against the larger weights.
template <typename T>
void add_scaled(const Tensor& src, const Tensor& g, T alpha, const Tensor& dst) {
  const int64_t B = src.size(0), rows = src.size(1), cols = src.size(2);
  const T *s0 = src.data_ptr<T>(), *g0 = g.data_ptr<T>();
  T* d0 = dst.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / cols);
  at::parallel_for(0, B * rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t b = k / rows, i = k % rows;
      const T *x = s0 + b * src.stride(0) + i * src.stride(1), *y = g0 + k * cols;
      T* out = d0 + b * dst.stride(0) + i * dst.stride(1);
      const Vec<T> a(alpha);
      for_lanes<T>(cols, [=](int64_t j, int64_t n) { store(at::vec::fmadd(load(y + j, n), a, load(x + j, n)), out + j, n); });
    }
  });
}

// R rows by NV vectors of columns (the last one `n_last` lanes) of dst ← src + α Uᵀ V, summing the L
// rank-one terms in registers: u[t * u_ld + r] scales row t of v for output row r.
template <typename T, int R, int NV>
inline void rank_update_tile(int64_t L, const T* u, int64_t u_ld, const T* v, int64_t v_ld, T alpha, const T* src,
                             int64_t src_ld, T* dst, int64_t dst_ld, int64_t n_last) {
  constexpr int64_t W = Vec<T>::size();
  Vec<T> acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < NV; ++k) acc[r][k] = Vec<T>(T(0));
  for (int64_t t = 0; t < L; ++t) {
    const T* vt = v + t * v_ld;
    Vec<T> x[NV];
    for (int k = 0; k < NV; ++k) x[k] = load(vt + k * W, k + 1 == NV ? n_last : W);
    for (int r = 0; r < R; ++r) {
      const Vec<T> a(u[t * u_ld + r]);
      for (int k = 0; k < NV; ++k) acc[r][k] = at::vec::fmadd(a, x[k], acc[r][k]);
    }
  }
  const Vec<T> va(alpha);
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < NV; ++k) {
      const int64_t n = k + 1 == NV ? n_last : W;
      store(at::vec::fmadd(acc[r][k], va, load(src + r * src_ld + k * W, n)), dst + r * dst_ld + k * W, n);
    }
}

// dst[b] ← src[b] + α U[b]ᵀ V[b] for U [B, L, rows], V [B, L, cols] and src, dst [B, rows, cols]
// (columns unit-strided, rows of any stride; dst may be src): a rank-L weight update
// with the product summed in registers and rounded into the weights once per element, as add_scaled.
// For short chunks this one pass over the weights replaces a GEMM of inner size L (far from the BLAS's
// efficient shapes) that writes a full-size product, and the pass that adds it.
template <typename T>
void rank_update(const Tensor& src, const Tensor& U, const Tensor& V, T alpha, const Tensor& dst) {
  constexpr int64_t W = Vec<T>::size(), kRows = 2, kVecs = 4;
  const int64_t B = src.size(0), rows = src.size(1), cols = src.size(2), L = U.size(1);
  const int64_t row_blocks = (rows + kRows - 1) / kRows;
  const T *s0 = src.data_ptr<T>(), *u0 = U.data_ptr<T>(), *v0 = V.data_ptr<T>();
  T* d0 = dst.data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, L * cols));
  at::parallel_for(0, B * row_blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t b = k / row_blocks, i = (k % row_blocks) * kRows;
      const T* u = u0 + b * U.stride(0) + i;
      const T* v = v0 + b * V.stride(0);
      const int64_t ul = U.stride(1), vl = V.stride(1), sl = src.stride(1), dl = dst.stride(1);
      const T* sr = s0 + b * src.stride(0) + i * sl;
      T* dr = d0 + b * dst.stride(0) + i * dl;
      auto tiles = [&]<int R>() {
        int64_t j = 0;
        for (; j + kVecs * W <= cols; j += kVecs * W)
          rank_update_tile<T, R, kVecs>(L, u, ul, v + j, vl, alpha, sr + j, sl, dr + j, dl, W);
        for (; j < cols; j += W)
          rank_update_tile<T, R, 1>(L, u, ul, v + j, vl, alpha, sr + j, sl, dr + j, dl, std::min(W, cols - j));
      };
      if (i + kRows <= rows) {
        tiles.template operator()<kRows>();
      } else {
        tiles.template operator()<1>();
      }
    }
  });
}

// The weight update of one chunk, dst ← src + α Uᵀ V: fused (rank_update) for chunks of up to
// kFusedRank tokens, else a GEMM into the workspace G and add_scaled.
constexpr int64_t kFusedRank = 16;

template <typename T>
void update_weights(const Tensor& src, const Tensor& U, const Tensor& V, T alpha, const Tensor& dst, Tensor& G) {
  if (U.size(1) <= kFusedRank) {
    rank_update<T>(src, U, V, alpha, dst);
  } else {
    at::bmm_out(G, tr(U), V);
    add_scaled<T>(src, G, alpha, dst);
  }
}

// The per-token activations (z | p | e) of one chunk: rows of width 2h + e of `acts` (the saved
// [B, T, 2h + e] output, or a [B, C, 2h + e] workspace), token t0 + r % L of sequence r / L at row r.
template <typename T>
struct Activations {
  Tensor span;  // [B, L, 2h + e]
  int64_t h, e, L;
  T* base;
  int64_t batch_stride, row_stride;
  Activations(const Tensor& acts, int64_t t0, int64_t L_, int64_t h_, int64_t e_)
      : span(acts.narrow(1, t0, L_)), h(h_), e(e_), L(L_), base(span.data_ptr<T>()),
        batch_stride(span.stride(0)), row_stride(span.stride(1)) {}
  Tensor z() const { return span.narrow(2, 0, h); }
  Tensor p() const { return span.narrow(2, h, h); }
  Tensor err() const { return span.narrow(2, 2 * h, e); }
  T* row(int64_t r) const { return base + (r / L) * batch_stride + (r % L) * row_stride; }
};

// ------------------------------------------------------------------------------ teams

// The threads that share one group of sequences. Member `id` of `size` owns a vector-aligned slice
// of the hidden units (its rows of W1, its columns of W2 and of their adjoints) and computes every
// product and pass of its slice; the products summed over the hidden units (O, and in the backward
// de and dX) are reduced from per-member partial sums, each member reducing a share of the token
// rows between two barriers. A team of one (per-sequence mode, or one thread) never waits.
struct Team {
  int64_t id = 0, size = 1;

  void sync() const {
    if (size > 1) {
#pragma omp barrier
    }
  }

  // [begin, end) of member `m`'s hidden units: slices of a multiple of `align` units, the last one shorter.
  static std::pair<int64_t, int64_t> slice(int64_t h, int64_t m, int64_t size, int64_t align) {
    const int64_t per = ((h + size - 1) / size + align - 1) / align * align;
    return {std::min(h, m * per), std::min(h, (m + 1) * per)};
  }

  std::pair<int64_t, int64_t> hidden(int64_t h, int64_t align) const { return slice(h, id, size, align); }

  // Members whose slice is not empty (the partial sums that exist).
  int64_t active(int64_t h, int64_t align) const {
    int64_t n = 0;
    while (n < size && slice(h, n, size, align).first < h) ++n;
    return n;
  }

  // [begin, end) of this member's share of n token rows.
  std::pair<int64_t, int64_t> share(int64_t n) const {
    const int64_t per = (n + size - 1) / size;
    return {std::min(n, id * per), std::min(n, (id + 1) * per)};
  }
};

// out[r] ← Σ_m partial[m][r] for this member's share of the rows (row r of member m's [rows, width]
// block at partial + m · block + r · width), through f(r, j, n, sum) per vector of a row.
template <typename T, typename F>
void reduce_rows(const Team& team, int64_t active, const T* partial, int64_t block, int64_t rows, int64_t width,
                 const F& f) {
  const auto [r0, r1] = team.share(rows);
  for (int64_t r = r0; r < r1; ++r) {
    for_lanes<T>(width, [&](int64_t j, int64_t n) {
      Vec<T> sum = load(partial + r * width + j, n);
      for (int64_t m = 1; m < active; ++m) sum = sum + load(partial + m * block + r * width + j, n);
      f(r, j, n, sum);
    });
  }
}

// ------------------------------------------------------------------------------ forward

// W1, W2 hold the start weights and are updated in place to the final ones; starts1/2 (when
// defined) receive the start weights of every K-th chunk and then, when K > 1, the final weights.
// acts is the [B, T, 2h + e] output when saving (Z, P, E are computed into it), else a
// [B, min(C, T), 2h + e] workspace. partial holds the team's [B, C, e] partial sums of O.
template <typename T, Act A>
void forward_impl(const Sizes& s, int64_t K, const Team& team, const Tensor& X, const Tensor& V, double lr,
                  const Tensor& W1, const Tensor& W2, const Tensor& out, const Tensor& starts1,
                  const Tensor& starts2, const Tensor& acts, const Tensor& partial) {
  const auto opts = X.options();
  constexpr int64_t kAlign = Vec<T>::size();
  const auto [h0, h1] = team.hidden(s.h, kAlign);
  const int64_t ht = h1 - h0, BC = s.B * s.C, active = team.active(s.h, kAlign);
  const bool save = starts1.defined(), mine = ht > 0;
  const Tensor W1t = W1.narrow(1, h0, ht), W2t = W2.narrow(2, h0, ht);  // this member's slice
  const Tensor abuf = at::empty({BC * ht}, opts);  // A
  const Tensor sbuf = at::empty({BC * ht}, opts);  // σ'(Z), then Q
  const bool gemm = s.C > kFusedRank;
  Tensor G1 = gemm ? at::empty({s.B, ht, s.d}, opts) : Tensor();  // Qᵀ X, Eᵀ A
  Tensor G2 = gemm ? at::empty({s.B, s.e, ht}, opts) : Tensor();
  const T* v = V.data_ptr<T>();
  T *o = out.data_ptr<T>(), *a = abuf.data_ptr<T>(), *sg = sbuf.data_ptr<T>(), *part = partial.data_ptr<T>();
  for (int64_t c = 0; c < s.N; ++c) {
    const Chunk k{c * s.C, std::min(s.C, s.T - c * s.C), s.T};
    const int64_t L = k.L;
    if (save && c % K == 0 && mine) {
      starts1.select(1, c / K).narrow(1, h0, ht).copy_(W1t);
      starts2.select(1, c / K).narrow(2, h0, ht).copy_(W2t);
    }
    const Tensor Xc = X.narrow(1, k.t0, L);
    const Activations<T> act(acts, save ? k.t0 : 0, L, s.h, s.e);
    Tensor Z = act.z().narrow(2, h0, ht), P = act.p().narrow(2, h0, ht);
    const Tensor E = act.err();
    Tensor Am = rows(abuf, s.B, L, ht), Q = rows(sbuf, s.B, L, ht);
    Tensor Op = rows(partial, s.B, L, s.e, s.e, team.id * BC * s.e);

    if (mine) {
      at::bmm_out(Z, Xc, tr(W1t));
      for_rows(s.B * L, ht, [&](int64_t r) {  // A = σ(Z); S = σ'(Z)
        const T* zr = act.row(r) + h0;
        T *ar = a + r * ht, *sr = sg + r * ht;
        for_lanes<T>(ht, [=](int64_t j, int64_t n) {
          Vec<T> f, d1, d2;
          activate<A, false, T>(load(zr + j, n), f, d1, d2);
          store(f, ar + j, n);
          store(d1, sr + j, n);
        });
      });
      at::bmm_out(Op, Am, tr(W2t));  // this slice's part of O
    }
    team.sync();
    reduce_rows<T>(team, active, part, BC * s.e, s.B * L, s.e, [&](int64_t r, int64_t j, int64_t n, Vec<T> y) {
      store(y, o + k.token(r) * s.e + j, n);                                   // out = O
      store(y - load(v + k.token(r) * s.e + j, n), act.row(r) + 2 * s.h + j, n);  // E = O − V
    });
    team.sync();
    if (mine) {
      at::bmm_out(P, E, W2t);
      for_rows(s.B * L, ht, [&](int64_t r) {  // Q = P ⊙ S
        const T* pr = act.row(r) + s.h + h0;
        T* sr = sg + r * ht;
        for_lanes<T>(ht, [=](int64_t j, int64_t n) { store(load(pr + j, n) * load(sr + j, n), sr + j, n); });
      });
      update_weights<T>(W1t, Q, Xc, static_cast<T>(-lr), W1t, G1);
      update_weights<T>(W2t, E, Am, static_cast<T>(-lr), W2t, G2);
    }
  }
  if (save && K > 1 && mine) {
    starts1.select(1, -1).narrow(1, h0, ht).copy_(W1t);
    starts2.select(1, -1).narrow(2, h0, ht).copy_(W2t);
  }
}

// ------------------------------------------------------------------------------ backward

// dW1, dW2 hold the final weights' adjoints and end as the start weights'. Nothing of the forward
// is recomputed: σ, σ', σ'' come elementwise from the saved Z.
//
// A pair of products into one output is a GEMM and an accumulating GEMM (terms of one size, so the
// BLAS may add into its output directly). The adjoints accumulate through update_weights; dW2's two
// products are one rank-2L update over interleaved rows: rows (E_t, dŌ_t) transposed times rows
// (dp_t, A_t).
//
// S1, S2 are the forward's checkpoints: slot j holds the start weights of chunk jK, the last slot
// (K > 1) the final weights. The start weights of any other chunk c are rebuilt into W1r, W2r from
// chunk c + 1's (a checkpoint, the final weights, or the previous rebuild).
//
// partial_e, partial_x hold the team's [B, C, e] and [B, C, d] partial sums of de and dX; ubuf the
// [B, 2C, e] rows (E_t, dŌ_t) that every member reads.
template <typename T, Act A>
void backward_impl(const Sizes& s, int64_t K, const Team& team, const Tensor& X, const Tensor& S1,
                   const Tensor& S2, const Tensor& acts, double lr, const Tensor& dO, const Tensor& dW1,
                   const Tensor& dW2, const Tensor& dX, const Tensor& dV, const Tensor& partial_e,
                   const Tensor& partial_x, const Tensor& ubuf) {
  const auto opts = X.options();
  constexpr int64_t kAlign = Vec<T>::size();
  const auto [h0, h1] = team.hidden(s.h, kAlign);
  const int64_t ht = h1 - h0, BC = s.B * s.C, active = team.active(s.h, kAlign);
  const bool mine = ht > 0;
  const Tensor dW1t = dW1.narrow(1, h0, ht), dW2t = dW2.narrow(2, h0, ht);  // this member's slice
  const Tensor qbuf = at::empty({BC * ht}, opts);      // X dW1ᵀ, then dq ⊙ P ⊙ σ''(Z)
  const Tensor sbuf = at::empty({BC * ht}, opts);      // σ'(Z)
  const Tensor dbuf = at::empty({BC * ht}, opts);      // δ
  const Tensor W1r = K > 1 ? at::empty({s.B, ht, s.d}, opts) : Tensor();  // rebuilt start weights
  const Tensor W2r = K > 1 ? at::empty({s.B, s.e, ht}, opts) : Tensor();
  const bool gemm = 2 * s.C > kFusedRank;
  Tensor G1 = gemm ? at::empty({s.B, ht, s.d}, opts) : Tensor();  // products of update_weights
  Tensor G2 = gemm ? at::empty({s.B, s.e, ht}, opts) : Tensor();
  const Tensor rbuf = at::empty({2 * BC * ht}, opts);  // rows dp_t, A_t
  const Tensor abuf = at::empty({BC * ht}, opts);      // da, then dz
  const T nlr = static_cast<T>(-lr);
  const T* dout = dO.data_ptr<T>();
  T *dv = dV.data_ptr<T>(), *dx = dX.data_ptr<T>(), *q = qbuf.data_ptr<T>(), *sg = sbuf.data_ptr<T>();
  T *dl = dbuf.data_ptr<T>(), *rr = rbuf.data_ptr<T>(), *u = ubuf.data_ptr<T>(), *ab = abuf.data_ptr<T>();
  const T *pe = partial_e.data_ptr<T>(), *px = partial_x.data_ptr<T>();
  for (int64_t c = s.N - 1; c >= 0; --c) {
    const Chunk k{c * s.C, std::min(s.C, s.T - c * s.C), s.T};
    const int64_t B = s.B, L = k.L, h = s.h, e = s.e, d = s.d;
    const bool stored = c % K == 0;
    const Tensor Xc = X.narrow(1, k.t0, L);
    const Activations<T> act(acts, k.t0, L, h, e);
    Tensor Qd = rows(qbuf, B, L, ht), dA = rows(abuf, B, L, ht);
    Tensor dEp = rows(partial_e, B, L, e, e, team.id * BC * e), dXp = rows(partial_x, B, L, d, d, team.id * BC * d);
    const Tensor R2 = rows(rbuf, B, 2 * L, ht), U2 = rows(ubuf, B, 2 * L, e);
    const Tensor dp = rows(rbuf, B, L, ht, 2 * ht), Am = rows(rbuf, B, L, ht, 2 * ht, ht);
    const Tensor E = rows(ubuf, B, L, e, 2 * e), dOb = rows(ubuf, B, L, e, 2 * e, e);
    const Tensor dlt = rows(dbuf, B, L, ht);
    Tensor W1, W2;

    if (mine) {
      at::bmm_out(Qd, Xc, tr(dW1t));
      for_rows(B * L, ht, [&](int64_t r) {
        // dq = −lr X dW1ᵀ; rows (dp, A) = (dq ⊙ σ', σ); S = σ'; δ = P ⊙ σ'; Qd ← dq ⊙ P ⊙ σ''
        const T *zr = act.row(r) + h0, *pr = act.row(r) + h + h0;
        T *qr = q + r * ht, *sr = sg + r * ht, *dr = dl + r * ht, *dpr = rr + 2 * r * ht, *ar = dpr + ht;
        for_lanes<T>(ht, [=](int64_t j, int64_t n) {
          Vec<T> f, d1, d2;
          activate<A, true, T>(load(zr + j, n), f, d1, d2);
          const Vec<T> dq = load(qr + j, n) * Vec<T>(nlr), p = load(pr + j, n);
          store(dq * d1, dpr + j, n);
          store(f, ar + j, n);
          store(d1, sr + j, n);
          store(p * d1, dr + j, n);
          store(dq * p * d2, qr + j, n);
        });
      });
      auto stored1 = [&](int64_t j) { return S1.select(1, j).narrow(1, h0, ht); };
      auto stored2 = [&](int64_t j) { return S2.select(1, j).narrow(2, h0, ht); };
      if (!stored) {  // rebuild the chunk-start weights from the next chunk's
        const bool next_stored = (c + 1) % K == 0 || c + 1 == s.N;
        const int64_t slot = c + 1 == s.N ? S1.size(1) - 1 : (c + 1) / K;
        update_weights<T>(next_stored ? stored1(slot) : W1r, dlt, Xc, static_cast<T>(lr), W1r, G1);
        update_weights<T>(next_stored ? stored2(slot) : W2r, act.err(), Am, static_cast<T>(lr), W2r, G2);
      }
      W1 = stored ? stored1(c / K) : W1r;
      W2 = stored ? stored2(c / K) : W2r;
      at::bmm_out(dEp, dp, tr(W2));
      dEp.baddbmm_(Am, tr(dW2t), 1, nlr);  // this slice's part of de = dp W2ᵀ − lr A dW2ᵀ
    }
    team.sync();
    reduce_rows<T>(team, active, pe, BC * e, B * L, e, [&](int64_t r, int64_t j, int64_t n, Vec<T> de) {
      // rows (E, dŌ) = (E, dO + de); dV = −de
      T* ur = u + 2 * r * e + j;
      store(load(act.row(r) + 2 * h + j, n), ur, n);
      store(load(dout + k.token(r) * e + j, n) + de, ur + e, n);
      store(de.neg(), dv + k.token(r) * e + j, n);
    });
    team.sync();
    if (mine) {
      at::bmm_out(dA, dOb, W2);
      dA.baddbmm_(E, dW2t, 1, nlr);  // da = dŌ W2 − lr E dW2
      for_rows(B * L, ht, [&](int64_t r) {  // dz = da ⊙ σ' + dq ⊙ P ⊙ σ''
        const T *qr = q + r * ht, *sr = sg + r * ht;
        T* dar = ab + r * ht;
        for_lanes<T>(ht, [=](int64_t j, int64_t n) {
          store(at::vec::fmadd(load(dar + j, n), load(sr + j, n), load(qr + j, n)), dar + j, n);
        });
      });
      at::bmm_out(dXp, dA, W1);
      dXp.baddbmm_(dlt, dW1t, 1, nlr);                  // this slice's part of dX = dz W1 − lr δ dW1
      update_weights<T>(dW1t, dA, Xc, T(1), dW1t, G1);  // dW1 += dzᵀ X
      update_weights<T>(dW2t, U2, R2, T(1), dW2t, G2);  // dW2 += Eᵀ dp + dŌᵀ A
    }
    team.sync();
    reduce_rows<T>(team, active, px, BC * d, B * L, d, [&](int64_t r, int64_t j, int64_t n, Vec<T> sum) {
      store(sum, dx + k.token(r) * d + j, n);
    });
  }
}

// ------------------------------------------------------------------------------ entry points

at::ScalarType compute_type(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void expect(const Tensor& t, const char* name, at::IntArrayRef shape, const char* layout) {
  TORCH_CHECK(t.device().is_cpu(), "cms_chunk_update_cpp: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.sizes() == shape, "cms_chunk_update_cpp: ", name, " must be ", layout, " = ", shape, ", got ",
              t.sizes());
}

void expect_dtype(const Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, "cms_chunk_update_cpp: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
}

Sizes make_sizes(const Tensor& x, const Tensor& target, int64_t h, int64_t chunk_size) {
  TORCH_CHECK(x.dim() == 3, "cms_chunk_update_cpp: x must be [B, T, d], got ", x.sizes());
  TORCH_CHECK(target.dim() == 3, "cms_chunk_update_cpp: target must be [B, T, e], got ", target.sizes());
  TORCH_CHECK(chunk_size >= 1, "cms_chunk_update_cpp: chunk_size must be >= 1, got ", chunk_size);
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "cms_chunk_update_cpp: x must be float32, float64, bfloat16 or float16, got ", dt);
  expect_dtype(target, "target", dt);
  Sizes s{x.size(0), x.size(1), x.size(2), target.size(2), h, chunk_size, 0};
  TORCH_CHECK(s.B >= 1 && s.T >= 1 && s.d >= 1 && s.e >= 1 && s.h >= 1,
              "cms_chunk_update_cpp: every size must be >= 1, got x ", x.sizes(), ", target ", target.sizes(),
              ", h = ", h);
  expect(x, "x", {s.B, s.T, s.d}, "[B, T, d]");
  expect(target, "target", {s.B, s.T, s.e}, "[B, T, e]");
  s.N = (s.T + s.C - 1) / s.C;
  return s;
}

// How a call's work splits over the intra-op threads. When the B sequences split evenly, each
// thread runs its sequences one at a time, a team of one with single-threaded GEMMs and passes (the
// BLAS runs sequentially inside a parallel region): no synchronisation inside the chunk loop, one
// sequence's weights in cache. Otherwise (B = 1, say) one team of up to `threads` members splits
// the hidden units of all B sequences (Team), at least kTeamSlice units each. One thread, a call
// from inside a parallel region, a narrow memory, or float64: a team of one over all B, whose
// GEMMs use every thread. float64 is the verification dtype: its sums over the hidden units keep
// one order, the reference's, rather than adding the members' partial sums.
constexpr int64_t kTeamSlice = 32;

template <typename T>
int64_t team_size(const Sizes& s) {
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (threads == 1 || s.B % threads == 0 || std::is_same_v<T, double>) return 1;
  return std::max<int64_t>(1, std::min(threads, s.h / kTeamSlice));
}

// f(sizes of a group of sequences, its first sequence, the team running it) over all B sequences.
template <typename T, typename F>
void over_sequences(const Sizes& s, const F& f) {
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t size = team_size<T>(s);
  if (threads > 1 && size == 1 && s.B % threads == 0) {
    at::parallel_for(0, s.B, s.B / threads, [&](int64_t b0, int64_t b1) {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;  // as on the calling thread
      Sizes g = s;
      g.B = 1;
      for (int64_t b = b0; b < b1; ++b) f(g, b, Team{});
    });
  } else if (size > 1) {
#ifdef _OPENMP
#pragma omp parallel num_threads(size)
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      f(s, 0, Team{omp_get_thread_num(), omp_get_num_threads()});
    }
#else
    f(s, 0, Team{});
#endif
  } else {
    f(s, 0, Team{});
  }
}

// Weight slots kept for the backward: the start weights of every K-th chunk, and the final weights
// when K > 1 (the backward rebuilds the other chunks' weights from the next chunk's).
int64_t weight_slots(const Sizes& s, int64_t K) { return (s.N + K - 1) / K + (K > 1 ? 1 : 0); }

template <typename F>
void dispatch(at::ScalarType ct, Act act, const F& f) {
  auto with_type = [&](auto zero) {
    using T = decltype(zero);
    switch (act) {
      case Act::kGelu: return f.template operator()<T, Act::kGelu>();
      case Act::kSilu: return f.template operator()<T, Act::kSilu>();
      case Act::kRelu: return f.template operator()<T, Act::kRelu>();
    }
  };
  if (ct == at::kDouble) {
    with_type(double{});
  } else {
    with_type(float{});
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> cms_chunk_update_fwd_cpp(
    const Tensor& x, const Tensor& target, const Tensor& w1, const Tensor& w2, double lr, int64_t chunk_size,
    std::string_view activation, bool save_residuals, int64_t checkpoint_every) {
  const Act act = parse_activation(activation);
  TORCH_CHECK(checkpoint_every >= 1, "cms_chunk_update_cpp: checkpoint_every must be >= 1, got ", checkpoint_every);
  TORCH_CHECK(w1.dim() == 3, "cms_chunk_update_cpp: w1 must be [B, h, d], got ", w1.sizes());
  const Sizes s = make_sizes(x, target, w1.size(1), chunk_size);
  const at::ScalarType ct = compute_type(x);
  expect(w1, "w1", {s.B, s.h, s.d}, "[B, h, d]");
  expect(w2, "w2", {s.B, s.e, s.h}, "[B, e, h]");
  expect_dtype(w1, "w1", ct);
  expect_dtype(w2, "w2", ct);
  const auto opts = x.options().dtype(ct);
  const Tensor X = x.to(ct).contiguous(), V = target.to(ct).contiguous();
  const Tensor W1 = w1.clone(at::MemoryFormat::Contiguous), W2 = w2.clone(at::MemoryFormat::Contiguous);
  const Tensor out = at::empty({s.B, s.T, s.e}, opts);
  const int64_t width = 2 * s.h + s.e;
  const int64_t K = checkpoint_every, slots = weight_slots(s, K);
  const Tensor starts1 = save_residuals ? empty_large({s.B, slots, s.h, s.d}, opts) : Tensor();
  const Tensor starts2 = save_residuals ? empty_large({s.B, slots, s.e, s.h}, opts) : Tensor();
  const Tensor acts =
      save_residuals ? empty_large({s.B, s.T, width}, opts) : at::empty({s.B, std::min(s.C, s.T), width}, opts);
  dispatch(ct, act, [&]<typename T, Act A>() {
    const int64_t members = team_size<T>(s);
    const Tensor shared = members > 1 ? at::empty({members, s.B * s.C * s.e}, opts) : Tensor();  // O partial sums
    over_sequences<T>(s, [&](const Sizes& g, int64_t b0, const Team& team) {
      auto part = [&](const Tensor& t) { return t.defined() ? t.narrow(0, b0, g.B) : t; };
      const Tensor partial = team.size > 1 ? shared : at::empty({1, g.B * g.C * g.e}, opts);
      forward_impl<T, A>(g, K, team, part(X), part(V), lr, part(W1), part(W2), part(out), part(starts1),
                         part(starts2), part(acts), partial);
    });
  });
  if (!save_residuals) {
    return {out.to(x.scalar_type()), W1, W2, at::empty({0}, opts), at::empty({0}, opts), at::empty({0}, opts)};
  }
  return {out.to(x.scalar_type()), W1, W2, starts1, starts2, acts};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cms_chunk_update_bwd_cpp(
    const Tensor& x, const Tensor& target, const Tensor& w1_starts, const Tensor& w2_starts,
    const Tensor& activations, double lr, int64_t chunk_size, std::string_view activation, const Tensor& do_,
    const Tensor& dw1_final, const Tensor& dw2_final, int64_t checkpoint_every) {
  const Act act = parse_activation(activation);
  TORCH_CHECK(checkpoint_every >= 1, "cms_chunk_update_cpp: checkpoint_every must be >= 1, got ", checkpoint_every);
  TORCH_CHECK(w1_starts.dim() == 4, "cms_chunk_update_cpp: w1_starts must be [B, S, h, d], got ", w1_starts.sizes());
  const Sizes s = make_sizes(x, target, w1_starts.size(2), chunk_size);
  const at::ScalarType ct = compute_type(x);
  const int64_t K = checkpoint_every, slots = weight_slots(s, K);
  expect(w1_starts, "w1_starts", {s.B, slots, s.h, s.d}, "[B, S, h, d]");
  expect(w2_starts, "w2_starts", {s.B, slots, s.e, s.h}, "[B, S, e, h]");
  expect(activations, "activations", {s.B, s.T, 2 * s.h + s.e}, "[B, T, 2h + e]");
  expect(do_, "do", {s.B, s.T, s.e}, "[B, T, e]");
  expect(dw1_final, "dw1_final", {s.B, s.h, s.d}, "[B, h, d]");
  expect(dw2_final, "dw2_final", {s.B, s.e, s.h}, "[B, e, h]");
  const auto opts = x.options().dtype(ct);
  const Tensor X = x.to(ct).contiguous(), dO = do_.to(ct).contiguous();
  const Tensor S1 = w1_starts.to(ct).contiguous(), S2 = w2_starts.to(ct).contiguous();
  const Tensor acts = activations.to(ct).contiguous();
  const Tensor dW1 = dw1_final.to(opts, /*non_blocking=*/false, /*copy=*/true).contiguous();
  const Tensor dW2 = dw2_final.to(opts, /*non_blocking=*/false, /*copy=*/true).contiguous();
  const Tensor dX = at::empty({s.B, s.T, s.d}, opts);
  const Tensor dV = at::empty({s.B, s.T, s.e}, opts);
  dispatch(ct, act, [&]<typename T, Act A>() {
    const int64_t members = team_size<T>(s), BC = s.B * s.C;
    // the team's partial sums of de and dX, and the rows (E_t, dŌ_t) all members read
    const Tensor shared_e = members > 1 ? at::empty({members, BC * s.e}, opts) : Tensor();
    const Tensor shared_x = members > 1 ? at::empty({members, BC * s.d}, opts) : Tensor();
    const Tensor shared_u = members > 1 ? at::empty({2 * BC * s.e}, opts) : Tensor();
    over_sequences<T>(s, [&](const Sizes& g, int64_t b0, const Team& team) {
      auto part = [&](const Tensor& t) { return t.narrow(0, b0, g.B); };
      const int64_t gc = g.B * g.C;
      const bool shared = team.size > 1;
      backward_impl<T, A>(g, K, team, part(X), part(S1), part(S2), part(acts), lr, part(dO), part(dW1), part(dW2),
                          part(dX), part(dV), shared ? shared_e : at::empty({1, gc * g.e}, opts),
                          shared ? shared_x : at::empty({1, gc * g.d}, opts),
                          shared ? shared_u : at::empty({2 * gc * g.e}, opts));
    });
  });
  return {dX.to(x.scalar_type()), dV.to(target.scalar_type()), dW1, dW2};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nested_learning, m) {
  m.def(
      "cms_chunk_update_fwd_cpp(Tensor x, Tensor target, Tensor w1, Tensor w2, float lr, int chunk_size, "
      "str activation, bool save_residuals, int checkpoint_every) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cms_chunk_update_bwd_cpp(Tensor x, Tensor target, Tensor w1_starts, Tensor w2_starts, "
      "Tensor activations, float lr, int chunk_size, str activation, Tensor do, Tensor dw1_final, "
      "Tensor dw2_final, int checkpoint_every) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nested_learning, CPU, m) {
  m.impl("cms_chunk_update_fwd_cpp", &cms_chunk_update_fwd_cpp);
  m.impl("cms_chunk_update_bwd_cpp", &cms_chunk_update_bwd_cpp);
}
