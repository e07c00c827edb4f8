// Deep-momentum step (memory_mlp_momentum): one CPU call over every tensor of a (device, dtype) group.
//
// One bucket memory m(x) = W2·SiLU(LN(W1 x + b1)) + b2 runs on every S-coordinate block of every
// tensor, x = [g_b ; m_b] (g = u + λW, zero-padded tail block). Per tensor (n coordinates, o its
// outputs): the internal loss ℓ(o, g, o_prev) (surrogate, l2_regression against t = P g, or dot),
// s·∂ℓ/∂θ accumulated into the weight gradients, then m ← μm + o, W ← W − lr·m, o_prev ← o.
//
// Layout. Every block of the call is one row of an [N, ·] batch, cut into panels of at most 128
// rows at S = 4096 (512 at S ≤ 1024). A panel is either a run of full blocks of one tensor, read in
// place as [rows, S] views of its gradient and momentum, or rows packed from several tensors (tail
// blocks, small tensors; the gradient is packed too when it is 16-bit or weight-decayed). Each
// thread takes a contiguous range of panels and runs single-threaded BLAS on them: no
// synchronisation inside a pass. W1g, W1m, W2 are packed for the BLAS once per call (MKL's packed
// format where available) and shared by the threads.
//
//   pass 1, per panel:  A = G W1gᵀ + M W1mᵀ;  â, r, s = LN/SiLU(A + b1);  O = s W2ᵀ + b2
//                       per-row sums ‖o‖², ‖g‖², ⟨o,g⟩, ‖o − o_prev‖² (l2: ‖o − t‖²)
//   between passes:     per-tensor ℓ and dO = α·o + β·g + γ·(o − o_prev) (l2: κ·(o − t); dot: −s·g)
//   pass 2, per panel:  dO rows;  dS = dO W2;  LN/SiLU backward → dA (s recomputed from â);
//                       dW2 += dOᵀ s;  dW1gᵀ += Gᵀ dA;  dW1mᵀ += Mᵀ dA;  then the state updates
//
// The two passes are needed because α, β, γ depend on norms over the whole tensor. Kept between
// them: O [N, S] (the state update needs it anyway), â [N, h] and r [N]; no GEMM is redone (14·S·h
// flop per block: 6 forward, 8 backward). Without compute_grad there is one pass, each panel's
// state update right after its forward. l2_regression packs G [N, S] once, computes every target
// t = P g as one multithreaded GEMM against the P the call started with, keeps e = o − t [N, S],
// and ends with P += Σ_tensors λ/‖g‖² · Eᵀ G (multithreaded GEMMs, rounded into P once).
//
// Sums. Per-row sums are added per tensor in row order (the losses do not depend on the thread
// count); dW1ᵀ and dW2 are summed per thread by the GEMMs (over ≤ 512 rows each) and db1, dγ, dβ,
// db2 per thread in float64, then added to weight_grads. Results are deterministic for a given
// thread count.
//
// Precision: compute dtype float64 for float64 parameters, else float32 (bf16/fp16 parameters and
// gradients widened on load). g = u + λW and the state updates are evaluated in float64 and
// rounded once to their dtype (parameters to nearest even); the per-tensor scalars are float64.

// at::vec::Vectorized's AVX2 implementations (Sleef exp) when compiled for AVX2 + FMA.
#if defined(__AVX2__) && defined(__FMA__) && !defined(CPU_CAPABILITY)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <string_view>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

// BLAS (LP64 Fortran interface) and MKL's per-thread thread count, exported by libtorch_cpu in MKL
// builds of PyTorch (null otherwise: the GEMMs then go through ATen).
extern "C" {
__attribute__((weak)) void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                                  const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                                  const float* beta, float* c, const int* ldc);
__attribute__((weak)) void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                                  const double* alpha, const double* a, const int* lda, const double* b,
                                  const int* ldb, const double* beta, double* c, const int* ldc);
__attribute__((weak)) int MKL_Set_Num_Threads_Local(int threads);
__attribute__((weak)) size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k);
__attribute__((weak)) void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                                            const float* src, int ld, float* dest);
__attribute__((weak)) void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a,
                                               int lda, const float* b, int ldb, float beta, float* c, int ldc);
}

