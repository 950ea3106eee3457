// CPU kernel of the weighted regression losses: weighted_regression_fwd (MSE, L1, Huber, focal MSE,
// focal L1). Schema and conventions: csrc/weighted_losses.cpp; maths: docs/methods.md §2. Compiled once per
// CPU capability (DEFAULT, AVX2, AVX512; setup.py); at::vec::Vectorized<T> picks the vector width.
//
// One element-wise pass computes w l(e) and, in the same pass, d loss / d pred = scale w dl/de; the loss
// kind is a template parameter (one instantiation per kind and dtype, no per-element branch on it).
// Determinism: elements are cut into blocks of kBlock elements (fixed, never derived from the thread
// count) handed out to the threads (cpu::parallel_blocks); each block writes its partial sum (double) to its
// own slot and the slots are added in block order, so the result is bit-identical whatever the number of
// threads.
// 'mean' with a mask and 'weighted_mean' first compute their denominator (kept count, or sum of kept
// weights) the same way, since the gradient's scale must be known in the main pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "cpu/common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <optional>
#include <tuple>
#include <vector>

namespace imbreg_fast {
namespace {

using at::vec::Vectorized;

using cpu::hsum;
using cpu::kReductionWeightedMean;

constexpr int64_t kMSE = 0;
constexpr int64_t kL1 = 1;
constexpr int64_t kHuber = 2;
constexpr int64_t kFocalMSE = 3;
constexpr int64_t kFocalL1 = 4;

constexpr int64_t kActivationSigmoid = 0;
constexpr int64_t kActivationTanh = 1;

// Elements per block: a multiple of every vector width. Blocks per thread at least kGrainBlocks
// (~32K elements) before a second thread is woken up.
constexpr int64_t kBlock = 4096;
constexpr int64_t kGrainBlocks = 8;

template <typename T>
struct Coeffs {
  T beta;        // Huber threshold
  T inv_beta;    // 1 / beta
  T half_beta;   // beta / 2
  T kappa;       // focal: s = tanh(kappa |e|); kappa = beta/2 (sigmoid, as 2 sigmoid(x) - 1 = tanh(x/2)) or beta
  T gamma;       // focal exponent
  int gamma_case;  // 0: gamma == 0, 1: gamma == 1, 2: gamma == 2, 3: other (pow)
  T weight_scale;  // 1, or 2^(max_exponent - 2) for 'weighted_mean' when 1 / sum of weights would overflow T
};

// All-ones lanes where mask[i + l] is true (l < count), zero lanes elsewhere (a blendv mask). Full vectors on
// AVX2 / AVX-512: zero-extend the bytes and compare in registers (building the lanes in memory and
// reloading them stalls on store forwarding); partial vectors and the DEFAULT build go through memory.
template <typename T>
inline Vectorized<T> keep_lanes_generic(const uint8_t* m, int64_t count) {
  using V = Vectorized<T>;
  __at_align__ T buf[V::size()];
  for (int64_t l = 0; l < V::size(); ++l) buf[l] = l < count ? static_cast<T>(m[l]) : T(0);
  return V::loadu(buf) != V(T(0));
}

template <typename T>
inline Vectorized<T> keep_lanes(const bool* mask, int64_t i, int64_t count) {
  const uint8_t* m = reinterpret_cast<const uint8_t*>(mask) + i;
#if defined(CPU_CAPABILITY_AVX512)
  if (count == Vectorized<T>::size()) {
    if constexpr (std::is_same_v<T, float>) {
      static_assert(Vectorized<float>::size() == 16);
      const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m)));
      return _mm512_castsi512_ps(_mm512_maskz_set1_epi32(_mm512_test_epi32_mask(x, x), -1));
    } else {
      static_assert(Vectorized<double>::size() == 8);
      const __m512i x = _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m)));
      return _mm512_castsi512_pd(_mm512_maskz_set1_epi64(_mm512_test_epi64_mask(x, x), -1));
    }
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if (count == Vectorized<T>::size()) {
    if constexpr (std::is_same_v<T, float>) {
      static_assert(Vectorized<float>::size() == 8);
      const __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m)));
      return _mm256_castsi256_ps(_mm256_cmpgt_epi32(x, _mm256_setzero_si256()));
    } else {
      static_assert(Vectorized<double>::size() == 4);
      int32_t bytes;
      std::memcpy(&bytes, m, sizeof(bytes));
      const __m256i x = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(bytes));
      return _mm256_castsi256_pd(_mm256_cmpgt_epi64(x, _mm256_setzero_si256()));
    }
  }
