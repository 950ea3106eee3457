"""Drop-in layers for the published DIR code: the same names, signatures and numerics, on imbreg_fast's ops.

- :mod:`imbreg_fast.compat.balanced_mse` — the API of jiawei-ren/BalancedMSE (``bmc_loss``, ``gai_loss``,
  ``bni_loss``, ``BMCLoss``, ``GAILoss``, ``BNILoss`` and the multi-dimensional variants).
- :mod:`imbreg_fast.compat.dir` — the API of YyzHarry/imbalanced-regression (``FDS`` with its epoch
  schedule, the weighted losses, ``prepare_weights``, ``get_lds_kernel_window``, ``shot_metrics``).

Porting a script: change its import (``from loss import GAILoss`` → ``from imbreg_fast.compat.balanced_mse
import GAILoss``) and keep its numbers; README "Porting from the published code" maps each published call
to its mainline equivalent. Import the submodule you need; this package imports neither eagerly.
"""
__all__ = ["balanced_mse", "dir"]
