"""The one door into hetero's C++ extension (``hetero._native``, built from ``csrc/``).

The extension carries scalar, AVX2+FMA, AVX-512 and AVX-512+BF16 kernels and picks the highest level the CPU
supports when it is loaded; ``HETERO_CPU_ISA=scalar|avx2|avx512|avx512_bf16`` forces a lower one. A build without
a compiler leaves it out: ``load()`` then returns None and ``load_error()`` says why, and every caller has a
slower path in numba or PyTorch.

Everything else in hetero reaches the extension through this module, so the kernels' thread pools and the
ISA choice have one owner and the backends (``hetero.cpu``) and retrievers (``hetero.retrieval``) import only
this, never each other.
"""
from __future__ import annotations

import os
from typing import Optional

from .errors import ConfigError

_ext = None
_load_error: Optional[str] = None

# Storage dtype codes of the kernels (csrc/sparse_attention.h DType).
DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}


def load():
    """The extension module, or None when it was not built (the reason is in ``load_error()``)."""
    global _ext, _load_error
    if _ext is None and _load_error is None:
        try:
            from hetero import _native as ext
        except ImportError as e:
            _load_error = f"C++ extension not built ({e})"
            return None
        isa = os.environ.get("HETERO_CPU_ISA")
        if isa:
            try:
                ext.set_isa(isa)
            except ValueError as e:
                raise ConfigError(f"HETERO_CPU_ISA={isa!r}: {e}") from None
        _ext = ext
    return _ext


def load_error() -> Optional[str]:
    """Why the extension is unavailable, or None when it loaded."""
    load()
    return _load_error


def require():
    """The extension module; raises ``BackendUnavailableError`` naming why it is missing."""
    from .errors import BackendUnavailableError

    ext = load()
    if ext is None:
        raise BackendUnavailableError(f"hetero's C++ extension is required here: {_load_error}")
    return ext


def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def new_runner(threads: int):
    """A ``Runner`` (the extension's thread pool with its own scratch) of ``threads`` threads, or None without the
    extension. Each owner of a Runner gets its own: calls on one Runner run one at a time."""
    ext = load()
    return None if ext is None else ext.Runner(max(1, int(threads)))


def info() -> dict:
    """``{"isa_detected", "isa", "ivf_scan", "threads"}`` of the extension, or ``{"error": reason}``."""
    ext = load()
    if ext is None:
        return {"error": _load_error}
    return dict(ext.info(), threads=usable_cores())
