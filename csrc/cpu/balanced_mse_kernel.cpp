// CPU kernels of the Balanced MSE family: bmc_fwd (BMC), mixture_nll_fwd (GAI and BNI).
// Schemas and conventions: csrc/balanced_mse.cpp; maths: docs/methods.md §1 and the "Mixture tables"
// comment of imbreg_fast/ops/balanced_mse.py. This file is compiled once per CPU capability (DEFAULT,
// AVX2, AVX512; setup.py), at::vec::Vectorized<T> picks the vector width of each build.
//
// Determinism: rows are cut into blocks of a fixed number of rows, handed out to the threads
// (cpu::parallel_blocks); each block writes its partial sums (double) to its own slot and the slots are added
// in block order, so every output is bit-identical whatever the number of threads.
//
// exp: every exp argument is a shifted logit z = l - m <= 0 (m the max, or a bound of it); exp_shifted
// (fast_exp.h) is an exp for z <= 0 in fp32 (max relative error below 5e-7, see there) and Sleef's 1-ulp exp
// in fp64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "cpu/common.h"

#include "cpu/fast_exp.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace imbreg_fast {
namespace {

using at::vec::Vectorized;

using cpu::compute_dtype;
using cpu::hsum;

// Rows per parallel block. Fixed (never derived from the thread count): the partial sums, hence the
// results, do not depend on how blocks are spread over threads.
constexpr int64_t kBmcBlockRows = 8;
constexpr int64_t kMixtureBlockRows = 256;

constexpr double kLog2e = 1.44269504088896340736;   // base-2 exponents (exp2_shifted)
constexpr double kLn2 = 0.693147180559945309;
// Minimum work (exps) a thread is given before a second one is woken up.
constexpr int64_t kMinWorkPerThread = 1 << 15;

template <typename T>
inline T hmin(const Vectorized<T>& v) {
  __at_align__ T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T m = lanes[0];
  for (int64_t l = 1; l < Vectorized<T>::size(); ++l) m = std::min(m, lanes[l]);
  return m;
}

template <typename T>
inline T lane0(const Vectorized<T>& v) {
  __at_align__ T lanes[Vectorized<T>::size()];
  v.store(lanes);
  return lanes[0];
}

// Shared argument checks of the fused loss ops; returns sigma^2 as a double.
double check_loss_args(const char* op, const at::Tensor& pred, const at::Tensor& target,
                       const std::optional<at::Tensor>& mask, const at::Tensor& noise_var, int64_t reduction) {
  TORCH_CHECK(pred.device().is_cpu() && target.device().is_cpu() && noise_var.device().is_cpu(), op,
              ": the CPU kernel needs CPU tensors, got pred on ", pred.device(), ", target on ", target.device(),
              ", noise_var on ", noise_var.device());
  const auto dt = pred.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
              ": pred must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK(target.scalar_type() == dt, op, ": target must have pred's dtype ", dt, ", got ",
              target.scalar_type());
  TORCH_CHECK(pred.dim() == 2 && pred.size(1) >= 1, op, ": pred must be [N, d] with d >= 1, got shape ",
              pred.sizes());
  TORCH_CHECK(target.sizes() == pred.sizes(), op, ": target must have pred's shape ", pred.sizes(), ", got ",
              target.sizes());
  TORCH_CHECK(pred.is_contiguous() && target.is_contiguous(), op, ": pred and target must be contiguous");
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.device().is_cpu(), op, ": mask must be a CPU tensor, got ", m.device());
    TORCH_CHECK(m.scalar_type() == at::kBool, op, ": mask must be bool, got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 1 && m.size(0) == pred.size(0), op, ": mask must be [N] = [", pred.size(0),
                "], got shape ", m.sizes());
    TORCH_CHECK(m.is_contiguous(), op, ": mask must be contiguous");
  }
  TORCH_CHECK(noise_var.dim() == 0, op, ": noise_var must be a 0-dim tensor, got shape ", noise_var.sizes());
  TORCH_CHECK(at::isFloatingType(noise_var.scalar_type()), op, ": noise_var must have a floating dtype, got ",
              noise_var.scalar_type());
  TORCH_CHECK(reduction == at::Reduction::None || reduction == at::Reduction::Mean || reduction == at::Reduction::Sum,
              op, ": reduction must be ", int64_t(at::Reduction::None), " ('none'), ", int64_t(at::Reduction::Mean),
              " ('mean') or ", int64_t(at::Reduction::Sum), " ('sum'), got ", reduction);
  const double s2 = noise_var.item<double>();
  TORCH_CHECK(std::isfinite(s2) && s2 > 0.0, op, ": noise_var must be finite and > 0, got ", s2);
  return s2;
}

int64_t count_kept(const bool* mask, int64_t n) {
  if (mask == nullptr) return n;
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) c += mask[i] ? 1 : 0;
  return c;
}

// Per-row results in the compute dtype plus per-block partial sums; converted to the output dtypes by
// finish_outputs.
struct RowOutputs {
  at::Tensor loss_rows;   // [N] ('none') or undefined
  at::Tensor grad_pred;   // [N, d] or undefined (compute_grad false)
  at::Tensor grad_rows;   // [N] ('none' and compute_grad) or undefined
  std::vector<double> block_loss, block_grad;
  // check_finite: per block, sum of x * 0 over the kept rows' pred and target (0, or NaN after a NaN / inf:
  // cpu::finite_acc); for BMC also the same over the given candidates
  std::vector<double> block_check;
  double cand_check = 0.0;
};

RowOutputs make_row_outputs(int64_t n, int64_t d, int64_t n_blocks, at::ScalarType cdt, int64_t reduction,
                            bool compute_grad) {
  RowOutputs out;
  const auto opt = at::TensorOptions().dtype(cdt);
  if (reduction == at::Reduction::None) out.loss_rows = at::empty({n}, opt);
  if (compute_grad) {
    out.grad_pred = at::empty({n, d}, opt);
    if (reduction == at::Reduction::None) out.grad_rows = at::empty({n}, opt);
  }
  out.block_loss.assign(n_blocks, 0.0);
  out.block_grad.assign(n_blocks, 0.0);
  out.block_check.assign(n_blocks, 0.0);
  return out;
}

// check_finite: raise the ValueError of the first argument (pred, then target) with a NaN / inf at a kept row
// when the in-pass flag fired. p, t: the compute-dtype copies (a half input's NaN / inf is kept by the cast).
void check_rows_flag(const RowOutputs& out, const at::Tensor& p, const at::Tensor& t, const bool* mask) {
  double flag = 0.0;
  for (double v : out.block_check) flag += v;
  if (std::isfinite(flag)) return;
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "check_rows_flag", [&] {
    const int64_t n = p.size(0), d = p.size(1);
    if (cpu::any_non_finite(p.data_ptr<scalar_t>(), n, d, mask)) cpu::raise_non_finite("pred", mask != nullptr);
    if (cpu::any_non_finite(t.data_ptr<scalar_t>(), n, d, mask)) cpu::raise_non_finite("target", mask != nullptr);
  });
  // otherwise a finite product overflowed: not an input error
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_outputs(RowOutputs& out, const at::Tensor& pred,
                                                              const at::Tensor& noise_var, int64_t reduction,
                                                              bool compute_grad, double scale) {
  // 'none': the per-row values; else the block partials added in block order, times scale.
  const auto reduced = [&](const at::Tensor& rows, const std::vector<double>& blocks, const at::Tensor& like) {
    if (reduction == at::Reduction::None) return rows.to(like.scalar_type());
    double total = 0.0;
    for (double v : blocks) total += v;
    return at::scalar_tensor(total * scale, like.options());
  };
  at::Tensor loss = reduced(out.loss_rows, out.block_loss, pred);
  if (!compute_grad) {
    return {loss, at::empty({0}, pred.options()), at::empty({0}, noise_var.options())};
  }
  return {loss, out.grad_pred.to(pred.scalar_type()), reduced(out.grad_rows, out.block_grad, noise_var)};
}

// --------------------------------------------------------------------------------------------------
// BMC. Row i, candidates y_j: l_j = -|p_i - y_j|^2 / (2 s2). In coordinates scaled by r = 1/sqrt(2 s2)
// (p~ = r p, y~ = r y, u~_j = p~ - y~_j), l_j = -D_j with D_j = |u~_j|^2, so no per-candidate multiply.
// The max logit is at D_min = min_j D_j; z_j = D_min - D_j <= 0, e_j = exp(z_j), S = sum_j e_j,
// s_j = e_j / S:
//   L_i      = 2 s2 (-l_ii + max_j l_j + log S) = 2 s2 (D_ii - D_min + log S)
//   dL/dp_i  = 2 (sum_j s_j y_j - y_i) = 2 (u_ii - sum_j s_j u_j) = (2 / r) (u~_ii - sum_j s_j u~_j)
//   dL/ds2   = 2 (l_ii - sum_j s_j l_j) = 2 (z_ii - sum_j s_j z_j)       (d l_j / d s2 = -l_j / s2)
// Pass 1 finds D_min (no exp), pass 2 accumulates S, sum e z and sum e u~ (d values), vectorised over
// the candidates, stored scaled and transposed, [d, m_pad] (zero padded to the vector width; the padded
// lanes get e = 0).
// --------------------------------------------------------------------------------------------------

