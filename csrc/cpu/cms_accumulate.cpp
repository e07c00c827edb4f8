// Multi-frequency CMS gradient accumulation: one CPU pass over every tensor of a group.
//
// Per tensor (θ, gradient g, accumulator A, optimizer state m, v; k = inner steps taken):
//     off-cycle:  A ← A + g
//     on-cycle:   u = (A + g) · s   (s = 1/n with `average`, else 1);  θ ← Opt(θ, u);  A ← 0
//     sgd:        u ← u + λθ;  b ← u (k = 0) or μb + (1−τ)u;  u ← u + μb (nesterov) or b;  θ ← θ − ηu
//     adam(w):    u ← u + λθ (adam) or θ ← θ(1 − ηλ) (adamw);  m ← β1 m + (1−β1) u;  v ← β2 v + (1−β2) u²;
//                 θ ← θ − (m / (√v · c2 + ε)) · c1,   c1 = η/(1−β1^{k+1}),  c2 = 1/√(1−β2^{k+1})
//
// Bit-exactness. Every product and sum is rounded on its own, in the reference's order, with
// scalars rounded once to the compute type (float64 → float for float32/bf16/fp16 parameters),
// ÷ is IEEE division and √ is torch.sqrt's own (sqrt_n), so the result equals
// nested_learning.reference.cms_accumulate bit for bit. The update kernels are therefore compiled
// without multiply-add contraction (the pragmas around them).
//
// Schedule. Every tensor is cut into blocks of kBlock elements; the blocks of all tensors form
// one work list that OpenMP threads take dynamically. A block is one vectorised sweep that reads
// each operand once and writes each result once (Adam goes through it kChunk elements at a time,
// in L1: moments, √v, θ). The update kernels see the compute type only: bf16/fp16 parameters and
// gradients are widened to fp32 per kChunk elements, and θ is narrowed back (to nearest even, as
// torch's casts).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <bit>
#if defined(__F16C__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

// MKL's vector square roots (LP64 interface) and thread control, exported by libtorch_cpu in MKL
// builds of PyTorch (null otherwise).
extern "C" {
__attribute__((weak)) void vmsSqrt(int n, const float* in, float* out, long long mode);
__attribute__((weak)) void vmdSqrt(int n, const double* in, double* out, long long mode);
__attribute__((weak)) int MKL_Set_Num_Threads_Local(int threads);
}