#endif
  return keep_lanes_generic<T>(m, count);
}

// Element loss l(e) and dl/de, e = pred - target, a = |e|.
template <int64_t Kind, typename T>
inline void loss_and_grad(const Vectorized<T>& e, const Coeffs<T>& c, Vectorized<T>& l, Vectorized<T>& dl) {
  using V = Vectorized<T>;
  const V zero(T(0));
  const V one(T(1));
  const V a = e.abs();
  const V sign = e.gt(zero) - e.lt(zero);  // gt/lt give 1.0 / 0.0 lanes; sign(0) = 0 as torch's abs'
  if constexpr (Kind == kMSE || Kind == kFocalMSE) {
    l = e * e;                             // dl/de = 2 e
    dl = e * V(T(2));
  } else if constexpr (Kind == kL1 || Kind == kFocalL1) {
    l = a;                                 // dl/de = sign(e)
    dl = sign;
  } else {
    // Huber: a < beta: a^2 / (2 beta), dl/de = e / beta;  else a - beta/2, dl/de = sign(e)
    const V small = a < V(c.beta);
    l = V::blendv(a - V(c.half_beta), a * a * V(c.inv_beta * T(0.5)), small);
    dl = V::blendv(sign, e * V(c.inv_beta), small);
  }
  if constexpr (Kind == kFocalMSE || Kind == kFocalL1) {
    // L = l f, f = s^gamma, s = tanh(kappa a), ds/da = kappa (1 - s^2):
    //   dL/de = dl f + sign(e) l gamma s^(gamma-1) ds/da = dl f + sign(e) gamma kappa (1 - s^2) f (l / s)
    // l/s stays finite (l = O(a), s ~ kappa a near 0); at s = 0 the term is 0 (f = 0, or gamma = 0).
    const V s = (a * V(c.kappa)).tanh();
    V f;
    switch (c.gamma_case) {
      case 0: f = one; break;
      case 1: f = s; break;
      case 2: f = s * s; break;
      default: f = s.pow(V(c.gamma)); break;
    }
    const V pos = s > zero;
    const V ratio = V::blendv(zero, l / V::blendv(one, s, pos), pos);
    dl = dl * f + sign * V(c.gamma * c.kappa) * (one - s * s) * f * ratio;
    l = l * f;
  }
}

// Main pass over blocks: loss_out[i] = w_i l_i ('none'), grad_out[i] = scale w_i dl_i/de, block_sums[b] =
// sum over block b of w_i l_i. Dropped elements get e = 0 and w = 0 (NaN holes never reach the sums).
// Check (check_finite): block_flags[b] gets kNonFinite when the block's loss sum is not finite, which it is as
// soon as a kept e = pred - target or weight is NaN / inf (w l >= 0 is then inf or NaN for every loss kind:
// l(+-inf) = inf, 0 * inf = NaN, inf * l = inf or NaN), and also when finite values overflow: the exact scan
// after the pass tells them apart. No accumulator of its own (one more dependency chain per vector would
// cost more than the loss in this memory-bound pass). kNegativeWeight when a kept weight may be < 0: the OR of
// the kept weights' bits, whose sign bit is then set (one bitwise op per vector in every library: a min is a
// compare and blend per lane in the generic DEFAULT vectors); a -0.0 weight sets it too, so the exact scan
// after the pass decides.
constexpr uint8_t kNonFinite = 1;
constexpr uint8_t kNegativeWeight = 2;