template <typename T>
struct BmcProblem {
  const T* pred;          // [N, d], scaled: r * pred
  const T* target;        // [N, d], scaled: r * target
  const T* raw_pred;      // [N, d] pred and target as given (compute dtype), read by the value check
  const T* raw_target;
  const bool* mask;       // [N] or nullptr
  const T* cand;          // [d, m_pad]: r * (candidate j, coordinate c) at cand[c * m_pad + j]
  int64_t n, d, m, m_pad;
  bool own_separate;      // true: candidates were given, the positive target_i is an extra candidate
  T s2, r;                // sigma^2, 1 / sqrt(2 sigma^2)
};

// Squared distances from the row (broadcast in pv[0..d)) to the W candidates load(c) (one vector per
// coordinate); writes u_c = p_c - y_c. The own target goes through this same code with broadcast loads,
// so that D_ii equals the candidate's D_jj bit for bit.
template <typename T, int D, class Load>
inline Vectorized<T> sq_dist(const Vectorized<T>* pv, int64_t d_rt, const Load& load, Vectorized<T>* u) {
  const int64_t d = D > 0 ? D : d_rt;
  Vectorized<T> uc = pv[0] - load(0);
  u[0] = uc;
  Vectorized<T> dist = at::vec::fmadd(uc, uc, Vectorized<T>(T(0)));
  for (int64_t c = 1; c < d; ++c) {
    uc = pv[c] - load(c);
    u[c] = uc;
    dist = at::vec::fmadd(uc, uc, dist);
  }
  return dist;
}

// Scratch of one thread: the distances D_j of the current row, [m_pad], written by pass 1 and read by
// pass 2; for d > 4 also d vectors each for the broadcast row, u~ and sum e u~, and the own u~ (for
// d <= 4 these live in local arrays the compiler keeps in registers).
template <typename T>
struct BmcScratch {
  std::vector<T> dist;
  std::vector<Vectorized<T>> pv, u, su;
  std::vector<double> su_total;
  std::vector<T> u_own;
  BmcScratch(int64_t d, int64_t m_pad)
      : dist(std::max<int64_t>(m_pad, 1)), pv(d), u(d), su(d), su_total(d), u_own(d) {}
};

// One kept row: returns loss_i, dL_i/ds2 and writes dL_i/dp_i (times grad_scale) to grad (if not null).
template <typename T, int D>
inline void bmc_row(const BmcProblem<T>& P, int64_t i, BmcScratch<T>& S, T* grad, double grad_scale,
                    double& loss_out, double& dvar_out) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  constexpr int DA = D > 0 ? D : 1;
  const int64_t d = D > 0 ? D : P.d;
  const T* p = P.pred + i * d;
  const T* y = P.target + i * d;
  Vec pv_l[DA], u_l[DA], su_l[DA];
  double su_tot_l[DA];
  T u_own_l[DA];
  Vec* pv = D > 0 ? pv_l : S.pv.data();
  Vec* u = D > 0 ? u_l : S.u.data();
  Vec* su = D > 0 ? su_l : S.su.data();
  double* su_tot = D > 0 ? su_tot_l : S.su_total.data();
  T* u_own = D > 0 ? u_own_l : S.u_own.data();
  for (int64_t c = 0; c < d; ++c) pv[c] = Vec(p[c]);
  // own candidate: the same stored value as in the candidate buffer
  const T d_own = lane0(sq_dist<T, D>(pv, d, [&](int64_t c) { return Vec(y[c]); }, u));
  for (int64_t c = 0; c < d; ++c) u_own[c] = lane0(u[c]);

  const T* __restrict__ cand = P.cand;
  const int64_t m = P.m, m_pad = P.m_pad;
  const int64_t m_full = m - m % W;
  const int64_t tail = m - m_full;
  auto at_col = [&](int64_t j) { return [cand, m_pad, j](int64_t c) { return Vec::loadu(cand + c * m_pad + j); }; };

  // pass 1: nearest candidate (max logit), no exp; D_j kept for pass 2. Going through memory also
  // guarantees that pass 2 sees D_j rounded exactly as the min did (a recomputed u * u could be
  // contracted with D_min - D into one fma), so z = 0 exactly at the nearest candidate and BMC with
  // N = 1 gives exactly 0. clamp_max = plain vector min.
  T* __restrict__ dist_buf = S.dist.data();
  const Vec inf(std::numeric_limits<T>::infinity());
  Vec vmin0(inf), vmin1(inf);
  int64_t j = 0;
  for (; j + 2 * W <= m_full; j += 2 * W) {
    const Vec d0 = sq_dist<T, D>(pv, d, at_col(j), u);
    const Vec d1 = sq_dist<T, D>(pv, d, at_col(j + W), u);
    d0.store(dist_buf + j);
    d1.store(dist_buf + j + W);
    vmin0 = at::vec::clamp_max(d0, vmin0);
    vmin1 = at::vec::clamp_max(d1, vmin1);
  }
  for (; j < m_full; j += W) {
    const Vec d0 = sq_dist<T, D>(pv, d, at_col(j), u);
    d0.store(dist_buf + j);
    vmin0 = at::vec::clamp_max(d0, vmin0);
  }
  if (tail > 0) {
    const Vec d0 = sq_dist<T, D>(pv, d, at_col(m_full), u);
    d0.store(dist_buf + m_full);
    vmin0 = at::vec::clamp_max(Vec::set(inf, d0, tail), vmin0);
  }
  T dmin = hmin(at::vec::clamp_max(vmin0, vmin1));
  if (P.own_separate) dmin = std::min(dmin, d_own);

  // pass 2: one exp per candidate
  const Vec vdmin(dmin), vlow(std::numeric_limits<T>::lowest()), zero(T(0));
  Vec s(zero), sz(zero);
  for (int64_t c = 0; c < d; ++c) su[c] = zero;
  auto accumulate = [&](int64_t jj, int64_t count) {
    for (int64_t c = 0; c < d; ++c) u[c] = pv[c] - Vec::loadu(cand + c * m_pad + jj);
    // clamp: D_j = inf would give z = -inf and 0 * -inf below
    const Vec z = at::vec::clamp_min(vdmin - Vec::loadu(dist_buf + jj), vlow);
    // e^z as 2^(z log2 e) where that is the faster (fast_exp.h: one multiply, then 8 or 12 operations
    // instead of 14); the rounding of z log2 e adds |z| epsilons to e^z, negligible against the largest term 1
    Vec e;
    if constexpr (kFastExp2<T>) {
      e = exp2_shifted(z * Vec(T(kLog2e)));
    } else {
      e = exp_shifted(z);
    }
    if (count < W) e = Vec::set(zero, e, count);  // padded candidates
    s = s + e;
    sz = at::vec::fmadd(e, z, sz);
    for (int64_t c = 0; c < d; ++c) su[c] = at::vec::fmadd(e, u[c], su[c]);
  };
  for (j = 0; j < m_full; j += W) accumulate(j, W);
  if (tail > 0) accumulate(m_full, tail);

  double s_tot = hsum(s), sz_tot = hsum(sz);
  for (int64_t c = 0; c < d; ++c) su_tot[c] = hsum(su[c]);
  const double z_own = std::max(double(dmin - d_own), double(std::numeric_limits<T>::lowest()));
  if (P.own_separate) {
    const double e_own = lane0(exp_shifted(Vec(T(z_own))));
    s_tot += e_own;
    sz_tot += e_own * z_own;
    for (int64_t c = 0; c < d; ++c) su_tot[c] += e_own * double(u_own[c]);
  }
  const double inv_s = 1.0 / s_tot;
  loss_out = 2.0 * double(P.s2) * (double(d_own - dmin) + std::log(s_tot));
  dvar_out = 2.0 * (z_own - sz_tot * inv_s);
  if (grad != nullptr) {
    const double g = grad_scale * 2.0 / double(P.r);
    for (int64_t c = 0; c < d; ++c) grad[c] = T(g * (double(u_own[c]) - su_tot[c] * inv_s));
  }
}

