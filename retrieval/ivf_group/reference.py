"""PyTorch references of the C++ grouped search and estimate (csrc/ivf/): the test oracles, and the search
``IVFGroupRetriever`` runs when the extension is not built."""
from __future__ import annotations

from typing import List, Tuple

import numpy as np
import torch

from .codes import QueryCodes, bf16_values
from .index import SeqIndex


def estimate_torch(index: SeqIndex, qe: torch.Tensor, top: torch.Tensor, uni: torch.Tensor, cnt: torch.Tensor,
                   per_query: bool, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of the kernel's estimate of the unselected tokens (float64 inside): ``qe [Hkv, Ge, D]``;
    ``top`` / ``uni`` / ``cnt`` as the search returns them (query g attends its own ``top[h, g]`` when
    ``per_query``, else the union). Each list's unattended members count at its mean key and mean value as the
    index stores them: the mean key a float16 direction times its norm (the tail's: its key sum / its size), the
    mean value in bfloat16. Returns
    ``out [Hkv, Ge, D]``, ``lse [Hkv, Ge]`` float32 (0 / -inf where nothing is left out)."""
    hkv, ge, d = qe.shape
    lists = index.nlist + 1
    out = torch.zeros(hkv, ge, d, dtype=torch.float64)
    lse = torch.full((hkv, ge), float("-inf"), dtype=torch.float64)
    n_tokens = max((int(index.ids[h, :int(index.used[h])].max()) + 1 for h in range(hkv) if index.used[h]), default=0)
    for h in range(hkv):
        where = torch.from_numpy(index.list_of(h, n_tokens))
        count = torch.from_numpy(index.count[h]).double()
        mean_k = torch.from_numpy(index.ksum[h]).double() / count.clamp_min(1)[:, None]   # [L + 1, D]
        mean_k[: index.nlist] = (torch.from_numpy(index.centroids_t[h].astype(np.float64)).T
                                 * torch.from_numpy(index.mean_norm[h]).double()[:, None])
        mean_v = torch.from_numpy(bf16_values(index.vmean[h])).double()                     # as stored: bfloat16
        for g in range(ge):
            rows = top[h, g] if per_query else uni[h, : int(cnt[h])]
            rows = rows[rows >= 0].long()
            rest = count - torch.bincount(where[rows], minlength=lists).double()
            logits = scale * (mean_k @ qe[h, g].double()) + torch.log(rest.clamp_min(1e-300))
            logits[rest <= 0] = float("-inf")
            if bool(torch.isfinite(logits).any()):
                lse[h, g] = torch.logsumexp(logits, 0)
                out[h, g] = torch.softmax(logits, 0) @ mean_v
    return out.float(), lse.float()


def search_torch(index: SeqIndex, qs: QueryCodes, mask: torch.Tensor, ks: List[int], n: int):
    """PyTorch reference of the C++ grouped search (same outputs: per-query top ids ``[Hkv, G, kmax]`` -1
    padded, sorted union ``[Hkv, G*kmax]`` -1 padded, union sizes ``[Hkv]``, rows scanned ``[Hkv]``). Ties
    go to the row scanned first, as in the kernel."""
    hkv, g, _ = qs.qi.shape
    kmax = max(ks)
    top = torch.full((hkv, g, kmax), -1, dtype=torch.int32)
    uni = torch.full((hkv, g * kmax), -1, dtype=torch.int32)
    cnt = torch.zeros(hkv, dtype=torch.int64)
    rows = torch.zeros(hkv, dtype=torch.int64)
    for h in range(hkv):
        lists = mask[h].nonzero().flatten().tolist()
        seg = [torch.arange(int(index.start[h, lst]), int(index.start[h, lst] + index.count[h, lst])) for lst in lists]
        pos = torch.cat(seg) if seg else torch.empty(0, dtype=torch.long)
        rows[h] = len(pos)
        k = min(ks[h], len(pos))
        if k == 0:
            continue
        scores = qs.scores(h, index.row_codes(h, pos.numpy()))             # [G, n_scan]
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
        best = torch.from_numpy(index.ids[h][pos.numpy()])[order]
        top[h, :, :k] = best
        u = torch.unique(best)
        uni[h, : len(u)], cnt[h] = u, len(u)
    return top, uni, cnt, rows
