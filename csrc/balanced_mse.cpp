// Operator schemas of the Balanced MSE family. Kernels: csrc/cpu/balanced_mse_kernel.cpp (CPU, one
// build per CPU capability), triton_kernels/balanced_mse.py (GPU). Fake kernels and autograd are
// registered from Python (imbreg_fast/ops/balanced_mse.py).
//
// Conventions shared by every op of the family:
//   pred, target [N, d] contiguous, same floating dtype; mask [N] bool or None (rows kept);
//   noise_var [] (0-dim, any floating dtype) = sigma^2 > 0;
//   reduction: torch's numbering (at::Reduction, torch.nn._reduction.get_enum): 0 = 'none',
//     1 = 'mean' (over kept rows; 0 when no row is kept), 2 = 'sum';
//   returns (loss, grad_pred, grad_noise_var): loss [] (mean/sum) or [N] ('none', 0 on masked rows),
//   grad_pred [N, d] = d loss / d pred, grad_noise_var [] (mean/sum) or [N] ('none') = d loss / d sigma^2;
//   with compute_grad=false the two gradients are empty tensors of shape [0];
//   check_finite: detect a NaN / inf in pred, target (kept rows) and BMC's candidates in the kernel's own
//     pass and raise ValueError naming the argument (no separate pass over the inputs; the value checks of
//     imbreg_fast.functional on the fused backends).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(imbreg_fast, m) {
  // Batch Monte Carlo. candidates None: row i's candidates are the kept targets (its own among them);
  // candidates [M, d]: row i's candidate set is {target_i} U {candidates_j}.
  m.def(
      "bmc_fwd(Tensor pred, Tensor target, Tensor? candidates, Tensor? mask, Tensor noise_var, "
      "int reduction, bool compute_grad, bool check_finite=False) -> (Tensor, Tensor, Tensor)");
  // GAI and BNI through one mixture kernel; the component tables are precomputed at the current
  // noise_var by imbreg_fast.ops.balanced_mse (see there for their definition):
  //   log_weight [K] (log of the normalised weights), log_norm [K] (log sum of the weights
  //   - 1/2 logdet(I + Sigma_k/sigma^2)), means [K, d], precision [K, d, d] (inverse of Sigma_k + sigma^2 I,
  //   or I/sigma^2), grad_var_bias [K] (d log_norm_k / d sigma^2: 1/2 tr(precision_k Sigma_k)/sigma^2, 0 for BNI).
  m.def(
      "mixture_nll_fwd(Tensor pred, Tensor target, Tensor? mask, Tensor noise_var, Tensor log_weight, "
      "Tensor log_norm, Tensor means, Tensor precision, Tensor grad_var_bias, int reduction, "
      "bool compute_grad, bool check_finite=False) -> (Tensor, Tensor, Tensor)");
}
