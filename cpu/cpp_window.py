"""C++ window backend: the fast tier's attention when the fast tier lives on the CPU (no CUDA).

The fast tier ``[B, Hkv, L, D]`` is read in place, its valid slots ``0 .. lengths[b]-1`` streamed in order, by the
same kernel as the host side (without a block table). The fused decode step runs it inside its one C++ call; this
class is also the window backend of the generic path.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from hetero import native
from hetero.backends import WindowBackend
from hetero.types import PartialAttention

from .cpp_sparse import CppKernel
from .prefetch import packed


class CppWindowBackend(CppKernel, WindowBackend):
    pool, phase = "cpp window", "window"

    def __init__(self, prefetch: Optional[int] = None) -> None:
        """prefetch: a packed policy (``hetero.native.pack_prefetch``); None: this CPU's policy for contiguous rows
        (cpu/prefetch.py)."""
        self._runner = native.new_runner(native.usable_cores())
        self.prefetch = packed("window") if prefetch is None else prefetch

    def availability_reasons(self) -> List[str]:
        error = native.load_error()
        return [] if error is None else [error]

    def __call__(self, q, k, v, lengths, scale) -> PartialAttention:
        b, hq, d = q.shape
        hkv = k.shape[1]
        q = q.to(torch.float32).contiguous()
        if k.stride(-1) != 1 or v.stride() != k.stride():
            k, v = k.contiguous(), v.contiguous()
        counts = lengths.to(torch.int64).cpu().repeat_interleave(hkv).contiguous()
        out = torch.empty(b, hq, d, dtype=torch.float32)
        lse = torch.empty(b, hq, dtype=torch.float32)
        self._runner.sparse_attention(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), k.stride(1), k.stride(2), k.stride(0), 0, 0, 1, 0,
            counts.data_ptr(), 0, out.data_ptr(), lse.data_ptr(), b, hq, hkv, d, k.shape[2], float(scale),
            native.DTYPE_CODES[k.dtype], self.prefetch)
        return PartialAttention(out, lse)
