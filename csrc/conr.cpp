// Operator schemas of ConR (docs/methods.md, ConR section; definitions and gradient in
// imbreg_fast/ops/conr.py). Kernels: csrc/cpu/conr_kernel.cpp (CPU, one build per CPU capability),
// triton_kernels/conr.py (GPU). Fake kernels and autograd: imbreg_fast/ops/conr.py.
//
//   features [n, d] contiguous, floating (half types computed in fp32); targets, preds [n] contiguous, in the
//   compute dtype (fp64 for fp64 features, else fp32), constants; weights [n] (omega >= 0, compute dtype) or
//   None (all ones), constant;
//   window w >= 0 (positives |dy| <= w, negatives |dy| > w and |dp| <= w), temperature tau > 0, pushing e
//   (negative weight omega_i exp(e |dy|)); published_denominator: add n - |P_i| (the published code's exp(0)
//   terms) to every anchor's denominator;
//   reduction: torch's numbering (at::Reduction): 0 'none' ([n] per anchor), 1 'mean' (sum / n), 2 'sum';
//   returns (loss, grad_features): loss [] or [n]; grad_features = d loss / d features [n, d] in features'
//   dtype for 'mean' / 'sum' with compute_grad, else [0] ('none': conr_bwd computes it in the backward);
//   check_finite: raise ValueError naming the argument for a NaN / inf in features, targets, preds, weights
//   or a weight < 0.
// conr_bwd: d (sum_i grad_rows_i L_i) / d features [n, d] in features' dtype; grad_rows [n] compute dtype.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(imbreg_fast, m) {
  m.def(
      "conr_fwd(Tensor features, Tensor targets, Tensor preds, Tensor? weights, float window, float temperature, "
      "float pushing, bool published_denominator, int reduction, bool compute_grad, bool check_finite=False) "
      "-> (Tensor, Tensor)");
  m.def(
      "conr_bwd(Tensor features, Tensor targets, Tensor preds, Tensor? weights, Tensor grad_rows, float window, "
      "float temperature, float pushing, bool published_denominator) -> Tensor");
}