namespace {

using at::Tensor;
template <typename A>
using Vec = at::vec::Vectorized<A>;

constexpr double kNormEps = 1e-8;        // norms at or below switch the surrogate's terms off
constexpr int64_t kPanelElems = 1 << 19;  // rows per panel × S: 128 rows at S = 4096 (a [rows, S] fp32 operand: 2 MiB)
constexpr int64_t kPanelRows = 512;        // at most (longer GEMM reductions over rows lose fp32 accuracy)
constexpr int64_t kChunk = 256;           // elements of a 16-bit parameter row widened at a time

enum class Loss { kSurrogate, kL2, kDot };

Loss parse_loss(std::string_view name) {
  if (name == "surrogate") return Loss::kSurrogate;
  if (name == "l2_regression") return Loss::kL2;
  if (name == "dot") return Loss::kDot;
  TORCH_CHECK(false, "memory_mlp_momentum_cpp: loss must be 'surrogate', 'l2_regression' or 'dot', got '", name, "'");
}

// ------------------------------------------------------------------------------ GEMM

// Row-major C[m, n] = α·op(A)·op(B) + β·C, op(A) [m, k] (A stored [k, m] when ta), op(B) [k, n]
// (B stored [n, k] when tb), leading dimensions in elements. Runs on the calling thread when called
// inside a parallel region.
template <typename A>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, A alpha, const A* a, int64_t lda, const A* b,
          int64_t ldb, A beta, A* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  // Column-major BLAS on row-major data: Cᵀ = op(B)ᵀ op(A)ᵀ.
  const char tra = ta ? 'T' : 'N', trb = tb ? 'T' : 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
  if constexpr (std::is_same_v<A, float>) {
    if (sgemm_ != nullptr && k > 0) return sgemm_(&trb, &tra, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
  } else {
    if (dgemm_ != nullptr && k > 0) return dgemm_(&trb, &tra, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value);
  auto view = [&](const A* p, int64_t rows, int64_t cols, int64_t ld, bool t) {
    Tensor x = at::from_blob(const_cast<A*>(p), {t ? cols : rows, t ? rows : cols}, {ld, 1}, opts);
    return t ? x.t() : x;
  };
  Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  Tensor prod = at::mm(view(a, m, k, lda, ta), view(b, k, n, ldb, tb));
  if (beta == A(0)) {
    C.copy_(prod.mul_(alpha));
  } else {
    C.mul_(beta).add_(prod, alpha);
  }
}

// at::empty, asking Linux to back it with transparent huge pages where it grants them on request: the
// buffers of a call (≈ 50 MiB for 10M parameters) are fresh memory every call, first touched 2 MiB
// rather than 4 KiB per page fault.
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

// A GEMM's right operand op(B) [k, n], packed once by the BLAS (MKL's packed-matrix API, float32) and
// reused by every panel's C[m, n] = op(A)·op(B) + β·C, m ≤ the m it was packed for; unpacked
// elsewhere.
template <typename A>
struct PackedB {
  static constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;
  const A* b;
  int64_t k, n, ldb;
  bool tb;
  Tensor packed;

  PackedB(const A* b_, bool tb_, int64_t m, int64_t k_, int64_t n_, int64_t ldb_)
      : b(b_), k(k_), n(n_), ldb(ldb_), tb(tb_) {
    if constexpr (std::is_same_v<A, float>) {
      if (cblas_sgemm_pack_get_size != nullptr && cblas_sgemm_pack != nullptr && cblas_sgemm_compute != nullptr) {
        const size_t bytes =
            cblas_sgemm_pack_get_size(kBMatrix, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k));
        packed = empty_large({static_cast<int64_t>((bytes + 3) / 4)}, at::kFloat);
        const int mkl_threads = MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0;
        cblas_sgemm_pack(kRowMajor, kBMatrix, tb ? kTrans : kNoTrans, static_cast<int>(m), static_cast<int>(n),
                         static_cast<int>(k), 1.0f, b, static_cast<int>(ldb), packed.data_ptr<float>());
        if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(mkl_threads);
      }
    }
  }

  // C[m, n] = A[m, k]·op(B) + β·C (A row-major, lda).
  void mul(int64_t m, const A* a, int64_t lda, A beta, A* c, int64_t ldc) const {
    if constexpr (std::is_same_v<A, float>) {
      if (packed.defined()) {
        return cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, static_cast<int>(m), static_cast<int>(n),
                                   static_cast<int>(k), a, static_cast<int>(lda), packed.data_ptr<float>(),
                                   static_cast<int>(n), beta, c, static_cast<int>(ldc));
      }
    }
    gemm<A>(false, tb, m, n, k, A(1), a, lda, b, ldb, beta, c, ldc);
  }
};

// ------------------------------------------------------------------------------ vector helpers

template <typename A>
inline Vec<A> load(const A* p, int64_t n) {
  return n == Vec<A>::size() ? Vec<A>::loadu(p) : Vec<A>::loadu(p, n);  // lanes past n read as 0
}

template <typename A>
inline void store(const Vec<A>& x, A* p, int64_t n) {
  if (n == Vec<A>::size()) {
    x.store(p);
  } else {
    x.store(p, static_cast<int>(n));
  }
}

// f(j, n) over the vectors of a row of `width` elements: n lanes from column j.
template <typename A, typename F>
inline void for_lanes(int64_t width, const F& f) {
  constexpr int64_t kLanes = Vec<A>::size();
  int64_t j = 0;
  for (; j + kLanes <= width; j += kLanes) f(j, kLanes);
  if (j < width) f(j, width - j);
}

template <typename A>
inline double hsum(const Vec<A>& v) {
  alignas(64) A lanes[Vec<A>::size()];
  v.store(lanes);
  double s = 0;
  for (int64_t i = 0; i < Vec<A>::size(); ++i) s += static_cast<double>(lanes[i]);
  return s;
}

template <typename A>
inline Vec<A> sigmoid(const Vec<A>& z) {
  const Vec<A> one(A(1));
  return one / (one + z.neg().exp());
}

