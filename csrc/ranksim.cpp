// Operator schemas of RankSim (Gong et al., ICML 2022; docs/methods.md, RankSim section). Kernels:
// csrc/cpu/ranksim_kernel.cpp (CPU, one build per CPU capability), triton_kernels/ranksim.py (GPU, ops
// imbreg_fast::triton_ranksim_*). Fake kernels and the autograd: imbreg_fast/ops/ranksim.py.
//
// ranksim_fwd(features [m, d] float/double contiguous, labels [m] float/double, count (None: every row; else a
//             one-element int64 tensor c on the features' device, 0 <= c <= m: only the first c rows are kept,
//             the others take no part in any rank and get zero loss and gradient), lam > 0,
//             reduction (at::Reduction: 0 'none' [m], 1 'mean' over the c kept rows, 2 'sum'), compute_grad)
//   -> (loss, z [m, d] normalised rows, norms [m] |x_i| (unclamped), S [m, m] = z z^T,
//       rank_f [m, m] = rank(S_i) per row, rank_y [m, m] = rank(-|y_i - y|) per row), all in the features'
//   dtype; rank(v)_j = (r_j + 1) / c, r_j = #{k < c: v_k > v_j} + #{c > k > j: v_k == v_j} (NaN above every
//   number), for the kept rows and columns; S, rank_f, rank_y and the 'none' losses are 0 outside them. The
//   count is a tensor so that a data-dependent subsample (one sample per distinct label, the kept rows first)
//   needs no host sync on a GPU. Without compute_grad the last five are empty [0]. The backward is NOT precomputed (it depends on the
//   incoming gradient non-linearly): ranksim_bwd.
// ranksim_bwd(grad_loss [] or [m] ('none'), z, norms, S, rank_f, rank_y, count, lam, reduction) -> d loss /
//   d features [m, d] (0 on the rows not kept), over the kept c x c block:
//   G_ij = (g_i / c) (2 (rank_f - rank_y)_ij), g_i the incoming gradient of row i ('mean': g / c);
//   dS_i = (rank(S_i + lam G_i) - rank_f,i) / lam; dz = (dS + dS^T) z; dx_i = (dz_i - z_i (z_i . dz_i)) / |x_i|
//   (|x_i| >= 1e-12, else dz_i / 1e-12: F.normalize's clamp).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(imbreg_fast, m) {
  m.def("ranksim_fwd(Tensor features, Tensor labels, Tensor? count, float lam, int reduction, bool compute_grad) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ranksim_bwd(Tensor grad_loss, Tensor z, Tensor norms, Tensor s, Tensor rank_f, Tensor rank_y, Tensor? count, "
        "float lam, int reduction) -> Tensor");
}