template <typename T, int D>
void bmc_run(const BmcProblem<T>& P, RowOutputs& out, int64_t n_blocks, double scale) {
  T* loss_rows = out.loss_rows.defined() ? out.loss_rows.template data_ptr<T>() : nullptr;
  T* grad_pred = out.grad_pred.defined() ? out.grad_pred.template data_ptr<T>() : nullptr;
  T* grad_rows = out.grad_rows.defined() ? out.grad_rows.template data_ptr<T>() : nullptr;
  const int64_t work_per_block = kBmcBlockRows * std::max<int64_t>(P.m, 1);
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / work_per_block);
  cpu::parallel_blocks(n_blocks, grain, [&](int64_t b0, int64_t b1) {
    const cpu::FlushDenormals ftz;
    BmcScratch<T> scratch(P.d, P.m_pad);
    for (int64_t b = b0; b < b1; ++b) {
      double block_loss = 0.0, block_grad = 0.0, block_check = 0.0;
      const int64_t r1 = std::min(P.n, (b + 1) * kBmcBlockRows);
      for (int64_t i = b * kBmcBlockRows; i < r1; ++i) {
        T* grad = grad_pred != nullptr ? grad_pred + i * P.d : nullptr;
        if (P.mask != nullptr && !P.mask[i]) {
          if (loss_rows) loss_rows[i] = T(0);
          if (grad_rows) grad_rows[i] = T(0);
          if (grad) std::fill(grad, grad + P.d, T(0));
          continue;
        }
        double loss_i = 0.0, dvar_i = 0.0;
        for (int64_t c = 0; c < P.d; ++c) {   // value check: x * 0 is 0, or NaN for a NaN / inf
          block_check += double(P.raw_pred[i * P.d + c]) * 0.0 + double(P.raw_target[i * P.d + c]) * 0.0;
        }
        bmc_row<T, D>(P, i, scratch, grad, scale, loss_i, dvar_i);
        if (loss_rows) loss_rows[i] = T(loss_i);
        if (grad_rows) grad_rows[i] = T(dvar_i);
        block_loss += loss_i;
        block_grad += dvar_i;
      }
      out.block_loss[b] = block_loss;
      out.block_grad[b] = block_grad;
      out.block_check[b] = block_check;
    }
  });
}