// out[0..n) = A(in[0..n)), and back (to nearest even for 16-bit types).
template <typename T, typename A>
inline void widen(const T* in, A* out, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    std::memcpy(out, in, n * sizeof(A));
  } else {
    at::vec::convert(in, out, n);
  }
}

template <typename T, typename A>
inline void narrow(const A* in, T* out, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    std::memcpy(out, in, n * sizeof(A));
  } else {
    at::vec::convert(in, out, n);
  }
}

// ------------------------------------------------------------------------------ the step

struct Hyper {
  Loss loss;
  double lr, momentum, weight_decay, loss_scale, projection_lr, ln_eps;
  bool compute_grad;
};

// One tensor of the group. T: parameter dtype, A: compute dtype.
template <typename T, typename A>
struct Item {
  T* param;
  const T* grad;
  A* mom;
  A* prev;
  int64_t n;
  bool has_prev;
};

// Rows [row0, row0 + rows) of the batch. `item` >= 0: full blocks block0.. of that tensor, read in
// place (the gradient too when `gview`); item < 0: rows packed from the row table.
struct Panel {
  int64_t row0, rows, item, block0;
  bool gview;
};

// Per-tensor results of pass 1: dO = co·o + cg·g + cd·(o − o_prev) + ce·(o − t); l2: Ê = es·(o − t).
struct Coef {
  double co = 0, cg = 0, cd = 0, ce = 0, es = 0;
};

enum Sum : int { kOO = 0, kGG = 1, kOG = 2, kDD = 3, kSums = 4 };  // ‖o‖², ‖g‖², ⟨o,g⟩, ‖o − o_prev‖² or ‖o − t‖²

template <typename T, typename A>
struct Step {
  const Hyper hy;
  const int64_t S, h;
  std::vector<Item<T, A>> items;
  std::vector<int32_t> row_item;  // tensor of each row
  std::vector<int64_t> row_block;  // its block index in that tensor
  std::vector<Panel> panels;
  int64_t N = 0;
  // memory weights
  const A *w1, *b1, *gamma, *beta, *w2, *b2;
  // [N, ·] buffers
  A *out = nullptr, *ahat = nullptr, *rstd = nullptr, *gall = nullptr, *eall = nullptr;
  std::vector<double> sums;  // [N, kSums]
  std::vector<Coef> coef;

  Step(const Hyper& hyper, int64_t S_, int64_t h_) : hy(hyper), S(S_), h(h_) {}

  bool fused() const { return !hy.compute_grad; }
  int64_t offset(int64_t r) const { return row_block[r] * S; }
  int64_t length(int64_t r) const { return std::min(S, items[row_item[r]].n - row_block[r] * S); }

  // ---------------------------------------------------------------------------- layout

  void plan() {
    const int64_t panel_rows = std::clamp<int64_t>(kPanelElems / S, 8, kPanelRows);
    const bool grad_in_place = std::is_same_v<T, A> && hy.weight_decay == 0.0 && hy.loss != Loss::kL2;
    std::vector<std::pair<int32_t, int64_t>> packed;  // (tensor, block) rows to pack
    for (size_t i = 0; i < items.size(); ++i) {
      const int64_t n = items[i].n, full = n / S, blocks = (n + S - 1) / S;
      int64_t b = 0;
      if (full >= std::max<int64_t>(4, panel_rows / 4)) {  // full blocks in place, in equal panels
        const int64_t count = (full + panel_rows - 1) / panel_rows;
        for (int64_t p = 0; p < count; ++p) {
          const int64_t end = full * (p + 1) / count;
          panels.push_back({N, end - b, static_cast<int64_t>(i), b, grad_in_place});
          for (; b < end; ++b, ++N) {
            row_item.push_back(static_cast<int32_t>(i));
            row_block.push_back(b);
          }
        }
      }
      for (; b < blocks; ++b) packed.emplace_back(static_cast<int32_t>(i), b);
    }
    const int64_t total = static_cast<int64_t>(packed.size());
    for (int64_t p0 = 0; p0 < total; p0 += panel_rows) {
      const int64_t rows = std::min(panel_rows, total - p0);
      panels.push_back({N, rows, -1, 0, false});
      for (int64_t r = p0; r < p0 + rows; ++r, ++N) {
        row_item.push_back(packed[r].first);
        row_block.push_back(packed[r].second);
      }
    }
  }

  // Panels [first[t], first[t + 1]) go to thread t: contiguous, about N / threads rows each.
  std::vector<int64_t> split(int threads) const {
    std::vector<int64_t> first(threads + 1, static_cast<int64_t>(panels.size()));
    first[0] = 0;
    int t = 1;
    for (size_t p = 0; p < panels.size() && t < threads; ++p) {
      while (t < threads && panels[p].row0 >= N * t / threads) first[t++] = static_cast<int64_t>(p);
    }
    return first;
  }

  // ---------------------------------------------------------------------------- per-row kernels

