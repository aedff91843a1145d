"""Tokens leaving a window that lives on a GPU, on their way to the host tier without a host sync.

An append to a CUDA fast tier copies the tokens it pushes out of the window into pinned staging buffers
(``non_blocking``, on the stream that holds them) and records an event; the host tier and the retriever receive them
when the host side next needs them (``land``): the search of the same decode step, a crop, an inspection. The
append's NaN/inf check runs on the device too: its flag comes back with the tokens, and a failed check undoes the
append then (the tokens land, the layer is cropped back to its lengths before the append, and ``land`` raises).

On the CPU the same code runs with plain copies and no events (tests exercise it there).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch


@dataclass
class StagedAppend:
    """One append's evicted tokens: ``(seq, k [Hkv, n, D], v [Hkv, n, D])`` in host memory once ``ready`` fired."""

    lengths_before: List[int]
    tokens: List[Tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    ready: Optional[torch.cuda.Event] = None
    finite: Optional[torch.Tensor] = None  # pinned bool [], the device's verdict on the appended keys and values


class EvictionStage:
    """The staged appends of one layer, oldest first."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pending: List[StagedAppend] = []

    def __bool__(self) -> bool:
        return bool(self.pending)

    def open(self, lengths_before: List[int]) -> StagedAppend:
        rec = StagedAppend(list(lengths_before))
        self.pending.append(rec)
        return rec

    def stage(self, rec: StagedAppend, seq: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Start copying ``k, v [Hkv, n, D]`` (device) to pinned host buffers."""
        if self.device.type == "cuda":
            hk = torch.empty(k.shape, dtype=k.dtype, pin_memory=True)
            hv = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
            hk.copy_(k, non_blocking=True)
            hv.copy_(v, non_blocking=True)
        else:
            hk, hv = k.clone(), v.clone()
        rec.tokens.append((seq, hk, hv))

    def seal(self, rec: StagedAppend, finite: Optional[torch.Tensor]) -> None:
        """After the append's last device work: the finiteness verdict (a device bool, or None when checked already)
        on its way back, and the event that says the staged copies have landed."""
        if finite is not None:
            if self.device.type == "cuda":
                rec.finite = torch.empty((), dtype=torch.bool, pin_memory=True)
                rec.finite.copy_(finite, non_blocking=True)
            else:
                rec.finite = finite.clone()
        if self.device.type == "cuda":
            rec.ready = torch.cuda.Event()
            rec.ready.record(torch.cuda.current_stream(self.device))

    def take(self) -> List[StagedAppend]:
        """Wait for every staged copy and hand the records over (oldest first)."""
        pending, self.pending = self.pending, []
        for rec in pending:
            if rec.ready is not None:
                rec.ready.synchronize()
        return pending

    def drop(self) -> None:
        self.pending = []