template <typename T>
void bmc_impl(const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& candidates,
              const bool* mask, double s2, RowOutputs& out, int64_t n_blocks, double scale) {
  using Vec = Vectorized<T>;
  const int64_t n = pred.size(0), d = pred.size(1);
  const T s2_t = T(s2);
  const T r = T(1) / std::sqrt(T(2) * s2_t);
  // Scaled copies, made before the row loops: stored values cannot be fused by the compiler into later
  // subtractions (which would make the own target's distance differ from its candidate copy's).
  const at::Tensor r_t = at::scalar_tensor(double(r), pred.options());
  const at::Tensor pred_s = at::mul(pred, r_t).contiguous(), target_s = at::mul(target, r_t).contiguous();
  const T* tgt = target_s.data_ptr<T>();
  // Candidates (scaled) transposed to [d, m_pad]: the kept targets (default) or the given ones.
  const int64_t m = candidates.has_value() ? candidates->size(0) : count_kept(mask, n);
  const int64_t m_pad = (m + Vec::size() - 1) / Vec::size() * Vec::size();
  at::Tensor cand_t = at::zeros({d, std::max<int64_t>(m_pad, 1)}, pred.options());
  T* ct = cand_t.data_ptr<T>();
  at::Tensor cand_s;
  if (candidates.has_value()) {
    cand_s = at::mul(*candidates, r_t).contiguous();
    const T* src = cand_s.data_ptr<T>();
    const T* raw = candidates->data_ptr<T>();
    double check = 0.0;   // value check of the candidates, in the same loop (cpu::finite_acc)
    for (int64_t j = 0; j < m; ++j) {
      for (int64_t c = 0; c < d; ++c) {
        ct[c * m_pad + j] = src[j * d + c];
        check += double(raw[j * d + c]) * 0.0;
      }
    }
    out.cand_check = check;
  } else {
    int64_t j = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (mask != nullptr && !mask[i]) continue;
      for (int64_t c = 0; c < d; ++c) ct[c * m_pad + j] = tgt[i * d + c];
      ++j;
    }
  }
  BmcProblem<T> P;
  P.pred = pred_s.data_ptr<T>();
  P.target = tgt;
  P.raw_pred = pred.data_ptr<T>();
  P.raw_target = target.data_ptr<T>();
  P.mask = mask;
  P.cand = ct;
  P.n = n;
  P.d = d;
  P.m = m;
  P.m_pad = m_pad;
  P.own_separate = candidates.has_value();
  P.s2 = s2_t;
  P.r = r;
  switch (d) {
    case 1: bmc_run<T, 1>(P, out, n_blocks, scale); break;
    case 2: bmc_run<T, 2>(P, out, n_blocks, scale); break;
    case 3: bmc_run<T, 3>(P, out, n_blocks, scale); break;
    case 4: bmc_run<T, 4>(P, out, n_blocks, scale); break;
    default: bmc_run<T, 0>(P, out, n_blocks, scale); break;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bmc_fwd_cpu(const at::Tensor& pred, const at::Tensor& target,
                                                           const std::optional<at::Tensor>& candidates,
                                                           const std::optional<at::Tensor>& mask,
                                                           const at::Tensor& noise_var, int64_t reduction,
                                                           bool compute_grad, bool check_finite) {
  const char* op = "imbreg_fast::bmc_fwd";
  const double s2_in = check_loss_args(op, pred, target, mask, noise_var, reduction);
  const int64_t n = pred.size(0), d = pred.size(1);
  if (candidates.has_value()) {
    const at::Tensor& c = *candidates;
    TORCH_CHECK(c.device().is_cpu(), op, ": candidates must be a CPU tensor, got ", c.device());
    TORCH_CHECK(c.scalar_type() == pred.scalar_type(), op, ": candidates must have pred's dtype ",
                pred.scalar_type(), ", got ", c.scalar_type());
    TORCH_CHECK(c.dim() == 2 && c.size(1) == d, op, ": candidates must be [M, ", d, "], got shape ", c.sizes());
    TORCH_CHECK(c.is_contiguous(), op, ": candidates must be contiguous");
  }
  const auto cdt = compute_dtype(pred.scalar_type());
  const at::Tensor p = pred.to(cdt), t = target.to(cdt);
  std::optional<at::Tensor> cands;
  if (candidates.has_value()) cands = candidates->to(cdt).contiguous();
  const bool* mask_ptr = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  const int64_t kept = count_kept(mask_ptr, n);
  const double scale = (reduction == at::Reduction::Mean) ? (kept > 0 ? 1.0 / double(kept) : 0.0) : 1.0;
  const int64_t n_blocks = (n + kBmcBlockRows - 1) / kBmcBlockRows;
  RowOutputs out = make_row_outputs(n, d, n_blocks, cdt, reduction, compute_grad);
  AT_DISPATCH_FLOATING_TYPES(cdt, "bmc_fwd", [&] {
    // s2 as the torch backend sees it: noise_var.to(compute dtype)
    bmc_impl<scalar_t>(p, t, cands, mask_ptr, double(scalar_t(s2_in)), out, n_blocks, scale);
  });
  if (check_finite) {
    check_rows_flag(out, p, t, mask_ptr);
    if (!std::isfinite(out.cand_check)) cpu::raise_non_finite("candidates", false);
  }
  return finish_outputs(out, pred, noise_var, reduction, compute_grad, scale);
}

// --------------------------------------------------------------------------------------------------
// Mixture NLL (GAI / BNI); tables and derivation: the "Mixture tables" comment of
// imbreg_fast/ops/balanced_mse.py. Per row, with delta_k = p - mu_k, alpha_k = P_k delta_k, u = p - y,
// e = |u|^2, t_k = n_k - 1/2 delta_k . alpha_k, m = max_k t_k, z_k = t_k - m <= 0,
// S = sum_k phi^_k exp(z_k), r_k = phi^_k exp(z_k) / S, 2 s2 a constant:
//   L        = e + 2 s2 (m + log S)
//   dL/dp    = 2 u - 2 s2 sum_k r_k alpha_k                              (d t_k / dp = -alpha_k)
//   dL/ds2   = -e/s2 + 2 s2 sum_k r_k (1/2 |alpha_k|^2 + g_k)           (d t_k / ds2 = 1/2 |alpha_k|^2 + g_k)
// Vectorised over rows (one lane per row), loop over k, with phi^_k folded into the exponent:
// phi^_k exp(t_k - m) = exp(t_k + log phi^_k - m).
// d = 1: one pass. The shift is the row-independent bound m0 = max_k (n_k + log phi^_k), which is >= every
// t_k + log phi^_k since the quadratic term is >= 0: z_k = t_k + log phi^_k - m0 <= 0 is one fma with the
// constant n_k + log phi^_k - m0, and no max pass is needed. Lanes of a prediction far from every
// component (S < kMinShiftedSum) are redone with the rows' own max in two passes, so that no term that
// matters underflows. d > 1: pass 1 = max of t, pass 2 = exp and sums.
// Near one: L = e + 2 s2 lse with lse = m + log S. When L is small against the rounding of m and log S
// (|m| + |log S| epsilons, times 2 s2) — large s2, where every t_k is O(|delta|^2 / s2) and S = 1 - O(1/s2)
// in the exact shift — lse is recomputed in a third pass from the rows' own max m as
// m + log1p(sum_k phi^_k expm1(t_k - m)): exactly log S since sum_k phi^_k = 1 (log sum phi lives in n_k),
// and a sum of terms <= 0, so relative precision survives. Criterion: e + 2 s2 |lse| <
// 2 s2 kNearOneBound (1 + |m| + |log S|). (Elsewhere the rounding, a few 1e-7 of |m| + |log S| in fp32, is
// below 1e-5 of L.) The gradients need no such care: r_k is a ratio.
// d = 1 reads per-component constants (one multiply less per (row, k)):
//   t_k = n_k - (P_k / 2) delta^2,  1/2 alpha_k^2 + g_k = (P_k^2 / 2) delta^2 + g_k,  alpha_k = P_k delta.
// --------------------------------------------------------------------------------------------------

// d = 1 per-component constants, row k of MixtureProblem::d1_consts.
enum MixtureD1Const : int64_t {
  kMu = 0,         // mu_k
  kNegHalfPrec,    // -P_k / 2
  kLogNorm,        // n_k
  kLogScale,       // n_k + log phi^_k
  kHalfPrecSq,     // P_k^2 / 2
  kVarBias,        // g_k
  kWeight,         // phi^_k
  kPrec,           // P_k
  kShifted,        // n_k + log phi^_k - m0, m0 = max_j (n_j + log phi^_j): <= 0
  kNegHalfPrec2,   // -P_k / 2 * log2 e   (the one-pass exponent in base 2: exp2_shifted)
  kShifted2,       // kShifted * log2 e
  kD1Consts
};

// d = 1, one-pass shift: a group of rows whose S (shifted by m0) falls below this in some lane is redone
// with the rows' own max. Above it, a term flushed to 0 by the exp (< 2^-126 for fp32) is below 2^-76 of S.
constexpr double kMinShiftedSum = 0x1p-50;

// Lanes whose lse is recomputed by the near-one pass: e + 2 s2 |lse| < 2 s2 kNearOneBound (1 + |m| + |log S|).
constexpr double kNearOneBound = 1.0 / 16;

// The near-one criterion above per lane, from |lse| and |log S| (or bounds of them: a lower bound of |lse| and
// an upper bound of |log S| make it true wherever the exact test is).
template <typename T>
inline Vectorized<T> near_one_lanes(const Vectorized<T>& two_s2, const Vectorized<T>& e,
                                    const Vectorized<T>& lse_abs, const Vectorized<T>& mx,
                                    const Vectorized<T>& log_abs) {
  using Vec = Vectorized<T>;
  return at::vec::fmadd(two_s2, lse_abs, e) < two_s2 * Vec(T(kNearOneBound)) * (Vec(T(1)) + mx.abs() + log_abs);
}

// expm1(z) for z <= 0, for the near-one pass. fp32: the degree-8 Taylor polynomial on [-1/2, 0] (truncation
// below 2e-8 relative; about 1e-7 with rounding), exp_shifted(z) - 1 below -1/2 (relative error at most
// e^z / (1 - e^z) <= 1.55 times that of exp_shifted). Cheaper than Sleef's expm1, whose double-float
// arithmetic would make the pass cost several exp passes. fp64: Sleef's expm1.
inline Vectorized<float> expm1_nonpositive(const Vectorized<float>& z) {
  using Vec = Vectorized<float>;
  Vec p(1.f / 40320);
  for (const float c : {1.f / 5040, 1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 1.f / 2, 1.f}) {
    p = at::vec::fmadd(p, z, Vec(c));
  }
  return Vec::blendv(exp_shifted(z) - Vec(1.f), p * z, z >= Vec(-0.5f));
}

inline Vectorized<double> expm1_nonpositive(const Vectorized<double>& z) { return z.expm1(); }

template <typename T>
struct MixtureProblem {
  const T* pred;        // [N, d]
  const T* target;      // [N, d]
  const bool* mask;     // [N] or nullptr
  const T* log_norm;    // [K]       n_k
  const T* log_scale;   // [K]       n_k + log phi^_k
  const T* weight;      // [K]       phi^_k
  const T* means;       // [K, d]    mu_k
  const T* precision;   // [K, d, d] P_k
  const T* var_bias;    // [K]       g_k
  const T* d1_consts;   // d = 1: [K, kD1Consts]; else nullptr
  bool d1_uniform;      // d = 1 and every P_k, every g_k equal
  T d1_bound;           // d = 1: m0 = max_k (n_k + log phi^_k)
  // d = 1, uniform and evenly spaced means (BNI on a uniform grid): the chunked recurrence (mixture_d1_grid_pass)
  int64_t grid_r;       // bins per chunk R (0: not a grid, or R <= 2: the general path)
  T grid_h;             // spacing h of the means
  T grid_q;             // q = exp(-P h^2)
  T grid_rho_bound;     // a R, a = P h^2 / 2: bound of every rho exponent taken
  T grid_rho_scale;     // exp(a R)
  const T* grid_w;      // [K] w_k = exp(n_k + log phi^_k - m0) in [0, 1]
  int64_t n, d, k;
  T s2, two_s2, inv_s2;   // inv_s2 = 1 / s2 (rounded once)
};

// Heap scratch for d > 4 (per-lane vectors of one group of rows); for d <= 4 local arrays are used.
template <typename T>
struct MixtureScratch {
  using Vec = Vectorized<T>;
  std::vector<Vec> pv, yv, delta, alpha, sa;
  std::vector<T> lanes;  // [d, W] row gather / scatter buffer
  explicit MixtureScratch(int64_t d) : pv(d), yv(d), delta(d), alpha(d), sa(d), lanes(d * Vec::size()) {}
};

// d > 1: offset - 1/2 delta_k . alpha_k for component k (offset n_k for t_k, n_k + log phi^_k in the exp
// pass), clamped to a finite value (an overflowing quadratic form must not give -inf - -inf later);
// leaves delta_k and alpha_k in delta[0..d), alpha[0..d).
template <typename T, int D>
inline Vectorized<T> mixture_quad_logit(const MixtureProblem<T>& P, const Vectorized<T>* pv, int64_t k, T offset,
                                        Vectorized<T>* delta, Vectorized<T>* alpha) {
  using Vec = Vectorized<T>;
  const int64_t d = D > 0 ? D : P.d;
  const T* mu = P.means + k * d;
  const T* prec = P.precision + k * d * d;
  for (int64_t c = 0; c < d; ++c) delta[c] = pv[c] - Vec(mu[c]);
  Vec q(T(0));
  for (int64_t r = 0; r < d; ++r) {
    Vec a = Vec(prec[r * d]) * delta[0];
    for (int64_t c = 1; c < d; ++c) a = at::vec::fmadd(Vec(prec[r * d + c]), delta[c], a);
    alpha[r] = a;
    q = at::vec::fmadd(delta[r], a, q);
  }
  return at::vec::clamp_min(at::vec::fmadd(q, Vec(T(-0.5)), Vec(offset)), Vec(std::numeric_limits<T>::lowest()));
}

// d = 1: t_k + offset_k = offset_k - (P_k / 2) delta^2 for the constant column `offset` of component row c
// (kLogNorm: t_k; kLogScale: t_k + log phi^_k), clamped to a finite value: an overflowing quadratic form
// must not give -inf - -inf later.
template <typename T>
inline Vectorized<T> mixture_d1_logit(const T* c, const Vectorized<T>& p0, MixtureD1Const offset) {
  using Vec = Vectorized<T>;
  const Vec dl = p0 - Vec(c[kMu]);
  return at::vec::clamp_min(at::vec::fmadd(dl * dl, Vec(c[kNegHalfPrec]), Vec(c[offset])),
                            Vec(std::numeric_limits<T>::lowest()));
}

// d = 1: the rows' own max of column `offset`'s logits: m = max_k (t_k + log phi^_k) (kLogScale: the exact shift
// of the fallback pass; a zero-weight bin, log phi^_k = -inf, never sets it, so the kept terms cannot all
// underflow) or m = max_k t_k (kLogNorm: the near-one pass, whose expm1(t_k - m) needs t_k <= m).
template <typename T>
inline Vectorized<T> mixture_d1_max(const MixtureProblem<T>& P, const Vectorized<T>& p0, MixtureD1Const offset) {
  Vectorized<T> mx(std::numeric_limits<T>::lowest());
  for (int64_t k = 0; k < P.k; ++k) {
    mx = at::vec::clamp_min(mixture_d1_logit(P.d1_consts + k * kD1Consts, p0, offset), mx);
  }
  return mx;
}

// The near-one pass: m + log1p(sum_k phi^_k expm1(t_k - m)) per lane, with m = max_k t_k found here (the main
// passes shift by a max or a bound of t_k + log phi^_k instead), t_k recomputed exactly as in the main passes. Out of line: it runs rarely and must not weigh on the register
// allocation of the main passes.
template <typename T, int D>
__attribute__((noinline)) Vectorized<T> mixture_lse_near_one(const MixtureProblem<T>& P, MixtureScratch<T>& S,
                                                             const Vectorized<T>* pv, Vectorized<T> mx) {
  using Vec = Vectorized<T>;
  constexpr int DA = D > 0 ? D : 1;
  Vec q(T(0));
  if constexpr (D == 1) {
    mx = mixture_d1_max(P, pv[0], kLogNorm);
    for (int64_t k = 0; k < P.k; ++k) {
      const T* c = P.d1_consts + k * kD1Consts;
      q = at::vec::fmadd(Vec(c[kWeight]), expm1_nonpositive(mixture_d1_logit(c, pv[0], kLogNorm) - mx), q);
    }
  } else {
    Vec delta_l[DA], alpha_l[DA];
    Vec* delta = D > 0 ? delta_l : S.delta.data();
    Vec* alpha = D > 0 ? alpha_l : S.alpha.data();
    mx = Vec(std::numeric_limits<T>::lowest());   // max_k t_k (the main pass's includes log phi^_k)
    for (int64_t k = 0; k < P.k; ++k) {
      mx = at::vec::clamp_min(mixture_quad_logit<T, D>(P, pv, k, P.log_norm[k], delta, alpha), mx);
    }
    for (int64_t k = 0; k < P.k; ++k) {
      const Vec t = mixture_quad_logit<T, D>(P, pv, k, P.log_norm[k], delta, alpha);
      q = at::vec::fmadd(Vec(P.weight[k]), expm1_nonpositive(t - mx), q);
    }
  }
  return mx + q.log1p();
}

// d = 1, the exp pass over the K components for the W rows in p0: accumulates S = sum_k phi^_k e^{z_k},
// sum_k r'_k alpha_k into sa and sum_k r'_k (1/2 alpha_k^2 + g_k) into sg (r'_k = phi^_k e^{z_k}, not yet
// divided by S). Exact = false: z_k = t_k + log phi^_k - m0 from the constant kShifted (one fma, in base 2:
// kNegHalfPrec2, kShifted2 and exp2_shifted); true:
// z_k = t_k + log phi^_k - mx for the rows' own max mx (mixture_d1_logit, clamped to a finite value).
// Uniform: every P_k and g_k equal (BNI, GAI with equal variances): accumulate sum r' delta and
// sum r' delta^2, then sum r' alpha = P sum r' delta and sum r' (1/2 alpha^2 + g) = P^2/2 sum r' delta^2 + g S.
template <typename T, bool Uniform, bool Exact>
inline void mixture_d1_pass(const MixtureProblem<T>& P, const Vectorized<T>& p0, const Vectorized<T>& mx,
                            Vectorized<T>& s, Vectorized<T>& sa, Vectorized<T>& sg) {
  using Vec = Vectorized<T>;
  const T* kc = P.d1_consts;
  // accumulators in locals (registers): the references may alias the constants' memory (vector types may
  // alias float), which would put a store and a reload on every iteration's dependency chain
  Vec s_l(s), sa_l(sa), sg_l(sg), sd(T(0)), sd2(T(0));
  for (int64_t k = 0; k < P.k; ++k) {
    const T* c = kc + k * kD1Consts;
    const Vec dl = p0 - Vec(c[kMu]);
    const Vec dl2 = dl * dl;
    Vec t;
    if constexpr (Exact) {
      t = exp_shifted(mixture_d1_logit(c, p0, kLogScale) - mx);
    } else if constexpr (kFastExp2<T>) {
      // the same exponent in base 2 (its constants carry log2 e): one fma, then 2^z
      t = exp2_shifted(at::vec::fmadd(dl2, Vec(c[kNegHalfPrec2]), Vec(c[kShifted2])));
    } else {
      t = exp_shifted(at::vec::fmadd(dl2, Vec(c[kNegHalfPrec]), Vec(c[kShifted])));
    }
    s_l = s_l + t;
    if constexpr (Uniform) {
      sd = at::vec::fmadd(t, dl, sd);
      sd2 = at::vec::fmadd(t, dl2, sd2);
    } else {
      sg_l = at::vec::fmadd(t, at::vec::fmadd(dl2, Vec(c[kHalfPrecSq]), Vec(c[kVarBias])), sg_l);
      sa_l = at::vec::fmadd(t * Vec(c[kPrec]), dl, sa_l);
    }
  }
  s = s_l;
  if constexpr (Uniform) {
    sa = Vec(kc[kPrec]) * sd;
    sg = at::vec::fmadd(sd2, Vec(kc[kHalfPrecSq]), Vec(kc[kVarBias]) * s_l);
  } else {
    sa = sa_l;
    sg = sg_l;
  }
}

// Below this, the largest term of a chunk (its start, see below) is negligible against any S the one-pass shift
// keeps (S >= kMinShiftedSum, else the exact fallback): 2^-40 of S in fp32, 2^-120 in fp64 (below half an ulp).
template <typename T>
constexpr double kGridSkip = std::is_same_v<T, float> ? 0x1p-90 : 0x1p-170;

// d = 1, every P_k and g_k equal, means on a uniform grid c_k = c_0 + k h (BNI on bin_prior's bins; GAI with
// equal variances and evenly spaced means): the same sums as mixture_d1_pass<T, true, false> with 2 exps per
// chunk of R bins instead of one per bin (docs/methods.md §1.5). With t_k = w_k G_k, w_k = exp(n_k + log phi^_k
// - m0) in [0, 1] and G_k = exp(-(P/2) dl_k^2), dl_k = p - c_k:
//   ascending  (dl -> dl - h): G_{k+1} = G_k rho, rho = exp(P h dl_k - a),   a = P h^2 / 2
//   descending (dl -> dl + h): G_{k-1} = G_k rho, rho = exp(-P h dl_k - a)
// and rho -> rho q after each step, q = exp(-P h^2) (both directions). Each lane starts every chunk at the end
// NEAREST its prediction (descending where p is above the chunk's midpoint), with G and rho from exp: the terms it
// meets first are the chunk's largest, so an underflowing start means a chunk of negligible terms, and in the chunk
// holding p the start is at most (R - 1)/2 bins away, G_start >= exp(-a ((R-1)/2)^2) >= exp(-60) (R is chosen so).
// rho's exponent is at most a (R - 2) in the direction taken: rho = exp_shifted(z - a R) exp(a R). The weight of
// the bin a lane visits is a select between two per-bin constants (the two directions), never a gather. Chunks
// whose every lane starts below kGridSkip are skipped (after one exp). Rounding grows like (|z_k - z_start| + j)
// epsilons, as a direct exp of z_k would.
template <typename T>
inline void mixture_d1_grid_pass(const MixtureProblem<T>& P, const Vectorized<T>& p0, Vectorized<T>& s,
                                 Vectorized<T>& sa, Vectorized<T>& sg) {
  using Vec = Vectorized<T>;
  const T* kc = P.d1_consts;
  const int64_t K = P.k, R = P.grid_r;
  const Vec zero(T(0)), neg_half_prec(kc[kNegHalfPrec]), skip(T(kGridSkip<T>));
  const Vec h(P.grid_h), neg_h(-P.grid_h), q(P.grid_q), ph(kc[kPrec] * P.grid_h), neg_ph(-kc[kPrec] * P.grid_h);
  const Vec rho_shift(-P.grid_rho_bound - T(0.5) * kc[kPrec] * P.grid_h * P.grid_h), rho_scale(P.grid_rho_scale);
  Vec s_l(zero), sd(zero), sd2(zero);
  for (int64_t c0 = 0; c0 < K; c0 += R) {
    const int64_t rc = std::min(R, K - c0), c1 = c0 + rc - 1;
    const Vec dl_lo = p0 - Vec(kc[c0 * kD1Consts + kMu]), dl_hi = p0 - Vec(kc[c1 * kD1Consts + kMu]);
    const Vec desc = (dl_lo + dl_hi) > zero;            // p above the chunk's midpoint: start at its top
    Vec dl = Vec::blendv(dl_lo, dl_hi, desc);
    Vec g = exp_shifted(dl * dl * neg_half_prec);       // G at the start bin, the chunk's largest
    if ((g >= skip).zero_mask() == (1 << Vec::size()) - 1) continue;   // all lanes: negligible terms
    const Vec step = Vec::blendv(neg_h, h, desc);
    // rho = exp(+-P h dl - a), shifted by its bound a R so that exp_shifted sees z <= 0
    Vec rho = exp_shifted(at::vec::fmadd(Vec::blendv(ph, neg_ph, desc), dl, rho_shift)) * rho_scale;
    for (int64_t j = 0; j < rc; ++j) {
      const Vec w = Vec::blendv(Vec(P.grid_w[c0 + j]), Vec(P.grid_w[c1 - j]), desc);
      const Vec t = w * g;
      s_l = s_l + t;
      sd = at::vec::fmadd(t, dl, sd);
      sd2 = at::vec::fmadd(t * dl, dl, sd2);
      dl = dl + step;
      g = g * rho;
      rho = rho * q;
    }
  }
  s = s_l;
  sa = Vec(kc[kPrec]) * sd;
  sg = at::vec::fmadd(sd2, Vec(kc[kHalfPrecSq]), Vec(kc[kVarBias]) * s_l);
}

// 'mean' / 'sum' at d = 1 (fp32, AVX2 / AVX-512 builds): no log per row. A row's loss is e + 2 s2 (m + log S)
// and its rows are only summed, so the kernel sums e + 2 s2 m per lane, multiplies the lanes' S into a
// per-lane product kept as a mantissa in [1, 2) times a power of two, and takes one log per lane and block:
// sum log S = log(product of mantissas) + (sum of exponents) ln 2. A lane sees at most kMixtureBlockRows / W
// <= 32 rows of a block, so the product stays below 2^32. Rounding: one relative epsilon per row in the
// product, about the error of the per-row logs it replaces. The near-one test still needs log S per row: it
// takes a cubic approximation (error below kLogApproxError), with that error in the test's favour, and the
// groups where some lane may be near one take the per-row path.
template <typename T>
inline constexpr bool kLogOfProduct =
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    std::is_same_v<T, float>;
#else
    false;
#endif

// max |log1p(f) - f (c1 + f (c2 + f c3))| on [0, 1) is 9.2e-4 (least squares fit); rounding adds < 1e-6
constexpr float kLogApproxError = 2e-3f;

// s = m 2^x, m in [1, 2), x an integer (as a float), for positive normal fp32 s.
inline void split_mantissa(const Vectorized<float>& s, Vectorized<float>& m, Vectorized<float>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  m = Vectorized<float>(_mm512_getmant_ps(s, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src));
  x = Vectorized<float>(_mm512_getexp_ps(s));
#else
  using IVec = Vectorized<int32_t>;
  const IVec bits = at::vec::cast<int32_t>(s);
  m = at::vec::cast<float>((bits & IVec(0x007fffff)) | IVec(0x3f800000));
  // the biased exponent b in [1, 254] as a float: the bits of 2^23 + b, minus 2^23 + 127
  x = at::vec::cast<float>((bits >> IVec(23)) | IVec(0x4b000000)) - Vectorized<float>(8388608.0f + 127.0f);
#endif
}

// S of a group of lanes as mantissa [1, 2) and exponent, for the caller's per-lane product (kLogOfProduct).
template <typename T>
struct LogParts {
  Vectorized<T> mant{T(1)}, ex{T(0)};   // S = 1: nothing to add
};

// W rows in pv/yv (one lane each) -> per-lane loss, dL/dp (into grad[0..d)), dL/ds2.
// log_parts == nullptr: loss = e + 2 s2 lse. Else (kLogOfProduct<T>, d = 1, row losses not needed): loss =
// e + 2 s2 m and *log_parts = S split, whose log the caller adds through its per-lane product; or, in a
// group where some lane may take the near-one pass, loss = e + 2 s2 lse and *log_parts left at S = 1.
template <typename T, int D>
inline void mixture_lanes(const MixtureProblem<T>& P, MixtureScratch<T>& S, const Vectorized<T>* pv,
                          const Vectorized<T>* yv, Vectorized<T>* grad, Vectorized<T>& loss,
                          Vectorized<T>& dvar, LogParts<T>* log_parts = nullptr) {
  using Vec = Vectorized<T>;
  constexpr int DA = D > 0 ? D : 1;
  const int64_t d = D > 0 ? D : P.d;
  const int64_t K = P.k;
  Vec delta_l[DA], alpha_l[DA];
  Vec* delta = D > 0 ? delta_l : S.delta.data();
  Vec* alpha = D > 0 ? alpha_l : S.alpha.data();
  Vec* sa = grad;
  const Vec vlow(std::numeric_limits<T>::lowest()), half(T(0.5)), zero(T(0));
  Vec mx(vlow), s(zero), sg(zero);
  for (int64_t c = 0; c < d; ++c) sa[c] = zero;
  if constexpr (D == 1) {
    // One pass shifted by m0 = max_k (n_k + log phi^_k) (row-independent: the quadratic term is <= 0, so
    // every exponent is <= 0 with no max pass); the groups where some lane's S fell below kMinShiftedSum (a
    // prediction far from every component) are redone with each row's own max, in two passes.
    mx = Vec(P.d1_bound);
    if (P.grid_r > 0) {
      mixture_d1_grid_pass<T>(P, pv[0], s, sa[0], sg);
    } else if (P.d1_uniform) {
      mixture_d1_pass<T, true, false>(P, pv[0], mx, s, sa[0], sg);
    } else {
      mixture_d1_pass<T, false, false>(P, pv[0], mx, s, sa[0], sg);
    }
    if ((s < Vec(T(kMinShiftedSum))).zero_mask() != (1 << Vec::size()) - 1) {   // some lane below
      mx = mixture_d1_max(P, pv[0], kLogScale);
      s = sg = sa[0] = zero;
      if (P.d1_uniform) {
        mixture_d1_pass<T, true, true>(P, pv[0], mx, s, sa[0], sg);
      } else {
        mixture_d1_pass<T, false, true>(P, pv[0], mx, s, sa[0], sg);
      }
    }
  } else {
    for (int64_t k = 0; k < K; ++k) {
      mx = at::vec::clamp_min(mixture_quad_logit<T, D>(P, pv, k, P.log_scale[k], delta, alpha), mx);
    }
    for (int64_t k = 0; k < K; ++k) {
      const Vec t = exp_shifted(mixture_quad_logit<T, D>(P, pv, k, P.log_scale[k], delta, alpha) - mx);
      s = s + t;
      Vec a2 = alpha[0] * alpha[0];
      for (int64_t c = 1; c < d; ++c) a2 = at::vec::fmadd(alpha[c], alpha[c], a2);
      sg = at::vec::fmadd(t, at::vec::fmadd(a2, half, Vec(P.var_bias[k])), sg);
      for (int64_t c = 0; c < d; ++c) sa[c] = at::vec::fmadd(t, alpha[c], sa[c]);
    }
  }
  const Vec two_s2(P.two_s2), two(T(2));
  const Vec r_scale = two_s2 / s;  // 2 s2 / S
  Vec e = zero;
  for (int64_t c = 0; c < d; ++c) {
    const Vec uc = pv[c] - yv[c];
    e = at::vec::fmadd(uc, uc, e);
    grad[c] = two * uc - r_scale * sa[c];  // dL/dp_c
  }
  dvar = r_scale * sg - e * Vec(P.inv_s2);
  if constexpr (kLogOfProduct<T>) {
    if (log_parts != nullptr) {
      // the near-one test below with log S = x ln 2 + log1p(m - 1) approximated, its error on the safe side
      Vec mant, ex;
      split_mantissa(s, mant, ex);
      const Vec f = mant - Vec(T(1));
      const Vec log1p_f = f * at::vec::fmadd(at::vec::fmadd(f, Vec(0.11478031f), Vec(-0.40741307f)), f,
                                              Vec(0.98669159f));
      const Vec log_s = at::vec::fmadd(ex, Vec(T(kLn2)), log1p_f);
      const Vec err(kLogApproxError);
      const Vec lse_min = at::vec::clamp_min((mx + log_s).abs() - err, zero);
      if (near_one_lanes(two_s2, e, lse_min, mx, log_s.abs() + err).zero_mask() == (1 << Vec::size()) - 1) {
        loss = at::vec::fmadd(two_s2, mx, e);
        log_parts->mant = mant;
        log_parts->ex = ex;
        return;
      }
    }
  }
  // log last: with Sleef it is a call, and values live across a call end up on the stack for the whole
  // k loops (a store-to-load dependency per iteration)
  const Vec log_s = s.log();
  Vec lse = mx + log_s;   // log sum_k phi^_k e^{t_k}
  // near one: L = e + 2 s2 lse could be small against the rounding of mx and log S (|mx| + |log S| times
  // the epsilon, times 2 s2): those lanes take lse from the near-one pass
  const Vec near = near_one_lanes(two_s2, e, lse.abs(), mx, log_s.abs());
  if (near.zero_mask() != (1 << Vec::size()) - 1) {
    lse = Vec::blendv(lse, mixture_lse_near_one<T, D>(P, S, pv, mx), near);
  }
  loss = at::vec::fmadd(two_s2, lse, e);
}

template <typename T, int D>
void mixture_run(const MixtureProblem<T>& P, RowOutputs& out, int64_t n_blocks, double scale) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  constexpr int DA = D > 0 ? D : 1;
  static_assert(kMixtureBlockRows % W == 0, "block rows must be a multiple of the vector width");
  T* loss_rows = out.loss_rows.defined() ? out.loss_rows.template data_ptr<T>() : nullptr;
  T* grad_pred = out.grad_pred.defined() ? out.grad_pred.template data_ptr<T>() : nullptr;
  T* grad_rows = out.grad_rows.defined() ? out.grad_rows.template data_ptr<T>() : nullptr;
  const int64_t d = P.d;
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / (kMixtureBlockRows * P.k));
  const T tscale = T(scale);
  cpu::parallel_blocks(n_blocks, grain, [&](int64_t b0, int64_t b1) {
    const cpu::FlushDenormals ftz;
    MixtureScratch<T> S(d);
    Vec pv_l[DA], yv_l[DA], g_l[DA];
    Vec* pv = D > 0 ? pv_l : S.pv.data();
    Vec* yv = D > 0 ? yv_l : S.yv.data();
    Vec* gv = D > 0 ? g_l : S.sa.data();
    __at_align__ T loss_l[W], dvar_l[W];
    T* lanes = S.lanes.data();
    // per-lane block sums in double: W independent additions per group of rows (no dependency chain
    // through one scalar), added in lane order at the end of the block
    double lane_loss[W], lane_grad[W];
    // 'mean' / 'sum' at d = 1: log S through per-lane products (kLogOfProduct)
    const bool by_product = kLogOfProduct<T> && D == 1 && loss_rows == nullptr;
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(lane_loss, lane_loss + W, 0.0);
      std::fill(lane_grad, lane_grad + W, 0.0);
      Vec mant_prod(T(1)), exp_sum(T(0));
      Vec check(T(0));   // value check of the kept rows' pred and target (cpu::finite_acc)
      const int64_t r1 = std::min(P.n, (b + 1) * kMixtureBlockRows);
      for (int64_t i0 = b * kMixtureBlockRows; i0 < r1; i0 += W) {
        const int64_t cnt = std::min(W, r1 - i0);
        int64_t kept = cnt;
        if (P.mask != nullptr) {
          kept = 0;
          for (int64_t r = 0; r < cnt; ++r) kept += P.mask[i0 + r] ? 1 : 0;
        }
        if (kept == 0) {
          if (loss_rows) std::fill(loss_rows + i0, loss_rows + i0 + cnt, T(0));
          if (grad_rows) std::fill(grad_rows + i0, grad_rows + i0 + cnt, T(0));
          if (grad_pred) std::fill(grad_pred + i0 * d, grad_pred + (i0 + cnt) * d, T(0));
          continue;
        }
        Vec loss, dvar;
        if constexpr (D == 1) {
          // contiguous rows: vector loads and stores (partial ones for the tail); dropped rows and the tail are
          // zeros in the lanes (a NaN hole is never read into the sums) and zeros in the outputs
          const bool full = kept == W;   // W rows, all kept
          pv[0] = full ? Vec::loadu(P.pred + i0) : Vec::loadu(P.pred + i0, cnt);
          yv[0] = full ? Vec::loadu(P.target + i0) : Vec::loadu(P.target + i0, cnt);
          Vec keep;
          if (!full) {
            __at_align__ T kept_l[W];
            for (int64_t r = 0; r < W; ++r) kept_l[r] = (r < cnt && (P.mask == nullptr || P.mask[i0 + r])) ? T(1) : T(0);
            keep = Vec::loadu(kept_l) != Vec(T(0));
            pv[0] = Vec::blendv(Vec(T(0)), pv[0], keep);
            yv[0] = Vec::blendv(Vec(T(0)), yv[0], keep);
          }
          check = cpu::finite_acc(cpu::finite_acc(check, pv[0]), yv[0]);
          LogParts<T> parts;
          mixture_lanes<T, D>(P, S, pv, yv, gv, loss, dvar, by_product ? &parts : nullptr);
          Vec g = gv[0] * Vec(tscale);
          if (!full) {
            loss = Vec::blendv(Vec(T(0)), loss, keep);
            dvar = Vec::blendv(Vec(T(0)), dvar, keep);
            g = Vec::blendv(Vec(T(0)), g, keep);
            parts.mant = Vec::blendv(Vec(T(1)), parts.mant, keep);
            parts.ex = Vec::blendv(Vec(T(0)), parts.ex, keep);
          }
          if (by_product) {
            mant_prod = mant_prod * parts.mant;
            exp_sum = exp_sum + parts.ex;
          }
          cpu::add_lanes(lane_loss, loss);
          cpu::add_lanes(lane_grad, dvar);
          if (cnt == W) {
            if (grad_pred) g.store(grad_pred + i0);
            if (loss_rows) loss.store(loss_rows + i0);
            if (grad_rows) dvar.store(grad_rows + i0);
          } else {
            if (grad_pred) g.store(grad_pred + i0, cnt);
            if (loss_rows) loss.store(loss_rows + i0, cnt);
            if (grad_rows) dvar.store(grad_rows + i0, cnt);
          }
          continue;
        }
        // general case: gather the rows into lanes (dropped rows and the tail as zeros, never read)
        auto is_kept = [&](int64_t r) { return r < cnt && (P.mask == nullptr || P.mask[i0 + r]); };
        for (int64_t pass = 0; pass < 2; ++pass) {
          const T* src = pass == 0 ? P.pred : P.target;
          Vec* dst = pass == 0 ? pv : yv;
          for (int64_t r = 0; r < W; ++r) {
            const bool k_r = is_kept(r);
            for (int64_t c = 0; c < d; ++c) lanes[c * W + r] = k_r ? src[(i0 + r) * d + c] : T(0);
          }
          for (int64_t c = 0; c < d; ++c) {
            dst[c] = Vec::loadu(lanes + c * W);
            check = cpu::finite_acc(check, dst[c]);   // dropped rows and the tail are zeros
          }
        }
        mixture_lanes<T, D>(P, S, pv, yv, gv, loss, dvar);
        loss.store(loss_l);
        dvar.store(dvar_l);
        for (int64_t c = 0; c < d; ++c) gv[c].store(lanes + c * W);
        for (int64_t r = 0; r < cnt; ++r) {
          const bool k_r = is_kept(r);
          const T l = k_r ? loss_l[r] : T(0), g = k_r ? dvar_l[r] : T(0);
          if (loss_rows) loss_rows[i0 + r] = l;
          if (grad_rows) grad_rows[i0 + r] = g;
          if (grad_pred) {
            for (int64_t c = 0; c < d; ++c) grad_pred[(i0 + r) * d + c] = k_r ? lanes[c * W + r] * tscale : T(0);
          }
          lane_loss[r] += l;
          lane_grad[r] += g;
        }
      }
      if (by_product) {
        // in double, as vectors (Sleef's 1-ulp log): W / DW calls instead of W scalar ones per block
        using DVec = Vectorized<double>;
        constexpr int64_t DW = DVec::size();
        __at_align__ T prod_l[W], exp_l[W];
        __at_align__ double prod_d[W], exp_d[W];
        mant_prod.store(prod_l);
        exp_sum.store(exp_l);
        for (int64_t r = 0; r < W; ++r) {
          prod_d[r] = double(prod_l[r]);
          exp_d[r] = double(exp_l[r]);
        }
        for (int64_t r = 0; r < W; r += DW) {
          const DVec log_prod = DVec::loadu(prod_d + r).log() + DVec::loadu(exp_d + r) * DVec(kLn2);
          (DVec::loadu(lane_loss + r) + DVec(double(P.two_s2)) * log_prod).store(lane_loss + r);
        }
      }
      double block_loss = 0.0, block_grad = 0.0;
      for (int64_t r = 0; r < W; ++r) {
        block_loss += lane_loss[r];
        block_grad += lane_grad[r];
      }
      out.block_loss[b] = block_loss;
      out.block_grad[b] = block_grad;
      out.block_check[b] = hsum(check);
    }
  });
}