  // g row r (length len, zero-padded to S): u + λW in A.
  void pack_g(int64_t r, A* dst) const {
    const Item<T, A>& it = items[row_item[r]];
    const int64_t off = offset(r), len = length(r);
    if (hy.weight_decay == 0.0) {
      widen(it.grad + off, dst, len);
    } else {  // in float64, rounded once (λ is not rounded to the compute dtype first)
      const double wd = hy.weight_decay;
      alignas(64) A u[kChunk], p[kChunk];
      for (int64_t c = 0; c < len; c += kChunk) {
        const int64_t n = std::min(kChunk, len - c);
        const A* __restrict uu = u;
        const A* __restrict pp = p;
        if constexpr (std::is_same_v<T, A>) {
          uu = it.grad + off + c;
          pp = it.param + off + c;
        } else {
          widen(it.grad + off + c, u, n);
          widen(it.param + off + c, p, n);
        }
        A* __restrict d = dst + c;
        for (int64_t j = 0; j < n; ++j) {
          d[j] = static_cast<A>(static_cast<double>(uu[j]) + wd * static_cast<double>(pp[j]));
        }
      }
    }
    std::fill(dst + len, dst + S, A(0));
  }

  void pack_m(int64_t r, A* dst) const {
    const Item<T, A>& it = items[row_item[r]];
    const int64_t len = length(r);
    std::memcpy(dst, it.mom + offset(r), len * sizeof(A));
    std::fill(dst + len, dst + S, A(0));
  }

  // Pre-activation row a (in place: + b1) → â (stored), r = 1/√(σ² + ε) (stored), s = SiLU(γ â + β).
  void ln_forward(A* a, A* ah, A* r_out, A* s) const {
    const int64_t h_ = h;
    const A *b1_ = b1, *g_ = gamma, *be_ = beta;
    Vec<A> acc(A(0));
    for_lanes<A>(h_, [&](int64_t j, int64_t n) {
      const Vec<A> x = load(a + j, n) + load(b1_ + j, n);
      store(x, a + j, n);
      acc = acc + x;
    });
    const A mean = static_cast<A>(hsum(acc) / static_cast<double>(h_));
    const Vec<A> mean_v(mean), zero(A(0));
    Vec<A> var(A(0));
    for_lanes<A>(h_, [&](int64_t j, int64_t n) {
      Vec<A> d = load(a + j, n) - mean_v;
      if (n != Vec<A>::size()) d = Vec<A>::set(zero, d, n);
      var = at::vec::fmadd(d, d, var);
    });
    const A r = A(1) / std::sqrt(static_cast<A>(hsum(var) / static_cast<double>(h_)) + static_cast<A>(hy.ln_eps));
    *r_out = r;
    const Vec<A> r_v(r);
    for_lanes<A>(h_, [&](int64_t j, int64_t n) {
      const Vec<A> x = (load(a + j, n) - mean_v) * r_v;
      store(x, ah + j, n);
      const Vec<A> z = at::vec::fmadd(load(g_ + j, n), x, load(be_ + j, n));
      store(z * sigmoid(z), s + j, n);
    });
  }

  // ds row (the GEMM's dO W2) → s (recomputed), da; db1, dγ, dβ (float64 sums, consecutive in
  // `sums`) += this row's terms. dz: scratch row.
  void ln_backward(const A* ds, const A* ah, A r, A* s, A* da, A* dz, double* sums) const {
    const int64_t h_ = h;
    const A *g_ = gamma, *be_ = beta;
    const Vec<A> one(A(1));
    Vec<A> m1(A(0)), m2(A(0));
    for_lanes<A>(h_, [&](int64_t j, int64_t n) {
      const Vec<A> x = load(ah + j, n), gm = load(g_ + j, n);
      const Vec<A> z = at::vec::fmadd(gm, x, load(be_ + j, n));
      const Vec<A> sg = sigmoid(z);
      store(z * sg, s + j, n);
      const Vec<A> dzv = load(ds + j, n) * sg * at::vec::fmadd(z, one - sg, one);  // lanes past n: ds = 0
      store(dzv, dz + j, n);
      const Vec<A> dx = dzv * gm;
      store(dx, da + j, n);
      m1 = m1 + dx;
      m2 = at::vec::fmadd(dx, x, m2);
    });
    const Vec<A> mean1(static_cast<A>(hsum(m1) / static_cast<double>(h_)));
    const Vec<A> mean2(static_cast<A>(hsum(m2) / static_cast<double>(h_)));
    const Vec<A> r_v(r);
    for_lanes<A>(h_, [&](int64_t j, int64_t n) {
      store((load(da + j, n) - mean1 - load(ah + j, n) * mean2) * r_v, da + j, n);
    });
    double *db1 = sums, *dgamma = sums + h_, *dbeta = sums + 2 * h_;
    for (int64_t j = 0; j < h_; ++j) {
      db1[j] += static_cast<double>(da[j]);
      dgamma[j] += static_cast<double>(dz[j] * ah[j]);
      dbeta[j] += static_cast<double>(dz[j]);
    }
  }

