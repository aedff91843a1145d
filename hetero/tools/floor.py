"""The bytes-moved floor of a decode step: what the step must read, over the rates this machine reads them at,
measured in the same run (the machine is shared and noisy).

* streamed: the fast tier's valid K/V rows (read in order) and the index's probed code lists, centroids and list
  statistics (contiguous segments): at the streaming-read rate.
* random: the selected host rows (one fused K|V run each): at the rate of a bare loop that reads random runs of
  the host tier itself with the kernel's prefetch (``Runner.random_read``).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from hetero import native

from .membw import streaming_read_gbps


@dataclass
class Rates:
    stream_gbps: float
    random_gbps: float
    run_bytes: int


def measure_rates(host_tier, threads: int, runs: int = 8192, repeats: int = 7, prefetch: int = 32) -> Rates:
    """Streaming-read GB/s (256 MiB, ``threads`` threads) and random-run GB/s over ``host_tier``'s pool (runs of one
    token's fused K|V rows, ``runs`` fresh positions a call)."""
    stream = streaming_read_gbps(threads, nbytes=256 << 20, repeats=repeats)
    pool = host_tier.kv_pool
    run_bytes = 2 * pool.shape[-1] * pool.element_size()
    runner = native.new_runner(threads)
    if runner is None:
        return Rates(stream, float("nan"), run_bytes)
    rows = host_tier.rows_reserved  # the pool's room after them is not backed by memory yet
    if rows == 0:  # no host rows yet (the prompt fits the window): runs of the same size in 256 MiB
        pool = torch.zeros(1, (256 << 20) // run_bytes, run_bytes, dtype=torch.uint8)
        rows = pool.shape[1]
    gen = np.random.default_rng(0)
    head_bytes = pool.stride(0) * pool.element_size()
    times = []
    for _ in range(repeats + 2):
        heads = gen.integers(0, pool.shape[0], runs)
        offsets = (heads * head_bytes + gen.integers(0, rows, runs) * run_bytes).astype(np.int64)
        offsets.sort()
        t = time.perf_counter()
        runner.random_read(pool.data_ptr(), offsets.ctypes.data, runs, run_bytes, prefetch, True)
        times.append(time.perf_counter() - t)
    return Rates(stream, runs * run_bytes / statistics.median(times[2:]) / 1e9, run_bytes)


def floor_ms(streamed_bytes: float, random_bytes: float, rates: Rates) -> float:
    """Milliseconds to read ``streamed_bytes`` at the streaming rate and ``random_bytes`` at the random-run rate."""
    random = random_bytes / rates.random_gbps if random_bytes else 0.0  # no rows: no term, even without a rate
    return (streamed_bytes / rates.stream_gbps + random) / 1e6


def window_bytes(layer) -> int:
    """Bytes of the fast tier's valid K/V rows of a layer (what the window part streams)."""
    fast = layer.fast
    return int(fast.lengths_np.astype(np.int64).sum()) * fast.k.shape[1] * fast.k.shape[3] * fast.k.element_size() * 2


def rows_bytes(layer, rows: int) -> int:
    """Bytes of ``rows`` selected host rows (fused K|V runs)."""
    return rows * 2 * layer.head_dim * torch.tensor([], dtype=layer.dtype).element_size()