namespace {

using at::Tensor;

constexpr int64_t kBlock = 1 << 15;  // elements per work item (128 KiB of fp32 accumulator)
constexpr int64_t kChunk = 256;      // elements per L1-resident step inside a block

// Compile-time variants of the on-cycle update (the rest are per-tensor runtime scalars).
enum Variant : int {
  kAccumulate = 0,  // off-cycle
  kSgd = 1,
  kAdam = 2,
  kAdamW = 3,
  kRuleMask = 3,
  kWeightDecay = 4,  // sgd, adam: u ← u + λθ
  kMomentum = 8,     // sgd
};

// Per-tensor scalars in the compute type A.
template <typename A>
struct Scalars {
  A scale = 1;                                         // s
  A lr = 0, weight_decay = 0, momentum = 0, keep = 1;  // η, λ, μ, 1 − τ
  A beta1 = 0, one_minus_beta1 = 0, beta2 = 0, one_minus_beta2 = 0;
  A c1 = 0, c2 = 0, eps = 0, decay = 1;  // c1, c2, ε, 1 − ηλ
  bool first = false, nesterov = false;  // sgd: k = 0; nesterov momentum
};

// One update over n elements: θ (in/out), g, A, m (momentum buffer or first moment), v.
template <typename A>
using Kernel = void (*)(A* param, const A* grad, A* acc, A* m, A* v, int64_t n, const Scalars<A>& s);

// out[0..n) = √in[0..n), rounded as torch.sqrt rounds it: MKL builds of PyTorch take it from MKL's
// vector math (high-accuracy mode: within 1 ulp, not always the nearest); elsewhere torch.sqrt is
// the correctly rounded IEEE √.
constexpr long long kMklMode = 0x2 | 0x140000 | 0x100;  // VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE, as ATen

void sqrt_n(const float* in, float* out, int n) {
  if (vmsSqrt != nullptr) return vmsSqrt(n, in, out, kMklMode);
  for (int i = 0; i < n; ++i) out[i] = std::sqrt(in[i]);
}

void sqrt_n(const double* in, double* out, int n) {
  if (vmdSqrt != nullptr) return vmdSqrt(n, in, out, kMklMode);
  for (int i = 0; i < n; ++i) out[i] = std::sqrt(in[i]);
}

// The update kernels: no multiply-add contraction (each product and sum rounds on its own).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

template <typename A>
void accumulate(A*, const A* __restrict grad, A* __restrict acc, A*, A*, int64_t n, const Scalars<A>&) {
  for (int64_t i = 0; i < n; ++i) acc[i] = acc[i] + grad[i];
}

template <typename A, int V>
void sgd(A* __restrict param, const A* __restrict grad, A* __restrict acc, A* __restrict buf, A*, int64_t n,
         const Scalars<A>& scalars) {
  const Scalars<A> s = scalars;
  for (int64_t i = 0; i < n; ++i) {
    A u = (acc[i] + grad[i]) * s.scale;
    if constexpr ((V & kWeightDecay) != 0) u = u + param[i] * s.weight_decay;
    if constexpr ((V & kMomentum) != 0) {
      const A b = s.first ? u : buf[i] * s.momentum + u * s.keep;
      buf[i] = b;
      u = s.nesterov ? u + b * s.momentum : b;
    }
    param[i] = param[i] - u * s.lr;
    acc[i] = A(0);
  }
}

// Adam(W) per kChunk elements: the moments (stored), then √v, then θ.
template <typename A, int V>
void adam(A* __restrict param, const A* __restrict grad, A* __restrict acc, A* __restrict m, A* __restrict v,
          int64_t n, const Scalars<A>& scalars) {
  const Scalars<A> s = scalars;
  alignas(64) A root[kChunk];
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t len = n - c < kChunk ? n - c : kChunk;
    for (int64_t i = c; i < c + len; ++i) {
      A u = (acc[i] + grad[i]) * s.scale;
      if constexpr ((V & kRuleMask) == kAdam && (V & kWeightDecay) != 0) u = u + param[i] * s.weight_decay;
      m[i] = m[i] * s.beta1 + u * s.one_minus_beta1;
      v[i] = v[i] * s.beta2 + (u * u) * s.one_minus_beta2;
      acc[i] = A(0);
    }
    sqrt_n(v + c, root, static_cast<int>(len));
    for (int64_t i = 0; i < len; ++i) {
      A p = param[c + i];
      if constexpr ((V & kRuleMask) == kAdamW) p = p * s.decay;
      param[c + i] = p - (m[c + i] / (root[i] * s.c2 + s.eps)) * s.c1;
    }
  }
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

template <typename A>
Kernel<A> kernel_for(int variant) {
  switch (variant) {
    case kAccumulate: return &accumulate<A>;
    case kSgd: return &sgd<A, kSgd>;
    case kSgd | kWeightDecay: return &sgd<A, kSgd | kWeightDecay>;
    case kSgd | kMomentum: return &sgd<A, kSgd | kMomentum>;
    case kSgd | kWeightDecay | kMomentum: return &sgd<A, kSgd | kWeightDecay | kMomentum>;
    case kAdam: return &adam<A, kAdam>;
    case kAdam | kWeightDecay: return &adam<A, kAdam | kWeightDecay>;
    case kAdamW: return &adam<A, kAdamW>;
  }
  TORCH_CHECK(false, "cms_accumulate_cpp: no kernel for variant ", variant);
}

// out[0..n) = float(in[0..n)) and back, rounding to nearest even (NaN → the canonical quiet NaN).
void widen(const c10::BFloat16* in, float* __restrict out, int64_t n) {
  const uint16_t* __restrict bits = reinterpret_cast<const uint16_t*>(in);
  for (int64_t i = 0; i < n; ++i) out[i] = std::bit_cast<float>(static_cast<uint32_t>(bits[i]) << 16);
}

void narrow(const float* __restrict in, c10::BFloat16* out, int64_t n) {
  uint16_t* __restrict bits = reinterpret_cast<uint16_t*>(out);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = std::bit_cast<uint32_t>(in[i]);
    bits[i] = in[i] != in[i] ? uint16_t(0x7FC0) : static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
}

void widen(const c10::Half* in, float* out, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
#endif
  for (; i < n; ++i) out[i] = static_cast<float>(in[i]);
}

void narrow(const float* in, c10::Half* out, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) out[i] = static_cast<c10::Half>(in[i]);
}