  // Pass-1 row: o += b2 (stored), the row's sums; l2: e = o − t in place of t (padding zeroed).
  void row_forward(int64_t r, A* o, const A* g) {
    const Item<T, A>& it = items[row_item[r]];
    const int64_t len = length(r);
    const A* prev = it.prev + offset(r);
    const A* b2_ = b2;
    Vec<A> oo(A(0)), gg(A(0)), og(A(0)), dd(A(0));
    if (hy.loss == Loss::kL2) {
      A* e = eall + r * S;
      for_lanes<A>(len, [&](int64_t j, int64_t n) {
        const Vec<A> y = load(o + j, n) + load(b2_ + j, n);
        store(y, o + j, n);
        const Vec<A> x = load(g + j, n), d = y - load(e + j, n);
        store(d, e + j, n);
        gg = at::vec::fmadd(x, x, gg);
        dd = at::vec::fmadd(d, d, dd);
      });
      std::fill(e + len, e + S, A(0));
    } else {
      const bool with_prev = hy.loss == Loss::kSurrogate && it.has_prev;
      for_lanes<A>(len, [&](int64_t j, int64_t n) {
        const Vec<A> y = load(o + j, n) + load(b2_ + j, n);
        store(y, o + j, n);
        const Vec<A> x = load(g + j, n);
        oo = at::vec::fmadd(y, y, oo);
        gg = at::vec::fmadd(x, x, gg);
        og = at::vec::fmadd(y, x, og);
        if (with_prev) {
          const Vec<A> d = y - load(prev + j, n);
          dd = at::vec::fmadd(d, d, dd);
        }
      });
    }
    double* s = sums.data() + r * kSums;
    s[kOO] = hsum(oo);
    s[kGG] = hsum(gg);
    s[kOG] = hsum(og);
    s[kDD] = hsum(dd);
  }

  // Pass-2 row: dO (padding zeroed); db2 (float64 sums) += dO; l2: e ← es·e (the projection update's Ê).
  void row_grad(int64_t r, const A* o, const A* g, A* d, double* db2) const {
    const Item<T, A>& it = items[row_item[r]];
    const int64_t len = length(r);
    const Coef& c = coef[row_item[r]];
    const Vec<A> co(static_cast<A>(c.co)), cg(static_cast<A>(c.cg)), cd(static_cast<A>(c.cd));
    if (hy.loss == Loss::kL2) {
      A* e = eall + r * S;
      const Vec<A> ce(static_cast<A>(c.ce)), es(static_cast<A>(c.es));
      for_lanes<A>(len, [&](int64_t j, int64_t n) {
        const Vec<A> x = load(e + j, n);
        store(x * ce, d + j, n);
        store(x * es, e + j, n);
      });
    } else if (hy.loss == Loss::kDot) {
      for_lanes<A>(len, [&](int64_t j, int64_t n) { store(load(g + j, n) * cg, d + j, n); });
    } else if (it.has_prev && c.cd != 0.0) {
      const A* prev = it.prev + offset(r);
      for_lanes<A>(len, [&](int64_t j, int64_t n) {
        const Vec<A> y = load(o + j, n);
        const Vec<A> v = at::vec::fmadd(y, co, load(g + j, n) * cg);
        store(at::vec::fmadd(y - load(prev + j, n), cd, v), d + j, n);
      });
    } else {
      for_lanes<A>(len, [&](int64_t j, int64_t n) {
        store(at::vec::fmadd(load(o + j, n), co, load(g + j, n) * cg), d + j, n);
      });
    }
    std::fill(d + len, d + S, A(0));
    for (int64_t j = 0; j < len; ++j) db2[j] += static_cast<double>(d[j]);
  }

  // m ← μm + o;  W ← W − lr·m;  o_prev ← o  (the row's real coordinates), each in float64 and rounded
  // once to its dtype (μ and lr are not rounded to the compute dtype first).
  void row_update(int64_t r, const A* o) const {
    const Item<T, A>& it = items[row_item[r]];
    const int64_t off = offset(r), len = length(r);
    const double mu = hy.momentum, lr = hy.lr;
    alignas(64) A p[kChunk];
    for (int64_t c = 0; c < len; c += kChunk) {
      const int64_t n = std::min(kChunk, len - c);
      A* __restrict pp;
      if constexpr (std::is_same_v<T, A>) {
        pp = it.param + off + c;
      } else {
        widen(it.param + off + c, p, n);
        pp = p;
      }
      A* __restrict m = it.mom + off + c;
      A* __restrict prev = it.prev + off + c;
      const A* __restrict y = o + c;
      for (int64_t j = 0; j < n; ++j) {
        const A mm = static_cast<A>(static_cast<double>(m[j]) * mu + static_cast<double>(y[j]));
        m[j] = mm;
        pp[j] = static_cast<A>(static_cast<double>(pp[j]) - lr * static_cast<double>(mm));
        prev[j] = y[j];
      }
      if constexpr (!std::is_same_v<T, A>) narrow(p, it.param + off + c, n);
    }
  }

  // ---------------------------------------------------------------------------- panels

  std::vector<PackedB<A>> packs;  // W1gᵀ, W1mᵀ, W2ᵀ (forward), W2 (backward)

  // One thread's panel buffers and gradient sums.
  struct Work {
    Tensor buffer;
    A *g, *m, *o, *d;  // [rows, S]: packed gradient and momentum rows, O (one pass), dO
    A *a, *s, *da, *dz;  // [rows, h]: pre-activation (then dS), SiLU output, dA; [h]: dz
    A *dw1, *dw2;  // GEMM gradient sums: dW1ᵀ [2S, h], dW2 [S, h]
    std::vector<double> sums;  // db1, dγ, dβ [h] and db2 [S]
  };

