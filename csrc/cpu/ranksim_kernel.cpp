// CPU kernels of RankSim: ranksim_fwd, ranksim_bwd. Schema and conventions: csrc/ranksim.cpp; maths:
// docs/methods.md (RankSim) and imbreg_fast/ops/ranksim.py. Compiled once per CPU capability (DEFAULT, AVX2,
// AVX512; setup.py); at::vec::Vectorized<T> picks the vector width.
//
// The optional count c keeps the first c rows and columns only (csrc/ranksim.cpp); the rest is written 0.
// Every pass works on rows or groups of cpu::kTileRows rows (at::parallel_for); a row's results depend on that
// row's inputs only and are summed in a fixed order, so the output is bit-identical whatever the number of
// threads. S = z z^T and the chain dz = (dS + dS^T) z are register-tiled products (cpu::rows_times, one
// multiply-add chain per entry). The row reduction of the loss is a serial sum in row order.
// Ranks: a sort per row of integer keys that encode (value, index) (RankKey), by a stable LSD radix sort
// over the value bytes (at most 4 passes for float, 8 for double: O(m) per row, O(m^2) in all). The
// keys order "descending value, NaN above every number, equal values: the later index first" — the
// published stable rule; they are distinct, so the order is unique (deterministic), NaN included.
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
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

