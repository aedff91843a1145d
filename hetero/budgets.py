"""Per-head budgets (HGCA's per-head sparsification, adapted to a retrieval budget).

A layer has a total host budget per sequence (``Hkv x`` the flat per-head budget). ``AdaptiveHeadBudget``
splits it over KV heads by how much the host tier matters to each: after every step, the share of attention
mass that fell on the host part, ``sigmoid(lse_host - lse_window)`` (free: both parts' LSEs are computed
anyway), averaged over the G query heads of the group and smoothed over steps. A head whose attention sits
in the sinks and recent window gets few host keys; a head whose attention reaches far back gets more. A
floor keeps every head at ``floor x`` the mean weight. The first step (no history yet) is a flat split.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .types import PartialAttention


class AdaptiveHeadBudget:
    def __init__(self, batch: int, kv_heads: int, floor: float = 0.25, momentum: float = 0.5):
        self.batch, self.kv_heads, self.floor, self.momentum = batch, kv_heads, floor, momentum
        self.share: Optional[torch.Tensor] = None  # [B, Hkv]

    def split(self, flat: List[int]) -> torch.Tensor:
        """``[B, Hkv]`` keys per query head; each row sums to ``Hkv * flat[b]`` (up to rounding)."""
        flat_t = torch.tensor(flat, dtype=torch.float64).unsqueeze(1)
        if self.share is None:
            return flat_t.expand(-1, self.kv_heads).round().long()
        w = self.share.double()
        w = torch.maximum(w, self.floor * w.mean(dim=1, keepdim=True)).clamp_min(1e-12)
        return (flat_t * self.kv_heads * w / w.sum(dim=1, keepdim=True)).round().long()

    def update(self, window: PartialAttention, host: PartialAttention) -> None:
        """Record the host tier's share of attention mass per KV head from this step's parts."""
        diff = (host.lse - window.lse).float().cpu()
        share = torch.sigmoid(torch.nan_to_num(diff, nan=0.0, posinf=60.0, neginf=-60.0))  # [B, Hq]
        share = share.view(self.batch, self.kv_heads, -1).mean(dim=2)
        self.share = share if self.share is None else self.momentum * self.share + (1 - self.momentum) * share
