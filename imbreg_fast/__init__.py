"""imbreg_fast: fast, correct deep imbalanced regression for PyTorch.

- :mod:`imbreg_fast.functional`: ``bmc_loss``, ``gai_loss``, ``bni_loss``
- :mod:`imbreg_fast.nn`: ``BMCLoss``, ``GAILoss``, ``BNILoss`` (learnable noise scale)
- backends: ``available_backends()``, ``selected_backend(tensor, op)``, ``backend_info()``
"""
from . import functional, nn
from ._dispatch import BACKENDS, available_backends, backend_info, selected_backend
from ._extension import cpu_capability

__version__ = "0.1.0"

__all__ = ["BACKENDS", "available_backends", "backend_info", "cpu_capability", "functional", "nn",
           "selected_backend"]