namespace imbreg_fast {
namespace {

using at::vec::Vectorized;

constexpr double kNormEps = 1e-12;   // F.normalize's eps
constexpr int64_t kRowGrain = 8;     // rows per parallel task (a row is O(m log m + m d) work)

// Rank keys: the value's bits mapped to an unsigned integer of the same order (sign bit set: all bits
// flipped; else the sign bit set), above them the column index, so that one integer comparison orders
// (value, index) pairs: sorted descending, the larger value first and among equal values the larger (later)
// index first — the rank order. -0.0 is mapped to +0.0 (equal values) and every NaN to the positive quiet
// NaN, whose key lies above +inf's (torch.sort's order: NaN above every number). float: a 64-bit key
// (32 value bits, 32 index bits); double: 128 bits.
template <typename K> struct RankKey;
template <> struct RankKey<float> {
  using type = uint64_t;
  static type make(float v, int64_t j) {
    uint32_t b;
    v = std::isnan(v) ? std::numeric_limits<float>::quiet_NaN() : v + 0.0f;
    std::memcpy(&b, &v, sizeof b);
    b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    return (static_cast<type>(b) << 32) | static_cast<uint32_t>(j);
  }
};
template <> struct RankKey<double> {
  using type = unsigned __int128;
  static type make(double v, int64_t j) {
    uint64_t b;
    v = std::isnan(v) ? std::numeric_limits<double>::quiet_NaN() : v + 0.0;
    std::memcpy(&b, &v, sizeof b);
    b = (b & 0x8000000000000000ull) ? ~b : (b | 0x8000000000000000ull);
    return (static_cast<type>(b) << 32) | static_cast<uint32_t>(j);
  }
};

// Least-significant-digit radix sort (bytes; a counting sort per pass, stable), ascending, over the value
// bytes of the keys only (bits 32 and up); a pass whose byte is the same for every key is skipped. The
// index bits need no pass: the sort is stable, so keys of equal values keep their input order.
template <typename Key>
void radix_sort_values(std::vector<Key>& keys, std::vector<Key>& tmp, int value_bytes) {
  const int64_t m = static_cast<int64_t>(keys.size());
  tmp.resize(m);
  Key* src = keys.data();
  Key* dst = tmp.data();
  for (int byte = 4; byte < 4 + value_bytes; ++byte) {
    const int shift = 8 * byte;
    int64_t count[257] = {0};
    for (int64_t i = 0; i < m; ++i) ++count[static_cast<unsigned>((src[i] >> shift) & 0xff) + 1];
    if (count[static_cast<unsigned>((src[0] >> shift) & 0xff) + 1] == m) continue;
    for (int b = 0; b < 256; ++b) count[b + 1] += count[b];
    for (int64_t i = 0; i < m; ++i) dst[count[static_cast<unsigned>((src[i] >> shift) & 0xff)]++] = src[i];
    std::swap(src, dst);
  }
  if (src != keys.data()) std::copy(src, src + m, keys.data());
}

// out[j] = rank_value[r_j] = (r_j + 1) / m for the values v[0..m), r_j the position of j in the rank order:
// the keys sorted descending, i.e. their complements ascending; the keys enter in DESCENDING index order,
// so that the stable sort leaves equal values with the later index first. keys, tmp: scratch.
template <typename T, typename K>
void rank_row(const K* v, int64_t m, const T* rank_value, std::vector<typename RankKey<K>::type>& keys,
              std::vector<typename RankKey<K>::type>& tmp, T* out) {
  if (m == 0) return;
  keys.resize(m);
  for (int64_t j = 0; j < m; ++j) keys[j] = ~RankKey<K>::make(v[m - 1 - j], m - 1 - j);
  radix_sort_values(keys, tmp, static_cast<int>(sizeof(K)));
  for (int64_t p = 0; p < m; ++p) out[~static_cast<uint32_t>(keys[p])] = rank_value[p];
}

// rank_value[p] = (p + 1) / m, the normalised rank of position p (a division, as the published code).
template <typename T>
std::vector<T> rank_values(int64_t m) {
  std::vector<T> r(m);
  for (int64_t p = 0; p < m; ++p) r[p] = static_cast<T>(p + 1) / static_cast<T>(m);
  return r;
}

// sum_k a[k] b[k] over d values: vector lanes, then the lanes in order. Symmetric in (a, b) bit for bit.
template <typename T>
inline T dot(const T* a, const T* b, int64_t d) {
  using V = Vectorized<T>;
  V acc(T(0));
  int64_t k = 0;
  for (; k + V::size() <= d; k += V::size()) acc = at::vec::fmadd(V::loadu(a + k), V::loadu(b + k), acc);
  __at_align__ T lanes[V::size()];
  acc.store(lanes);
  T s = T(0);
  for (int64_t l = 0; l < V::size(); ++l) s += lanes[l];
  for (; k < d; ++k) s += a[k] * b[k];
  return s;
}

// The active rows and columns are the first c of the m (the count argument of the ops): S, the ranks and the
// row losses of the c x c problem, stored with row stride m; every entry outside it is 0.
template <typename T, typename L>
void forward_impl(const T* x, const L* y, int64_t m, int64_t c, int64_t d, T* z, T* norms, T* s, T* rf, T* ry,
                  T* rows) {
  // z_i = x_i / max(|x_i|, eps)  (F.normalize), every row (the outputs are defined everywhere)
  at::parallel_for(0, m, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T n = std::sqrt(dot(x + i * d, x + i * d, d));
      norms[i] = n;
      const T cl = std::max(n, static_cast<T>(kNormEps));
      for (int64_t k = 0; k < d; ++k) z[i * d + k] = x[i * d + k] / cl;
    }
  });
  // Per active row: S_i = z_i . z_j, R_f,i = rank(S_i), R_y,i = rank(-|y_i - y_j|), L_i = mean_j (R_f - R_y)^2
  // over the active columns j < c. S by row groups of cpu::kTileRows (cpu::similarity_rows of the first c rows):
  // one multiply-add chain per entry, the same bits for any grouping or thread count.
  const std::vector<T> rank_value = rank_values<T>(c);
  constexpr int64_t G = cpu::kTileRows;
  const int64_t cpad = cpu::pad_to_vector_pairs<T>(c);
  const std::vector<T> zt = cpu::transpose_padded(z, c, d, cpad);
  const int64_t groups = (m + G - 1) / G;
  at::parallel_for(0, groups, std::max<int64_t>(1, kRowGrain / G), [&](int64_t begin, int64_t end) {
    std::vector<typename RankKey<T>::type> sort_t, tmp_t;
    std::vector<typename RankKey<L>::type> sort_l, tmp_l;
    std::vector<L> label_key(c);
    std::vector<T> tile(G * cpad);
    for (int64_t g = begin; g < end; ++g) {
      const int64_t i0 = g * G;
      if (i0 < c) cpu::similarity_rows(z, zt.data(), c, cpad, d, i0, T(1), tile.data());   // rows past c: not stored
      for (int64_t i = i0; i < std::min(i0 + G, m); ++i) {
        T* si = s + i * m;
        T* rfi = rf + i * m;
        T* ryi = ry + i * m;
        const int64_t w = i < c ? c : 0;   // the row's active columns
        std::fill(si + w, si + m, T(0));
        std::fill(rfi + w, rfi + m, T(0));
        std::fill(ryi + w, ryi + m, T(0));
        rows[i] = T(0);
        if (w == 0) continue;
        std::copy(tile.data() + (i - i0) * cpad, tile.data() + (i - i0) * cpad + c, si);
        rank_row(si, c, rank_value.data(), sort_t, tmp_t, rfi);
        for (int64_t j = 0; j < c; ++j) label_key[j] = -std::abs(y[i] - y[j]);
        rank_row(label_key.data(), c, rank_value.data(), sort_l, tmp_l, ryi);
        T acc = T(0);
        for (int64_t j = 0; j < c; ++j) {
          const T e = rfi[j] - ryi[j];
          acc += e * e;
        }
        rows[i] = acc / static_cast<T>(c);
      }
    }
  });
}

