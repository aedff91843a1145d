"""C++ window backend: the fast tier's attention when the fast tier lives on the CPU (no CUDA).

The fast tier of sequence b, ``k[b]`` ``[Hkv, L, D]``, is a host-tier-shaped view (one block of L rows), and its
valid slots ``0 .. lengths[b]-1`` are the selection: the same C++ kernel as the host side, on its own thread
pool so that both sides of a decode step run at once. One call per sequence (no copy of the tier).
"""
from __future__ import annotations

from typing import List

import torch

from hetero.backends import WindowBackend
from hetero.native_pool import RunnerBacked
from hetero.types import HostView, PartialAttention, Selection

from hetero import native

from .cpp_sparse import run_sparse


class CppWindowBackend(RunnerBacked, WindowBackend):
    name = "cpp"
    devices = ("cpu",)
    pool, phase = "cpp window", "window"
    max_group = 64
    # Contiguous rows still gain from software prefetch (4100 bf16 tokens x 8 KV heads from DRAM, one thread:
    # 3.3 ms without, 2.35 ms with 4-32 rows ahead; 1.84 -> 1.43 ms on two threads, Intel VM). With the kernel's
    # prefetch into L2 only (cpp_sparse.py), Zen 4 VM, two threads: 1.00 / 0.80 / 0.78 ms at 0 / 8 / 32 rows.
    prefetch_rows = 8

    def __init__(self) -> None:
        self._runner = native.new_runner(native.usable_cores())
        self._index = torch.empty(1, 0, 0, dtype=torch.int32)  # [1, Hkv, n]: 0 .. n-1 per head, the last n used
        self._table = torch.zeros(1, 1, dtype=torch.int32)      # the fast tier of one sequence is one block
        self._slots = torch.tensor([0])

    def availability_reasons(self) -> List[str]:
        error = native.load_error()
        return [] if error is None else [error]

    def not_supported_reasons(self, q, k) -> List[str]:
        reasons = super().not_supported_reasons(q, k)
        if k.stride(-1) != 1:
            reasons.append("fast tier rows must be contiguous")
        if q.shape[1] // max(k.shape[1], 1) > self.max_group:
            reasons.append(f"GQA group larger than {self.max_group}")
        return reasons

    def _window_index(self, hkv: int, n: int) -> torch.Tensor:
        """``[1, hkv, n]`` int32, contiguous: every slot of the window. Kept between calls (n is fixed once the
        window is full): building it from an expanded arange cost ~75 us per call."""
        if self._index.shape[1:] != (hkv, n):
            self._index = torch.arange(n, dtype=torch.int32).repeat(1, hkv, 1)
        return self._index

    def __call__(self, q, k, v, lengths, scale) -> PartialAttention:
        b, hq, d = q.shape
        hkv, slots = k.shape[1], k.shape[2]
        if int(self._slots[0]) != slots:
            self._slots = torch.tensor([slots])
        # One block of a power-of-two size >= slots: the kernel then resolves rows with a shift, not a 64-bit
        # division per row (~0.2 ms of a 4100-token window on two threads).
        block = 1 << max(slots - 1, 0).bit_length()
        parts = []
        for seq, n in enumerate(lengths.tolist()):
            view = HostView(k[seq], v[seq], self._table, self._slots, block)
            idx = self._window_index(hkv, n)
            parts.append(run_sparse(self._runner, q[seq:seq + 1], view, Selection(idx), scale, self.prefetch_rows))
        if len(parts) == 1:
            return parts[0]
        return PartialAttention(torch.cat([p.out for p in parts]), torch.cat([p.lse for p in parts]))
