"""Plain PyTorch attention over the two tiers. These are the float64 test oracles and the fallback
backends; every fast kernel is tested against them.

All functions take post-RoPE keys (hetero never sees positions) and return ``PartialAttention``.
Computation runs in ``compute_dtype`` (float32 by default, float64 for the oracle); storage dtypes of
the inputs may be float32, bfloat16 or float16.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .errors import ShapeError
from .types import HostView, PartialAttention, Selection
from .validation import check_float, check_in_range, check_kv, check_scale, check_tensor


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def partial_from_scores(scores: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> PartialAttention:
    """scores ``[B, Hkv, G, L]``, values ``[B, Hkv, L, D]``, valid ``[B, Hkv, G or 1, L]`` bool.

    Masked entries are excluded exactly (weight 0, and their values never enter a product, so NaN in
    unused slots cannot leak). The output is divided by the sum of its weights, as the kernels do: weights taken as
    ``exp(s - lse)`` carry lse's rounding (float32 at logits of 1e4: 5e-3 off) into every output."""
    b, hkv, g, d = scores.shape[0], scores.shape[1], scores.shape[2], values.shape[-1]
    if scores.shape[-1] == 0:
        return PartialAttention(scores.new_zeros(b, hkv * g, d), scores.new_full((b, hkv * g), float("-inf")))
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    scores = torch.where(valid, scores, neg_inf)
    m = scores.amax(dim=-1)  # [B, Hkv, G]; -inf where nothing is valid
    finite = torch.isfinite(m)
    shift = torch.where(finite, m, torch.zeros_like(m))
    p = torch.exp(scores - shift.unsqueeze(-1))
    p = torch.where(valid, p, torch.zeros_like(p))
    total = p.sum(dim=-1)  # >= 1 where the max is finite (its own weight is 1)
    any_valid = valid.any(dim=-2, keepdim=True).transpose(-1, -2)  # [B, Hkv, L, 1]
    values = torch.where(any_valid, values, torch.zeros_like(values))
    out = torch.matmul(p, values) / torch.where(finite, total, torch.ones_like(total)).unsqueeze(-1)
    out = torch.where(finite.unsqueeze(-1), out, torch.zeros_like(out))
    lse = torch.where(finite, shift + torch.log(torch.where(finite, total, torch.ones_like(total))), m)
    return PartialAttention(out.reshape(b, hkv * g, d), lse.reshape(b, hkv * g))


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    scale: Optional[float] = None,
    compute_dtype: torch.dtype = torch.float32,
) -> PartialAttention:
    """Dense decode attention over the fast tier (sinks + window), ragged by ``lengths``.

    q: ``[B, Hq, D]``; k, v: ``[B, Hkv, L, D]`` with ``Hq = G * Hkv``; lengths: ``[B]`` int, slots
    ``[0, lengths[b])`` of sequence ``b`` are valid, the rest is ignored (may hold NaN).
    Returns PartialAttention in ``compute_dtype``.

    Equivalent PyTorch: ``sdpa(q[:, :, None], k[:, :, :n], v[:, :, :n], enable_gqa=True)`` per sequence.
    """
    b, hq, d = q.shape
    hkv, slots = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = default_scale(d) if scale is None else scale
    qg = q.to(compute_dtype).reshape(b, hkv, g, d)
    scores = torch.matmul(qg, k.to(compute_dtype).transpose(-1, -2)) * scale  # [B, Hkv, G, L]
    pos = torch.arange(slots, device=k.device)
    valid = (pos.view(1, 1, 1, slots) < lengths.to(k.device).view(b, 1, 1, 1))
    return partial_from_scores(scores, v.to(compute_dtype), valid)


def sparse_attention(
    q: torch.Tensor,
    host: HostView,
    selection: Selection,
    scale: Optional[float] = None,
    compute_dtype: torch.dtype = torch.float32,
) -> PartialAttention:
    """Attention over the host-tier rows a retriever selected.

    q: ``[B, Hq, D]``; host: paged tier (``k_pool``/``v_pool`` ``[Hkv, R, D]``); selection.indices
    ``[B, Hkv, k]`` (-1 skipped), selection.log_weight optional ``[B, Hq, k]`` added to the logits.
    Each selected row is used once per group of ``G = Hq // Hkv`` query heads.

    Equivalent PyTorch: ``softmax(scale * q @ K[idx].T + log_weight) @ V[idx]`` with its log-sum-exp.
    """
    b, hq, d = q.shape
    hkv = host.k_pool.shape[0]
    g = hq // hkv
    kk = selection.k
    scale = default_scale(d) if scale is None else scale
    if kk == 0 or host.k_pool.shape[1] == 0:  # nothing selected, or nothing stored (every index is -1)
        return PartialAttention.empty(b, hq, d, device=q.device, dtype=compute_dtype)
    rows = host.rows(selection.indices)  # [B, Hkv, k]
    head = torch.arange(hkv, device=rows.device).view(1, hkv, 1)
    keys = host.k_pool[head, rows].to(compute_dtype)  # [B, Hkv, k, D]
    vals = host.v_pool[head, rows].to(compute_dtype)
    qg = q.to(compute_dtype).reshape(b, hkv, g, d)
    scores = torch.matmul(qg, keys.transpose(-1, -2)) * scale  # [B, Hkv, G, k]
    if selection.log_weight is not None:
        scores = scores + selection.log_weight.to(compute_dtype).reshape(b, hkv, g, kk)
    valid = (selection.indices >= 0).unsqueeze(2)  # [B, Hkv, 1, k]
    return partial_from_scores(scores, vals, valid)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    compute_dtype: torch.dtype = torch.float32,
) -> PartialAttention:
    """Full decode attention over all tokens of each sequence (the ground truth hetero approximates).

    q: ``[B, Hq, D]``; k, v: ``[B, Hkv, N, D]``; lengths ``[B]`` (default: all N valid).
    """
    if lengths is None:
        lengths = torch.full((q.shape[0],), k.shape[2], dtype=torch.long)
    return window_attention(q, k, v, lengths, scale=scale, compute_dtype=compute_dtype)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None
) -> torch.Tensor:
    """Dense causal attention for a prompt (prefill helper), in the query dtype.

    q: ``[B, Hq, T, D]``; k, v: ``[B, Hkv, T, D]``, ``Hq = G * Hkv``, one device. Returns ``[B, Hq, T, D]``.
    Equivalent PyTorch: ``sdpa(q, k, v, is_causal=True, enable_gqa=True)``.
    """
    check_kv(k, v, layout="[B, Hkv, T, D]")
    check_tensor(q, "q", 4, "[B, Hq, T, D]")
    check_float(q, "q")
    check_scale(scale)
    b, hq, t, d = q.shape
    if b == 0:  # as the other ops refuse it
        raise ShapeError("empty batch: q has B = 0")
    if (b, t, d) != (k.shape[0], k.shape[2], k.shape[3]) or hq == 0 or hq % k.shape[1] or q.device != k.device:
        raise ShapeError(f"q {tuple(q.shape)} on {q.device} and k {tuple(k.shape)} on {k.device}: expected q [B, Hq, T, "
                         "D] and k, v [B, Hkv, T, D] with the same B, T and D, Hq a positive multiple of Hkv, one "
                         "device")
    for x, name in ((q, "q"), (k, "k"), (v, "v")):  # SDPA would give a silent row of zeros, or NaN
        check_in_range(x, name)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.to(q.dtype), v.to(q.dtype), is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