template <typename T>
void backward_impl(const T* grad, bool per_row, bool mean, const T* z, const T* norms, const T* s, const T* rf,
                   const T* ry, T lam, int64_t m, int64_t c, int64_t d, T* ds, T* gx) {
  const T ct = static_cast<T>(c);
  const std::vector<T> rank_value = rank_values<T>(c);
  // dS_i = (rank(S_i + lam G_i) - R_f,i) / lam over the active columns,  G_ij = (g_i / c) (2 (R_f - R_y)_ij)
  // (the d/dR_f of g_i mean_j (R_f - R_y)^2); g_i = grad[i] ('none'), grad ('sum') or grad / c ('mean').
  // Only the active c x c block of ds is written and read.
  at::parallel_for(0, c, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<typename RankKey<T>::type> sort_keys, tmp;
    std::vector<T> perturbed(c), rank_p(c);
    for (int64_t i = begin; i < end; ++i) {
      const T gi = per_row ? grad[i] : mean ? grad[0] / ct : grad[0];
      const T g_row = gi / ct;
      for (int64_t j = 0; j < c; ++j) {
        const T g = g_row * (T(2) * (rf[i * m + j] - ry[i * m + j]));
        perturbed[j] = s[i * m + j] + lam * g;
      }
      rank_row(perturbed.data(), c, rank_value.data(), sort_keys, tmp, rank_p.data());
      for (int64_t j = 0; j < c; ++j) ds[i * m + j] = (rank_p[j] - rf[i * m + j]) / lam;
    }
  });
  // S = z z^T: dz_i = sum_j (dS_ij + dS_ji) z_j, by row groups: A's rows times zp (the first c rows of z with
  // d padded to whole vector pairs by zeros) with cpu::rows_times, one multiply-add chain over j in order per entry.
  // z = x / cl, cl = max(|x|, eps):
  //   |x| >= eps: dx = dz / |x| - x (dz . x) / |x|^3 = (dz - z (z . dz)) / |x|;   |x| < eps: dx = dz / eps.
  // Inactive rows (i >= c) do not enter the loss: dx_i = 0.
  constexpr int64_t G = cpu::kTileRows;
  const int64_t dpad = cpu::pad_to_vector_pairs<T>(d);
  std::vector<T> zp(c * dpad, T(0));
  for (int64_t j = 0; j < c; ++j) std::copy(z + j * d, z + (j + 1) * d, zp.data() + j * dpad);
  std::fill(gx + c * d, gx + m * d, T(0));
  const int64_t groups = (c + G - 1) / G;
  at::parallel_for(0, groups, std::max<int64_t>(1, kRowGrain / G), [&](int64_t begin, int64_t end) {
    std::vector<T> a(G * c), dz(G * dpad);
    for (int64_t g = begin; g < end; ++g) {
      const int64_t i0 = g * G;
      const T* ar[G];
      for (int64_t r = 0; r < G; ++r) {
        const int64_t i = std::min(i0 + r, c - 1);   // rows past c repeat row c - 1; not stored
        T* ai = a.data() + r * c;
        for (int64_t j = 0; j < c; ++j) ai[j] = ds[i * m + j] + ds[j * m + i];
        ar[r] = ai;
      }
      cpu::rows_times(ar, zp.data(), dpad, c, dpad, T(1), dz.data(), dpad);
      for (int64_t i = i0; i < std::min(i0 + G, c); ++i) {
        const T* dzi = dz.data() + (i - i0) * dpad;
        T* out = gx + i * d;
        const T n = norms[i];
        if (n >= static_cast<T>(kNormEps)) {
          const T proj = dot(z + i * d, dzi, d);
          for (int64_t k = 0; k < d; ++k) out[k] = (dzi[k] - z[i * d + k] * proj) / n;
        } else {
          for (int64_t k = 0; k < d; ++k) out[k] = dzi[k] / static_cast<T>(kNormEps);
        }
      }
    }
  });
}

