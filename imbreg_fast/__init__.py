"""imbreg_fast: fast, correct deep imbalanced regression for PyTorch.

- :mod:`imbreg_fast.functional`: ``bmc_loss``, ``gai_loss``, ``bni_loss``
- :mod:`imbreg_fast.nn`: ``BMCLoss``, ``GAILoss``, ``BNILoss`` (learnable noise scale)
- :class:`imbreg_fast.FDS` (also ``imbreg_fast.nn.FDS``): feature distribution smoothing, row or dense features
- priors (:mod:`imbreg_fast.priors`): ``fit_gmm`` (GAI), ``bin_prior`` (BNI)
- :mod:`imbreg_fast.lds`: label-density smoothing and re-weighting (``kernel_window``, ``label_density``,
  ``sample_weights``, ``LabelWeights``); weighted / Focal-R losses in :mod:`imbreg_fast.functional`
- backends: ``available_backends()``, ``selected_backend(tensor, op)``, ``backend_info()``
"""
from . import functional, lds, nn
from ._dispatch import BACKENDS, available_backends, backend_info, selected_backend
from ._extension import cpu_capability
from .fds import FDS
from .priors import GMM, bin_prior, fit_gmm

__version__ = "0.1.0"

__all__ = ["BACKENDS", "FDS", "GMM", "available_backends", "backend_info", "bin_prior", "cpu_capability", "fit_gmm",
           "functional", "lds", "nn", "selected_backend"]
