// CPU kernels of ConR: conr_fwd (loss and d loss / d features in one call) and conr_bwd (the gradient for a
// per-anchor incoming gradient, reduction 'none'). Schema and conventions: csrc/conr.cpp; definitions and the
// gradient's derivation: imbreg_fast/ops/conr.py. Compiled once per CPU capability; at::vec::Vectorized<T>
// picks the vector width.
//
// Work is per anchor row, O(n + a d) each for a active columns (positives and negatives; O(n d) where a row group
// is dense) and O(n + d) memory per thread besides z and z^T ([n, d] each); no [n, n] tensor:
//   1. z_i = f_i / max(|f_i|, eps)                                   rows in parallel
//   2. row statistics (groups of 4 rows in parallel): the active columns (active_group: vector masks, compacted)
//      and their S_ij = z_i . z_j / tau (dense tiles of cpu::similarity_rows for a dense group, else a dot product
//      per pair), the terms t_ij = S_ij + log a_ij, their max M_i, log D_i = M_i + log(sum_j exp(t_ij - M_i) +
//      m_i exp(-M_i)) (the published ones m_i = n - |P_i| shifted by the same M_i), |P_i|, |N_i|,
//      sum_{P_i} S_ij, the loss L_i;
//   3. gradient (groups of 4 rows in parallel, the active columns and S recomputed): H_kj = c_k G_kj + c_j G_jk
//      from the statistics of rows k and j (zero off the active columns: both relations are symmetric), then
//      d L / d z_k = (1/tau) sum_j H_kj z_j and the normalisation's Jacobian (I - z_k z_k^T) / |f_k|.
// Determinism: every value of row i is computed by the same operations in the same order whatever the thread
// that runs it (the dense/sparse choice of a group depends on its data only; either way S_ij == S_ji bit for bit
// within one method); the loss is the sum of the rows in row order. Results are bit-identical for any number of
// threads. Columns are taken a vector at a time, the last vector partial (its extra lanes masked).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "cpu/common.h"
#include "cpu/fast_exp.h"
#include "cpu/pairwise.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace imbreg_fast {
namespace {

using at::vec::Vectorized;

constexpr double kNormEps = 1e-12;    // F.normalize's eps
constexpr int64_t kGroupGrain = 2;     // row groups per task at least (each row is O(n d))

template <typename T>
inline T lane_sum(const Vectorized<T>& v) {
  __at_align__ T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T s = T(0);
  for (int64_t l = 0; l < Vectorized<T>::size(); ++l) s += lanes[l];
  return s;
}

template <typename T>
inline T lane_max(const Vectorized<T>& v) {
  __at_align__ T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T m = lanes[0];
  for (int64_t l = 1; l < Vectorized<T>::size(); ++l) m = std::max(m, lanes[l]);
  return m;
}

// a . b over d entries: one vector chain, lane sum in lane order, then the d mod VL tail in order.
template <typename T>
inline T dot(const T* a, const T* b, int64_t d) {
  using V = Vectorized<T>;
  V acc(T(0));
  int64_t c = 0;
  for (; c + V::size() <= d; c += V::size()) acc = at::vec::fmadd(V::loadu(a + c), V::loadu(b + c), acc);
  T s = lane_sum(acc);
  for (; c < d; ++c) s += a[c] * b[c];
  return s;
}

constexpr int64_t kGroup = cpu::kTileRows;   // rows per group: the similarity tiles' row count

template <typename T>
struct Problem {
  int64_t n, d;
  const T* z;          // [n, d] normalised features
  const T* zt;         // [d, npad] z transposed, zero columns past n
  int64_t npad;        // n rounded up to two vectors
  const T* y;          // [n] targets
  const T* p;          // [n] predictions
  const T* log_w;      // [n] log omega (0 where omega = 0 or without weights: such terms are multiplied by 0)
  T window, inv_tau, pushing;
  bool published;
};

// Per-row statistics of pass 2. Invalid rows (no positive or no negative): log_d = 0, inv_pos = 0, valid = 0.
template <typename T>
struct RowStats {
  std::vector<T> log_d, inv_pos, loss;
  std::vector<uint8_t> valid;
  explicit RowStats(int64_t n) : log_d(n), inv_pos(n), loss(n), valid(n) {}
};

// Masks of one vector of columns [j, j + count) of row i: positives (|dy| <= w, j != i, j < n) and negatives
// (|dy| > w, |dp| <= w, j < n); dy = |y_i - y_j| returned.
template <typename T>
inline void column_masks(const Problem<T>& P, int64_t i, int64_t j, int64_t count, Vectorized<T>& pos,
                         Vectorized<T>& neg, Vectorized<T>& dy) {
  using V = Vectorized<T>;
  const V idx = V::arange(static_cast<T>(j), T(1));
  const V in_range = idx < V(static_cast<T>(P.n));
  const V not_self = idx != V(static_cast<T>(i));
  dy = (V(P.y[i]) - V::loadu(P.y + j, count)).abs();
  const V dp = (V(P.p[i]) - V::loadu(P.p + j, count)).abs();
  const V w(P.window);
  const V close = dy <= w;
  pos = close & not_self & in_range;
  neg = (dy > w) & (dp <= w) & in_range;
}

// The columns a row needs: positives and negatives (the "active" columns; the others enter D_i only through the
// published constant m_i, and H only as 0). Both relations are symmetric (|y_i - y_j| and |p_i - p_j|), so row
// k's active columns are also the rows whose G has a term in column k.
template <typename T>
struct ActiveRows {
  // kGroup rows, each with up to npad entries: column index, S_ij, whether positive, |y_i - y_j|; count[r]
  // entries, padded to whole vectors (the padding is masked by its index: entry k is live iff k < count[r]).
  std::vector<int64_t> cols;
  std::vector<T> s, pos, dy;
  int64_t count[kGroup];
  int64_t npad;
  explicit ActiveRows(int64_t npad_) : cols(kGroup * npad_), s(kGroup * npad_), pos(kGroup * npad_),
                                       dy(kGroup * npad_), count{}, npad(npad_) {}