// The active count c of the optional count argument ([] or [1] int64 CPU, 0 <= c <= m); None: every row.
int64_t active_count(const char* op, const c10::optional<at::Tensor>& count, int64_t m) {
  if (!count.has_value()) return m;
  const at::Tensor& t = *count;
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.numel() == 1, op,
              ": count must be a one-element int64 CPU tensor, got ", t.scalar_type(), " ", t.sizes(), " on ",
              t.device());
  const int64_t c = t.item<int64_t>();
  TORCH_CHECK(c >= 0 && c <= m, op, ": count must be in [0, ", m, "], got ", c);
  return c;
}

void check_reduction(const char* op, int64_t reduction) {
  TORCH_CHECK(reduction == at::Reduction::None || reduction == at::Reduction::Mean || reduction == at::Reduction::Sum,
              op, ": reduction must be 0 ('none'), 1 ('mean') or 2 ('sum'), got ", reduction);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ranksim_fwd_cpu(
    const at::Tensor& features, const at::Tensor& labels, const c10::optional<at::Tensor>& count, double lam,
    int64_t reduction, bool compute_grad) {
  const char* op = "imbreg_fast::ranksim_fwd";
  TORCH_CHECK(features.device().is_cpu() && labels.device().is_cpu(), op, ": CPU tensors expected");
  TORCH_CHECK(features.dim() == 2, op, ": features must be [m, d], got ", features.sizes());
  const auto dt = features.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, op, ": features must be float32 or float64, got ", dt);
  const auto lt = labels.scalar_type();
  TORCH_CHECK(lt == at::kFloat || lt == at::kDouble, op, ": labels must be float32 or float64, got ", lt);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == features.size(0), op, ": labels must be [m] for features ",
              features.sizes(), ", got ", labels.sizes());
  TORCH_CHECK(std::isfinite(lam) && lam > 0.0, op, ": lam must be finite and > 0, got ", lam);
  check_reduction(op, reduction);
  TORCH_CHECK(features.size(0) <= std::numeric_limits<int32_t>::max(), op, ": at most 2^31 - 1 rows, got ",
              features.size(0));
  const at::Tensor x = features.contiguous();
  const at::Tensor y = labels.contiguous();
  const int64_t m = x.size(0), d = x.size(1);
  const int64_t c = active_count(op, count, m);
  const auto opt = x.options();
  at::Tensor z = at::empty({m, d}, opt), norms = at::empty({m}, opt);
  at::Tensor s = at::empty({m, m}, opt), rf = at::empty({m, m}, opt), ry = at::empty({m, m}, opt);
  at::Tensor rows = at::empty({m}, opt);
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES(dt, "ranksim", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(lt, "ranksim_labels", [&] {
      forward_impl<T, scalar_t>(x.const_data_ptr<T>(), y.const_data_ptr<scalar_t>(), m, c, d, z.mutable_data_ptr<T>(),
                                norms.mutable_data_ptr<T>(), s.mutable_data_ptr<T>(), rf.mutable_data_ptr<T>(),
                                ry.mutable_data_ptr<T>(), rows.mutable_data_ptr<T>());
    });
    if (reduction == at::Reduction::None) {
      loss = rows;
    } else {
      const T* r = rows.const_data_ptr<T>();
      T total = T(0);
      for (int64_t i = 0; i < m; ++i) total += r[i];
      if (reduction == at::Reduction::Mean) total = c > 0 ? total / static_cast<T>(c) : T(0);
      loss = at::scalar_tensor(total, opt);
    }
  });
  if (!compute_grad) {   // distinct empty tensors: the outputs may not alias each other
    auto e = [&] { return at::empty({0}, opt); };
    return {loss, e(), e(), e(), e(), e()};
  }
  return {loss, z, norms, s, rf, ry};
}

