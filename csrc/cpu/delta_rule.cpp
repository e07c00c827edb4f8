// Delta-rule outer-product weight update: CPU forward and backward kernels.
//
// Per (sequence, head), state S ∈ R^{K×V}, α_t = exp(g_t):
//     S_t = α_t S_{t-1} + β_t k_t (v_t − α_t S_{t-1}ᵀ k_t)ᵀ,        o_t = S_tᵀ (scale · q_t)
//
// Tiles. Column j of S only ever sees column j of v, so S is cut into column tiles of kTile
// values (K×kTile numbers: 8 KiB of float at K = 64, in L1) and every (sequence, head, tile)
// is an independent task. A token is one sweep over the rows of the tile that updates each row
// and, while the row is in registers, accumulates S_tᵀ q_t and S_tᵀ k_{t+1} (the next token's
// prediction): 3·K·V FMAs per token, against 3·K·V + 2.5·C·(K+V) for the chunked WY form.
//
// Lazy decay. A tile is held as S = γ S̃. With S' = α_t S_{t-1} = γ' S̃ (γ' = γ α_t),
//     S_t = S' + k_t e_tᵀ = γ' (S̃ + k_t (e_t / γ')ᵀ),
// so the update is one FMA per element rather than a multiply and an FMA. Once γ' falls below
// kFoldBelow the token folds it into the state instead (S̃ ← γ' S̃ + k_t e_tᵀ, γ = 1).
//
// Backward. A forward sweep checkpoints each tile at every chunk start. Chunks are then walked
// in reverse: each is recomputed from its checkpoint keeping all its states (they stay in L2)
// and the token-level adjoint runs back over it, one fused sweep per token. The state adjoint
// is lazy too: dS = δ D̃.
//
// Gradients that sum over columns (dq, dk, dβ, dg) add up over the tiles of a head; when a
// head's tiles run on different threads each writes its own slice, summed afterwards.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__)
// vec<double> is 64 bytes, whose by-value ABI GCC notes differs under AVX-512; all such
// functions here are internal and inlined.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace {

using at::Tensor;

// A lazy decay factor (γ, δ) is folded into its state once it would drop below this.
constexpr double kFoldBelow = 1.0 / (1 << 20);

// ------------------------------------------------------------------------------ vectors

// Eight lanes of T as a GCC/Clang vector: one AVX2 register for float, two for double.
// `memory` is the same vector as it may lie in memory: at any alignment of T, aliasing T.
template <typename T>
struct Lanes {
  typedef T type __attribute__((vector_size(8 * sizeof(T))));
  typedef T memory __attribute__((vector_size(8 * sizeof(T)), aligned(alignof(T)), may_alias));
};
template <typename T>
using vec = typename Lanes<T>::type;

constexpr int kVecs = 4;          // vectors per tile row (sum and dot_lanes add four)
constexpr int kTile = 8 * kVecs;  // columns of a state tile

// One row of a tile, or any kTile-vector, kept in registers.
template <typename T>
struct Row {
  vec<T> v[kVecs];

  static Row load(const T* p) {
    Row r;
    for (int i = 0; i < kVecs; ++i) r.v[i] = reinterpret_cast<const typename Lanes<T>::memory*>(p)[i];
    return r;
  }
  void store(T* p) const {
    for (int i = 0; i < kVecs; ++i) reinterpret_cast<typename Lanes<T>::memory*>(p)[i] = v[i];
  }
};

template <typename T>
inline Row<T> operator+(const Row<T>& a, const Row<T>& b) {
  Row<T> r;
  for (int i = 0; i < kVecs; ++i) r.v[i] = a.v[i] + b.v[i];
  return r;
}

template <typename T>
inline Row<T> operator-(const Row<T>& a, const Row<T>& b) {
  Row<T> r;
  for (int i = 0; i < kVecs; ++i) r.v[i] = a.v[i] - b.v[i];
  return r;
}

template <typename T>
inline Row<T> operator*(const Row<T>& a, const Row<T>& b) {
  Row<T> r;
  for (int i = 0; i < kVecs; ++i) r.v[i] = a.v[i] * b.v[i];
  return r;
}

template <typename T>
inline Row<T> operator*(const Row<T>& a, T b) {
  Row<T> r;
  for (int i = 0; i < kVecs; ++i) r.v[i] = a.v[i] * b;
  return r;
}

// Σ_j a_j.
template <typename T>
inline T sum(const Row<T>& a) {
  const vec<T> s = (a.v[0] + a.v[1]) + (a.v[2] + a.v[3]);
  return ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
}

// Σ_i a.v[i] ⊙ b.v[i]: a row product folded to one vector (Σ_j a_j b_j is its lane sum).
template <typename T>
inline vec<T> dot_lanes(const Row<T>& a, const Row<T>& b) {
  return (a.v[0] * b.v[0] + a.v[1] * b.v[1]) + (a.v[2] * b.v[2] + a.v[3] * b.v[3]);  // two short chains
}