template <int64_t Kind, bool Check, typename T>
void run_blocks(const T* pred, const T* target, const T* weight, const bool* mask, int64_t n, const Coeffs<T>& c,
                T grad_scale, T* loss_out, T* grad_out, double* block_sums, uint8_t* block_flags) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const int64_t n_blocks = (n + kBlock - 1) / kBlock;
  cpu::parallel_blocks(n_blocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
    const V zero(T(0));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * kBlock;
      const int64_t end = std::min(n, start + kBlock);
      V acc(T(0)), wbits(T(0));
      for (int64_t i = start; i < end; i += W) {
        const int64_t cnt = std::min<int64_t>(W, end - i);   // tail lanes load 0: e = 0, l = 0
        V e = V::loadu(pred + i, cnt) - V::loadu(target + i, cnt);
        V w = weight != nullptr ? V::loadu(weight + i, cnt) : V(T(1));
        if (mask != nullptr) {
          const V keep = keep_lanes<T>(mask, i, cnt);
          e = V::blendv(zero, e, keep);
          w = V::blendv(zero, w, keep);
        }
        if constexpr (Check) {
          if (weight != nullptr) wbits = wbits | w;   // dropped elements and the tail are +0: no sign bit
        }
        if (c.weight_scale != T(1)) w = w * V(c.weight_scale);   // exact: a power of two, every w below 1 after
        V l, dl;
        loss_and_grad<Kind, T>(e, c, l, dl);
        const V wl = w * l;
        acc += wl;
        if (loss_out != nullptr) wl.store(loss_out + i, cnt);
        if (grad_out != nullptr) (dl * w * V(grad_scale)).store(grad_out + i, cnt);
      }
      block_sums[b] = hsum(acc);
      if constexpr (Check) {
        __at_align__ T lanes[W];
        wbits.store(lanes);
        uint8_t flags = std::isfinite(block_sums[b]) ? 0 : kNonFinite;
        for (int64_t l = 0; l < W; ++l) flags |= std::signbit(lanes[l]) ? kNegativeWeight : 0;
        block_flags[b] = flags;
      }
    }
  });
}

// check_finite, after the pass: the ValueError of the first bad argument at a kept element (the order and
// wording of the Python checks, imbreg_fast.functional._check_values); nothing when the flag came from an
// overflowing difference of finite values, or from weights of -0.0.
template <typename T>
void raise_flagged(uint8_t flags, const T* pred, const T* target, const T* weight, const bool* mask, int64_t n) {
  if (flags & kNonFinite) {
    if (cpu::any_non_finite(pred, n, 1, mask)) cpu::raise_non_finite("pred", mask != nullptr);
    if (cpu::any_non_finite(target, n, 1, mask)) cpu::raise_non_finite("target", mask != nullptr);
    if (weight != nullptr && cpu::any_non_finite(weight, n, 1, mask)) cpu::raise_non_finite("weight", mask != nullptr);
  }
  if (flags & kNegativeWeight) {
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK_VALUE(!(weight[i] < T(0)) || (mask != nullptr && !mask[i]), "weight must be >= 0",
                        mask != nullptr ? " at kept elements" : "");
    }
  }
}

// Denominator of 'mean' (kept count) or 'weighted_mean' (sum of kept weights), fixed-block order.
template <typename T>
double kept_total(const T* weight, const bool* mask, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  if (weight == nullptr && mask == nullptr) return static_cast<double>(n);
  const int64_t n_blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> part(n_blocks, 0.0);
  cpu::parallel_blocks(n_blocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * kBlock;
      const int64_t end = std::min(n, start + kBlock);
      if (weight == nullptr) {
        const uint8_t* m = reinterpret_cast<const uint8_t*>(mask);
        int64_t count = 0;
        for (int64_t i = start; i < end; ++i) count += m[i];   // bool storage is 0 / 1
        part[b] = static_cast<double>(count);
        continue;
      }
      V acc(T(0));
      for (int64_t i = start; i < end; i += W) {
        const int64_t cnt = std::min<int64_t>(W, end - i);
        V w = V::loadu(weight + i, cnt);
        if (mask != nullptr) w = V::blendv(V(T(0)), w, keep_lanes<T>(mask, i, cnt));
        acc += w;
      }
      part[b] = hsum(acc);
    }
  });
  double total = 0.0;
  for (double v : part) total += v;
  return total;
}

