// Operator schemas of FDS (feature distribution smoothing, docs/methods.md §3). Kernels: csrc/cpu/fds_kernel.cpp
// (CPU, one build per CPU capability), triton_kernels/ (GPU, ops imbreg_fast::triton_fds_*). Fake kernels
// and the recolouring autograd are registered from Python (imbreg_fast/ops/fds.py).
//
// Layout shared by both ops: features [B, C, P] with any strides (dense [B, C, H, W] flattened, rows
// [N, C] seen as [1, C, N] with strides (.., 1, C)), read in place; floating dtype (half types computed
// in fp32). bins [B, P] int64: the bin of each pixel in [0, num_bins), or -1 to skip the pixel.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(imbreg_fast, m) {
  // Per-bin statistics of one batch, centred: (count [nb], mean [nb, C], m2) all float64, with
  // m2 = sum (z - mean)(z - mean)^T [nb, C, C] (full) or its diagonal [nb, C]. Empty bins: zeros.
  // Not differentiable.
  m.def("fds_accumulate(Tensor features, Tensor bins, int num_bins, bool full) -> (Tensor, Tensor, Tensor)");
  // out[b, :, p] = transform[k] @ z + shift[k] (full: transform [nb, C, C]) or transform[k] * z + shift[k]
  // (diag: transform [nb, C]), k = bins[b, p]; out = z where k = -1. shift [nb, C]; transform and shift
  // in the compute dtype. Returns a new contiguous [B, C, P] tensor of the features' dtype.
  m.def("fds_recolor(Tensor features, Tensor bins, Tensor transform, Tensor shift) -> Tensor");
}
