// CPU kernels of the FDS ops (schemas and layout: csrc/fds.cpp). Compiled once per CPU capability.
//
// Both ops group pixels by bin with a deterministic counting sort (per-block histograms + prefix sums:
// the sorted order is (bin, pixel index), whatever the thread count) and pack each pixel's C features into
// a contiguous row of a sorted workspace X [M, C] (reading the strided input tile by tile through
// register transposes, no permute copy of the whole tensor). The C x C products use the single-threaded
// register-tiled kernels of gemm.h and gram.h (per CPU capability; 2.4x and, for the half-size Gram
// product, 4.5x faster than MKL's sgemm on the AMD dev machine, where MKL takes its AVX2 path). Then:
//   fds_recolor:    one GEMM per (bin, chunk of rows): X[rows of bin k] <- X[rows] @ transform[k]^T (in place,
//                   through a per-thread copy of the chunk), then out[b, :, p] = X[row] + shift[k] written back
//                   tile by tile (diag transforms: one elementwise pass, no sort).
//   fds_accumulate: one task per bin (bins of more than M / kAccumSegments rows: per segment of that many
//                   rows), one pass: per chunk of <= kAccumChunk rows, the rows minus a per-bin shift near the
//                   mean go to a per-thread buffer, whose fp64 sums and Gram matrix (upper triangle, compute
//                   dtype) are added into fp64 sums; the shift is corrected for at the end (accumulate_impl).
// Tasks are pulled from an atomic counter by every thread of one parallel region; each task writes its
// own output slice or its own partial (merged in a fixed order), and the task cuts depend only on the
// sizes, so results do not depend on the thread count. Problems below kParallelWork multiply-adds run
// inline (a parallel region costs more than the work). Memory: X [M, C], per-thread chunk buffers, and for
// fds_accumulate the fp64 sums of at most kAccumSegments extra segments, i.e. O(N C + bins C^2).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "cpu/common.h"
#include "cpu/gemm.h"
#include "cpu/gram.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace imbreg_fast {
namespace {

constexpr int64_t kSortBlock = 8192;     // pixels per histogram block of the counting sort (at least)
constexpr int64_t kSortGrain = 64;       // blocks per thread chunk: the sort runs inline below ~512K pixels
constexpr int64_t kTileElements = 65536; // values of the local [pixels, C] buffer of a pack / unpack tile
constexpr int64_t kChannelBlock = 16;    // channel planes read / written together by a tile transpose
constexpr int64_t kPrefetchRows = 8;     // sorted rows prefetched ahead of the pack / unpack row copies
constexpr int64_t kRecolorChunk = 1024;  // rows per GEMM task of fds_recolor
constexpr int64_t kAccumChunk = 512;     // rows per task of fds_accumulate: an fp32 GEMM sums <= this many
                                         // products before the fp64 reduction
constexpr int64_t kAccumSegments = 32;   // fds_accumulate cuts bins of more than M / 32 rows into segments
constexpr int64_t kShiftRows = 16;       // rows averaged into each bin's shift by fds_accumulate
constexpr int64_t kParallelGrain = 1 << 15;  // values per thread chunk of the elementwise passes (smaller
                                             // problems run inline: a parallel region costs more)
constexpr int64_t kParallelWork = 1 << 18;  // multiply-adds below which the per-bin products run inline

// An uninitialised contiguous workspace (never returned to the caller). Large ones are 2 MB-aligned and
// advised to use transparent huge pages (Linux, THP 'madvise' mode), and one freed block of at most
// kCachedWorkspace bytes is kept per thread for the next call: a fresh 20 MB buffer costs 1-4 ms of
// first-touch page faults on the dev VM (11 ms on 4 KB pages), as much as the work it feeds.
constexpr size_t kCachedWorkspace = size_t(64) << 20;

struct CachedBlock {
  void* ptr = nullptr;
  size_t bytes = 0;
  ~CachedBlock() { std::free(ptr); }
};
thread_local CachedBlock cached_block;

void release_block(void* ptr, size_t bytes) {
  if (bytes <= kCachedWorkspace && bytes >= cached_block.bytes) {
    std::free(cached_block.ptr);
    cached_block = {ptr, bytes};
    return;
  }
  std::free(ptr);
}

at::Tensor empty_workspace(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHugePage = size_t(2) << 20;
  const size_t nbytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (nbytes >= kHugePage) {
    const size_t padded = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* ptr = nullptr;
    size_t bytes = padded;
    if (cached_block.ptr && cached_block.bytes >= padded) {
      std::swap(ptr, cached_block.ptr);
      bytes = cached_block.bytes;
      cached_block.bytes = 0;
    } else if (posix_memalign(&ptr, kHugePage, padded) == 0) {
      madvise(ptr, padded, MADV_HUGEPAGE);
    } else {
      ptr = nullptr;
    }
    if (ptr) {
      return at::from_blob(ptr, sizes, [bytes](void* q) { release_block(q, bytes); }, options.device(at::kCPU));
    }
  }
#endif
  return at::empty(sizes, options);
}

struct Strided3 {  // features [B, C, P]
  int64_t B, C, P, sb, sc, sp;
};

Strided3 dims_of(const at::Tensor& x) {
  return {x.size(0), x.size(1), x.size(2), x.stride(0), x.stride(1), x.stride(2)};
}

struct BinOrder {
  std::vector<int64_t> start;  // [nb + 1]: first sorted row of each bin; start[nb] = kept pixels
  std::vector<int64_t> dest;   // [B * P]: sorted row of each pixel, -1 for skipped pixels
};

// Stable counting sort of the pixels by bin; checks every bin id lies in [-1, nb).
BinOrder sort_by_bin(const int64_t* bins, int64_t n, int64_t nb) {
  const int64_t block = std::max(kSortBlock, 8 * nb);  // the histograms take at most n / 8 entries
  const int64_t nblocks = (n + block - 1) / block;
  std::vector<int64_t> hist(nblocks * nb, 0);  // [nblocks, nb]
  std::atomic<bool> bad{false};
  at::parallel_for(0, nblocks, kSortGrain, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      int64_t* h = hist.data() + blk * nb;
      const int64_t i1 = std::min(n, (blk + 1) * block);
      for (int64_t i = blk * block; i < i1; ++i) {
        const int64_t k = bins[i];
        if (k >= 0 && k < nb) {
          ++h[k];
        } else if (k != -1) {
          bad.store(true, std::memory_order_relaxed);
        }
      }
    }
  });
  TORCH_CHECK(!bad.load(), "fds: every bin id must lie in [-1, num_bins) with num_bins = ", nb);
  BinOrder order;
  order.start.assign(nb + 1, 0);
  for (int64_t k = 0; k < nb; ++k) {
    int64_t pos = order.start[k];
    for (int64_t blk = 0; blk < nblocks; ++blk) {  // hist[blk][k] becomes the block's first row of bin k
      const int64_t c = hist[blk * nb + k];
      hist[blk * nb + k] = pos;
      pos += c;
    }
    order.start[k + 1] = pos;
  }
  order.dest.resize(n);
  at::parallel_for(0, nblocks, kSortGrain, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      int64_t* next = hist.data() + blk * nb;
      const int64_t i1 = std::min(n, (blk + 1) * block);
      for (int64_t i = blk * block; i < i1; ++i) {
        const int64_t k = bins[i];
        order.dest[i] = k >= 0 ? next[k]++ : -1;
      }
    }
  });
  return order;
}

