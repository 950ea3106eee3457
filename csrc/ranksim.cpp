// Operator schemas of RankSim (Gong et al., ICML 2022; docs/methods.md, RankSim section). Kernels:
// csrc/cpu/ranksim_kernel.cpp (CPU, one build per CPU capability), triton_kernels/ranksim.py (GPU, ops
// imbreg_fast::triton_ranksim_*). Fake kernels and the autograd: imbreg_fast/ops/ranksim.py.
//
// ranksim_fwd(features [m, d] float/double contiguous (the kept rows), labels [m] float/double, lam > 0,
//             reduction (at::Reduction: 0 'none' [m], 1 'mean' over rows, 2 'sum'), compute_grad)
//   -> (loss, z [m, d] normalised rows, norms [m] |x_i| (unclamped), S [m, m] = z z^T,
//       rank_f [m, m] = rank(S_i) per row, rank_y [m, m] = rank(-|y_i - y|) per row), all in the features'
//   dtype; rank(v)_j = (r_j + 1) / m, r_j = #{k: v_k > v_j} + #{k > j: v_k == v_j} (NaN above every number).
//   Without compute_grad the last five are empty [0]. The backward is NOT precomputed (it depends on the
//   incoming gradient non-linearly): ranksim_bwd.
// ranksim_bwd(grad_loss [] or [m] ('none'), z, norms, S, rank_f, rank_y, lam, reduction) -> d loss / d features
//   [m, d]: G_ij = (g_i / m) (2 (rank_f - rank_y)_ij), g_i the incoming gradient of row i ('mean': g / m);
//   dS_i = (rank(S_i + lam G_i) - rank_f,i) / lam; dz = (dS + dS^T) z; dx_i = (dz_i - z_i (z_i . dz_i)) / |x_i|
//   (|x_i| >= 1e-12, else dz_i / 1e-12: F.normalize's clamp).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(imbreg_fast, m) {
  m.def("ranksim_fwd(Tensor features, Tensor labels, float lam, int reduction, bool compute_grad) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("ranksim_bwd(Tensor grad_loss, Tensor z, Tensor norms, Tensor s, Tensor rank_f, Tensor rank_y, float lam, "
        "int reduction) -> Tensor");
}