// {Σ_l x[0][l], …, Σ_l x[7][l]}: the lane sums of eight vectors at once (a transpose-add).
template <typename T>
inline vec<T> lane_sums(const vec<T>* x) {
  auto pairs = [](const vec<T>& a, const vec<T>& b) {  // {a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7}
    return vec<T>{a[0], a[2], b[0], b[2], a[4], a[6], b[4], b[6]} +
           vec<T>{a[1], a[3], b[1], b[3], a[5], a[7], b[5], b[7]};
  };
  const vec<T> lo = pairs(pairs(x[0], x[1]), pairs(x[2], x[3]));  // x0..x3: first-half then second-half sums
  const vec<T> hi = pairs(pairs(x[4], x[5]), pairs(x[6], x[7]));
  return vec<T>{lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]} +
         vec<T>{lo[4], lo[5], lo[6], lo[7], hi[4], hi[5], hi[6], hi[7]};
}

// dst[0..n) += x[0..n), n <= 8.
template <typename T>
inline void add_lanes(T* dst, const vec<T>& x, int64_t n) {
  if (n == 8) {
    auto* d = reinterpret_cast<typename Lanes<T>::memory*>(dst);
    *d = *d + x;
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] += x[j];
  }
}

// dst[0..N) ← src[0..N) in dst's type.
template <int N, typename in_t, typename out_t>
inline void convert_n(const in_t* src, out_t* dst) {
  for (int j = 0; j < N; ++j) dst[j] = static_cast<out_t>(src[j]);
}

// ------------------------------------------------------------------------------ problem

// Sizes, and where each sequence lies among the B·T flattened tokens.
struct Problem {
  int64_t B, T, H, K, V, N;
  std::vector<int64_t> start, length;  // sequence n: flat tokens start[n] .. start[n]+length[n]-1

  int64_t tiles() const { return (V + kTile - 1) / kTile; }
};

void expect(const Tensor& x, const char* name, int64_t dim) {
  TORCH_CHECK(x.device().is_cpu(), "delta_rule_cpp: ", name, " must be a CPU tensor");
  TORCH_CHECK(x.is_contiguous(), "delta_rule_cpp: ", name, " must be contiguous");
  TORCH_CHECK(x.dim() == dim, "delta_rule_cpp: ", name, " must have ", dim, " dims, got ", x.sizes());
}

void expect_shape(const Tensor& x, const char* name, at::IntArrayRef shape, const char* layout) {
  expect(x, name, static_cast<int64_t>(shape.size()));
  TORCH_CHECK(x.sizes() == shape, "delta_rule_cpp: ", name, " must be ", layout, " = ", shape, ", got ", x.sizes());
}

Problem make_problem(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta,
                     const std::optional<Tensor>& g, const std::optional<Tensor>& initial_state,
                     const std::optional<Tensor>& cu_seqlens) {
  expect(q, "q", 4);
  expect(v, "v", 4);
  Problem p{q.size(0), q.size(1), q.size(2), q.size(3), v.size(3), q.size(0), {}, {}};
  expect_shape(k, "k", q.sizes(), "[B, T, H, K]");
  expect_shape(v, "v", {p.B, p.T, p.H, p.V}, "[B, T, H, V]");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "delta_rule_cpp: q, k, v must share one dtype");
  expect_shape(beta, "beta", {p.B, p.T, p.H}, "[B, T, H]");
  if (g) expect_shape(*g, "g", {p.B, p.T, p.H}, "[B, T, H]");
  if (cu_seqlens) {
    expect(*cu_seqlens, "cu_seqlens", 1);
    TORCH_CHECK(cu_seqlens->scalar_type() == at::kLong, "delta_rule_cpp: cu_seqlens must be int64");
    TORCH_CHECK(p.B == 1 && cu_seqlens->numel() >= 2, "delta_rule_cpp: cu_seqlens needs B == 1 and >= 2 offsets");
    const int64_t* cu = cu_seqlens->data_ptr<int64_t>();
    p.N = cu_seqlens->numel() - 1;
    TORCH_CHECK(cu[0] == 0 && cu[p.N] == p.T, "delta_rule_cpp: cu_seqlens must run from 0 to T");
    for (int64_t n = 0; n < p.N; ++n) {
      TORCH_CHECK(cu[n + 1] >= cu[n], "delta_rule_cpp: cu_seqlens must not decrease");
      p.start.push_back(cu[n]);
      p.length.push_back(cu[n + 1] - cu[n]);
    }
  } else {
    for (int64_t n = 0; n < p.N; ++n) {
      p.start.push_back(n * p.T);
      p.length.push_back(p.T);
    }
  }
  if (initial_state) expect_shape(*initial_state, "initial_state", {p.N, p.H, p.K, p.V}, "[N, H, K, V]");
  return p;
}

// One (sequence, head, column tile), whose dq, dk, dβ, dg go to partial-sum slice `slice`.
struct Task {
  int64_t n, h, tile, slice;
};

// Tasks per thread, and the number of partial-sum slices they write.
struct Plan {
  std::vector<std::vector<Task>> bins;
  int64_t slices, makespan;
};

