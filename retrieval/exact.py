"""Exhaustive retrievers: ``all`` (every host token, i.e. exact attention) and ``exact`` (brute-force
top-k, the recall oracle). Both read keys straight from the host tier and keep no index."""
from __future__ import annotations

from typing import List

import torch

from hetero.types import Selection

from .base import Retriever, pad_rows, topk_group

_SCORE_CHUNK = 32768  # tokens scored at once: bounds the float32 copy of the keys


class AllRetriever(Retriever):
    """Selects every host token, whatever the budget: the host part becomes exact attention."""

    name = "all"

    def _search(self, q: torch.Tensor, ks: List[int]) -> Selection:
        hkv = self.host.kv_heads
        rows = [torch.arange(n, dtype=torch.int32).expand(hkv, n) for n in self._ntotal]
        return Selection(pad_rows(rows, hkv))


class ExactTopK(Retriever):
    """Brute-force top-k by ``q . k`` over every host key of each KV head (exact, O(N) per query)."""

    name = "exact"

    def scores(self, q: torch.Tensor, seq: int) -> torch.Tensor:
        """``[Hkv, G, N]`` float32 logits (unscaled ``q . k``) of sequence ``seq``'s host keys."""
        hkv = self.host.kv_heads
        keys = self.host.keys(seq)
        n = keys.shape[1]
        qg = q[seq].reshape(hkv, -1, q.shape[-1])
        out = torch.empty(hkv, qg.shape[1], n, dtype=torch.float32)
        for start in range(0, n, _SCORE_CHUNK):
            stop = min(n, start + _SCORE_CHUNK)
            out[:, :, start:stop] = torch.matmul(qg, keys[:, start:stop].float().transpose(1, 2))
        return out

    def _search(self, q: torch.Tensor, ks: List[int]) -> Selection:
        rows = []
        for seq, k in enumerate(ks):
            if k == 0:
                rows.append(torch.empty(self.host.kv_heads, 0, dtype=torch.int32))
                continue
            rows.append(topk_group(self.scores(q, seq), k, self.group_rule))
        return Selection(pad_rows(rows, self.host.kv_heads))
