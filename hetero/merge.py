"""Exact fusion of partial attention results by log-sum-exp."""
from __future__ import annotations

from typing import Sequence

import torch

from .errors import DTypeError, ShapeError
from .types import PartialAttention


def merge(parts: Sequence[PartialAttention]) -> PartialAttention:
    """Fuse partial attentions over disjoint key sets into attention over their union.

    parts: each ``out [B, Hq, D]``, ``lse [B, Hq]`` (natural log), same shapes, float dtype.
    Returns ``lse = logsumexp_i lse_i`` and ``out = sum_i exp(lse_i - lse) out_i`` in float32 (float64 if
    any part is float64). Never NaN: all-empty gives ``(0, -inf)``; a ``+inf`` lse takes all the weight
    (shared equally between ``+inf`` parts); extreme finite lse values do not overflow.

    Equivalent PyTorch: ``w = softmax(stack(lse), 0); out = sum(w[..., None] * stack(out), 0)``.
    """
    if len(parts) == 0:
        raise ShapeError("merge() needs at least one PartialAttention, got an empty sequence")
    first = parts[0]
    for i, p in enumerate(parts):
        if p.out.dim() != 3 or p.lse.dim() != 2 or p.out.shape[:2] != p.lse.shape:
            raise ShapeError(
                f"part {i}: expected out [B, Hq, D] and lse [B, Hq], got out {tuple(p.out.shape)}, "
                f"lse {tuple(p.lse.shape)}"
            )
        if p.out.shape != first.out.shape:
            raise ShapeError(f"part {i} has out {tuple(p.out.shape)}, part 0 has {tuple(first.out.shape)}")
        if not (p.out.is_floating_point() and p.lse.is_floating_point()):
            raise DTypeError(f"part {i}: out and lse must be floating point, got {p.out.dtype}, {p.lse.dtype}")
    dtype = torch.float64 if any(p.out.dtype == torch.float64 for p in parts) else torch.float32
    if len(parts) == 1:
        return PartialAttention(first.out.to(dtype), first.lse.to(dtype))
    lse = torch.stack([p.lse.to(dtype) for p in parts])  # [P, B, Hq]
    out = torch.stack([p.out.to(dtype) for p in parts])  # [P, B, Hq, D]
    return _merge_stacked(out, lse)


def _merge_stacked(out: torch.Tensor, lse: torch.Tensor) -> PartialAttention:
    """merge() over stacked parts: ``out [P, B, Hq, D]``, ``lse [P, B, Hq]``."""
    m = lse.amax(dim=0)  # [B, Hq]
    pos_inf = torch.isposinf(lse)
    # Shift by a finite max: -inf rows (all empty) shift by 0, +inf rows are handled by the mask below.
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m_safe)  # exp(-inf) = 0 for empty parts; +inf stays +inf
    has_pos_inf = pos_inf.any(dim=0)
    w = torch.where(has_pos_inf.unsqueeze(0), pos_inf.to(w.dtype), w)
    total = w.sum(dim=0)  # [B, Hq]
    nonempty = total > 0
    denom = torch.where(nonempty, total, torch.ones_like(total))
    # A part with zero weight contributes nothing, even if its out holds garbage.
    contrib = torch.where(w.unsqueeze(-1) > 0, w.unsqueeze(-1) * out, torch.zeros_like(out))
    merged_out = contrib.sum(dim=0) / denom.unsqueeze(-1)
    merged_out = torch.where(nonempty.unsqueeze(-1), merged_out, torch.zeros_like(merged_out))
    merged_lse = torch.where(has_pos_inf, m, m_safe + torch.log(total))
    merged_lse = torch.where(nonempty | has_pos_inf, merged_lse, torch.full_like(m, float("-inf")))
    return PartialAttention(merged_out, merged_lse)
