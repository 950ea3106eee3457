// CPU kernel of the Rank-N-Contrast loss: rnc_fwd. Schema and conventions: csrc/rnc.cpp; maths:
// docs/methods.md (RnC). Compiled once per CPU capability (DEFAULT, AVX2, AVX512; setup.py).
//
// For anchor i, with s_ij = -r_ij / tau (r_ij = ||f_i - f_j||) and label distances d_ij, the columns j != i are
// sorted by d_ij; a tie group g (equal d) shares Z_g = sum of e^{s_j} over the group and every later one:
//
//   l_i = (1 / (n - 1)) sum_{k != i} (log Z_{g(k)} - s_ik)
//
// Pass 1 (back to front): the suffix sums of e^{s - M} with M the row's max (vector exps, vector logs; rows
// whose terms spread wider than e^-600 take a running max instead: finite for any distance / tau, unlike the
// published max-subtraction, whose max is the diagonal's 0), log Z_g at each group's head, spread over the group
// front to back (a select per column, no branch). Pass 2 (front to back, group by group), the gradient
// (derivation):
//
//   d l_i / d s_ij = (1 / (n - 1)) (-1 + sum_{k : d_ik <= d_ij} e^{s_ij} / Z_ik)
//                 = (1 / (n - 1)) (-1 + e^{s_ij - log Z_g(j)} T_g(j)),   T_g = sum_{h <= g} m_h e^{log Z_g - log Z_h}
//
// (m_h the size of group h; k runs over every column of the groups up to and including j's own, ties included
// since j is in each of their denominators). Z_h decreases along the sorted order, so every exponent is <= 0 and
// T_g <= n - 1: T_g = T_{g-1} e^{log Z_g - log Z_{g-1}} + m_g, one exp per group. Then through
// s_ij = s_ji = -r_ij / tau, dr_ij / df_i = (f_i - f_j) / r_ij (0 at r_ij = 0, the subgradient torch's norm uses):
//
//   d loss / d f_i = sum_{j != i, r_ij > 0} -(W_ij + W_ji) / (tau r_ij) (f_i - f_j),   W_ij = c_i d l_i / d s_ij
//
// with the anchor's reduction weight c_i, from the differences themselves (no ||f_i|| ||f_j|| cancellation).
//
// Sorting: one label per row (L = 1): the labels are sorted once and row i's order is the merge of the two runs
// going outwards from i's place (O(n) per row; fl(a - b) is monotone in b, so the computed distances come out
// sorted); L > 1: a sort per row by (d_ij, j).
// Determinism: every row's work (distances, sort, scans, its gradient row) is done by one thread in a fixed
// order, the loss is summed over rows in row order after the parallel loop: bit-identical for any thread count.
// Memory: two [n, n] scratch matrices (distances, W) and O(n) per thread (16 n for the gradient's W^T block).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "cpu/common.h"
#include "cpu/pairwise.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

namespace imbreg_fast {
namespace {

// Rows per parallel_for chunk: at least ~64K pair-features of work before another thread is woken.
inline int64_t row_grain(int64_t n, int64_t d) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, n * (d + 16)));
}

// Columns j != i of row i in increasing label distance: order [n - 1] (column indices) and dist [n - 1].
template <typename U>
struct RowOrder {
  const U* y;              // [n, L] labels
  int64_t n, L;
  const int64_t* by_label;  // L == 1: [n] rows sorted by (y, row); else nullptr
  const U* sorted;          // L == 1: [n] y[by_label[p]] (the merge reads no index before its comparison)
  const int64_t* place;     // L == 1: [n] position of each row in by_label

