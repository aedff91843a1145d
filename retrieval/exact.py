"""Exhaustive retrievers: ``all`` (every host token, i.e. exact attention) and ``exact`` (brute-force
top-k, the recall oracle). Both read keys straight from the host tier and keep no index."""
from __future__ import annotations


import torch

from hetero.types import Selection

from .base import Retriever, flat_k, pad_rows, selection_from_groups, topk_group

_SCORE_CHUNK = 32768  # tokens scored at once: bounds the float32 copy of the keys


class _Exhaustive(Retriever):
    """A retriever that reads the host tier itself: its index is the token count (the native append keeps it)."""

    native_kind = 1

    def truncate(self, seq: int, n: int) -> None:
        self.ntotal_array[seq] = min(int(self.ntotal_array[seq]), n)


class AllRetriever(_Exhaustive):
    """Selects every host token, whatever the budget: the host part becomes exact attention."""

    name = "all"

    def _search(self, q: torch.Tensor, ks) -> Selection:
        hkv = self.host.kv_heads
        rows = [torch.arange(n, dtype=torch.int32).expand(hkv, n) for n in self.ntotal]
        self.last_scanned = 0
        return Selection(pad_rows(rows, hkv))


class ExactTopK(_Exhaustive):
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

    def _search(self, q: torch.Tensor, ks) -> Selection:
        hkv = self.host.kv_heads
        g = q.shape[1] // hkv
        ids, members, scanned = [], [], 0
        report = self.report_missed and self.softmax_scale is not None
        host_lse = torch.full((q.shape[0], q.shape[1]), float("-inf")) if report else None
        missed_lse = host_lse.clone() if report else None
        for seq, per_head in enumerate(ks):
            scores = self.scores(q, seq) if any(per_head) else None
            if report and scores is not None:
                host_lse[seq], missed_lse[seq] = _missed_mass(scores * self.softmax_scale, flat_k(per_head))
            ids.append([]), members.append([])
            for h, k in enumerate(per_head):
                if k == 0:
                    ids[-1].append(torch.empty(0, dtype=torch.int32)), members[-1].append(None)
                    continue
                scanned += int(self.ntotal_array[seq]) * g
                i, m = topk_group(scores[h], k, self.group_rule)
                ids[-1].append(i), members[-1].append(m)
        self.last_scanned = scanned
        self.last_host_lse, self.last_missed_lse = host_lse, missed_lse
        return selection_from_groups(ids, members, hkv, g)


def _missed_mass(logits: torch.Tensor, k_ref: int):
    """logits ``[Hkv, G, N]`` (scaled) -> (log host mass, log host mass outside each query's top k_ref), ``[Hq]``."""
    flat = logits.reshape(-1, logits.shape[-1])
    total = torch.logsumexp(flat, dim=1)
    k_ref = max(0, min(k_ref, flat.shape[1]))
    if k_ref == 0:
        return total, total
    if k_ref == flat.shape[1]:
        return total, torch.full_like(total, float("-inf"))
    rest = flat.topk(flat.shape[1] - k_ref, dim=1, largest=False).values
    return total, torch.logsumexp(rest, dim=1)