  struct Row {
    const int64_t* cols;
    const T *s, *pos, *dy;
    int64_t count;
  };
  Row row(int64_t r) const {
    const int64_t o = r * npad;
    return {cols.data() + o, s.data() + o, pos.data() + o, dy.data() + o, count[r]};
  }
};

// Rows above this fraction of active columns (on average over a group) take the dense similarity tiles: a tile
// costs about d / (2 VL) cycles per column, a separate dot product several times that.
constexpr int64_t kDenseDivisor = 6;   // dense when active > n / kDenseDivisor per row

// The active columns of rows i0 .. i0 + kGroup - 1 (rows >= n: none) and their similarities S_ij = z_i . z_j / tau:
// from the tiles of cpu::similarity_rows where the group is dense, else one dot product per active pair (a
// multiply-add chain per vector lane, lanes summed in order: symmetric in i, j). The choice depends on the data
// only (never on the thread): results are the same for any thread count. sg: scratch [kGroup, npad].
template <typename T>
void active_group(const Problem<T>& P, int64_t i0, ActiveRows<T>& A, std::vector<T>& sg) {
  using V = Vectorized<T>;
  const int64_t n = P.n;
  const int full = (1 << V::size()) - 1;
  __at_align__ T dyl[V::size()];
  int64_t total = 0;
  for (int64_t r = 0; r < kGroup; ++r) {
    const int64_t i = i0 + r;
    int64_t m = 0;
    int64_t* cols = A.cols.data() + r * A.npad;
    T* pos = A.pos.data() + r * A.npad;
    T* dyv = A.dy.data() + r * A.npad;
    for (int64_t j = 0; i < n && j < n; j += V::size()) {
      const int64_t count = std::min<int64_t>(V::size(), n - j);
      V pv, nv, dy;
      column_masks(P, i, j, count, pv, nv, dy);
      const int act = ~(pv | nv).zero_mask() & full;
      if (act == 0) continue;
      const int pbits = ~pv.zero_mask() & full;
      dy.store(dyl);
      for (int bits = act; bits != 0; bits &= bits - 1) {
        const int l = __builtin_ctz(static_cast<unsigned>(bits));
        cols[m] = j + l;
        pos[m] = (pbits >> l) & 1 ? T(1) : T(0);
        dyv[m] = dyl[l];
        ++m;
      }
    }
    A.count[r] = m;
    total += m;
    const int64_t padded = (m + V::size() - 1) / V::size() * V::size();
    for (int64_t k = m; k < padded; ++k) {
      cols[k] = 0;
      pos[k] = dyv[k] = A.s[r * A.npad + k] = T(0);
    }
  }
  if (total * kDenseDivisor > kGroup * n) {
    cpu::similarity_rows(P.z, P.zt, n, P.npad, P.d, i0, P.inv_tau, sg.data());
    for (int64_t r = 0; r < kGroup; ++r) {
      for (int64_t k = 0; k < A.count[r]; ++k) A.s[r * A.npad + k] = sg[r * P.npad + A.cols[r * A.npad + k]];
    }
  } else {
    for (int64_t r = 0; r < kGroup; ++r) {
      const T* zi = P.z + std::min(i0 + r, n - 1) * P.d;
      for (int64_t k = 0; k < A.count[r]; ++k) {
        A.s[r * A.npad + k] = dot(zi, P.z + A.cols[r * A.npad + k] * P.d, P.d) * P.inv_tau;
      }
    }
  }
}

// Pass 2 for the row groups [begin, end): each row's statistics from its active columns (in column order).
template <typename T>
void row_statistics(const Problem<T>& P, const T* omega, int64_t begin, int64_t end, RowStats<T>& out) {
  using V = Vectorized<T>;
  const int64_t n = P.n;
  ActiveRows<T> A(P.npad);
  std::vector<T> sg(kGroup * P.npad), t(P.npad);
  const T minus_inf = -std::numeric_limits<T>::infinity();
  for (int64_t g = begin; g < end; ++g) {
    active_group(P, g * kGroup, A, sg);
    for (int64_t r = 0; r < kGroup && g * kGroup + r < n; ++r) {
      const auto row = A.row(r);
      const int64_t i = g * kGroup + r, m = row.count;
      const T *s = row.s, *pos = row.pos, *dyv = row.dy;
      V vmax(minus_inf), npos(T(0)), spos(T(0));
      const V zero(T(0)), log_wi(P.log_w[i]), push(P.pushing);
      for (int64_t k = 0; k < m; k += V::size()) {
        const V sv = V::loadu(s + k), pm = V::loadu(pos + k) != zero;
        const V live = V::arange(static_cast<T>(k), T(1)) < V(static_cast<T>(m));
        // t_ik = S (positive), S + log omega_i + e |dy| (negative), -inf (padding)
        const V tv = V::blendv(V(minus_inf), V::blendv(sv + log_wi + push * V::loadu(dyv + k), sv, pm), live);
        tv.store(t.data() + k);
        vmax = at::vec::maximum(vmax, tv);
        npos = npos + (V(T(1)) & pm);
        spos = spos + (sv & pm);
      }
      const T n_pos = lane_sum(npos), n_neg = static_cast<T>(m) - n_pos;
      if (n_pos == T(0) || n_neg == T(0)) {
        out.log_d[i] = T(0);
        out.inv_pos[i] = T(0);
        out.loss[i] = T(0);
        out.valid[i] = 0;
        continue;
      }
      const T ones = static_cast<T>(n) - n_pos;            // >= 1: the anchor's own column is never a positive
      T mx = lane_max(vmax);
      if (P.published) mx = std::max(mx, std::log(ones));
      V acc(T(0));
      for (int64_t k = 0; k < m; k += V::size()) {
        const V arg = at::vec::minimum(V::loadu(t.data() + k) - V(mx), zero);   // -inf at the padding
        const V live = arg != V(minus_inf);
        acc = acc + (exp_shifted(V::blendv(zero, arg, live)) & live);
      }
      T sum = lane_sum(acc);
      if (P.published) sum += ones * std::exp(-mx);
      const T log_d = mx + std::log(sum);
      const T inv = T(1) / n_pos;
      out.log_d[i] = log_d;
      out.inv_pos[i] = inv;
      out.loss[i] = (omega ? omega[i] : T(1)) * (log_d - lane_sum(spos) * inv);
      out.valid[i] = 1;
    }
  }
}

// Pass 3 for the row groups [begin, end): grad [n, d] rows of d (sum_i coef_i L_i) / d f, coef_i = c_i [valid_i];
// denom [n] = max(|f_k|, eps), grad_out in the output dtype O.
template <typename T, typename O>
void gradient_rows(const Problem<T>& P, const RowStats<T>& st, const T* coef, const T* denom, int64_t begin,
                   int64_t end, O* grad) {
  using V = Vectorized<T>;
  const int64_t n = P.n, d = P.d;
  ActiveRows<T> A(P.npad);
  std::vector<T> sg(kGroup * P.npad), h(P.npad), gz(d);
  __at_align__ T cj_l[V::size()], log_dj_l[V::size()], inv_j_l[V::size()], log_wj_l[V::size()];
  const V zero(T(0));
  for (int64_t g = begin; g < end; ++g) {
    active_group(P, g * kGroup, A, sg);
    for (int64_t r = 0; r < kGroup && g * kGroup + r < n; ++r) {
      const auto row = A.row(r);
      const int64_t k = g * kGroup + r, m = row.count;
      const int64_t* cols = row.cols;
      const T *s = row.s, *pos = row.pos, *dyv = row.dy;
      const V ck(coef[k]), log_dk(st.log_d[k]), inv_k(st.inv_pos[k]), log_wk(P.log_w[k]);
      for (int64_t q = 0; q < m; q += V::size()) {
        for (int64_t l = 0; l < V::size(); ++l) {   // column j's statistics (padding: column 0, masked below)
          const int64_t j = cols[q + l];
          cj_l[l] = coef[j];
          log_dj_l[l] = st.log_d[j];
          inv_j_l[l] = st.inv_pos[j];
          log_wj_l[l] = P.log_w[j];
        }
        const V sv = V::loadu(s + q), pm = V::loadu(pos + q) != zero;
        const V live = V::arange(static_cast<T>(q), T(1)) < V(static_cast<T>(m));
        const V cj = V::loadu(cj_l), inv_j = V::loadu(inv_j_l);
        // G_kj = a_kj e^{S_kj} / D_k - [j in P_k] / |P_k|; for a negative, log a_kj = log omega_k + e |dy|
        const V push = V(P.pushing) * V::loadu(dyv + q);
        const V row_arg = V::blendv(sv + push + log_wk, sv, pm) - log_dk;
        const V col_arg = V::blendv(sv + push + V::loadu(log_wj_l), sv, pm) - V::loadu(log_dj_l);
        const V e_row = exp_shifted(at::vec::minimum(row_arg, zero));
        const V e_col = exp_shifted(at::vec::minimum(col_arg, zero));
        const V on_pos = ck * (e_row - inv_k) + cj * (e_col - inv_j);
        const V on_neg = ck * e_row + cj * e_col;
        V::blendv(zero, V::blendv(on_neg, on_pos, pm), live).store(h.data() + q);
      }
      // g = (1/tau) sum_j H_kj z_j  (active columns in order, zero weights skipped)
      std::fill(gz.begin(), gz.end(), T(0));
      for (int64_t q = 0; q < m; ++q) {
        const T hj = h[q];
        if (hj == T(0)) continue;
        const T* zj = P.z + cols[q] * d;
        const V hv(hj);
        int64_t c = 0;
        for (; c + V::size() <= d; c += V::size()) at::vec::fmadd(hv, V::loadu(zj + c), V::loadu(gz.data() + c)).store(gz.data() + c);
        for (; c < d; ++c) gz[c] += hj * zj[c];
      }
      // d / d f_k = (g - z_k (z_k . g)) / |f_k|  (|f_k| > eps), g / eps otherwise; g carries 1/tau
      const T* zk = P.z + k * d;
      O* out = grad + k * d;
      if (denom[k] > static_cast<T>(kNormEps)) {
        const T proj = dot(zk, gz.data(), d) * P.inv_tau;
        for (int64_t c = 0; c < d; ++c) out[c] = static_cast<O>((gz[c] * P.inv_tau - zk[c] * proj) / denom[k]);
      } else {
        for (int64_t c = 0; c < d; ++c) out[c] = static_cast<O>(gz[c] * P.inv_tau / denom[k]);
      }
    }
  }
}

void check_inputs(const char* op, const at::Tensor& features, const at::Tensor& targets, const at::Tensor& preds,
                  const std::optional<at::Tensor>& weights, double temperature) {
  const auto dt = features.scalar_type();
  TORCH_CHECK(features.device().is_cpu(), op, ": the CPU kernel needs CPU tensors, got features on ",
              features.device());
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
              ": features must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK(features.dim() == 2, op, ": features must be [n, d], got ", features.sizes());
  const int64_t n = features.size(0);
  const auto cdt = cpu::compute_dtype(dt);
  auto per_anchor = [&](const char* name, const at::Tensor& x) {
    TORCH_CHECK(x.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", x.device());
    TORCH_CHECK(x.scalar_type() == cdt, op, ": ", name, " must have the compute dtype ", cdt, ", got ",
                x.scalar_type());
    TORCH_CHECK(x.dim() == 1 && x.size(0) == n, op, ": ", name, " must be [", n, "], got ", x.sizes());
  };
  per_anchor("targets", targets);
  per_anchor("preds", preds);
  if (weights.has_value()) per_anchor("weights", *weights);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0, op, ": temperature must be finite and > 0, got ",
              temperature);
}

template <typename T>
void check_values(const T* f, int64_t nd, const T* y, const T* p, const T* w, int64_t n) {
  if (cpu::any_non_finite(f, 1, nd, nullptr)) cpu::raise_non_finite("features", false);
  if (cpu::any_non_finite(y, 1, n, nullptr)) cpu::raise_non_finite("targets", false);
  if (cpu::any_non_finite(p, 1, n, nullptr)) cpu::raise_non_finite("preds", false);
  if (w != nullptr) {
    if (cpu::any_non_finite(w, 1, n, nullptr)) cpu::raise_non_finite("weights", false);
    for (int64_t i = 0; i < n; ++i) TORCH_CHECK_VALUE(w[i] >= T(0), "weights must be >= 0, got ", w[i]);
  }
}

// The shared part of both ops: z, the norms, the statistics; then the gradient for coefficients made by
// make_coef(stats) (nullptr: no gradient). Returns the per-row losses.
template <typename T, typename MakeCoef>
std::vector<T> conr_cpu(const at::Tensor& features, const at::Tensor& targets, const at::Tensor& preds,
                        const std::optional<at::Tensor>& weights, double window, double temperature, double pushing,
                        bool published, bool check_finite, bool want_grad, MakeCoef make_coef, at::Tensor* grad) {
  const int64_t n = features.size(0), d = features.size(1);
  const at::Tensor f = features.to(targets.scalar_type()).contiguous();
  const T* fp = f.const_data_ptr<T>();
  const T* y = targets.const_data_ptr<T>();
  const T* p = preds.const_data_ptr<T>();
  at::Tensor w_t = weights.has_value() ? weights->contiguous() : at::Tensor();
  const T* w = w_t.defined() ? w_t.const_data_ptr<T>() : nullptr;
  if (check_finite) check_values<T>(fp, n * d, y, p, w, n);

  std::vector<T> z(n * d), denom(n), log_w(n, T(0));
  if (w != nullptr) {
    for (int64_t i = 0; i < n; ++i) log_w[i] = w[i] > T(0) ? std::log(w[i]) : T(0);
  }
  at::parallel_for(0, n, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const T* fi = fp + i * d;
      const T nrm = std::sqrt(dot(fi, fi, d));
      const T dn = std::max(nrm, static_cast<T>(kNormEps));
      denom[i] = dn;
      for (int64_t c = 0; c < d; ++c) z[i * d + c] = fi[c] / dn;
    }
  });
  const int64_t npad = cpu::pad_to_vector_pairs<T>(n);
  const std::vector<T> zt = cpu::transpose_padded(z.data(), n, d, npad);
  const int64_t groups = (n + kGroup - 1) / kGroup;
  Problem<T> P{n, d, z.data(), zt.data(), npad, y, p, log_w.data(), static_cast<T>(window), static_cast<T>(1.0 / temperature),
               static_cast<T>(pushing), published};
  RowStats<T> st(n);
  at::parallel_for(0, groups, kGroupGrain, [&](int64_t b, int64_t e) { row_statistics(P, w, b, e, st); });
  if (want_grad) {
    std::vector<T> coef = make_coef(st);
    for (int64_t i = 0; i < n; ++i) {
      if (!st.valid[i]) coef[i] = T(0);
      if (w != nullptr) coef[i] *= w[i];
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad->scalar_type(), "conr_grad", [&] {
      scalar_t* g = grad->mutable_data_ptr<scalar_t>();
      at::parallel_for(0, groups, kGroupGrain, [&](int64_t b, int64_t e) {
        gradient_rows<T, scalar_t>(P, st, coef.data(), denom.data(), b, e, g);
      });
    });
  }
  return st.loss;
}