struct Task {
  int64_t bin, row0, row1;
};

// Each bin's sorted rows cut into chunks of at most `chunk` rows, in bin order.
std::vector<Task> make_tasks(const std::vector<int64_t>& start, int64_t chunk) {
  const int64_t nb = static_cast<int64_t>(start.size()) - 1;
  std::vector<Task> tasks;
  for (int64_t k = 0; k < nb; ++k) {
    for (int64_t r = start[k]; r < start[k + 1]; r += chunk) {
      tasks.push_back({k, r, std::min(r + chunk, start[k + 1])});
    }
  }
  return tasks;
}

// Workers of run_tasks (index w passed to the task function, for per-worker scratch buffers).
int64_t task_workers(bool parallel) {
  return parallel ? std::max<int64_t>(at::get_num_threads(), 1) : 1;
}

// Runs f(t, w) for t in [0, ntasks), w < task_workers(parallel). parallel: every worker pulls tasks from a
// shared counter, in one parallel region of get_num_threads() workers; otherwise inline, in order, w = 0.
template <typename F>
void run_tasks(int64_t ntasks, bool parallel, const F& f) {
  if (ntasks == 0) return;
  if (!parallel) {
    for (int64_t t = 0; t < ntasks; ++t) f(t, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, task_workers(true), 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      for (int64_t t = next.fetch_add(1); t < ntasks; t = next.fetch_add(1)) f(t, w);
    }
  });
}

