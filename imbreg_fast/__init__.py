"""imbreg_fast: fast, correct deep imbalanced regression for PyTorch.

- :mod:`imbreg_fast.functional`: ``bmc_loss``, ``gai_loss``, ``bni_loss``
- :mod:`imbreg_fast.nn`: ``BMCLoss``, ``GAILoss``, ``BNILoss`` (learnable noise scale)
- :class:`imbreg_fast.FDS` (also ``imbreg_fast.nn.FDS``): feature distribution smoothing, row or dense features
- priors (:mod:`imbreg_fast.priors`): ``fit_gmm`` (GAI), ``bin_prior`` (BNI)
- :mod:`imbreg_fast.lds`: label-density smoothing and re-weighting (``kernel_window``, ``label_density``,
  ``sample_weights``, ``LabelWeights``); weighted / Focal-R losses in :mod:`imbreg_fast.functional`
- :mod:`imbreg_fast.metrics`: the DIR evaluation protocol (``DIRMetrics``, a torchmetrics metric; ``shot_metrics``)
- :mod:`imbreg_fast.reg_cls`: classification-aided regression with balanced classes (``ClassBins``,
  ``balanced_class_mask``, ``RegClsLoss``)
- :mod:`imbreg_fast.distributed`: global statistics over torch.distributed (``sync=True`` on the losses,
  FDS, priors, weights and metrics; docs/methods.md §7)
- :mod:`imbreg_fast.rrt`: regressor re-training (``freeze_for_retraining``)
- :mod:`imbreg_fast.optim`: ``BSAM`` (SAM/ASAM around any torch optimiser) and ``bsam_step`` (one BSAM step
  with ascent/descent label weights)
- backends: ``available_backends()``, ``selected_backend(tensor, op)``, ``backend_info()``,
  ``cpu_capability()`` (importing imbreg_fast loads the C++ extension once: :mod:`imbreg_fast._extension`)

The maths, gradients and the published code's quirks: docs/methods.md.
"""
from . import distributed, functional, lds, metrics, nn, optim, reg_cls, rrt
from ._dispatch import BACKENDS, available_backends, backend_info, selected_backend
from ._extension import cpu_capability
from .fds import FDS
from .optim import BSAM, bsam_step
from .priors import GMM, bin_prior, fit_gmm
from .reg_cls import ClassBins, RegClsLoss

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BSAM", "ClassBins", "FDS", "GMM", "RegClsLoss", "available_backends", "backend_info",
           "bin_prior", "bsam_step", "cpu_capability", "distributed", "fit_gmm", "functional", "lds", "metrics",
           "nn", "optim", "reg_cls", "rrt", "selected_backend"]
