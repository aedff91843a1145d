"""Standalone attention operations over q/k/v tensors, validated and dispatched to a backend.

These are the building blocks ``HeteroAttention`` uses; call them directly to run one part yourself.
"""
from __future__ import annotations

from typing import Optional

import torch

from .backends import select_backend
from .errors import DTypeError, InvalidValueError, ShapeError
from .merge import merge
from .reference import default_scale
from .types import HostView, PartialAttention, Selection
from .validation import check_finite, check_float, check_lengths, check_tensor


def check_query(q, kv_heads: int, head_dim: int, batch: int, name: str = "q") -> torch.Tensor:
    """``q [B, Hq, D]``: floating, finite, ``B >= 1`` matching, ``Hq`` a multiple of ``Hkv``."""
    check_tensor(q, name, 3, "[B, Hq, D]")
    check_float(q, name)
    b, hq, d = q.shape
    if b == 0:
        raise ShapeError(f"empty batch: {name} has B = 0")
    if b != batch:
        raise ShapeError(f"{name} has batch {b}, the KV has {batch} sequences")
    if d != head_dim:
        raise ShapeError(f"{name} has head_dim {d}, the KV has head_dim {head_dim}")
    if hq == 0 or hq % kv_heads:
        raise ShapeError(f"{name} has {hq} heads, which is not a positive multiple of the {kv_heads} KV heads "
                         "(GQA needs Hq = G * Hkv)")
    check_finite(q, name)
    return q


def check_selection(selection: Selection, batch: int, q_heads: int, kv_heads: int, host_lengths,
                    head_dim: Optional[int] = None) -> None:
    """Indices ``[B, Hkv, k]`` int32/int64 in ``[-1, host_length[b])``; log_weight ``[B, Hq, k]`` float; estimate
    a float32 ``PartialAttention`` ``[B, Hq, D]`` (D = ``head_dim`` when given)."""
    if not isinstance(selection, Selection):
        raise ShapeError(f"selection must be a hetero.Selection, got {type(selection).__name__}")
    idx = check_tensor(selection.indices, "selection.indices", 3, "[B, Hkv, k]")
    if idx.dtype not in (torch.int32, torch.int64):
        raise DTypeError(f"selection.indices must be int32 (or int64), got {idx.dtype}")
    if tuple(idx.shape[:2]) != (batch, kv_heads):
        raise ShapeError(f"selection.indices {tuple(idx.shape)} must be [B={batch}, Hkv={kv_heads}, k]")
    if idx.numel():
        if idx.device.type == "cpu":  # numpy: each torch reduction costs ~50 us once a decode step's caches are cold
            flat = idx.numpy().reshape(idx.shape[0], -1)
            lo, hi = int(flat.min()), flat.max(axis=1).tolist()
        else:
            lo, hi = int(idx.min()), idx.amax(dim=(1, 2)).tolist()
        if lo < -1 or any(h >= int(n) for h, n in zip(hi, host_lengths)):
            raise InvalidValueError(
                f"selection.indices must lie in [-1, host_length) per sequence (host lengths "
                f"{list(map(int, host_lengths))}); got min {lo}, per-sequence max {hi}")
    lw = selection.log_weight
    if lw is not None:
        check_tensor(lw, "selection.log_weight", 3, "[B, Hq, k]")
        if tuple(lw.shape) != (batch, q_heads, idx.shape[2]):
            raise ShapeError(f"selection.log_weight {tuple(lw.shape)} must be [B={batch}, Hq={q_heads}, "
                             f"k={idx.shape[2]}]")
        check_float(lw, "selection.log_weight")
        if bool(torch.isnan(lw).any()) or bool(torch.isposinf(lw).any()):
            raise InvalidValueError("selection.log_weight must not hold NaN or +inf (-inf drops a key)")
    est = selection.estimate
    if est is not None:
        if not isinstance(est, PartialAttention):
            raise ShapeError(f"selection.estimate must be a hetero.PartialAttention, got {type(est).__name__}")
        want = (batch, q_heads, est.out.shape[-1] if head_dim is None else head_dim)
        if est.out.dim() != 3 or tuple(est.out.shape) != want or tuple(est.lse.shape) != want[:2]:
            raise ShapeError(f"selection.estimate must have out [B={batch}, Hq={q_heads}, D={want[2]}] and lse "
                             f"[B, Hq], got out {tuple(est.out.shape)}, lse {tuple(est.lse.shape)}")
        if est.out.dtype != torch.float32 or est.lse.dtype != torch.float32:
            raise DTypeError(f"selection.estimate must be float32, got {est.out.dtype} / {est.lse.dtype}")


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None, backend: str = "auto") -> PartialAttention:
    """Decode attention over the fast tier (sinks + window).

    q: ``[B, Hq, D]`` float; k, v: ``[B, Hkv, L, D]`` float32/bfloat16/float16, ``Hq = G * Hkv``;
    lengths: ``[B]`` ints, valid slots per sequence (default ``L``). Returns PartialAttention
    (``out [B, Hq, D]``, ``lse [B, Hq]`` float32, natural log).
    """
    check_tensor(k, "k", 4, "[B, Hkv, L, D]")
    check_tensor(v, "v", 4, "[B, Hkv, L, D]")
    if k.shape != v.shape or k.dtype != v.dtype:
        raise ShapeError(f"k {tuple(k.shape)} {k.dtype} and v {tuple(v.shape)} {v.dtype} must match")
    check_query(q, k.shape[1], k.shape[3], k.shape[0])
    lengths = check_lengths(lengths, k.shape[0], k.shape[2]).to(k.device)
    impl = select_backend("window", backend, lambda be: be.not_supported_reasons(q, k), device=k.device)
    return impl(q, k, v, lengths, default_scale(q.shape[-1]) if scale is None else scale)


def sparse_attention(q: torch.Tensor, host: HostView, selection: Selection, scale: Optional[float] = None,
                     backend: str = "auto", threads: Optional[int] = None) -> PartialAttention:
    """Attention over host-tier rows chosen by ``selection`` (the host part).

    q: ``[B, Hq, D]`` float (host memory); host: ``HostView`` (``k_pool``/``v_pool`` ``[Hkv, R, D]``);
    selection: indices ``[B, Hkv, k]`` (-1 skipped), optional log_weight ``[B, Hq, k]``, optional estimate of the
    unselected rows (merged into the result). Returns PartialAttention on the host.
    """
    hkv, d = host.k_pool.shape[0], host.k_pool.shape[2]
    check_query(q, hkv, d, host.block_table.shape[0])
    check_selection(selection, q.shape[0], q.shape[1], hkv, host.lengths.tolist(), d)
    impl = select_backend("host", backend, lambda be: be.not_supported_reasons(q, host), device=q.device)
    if threads is not None:
        impl.set_threads(threads)
    return with_estimate(impl(q, host, selection, default_scale(d) if scale is None else scale), selection)


def with_estimate(part: PartialAttention, selection: Selection) -> PartialAttention:
    """The host part: exact attention over the selected rows, merged with the selection's estimate of the rest."""
    if selection.estimate is None:
        return part
    return merge([part, selection.estimate])
