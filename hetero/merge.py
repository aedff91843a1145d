"""Exact fusion of partial attention results by log-sum-exp: one merge per device family (the C++ merge for CPU
float32 parts, the Triton merge kernel on CUDA) and the PyTorch reference for everything else (float64, autograd,
any other device)."""
from __future__ import annotations

from typing import Sequence

import torch

from . import native
from .errors import ShapeError
from .registry import DEVICE_MERGES
from .types import PartialAttention
from .validation import check_part


def merge(parts: Sequence[PartialAttention]) -> PartialAttention:
    """Fuse partial attentions over disjoint key sets into attention over their union.

    parts: each ``out [B, Hq, D]`` (or ``[B, Hq, C, D]``), ``lse [B, Hq]`` (or ``[B, Hq, C]``), natural log, the
    same shapes, one device, float dtype; an lse holding NaN is refused (a broken part). Returns ``lse =
    logsumexp_i lse_i`` and ``out = sum_i exp(lse_i - lse) out_i`` in float32 (float64 if any part is float64).
    Never NaN: all-empty gives ``(0, -inf)``; a ``+inf`` lse takes all the weight (shared equally between ``+inf``
    parts); extreme finite lse values do not overflow.

    Equivalent PyTorch: ``w = softmax(stack(lse), 0); out = sum(w[..., None] * stack(out), 0)``.
    """
    if not isinstance(parts, (list, tuple)):
        raise ShapeError(f"merge() takes a list of PartialAttention, got {type(parts).__name__}")
    if len(parts) == 0:
        raise ShapeError("merge() needs at least one PartialAttention, got an empty sequence")
    for i, p in enumerate(parts):
        check_part(p, f"part {i}")
    first = parts[0]
    for i, p in enumerate(parts):
        if p.out.shape != first.out.shape or p.out.device != first.out.device:
            raise ShapeError(f"part {i} has out {tuple(p.out.shape)} on {p.out.device}, part 0 has "
                             f"{tuple(first.out.shape)} on {first.out.device}")
    return fuse(parts)


def fuse(parts: Sequence[PartialAttention]) -> PartialAttention:
    """``merge`` without the checks, for parts the runtime made itself (checking a CUDA part's lse for NaN would
    wait for the device)."""
    first = parts[0]
    dtype = torch.float64 if any(p.out.dtype == torch.float64 for p in parts) else torch.float32
    if len(parts) == 1:  # an empty part's out counts for nothing, whatever it holds: 0, as the merges give
        lse = first.lse.to(dtype)
        return PartialAttention(torch.where((lse == float("-inf")).unsqueeze(-1), 0.0, first.out.to(dtype)), lse)
    grad = any(p.out.requires_grad or p.lse.requires_grad for p in parts)
    device = first.out.device
    if dtype == torch.float32 and not grad and len(parts) <= 64:
        if device.type == "cpu" and native.load() is not None:
            return _merge_native(parts)
        if device.type in DEVICE_MERGES and first.out.dim() == 3:  # the device merges take [B, Hq, D] parts
            return DEVICE_MERGES.load(device.type)(parts)
    return merge_reference(parts, dtype)


def _merge_native(parts: Sequence[PartialAttention]) -> PartialAttention:
    outs = [p.out.to(torch.float32).contiguous() for p in parts]
    lses = [p.lse.to(torch.float32).contiguous() for p in parts]
    out, lse = torch.empty_like(outs[0]), torch.empty_like(lses[0])
    native.require().merge_parts([o.data_ptr() for o in outs], [x.data_ptr() for x in lses], lse.numel(),
                                 out.shape[-1], out.data_ptr(), lse.data_ptr())
    return PartialAttention(out, lse)


def merge_reference(parts: Sequence[PartialAttention], dtype: torch.dtype = torch.float32) -> PartialAttention:
    """``merge`` in plain PyTorch (the oracle, and the path for float64, autograd and other devices)."""
    lse = torch.stack([p.lse.to(dtype) for p in parts])  # [P, ...]
    out = torch.stack([p.out.to(dtype) for p in parts])  # [P, ..., D]
    m = lse.amax(dim=0)
    pos_inf = torch.isposinf(lse)
    # Shift by a finite max: -inf rows (all empty) shift by 0, +inf rows are handled by the mask below.
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m_safe)  # exp(-inf) = 0 for empty parts; +inf stays +inf
    has_pos_inf = pos_inf.any(dim=0)
    w = torch.where(has_pos_inf[None], torch.where(pos_inf, torch.ones_like(w), torch.zeros_like(w)), w)
    total = w.sum(dim=0)
    nonempty = total > 0
    denom = torch.where(nonempty, total, torch.ones_like(total))
    # A part with zero weight contributes nothing, even if its out holds garbage.
    contrib = torch.where(w[..., None] > 0, w[..., None] * out, torch.zeros_like(out))
    merged_out = contrib.sum(dim=0) / denom[..., None]
    merged_out = torch.where(nonempty[..., None], merged_out, torch.zeros_like(merged_out))
    merged_lse = torch.where(has_pos_inf, m, m_safe + torch.log(denom))
    merged_lse = torch.where(nonempty | has_pos_inf, merged_lse, torch.full_like(m, float("-inf")))
    return PartialAttention(merged_out, merged_lse)