// Longest first, each unit of tasks to the least loaded thread. A unit is a whole head (all its
// tiles on one thread, sharing one slice) or, with split_heads, a single tile (slice = tile).
Plan plan(const Problem& p, bool split_heads) {
  std::vector<std::vector<Task>> units;
  for (int64_t n = 0; n < p.N; ++n) {
    for (int64_t h = 0; h < p.H; ++h) {
      if (!split_heads) units.emplace_back();
      for (int64_t c = 0; c < p.tiles(); ++c) {
        if (split_heads) units.emplace_back();
        units.back().push_back({n, h, c, split_heads ? c : 0});
      }
    }
  }
  auto cost = [&](const std::vector<Task>& u) { return (p.length[u[0].n] + 1) * static_cast<int64_t>(u.size()); };
  std::stable_sort(units.begin(), units.end(), [&](const auto& a, const auto& b) { return cost(a) > cost(b); });
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), units.size()));
  Plan out{std::vector<std::vector<Task>>(threads), split_heads ? p.tiles() : 1, 0};
  std::vector<int64_t> load(threads, 0);
  for (const auto& u : units) {
    const int64_t b = std::min_element(load.begin(), load.end()) - load.begin();
    out.bins[b].insert(out.bins[b].end(), u.begin(), u.end());
    load[b] += cost(u);
  }
  out.makespan = *std::max_element(load.begin(), load.end());
  return out;
}

// Whole heads per thread unless splitting heads into tiles balances the threads clearly better.
Plan schedule(const Problem& p) {
  Plan heads = plan(p, false), tiles = plan(p, true);
  return heads.makespan * 10 <= tiles.makespan * 11 ? heads : tiles;
}

template <typename F>
void run_schedule(const Plan& plan, const F& work) {
  at::parallel_for(0, static_cast<int64_t>(plan.bins.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) work(plan.bins[b]);
  });
}

// Tokens per chunk: the backward keeps C states of a K×kTile tile (256 KiB of float up to
// K = 128, 512 KiB at K = 256) and a checkpoint every C tokens; chunks are also the unit of
// staging, and prefetching runs one chunk ahead.
int64_t chunk_length(int64_t K) {
  return std::clamp<int64_t>((int64_t{1} << 16) / (K * kTile), 16, 64);
}

// Where the inputs of one task lie: token t of its sequence at q + t * qk_step, and so on.
template <typename in_t, typename acc_t>
struct TileSource {
  const in_t *q, *k, *v;        // v at the tile's first column
  const acc_t *beta, *g, *do_;  // g null: α ≡ 1; do (at the tile's first column) null: not staged
  int64_t qk_step, v_step, bg_step;
  int64_t length, width;  // tokens; valid columns of the tile (<= kTile)

  // Asks for the rows of token t (if any) to be brought into L2 ahead of their staging; the
  // token loops call it one chunk ahead, a token per step. Always inlined: GCC drops calls to a
  // function that only prefetches as side-effect free.
  [[gnu::always_inline]] void prefetch(int64_t t, int64_t K) const {
    if (t < 0 || t >= length) return;
    prefetch_bytes(q + t * qk_step, K * sizeof(in_t));
    prefetch_bytes(k + t * qk_step, K * sizeof(in_t));
    prefetch_bytes(v + t * v_step, width * sizeof(in_t));
    if (do_) prefetch_bytes(do_ + t * v_step, width * sizeof(acc_t));
  }

  [[gnu::always_inline]] static void prefetch_bytes(const void* p, size_t bytes) {
    for (size_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(p) + b, 0, 2);
  }
};

template <typename in_t, typename acc_t>
TileSource<in_t, acc_t> tile_source(const Problem& p, const Task& task, const Tensor& q, const Tensor& k,
                                    const Tensor& v, const Tensor& beta, const Tensor* g, const Tensor* do_) {
  const int64_t bg = p.start[task.n] * p.H + task.h, qk = bg * p.K, vo = bg * p.V + task.tile * kTile;
  return {q.data_ptr<in_t>() + qk,
          k.data_ptr<in_t>() + qk,
          v.data_ptr<in_t>() + vo,
          beta.data_ptr<acc_t>() + bg,
          g ? g->data_ptr<acc_t>() + bg : nullptr,
          do_ ? do_->data_ptr<acc_t>() + vo : nullptr,
          p.H * p.K,
          p.H * p.V,
          p.H,
          p.length[task.n],
          std::min<int64_t>(kTile, p.V - task.tile * kTile)};
}

// Inputs of tokens [first, end) of one task in the compute type, a contiguous row per token
// (K values of q and k; kTile values of v and do, zero beyond the tile's valid columns).
// Staging a chunk at a time keeps the strided [B, T, H, ·] reads out of the token loop.
template <typename acc_t>
class Staged {
 public:
  Staged(int64_t K, int64_t rows)
      : K_(K), q_(rows * K), k_(rows * K), v_(rows * kTile), dout_(rows * kTile), beta_(rows), alpha_(rows) {}

