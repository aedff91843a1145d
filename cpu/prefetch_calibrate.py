"""Calibrates the C++ kernels' prefetch policies on this CPU (``hetero env --calibrate``): each kernel timed on
rows read from DRAM over a grid of policies; the fastest is kept by :func:`hetero.cpu.prefetch.save`."""
from __future__ import annotations

import statistics
import time
from typing import Dict, List

import torch

from hetero import native
from hetero.tiers import HostTier
from hetero.types import Selection

from .cpp_sparse import CppSparseBackend
from .cpp_window import CppWindowBackend
from .prefetch import Policy, save

HOST_GRID: List[Policy] = [(32, 0, 0, 0), (64, 0, 0, 0), (128, 0, 0, 0), (32, 8, 0, 0), (64, 8, 0, 0), (128, 8, 0, 0),
                           (128, 16, 0, 0), (192, 8, 0, 0), (32, 0, 0, 1), (32, 16, 0, 1), (64, 8, 0, 1),
                           (128, 8, 0, 1)]
WINDOW_GRID: List[Policy] = [(0, 0, 0, 0), (8, 0, 0, 0), (16, 0, 0, 0), (32, 0, 0, 0), (0, 4, 0, 0), (8, 4, 0, 0)]


def calibrate(threads: int = 2, seconds_per_policy: float = 0.3, log=print) -> Dict[str, Policy]:
    """Time the host kernel on random rows of a tier larger than the last-level cache, and the window kernel on
    windows read from DRAM, over each grid of policies (interleaved rounds, so a noisy machine slows them alike);
    save the fastest under the cache folder and use it from now on. A few seconds."""
    gen = torch.Generator().manual_seed(0)
    hkv, d, g, k = 8, 128, 4, 2048
    tokens = 1 << 18  # 8 heads x 256K tokens x 512 B = 1 GiB of bf16 K|V rows
    tier = HostTier(1, hkv, d, torch.bfloat16, 256)
    tier.reserve(0, tokens)
    for start in range(0, tokens, 1 << 15):
        x = torch.randn(hkv, 1 << 15, d, generator=gen).to(torch.bfloat16)
        tier.append(0, x, x)
    view = tier.view()
    q = torch.randn(1, hkv * g, d, generator=gen)
    # every call sets its policy: the backends need none of their own (a malformed saved calibration, which this
    # replaces, would refuse to give one)
    host = CppSparseBackend(prefetch=native.pack_prefetch(*HOST_GRID[0]))
    host.set_threads(threads)

    def host_call():
        idx = torch.stack([torch.randperm(tokens, generator=gen)[:k].sort().values for _ in range(hkv)])
        sel = Selection(idx.to(torch.int32).unsqueeze(0))
        t = time.perf_counter()
        host(q, view, sel, 0.088)
        return time.perf_counter() - t

    windows = [(torch.randn(1, hkv, 4100, d, generator=gen).to(torch.bfloat16),
                torch.randn(1, hkv, 4100, d, generator=gen).to(torch.bfloat16)) for _ in range(24)]
    window = CppWindowBackend(prefetch=native.pack_prefetch(*WINDOW_GRID[0]))
    window.set_threads(threads)
    lengths = torch.full((1,), 4100, dtype=torch.int32)
    it = iter(range(10 ** 9))

    def window_call():
        wk, wv = windows[next(it) % len(windows)]
        t = time.perf_counter()
        window(q, wk, wv, lengths, 0.088)
        return time.perf_counter() - t

    best = {}
    for kind, grid, backend, call in (("host", HOST_GRID, host, host_call), ("window", WINDOW_GRID, window,
                                                                             window_call)):
        times = {p: [] for p in grid}
        deadline = time.perf_counter() + seconds_per_policy * len(grid)
        while time.perf_counter() < deadline or min(len(t) for t in times.values()) < 5:
            for p in grid:
                backend.prefetch = native.pack_prefetch(*p)
                times[p].append(call())
        medians = {p: statistics.median(t[1:]) for p, t in times.items()}
        best[kind] = min(medians, key=medians.get)
        log(f"{kind}: " + ", ".join(f"{p} {1e3 * m:.3f} ms" for p, m in medians.items()) + f"; best {best[kind]}")
    log(f"saved in {save(best, threads)}")
    return best