// Pixels per pack / unpack tile: the tile's [pixels, C] buffer holds about kTileElements values (256 KB
// in fp32), so it stays in L2, and each channel plane is read / written in runs of >= 512 pixels at
// C <= 128 (long runs keep the hardware prefetchers on all C planes: 8192 values, i.e. 64-pixel runs at
// C = 128, measured 15 % slower).
int64_t tile_pixels(int64_t C) {
  return std::clamp<int64_t>(kTileElements / std::max<int64_t>(C, 1), 16, 1024);
}

// Parallel loop over tiles of `tile` pixels of one image: f(b, p0, p1, buf), with a scratch buffer of
// tile * C values per thread when `scratch`.
template <typename acc_t, typename F>
void for_each_tile(int64_t B, int64_t P, int64_t C, int64_t tile, bool scratch, const F& f) {
  const int64_t per_image = (P + tile - 1) / tile;
  const int64_t grain = std::max<int64_t>(1, kParallelGrain / (tile * std::max<int64_t>(C, 1)));
  at::parallel_for(0, B * per_image, grain, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> buf(scratch ? tile * C : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / per_image, p0 = (t % per_image) * tile;
      f(b, p0, std::min(P, p0 + tile), buf.data());
    }
  });
}

// dst[j * ld_dst + i] = src[i * ld_src + j] for i < M, j < N (M, N <= kChannelBlock): a register
// transpose (at::vec) for float on AVX-512 (any M, N) and AVX2 (16 x 16), else scalar.
template <typename T>
inline void transpose_block(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t M, int64_t N) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    at::vec::transpose_mxn<float>(src, ld_src, dst, ld_dst, static_cast<int>(M), static_cast<int>(N));
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    if (M == 16 && N == 16) {
      at::vec::transpose_mxn<float, 16, 16>(src, ld_src, dst, ld_dst);
      return;
    }
  }
#endif
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
  }
}

// buf[p - p0, c] = z[b, c, p] for p in [p0, p1): blocks of kChannelBlock planes x kChannelBlock pixels,
// transposed in registers when the planes are contiguous in p and no conversion is needed.
template <typename scalar_t, typename acc_t>
void load_tile(const scalar_t* zb, const Strided3& d, int64_t p0, int64_t p1, acc_t* buf) {
  const int64_t C = d.C;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (d.sp == 1) {
      for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {
        const int64_t cn = std::min(kChannelBlock, C - c0);
        for (int64_t p = p0; p < p1; p += kChannelBlock) {
          transpose_block<acc_t>(zb + c0 * d.sc + p, d.sc, buf + (p - p0) * C + c0, C, cn,
                                 std::min(kChannelBlock, p1 - p));
        }
      }
      return;
    }
  }
  for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {
    const int64_t c1 = std::min(C, c0 + kChannelBlock);
    for (int64_t p = p0; p < p1; ++p) {
      const scalar_t* src = zb + p * d.sp;
      acc_t* row = buf + (p - p0) * C;
      for (int64_t c = c0; c < c1; ++c) row[c] = static_cast<acc_t>(src[c * d.sc]);
    }
  }
}

// Prefetch row `r` (>= 0; -1 = none) of a [M, C] buffer, for reading (rw = 0) or writing (rw = 1): the
// sorted rows are visited in pixel order, i.e. at random, which hardware prefetchers cannot follow.
template <typename acc_t>
inline void prefetch_row(const acc_t* base, int64_t r, int64_t C, int rw) {
  if (r < 0) return;
  const char* q = reinterpret_cast<const char*>(base + r * C);
  for (int64_t o = 0; o < C * static_cast<int64_t>(sizeof(acc_t)); o += 64) {
    if (rw) {
      __builtin_prefetch(q + o, 1);
    } else {
      __builtin_prefetch(q + o, 0);
    }
  }
}

