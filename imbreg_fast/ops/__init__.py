"""The ops of imbreg_fast behind :mod:`imbreg_fast.functional` (internal).

Importing this package is the ONE point where the compiled extension is loaded
(:func:`imbreg_fast._extension.load`) and where every backend is registered with the dispatcher, in a
fixed order: per family (Balanced MSE, weighted losses, FDS) the torch backend, then cpp (when the
extension loaded), then triton (triton itself is imported on the first Triton call only). Each family's
glue lives in one module here; see README "Anatomy of an op".
"""
from .. import _extension
from . import balanced_mse, conr, fds, ranksim, rnc, weighted_losses

CPP_LOADED = _extension.load()

for _family in (balanced_mse, weighted_losses, fds, rnc, conr, ranksim):
    _family.register_backends(cpp=CPP_LOADED)
del _family