std::tuple<at::Tensor, at::Tensor> conr_fwd_cpu(const at::Tensor& features, const at::Tensor& targets,
                                                const at::Tensor& preds, const std::optional<at::Tensor>& weights,
                                                double window, double temperature, double pushing,
                                                bool published_denominator, int64_t reduction, bool compute_grad,
                                                bool check_finite) {
  constexpr const char* op = "conr_fwd";
  check_inputs(op, features, targets, preds, weights, temperature);
  TORCH_CHECK(reduction == at::Reduction::None || reduction == at::Reduction::Mean || reduction == at::Reduction::Sum,
              op, ": reduction must be 0 ('none'), 1 ('mean') or 2 ('sum'), got ", reduction);
  const auto dt = features.scalar_type();
  const int64_t n = features.size(0);
  const bool grad_here = compute_grad && reduction != at::Reduction::None;
  at::Tensor grad = grad_here ? at::empty(features.sizes(), features.options()) : at::empty({0}, features.options());
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES(targets.scalar_type(), op, [&] {
    using T = scalar_t;
    const T r = reduction == at::Reduction::Mean ? T(1) / static_cast<T>(std::max<int64_t>(n, 1)) : T(1);
    auto coef = [&](const RowStats<T>&) { return std::vector<T>(n, r); };
    std::vector<T> rows = conr_cpu<T>(features, targets, preds, weights, window, temperature, pushing,
                                      published_denominator, check_finite, grad_here, coef, &grad);
    if (reduction == at::Reduction::None) {
      loss = at::empty({n}, targets.options());
      std::copy(rows.begin(), rows.end(), loss.mutable_data_ptr<T>());
      loss = loss.to(dt);
    } else {
      double total = 0.0;
      for (T v : rows) total += static_cast<double>(v);
      if (reduction == at::Reduction::Mean) total /= static_cast<double>(std::max<int64_t>(n, 1));
      loss = at::scalar_tensor(total, features.options().dtype(dt));
    }
  });
  return {loss, grad};
}