  template <typename in_t>
  void load(const TileSource<in_t, acc_t>& src, int64_t first, int64_t end) {
    first_ = first;
    for (int64_t t = first; t < end; ++t) {
      const int64_t r = t - first;
      convert(src.q + t * src.qk_step, K_, q_.data() + r * K_, K_);
      convert(src.k + t * src.qk_step, K_, k_.data() + r * K_, K_);
      convert(src.v + t * src.v_step, src.width, v_.data() + r * kTile, kTile);
      if (src.do_) convert(src.do_ + t * src.v_step, src.width, dout_.data() + r * kTile, kTile);
      beta_[r] = src.beta[t * src.bg_step];
      alpha_[r] = src.g ? std::exp(src.g[t * src.bg_step]) : acc_t(1);
    }
  }

  const acc_t* q(int64_t t) const { return q_.data() + (t - first_) * K_; }
  const acc_t* k(int64_t t) const { return k_.data() + (t - first_) * K_; }
  Row<acc_t> v(int64_t t) const { return Row<acc_t>::load(v_.data() + (t - first_) * kTile); }
  Row<acc_t> dout(int64_t t) const { return Row<acc_t>::load(dout_.data() + (t - first_) * kTile); }
  acc_t beta(int64_t t) const { return beta_[t - first_]; }
  acc_t alpha(int64_t t) const { return alpha_[t - first_]; }

 private:
  // dst[0..n) ← src[0..n), dst[n..size) ← 0 (plain loops: inlined, unlike std::copy's memmove).
  template <typename in_t>
  static void convert(const in_t* src, int64_t n, acc_t* dst, int64_t size) {
    if (n == kTile) return convert_n<kTile>(src, dst);  // a full tile row: fixed length, vectorised
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(src[j]);
    for (int64_t j = n; j < size; ++j) dst[j] = acc_t(0);
  }

  int64_t K_, first_ = 0;
  std::vector<acc_t> q_, k_, v_, dout_, beta_, alpha_;
};

// Row-major K×V matrix [n, h] of a [N, H, K, V] tensor, at the tile's first column.
template <typename T>
T* state_block(const Problem& p, const Task& task, T* base) {
  return base + (task.n * p.H + task.h) * p.K * p.V + task.tile * kTile;
}

// tile (K×kTile, zero-padded) ← block (K rows of stride V), or zeros when block is null.
template <typename acc_t>
void load_tile(acc_t* tile, const acc_t* block, int64_t K, int64_t V, int64_t width) {
  for (int64_t i = 0; i < K; ++i) {
    for (int j = 0; j < kTile; ++j) tile[i * kTile + j] = block && j < width ? block[i * V + j] : acc_t(0);
  }
}

// block ← factor · tile, valid columns only.
template <typename acc_t>
void store_tile(acc_t* block, const acc_t* tile, acc_t factor, int64_t K, int64_t V, int64_t width) {
  for (int64_t i = 0; i < K; ++i) {
    for (int64_t j = 0; j < width; ++j) block[i * V + j] = factor * tile[i * kTile + j];
  }
}

// out[j] ← row[j] for the valid columns, in the output type.
template <typename out_t, typename acc_t>
void store_row(out_t* out, const Row<acc_t>& row, int64_t width) {
  acc_t tmp[kTile];
  row.store(tmp);
  if (width == kTile) return convert_n<kTile>(tmp, out);
  for (int64_t j = 0; j < width; ++j) out[j] = static_cast<out_t>(tmp[j]);
}

// ------------------------------------------------------------------------------ forward sweep

// S̃ᵀ k over a K×kTile tile.
template <typename T>
Row<T> tile_project(const T* S, int64_t K, const T* k) {
  Row<T> acc{};
  for (int64_t i = 0; i < K; ++i) acc = acc + Row<T>::load(S + i * kTile) * k[i];
  return acc;
}

// One token over a K×kTile tile: S̃_out = c S̃_in + k ẽᵀ (c = 1 unless kFold; S_out may be
// S_in); from the new rows, p = S̃_outᵀ k_next and, when kOut, o = S̃_outᵀ q.
template <bool kFold, bool kOut, typename T>
void tile_update(const T* S_in, T* S_out, int64_t K, T c, const Row<T>& e, const T* k, const T* k_next,
                 const T* q, Row<T>& p, Row<T>& o) {
  Row<T> pa{}, oa{};
  for (int64_t i = 0; i < K; ++i) {
    Row<T> x = Row<T>::load(S_in + i * kTile);
    if constexpr (kFold) x = x * c;
    x = x + e * k[i];
    x.store(S_out + i * kTile);
    pa = pa + x * k_next[i];
    if constexpr (kOut) oa = oa + x * q[i];
  }
  p = pa;
  if constexpr (kOut) o = oa;
}

// The recurrence of one tile in lazy form S = γ S̃, with p = S̃ᵀ k_t for the coming token t.
template <typename T>
struct TileRecurrence {
  int64_t K, length;
  T scale;
  T gamma = 1;
  Row<T> p{};