// X[dest[b, p], :] = z[b, :, p] in the compute dtype (rows of skipped pixels are not written).
template <typename scalar_t, typename acc_t>
void pack_rows(const scalar_t* z, const Strided3& d, const int64_t* dest, acc_t* X) {
  const int64_t C = d.C;
  if (d.sc == 1) {  // each pixel's features are contiguous: copy rows
    for_each_tile<acc_t>(d.B, d.P, C, tile_pixels(C), false, [&](int64_t b, int64_t p0, int64_t p1, acc_t*) {
      const int64_t* dst = dest + b * d.P;
      for (int64_t p = p0; p < p1; ++p) {
        if (dst[p] < 0) continue;
        const scalar_t* src = z + b * d.sb + p * d.sp;
        acc_t* row = X + dst[p] * C;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          std::memcpy(row, src, C * sizeof(acc_t));
        } else {
          for (int64_t c = 0; c < C; ++c) row[c] = static_cast<acc_t>(src[c]);
        }
      }
    });
    return;
  }
  // channel planes: transpose a tile into the local buffer, then copy whole rows (writing rows one value
  // at a time would touch a different page for every pixel of the tile, for every channel)
  for_each_tile<acc_t>(d.B, d.P, C, tile_pixels(C), true, [&](int64_t b, int64_t p0, int64_t p1, acc_t* buf) {
    const int64_t* dst = dest + b * d.P;
    load_tile<scalar_t, acc_t>(z + b * d.sb, d, p0, p1, buf);
    for (int64_t p = p0; p < p1; ++p) {
      if (p + kPrefetchRows < p1) prefetch_row(X, dst[p + kPrefetchRows], C, 1);
      if (dst[p] >= 0) std::memcpy(X + dst[p] * C, buf + (p - p0) * C, C * sizeof(acc_t));
    }
  });
}