at::Tensor ranksim_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& z, const at::Tensor& norms,
                           const at::Tensor& s, const at::Tensor& rank_f, const at::Tensor& rank_y,
                           const c10::optional<at::Tensor>& count, double lam, int64_t reduction) {
  const char* op = "imbreg_fast::ranksim_bwd";
  check_reduction(op, reduction);
  TORCH_CHECK(z.dim() == 2, op, ": z must be [m, d], got ", z.sizes());
  const int64_t m = z.size(0), d = z.size(1);
  const auto dt = z.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, op, ": z must be float32 or float64, got ", dt);
  for (const at::Tensor* t : {&grad_loss, &norms, &s, &rank_f, &rank_y}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == dt, op, ": every tensor must be a CPU ", dt, " tensor");
  }
  TORCH_CHECK(norms.numel() == m && s.sizes() == at::IntArrayRef({m, m}) && rank_f.sizes() == s.sizes() &&
                  rank_y.sizes() == s.sizes(),
              op, ": norms [m], s, rank_f, rank_y [m, m] expected for z ", z.sizes());
  const bool per_row = reduction == at::Reduction::None;
  TORCH_CHECK(per_row ? grad_loss.numel() == m : grad_loss.numel() == 1, op, ": grad_loss must be ",
              per_row ? "[m]" : "a scalar", ", got ", grad_loss.sizes());
  TORCH_CHECK(std::isfinite(lam) && lam > 0.0, op, ": lam must be finite and > 0, got ", lam);
  const int64_t c = active_count(op, count, m);
  const at::Tensor g = grad_loss.contiguous(), zc = z.contiguous(), nc = norms.contiguous(), sc = s.contiguous();
  const at::Tensor rfc = rank_f.contiguous(), ryc = rank_y.contiguous();
  at::Tensor gx = at::empty({m, d}, z.options());
  if (m == 0) return gx;
  at::Tensor ds = at::empty({m, m}, z.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "ranksim", [&] {
    using T = scalar_t;
    backward_impl<T>(g.const_data_ptr<T>(), per_row, reduction == at::Reduction::Mean, zc.const_data_ptr<T>(), nc.const_data_ptr<T>(),
                     sc.const_data_ptr<T>(), rfc.const_data_ptr<T>(), ryc.const_data_ptr<T>(), static_cast<T>(lam), m,
                     c, d, ds.mutable_data_ptr<T>(), gx.mutable_data_ptr<T>());
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(imbreg_fast, CPU, m) {
  m.impl("ranksim_fwd", &ranksim_fwd_cpu);
  m.impl("ranksim_bwd", &ranksim_bwd_cpu);
}

}  // namespace imbreg_fast