  // Token t:  r_t = v_t − α_t S_{t-1}ᵀ k_t,  e_t = β_t r_t,  S_t = α_t S_{t-1} + k_t e_tᵀ.
  // Writes r_t to r (if given), S̃_t to S_out (may be S_in; null: only r_t is wanted) and
  // o_t = S_tᵀ (scale q_t) to o (if given). Needs tokens t and t + 1 (if any) staged.
  void advance(const Staged<T>& in, int64_t t, const T* S_in, T* S_out, T* r, Row<T>* o) {
    const T g_new = gamma * in.alpha(t);  // S' = α_t S_{t-1} = g_new S̃
    const bool fold = g_new < T(kFoldBelow);
    const Row<T> res = in.v(t) - p * g_new;
    if (r) res.store(r);
    if (!S_out) return;
    const T b = in.beta(t);
    const Row<T> e = res * (fold ? b : b / g_new);
    const T *k = in.k(t), *k_next = in.k(t + 1 < length ? t + 1 : t), *q = in.q(t);
    Row<T> oa;
    if (fold && o) tile_update<true, true>(S_in, S_out, K, g_new, e, k, k_next, q, p, oa);
    if (fold && !o) tile_update<true, false>(S_in, S_out, K, g_new, e, k, k_next, q, p, oa);
    if (!fold && o) tile_update<false, true>(S_in, S_out, K, T(1), e, k, k_next, q, p, oa);
    if (!fold && !o) tile_update<false, false>(S_in, S_out, K, T(1), e, k, k_next, q, p, oa);
    gamma = fold ? T(1) : g_new;
    if (o) *o = oa * (scale * gamma);
  }
};

template <typename in_t, typename acc_t>
void forward_impl(const Problem& p, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta,
                  const Tensor* g, const Tensor* h0, double scale, Tensor& o, Tensor& final_state) {
  const int64_t C = chunk_length(p.K);
  run_schedule(schedule(p), [&](const std::vector<Task>& tasks) {
    std::vector<acc_t> S(p.K * kTile);
    Staged<acc_t> in(p.K, C + 1);
    for (const Task& task : tasks) {
      const auto src = tile_source<in_t, acc_t>(p, task, q, k, v, beta, g, nullptr);
      const int64_t L = src.length;
      load_tile(S.data(), h0 ? state_block(p, task, h0->data_ptr<acc_t>()) : nullptr, p.K, p.V, src.width);
      TileRecurrence<acc_t> rec{p.K, L, static_cast<acc_t>(scale)};
      in_t* out = o.data_ptr<in_t>() + (p.start[task.n] * p.H + task.h) * p.V + task.tile * kTile;
      for (int64_t t0 = 0; t0 < L; t0 += C) {
        in.load(src, t0, std::min(t0 + C + 1, L));
        if (t0 == 0) rec.p = tile_project(S.data(), p.K, in.k(0));
        for (int64_t t = t0; t < std::min(t0 + C, L); ++t) {
          Row<acc_t> o_t{};
          src.prefetch(t + C + 1, p.K);
          rec.advance(in, t, S.data(), S.data(), nullptr, &o_t);
          store_row(out + t * src.v_step, o_t, src.width);
        }
      }
      store_tile(state_block(p, task, final_state.data_ptr<acc_t>()), S.data(), rec.gamma, p.K, p.V, src.width);
    }
  });
}

// ------------------------------------------------------------------------------ backward sweep

// The vectors of one reverse step (see adjoint_update) and the fold factor.
template <typename T>
struct AdjointStep {
  Row<T> e;  // δ e_t
  Row<T> w;  // dp_t / δ
  Row<T> u;  // scale do_{t-1} / δ_{t-1}
  T c;       // α_t δ (kFold only)
  T dk_w;    // α_t γ_{t-1} δ:  S'_t dp_t = dk_w S̃ w
  T dq_u;    // γ_{t-1} δ_{t-1}:  scale S_{t-1} do_{t-1} = dq_u S̃ u
};