template <typename T>
void dispatch_kind(int64_t kind, bool check, const T* pred, const T* target, const T* weight, const bool* mask,
                   int64_t n, const Coeffs<T>& c, T grad_scale, T* loss_out, T* grad_out, double* block_sums,
                   uint8_t* block_flags) {
#define IMBREG_RUN(K)                                                                                              \
  (check ? run_blocks<K, true, T>(pred, target, weight, mask, n, c, grad_scale, loss_out, grad_out, block_sums,     \
                                  block_flags)                                                                       \
         : run_blocks<K, false, T>(pred, target, weight, mask, n, c, grad_scale, loss_out, grad_out, block_sums,    \
                                   block_flags))
  switch (kind) {
    case kMSE: IMBREG_RUN(kMSE); break;
    case kL1: IMBREG_RUN(kL1); break;
    case kHuber: IMBREG_RUN(kHuber); break;
    case kFocalMSE: IMBREG_RUN(kFocalMSE); break;
    default: IMBREG_RUN(kFocalL1); break;
  }
#undef IMBREG_RUN
}

std::tuple<at::Tensor, at::Tensor> weighted_regression_fwd_cpu(
    const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& mask, int64_t loss, double beta, double gamma, int64_t activation,
    int64_t reduction, bool compute_grad, bool check_finite) {
  constexpr const char* op = "weighted_regression_fwd";
  const auto dt = pred.scalar_type();
  TORCH_CHECK(pred.device().is_cpu() && target.device().is_cpu(), op,
              ": the CPU kernel needs CPU tensors, got pred on ", pred.device(), " and target on ", target.device());
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
              ": pred must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK(target.scalar_type() == dt, op, ": target must have pred's dtype ", dt, ", got ", target.scalar_type());
  TORCH_CHECK(target.sizes() == pred.sizes(), op, ": target must have pred's shape ", pred.sizes(), ", got ",
              target.sizes());
  if (weight.has_value()) {
    TORCH_CHECK(weight->device().is_cpu(), op, ": weight must be a CPU tensor, got ", weight->device());
    TORCH_CHECK(at::isFloatingType(weight->scalar_type()), op, ": weight must have a floating dtype, got ",
                weight->scalar_type());
    TORCH_CHECK(weight->sizes() == pred.sizes(), op, ": weight must have pred's shape ", pred.sizes(), ", got ",
                weight->sizes());
  }
  if (mask.has_value()) {
    TORCH_CHECK(mask->device().is_cpu(), op, ": mask must be a CPU tensor, got ", mask->device());
    TORCH_CHECK(mask->scalar_type() == at::kBool, op, ": mask must be bool, got ", mask->scalar_type());
    TORCH_CHECK(mask->sizes() == pred.sizes(), op, ": mask must have pred's shape ", pred.sizes(), ", got ",
                mask->sizes());
  }
  TORCH_CHECK(loss >= kMSE && loss <= kFocalL1, op, ": loss must be 0 (MSE), 1 (L1), 2 (Huber), 3 (focal MSE) or 4 "
              "(focal L1), got ", loss);
  TORCH_CHECK(activation == kActivationSigmoid || activation == kActivationTanh, op,
              ": activation must be 0 (sigmoid) or 1 (tanh), got ", activation);
  TORCH_CHECK(reduction == at::Reduction::None || reduction == at::Reduction::Mean || reduction == at::Reduction::Sum ||
                  reduction == kReductionWeightedMean,
              op, ": reduction must be ", int64_t(at::Reduction::None), " ('none'), ", int64_t(at::Reduction::Mean),
              " ('mean'), ", int64_t(at::Reduction::Sum), " ('sum') or ", kReductionWeightedMean,
              " ('weighted_mean'), got ", reduction);
  if (loss == kHuber || loss == kFocalMSE || loss == kFocalL1) {
    TORCH_CHECK(std::isfinite(beta) && beta > 0.0, op, ": beta must be finite and > 0, got ", beta);
  }
  if (loss == kFocalMSE || loss == kFocalL1) {
    TORCH_CHECK(std::isfinite(gamma) && gamma >= 0.0, op, ": gamma must be finite and >= 0, got ", gamma);
  }

  const auto cdt = cpu::compute_dtype(dt);
  const at::Tensor p = pred.to(cdt).contiguous();
  const at::Tensor y = target.to(cdt).contiguous();
  at::Tensor w, m;
  if (weight.has_value()) w = weight->to(cdt).contiguous();
  if (mask.has_value()) m = mask->contiguous();
  const int64_t n = p.numel();
  const auto opt = p.options();
  at::Tensor loss_rows = reduction == at::Reduction::None ? at::empty(pred.sizes(), opt) : at::Tensor();
  at::Tensor grad = compute_grad ? at::empty(pred.sizes(), opt) : at::Tensor();
  std::vector<double> block_sums((n + kBlock - 1) / kBlock, 0.0);
  std::vector<uint8_t> block_flags(block_sums.size(), 0);
  double scale = 1.0;

  AT_DISPATCH_FLOATING_TYPES(cdt, op, [&] {
    using T = scalar_t;
    const T* w_ptr = w.defined() ? w.const_data_ptr<T>() : nullptr;
    const bool* m_ptr = m.defined() ? m.const_data_ptr<bool>() : nullptr;
    Coeffs<T> c;
    c.weight_scale = T(1);
    if (reduction == at::Reduction::Mean || reduction == kReductionWeightedMean) {
      double denom = kept_total<T>(reduction == kReductionWeightedMean ? w_ptr : nullptr, m_ptr, n);
      // 'weighted_mean' of subnormal weights: 1 / denom would overflow T, so the pass takes every weight times
      // 2^(max_exponent - 2) and the denominator alike (powers of two: exact, the ratios unchanged)
      if (denom > 0.0 && denom < 1.0 / static_cast<double>(std::numeric_limits<T>::max())) {
        c.weight_scale = static_cast<T>(std::ldexp(1.0, std::numeric_limits<T>::max_exponent - 2));
        denom *= static_cast<double>(c.weight_scale);
      }
      scale = denom > 0.0 ? 1.0 / denom : 0.0;   // nothing kept (or all kept weights 0): loss 0, grad 0
    }
    c.beta = static_cast<T>(beta);
    c.inv_beta = static_cast<T>(beta > 0.0 ? 1.0 / beta : 0.0);
    c.half_beta = static_cast<T>(0.5 * beta);
    c.kappa = static_cast<T>(activation == kActivationSigmoid ? 0.5 * beta : beta);
    c.gamma = static_cast<T>(gamma);
    c.gamma_case = gamma == 0.0 ? 0 : gamma == 1.0 ? 1 : gamma == 2.0 ? 2 : 3;
    dispatch_kind<T>(loss, check_finite, p.const_data_ptr<T>(), y.const_data_ptr<T>(), w_ptr, m_ptr, n, c,
                     static_cast<T>(scale), loss_rows.defined() ? loss_rows.mutable_data_ptr<T>() : nullptr,
                     grad.defined() ? grad.mutable_data_ptr<T>() : nullptr, block_sums.data(), block_flags.data());
    uint8_t flags = 0;
    for (uint8_t f : block_flags) flags |= f;
    if (flags != 0) raise_flagged<T>(flags, p.const_data_ptr<T>(), y.const_data_ptr<T>(), w_ptr, m_ptr, n);
  });

  at::Tensor out_loss;
  if (reduction == at::Reduction::None) {
    out_loss = loss_rows.to(dt);
  } else {
    double total = 0.0;
    for (double v : block_sums) total += v;
    out_loss = at::scalar_tensor(total * scale, pred.options().dtype(dt));
  }
  at::Tensor out_grad = compute_grad ? grad.to(dt) : at::empty({0}, pred.options().dtype(dt));
  return {out_loss, out_grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(imbreg_fast, CPU, m) {
  m.impl("weighted_regression_fwd", &weighted_regression_fwd_cpu);
}

}  // namespace imbreg_fast
