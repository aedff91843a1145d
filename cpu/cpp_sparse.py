"""C++ sparse host-attention backend: the kernels of ``hetero._native`` (see ``hetero/native.py``).

If the extension was not built (compiler missing on this machine), the backend reports why and "auto" falls back
to numba with a one-line warning. The fused decode step (``HeteroAttention``) calls this backend's Runner itself.
"""
from __future__ import annotations

import warnings
from typing import List, Optional

import torch

from hetero import native
from hetero.backends import HostBackend
from hetero.native_pool import RunnerBacked
from hetero.types import HostView, PartialAttention, Selection

from .prefetch import packed

_warned = False


def run_sparse(runner, q: torch.Tensor, host: HostView, selection: Selection, scale: float, prefetch: int,
               batch_stride: int = 0, table: bool = True) -> PartialAttention:
    """``runner.sparse_attention`` over a checked view and selection (``hetero.validation``); float32 out/lse.
    ``table=False``: the pools are ``[B, Hkv, L, D]`` with ``batch_stride`` and position i is row i."""
    b, hq, d = q.shape
    hkv = host.k_pool.shape[0]
    q = q.to(torch.float32).contiguous()
    k_pool, v_pool = host.k_pool, host.v_pool
    tab = host.block_table.to(torch.int32).contiguous() if table else None
    idx = selection.indices.to(torch.int32).contiguous()
    counts = native.used_counts(idx)
    lw = selection.log_weight
    lw = lw.to(torch.float32).contiguous() if lw is not None else None
    out = torch.empty(b, hq, d, dtype=torch.float32)
    lse = torch.empty(b, hq, dtype=torch.float32)
    runner.sparse_attention(
        q.data_ptr(), k_pool.data_ptr(), v_pool.data_ptr(), k_pool.stride(-3), k_pool.stride(-2), batch_stride,
        native.address(tab), 0 if tab is None else tab.shape[1], host.block_tokens, idx.data_ptr(), counts.ctypes.data,
        native.address(lw), out.data_ptr(), lse.data_ptr(), b, hq, hkv, d, idx.shape[2], float(scale),
        native.DTYPE_CODES[k_pool.dtype], prefetch)
    return PartialAttention(out, lse)


class CppKernel(RunnerBacked):
    """What the C++ host and window backends declare alike: one kernel (csrc/sparse), the CPU, its own thread pool,
    a side of the fused C++ step, and the kernel's limits (GQA groups of <= 64 query heads, head_dim <= 512)."""

    name = "cpp"
    devices = ("cpu",)
    native_step = True
    max_group = 64
    max_head_dim = native.MAX_HEAD_DIM


class CppSparseBackend(CppKernel, HostBackend):
    """Host attention in C++: each selected K/V row read once per GQA group, rows prefetched ahead by ``prefetch``
    (a packed policy, ``hetero.native.pack_prefetch``), GIL released, the backend's own thread pool."""

    pool, phase = "cpp host", "host_attn"

    def availability_reasons(self) -> List[str]:
        global _warned
        error = native.load_error()
        if error is not None:
            if not _warned:
                warnings.warn(f"hetero: {error}; host attention falls back to numba", stacklevel=3)
                _warned = True
            return [error]
        return []

    def __init__(self, prefetch: Optional[int] = None) -> None:
        """prefetch: a packed policy (``hetero.native.pack_prefetch``); None: this CPU's policy for random rows
        (cpu/prefetch.py)."""
        self._runner = native.new_runner(native.usable_cores())
        self.prefetch = packed("host") if prefetch is None else prefetch

    def __call__(self, q, host, selection, scale) -> PartialAttention:
        return run_sparse(self._runner, q, host, selection, scale, self.prefetch)