// out[b, c, p] = Y[dest, c] + shift[k, c] (k = bins[b, p] >= 0) or z[b, c, p] (k = -1); out contiguous.
template <typename scalar_t, typename acc_t>
void unpack_rows(const scalar_t* z, const Strided3& d, const int64_t* bins, const int64_t* dest, const acc_t* Y,
                 const acc_t* shift, scalar_t* out) {
  const int64_t C = d.C, P = d.P;
  for_each_tile<acc_t>(d.B, P, C, tile_pixels(C), true, [&](int64_t b, int64_t p0, int64_t p1, acc_t* buf) {
    const int64_t* bk = bins + b * P;
    const int64_t* dst = dest + b * P;
    bool any_skipped = false;
    for (int64_t p = p0; p < p1; ++p) {
      if (p + kPrefetchRows < p1) prefetch_row(Y, dst[p + kPrefetchRows], C, 0);
      const int64_t k = bk[p];
      acc_t* row = buf + (p - p0) * C;
      if (k < 0) {
        any_skipped = true;
        continue;
      }
      const acc_t* y = Y + dst[p] * C;
      const acc_t* sh = shift + k * C;
      for (int64_t c = 0; c < C; ++c) row[c] = y[c] + sh[c];
    }
    for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {
      const int64_t c1 = std::min(C, c0 + kChannelBlock);
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        for (int64_t p = p0; p < p1; p += kChannelBlock) {
          transpose_block<acc_t>(buf + (p - p0) * C + c0, C, out + (b * C + c0) * P + p, P,
                                 std::min(kChannelBlock, p1 - p), c1 - c0);
        }
      } else {
        for (int64_t p = p0; p < p1; ++p) {
          const acc_t* row = buf + (p - p0) * C;
          scalar_t* o = out + b * C * P + p;
          for (int64_t c = c0; c < c1; ++c) o[c * P] = static_cast<scalar_t>(row[c]);
        }
      }
    }
    if (any_skipped) {  // identity on skipped pixels: copy the input as is
      for (int64_t p = p0; p < p1; ++p) {
        if (bk[p] >= 0) continue;
        const scalar_t* src = z + b * d.sb + p * d.sp;
        scalar_t* o = out + b * C * P + p;
        for (int64_t c = 0; c < C; ++c) o[c * P] = src[c * d.sc];
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void recolor_full(const at::Tensor& features, const int64_t* bins, const at::Tensor& transform,
                  const acc_t* shift, scalar_t* out) {
  const Strided3 d = dims_of(features);
  const int64_t nb = transform.size(0), C = d.C;
  const scalar_t* z = features.const_data_ptr<scalar_t>();
  const BinOrder order = sort_by_bin(bins, d.B * d.P, nb);
  const int64_t M = order.start[nb];
  const auto acc_options = transform.options();
  at::Tensor X = empty_workspace({M, C}, acc_options);
  pack_rows<scalar_t, acc_t>(z, d, order.dest.data(), X.mutable_data_ptr<acc_t>());
  const std::vector<Task> tasks = make_tasks(order.start, kRecolorChunk);
  const bool parallel = M * C * C >= kParallelWork;
  // X <- X @ transform[k]^T chunk by chunk, in place: each chunk is first copied to its worker's scratch
  const int64_t chunk_rows = std::min(kRecolorChunk, M);
  const int64_t per_worker = chunk_rows * C + gemm::gemm_nt_work_size<acc_t>(C);
  at::Tensor scratch = at::empty({task_workers(parallel) * per_worker}, acc_options);
  acc_t* x = X.mutable_data_ptr<acc_t>();
  const acc_t* tr = transform.const_data_ptr<acc_t>();
  run_tasks(static_cast<int64_t>(tasks.size()), parallel, [&](int64_t t, int64_t w) {
    const Task& task = tasks[t];
    const int64_t rows = task.row1 - task.row0;
    acc_t* in = scratch.mutable_data_ptr<acc_t>() + w * per_worker;
    std::memcpy(in, x + task.row0 * C, rows * C * sizeof(acc_t));
    // [rows, C] @ [C, C]^T: each row z -> transform[k] z
    gemm::gemm_nt<acc_t>(in, rows, C, C, tr + task.bin * C * C, C, x + task.row0 * C, C, in + chunk_rows * C);
  });
  unpack_rows<scalar_t, acc_t>(z, d, bins, order.dest.data(), X.const_data_ptr<acc_t>(), shift, out);
}

template <typename scalar_t, typename acc_t>
void recolor_diag(const at::Tensor& features, const int64_t* bins, const acc_t* scale, const acc_t* shift,
                  scalar_t* out) {
  const Strided3 d = dims_of(features);
  const int64_t C = d.C, P = d.P;
  const scalar_t* z = features.const_data_ptr<scalar_t>();
  for_each_tile<acc_t>(d.B, P, C, tile_pixels(C), false, [&](int64_t b, int64_t p0, int64_t p1, acc_t*) {
    const int64_t* bk = bins + b * P;
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* zc = z + b * d.sb + c * d.sc;
      scalar_t* oc = out + (b * C + c) * P;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t k = bk[p];
        const scalar_t v = zc[p * d.sp];
        oc[p] = k >= 0 ? static_cast<scalar_t>(scale[k * C + c] * static_cast<acc_t>(v) + shift[k * C + c]) : v;
      }
    }
  });
}

void check_bins(const at::Tensor& features, const at::Tensor& bins, const char* op) {
  TORCH_CHECK(features.device().is_cpu(), op, ": features must be a CPU tensor, got ", features.device());
  TORCH_CHECK(features.dim() == 3, op, ": features must be [B, C, P], got shape ", features.sizes());
  TORCH_CHECK(at::isFloatingType(features.scalar_type()), op, ": features must be floating, got ",
              features.scalar_type());
  TORCH_CHECK(bins.scalar_type() == at::kLong, op, ": bins must be int64, got ", bins.scalar_type());
  TORCH_CHECK(bins.device().is_cpu(), op, ": bins must be a CPU tensor");
  TORCH_CHECK(bins.dim() == 2 && bins.size(0) == features.size(0) && bins.size(1) == features.size(2), op,
              ": bins must be [B, P] = [", features.size(0), ", ", features.size(2), "], got ", bins.sizes());
}

at::Tensor fds_recolor_cpu(const at::Tensor& features, const at::Tensor& bins_in, const at::Tensor& transform_in,
                           const at::Tensor& shift_in) {
  check_bins(features, bins_in, "fds_recolor");
  const int64_t C = features.size(1);
  const at::ScalarType acc = cpu::compute_dtype(features.scalar_type());
  const bool full = transform_in.dim() == 3;
  TORCH_CHECK(transform_in.dim() == 3 || transform_in.dim() == 2,
              "fds_recolor: transform must be [nb, C, C] or [nb, C], got ", transform_in.sizes());
  const int64_t nb = transform_in.size(0);
  TORCH_CHECK(transform_in.size(1) == C && (!full || transform_in.size(2) == C),
              "fds_recolor: transform must be [nb, ", C, ", ", C, "] or [nb, ", C, "], got ", transform_in.sizes());
  TORCH_CHECK(shift_in.dim() == 2 && shift_in.size(0) == nb && shift_in.size(1) == C,
              "fds_recolor: shift must be [", nb, ", ", C, "], got ", shift_in.sizes());
  TORCH_CHECK(transform_in.scalar_type() == acc && shift_in.scalar_type() == acc,
              "fds_recolor: transform and shift must have the compute dtype ", acc, " of features ",
              features.scalar_type(), ", got ", transform_in.scalar_type(), " and ", shift_in.scalar_type());
  TORCH_CHECK(transform_in.device().is_cpu() && shift_in.device().is_cpu(),
              "fds_recolor: transform and shift must be CPU tensors");
  const at::Tensor bins = bins_in.contiguous();
  const at::Tensor transform = transform_in.contiguous();
  const at::Tensor shift = shift_in.contiguous();
  at::Tensor out = at::empty(features.sizes(), features.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "fds_recolor", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* bk = bins.const_data_ptr<int64_t>();
    if (full) {
      recolor_full<scalar_t, acc_t>(features, bk, transform, shift.const_data_ptr<acc_t>(),
                                    out.mutable_data_ptr<scalar_t>());
    } else {
      recolor_diag<scalar_t, acc_t>(features, bk, transform.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(),
                                    out.mutable_data_ptr<scalar_t>());
    }
  });
  return out;
}

// A task of fds_accumulate: rows [row0, row1) of one bin (the whole bin unless it is large). id: its index in
// (bin, row) order; part: -1 for the bin's first segment (accumulates into the outputs), else its partial.
struct Segment {
  int64_t bin, row0, row1, id, part;
};

// s[c] = mean of kShiftRows of the bin's n sorted rows (x: its first row), spread evenly over them (not
// the first ones: neighbouring pixels are alike), in the compute dtype; tmp: C doubles.
template <typename acc_t>
void bin_shift(const acc_t* x, int64_t n, int64_t C, double* tmp, acc_t* s) {
  const int64_t rows = std::min(n, kShiftRows);
  std::fill(tmp, tmp + C, 0.0);
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t* row = x + (i * n / rows) * C;
    for (int64_t c = 0; c < C; ++c) tmp[c] += static_cast<double>(row[c]);
  }
  for (int64_t c = 0; c < C; ++c) s[c] = static_cast<acc_t>(tmp[c] / static_cast<double>(rows));
}