  // The panel's G and M operands (pointer, leading dimension): in place or packed into w.
  std::pair<const A*, const A*> operands(const Panel& pn, Work& w) const {
    const A *G, *M;
    if (pn.item >= 0) {
      const Item<T, A>& it = items[pn.item];
      M = it.mom + pn.block0 * S;
      G = pn.gview ? reinterpret_cast<const A*>(it.grad) + pn.block0 * S : nullptr;
    } else {
      for (int64_t i = 0; i < pn.rows; ++i) pack_m(pn.row0 + i, w.m + i * S);
      M = w.m;
      G = nullptr;
    }
    if (G == nullptr) {
      if (hy.loss == Loss::kL2) {
        G = gall + pn.row0 * S;
      } else {
        for (int64_t i = 0; i < pn.rows; ++i) pack_g(pn.row0 + i, w.g + i * S);
        G = w.g;
      }
    }
    return {G, M};
  }

  void forward(const Panel& pn, Work& w) {
    const auto [G, M] = operands(pn, w);
    const int64_t rows = pn.rows;
    A* a = w.a;
    packs[0].mul(rows, G, S, A(0), a, h);
    packs[1].mul(rows, M, S, A(1), a, h);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t r = pn.row0 + i;
      ln_forward(a + i * h, ahat + r * h, rstd + r, w.s + i * h);
    }
    A* o = fused() ? w.o : out + pn.row0 * S;
    packs[2].mul(rows, w.s, h, A(0), o, S);
    for (int64_t i = 0; i < rows; ++i) {
      row_forward(pn.row0 + i, o + i * S, G + i * S);
      if (fused()) row_update(pn.row0 + i, o + i * S);
    }
  }

  void backward(const Panel& pn, Work& w) {
    const auto [G, M] = operands(pn, w);
    const int64_t rows = pn.rows;
    const A* o = out + pn.row0 * S;
    A *d = w.d, *a = w.a, *s = w.s, *da = w.da;
    for (int64_t i = 0; i < rows; ++i) row_grad(pn.row0 + i, o + i * S, G + i * S, d + i * S, w.sums.data() + 3 * h);
    packs[3].mul(rows, d, S, A(0), a, h);  // dS = dO W2
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t r = pn.row0 + i;
      ln_backward(a + i * h, ahat + r * h, rstd[r], s + i * h, da + i * h, w.dz, w.sums.data());
    }
    gemm<A>(true, false, S, h, rows, A(1), d, S, s, h, A(1), w.dw2, h);           // dW2 += dOᵀ s
    gemm<A>(true, false, S, h, rows, A(1), G, S, da, h, A(1), w.dw1, h);          // dW1gᵀ += Gᵀ dA
    gemm<A>(true, false, S, h, rows, A(1), M, S, da, h, A(1), w.dw1 + S * h, h);  // dW1mᵀ += Mᵀ dA
    for (int64_t i = 0; i < rows; ++i) row_update(pn.row0 + i, o + i * S);
  }

  // f(panel, work) over every panel, each thread on its own contiguous range.
  template <typename F>
  void over_panels(const std::vector<int64_t>& first, std::vector<Work>& work, const F& f) {
    const int threads = static_cast<int>(work.size());
    at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;  // as on the calling thread
      const int mkl_threads = MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0;
      for (int64_t t = t0; t < t1; ++t) {
        for (int64_t p = first[t]; p < first[t + 1]; ++p) f(panels[p], work[t]);
      }
      if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(mkl_threads);
    });
  }

  // ---------------------------------------------------------------------------- between the passes

  // The per-tensor losses (returned: s·Σℓ) and dO coefficients.
  double losses() {
    std::vector<std::array<double, kSums>> per(items.size(), std::array<double, kSums>{});
    for (int64_t r = 0; r < N; ++r) {
      for (int k = 0; k < kSums; ++k) per[row_item[r]][k] += sums[r * kSums + k];
    }
    coef.assign(items.size(), Coef{});
    const double s = hy.loss_scale;
    double total = 0;
    for (size_t i = 0; i < items.size(); ++i) {
      const double n = static_cast<double>(items[i].n);
      const double on = std::sqrt(per[i][kOO]), gn = std::sqrt(per[i][kGG]), c = per[i][kOG];
      Coef& k = coef[i];
      double loss = 0;
      if (hy.loss == Loss::kDot) {
        loss = -c;
        k.cg = -s;
      } else if (hy.loss == Loss::kL2) {
        loss = per[i][kDD] / n;
        k.ce = 2.0 * s / n;
        k.es = per[i][kGG] > kNormEps ? hy.projection_lr / per[i][kGG] : 0.0;
      } else {
        if (on > kNormEps && gn > kNormEps) {
          loss += 1.0 - c / (on * gn);
          if (items[i].n > 1) {  // one coordinate: cos = ±1, whose gradient is 0 (not two large terms that cancel)
            k.cg -= s / (on * gn);
            k.co += s * c / (on * on * on * gn);
          }
        }
        if (gn > kNormEps) {
          const double q = on / gn - 1.0;
          loss += 0.1 * q * q;
          if (on > 0) k.co += s * 0.2 * q / (on * gn);
        } else {
          loss += 0.1 * on * on;
          k.co += s * 0.2;
        }
        if (items[i].has_prev) {
          loss += 0.1 * per[i][kDD] / n;
          k.cd = s * 0.2 / n;
        }
      }
      total += s * loss;
    }
    return total;
  }

  // ---------------------------------------------------------------------------- driver

  Tensor run(at::TensorList weights, at::TensorList weight_grads, const Tensor& projection) {
    const auto opts = weights[0].options();
    w1 = weights[0].data_ptr<A>();
    b1 = weights[1].data_ptr<A>();
    gamma = weights[2].data_ptr<A>();
    beta = weights[3].data_ptr<A>();
    w2 = weights[4].data_ptr<A>();
    b2 = weights[5].data_ptr<A>();
    plan();
    if (N == 0) return at::zeros({}, opts);
    const bool l2 = hy.loss == Loss::kL2;

    const Tensor ahat_t = empty_large({N, h}, opts), rstd_t = at::empty({N}, opts);
    ahat = ahat_t.data_ptr<A>();
    rstd = rstd_t.data_ptr<A>();
    Tensor out_t, g_t, e_t;
    if (!fused()) {
      out_t = empty_large({N, S}, opts);
      out = out_t.data_ptr<A>();
    }
    sums.assign(N * kSums, 0.0);
    if (l2) {  // G, then every target t = P g at once (the P the call started with)
      g_t = empty_large({N, S}, opts);
      e_t = empty_large({N, S}, opts);
      gall = g_t.data_ptr<A>();
      eall = e_t.data_ptr<A>();
      at::parallel_for(0, N, std::max<int64_t>(1, 4096 / S), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) pack_g(r, gall + r * S);
      });
      at::mm_out(e_t, g_t, projection.t());
    }

    const int64_t available = at::in_parallel_region() ? 1 : at::get_num_threads();
    const int threads = static_cast<int>(std::clamp<int64_t>(static_cast<int64_t>(panels.size()), 1, available));
    const std::vector<int64_t> first = split(threads);
    int64_t max_rows = 0;
    for (const Panel& p : panels) max_rows = std::max(max_rows, p.rows);
    packs.emplace_back(w1, true, max_rows, S, h, 2 * S);                        // A = G W1gᵀ
    packs.emplace_back(w1 + S, true, max_rows, S, h, 2 * S);                    //   + M W1mᵀ
    packs.emplace_back(w2, true, max_rows, h, S, h);                            // O = s W2ᵀ
    if (hy.compute_grad) packs.emplace_back(w2, false, max_rows, S, h, h);      // dS = dO W2
    const Tensor partial = hy.compute_grad ? empty_large({threads, 3 * S * h}, opts).zero_() : Tensor();  // dW1ᵀ, dW2
    std::vector<Work> work(threads);
    for (int t = 0; t < threads; ++t) {
      Work& w = work[t];
      const int64_t wide = max_rows * S, narrow_ = max_rows * h;
      const Tensor buffer = empty_large({4 * wide + 3 * narrow_ + h}, opts);
      w.buffer = buffer;
      w.g = buffer.data_ptr<A>();
      w.m = w.g + wide;
      w.o = w.m + wide;
      w.d = w.o + wide;
      w.a = w.d + wide;
      w.s = w.a + narrow_;
      w.da = w.s + narrow_;
      w.dz = w.da + narrow_;
      if (!hy.compute_grad) continue;
      w.sums.assign(3 * h + S, 0.0);
      w.dw1 = partial[t].data_ptr<A>();
      w.dw2 = w.dw1 + 2 * S * h;
    }

    over_panels(first, work, [&](const Panel& pn, Work& w) { forward(pn, w); });
    const double total = losses();
    if (hy.compute_grad) {
      over_panels(first, work, [&](const Panel& pn, Work& w) { backward(pn, w); });
      for (int t = 0; t < threads; ++t) {
        weight_grads[0].add_(partial[t].narrow(0, 0, 2 * S * h).view({2 * S, h}).t());
        weight_grads[4].view({S * h}).add_(partial[t].narrow(0, 2 * S * h, S * h));
      }
      std::vector<double> vs(3 * h + S, 0.0);
      for (const Work& w : work) {
        for (size_t j = 0; j < vs.size(); ++j) vs[j] += w.sums[j];
      }
      const Tensor vsum = at::from_blob(vs.data(), {3 * h + S}, at::kDouble).to(opts.dtype());
      const int64_t starts[] = {0, h, 2 * h, 0, 3 * h};
      for (int k : {1, 2, 3, 5}) weight_grads[k].add_(vsum.narrow(0, starts[k - 1], weight_grads[k].numel()));
    } else if (l2) {
      at::parallel_for(0, N, std::max<int64_t>(1, 4096 / S), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          A* e = eall + r * S;
          const Vec<A> es(static_cast<A>(coef[row_item[r]].es));
          for_lanes<A>(S, [&](int64_t j, int64_t n) { store(load(e + j, n) * es, e + j, n); });
        }
      });
    }
    if (l2) {  // P += Σ λ/‖g‖² · Eᵀ G, summed apart (over kPanelRows rows at a time) and rounded into P once
      const Tensor delta = empty_large({S, S}, opts).zero_();
      for (int64_t r0 = 0; r0 < N; r0 += kPanelRows) {
        const int64_t len = std::min(kPanelRows, N - r0);
        delta.addmm_(e_t.narrow(0, r0, len).t(), g_t.narrow(0, r0, len));
      }
      projection.add_(delta);
    }
    return at::scalar_tensor(total, opts);
  }
};

