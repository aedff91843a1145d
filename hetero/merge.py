"""Exact fusion of partial attention results by log-sum-exp."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from . import native
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
    if len(parts) == 2 and dtype == torch.float32:
        fused = _merge2_native(parts[0], parts[1])
        if fused is not None:
            return fused
    lse = torch.stack([p.lse.to(dtype) for p in parts])  # [P, B, Hq]
    out = torch.stack([p.out.to(dtype) for p in parts])  # [P, B, Hq, D]
    return _merge_stacked(out, lse)


def _merge2_native(a: PartialAttention, b: PartialAttention):
    """Two float32 CPU parts (a decode step's window and host parts) fused in one C++ call (csrc/merge.cpp, the
    arithmetic of ``_merge_arrays``), or None when the parts are not that or the extension is not built (then
    the numpy path computes the same)."""
    parts = (a.out, a.lse, b.out, b.lse)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or t.requires_grad for t in parts):
        return None
    ext = native.load()
    if ext is None:
        return None
    out_a, lse_a, out_b, lse_b = (t.contiguous() for t in parts)
    out, lse = torch.empty_like(out_a), torch.empty_like(lse_a)
    ext.merge2(out_a.data_ptr(), lse_a.data_ptr(), out_b.data_ptr(), lse_b.data_ptr(), lse.numel(), out.shape[-1],
               out.data_ptr(), lse.data_ptr())
    return PartialAttention(out, lse)


def _merge_stacked(out: torch.Tensor, lse: torch.Tensor) -> PartialAttention:
    """merge() over stacked parts: ``out [P, B, Hq, D]``, ``lse [P, B, Hq]``. CPU tensors are merged in numpy
    (the same operations: a decode step's few thousand values cost ~1 us per numpy op, ~5-20 us per torch op)."""
    if out.device.type == "cpu" and not out.requires_grad and not lse.requires_grad:
        with np.errstate(all="ignore"):  # masked lanes (0 * inf garbage) are discarded, as in torch
            o, m = _merge_arrays(np, out.numpy(), lse.numpy())
        return PartialAttention(torch.from_numpy(o), torch.from_numpy(m))
    return PartialAttention(*_merge_arrays(torch, out, lse))


def _merge_arrays(xp, out, lse):
    """The merge arithmetic over ``xp`` = numpy or torch arrays (the functions used exist in both)."""
    m = xp.amax(lse, axis=0)  # [B, Hq]
    pos_inf = xp.isposinf(lse)
    # Shift by a finite max: -inf rows (all empty) shift by 0, +inf rows are handled by the mask below.
    m_safe = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    w = xp.exp(lse - m_safe)  # exp(-inf) = 0 for empty parts; +inf stays +inf
    has_pos_inf = pos_inf.any(axis=0)
    w = xp.where(has_pos_inf[None], xp.where(pos_inf, xp.ones_like(w), xp.zeros_like(w)), w)
    total = w.sum(axis=0)  # [B, Hq]
    nonempty = total > 0
    denom = xp.where(nonempty, total, xp.ones_like(total))
    # A part with zero weight contributes nothing, even if its out holds garbage.
    contrib = xp.where(w[..., None] > 0, w[..., None] * out, xp.zeros_like(out))
    merged_out = contrib.sum(axis=0) / denom[..., None]
    merged_out = xp.where(nonempty[..., None], merged_out, xp.zeros_like(merged_out))
    merged_lse = xp.where(has_pos_inf, m, m_safe + xp.log(denom))
    merged_lse = xp.where(nonempty | has_pos_inf, merged_lse, xp.full_like(m, float("-inf")))
    return merged_out, merged_lse