// u[r, c] = x[r, c] - s[c] in the compute dtype, sum[c] += u[r, c] in fp64 and, unless sq is null,
// sq[c] += u[r, c]^2 (u then not written).
template <typename acc_t>
void shift_rows(const acc_t* __restrict x, int64_t rows, int64_t C, const acc_t* __restrict s, acc_t* __restrict u,
                double* __restrict sum, double* __restrict sq) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* xr = x + r * C;
    if (sq) {
      for (int64_t c = 0; c < C; ++c) {
        const double v = static_cast<double>(static_cast<acc_t>(xr[c] - s[c]));
        sum[c] += v;
        sq[c] += v * v;
      }
      continue;
    }
    acc_t* ur = u + r * C;
    for (int64_t c = 0; c < C; ++c) {
      ur[c] = xr[c] - s[c];
      sum[c] += static_cast<double>(ur[c]);
    }
  }
}

// out[i, j] (+)= g[i, j] in fp64 for i <= j (assigned when first); g, out: [C, C].
template <typename acc_t>
void add_upper(const acc_t* __restrict g, int64_t C, bool first, double* __restrict out) {
  for (int64_t i = 0; i < C; ++i) {
    const acc_t* gi = g + i * C;
    double* oi = out + i * C;
    if (first) {
      for (int64_t j = i; j < C; ++j) oi[j] = static_cast<double>(gi[j]);
    } else {
      for (int64_t j = i; j < C; ++j) oi[j] += static_cast<double>(gi[j]);
    }
  }
}

