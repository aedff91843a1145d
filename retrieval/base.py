"""The Retriever interface (DESIGN.md): incremental ``add``, ``search(q, budgets) -> Selection``."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, List, Sequence

import torch

from hetero.errors import DTypeError, InvalidValueError, ShapeError
from hetero.tiers import HostTier
from hetero.types import Selection


class Retriever(ABC):
    """Chooses host-tier rows for decode queries, one index per KV head.

    Bound to one layer's ``HostTier``; told about every token appended to it through ``add`` (in host
    order, right after the tier stored it). GQA: the ``G`` query heads of a KV head's group are searched
    together and share one selection (``group_rule``: ``"union"`` of per-head top-k, or ``"sum"`` of
    scores).
    """

    name: str = "?"

    def __init__(self, host: HostTier, group_rule: str = "union", **options: Any):
        if options:
            from hetero.errors import ConfigError

            raise ConfigError(f"retriever {self.name!r} takes no options {sorted(options)}")
        self.host = host
        self.group_rule = group_rule
        self._ntotal: List[int] = [0] * host.batch

    @property
    def ntotal(self) -> List[int]:
        """Tokens indexed per sequence (equals the host tier's length after every ``add``)."""
        return list(self._ntotal)

    def add(self, seq: int, keys: torch.Tensor) -> None:
        """Index ``keys [Hkv, n, D]``, host positions ``ntotal[seq] .. ntotal[seq] + n - 1`` of ``seq``."""
        self._add(seq, keys)
        self._ntotal[seq] += keys.shape[1]

    def _add(self, seq: int, keys: torch.Tensor) -> None:
        """Index structures update; exhaustive retrievers read the host tier and need none."""

    def reset(self) -> None:
        self._ntotal = [0] * self.host.batch

    def memory_bytes(self) -> int:
        """Bytes this retriever holds beyond the host tier itself."""
        return 0

    def search(self, q: torch.Tensor, budgets: Sequence[int]) -> Selection:
        """Select host rows for decode queries.

        q: ``[B, Hq, D]`` floating (searched in float32); budgets: ``B`` ints, keys per query head for
        each sequence; clamped to ``[0, ntotal[b]]``. Returns ``Selection`` with ``indices [B, Hkv, k]``
        int32, sorted ascending per row, ``-1`` padding at the end.
        """
        self._check_query(q, budgets)
        ks = [max(0, min(int(k), n)) for k, n in zip(budgets, self._ntotal)]
        return self._search(q.float(), ks)

    @abstractmethod
    def _search(self, q: torch.Tensor, ks: List[int]) -> Selection:
        ...

    def _check_query(self, q: torch.Tensor, budgets: Sequence[int]) -> None:
        if not isinstance(q, torch.Tensor) or q.dim() != 3:
            raise ShapeError(f"query must be [B, Hq, D], got {getattr(q, 'shape', type(q))}")
        b, hq, d = q.shape
        if b != self.host.batch or d != self.host.head_dim or hq % self.host.kv_heads:
            raise ShapeError(
                f"query {tuple(q.shape)} does not fit the host tier (batch {self.host.batch}, "
                f"{self.host.kv_heads} KV heads, head_dim {self.host.head_dim}): need [B, G*Hkv, D]"
            )
        if not q.is_floating_point():
            raise DTypeError(f"query must be floating point, got {q.dtype}")
        if len(budgets) != b or any(int(k) < 0 for k in budgets):
            raise InvalidValueError(f"budgets must be {b} ints >= 0, got {list(budgets)}")


def pad_rows(rows: List[torch.Tensor], kv_heads: int) -> torch.Tensor:
    """Stack per-sequence ``[Hkv, k_b]`` index tensors into ``[B, Hkv, max k_b]`` int32, padded with -1."""
    width = max((r.shape[-1] for r in rows), default=0)
    out = torch.full((len(rows), kv_heads, width), -1, dtype=torch.int32)
    for i, r in enumerate(rows):
        out[i, :, : r.shape[-1]] = r
    return out


def topk_group(scores: torch.Tensor, k: int, group_rule: str) -> torch.Tensor:
    """Shared rows for each KV head from its group's scores.

    scores: ``[Hkv, G, N]`` float; returns ``[Hkv, m]`` int32 sorted ascending, ``-1`` padded at the end:
    ``"sum"``: top-k of the group's summed scores (m = k). ``"union"``: union of every head's top-k
    (m = the largest union size, at most ``G * k``).
    """
    hkv, g, n = scores.shape
    if k == 0 or n == 0:
        return torch.empty(hkv, 0, dtype=torch.int32)
    if group_rule == "sum" or g == 1:
        idx = scores.sum(dim=1).topk(k, dim=-1, sorted=False).indices
        return idx.sort(dim=-1).values.to(torch.int32)
    idx = scores.topk(k, dim=-1, sorted=False).indices.reshape(hkv, g * k)
    idx = idx.sort(dim=-1).values
    dup = torch.zeros_like(idx, dtype=torch.bool)
    dup[:, 1:] = idx[:, 1:] == idx[:, :-1]
    idx = torch.where(dup, torch.full_like(idx, n), idx).sort(dim=-1).values  # duplicates to the end
    width = int((~dup).sum(dim=-1).max())
    idx = idx[:, :width]
    return torch.where(idx >= n, torch.full_like(idx, -1), idx).to(torch.int32)
