"""The data contracts shared by every part of hetero (see DESIGN.md).

* ``PartialAttention`` -- attention over a subset of the keys, ready to be fused by log-sum-exp.
* ``Selection`` -- which host-tier rows the sparse part attends to, with optional importance weights.
* ``HostView`` -- the paged host-tier layout that host kernels read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class PartialAttention:
    """Attention of each query over one part of the keys.

    out: ``[B, Hq, D]`` float32, ``sum_j softmax(s)_j v_j`` over the part.
    lse: ``[B, Hq]`` float32, natural-log ``log sum_j exp(s_j)``, ``s_j = scale * q.k_j (+ bias_j)``.
    An empty part is ``out = 0, lse = -inf``.
    """

    out: torch.Tensor
    lse: torch.Tensor

    @staticmethod
    def empty(batch: int, heads: int, head_dim: int, device=None, dtype=torch.float32) -> "PartialAttention":
        """The neutral element of ``merge``: ``out = 0 [B,Hq,D]``, ``lse = -inf [B,Hq]``."""
        return PartialAttention(
            torch.zeros(batch, heads, head_dim, device=device, dtype=dtype),
            torch.full((batch, heads), float("-inf"), device=device, dtype=dtype),
        )


@dataclass(frozen=True)
class Selection:
    """Host-tier rows chosen by a retriever.

    indices: ``[B, Hkv, k]`` int32 positions into the host tier of sequence ``b`` (``-1`` = padding, skipped).
        Shared by the ``G = Hq // Hkv`` query heads of a KV head's group.
    log_weight: optional ``[B, Hq, k]`` float32 added to the logits (``-log w_j`` for importance sampling).
    estimate: optional ``PartialAttention`` (``out [B, Hq, D]``, ``lse [B, Hq]`` float32) over the host tokens the
        retriever did not select, estimated rather than read (``ivf-group``: from its lists' mean keys and values).
        The host part is the exact attention over ``indices`` merged with it; ``(0, -inf)`` where nothing is left.
    """

    indices: torch.Tensor
    log_weight: Optional[torch.Tensor] = None
    estimate: Optional[PartialAttention] = None

    @property
    def k(self) -> int:
        return int(self.indices.shape[-1])


@dataclass(frozen=True)
class HostView:
    """Read-only description of one layer's host tier, in the paged layout kernels consume.

    k_pool, v_pool: ``[Hkv, R, D]`` rows of all sequences (last dim contiguous; rows may be strided, e.g.
        views of a fused ``[Hkv, R, 2, D]`` pool); a block is ``block_tokens`` consecutive rows.
    block_table: ``[B, max_blocks]`` int32, block ids of sequence ``b`` in order (``-1`` unused).
    lengths: ``[B]`` int64 host tokens per sequence.
    Host position ``i`` of sequence ``b`` lives at row ``block_table[b, i // block_tokens] * block_tokens
    + i % block_tokens``.
    """

    k_pool: torch.Tensor
    v_pool: torch.Tensor
    block_table: torch.Tensor
    lengths: torch.Tensor
    block_tokens: int

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Physical pool rows ``[B, Hkv, k]`` int64 of host positions ``indices`` (``-1`` maps to the first row of the sequence's first
        block: a row to read in its place, whose weight the caller drops)."""
        idx = indices.long().clamp_min(0)
        blocks = torch.gather(
            self.block_table.long().unsqueeze(1).expand(-1, idx.shape[1], -1), 2, idx // self.block_tokens
        )
        return blocks.clamp_min(0) * self.block_tokens + idx % self.block_tokens