  void operator()(int64_t i, int64_t* order, U* dist, std::vector<int64_t>& scratch) const {
    if (L == 1) {
      // left run: y_j <= y_i, |y_i - y_j| = y_i - y_j; right run: y_j - y_i (both as the rounded |y_i - y_j|).
      // Branch-free merge (the choice is data-dependent, about as unpredictable as a coin): both candidates are
      // read (indices clamped into the array), the pick is a select; ties take the left run first.
      const U yi = y[i];
      int64_t lo = place[i] - 1, hi = place[i] + 1;
      for (int64_t p = 0; p < n - 1; ++p) {
        const int64_t pl = lo >= 0 ? lo : 0, pr = hi < n ? hi : n - 1;
        const U dl = yi - sorted[pl], dr = sorted[pr] - yi;
        const bool left = (lo >= 0) & ((hi >= n) | (dl <= dr));
        order[p] = by_label[left ? pl : pr];
        dist[p] = left ? dl : dr;
        lo -= left;
        hi += !left;
      }
      return;
    }
    scratch.resize(n);
    std::vector<int64_t>& cols = scratch;
    std::vector<U> full(n);
    for (int64_t j = 0; j < n; ++j) {
      U acc = U(0);
      for (int64_t c = 0; c < L; ++c) acc += std::abs(y[i * L + c] - y[j * L + c]);
      full[j] = acc;
    }
    int64_t m = 0;
    for (int64_t j = 0; j < n; ++j) {
      if (j != i) cols[m++] = j;
    }
    std::sort(cols.begin(), cols.begin() + m, [&](int64_t a, int64_t b) {
      return full[a] < full[b] || (full[a] == full[b] && a < b);
    });
    for (int64_t p = 0; p < m; ++p) {
      order[p] = cols[p];
      dist[p] = full[cols[p]];
    }
  }
};

// e[p] = exp(x[p] - shift[p]) (shift == nullptr: minus shift0) for p < m, vectorised (Sleef on AVX2 / AVX-512).
inline void exp_shifted(double* e, const double* x, const double* shift, double shift0, int64_t m) {
  using V = at::vec::Vectorized<double>;
  int64_t p = 0;
  for (; p + V::size() <= m; p += V::size()) {
    const V sh = shift != nullptr ? V::loadu(shift + p) : V(shift0);
    (V::loadu(x + p) - sh).exp().store(e + p);
  }
  for (; p < m; ++p) e[p] = std::exp(x[p] - (shift != nullptr ? shift[p] : shift0));
}

// x[p] = log(x[p]) for p < m, vectorised (Sleef on AVX2 / AVX-512).
inline void log_inplace(double* x, int64_t m) {
  using V = at::vec::Vectorized<double>;
  int64_t p = 0;
  for (; p + V::size() <= m; p += V::size()) V::loadu(x + p).log().store(x + p);
  for (; p < m; ++p) x[p] = std::log(x[p]);
}

// Suffix sums below e^-kSafeRange of the row max stay normal doubles (e^-708 is the smallest): one shift M
// (the row max) is then exact enough for every suffix; rows spread wider take the running-max scan.
constexpr double kSafeRange = 600.0;