// One reverse step over a K×kTile tile, with dS_t = δ D̃ (D, updated) and S_{t-1} = γ_{t-1} S̃ (S):
//   token t:    dk_t = dS_t e_t + S'_t dp_t = D̃ (δ e_t) + dk_w S̃ w;
//               dS'_t = dS_t + k_t dp_tᵀ = δ D̃' with D̃' = D̃ + k_t wᵀ;   gsum = Σ_rows D̃' ⊙ S̃
//   token t−1:  dS_{t-1} = α_t dS'_t + scale q_{t-1} do_{t-1}ᵀ, i.e. D̃ ← D̃' + q_{t-1} uᵀ (c D̃' + q_{t-1} uᵀ
//               when kFold);   de = Σ_rows k_{t-1} D̃;   dq_{t-1} = scale S_{t-1} do_{t-1} = dq_u S̃ u
// dk and dq_prev are accumulated into (+=).
template <bool kFold, typename T>
void adjoint_update(T* D, const T* S, int64_t K, const AdjointStep<T>& a, const T* k, const T* k_prev,
                    const T* q_prev, T* dk, T* dq_prev, Row<T>& gsum, Row<T>& de) {
  Row<T> g_acc{}, de_acc{};
  for (int64_t i0 = 0; i0 < K; i0 += 8) {  // rows in groups of 8: one transpose-add for their dk, dq
    const int64_t rows = std::min<int64_t>(8, K - i0);
    vec<T> de_lanes[8], dw_lanes[8], su_lanes[8];  // D̃ rows · e, S̃ rows · w, S̃ rows · u
    for (int64_t r = rows; r < 8; ++r) de_lanes[r] = dw_lanes[r] = su_lanes[r] = vec<T>{};
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      const Row<T> d = Row<T>::load(D + i * kTile), s = Row<T>::load(S + i * kTile);
      de_lanes[r] = dot_lanes(d, a.e);
      dw_lanes[r] = dot_lanes(s, a.w);
      su_lanes[r] = dot_lanes(s, a.u);
      const Row<T> d1 = d + a.w * k[i];
      g_acc = g_acc + d1 * s;
      const Row<T> x = (kFold ? d1 * a.c : d1) + a.u * q_prev[i];
      x.store(D + i * kTile);
      de_acc = de_acc + x * k_prev[i];
    }
    add_lanes(dk + i0, lane_sums<T>(de_lanes) + lane_sums<T>(dw_lanes) * a.dk_w, rows);
    add_lanes(dq_prev + i0, lane_sums<T>(su_lanes) * a.dq_u, rows);
  }
  gsum = g_acc;
  de = de_acc;
}

// Outputs of the backward, as raw pointers (see delta_rule_bwd_cpp).
template <typename in_t, typename acc_t>
struct Grads {
  acc_t *dq, *dk, *dbeta, *dg;  // zeroed partial sums: [slices, B·T, H, K] / [slices, B·T, H]
  in_t* dv;                     // [B·T, H, V]
  acc_t* dh0;                   // [N, H, K, V] or null
  const acc_t* dht;             // [N, H, K, V] or null
};

// Scratch of one thread: a tile's checkpoints, and the states and inputs of one chunk.
template <typename T>
struct BackwardScratch {
  int64_t K, C, ck_stride;  // a checkpoint is [S̃ (K·kTile) | p (kTile) | γ]
  std::vector<T> S_T, D, checkpoints, states, gammas, r, sink;
  Staged<T> in;

  BackwardScratch(int64_t K_, int64_t longest)
      : K(K_), C(chunk_length(K_)), ck_stride((K_ + 2) * kTile), S_T(K * kTile), D(K * kTile),
        checkpoints(((longest + C - 1) / C) * ck_stride), states(C * K * kTile), gammas(C), r(C * kTile), sink(K),
        in(K_, C + 2) {}

  T* checkpoint(int64_t c) { return checkpoints.data() + c * ck_stride; }
  T* state(int64_t j) { return states.data() + j * K * kTile; }  // S̃ before token j of the chunk
};

// The reverse walk of one tile (module comment), dS = δ D̃.
template <typename in_t, typename T>
struct TileAdjoint {
  const TileSource<in_t, T>& src;
  const Problem& p;
  const Task& task;
  const Grads<in_t, T>& out;
  BackwardScratch<T>& s;
  TileRecurrence<T> rec;
  T delta = 1;
  Row<T> de{};  // dS_tᵀ k_t of the token the next step handles

  int64_t flat(int64_t t) const { return (p.start[task.n] + t) * p.H + task.h; }  // [B·T, H] index
  int64_t part(int64_t t) const { return task.slice * p.B * p.T * p.H + flat(t); }  // [slices, B·T, H]
  int64_t chunks() const { return (src.length + s.C - 1) / s.C; }

  // Stages what chunk c needs: its tokens, the one before and the one after.
  void stage(int64_t c) {
    s.in.load(src, std::max<int64_t>(c * s.C - 1, 0), std::min((c + 1) * s.C + 1, src.length));
  }

  // Forward sweep from S_0 (in S_T): checkpoints at chunk starts; S_T ends as S̃_T.
  void sweep() {
    for (int64_t c = 0; c < chunks(); ++c) {
      stage(c);
      if (c == 0) rec.p = tile_project(s.S_T.data(), p.K, s.in.k(0));
      T* ck = s.checkpoint(c);
      std::copy(s.S_T.begin(), s.S_T.end(), ck);
      rec.p.store(ck + p.K * kTile);
      ck[(p.K + 1) * kTile] = rec.gamma;
      for (int64_t t = c * s.C; t < std::min((c + 1) * s.C, src.length); ++t) {
        src.prefetch(t + s.C + 1, p.K);
        rec.advance(s.in, t, s.S_T.data(), s.S_T.data(), nullptr, nullptr);
      }
    }
  }

