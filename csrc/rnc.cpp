// Operator schema of the Rank-N-Contrast loss (docs/methods.md, RnC). Kernel: csrc/cpu/rnc_kernel.cpp (CPU, one
// build per CPU capability). Fake kernel and autograd: imbreg_fast/ops/rnc.py.
//
//   features: [n, d] float32 / float64 (the Python glue upcasts half types), any strides;
//   labels: [n, L] float32 / float64 (own dtype; label distances d_ij = sum_c |y_ic - y_jc| in it), constant;
//   anchor_weight: [n] features' dtype, or None (= ones): the loss is the reduction of w_i l_i;
//   temperature: tau > 0; s_ij = -||f_i - f_j||_2 / tau;
//   reduction: torch's numbering (at::Reduction): 0 'none' ([n] of w_i l_i), 1 'mean' (sum_i w_i l_i / n),
//              2 'sum' (sum_i w_i l_i), with l_i = (1 / (n - 1)) sum_{k != i} (log Z_ik - s_ik) and
//              Z_ik = sum_{j != i, d_ij >= d_ik} e^{s_ij}; fewer than 2 rows: 0;
//   returns (loss, grad_features): loss [] or [n] ('none'); grad_features = d loss / d features ([n, d],
//   computed in the same call; for 'none' the gradient of sum_i w_i l_i) or [0] when compute_grad is false.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(imbreg_fast, m) {
  m.def(
      "rnc_fwd(Tensor features, Tensor labels, Tensor? anchor_weight, float temperature, int reduction, "
      "bool compute_grad) -> (Tensor, Tensor)");
}