void check(const Tensor& t, const char* name, size_t i, at::IntArrayRef sizes, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.sizes() == sizes && t.is_contiguous(),
              "memory_mlp_momentum_cpp: ", name, "[", i, "] must be a contiguous CPU ", dtype, " tensor of shape ",
              sizes, ", got ", t.scalar_type(), " of shape ", t.sizes(), " on ", t.device());
}

Tensor memory_mlp_momentum_cpp(at::TensorList params, at::TensorList grads, at::TensorList momenta,
                               at::TensorList prev_outputs, c10::List<bool> has_prev, at::TensorList weights,
                               at::TensorList weight_grads, const Tensor& projection, double lr, double momentum,
                               double weight_decay, std::string_view loss, double loss_scale, bool compute_grad,
                               double projection_lr, double ln_eps) {
  const Hyper hy{parse_loss(loss), lr, momentum, weight_decay, loss_scale, projection_lr, ln_eps, compute_grad};
  TORCH_CHECK(weights.size() == 6 && weight_grads.size() == 6,
              "memory_mlp_momentum_cpp: weights and weight_grads must hold 6 tensors (w1, b1, ln_weight, ln_bias, "
              "w2, b2)");
  TORCH_CHECK(weights[0].dim() == 2 && weights[0].size(1) % 2 == 0 && weights[0].numel() > 0,
              "memory_mlp_momentum_cpp: weights[0] (w1) must be [h, 2S], got ", weights[0].sizes());
  const int64_t h = weights[0].size(0), S = weights[0].size(1) / 2;
  const at::ScalarType ct = weights[0].scalar_type();
  TORCH_CHECK(ct == at::kFloat || ct == at::kDouble, "memory_mlp_momentum_cpp: the memory weights must be float32 or "
              "float64, got ", ct);
  const std::vector<std::vector<int64_t>> shapes{{h, 2 * S}, {h}, {h}, {h}, {S, h}, {S}};
  for (size_t k = 0; k < 6; ++k) {
    check(weights[k], "weights", k, shapes[k], ct);
    check(weight_grads[k], "weight_grads", k, shapes[k], ct);
  }
  if (hy.loss == Loss::kL2) check(projection, "projection", 0, {S, S}, ct);
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && momenta.size() == n && prev_outputs.size() == n && has_prev.size() == n,
              "memory_mlp_momentum_cpp: grads, momenta, prev_outputs and has_prev must have one entry per parameter");
  if (n == 0) return at::zeros({}, weights[0].options());
  const at::ScalarType dtype = params[0].scalar_type();
  TORCH_CHECK((dtype == at::kDouble) == (ct == at::kDouble),
              "memory_mlp_momentum_cpp: float64 parameters need float64 memory weights, others float32; got ", dtype,
              " and ", ct);
  for (size_t i = 0; i < n; ++i) {
    check(params[i], "params", i, params[i].sizes(), dtype);
    check(grads[i], "grads", i, params[i].sizes(), dtype);
    check(momenta[i], "momenta", i, params[i].sizes(), ct);
    check(prev_outputs[i], "prev_outputs", i, params[i].sizes(), ct);
  }
  auto launch = [&](auto param_zero) {
    using T = decltype(param_zero);
    using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
    Step<T, A> step(hy, S, h);
    for (size_t i = 0; i < n; ++i) {
      const int64_t numel = params[i].numel();
      if (numel == 0) continue;
      step.items.push_back({params[i].data_ptr<T>(), grads[i].data_ptr<T>(), momenta[i].data_ptr<A>(),
                            prev_outputs[i].data_ptr<A>(), numel, has_prev.get(i)});
    }
    return step.run(weights, weight_grads, projection);
  };
  switch (dtype) {
    case at::kFloat: return launch(float{});
    case at::kDouble: return launch(double{});
    case at::kBFloat16: return launch(c10::BFloat16{});
    case at::kHalf: return launch(c10::Half{});
    default:
      TORCH_CHECK(false, "memory_mlp_momentum_cpp: params must be float32, float64, bfloat16 or float16, got ", dtype);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nested_learning, m) {
  m.def(
      "memory_mlp_momentum_cpp(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momenta, Tensor(c!)[] prev_outputs, "
      "bool[] has_prev, Tensor[] weights, Tensor(d!)[] weight_grads, Tensor(e!) projection, float lr, float momentum, "
      "float weight_decay, str loss, float loss_scale, bool compute_grad, float projection_lr, "
      "float ln_eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(nested_learning, CPU, m) {
  m.impl("memory_mlp_momentum_cpp", &memory_mlp_momentum_cpp);
}
