// Operator schema of the weighted regression losses (docs/methods.md §2: MSE, L1, Huber, Focal-R).
// Kernels: csrc/cpu/weighted_losses_kernel.cpp (CPU, one build per CPU capability),
// triton_kernels/weighted_losses.py (GPU). Fake kernel and autograd: imbreg_fast/ops/weighted_losses.py.
//
//   pred, target: same shape (any), contiguous, same floating dtype (half types computed in fp32);
//   weight: pred's shape or None (= all ones), any floating dtype, constant (never differentiated);
//   mask: pred's shape, bool, or None (elements kept); dropped elements contribute nothing, whatever their
//         pred/target/weight values (NaN holes included);
//   loss: 0 = MSE e^2, 1 = L1 |e|, 2 = Huber (beta), 3 = focal MSE, 4 = focal L1, with e = pred - target;
//         focal factor f = act(beta |e|)^gamma, act 0 = 2 sigmoid(x) - 1, 1 = tanh(x);
//   beta: Huber threshold (> 0) or focal scale (> 0); gamma: focal exponent (>= 0), unused otherwise;
//   reduction: torch's numbering (at::Reduction, torch.nn._reduction.get_enum) plus one extension:
//              0 'none' (w l per element, 0 on dropped ones), 1 'mean' (sum w l / kept count), 2 'sum',
//              3 = at::Reduction::END 'weighted_mean' (sum w l / sum w over kept; 0 when that sum is 0);
//   returns (loss, grad_pred): loss [] or pred's shape ('none'); grad_pred = d loss / d pred (pred's
//   shape, computed in the same pass; d loss / d target = -grad_pred), or [0] when compute_grad is false;
//   check_finite: detect a NaN / inf in pred, target, weight or a weight < 0 at kept elements in the same pass
//   and raise ValueError naming the argument (the value checks of imbreg_fast.functional, fused backends).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(imbreg_fast, m) {
  m.def(
      "weighted_regression_fwd(Tensor pred, Tensor target, Tensor? weight, Tensor? mask, int loss, "
      "float beta, float gamma, int activation, int reduction, bool compute_grad, bool check_finite=False) "
      "-> (Tensor, Tensor)");
}
