"""Attention of a chunk of ``C >= 1`` query tokens over a layer's tiers and the chunk itself (DESIGN.md "Chunk
attention"): a prompt (or its chunks, ``prefill_chunk_size``), a new conversation turn into a warm cache, the draft
tokens of assisted decoding.

Queries ``q [B, Hq, C, D]`` at positions ``[p_b, p_b + C)`` of each sequence attend to every token before them —
the fast tier (sinks + window) and the host tier — and to the chunk's own tokens causally. Three parts per
sequence, fused by the same log-sum-exp rule as a decode step (now ``[B, Hq, C, D]`` / ``[B, Hq, C]``):

* fast tier: every valid slot (all are before the chunk), exact. For a chunk of at most ``sparse_chunk_tokens`` on
  the CPU, through the plan's window backend with the chunk's positions folded into its query heads, so that each
  fast-tier row is read once for all of them (a longer chunk is matrix work, for PyTorch's fused attention).
* host tier: exact for a chunk longer than ``HeteroConfig.sparse_chunk_tokens`` (a prompt or a long turn: every
  host row, in runs of the paged tier), or one of a chunked prefill that has passed that many tokens
  (``turn_tokens``), else as decode tokens attend it: each query through the retriever, its selection read by the
  host backend (with the retriever's estimate of the rest).
* the chunk: causal over its own keys and values, rounded to the cache's ``kv_dtype`` as they will be stored.

Exact parts run in PyTorch (``torch``'s fused CPU attention with its log-sum-exp where it exists, else matmuls); on
CUDA the host tier's runs are copied to the device for its part. The caller appends the chunk's K/V to the tiers
afterwards (``LayerCache.append``), as decode tokens enter them.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .merge import fuse
from .reference import partial_from_scores
from .types import PartialAttention
from .validation import check_in_range

_HOST_RUN = 32768  # host rows attended at once (bounds the device copy and the score matrix)


def partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      causal: bool = False) -> PartialAttention:
    """``q [Hq, C, D]`` over ``k, v [Hkv, N, D]`` (``Hq = G * Hkv``; causal needs ``N == C``): out ``[Hq, C, D]``
    float32, lse ``[Hq, C]`` natural log (``-inf``, out 0 where nothing is attended).

    Equivalent PyTorch: ``softmax(scale * q @ k.T (+ causal mask)) @ v`` with its log-sum-exp, per query head over
    the KV head of its group."""
    hq, c, d = q.shape
    if k.shape[1] == 0 or c == 0:
        return PartialAttention(torch.zeros(hq, c, d, device=q.device), torch.full((hq, c), float("-inf"),
                                                                                   device=q.device))
    dtype = q.dtype if q.dtype == k.dtype else torch.float32
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.to(dtype)[None], k.to(dtype)[None], v.to(dtype)[None], 0.0, causal, scale=scale)
        return PartialAttention(out[0].float(), lse[0].float())
    return _partial_attention_matmul(q, k, v, scale, causal)


def _partial_attention_matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                              causal: bool) -> PartialAttention:
    """``partial_attention`` off the CPU (no fused kernel returns the lse there): float32 scores of all G query heads
    of a KV head in one matmul, softmax and lse by ``hetero.reference``'s rule."""
    hq, c, d = q.shape
    hkv = k.shape[0]
    s = torch.matmul(q.float().reshape(hkv, hq // hkv * c, d), k.float().transpose(1, 2)) * scale  # [Hkv, G*C, N]
    if causal:  # query row (g, i) sees keys j <= i
        pos = torch.arange(c, device=q.device)
        valid = (pos[None, :] <= pos[:, None]).repeat(hq // hkv, 1)[None, None]  # [1, 1, G*C, N]
    else:
        valid = torch.ones(1, 1, 1, k.shape[1], dtype=torch.bool, device=q.device)
    part = partial_from_scores(s[None], v.float()[None], valid)
    return PartialAttention(part.out.reshape(hq, c, d), part.lse.reshape(hq, c))


def _stack(parts: Sequence[PartialAttention]) -> PartialAttention:
    return PartialAttention(torch.stack([p.out for p in parts]), torch.stack([p.lse for p in parts]))


def chunk_attention(runtime, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    lengths: Optional[List[int]] = None, turn_tokens: Optional[int] = None) -> torch.Tensor:
    """Attention of the chunk ``q [B, Hq, C, D]`` (post-RoPE) with its own keys and values ``k, v [B, Hkv, C, D]``
    over ``layer``'s tiers, before the chunk is appended. ``lengths``: the chunk's real (trailing) tokens per
    sequence when it is left-padded (the first prompt of a padded batch); padded query rows get 0. ``turn_tokens``:
    the tokens of the prompt or turn the chunk belongs to so far, itself included (a chunked prefill; None: the
    chunk's own C); the host tier is read sparsely only when they are at most ``sparse_chunk_tokens``. Returns
    ``[B, Hq, C, D]`` in q's dtype; a real row of q, k or v with NaN, inf or a value beyond ``VALUE_LIMIT`` is
    refused (``InvalidValueError``) before anything is attended."""
    b, hq, c, d = q.shape
    config = runtime.config
    scale = config.scale or d ** -0.5
    lengths = [c] * b if lengths is None else list(lengths)
    for seq, n in enumerate(lengths):  # as a decode step does (padding rows may hold anything)
        if n:
            for x, name in ((q, "q"), (k, "k"), (v, "v")):  # (the chunk's own k and v are attended too)
                check_in_range(x[seq, :, c - n:], name)
    if min(lengths) < c:  # zeros for the parts that take every row (the per-position search checks its query)
        q = q.clone()
        for seq, n in enumerate(lengths):
            q[seq, :, :c - n] = 0
    with layer.lock:  # the tiers and the index stay as they are while the chunk reads them
        if layer.initialized:
            layer.prepare_host_side()
        return _chunk_attention_locked(runtime, layer, q, k, v, lengths, scale, max(c, turn_tokens or 0))


def _chunk_attention_locked(runtime, layer, q, k, v, lengths: List[int], scale: float, turn: int) -> torch.Tensor:
    b, hq, c, d = q.shape
    config = runtime.config
    out = torch.zeros_like(q)
    # the chunk's own tokens as the cache will store them (rounded to kv_dtype), as a decode step reads its own
    stored = layer.dtype or config.torch_kv_dtype or k.dtype
    k, v = k.to(stored), v.to(stored)
    small = layer.initialized and turn <= config.sparse_chunk_tokens
    sparse = small and not layer.dense and bool(layer.host.length.any())
    host_parts = _sparse_host_parts(runtime, layer, q, scale) if sparse else None
    fast_parts = _fast_tier_parts(runtime, layer, q, scale) if small and q.device.type == "cpu" else None
    for seq, n in enumerate(lengths):
        if n == 0:
            continue
        qs, ks, vs = q[seq, :, c - n:], k[seq, :, c - n:], v[seq, :, c - n:]
        parts = [partial_attention(qs, ks, vs, scale, causal=True)]
        if layer.initialized:
            if fast_parts is not None:
                parts.append(PartialAttention(fast_parts.out[seq, :, c - n:], fast_parts.lse[seq, :, c - n:]))
            else:
                fk, fv = layer.fast.tokens(seq)
                parts.append(partial_attention(qs, fk, fv, scale))
            if host_parts is not None:
                parts.append(PartialAttention(host_parts.out[seq, :, c - n:], host_parts.lse[seq, :, c - n:]))
            elif not layer.dense and layer.host.length[seq]:
                parts.extend(_exact_host_parts(layer, seq, qs, scale))
        out[seq, :, c - n:] = fuse(parts).out.to(q.dtype)
    return out


def _exact_host_parts(layer, seq: int, q: torch.Tensor, scale: float) -> List[PartialAttention]:
    """The host tier of ``seq`` attended exactly, one part per run of consecutive pool rows (at most _HOST_RUN)."""
    host, parts = layer.host, []
    n = int(host.length[seq])
    for start in range(0, n, _HOST_RUN):
        stop = min(n, start + _HOST_RUN)
        for row, _, count in host._rows(seq, start, stop):
            kk, vv = host.k_pool[:, row:row + count], host.v_pool[:, row:row + count]
            if q.device.type != "cpu":
                kk, vv = kk.to(q.device, non_blocking=True), vv.to(q.device, non_blocking=True)
            parts.append(partial_attention(q, kk, vv, scale))
    return parts


def _fast_tier_parts(runtime, layer, q: torch.Tensor, scale: float) -> PartialAttention:
    """The fast tier for every query of the chunk ``q [B, Hq, C, D]`` through the plan's window backend, the C
    positions folded into the query heads (``[B, Hkv * G * C', D]``: a group of G * C' queries per KV head, C' as
    many positions as the backend's largest group takes), so that each fast-tier row is read once per call rather
    than once per position. ``[B, Hq, C, D]`` / ``[B, Hq, C]`` float32."""
    b, hq, c, d = q.shape
    hkv = layer.kv_heads
    g = hq // hkv
    window = runtime.plan(layer, hq, torch.float32).window
    span = c if window.max_group is None else max(1, window.max_group // g)
    fast, outs, lses = layer.fast, [], []
    for c0 in range(0, c, span):
        n = min(span, c - c0)
        folded = q[:, :, c0:c0 + n].float().reshape(b, hkv * g * n, d)  # head (h * G + g) * n + i: KV head h
        part = window(folded, fast.k, fast.v, fast.lengths, scale)
        outs.append(part.out.view(b, hq, n, d))
        lses.append(part.lse.view(b, hq, n))
    return PartialAttention(torch.cat(outs, dim=2), torch.cat(lses, dim=2))


def _sparse_host_parts(runtime, layer, q: torch.Tensor, scale: float) -> PartialAttention:
    """The host tier as decode tokens attend it, one query position at a time: ``[B, Hq, C, D]`` / ``[B, Hq, C]``."""
    b, hq, c, d = q.shape
    plan = runtime.plan(layer, hq, torch.float32)
    per_pos = []
    for i in range(c):
        qi = q[:, :, i].detach().float().cpu().contiguous()
        sel = plan.search(layer, qi)
        part = plan.host(qi, layer.host.view(), sel, scale)
        if sel.estimate is not None:
            part = fuse([part, sel.estimate])
        per_pos.append(part)
    stacked = _stack(per_pos)  # [C, B, Hq, D]
    return PartialAttention(stacked.out.permute(1, 2, 0, 3).to(q.device), stacked.lse.permute(1, 2, 0).to(q.device))
