"""Identity of a build of the C++ extension: what the compiled libraries were built from.

``setup.py`` computes :func:`source_id` over ``csrc/`` at build time and compiles it, with the torch version,
into every library (module attributes ``SOURCE_ID`` and ``TORCH_VERSION``). At load,
:mod:`imbreg_fast._extension` compares them with the running torch and, in a source checkout, with the
current ``csrc/``: a library built from other sources or for another torch is not loaded ("rebuild with
`make build`"). This module imports nothing but the standard library (setup.py loads it by path).
"""
from __future__ import annotations

import hashlib
import os

SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


def source_files(csrc_dir: str) -> list[str]:
    """The C++ sources of the extension below ``csrc_dir``, sorted by relative path."""
    found = []
    for root, _dirs, files in os.walk(csrc_dir):
        for name in files:
            if name.endswith(SOURCE_SUFFIXES):
                found.append(os.path.relpath(os.path.join(root, name), csrc_dir))
    return sorted(found)


def source_id(csrc_dir: str) -> str:
    """SHA-256 (hex, first 16 digits) of the relative paths and contents of the sources below ``csrc_dir``."""
    digest = hashlib.sha256()
    for rel in source_files(csrc_dir):
        digest.update(rel.replace(os.sep, "/").encode() + b"\0")
        with open(os.path.join(csrc_dir, rel), "rb") as f:
            digest.update(f.read() + b"\0")
    return digest.hexdigest()[:16]
