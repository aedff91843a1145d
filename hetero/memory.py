"""Host-memory allocation for the host tier, the index arenas and a CPU fast tier.

Random-row attention over a host tier of GBs misses the TLB on nearly every row with 4 KiB pages, and the
hardware prefetchers stop at every 4 KiB page boundary of a streamed window or list; on Linux large buffers
are advised for transparent huge pages (``madvise(MADV_HUGEPAGE)``, effective when THP is in
``madvise`` or ``always`` mode), which measured 1.3-1.6x faster on the cpu-sparse benchmark. Such a buffer starts
on a 2 MiB boundary and its advice covers it to the end (at the allocator's own alignment the head and tail of each
buffer, a quarter of an 8 MiB window, would stay in 4 KiB pages). Pinned (CUDA) allocations are left alone.
``HETERO_HUGEPAGES=0`` turns the advice off.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import math
import mmap
import os
import sys
from typing import Callable, TypeVar

import torch

T = TypeVar("T")

_HUGE = 2 << 20
HUGE_PAGE_BYTES = _HUGE
_PAGE = mmap.PAGESIZE
_MADV_HUGEPAGE = 14
_MADV_POPULATE_WRITE = 23  # Linux 5.14+
_libc = None
_populate_refused = False


def _hugepages_wanted() -> bool:
    return sys.platform.startswith("linux") and os.environ.get("HETERO_HUGEPAGES", "1") != "0"


def _madvise(address: int, length: int, advice: int) -> bool:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return _libc.madvise(address, length, advice) == 0


def _madvise_hugepages(address: int, length: int) -> bool:
    """Advise ``[address, address + length)`` (2 MiB aligned) for transparent huge pages."""
    return _madvise(address, length, _MADV_HUGEPAGE)


@functools.lru_cache(maxsize=None)
def room_is_free() -> bool:
    """Whether address space reserved and never written costs no memory here: Linux, unless the kernel commits
    every allocation in full (``vm.overcommit_memory`` 2, where a large reservation would use up the commit limit
    that other allocations need). Elsewhere (Windows commits at allocation) room is not reserved ahead."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/sys/vm/overcommit_memory") as f:
            return f.read().strip() != "2"
    except OSError:
        return False


def allocate_with_room(allocate: Callable[[int], T], room: int, least: int) -> T:
    """``allocate(room)`` where untouched address space is free (``room_is_free``) and the system grants it, else
    ``allocate(least)``: room reserved ahead of need costs no memory until written, and spares the copies that
    growing step by step costs."""
    if room > least and room_is_free():
        try:
            return allocate(room)
        except (MemoryError, RuntimeError):  # refused (a ulimit on address space): the smaller size
            pass
    return allocate(least)


def populate(address: int, length: int) -> bool:
    """Back ``[address, address + length)`` of a pageable buffer with memory now, its contents kept
    (``madvise(MADV_POPULATE_WRITE)``): the first-touch faults of the range are taken by the caller, not by the first
    write there. Safe beside concurrent readers and writers of the range. False (and nothing done) where the
    system has no such advice (not Linux, a kernel before 5.14: asked once)."""
    global _populate_refused
    if _populate_refused or not sys.platform.startswith("linux"):
        return False
    start = address - address % _PAGE
    end = -(-(address + length) // _PAGE) * _PAGE
    if _madvise(start, end - start, _MADV_POPULATE_WRITE):
        return True
    _populate_refused = ctypes.get_errno() == errno.EINVAL  # an unknown advice; other errors are this range's
    return False


def zeros_host(shape, dtype: torch.dtype) -> torch.Tensor:
    """``torch.zeros`` on the host, advised for huge pages before first touch (as ``empty_host``)."""
    return empty_host(shape, dtype).zero_()


def empty_host(shape, dtype: torch.dtype, pin_memory: bool = False) -> torch.Tensor:
    """``torch.empty`` on the host; pinned when asked, else (from 8 MiB) a contiguous view that starts on a 2 MiB
    boundary of a buffer up to 4 MiB larger, advised for huge pages to its end before first touch."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if pin_memory or nbytes < 4 * _HUGE or not _hugepages_wanted():
        return torch.empty(shape, dtype=dtype, pin_memory=pin_memory)
    span = -(-nbytes // _HUGE) * _HUGE  # whole huge pages
    raw = torch.empty(span + _HUGE, dtype=torch.uint8)
    offset = -raw.data_ptr() % _HUGE
    _madvise_hugepages(raw.data_ptr() + offset, span)
    return raw[offset:offset + nbytes].view(dtype).view(shape)


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