// d = 1: is the chunked recurrence of mixture_d1_grid_pass usable (P.d1_uniform, K >= 2, means evenly spaced
// to within 4 ulps of the largest |mean|, R > 2)? Sets P.grid_* (grid_r = 0 otherwise) and returns the w_k.
// R = floor(2 sqrt(60 / a)) clamped to [1, 16], so that a ((R - 1)/2)^2 <= 60 (see mixture_d1_grid_pass) and
// a R <= 80 (exp(a R) is finite in fp32); R <= 2 (sigma below ~0.26 bin widths, where a few bins matter and
// the recurrence saves nothing) keeps the general path.
template <typename T>
std::vector<T> grid_setup(MixtureProblem<T>& P, const std::vector<T>& consts) {
  P.grid_r = 0;
  const int64_t k = P.k;
  if (!P.d1_uniform || k < 2) return {};
  auto mean = [&](int64_t j) { return double(consts[kD1Consts * j + kMu]); };
  const double c0 = mean(0), h = (mean(k - 1) - c0) / double(k - 1);
  const double tol = 4.0 * std::numeric_limits<T>::epsilon() * std::max(std::abs(c0), std::abs(mean(k - 1)));
  if (!(h > 0.0) || !std::isfinite(h)) return {};
  for (int64_t j = 1; j < k - 1; ++j) {
    if (!(std::abs(mean(j) - (c0 + double(j) * h)) <= tol)) return {};
  }
  const double prec = double(consts[kPrec]), a = 0.5 * prec * h * h;
  if (!(a > 0.0) || !std::isfinite(a)) return {};
  const int64_t r = std::clamp<int64_t>(int64_t(std::floor(2.0 * std::sqrt(60.0 / a))), 1, 16);
  if (r <= 2) return {};
  std::vector<T> w(k);
  for (int64_t j = 0; j < k; ++j) w[j] = T(std::exp(double(consts[kD1Consts * j + kShifted])));
  P.grid_r = r;
  P.grid_h = T(h);
  P.grid_q = T(std::exp(-prec * h * h));
  P.grid_rho_bound = T(a * double(r));
  P.grid_rho_scale = T(std::exp(a * double(r)));
  return w;
}