// Statistics of one bin from the shifted sums (see accumulate_impl): mean = s + S1 / n; m2 (full: upper
// triangle of S2 on entry, the whole matrix on exit; diag: S2) -= S1 S1^T / n.
template <typename acc_t>
void finish_bin(const acc_t* s, const double* s1, double n, int64_t C, bool full, double* mean, double* m2) {
  for (int64_t c = 0; c < C; ++c) mean[c] = static_cast<double>(s[c]) + s1[c] / n;
  if (!full) {
    for (int64_t c = 0; c < C; ++c) m2[c] -= s1[c] * s1[c] / n;
    return;
  }
  for (int64_t i = 0; i < C; ++i) {
    const double a = s1[i] / n;
    for (int64_t j = i; j < C; ++j) m2[i * C + j] -= a * s1[j];
  }
  constexpr int64_t kB = 8;  // mirrored in kB x kB blocks: each line read serves kB entries
  for (int64_t i0 = 0; i0 < C; i0 += kB) {
    const int64_t i1 = std::min(C, i0 + kB);
    for (int64_t j0 = 0; j0 <= i0; j0 += kB) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t j1 = std::min(i, j0 + kB);
        for (int64_t j = j0; j < j1; ++j) m2[i * C + j] = m2[j * C + i];
      }
    }
  }
}