  // The states before each token of (staged) chunk c, their γ and r_t, from its checkpoint.
  // Returns the state before the chunk's first token.
  const T* recompute(int64_t c) {
    const T* ck = s.checkpoint(c);
    rec.p = Row<T>::load(ck + p.K * kTile);
    rec.gamma = s.gammas[0] = ck[(p.K + 1) * kTile];
    const int64_t t0 = c * s.C, n = std::min(s.C, src.length - t0);
    for (int64_t j = 0; j < n; ++j) {
      T* next = j + 1 < n ? s.state(j + 1) : nullptr;
      rec.advance(s.in, t0 + j, j == 0 ? ck : s.state(j), next, s.r.data() + j * kTile, nullptr);
      if (next) s.gammas[j + 1] = rec.gamma;
    }
    return ck;
  }

  // The step of token t (t == length: the identity step that only adds token length−1's
  // output term) given S_{t-1} = gamma_prev · S_prev and r_t. Token-level adjoint:
  //   dv_t = β_t de,  dβ_t = de · r_t,  dp = −β_t de,  e_t = β_t r_t,
  //   dk_t = dS e_t + S' dp,  dS' = dS + k_t dpᵀ,  dg_t = ⟨dS', S'⟩,  dS ← α_t dS' + scale q_{t-1} do_{t-1}ᵀ.
  void step(int64_t t, const T* S_prev, T gamma_prev, const T* r_t) {
    const bool real = t < src.length, has_prev = t > 0;
    const T b = real ? s.in.beta(t) : T(0), alpha = real ? s.in.alpha(t) : T(1);
    const T d_new = alpha * delta;
    const bool fold = d_new < T(kFoldBelow);
    const T d_out = fold ? T(1) : d_new;
    const int64_t tk = real ? t : t - 1, tp = has_prev ? t - 1 : t;  // stand-ins when absent
    const Row<T> r = real ? Row<T>::load(r_t) : Row<T>{};
    const Row<T> dp = de * -b, do_prev = has_prev ? s.in.dout(tp) * rec.scale : Row<T>{};
    const AdjointStep<T> a{r * (delta * b), dp * (1 / delta), do_prev * (1 / d_out),
                           d_new, alpha * gamma_prev * delta, gamma_prev * d_out};
    if (real) {
      store_row(out.dv + flat(t) * p.V + task.tile * kTile, de * b, src.width);
      out.dbeta[part(t)] += sum(de * r);
    }
    T* dk = real ? out.dk + part(t) * p.K : s.sink.data();
    T* dq = has_prev ? out.dq + part(t - 1) * p.K : s.sink.data();
    const T *k = s.in.k(tk), *k_prev = s.in.k(tp), *q_prev = s.in.q(tp);
    Row<T> gsum, de_prev;
    if (fold) {
      adjoint_update<true>(s.D.data(), S_prev, p.K, a, k, k_prev, q_prev, dk, dq, gsum, de_prev);
    } else {
      adjoint_update<false>(s.D.data(), S_prev, p.K, a, k, k_prev, q_prev, dk, dq, gsum, de_prev);
    }
    if (real && out.dg) out.dg[part(t)] += alpha * gamma_prev * delta * sum(gsum);
    delta = d_out;
    de = de_prev * delta;
  }

  // On entry S_0 is in S_T and dS_T in D; on exit dS_0 = delta · D.
  void run() {
    sweep();
    const T gamma_T = rec.gamma;
    for (int64_t c = chunks() - 1; c >= 0; --c) {
      stage(c);
      if (c == chunks() - 1) step(src.length, s.S_T.data(), gamma_T, nullptr);
      const T* first = recompute(c);
      for (int64_t t = std::min(src.length, (c + 1) * s.C) - 1; t >= c * s.C; --t) {
        const int64_t j = t - c * s.C;
        src.prefetch(t - s.C - 1, p.K);
        step(t, j == 0 ? first : s.state(j), s.gammas[j], s.r.data() + j * kTile);
      }
    }
  }
};

template <typename in_t, typename acc_t>
void backward_impl(const Problem& p, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta,
                   const Tensor* g, const Tensor* h0, const Tensor& do_, double scale, const Plan& plan,
                   const Grads<in_t, acc_t>& out) {
  const int64_t longest = p.length.empty() ? 0 : *std::max_element(p.length.begin(), p.length.end());
  run_schedule(plan, [&](const std::vector<Task>& tasks) {
    BackwardScratch<acc_t> scratch(p.K, longest);
    for (const Task& task : tasks) {
      const auto src = tile_source<in_t, acc_t>(p, task, q, k, v, beta, g, &do_);
      load_tile(scratch.S_T.data(), h0 ? state_block(p, task, h0->data_ptr<acc_t>()) : nullptr, p.K, p.V,
                src.width);
      load_tile(scratch.D.data(), out.dht ? state_block(p, task, out.dht) : nullptr, p.K, p.V, src.width);
      TileAdjoint<in_t, acc_t> adj{src, p, task, out, scratch, {p.K, src.length, static_cast<acc_t>(scale)}};
      adj.run();
      if (out.dh0) store_tile(state_block(p, task, out.dh0), scratch.D.data(), adj.delta, p.K, p.V, src.width);
    }
  });
}

