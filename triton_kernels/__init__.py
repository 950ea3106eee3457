"""Triton kernels of imbreg_fast, installed as ``imbreg_fast.triton_kernels`` (never a top-level package).

One module per family (``balanced_mse``, ``weighted_losses``, ``fds``) and ``common``, the helpers they
share (reduction codes, the finalize kernel, accumulation dtype, device guard). Importing this package
does not import Triton; its modules do.
"""