// count, mean, m2: float64 outputs (uninitialised on entry).
template <typename scalar_t, typename acc_t>
void accumulate_impl(const at::Tensor& features, const int64_t* bins, int64_t nb, bool full, double* count,
                     double* mean, double* m2) {
  const Strided3 d = dims_of(features);
  const int64_t C = d.C, CC = C * C, m2_size = full ? CC : C;
  const BinOrder order = sort_by_bin(bins, d.B * d.P, nb);
  const int64_t M = order.start[nb];
  for (int64_t k = 0; k < nb; ++k) {
    count[k] = static_cast<double>(order.start[k + 1] - order.start[k]);
    if (count[k] == 0) {
      std::fill(mean + k * C, mean + (k + 1) * C, 0.0);
      std::fill(m2 + k * m2_size, m2 + (k + 1) * m2_size, 0.0);
    }
  }
  if (M == 0) return;
  const auto acc_options = features.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor X = empty_workspace({M, C}, acc_options);
  const acc_t* x = X.mutable_data_ptr<acc_t>();
  pack_rows<scalar_t, acc_t>(features.const_data_ptr<scalar_t>(), d, order.dest.data(), X.mutable_data_ptr<acc_t>());

  // Shifted sums, one pass: with s the bin's shift (bin_shift: within about sd / sqrt(kShiftRows) of its
  // mean), u = z - s rounded to the compute dtype, n = count, S1 = sum u (fp64) and S2 = sum u u^T (compute
  // dtype over <= kAccumChunk rows, then fp64):  mean = s + S1 / n,  m2 = S2 - S1 S1^T / n, where
  // S1 S1^T / n is ~ m2 / kShiftRows: no cancellation (the raw E[z z^T] - mean mean^T form loses every digit
  // when |mean| >> sd). Each bin's segments are cut from M and the bin sizes only, so the sums do not
  // depend on the thread count.
  const int64_t seg_rows = std::max(kAccumChunk, (M + kAccumSegments * kAccumChunk - 1) /
                                                     (kAccumSegments * kAccumChunk) * kAccumChunk);
  std::vector<Segment> segs;
  int64_t nparts = 0;
  for (int64_t k = 0; k < nb; ++k) {
    for (int64_t r = order.start[k]; r < order.start[k + 1]; r += seg_rows) {
      const int64_t id = static_cast<int64_t>(segs.size());
      segs.push_back({k, r, std::min(r + seg_rows, order.start[k + 1]), id, r == order.start[k] ? -1 : nparts++});
    }
  }
  const int64_t nsegs = static_cast<int64_t>(segs.size());
  std::vector<Segment> queue = segs;  // largest first: dynamic scheduling then balances the workers
  std::stable_sort(queue.begin(), queue.end(),
                   [](const Segment& a, const Segment& b) { return a.row1 - a.row0 > b.row1 - b.row0; });
  std::vector<double> seg_s1(nsegs * C);            // [nsegs, C]
  std::vector<double> part_m2(nparts * m2_size);    // [nparts, m2_size]: sums of the later segments
  const bool parallel = M * (full ? CC : C) >= (full ? kParallelWork : kParallelGrain);
  const int64_t workers = task_workers(parallel);
  const int64_t chunk = std::min(kAccumChunk, seg_rows);
  std::vector<acc_t> scratch(workers * (chunk * C + (full ? CC : 0) + C));  // per worker: u, gram, shift
  run_tasks(nsegs, parallel, [&](int64_t t, int64_t w) {
    const Segment& sg = queue[t];
    const int64_t k = sg.bin, n = order.start[k + 1] - order.start[k];
    acc_t* u = scratch.data() + w * (chunk * C + (full ? CC : 0) + C);
    acc_t* g = u + chunk * C;
    acc_t* s = g + (full ? CC : 0);
    double* s1 = seg_s1.data() + sg.id * C;
    double* out = sg.part < 0 ? m2 + k * m2_size : part_m2.data() + sg.part * m2_size;
    bin_shift(x + order.start[k] * C, n, C, s1, s);
    std::fill(s1, s1 + C, 0.0);
    if (!full) std::fill(out, out + C, 0.0);
    for (int64_t r0 = sg.row0; r0 < sg.row1; r0 += chunk) {
      const int64_t rows = std::min(chunk, sg.row1 - r0);
      shift_rows<acc_t>(x + r0 * C, rows, C, s, u, s1, full ? nullptr : out);
      if (full) {
        gram::gram_upper<acc_t>(u, rows, C, C, g, C);
        add_upper<acc_t>(g, C, r0 == sg.row0, out);
      }
    }
    if (sg.row1 - sg.row0 == n) finish_bin(s, s1, static_cast<double>(n), C, full, mean + k * C, out);
  });

  // bins cut into several segments: merge their sums in row order, then finish
  std::vector<double> s1(C), tmp(C);
  std::vector<acc_t> s(C);
  for (int64_t i = 0; i < nsegs;) {
    const int64_t k = segs[i].bin;
    int64_t j = i + 1;
    while (j < nsegs && segs[j].bin == k) ++j;
    if (j - i > 1) {
      std::copy(seg_s1.begin() + i * C, seg_s1.begin() + (i + 1) * C, s1.begin());
      double* out = m2 + k * m2_size;
      for (int64_t q = i + 1; q < j; ++q) {
        for (int64_t c = 0; c < C; ++c) s1[c] += seg_s1[q * C + c];
        const double* p = part_m2.data() + segs[q].part * m2_size;
        for (int64_t e = 0; e < m2_size; ++e) {
          if (!full || e % C >= e / C) out[e] += p[e];  // full: the upper triangle only is set
        }
      }
      bin_shift(x + order.start[k] * C, static_cast<int64_t>(count[k]), C, tmp.data(), s.data());
      finish_bin(s.data(), s1.data(), count[k], C, full, mean + k * C, out);
    }
    i = j;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fds_accumulate_cpu(const at::Tensor& features, const at::Tensor& bins_in,
                                                                  int64_t num_bins, bool full) {
  check_bins(features, bins_in, "fds_accumulate");
  TORCH_CHECK(num_bins >= 1, "fds_accumulate: num_bins must be >= 1, got ", num_bins);
  const int64_t C = features.size(1);
  const auto f64 = features.options().dtype(at::kDouble);
  at::Tensor count = at::empty({num_bins}, f64);
  at::Tensor mean = at::empty({num_bins, C}, f64);
  at::Tensor m2 = full ? at::empty({num_bins, C, C}, f64) : at::empty({num_bins, C}, f64);
  const at::Tensor bins = bins_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "fds_accumulate", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    accumulate_impl<scalar_t, acc_t>(features, bins.const_data_ptr<int64_t>(), num_bins, full,
                                     count.mutable_data_ptr<double>(), mean.mutable_data_ptr<double>(),
                                     m2.mutable_data_ptr<double>());
  });
  return {count, mean, m2};
}

}  // namespace

TORCH_LIBRARY_IMPL(imbreg_fast, CPU, m) {
  m.impl("fds_accumulate", &fds_accumulate_cpu);
  m.impl("fds_recolor", &fds_recolor_cpu);
}

}  // namespace imbreg_fast
