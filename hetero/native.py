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

import numpy as np
import torch

from .errors import ConfigError

_ext = None
_load_error: Optional[str] = None
ABI = 2  # csrc/module.cpp's ABI: raised with every change of a native signature or descriptor field

# Element dtype codes of the kernels (csrc/sparse/sparse_attention.h DType), for K/V, queries and outputs.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# The largest head_dim the kernels, the fused step, the native append and the IVF codes take (csrc/module.cpp).
MAX_HEAD_DIM = 512


def load():
    """The extension module, or None when it was not built (the reason is in ``load_error()``)."""
    global _ext, _load_error
    if _ext is None and _load_error is None:
        try:
            from hetero import _native as ext
        except ImportError as e:
            _load_error = f"C++ extension not built ({e})"
            return None
        if getattr(ext, "ABI", None) != ABI:  # a build of older sources (an editable install not rebuilt)
            _load_error = (f"C++ extension out of date (its ABI {getattr(ext, 'ABI', None)}, these sources' {ABI}): "
                           "rebuild it (pip install -e . or python setup.py build_ext --inplace)")
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


def float_bits(x: float) -> int:
    """A float64 as the int64 holding its bits (how descriptors carry floats)."""
    return int(np.array([x], dtype=np.float64).view(np.int64)[0])


class Descriptor:
    """The int64 fields of one C++ descriptor (csrc/runner/step.h), set by name; ``address`` is stable."""

    def __init__(self, kind: str):
        names = list(require().LAYER_FIELDS if kind == "layer" else require().WORK_FIELDS)
        self.index = {n: i for i, n in enumerate(names)}
        self.array = np.zeros(len(names), dtype=np.int64)
        self.address = int(self.array.ctypes.data)

    def set(self, **values: int) -> None:
        for name, value in values.items():
            self.array[self.index[name]] = int(value)

    def __getitem__(self, name: str) -> int:
        return int(self.array[self.index[name]])


def address(t) -> int:
    """Data address of a tensor or numpy array (0 for None)."""
    if t is None:
        return 0
    if isinstance(t, np.ndarray):
        return int(t.ctypes.data)
    return int(t.data_ptr())


def used_counts(idx) -> np.ndarray:
    """``[B * Hkv]`` int64: entries of each row of selection indices ``idx [B, Hkv, K]`` up to its last selected
    one. The kernels read only these (retrievers leave their -1 padding at the end), the same rows whichever path
    runs them, so that results match bit for bit."""
    rows = idx.shape[0] * idx.shape[1]
    if idx.shape[-1] == 0 or rows == 0:
        return np.zeros(rows, dtype=np.int64)
    valid = idx.numpy().reshape(rows, idx.shape[-1]) >= 0
    last = valid.shape[1] - np.argmax(valid[:, ::-1], axis=1)
    return np.where(valid.any(axis=1), last, 0).astype(np.int64)


def pack_prefetch(far: int, near: int = 0, lines: int = 0, spread: int = 0) -> int:
    """A prefetch policy as the kernels take it (csrc/sparse/sparse_attention.h PrefetchPolicy): ``far`` rows ahead
    into L2, ``near`` rows ahead into L1, ``lines`` cache lines of each K and V row (0: the whole row); ``spread`` 1:
    the V rows asked for during the value pass rather than beside their K rows (the host kernel; others ignore it)."""
    for name, x in (("far", far), ("near", near), ("lines", lines)):
        if not 0 <= int(x) < 1 << 16:
            raise ValueError(f"prefetch {name}={x} must lie in [0, 65536)")
    if int(spread) not in (0, 1):
        raise ValueError(f"prefetch spread={spread} must be 0 or 1")
    return int(far) | int(near) << 16 | int(lines) << 32 | int(spread) << 48
