"""Per-head budgets (HGCA's per-head sparsification, adapted to a retrieval budget).

A layer has a total host budget per sequence (``Hkv x`` the flat per-head budget). ``AdaptiveHeadBudget``
splits it over KV heads by what the flat split would leave out: after every step, the share of each query
head's attention mass that falls on host keys outside its own top k_ref (k_ref = the flat per-head budget),
averaged over the G query heads of the group; the weight is its square root, smoothed over steps. The
retriever reports that mass from the scores it computed anyway (``Retriever.last_missed_lse``: the exact
retriever does; ``ivf-group`` estimates it over the rows it scanned, from a strided sample of their scores).
Measured offline on real attention (benchmarks/head_budget_signals.py): sqrt of the missed
mass beats the flat split by 1.6 / 2.5 / 3.9 % at 1 / 2 / 5 %, the missed mass itself and the host tier's
share of mass do not. A retriever that cannot report it (ANN indexes score only part of the keys) falls back
to the host tier's share of mass, ``sigmoid(lse_host - lse_window)``, which ties the flat split. A floor
keeps every head at ``floor x`` the mean weight. The first step (no history yet) is a flat split.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .types import PartialAttention


def _water_fill(w: torch.Tensor, total: float, cap: float) -> torch.Tensor:
    """``total`` split over the heads in proportion to ``w [Hkv]`` with no head above ``cap``: heads whose share
    passes it get ``cap``, the rest is split again over the others (at most Hkv rounds); rounded, capped."""
    alloc = torch.zeros_like(w)
    free = torch.ones_like(w, dtype=torch.bool)
    left = float(total)
    while bool(free.any()) and left > 0:
        x = left * w * free / (w * free).sum()
        over = free & (x > cap)
        if not bool(over.any()):
            alloc = torch.where(free, x, alloc)
            break
        alloc[over] = cap
        left -= cap * int(over.sum())
        free &= ~over
    return alloc.round().clamp(max=cap).long()


class AdaptiveHeadBudget:
    def __init__(self, batch: int, kv_heads: int, floor: float = 0.25, momentum: float = 0.5):
        self.batch, self.kv_heads, self.floor, self.momentum = batch, kv_heads, floor, momentum
        self.share: Optional[torch.Tensor] = None  # [B, Hkv]

    def split(self, flat: List[int], caps: Optional[List[int]] = None) -> torch.Tensor:
        """``[B, Hkv]`` keys per query head; each row sums to ``Hkv * flat[b]`` (up to rounding). ``caps[b]``: the
        most a head of sequence ``b`` can use (its host tokens): what a head's weight gives beyond it goes to the
        other heads of the sequence, by their weights (water-filling), so a budget that covers the whole tier still
        reads all of it."""
        flat_t = torch.tensor(flat, dtype=torch.float64).unsqueeze(1)
        if self.share is None:
            return flat_t.expand(-1, self.kv_heads).round().long()
        w = self.share.double()
        w = torch.maximum(w, self.floor * w.mean(dim=1, keepdim=True)).clamp_min(1e-12)
        if caps is None:
            return (flat_t * self.kv_heads * w / w.sum(dim=1, keepdim=True)).round().long()
        out = torch.empty(len(flat), self.kv_heads, dtype=torch.long)
        for b, (f, cap) in enumerate(zip(flat, caps)):
            out[b] = _water_fill(w[b], min(f, cap) * self.kv_heads, cap)
        return out

    def update(self, window: PartialAttention, host: PartialAttention, retriever=None) -> None:
        """Record this step's signal per KV head: sqrt of the missed share of attention mass when the retriever
        reports it, else the host tier's share of attention mass (from the two parts' LSEs)."""
        missed = getattr(retriever, "last_missed_lse", None)
        if missed is not None:
            host_lse = getattr(retriever, "last_host_lse", None)  # all host keys (exact); else selected + missed
            if host_lse is None:
                host_lse = torch.logaddexp(host.lse.float().cpu(), missed)
            total = torch.logaddexp(window.lse.float().cpu(), host_lse)
            share = torch.exp(missed - total).nan_to_num(nan=0.0)               # [B, Hq]
            share = share.view(self.batch, self.kv_heads, -1).mean(dim=2).sqrt()
        else:
            diff = (host.lse - window.lse).float().cpu()
            share = torch.sigmoid(torch.nan_to_num(diff, nan=0.0, posinf=60.0, neginf=-60.0))  # [B, Hq]
            share = share.view(self.batch, self.kv_heads, -1).mean(dim=2)
        self.share = share if self.share is None else self.momentum * self.share + (1 - self.momentum) * share