// One tensor's operands. T: parameter dtype, A: compute dtype.
template <typename T, typename A>
struct Slot {
  T* param;
  const T* grad;
  A* acc;
  A* m;  // momentum buffer or first moment (nullptr when unused)
  A* v;  // second moment (nullptr when unused)
  bool due;
  Scalars<A> s;
  Kernel<A> kernel;

  // Elements [begin, end).
  void run(int64_t begin, int64_t end) const {
    auto from = [](A* x, int64_t i) { return x ? x + i : nullptr; };
    if constexpr (std::is_same_v<T, A>) {
      kernel(param + begin, grad + begin, acc + begin, from(m, begin), from(v, begin), end - begin, s);
    } else {
      alignas(64) A p[kChunk], g[kChunk];
      for (int64_t c = begin; c < end; c += kChunk) {
        const int64_t n = std::min(kChunk, end - c);
        widen(grad + c, g, n);
        if (due) widen(param + c, p, n);
        kernel(p, g, acc + c, from(m, c), from(v, c), n, s);
        if (due) narrow(p, param + c, n);
      }
    }
  }
};

struct Hyper {
  int rule;  // kSgd, kAdam or kAdamW
  double lr, momentum, dampening, beta1, beta2, eps, weight_decay;
  bool nesterov, average;
};

// The scalars of one due tensor with `count` gradients already accumulated and `step` inner steps taken.
template <typename A>
Scalars<A> scalars(const Hyper& h, int64_t count, int64_t step) {
  Scalars<A> s;
  s.scale = static_cast<A>(h.average ? 1.0 / static_cast<double>(count + 1) : 1.0);
  s.lr = static_cast<A>(h.lr);
  s.weight_decay = static_cast<A>(h.weight_decay);
  s.momentum = static_cast<A>(h.momentum);
  s.keep = static_cast<A>(1.0 - h.dampening);
  s.first = step == 0;
  s.nesterov = h.nesterov;
  const double t = static_cast<double>(step + 1);
  s.beta1 = static_cast<A>(h.beta1);
  s.one_minus_beta1 = static_cast<A>(1.0 - h.beta1);
  s.beta2 = static_cast<A>(h.beta2);
  s.one_minus_beta2 = static_cast<A>(1.0 - h.beta2);
  s.c1 = static_cast<A>(h.lr / (1.0 - std::pow(h.beta1, t)));
  s.c2 = static_cast<A>(1.0 / std::sqrt(1.0 - std::pow(h.beta2, t)));
  s.eps = static_cast<A>(h.eps);
  s.decay = static_cast<A>(1.0 - h.lr * h.weight_decay);
  return s;
}

struct Item {
  int64_t tensor, begin, end;
};

template <typename T>
void run(at::TensorList params, at::TensorList grads, at::TensorList accs, at::TensorList exp_avgs,
         at::TensorList exp_avg_sqs, at::IntArrayRef counts, at::IntArrayRef steps, const c10::List<bool>& due,
         const Hyper& h) {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const bool uses_m = h.rule != kSgd || h.momentum != 0.0;
  const bool uses_v = h.rule != kSgd;
  int due_variant = h.rule;
  if (h.weight_decay != 0.0 && h.rule != kAdamW) due_variant |= kWeightDecay;
  if (h.rule == kSgd && h.momentum != 0.0) due_variant |= kMomentum;

  std::vector<Slot<T, A>> slots;
  std::vector<Item> items;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    if (n == 0) continue;
    const bool on = due.get(i);
    Slot<T, A> slot{params[i].data_ptr<T>(),
                    grads[i].data_ptr<T>(),
                    accs[i].data_ptr<A>(),
                    on && uses_m ? exp_avgs[i].data_ptr<A>() : nullptr,
                    on && uses_v ? exp_avg_sqs[i].data_ptr<A>() : nullptr,
                    on,
                    on ? scalars<A>(h, counts[i], steps[i]) : Scalars<A>{},
                    kernel_for<A>(on ? due_variant : kAccumulate)};
    slots.push_back(slot);
    const int64_t index = static_cast<int64_t>(slots.size()) - 1;
    for (int64_t b = 0; b < n; b += kBlock) items.push_back({index, b, std::min(n, b + kBlock)});
  }
  const int64_t num_items = static_cast<int64_t>(items.size());
  const int threads = at::in_parallel_region() ? 1 : at::get_num_threads();