// Row i (distances r_row = r[i, :] given): its loss l_i (returned) and, when w_row is given,
// W[i, :] = coef d l_i / d s_i (coef: the anchor's reduction weight c_i; W_ii = 0).
// Scratch: order, dist, s, lz, e, row, heads [n] (row: the distances -r / tau in column order, then W's row: the
// row's random-order reads and writes stay in this thread's own buffer; r_row and w_row are streamed).
template <typename T, typename U>
double rnc_row(int64_t i, int64_t n, double tau, const RowOrder<U>& sorter, double coef, const T* r_row, T* w_row,
               int64_t* order, U* dist, double* s, double* lz, double* e, double* row, int64_t* heads,
               std::vector<int64_t>& scratch) {
  sorter(i, order, dist, scratch);
  const int64_t m = n - 1;
  const double neg_inv_tau = -1.0 / tau;
  for (int64_t j = 0; j < n; ++j) row[j] = static_cast<double>(r_row[j]) * neg_inv_tau;
  for (int64_t p = 0; p < m; ++p) s[p] = row[order[p]];
  double row_max = -std::numeric_limits<double>::infinity();   // a register chain, apart from the stores
  for (int64_t p = 0; p < m; ++p) row_max = s[p] > row_max ? s[p] : row_max;

  // Pass 1: suffix sums back to front, log Z_g = log of the suffix at group g's head (its first column),
  // spread over the group; heads [groups + 1] lists the heads (and m) for pass 2.
  double total = 0.0;
  int64_t groups = 0;
  if (s[m - 1] - row_max > -kSafeRange) {
    // one shift (the row max): every suffix sum holds its own last term >= e^-kSafeRange
    exp_shifted(e, s, nullptr, row_max, m);
    double S = 0.0;
    for (int64_t p = m - 1; p >= 0; --p) {
      S += e[p];
      e[p] = S;
    }
    log_inplace(e, m);
    int64_t head = 0;
    for (int64_t p = 0; p < m; ++p) {
      const bool starts = p == 0 || dist[p] != dist[p - 1];
      heads[groups] = p;
      groups += starts;
      head = starts ? p : head;
      lz[p] = row_max + e[head];
      total += lz[p] - s[p];
    }
  } else {
    // running max mx of the suffix, S = sum of e^{s - mx}: finite for any spread of distances
    double mx = -std::numeric_limits<double>::infinity(), S = 0.0;
    int64_t group_end = m - 1;
    for (int64_t p = m - 1; p >= 0; --p) {
      if (s[p] > mx) {
        S = S * std::exp(mx - s[p]) + 1.0;   // exp(-inf) = 0 on the first column
        mx = s[p];
      } else {
        S += std::exp(s[p] - mx);
      }
      if (p == 0 || dist[p] != dist[p - 1]) {   // group [p, group_end] starts at p
        const double log_z = mx + std::log(S);
        for (int64_t q = p; q <= group_end; ++q) {
          lz[q] = log_z;
          total += log_z - s[q];
        }
        group_end = p - 1;
      }
    }
    for (int64_t p = 0; p < m; ++p) {
      heads[groups] = p;
      groups += p == 0 || dist[p] != dist[p - 1];
    }
  }
  heads[groups] = m;
  if (w_row == nullptr) return total / static_cast<double>(m);

  // Pass 2: d l_i / d s_ij (times n - 1) = -1 + e^{s_j - log Z_g} T_g, front to back over the groups.
  exp_shifted(e, s, lz, 0.0, m);   // e^{s_p - log Z_g(p)} <= 1
  const double c = coef / static_cast<double>(m);
  row[i] = 0.0;
  double t = 0.0, prev_lz = 0.0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t a = heads[g], b = heads[g + 1];
    t = (a == 0 ? 0.0 : t * std::exp(lz[a] - prev_lz)) + static_cast<double>(b - a);
    prev_lz = lz[a];
    for (int64_t p = a; p < b; ++p) row[order[p]] = c * (e[p] * t - 1.0);
  }
  for (int64_t j = 0; j < n; ++j) w_row[j] = static_cast<T>(row[j]);
  return total / static_cast<double>(m);
}