// ------------------------------------------------------------------------------ operators

at::ScalarType compute_type(const Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::optional<Tensor> as_compute(const std::optional<Tensor>& x, at::ScalarType ct) {
  return x ? std::optional<Tensor>(x->to(ct).contiguous()) : std::nullopt;
}

const Tensor* ptr(const std::optional<Tensor>& x) {
  return x ? &*x : nullptr;
}

std::tuple<Tensor, Tensor> delta_rule_fwd_cpp(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta,
                                              const std::optional<Tensor>& g,
                                              const std::optional<Tensor>& initial_state,
                                              const std::optional<Tensor>& cu_seqlens, double scale) {
  const Problem p = make_problem(q, k, v, beta, g, initial_state, cu_seqlens);
  const at::ScalarType ct = compute_type(q);
  const Tensor beta_c = beta.to(ct).contiguous();
  const auto g_c = as_compute(g, ct), h0_c = as_compute(initial_state, ct);
  Tensor o = at::empty({p.B, p.T, p.H, p.V}, q.options());
  Tensor final_state = at::empty({p.N, p.H, p.K, p.V}, q.options().dtype(ct));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "delta_rule_fwd_cpp", [&] {
    forward_impl<scalar_t, at::opmath_type<scalar_t>>(p, q, k, v, beta_c, ptr(g_c), ptr(h0_c), scale, o,
                                                      final_state);
  });
  return {o, final_state};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> delta_rule_bwd_cpp(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& beta, const std::optional<Tensor>& g,
    const std::optional<Tensor>& initial_state, const std::optional<Tensor>& cu_seqlens, double scale,
    const Tensor& do_, const std::optional<Tensor>& dht) {
  const Problem p = make_problem(q, k, v, beta, g, initial_state, cu_seqlens);
  expect_shape(do_, "do", v.sizes(), "[B, T, H, V]");
  if (dht) expect_shape(*dht, "dht", {p.N, p.H, p.K, p.V}, "[N, H, K, V]");
  const at::ScalarType ct = compute_type(q);
  const Tensor beta_c = beta.to(ct).contiguous(), do_c = do_.to(ct).contiguous();
  const auto g_c = as_compute(g, ct), h0_c = as_compute(initial_state, ct), dht_c = as_compute(dht, ct);
  const auto acc = q.options().dtype(ct);
  const Plan plan = schedule(p);
  Tensor dq = at::zeros({plan.slices, p.B, p.T, p.H, p.K}, acc), dk = at::zeros_like(dq);
  Tensor dbeta = at::zeros({plan.slices, p.B, p.T, p.H}, acc);
  Tensor dg = g ? at::zeros_like(dbeta) : Tensor();
  Tensor dv = at::empty_like(v);
  Tensor dh0 = initial_state ? at::empty({p.N, p.H, p.K, p.V}, acc) : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "delta_rule_bwd_cpp", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Grads<scalar_t, acc_t> out{dq.data_ptr<acc_t>(),
                                     dk.data_ptr<acc_t>(),
                                     dbeta.data_ptr<acc_t>(),
                                     g ? dg.data_ptr<acc_t>() : nullptr,
                                     dv.data_ptr<scalar_t>(),
                                     initial_state ? dh0.data_ptr<acc_t>() : nullptr,
                                     dht_c ? dht_c->data_ptr<acc_t>() : nullptr};
    backward_impl<scalar_t, acc_t>(p, q, k, v, beta_c, ptr(g_c), ptr(h0_c), do_c, scale, plan, out);
  });
  auto slice_sum = [](const Tensor& x, at::ScalarType dtype) { return (x.size(0) == 1 ? x[0] : x.sum(0)).to(dtype); };
  const Tensor empty = at::empty({0}, q.options());
  return {slice_sum(dq, q.scalar_type()),
          slice_sum(dk, q.scalar_type()),
          dv,
          slice_sum(dbeta, beta.scalar_type()),
          g ? slice_sum(dg, g->scalar_type()) : empty,
          initial_state ? dh0.to(initial_state->scalar_type()) : empty};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nested_learning, m) {
  m.def(
      "delta_rule_fwd_cpp(Tensor q, Tensor k, Tensor v, Tensor beta, Tensor? g, Tensor? initial_state, "
      "Tensor? cu_seqlens, float scale) -> (Tensor o, Tensor final_state)");
  m.def(
      "delta_rule_bwd_cpp(Tensor q, Tensor k, Tensor v, Tensor beta, Tensor? g, Tensor? initial_state, "
      "Tensor? cu_seqlens, float scale, Tensor do, Tensor? dht) -> (Tensor dq, Tensor dk, Tensor dv, "
      "Tensor dbeta, Tensor dg, Tensor dh0)");
}

TORCH_LIBRARY_IMPL(nested_learning, CPU, m) {
  m.impl("delta_rule_fwd_cpp", &delta_rule_fwd_cpp);
  m.impl("delta_rule_bwd_cpp", &delta_rule_bwd_cpp);
}