// The per-component tables of a MixtureProblem (everything but the rows and sigma^2), built from the op's tables;
// owns the derived arrays P points into.
template <typename T>
struct MixtureTables {
  std::vector<T> log_scale, weight, d1_consts, grid_w;
  MixtureTables(MixtureProblem<T>& P, const at::Tensor& log_weight, const at::Tensor& log_norm,
                const at::Tensor& means, const at::Tensor& precision, const at::Tensor& grad_var_bias) {
    const int64_t k = log_weight.size(0), d = means.size(1);
    // per component: n_k + log phi^_k and phi^_k (from the float64 value of log phi^_k)
    const T* lw = log_weight.data_ptr<T>();
    P.log_norm = log_norm.data_ptr<T>();
    log_scale.resize(k);
    weight.resize(k);
    for (int64_t j = 0; j < k; ++j) {
      log_scale[j] = T(double(P.log_norm[j]) + double(lw[j]));
      weight[j] = T(std::exp(double(lw[j])));
    }
    P.log_scale = log_scale.data();
    P.weight = weight.data();
    P.means = means.data_ptr<T>();
    P.precision = precision.data_ptr<T>();
    P.var_bias = grad_var_bias.data_ptr<T>();
    P.d = d;
    P.k = k;
    P.d1_consts = nullptr;
    P.grid_r = 0;
    P.grid_w = nullptr;
    P.d1_uniform = false;
    P.d1_bound = T(0);
    if (d != 1) return;
    d1_consts.resize(kD1Consts * k);
    for (int64_t j = 0; j < k; ++j) {
      const T prec = P.precision[j];
      T* c = d1_consts.data() + kD1Consts * j;
      c[kMu] = P.means[j];
      c[kNegHalfPrec] = T(-0.5) * prec;
      c[kLogNorm] = P.log_norm[j];
      c[kLogScale] = log_scale[j];
      c[kHalfPrecSq] = T(0.5) * prec * prec;
      c[kVarBias] = P.var_bias[j];
      c[kWeight] = weight[j];
      c[kPrec] = prec;
    }
    P.d1_bound = *std::max_element(log_scale.begin(), log_scale.end());
    for (int64_t j = 0; j < k; ++j) {
      T* c = d1_consts.data() + kD1Consts * j;
      c[kShifted] = log_scale[j] - P.d1_bound;
      c[kNegHalfPrec2] = T(-0.5 * double(P.precision[j]) * kLog2e);
      c[kShifted2] = T(double(c[kShifted]) * kLog2e);
    }
    P.d1_consts = d1_consts.data();
    P.d1_uniform = true;
    for (int64_t j = 1; j < k; ++j) {
      P.d1_uniform = P.d1_uniform && P.precision[j] == P.precision[0] && P.var_bias[j] == P.var_bias[0];
    }
    grid_w = grid_setup(P, d1_consts);
    P.grid_w = grid_w.data();
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_nll_fwd_cpu(
    const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& mask,
    const at::Tensor& noise_var, const at::Tensor& log_weight, const at::Tensor& log_norm, const at::Tensor& means,
    const at::Tensor& precision, const at::Tensor& grad_var_bias, int64_t reduction, bool compute_grad,
    bool check_finite) {
  const char* op = "imbreg_fast::mixture_nll_fwd";
  const double s2_in = check_loss_args(op, pred, target, mask, noise_var, reduction);
  const int64_t n = pred.size(0), d = pred.size(1);
  const auto cdt = compute_dtype(pred.scalar_type());
  TORCH_CHECK(log_weight.dim() == 1 && log_weight.size(0) >= 1, op,
              ": log_weight must be [K] with K >= 1, got shape ", log_weight.sizes());
  const int64_t k = log_weight.size(0);
  TORCH_CHECK(means.dim() == 2 && means.size(0) == k && means.size(1) == d, op, ": means must be [K, d] = [",
              k, ", ", d, "], got shape ", means.sizes());
  TORCH_CHECK(precision.dim() == 3 && precision.size(0) == k && precision.size(1) == d && precision.size(2) == d,
              op, ": precision must be [K, d, d] = [", k, ", ", d, ", ", d, "], got shape ", precision.sizes());
  TORCH_CHECK(log_norm.dim() == 1 && log_norm.size(0) == k, op, ": log_norm must be [K] = [", k,
              "], got shape ", log_norm.sizes());
  TORCH_CHECK(grad_var_bias.dim() == 1 && grad_var_bias.size(0) == k, op, ": grad_var_bias must be [K] = [", k,
              "], got shape ", grad_var_bias.sizes());
  for (const auto& [name, tab] : {std::pair<const char*, const at::Tensor*>{"log_weight", &log_weight},
                                  {"log_norm", &log_norm},
                                  {"means", &means},
                                  {"precision", &precision},
                                  {"grad_var_bias", &grad_var_bias}}) {
    TORCH_CHECK(tab->device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", tab->device());
    TORCH_CHECK(tab->scalar_type() == cdt, op, ": ", name, " must have the compute dtype ", cdt,
                " (pred's dtype, float32 for half types), got ", tab->scalar_type());
    TORCH_CHECK(tab->is_contiguous(), op, ": ", name, " must be contiguous");
  }
  const at::Tensor p = pred.to(cdt), t = target.to(cdt);
  const bool* mask_ptr = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  const int64_t kept = count_kept(mask_ptr, n);
  const double scale = (reduction == at::Reduction::Mean) ? (kept > 0 ? 1.0 / double(kept) : 0.0) : 1.0;
  const int64_t n_blocks = (n + kMixtureBlockRows - 1) / kMixtureBlockRows;
  RowOutputs out = make_row_outputs(n, d, n_blocks, cdt, reduction, compute_grad);
  AT_DISPATCH_FLOATING_TYPES(cdt, "mixture_nll_fwd", [&] {
    using T = scalar_t;
    MixtureProblem<T> P;
    MixtureTables<T> tables(P, log_weight, log_norm, means, precision, grad_var_bias);
    P.pred = p.data_ptr<T>();
    P.target = t.data_ptr<T>();
    P.mask = mask_ptr;
    P.n = n;
    P.s2 = T(s2_in);
    P.two_s2 = T(2) * P.s2;
    P.inv_s2 = T(1.0 / double(P.s2));
    switch (d) {
      case 1: mixture_run<T, 1>(P, out, n_blocks, scale); break;
      case 2: mixture_run<T, 2>(P, out, n_blocks, scale); break;
      case 3: mixture_run<T, 3>(P, out, n_blocks, scale); break;
      case 4: mixture_run<T, 4>(P, out, n_blocks, scale); break;
      default: mixture_run<T, 0>(P, out, n_blocks, scale); break;
    }
  });
  if (check_finite) check_rows_flag(out, p, t, mask_ptr);
  return finish_outputs(out, pred, noise_var, reduction, compute_grad, scale);
}


// Benchmark/test probe (schema csrc/bench_probes.cpp): the chunk length R of the uniform-grid recurrence that
// mixture_nll_fwd takes for these tables (d = 1), 0 when it takes the general path.
int64_t mixture_grid_chunk_cpu(const at::Tensor& log_weight, const at::Tensor& log_norm, const at::Tensor& means,
                               const at::Tensor& precision, const at::Tensor& grad_var_bias) {
  TORCH_CHECK(means.dim() == 2 && means.size(0) == log_weight.size(0), "mixture_grid_chunk: means must be [K, d]");
  int64_t r = 0;
  AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "mixture_grid_chunk", [&] {
    MixtureProblem<scalar_t> P;
    const auto c = [](const at::Tensor& x) { return x.contiguous(); };
    MixtureTables<scalar_t> tables(P, c(log_weight), c(log_norm), c(means), c(precision), c(grad_var_bias));
    r = P.grid_r;
  });
  return r;
}
}  // namespace

TORCH_LIBRARY_IMPL(imbreg_fast, CPU, m) {
  m.impl("bmc_fwd", &bmc_fwd_cpu);
  m.impl("mixture_nll_fwd", &mixture_nll_fwd_cpu);
}

TORCH_LIBRARY_IMPL(imbreg_fast_bench, CPU, m) { m.impl("mixture_grid_chunk", &mixture_grid_chunk_cpu); }

}  // namespace imbreg_fast
