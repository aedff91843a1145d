"""Streaming-read bandwidth of this machine, measured now (the machine is shared and noisy)."""
from __future__ import annotations

import os
import statistics
import time

import torch

from hetero.memory import empty_host


def last_level_cache_bytes() -> int:
    """Largest CPU cache size reported by sysfs (64 MiB if unknown)."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                text = open(os.path.join(base, entry, "size")).read().strip()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
    except OSError:
        pass
    return best or 64 << 20


def streaming_read_gbps(threads: int, nbytes: int = 1 << 30, repeats: int = 7) -> float:
    """Median GB/s of ``torch.sum`` over a float32 buffer of ``nbytes`` with ``threads`` threads, allocated as the
    tiers allocate theirs (``hetero.memory``: advised for huge pages, which the hardware prefetchers stream across)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buf = empty_host((nbytes // 4,), torch.float32).fill_(1.0)  # touches the pages
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            buf.sum()
            times.append(time.perf_counter() - t)
        return nbytes / statistics.median(times) / 1e9
    finally:
        torch.set_num_threads(old)