template <typename T, typename U>
void rnc_forward(const T* f, const U* y, const T* weight, int64_t n, int64_t d, int64_t L, double tau,
                 int64_t reduction, T* loss_rows, double* total_out, T* grad) {
  // A NaN / inf label makes every distance comparison meaningless (and a sort with NaN keys undefined): NaN out.
  for (int64_t k = 0; k < n * L; ++k) {
    if (!std::isfinite(static_cast<double>(y[k]))) {
      const T nan = std::numeric_limits<T>::quiet_NaN();
      if (loss_rows != nullptr) std::fill(loss_rows, loss_rows + n, nan);
      if (grad != nullptr) std::fill(grad, grad + n * d, nan);
      *total_out = std::numeric_limits<double>::quiet_NaN();
      return;
    }
  }
  std::vector<int64_t> by_label, place;
  std::vector<U> sorted;
  if (L == 1) {
    by_label.resize(n);
    place.resize(n);
    sorted.resize(n);
    std::iota(by_label.begin(), by_label.end(), int64_t(0));
    std::sort(by_label.begin(), by_label.end(),
              [&](int64_t a, int64_t b) { return y[a] < y[b] || (y[a] == y[b] && a < b); });
    for (int64_t p = 0; p < n; ++p) {
      place[by_label[p]] = p;
      sorted[p] = y[by_label[p]];
    }
  }
  const RowOrder<U> sorter{y, n, L, L == 1 ? by_label.data() : nullptr, L == 1 ? sorted.data() : nullptr,
                           L == 1 ? place.data() : nullptr};
  const double mean_scale = reduction == at::Reduction::Mean ? 1.0 / static_cast<double>(n) : 1.0;
  // [n, n] scratch left uninitialised (every entry is written before it is read; first touched by the threads
  // that fill it)
  std::unique_ptr<T[]> r(new T[static_cast<size_t>(n) * n]);
  std::unique_ptr<T[]> w(grad != nullptr ? new T[static_cast<size_t>(n) * n] : nullptr);
  std::vector<double> anchor_loss(n);
  cpu::pairwise_distances(f, n, d, r.get(), row_grain(n, d));

  at::parallel_for(0, n, row_grain(n, d), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order(n), heads(n), scratch;
    std::vector<U> dist(n);
    std::vector<double> s(n), lz(n), e(n), row(n);
    for (int64_t i = begin; i < end; ++i) {
      const double wi = weight != nullptr ? static_cast<double>(weight[i]) : 1.0;
      anchor_loss[i] = rnc_row<T, U>(i, n, tau, sorter, wi * mean_scale, r.get() + i * n,
                                     grad != nullptr ? w.get() + i * n : nullptr, order.data(), dist.data(),
                                     s.data(), lz.data(), e.data(), row.data(), heads.data(), scratch);
    }
  });

  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double wl = (weight != nullptr ? static_cast<double>(weight[i]) : 1.0) * anchor_loss[i];
    if (loss_rows != nullptr) loss_rows[i] = static_cast<T>(wl);
    total += wl;
  }
  *total_out = total * mean_scale;
  if (grad == nullptr) return;

  // d loss / d f_i from h_ij = -(W_ij + W_ji) / (tau r_ij), rows in blocks of kBlock: the block's W_ji
  // (columns i0 .. i0 + kBlock of W, read a row of W at a time: contiguous) gathered into wt [kBlock, n] first.
  constexpr int64_t kBlock = 16;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, std::max<int64_t>(1, row_grain(n, d) / kBlock), [&](int64_t begin, int64_t end) {
    using V = at::vec::Vectorized<T>;
    std::vector<T> h(n), wt(kBlock * n);
    const T neg_inv_tau = static_cast<T>(-1.0 / tau);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t i0 = blk * kBlock, rows = std::min(kBlock, n - i0);
      for (int64_t j = 0; j < n; ++j) {
        const T* wj = w.get() + j * n + i0;
        for (int64_t k = 0; k < rows; ++k) wt[k * n + j] = wj[k];
      }
      for (int64_t k = 0; k < rows; ++k) {
        const int64_t i = i0 + k;
        // a vector of columns at a time (the last one partial); r = 0 (j = i, or coincident features): the
        // subgradient 0
        const T* ri = r.get() + i * n;
        const T* wi = w.get() + i * n;
        const T* wti = wt.data() + k * n;
        for (int64_t j = 0; j < n; j += V::size()) {
          const int64_t count = std::min<int64_t>(V::size(), n - j);
          const V rv = V::loadu(ri + j, count);
          const V hv = (V::loadu(wi + j, count) + V::loadu(wti + j, count)) * V(neg_inv_tau) / rv;
          V::blendv(V(T(0)), hv, rv > V(T(0))).store(h.data() + j, count);
        }
        cpu::weighted_differences(grad + i * d, f + i * d, f, h.data(), n, d);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rnc_fwd_cpu(const at::Tensor& features, const at::Tensor& labels,
                                               const std::optional<at::Tensor>& anchor_weight, double temperature,
                                               int64_t reduction, bool compute_grad) {
  constexpr const char* op = "rnc_fwd";
  const auto dt = features.scalar_type();
  TORCH_CHECK(features.device().is_cpu() && labels.device().is_cpu(), op, ": the CPU kernel needs CPU tensors, got "
              "features on ", features.device(), " and labels on ", labels.device());
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, op, ": features must be float32 or float64, got ", dt);
  TORCH_CHECK(labels.scalar_type() == at::kFloat || labels.scalar_type() == at::kDouble, op,
              ": labels must be float32 or float64, got ", labels.scalar_type());
  TORCH_CHECK(features.dim() == 2, op, ": features must be [n, d], got ", features.sizes());
  const int64_t n = features.size(0), d = features.size(1);
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == n && labels.size(1) >= 1, op, ": labels must be [", n,
              ", L] with L >= 1, got ", labels.sizes());
  if (anchor_weight.has_value()) {
    TORCH_CHECK(anchor_weight->device().is_cpu() && anchor_weight->scalar_type() == dt, op,
                ": anchor_weight must be a CPU tensor of the features' dtype ", dt, ", got ",
                anchor_weight->scalar_type(), " on ", anchor_weight->device());
    TORCH_CHECK(anchor_weight->dim() == 1 && anchor_weight->size(0) == n, op, ": anchor_weight must be [", n,
                "], got ", anchor_weight->sizes());
  }
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0, op, ": temperature must be finite and > 0, got ",
              temperature);
  TORCH_CHECK(reduction == at::Reduction::None || reduction == at::Reduction::Mean || reduction == at::Reduction::Sum,
              op, ": reduction must be ", int64_t(at::Reduction::None), " ('none'), ", int64_t(at::Reduction::Mean),
              " ('mean') or ", int64_t(at::Reduction::Sum), " ('sum'), got ", reduction);

  const at::Tensor f = features.contiguous();
  const at::Tensor y = labels.contiguous();
  at::Tensor w;
  if (anchor_weight.has_value()) w = anchor_weight->contiguous();
  const auto opt = f.options();
  at::Tensor loss_rows = reduction == at::Reduction::None ? at::zeros({n}, opt) : at::Tensor();
  at::Tensor grad = compute_grad ? at::zeros({n, d}, opt) : at::empty({0}, opt);
  double total = 0.0;
  if (n >= 2) {
    AT_DISPATCH_FLOATING_TYPES(dt, op, [&] {
      using T = scalar_t;
      const T* w_ptr = w.defined() ? w.const_data_ptr<T>() : nullptr;
      T* rows_ptr = loss_rows.defined() ? loss_rows.mutable_data_ptr<T>() : nullptr;
      T* grad_ptr = compute_grad ? grad.mutable_data_ptr<T>() : nullptr;
      if (y.scalar_type() == at::kDouble) {
        rnc_forward<T, double>(f.const_data_ptr<T>(), y.const_data_ptr<double>(), w_ptr, n, d, y.size(1),
                               temperature, reduction, rows_ptr, &total, grad_ptr);
      } else {
        rnc_forward<T, float>(f.const_data_ptr<T>(), y.const_data_ptr<float>(), w_ptr, n, d, y.size(1),
                              temperature, reduction, rows_ptr, &total, grad_ptr);
      }
    });
  }
  at::Tensor out_loss = reduction == at::Reduction::None ? loss_rows : at::scalar_tensor(total, opt);
  return {out_loss, grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(imbreg_fast, CPU, m) {
  m.impl("rnc_fwd", &rnc_fwd_cpu);
}

}  // namespace imbreg_fast
