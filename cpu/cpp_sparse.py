"""C++ sparse host-attention backend: the kernels of ``hetero._native`` (see ``hetero/native.py``).

If the extension was not built (compiler missing on this machine), the backend reports why and "auto" falls back
to numba with a one-line warning.
"""
from __future__ import annotations

import warnings
from typing import List

import torch

from hetero import native
from hetero.backends import HostBackend
from hetero.native_pool import RunnerBacked
from hetero.types import PartialAttention

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_warned = False


def run_sparse(runner, q, host, selection, scale, prefetch_rows: int) -> PartialAttention:
    """Call ``runner.sparse_attention`` on checked, contiguous buffers; returns float32 out/lse."""
    b, hq, d = q.shape
    hkv = host.k_pool.shape[0]
    q = q.to(torch.float32).contiguous()
    host.check_row_layout()
    k_pool, v_pool = host.k_pool, host.v_pool
    table = host.block_table.to(torch.int32).contiguous()
    idx = selection.indices.to(torch.int32).contiguous()
    lw = selection.log_weight
    lw = lw.to(torch.float32).contiguous() if lw is not None else None
    out = torch.empty(b, hq, d, dtype=torch.float32)
    lse = torch.empty(b, hq, dtype=torch.float32)
    runner.sparse_attention(
        q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), k_pool.stride(0), k_pool.stride(1), table.data_ptr(),
        table.shape[1], host.block_tokens, idx.data_ptr(), lw.data_ptr() if lw is not None else 0,
        out.data_ptr(), lse.data_ptr(), b, hq, hkv, d, idx.shape[2], float(scale), _DTYPE_CODES[k_pool.dtype],
        prefetch_rows,
    )
    return PartialAttention(out, lse)


class CppSparseBackend(RunnerBacked, HostBackend):
    """Host attention in C++: each selected K/V row read once per GQA group, software prefetch
    ``prefetch_rows`` rows ahead, GIL released, the module's own thread pool."""

    name = "cpp"
    devices = ("cpu",)
    pool, phase = "cpp host", "host_attn"
    # K|V rows this far ahead go to L2 (prefetcht2). cpu-sparse benchmark, k = 2048, 2 threads, Zen 4 VM, as a
    # fraction of the bare read loop timed alongside: bf16 0.93-0.96 / 0.85-0.97 / 0.86-0.95 and fp32 1.01-1.05 /
    # 0.92-1.0 at 24-32 / 32 / 64 rows (noisy; 64 was best with the L1 prefetch the kernel no longer makes).
    prefetch_rows = 32
    max_group = 64

    def availability_reasons(self) -> List[str]:
        global _warned
        error = native.load_error()
        if error is not None:
            if not _warned:
                warnings.warn(f"hetero: {error}; host attention falls back to numba", stacklevel=3)
                _warned = True
            return [error]
        return []

    def not_supported_reasons(self, q, host) -> List[str]:
        reasons = super().not_supported_reasons(q, host)
        g = q.shape[1] // max(host.k_pool.shape[0], 1)
        if g > self.max_group:
            reasons.append(f"GQA group of {g} query heads > {self.max_group}")
        return reasons

    def __init__(self) -> None:
        self._runner = native.new_runner(native.usable_cores())

    def __call__(self, q, host, selection, scale) -> PartialAttention:
        return run_sparse(self._runner, q, host, selection, scale, self.prefetch_rows)
