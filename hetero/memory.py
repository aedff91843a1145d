"""Host-memory allocation for the host tier, the index arenas and a CPU fast tier.

Random-row attention over a host tier of GBs misses the TLB on nearly every row with 4 KiB pages, and the
hardware prefetchers stop at every 4 KiB page boundary of a streamed window or list; on Linux large buffers
are advised for transparent huge pages (``madvise(MADV_HUGEPAGE)``, effective when THP is in
``madvise`` or ``always`` mode), which measured 1.3-1.6x faster on the cpu-sparse benchmark. Pinned
(CUDA) allocations are left alone. ``HETERO_HUGEPAGES=0`` turns the advice off.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch

_HUGE = 2 << 20
_MADV_HUGEPAGE = 14
_libc = None


def _madvise_hugepages(t: torch.Tensor) -> bool:
    global _libc
    if not sys.platform.startswith("linux") or os.environ.get("HETERO_HUGEPAGES", "1") == "0":
        return False
    nbytes = t.numel() * t.element_size()
    start = (t.data_ptr() + _HUGE - 1) & ~(_HUGE - 1)
    length = (t.data_ptr() + nbytes - start) & ~(_HUGE - 1)
    if length <= 0:
        return False
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _libc.madvise(start, length, _MADV_HUGEPAGE) == 0


def zeros_host(shape, dtype: torch.dtype) -> torch.Tensor:
    """``torch.zeros`` on the host, advised for huge pages before first touch (as ``empty_host``)."""
    return empty_host(shape, dtype).zero_()


def empty_host(shape, dtype: torch.dtype, pin_memory: bool = False) -> torch.Tensor:
    """``torch.empty`` on the host; pinned when asked, else advised for huge pages before first touch."""
    t = torch.empty(shape, dtype=dtype, pin_memory=pin_memory)
    if not pin_memory and t.numel() * t.element_size() >= 4 * _HUGE:
        _madvise_hugepages(t)
    return t


def in_storage_mode(method):
    """Run ``method`` outside ``torch.inference_mode()``: a tensor made under it cannot be written outside it, so a
    cache (its tiers, index or step workspaces) filled in one turn under it refused the next turn's writes. One
    check when the caller is not in it."""
    @functools.wraps(method)
    def call(*args, **kwargs):
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                return method(*args, **kwargs)
        return method(*args, **kwargs)

    return call