at::Tensor conr_bwd_cpu(const at::Tensor& features, const at::Tensor& targets, const at::Tensor& preds,
                        const std::optional<at::Tensor>& weights, const at::Tensor& grad_rows, double window,
                        double temperature, double pushing, bool published_denominator) {
  constexpr const char* op = "conr_bwd";
  check_inputs(op, features, targets, preds, weights, temperature);
  const int64_t n = features.size(0);
  TORCH_CHECK(grad_rows.scalar_type() == targets.scalar_type() && grad_rows.dim() == 1 && grad_rows.size(0) == n,
              op, ": grad_rows must be [", n, "] of dtype ", targets.scalar_type(), ", got ", grad_rows.sizes(), " ",
              grad_rows.scalar_type());
  at::Tensor grad = at::empty(features.sizes(), features.options());
  const at::Tensor g = grad_rows.contiguous();
  AT_DISPATCH_FLOATING_TYPES(targets.scalar_type(), op, [&] {
    using T = scalar_t;
    const T* gp = g.const_data_ptr<T>();
    auto coef = [&](const RowStats<T>&) { return std::vector<T>(gp, gp + n); };
    conr_cpu<T>(features, targets, preds, weights, window, temperature, pushing, published_denominator, false,
                true, coef, &grad);
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(imbreg_fast, CPU, m) {
  m.impl("conr_fwd", &conr_fwd_cpu);
  m.impl("conr_bwd", &conr_bwd_cpu);
}

}  // namespace imbreg_fast