#pragma omp parallel num_threads(threads) if (num_items > 1)
  {
    // MKL would open a (nested, one-thread) parallel region per √ call: keep it serial here.
    const int mkl_threads = MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0;
#pragma omp for schedule(dynamic, 1)
    for (int64_t j = 0; j < num_items; ++j) slots[items[j].tensor].run(items[j].begin, items[j].end);
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(mkl_threads);
  }
}

void check(const Tensor& t, const char* name, size_t i, const Tensor& param, at::ScalarType dtype) {
  TORCH_CHECK(t.device() == param.device() && t.scalar_type() == dtype && t.numel() == param.numel() &&
                  t.is_contiguous(),
              "cms_accumulate_cpp: ", name, "[", i, "] must be a contiguous ", dtype, " tensor of ", param.numel(),
              " elements on ", param.device(), ", got ", t.scalar_type(), " of ", t.numel(), " on ", t.device());
}

void cms_accumulate_cpp(at::TensorList params, at::TensorList grads, at::TensorList accumulators,
                        at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::IntArrayRef counts,
                        at::IntArrayRef steps, c10::List<bool> due, c10::string_view optimizer, double lr,
                        double momentum, double dampening, bool nesterov, double beta1, double beta2, double eps,
                        double weight_decay, bool average) {
  const int rule = optimizer == "sgd" ? kSgd : optimizer == "adam" ? kAdam : optimizer == "adamw" ? kAdamW : -1;
  TORCH_CHECK(rule >= 0, "cms_accumulate_cpp: optimizer must be 'sgd', 'adam' or 'adamw', got '", optimizer, "'");
  const Hyper h{rule, lr, momentum, dampening, beta1, beta2, eps, weight_decay, nesterov, average};
  const size_t n = params.size();
  const bool uses_m = rule != kSgd || momentum != 0.0, uses_v = rule != kSgd;
  TORCH_CHECK(grads.size() == n && accumulators.size() == n && counts.size() == n && steps.size() == n &&
                  due.size() == n && exp_avgs.size() == (uses_m ? n : 0) && exp_avg_sqs.size() == (uses_v ? n : 0),
              "cms_accumulate_cpp: every list must have one entry per parameter (exp_avgs, exp_avg_sqs: "
              "none when the optimizer keeps no such state)");
  if (n == 0) return;
  const at::ScalarType dtype = params[0].scalar_type();
  const at::ScalarType ct = dtype == at::kDouble ? at::kDouble : at::kFloat;
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(params[i].is_cpu() && params[i].scalar_type() == dtype && params[i].is_contiguous(),
                "cms_accumulate_cpp: params[", i, "] must be a contiguous CPU ", dtype, " tensor");
    check(grads[i], "grads", i, params[i], dtype);
    check(accumulators[i], "accumulators", i, params[i], ct);
    if (uses_m) check(exp_avgs[i], "exp_avgs", i, params[i], ct);
    if (uses_v) check(exp_avg_sqs[i], "exp_avg_sqs", i, params[i], ct);
    TORCH_CHECK(counts[i] >= 0 && steps[i] >= 0, "cms_accumulate_cpp: counts and steps must be >= 0");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "cms_accumulate_cpp", [&] {
    run<scalar_t>(params, grads, accumulators, exp_avgs, exp_avg_sqs, counts, steps, due, h);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(nested_learning, m) {
  m.def(
      "cms_accumulate_cpp(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] accumulators, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] exp_avg_sqs, int[] counts, int[] steps, bool[] due, str optimizer, float lr, float momentum, "
      "float dampening, bool nesterov, float beta1, float beta2, float eps, float weight_decay, bool average) -> ()");
}

TORCH_LIBRARY_IMPL(nested_learning, CPU, m) {
  m.impl("cms_accumulate_cpp", &cms_accumulate_cpp);
}
