"""faiss retrievers over the host tier: IVF-Flat, IVF-SQ8 (8-bit codes: no second float32 copy of every key)
and HNSW, inner-product metric, one index per (sequence, KV head).

Rules (documented defaults, all overridable through ``retriever_options``):

* GQA: each of the G query heads of a KV head's group searches for its own top-k; the shared selection is
  the union (``group_rule="union"``; ``"per-head"`` keeps each head on its own top-k through -inf
  log-weights), or one search with the summed query (``"sum"``: ranks by summed logits).
* Training, lists, retraining and the budget -> nprobe rule of the IVF retrievers: ``retrieval/ivf_rules.py``
  (shared with ``ivf-group``): nprobe grows with sqrt(k/N), not linearly, since a linear rule over-probes large
  budgets (on SmolLM2 at 8K it scanned 20 / 50 % of the lists at 2 / 5 % budgets for errors 1.11 / 1.02x exact
  top-k, where 10 / 25 % gave 1.28 / 1.16x). HNSW needs no training (built on the first add) and uses
  ``efSearch = max(k, ef_factor * k)`` (``ef_factor`` 2).
* ``last_scanned``: keys whose similarity faiss computed in the last search (its ``ndis`` counters).

Inputs are validated here, never left to faiss (its checks are asserts that ``python -O`` removes).
"""
from __future__ import annotations

import math
from typing import Any, List, Optional

import numpy as np
import torch

from hetero.config import MAX_THREADS
from hetero.errors import ConfigError, InvalidValueError
from hetero.types import Selection

from .base import Option, Retriever, selection_from_groups
from .ivf_rules import IVF_OPTIONS, IVFLifecycle


def _faiss():
    import faiss

    return faiss


class _FaissRetriever(Retriever):
    """Shared machinery: per (sequence, KV head) index, union/sum over the GQA group, validation. Subclasses say
    when a sequence's index is (re)built (``build_due``) and how (``_new_index``)."""

    value_limit = 1e15  # squared distances over head_dim <= 512 stay far inside float32

    options = {
        "ef_factor": Option(2.0, low=0.0, low_open=True),
        "M": Option(32, kind="int", low=2),
        "threads": Option(None, kind="int", low=1, high=MAX_THREADS, none_ok=True),
    }
    trains = True

    def __init__(self, host, group_rule: str = "union", **options: Any):
        super().__init__(host, group_rule, **options)
        self.ef_factor, self.M = float(self.opts["ef_factor"]), self.opts["M"]
        if self.opts["threads"] is not None:
            _faiss().omp_set_num_threads(int(self.opts["threads"]))
        b, h = host.batch, host.kv_heads
        self._index: List[List[Any]] = [[None] * h for _ in range(b)]
        self.last_scanned = 0

    # ---- index life cycle ---------------------------------------------------------------------------
    def _new_index(self, n_train: int):
        raise NotImplementedError

    def build_due(self, seq: int, new_total: int) -> bool:
        return self._index[seq][0] is None

    def set_trained(self, seq: int, n: int) -> None:
        """Record that ``seq``'s index was (re)built on ``n`` keys (0: dropped)."""

    def _build(self, seq: int, upto: int) -> None:
        """(Re)build on the first ``upto`` host-tier keys of ``seq`` (with background indexing the tier may already
        hold later tokens, whose own adds are still queued). The new per-head indexes replace the old ones only once
        every head is built."""
        if self.host.length[seq] < upto:
            raise InvalidValueError(f"retriever out of sync with the host tier: {self.host.length[seq]} tokens "
                                    f"stored, {upto} to index")
        keys = self.host.keys(seq, 0, upto)  # [Hkv, N, D]
        built = []
        for h in range(self.host.kv_heads):
            x = _as_float32(keys[h])
            index = self._new_index(upto)
            if self.trains:
                index.train(x)
            index.add(x)
            built.append(index)
        self._index[seq] = built
        self.set_trained(seq, upto)

    def _add(self, seq: int, keys: torch.Tensor) -> None:
        new_total = int(self.ntotal_array[seq]) + keys.shape[1]
        if self.build_due(seq, new_total):
            self._build(seq, new_total)
        elif self._index[seq][0] is not None:
            arrays = [_as_float32(keys[h]) for h in range(self.host.kv_heads)]  # every check before any index grows
            for h, x in enumerate(arrays):
                self._index[seq][h].add(x)

    def reset(self) -> None:
        super().reset()
        for seq in range(self.host.batch):
            self._reset_seq(seq)

    def _reset_seq(self, seq: int) -> None:
        self._index[seq] = [None] * self.host.kv_heads
        self.set_trained(seq, 0)

    def truncate(self, seq: int, n: int) -> None:
        """IVF indexes drop the ids ``>= n`` in place (faiss numbers added vectors by position; the coarse quantizer
        stays as it was trained); HNSW marks them dead (``HNSWRetriever``)."""
        n = min(n, int(self.ntotal_array[seq]))
        if self.trains and n > 0 and self._index[seq][0] is not None:
            faiss = _faiss()
            for index in self._index[seq]:
                index.remove_ids(faiss.IDSelectorRange(n, int(self.ntotal_array[seq])))
            self.ntotal_array[seq] = n
            return
        super().truncate(seq, n)

    # ---- search -------------------------------------------------------------------------------------
    def _set_effort(self, index, k: int, n: int) -> None:
        raise NotImplementedError

    def _search(self, q: torch.Tensor, ks) -> Selection:
        faiss = _faiss()
        hkv = self.host.kv_heads
        g = q.shape[1] // hkv
        ids, members, scanned = [], [], 0
        for seq, per_head in enumerate(ks):
            n = int(self.ntotal_array[seq])
            ids.append([]), members.append([])
            for h, k in enumerate(per_head):
                if k == 0 or n == 0:
                    ids[-1].append(torch.empty(0, dtype=torch.int32)), members[-1].append(None)
                    continue
                qg = q[seq, h * g:(h + 1) * g].numpy()
                if self.group_rule == "sum" and g > 1:
                    qg = qg.sum(axis=0, keepdims=True)
                qg = np.ascontiguousarray(qg, dtype=np.float32)
                index = self._index[seq][h]
                if index is None or k >= n:  # not trained yet, or a budget covering the host tier: an exact scan
                    # (an HNSW graph search for as many keys as it holds may still miss some)
                    keys = _as_float32(self.host.keys(seq, 0, n)[h])
                    found = np.argsort(-(qg @ keys.T), axis=1, kind="stable")[:, :k]
                    scanned += n * qg.shape[0]
                else:
                    self._set_effort(index, k, n)
                    faiss.cvar.indexIVF_stats.reset()
                    faiss.cvar.hnsw_stats.reset()
                    found = self._query_index(seq, h, index, qg, self._candidates(k, n))
                    scanned += int(faiss.cvar.indexIVF_stats.ndis + faiss.cvar.hnsw_stats.ndis)
                    found, rescored = self._refine(seq, h, qg, found, k)
                    scanned += rescored
                union = np.unique(found[found >= 0])
                member = None
                if self.group_rule == "per-head" and g > 1:
                    member = torch.from_numpy(np.stack([np.isin(union, row[row >= 0]) for row in found]))
                ids[-1].append(torch.from_numpy(union.astype(np.int32))), members[-1].append(member)
        self.last_scanned = scanned
        if self.group_rule == "sum":  # faiss scored one summed query per KV head
            self.last_group = 1
        return selection_from_groups(ids, members, hkv, g)

    def _candidates(self, k: int, n: int) -> int:
        return k

    def _query_index(self, seq: int, h: int, index, qg: np.ndarray, k: int) -> np.ndarray:
        """Ids ``[G, k]`` (-1 padded) of the best keys of ``qg [G, D]`` in head h's index of ``seq``."""
        return index.search(qg, k)[1]

    def _refine(self, seq: int, h: int, qg: np.ndarray, found: np.ndarray, k: int):
        """Re-rank candidates ``[G, k']``; returns (ids ``[G, <=k]``, keys whose exact score was computed)."""
        return found, 0

    def memory_bytes(self) -> int:
        total = 0
        for per_seq in self._index:
            for index in per_seq:
                if index is not None:
                    total += index.ntotal * self.bytes_per_token()
        return total

    def bytes_per_token(self) -> int:
        raise NotImplementedError


def _as_float32(x: torch.Tensor) -> np.ndarray:
    arr = np.ascontiguousarray(x.to(torch.float32).numpy())
    if not np.isfinite(arr).all():
        raise InvalidValueError("keys handed to the faiss index contain NaN or inf")
    return arr


class IVFRetriever(IVFLifecycle, _FaissRetriever):
    """IVF with exact float32 vectors in the lists (``IndexIVFFlat``, inner product)."""

    name = "ivf"
    options = dict(_FaissRetriever.options, **IVF_OPTIONS)
    codes = "Flat"

    def __init__(self, host, group_rule: str = "union", **options: Any):
        super().__init__(host, group_rule, **options)
        self.init_lifecycle(host.batch)
        # Per (sequence, KV head): the keys in each list while some are empty, else None. faiss probes the nprobe
        # lists nearest the query whatever they hold, so a query whose nearest lists held only cropped keys (a later
        # topic) found nothing; with these sizes the empty lists are passed over.
        self._list_sizes: List[List[Any]] = [[None] * host.kv_heads for _ in range(host.batch)]

    def _build(self, seq: int, upto: int) -> None:
        super()._build(seq, upto)
        self._list_sizes[seq] = [self._empty_lists_sizes(index) for index in self._index[seq]]

    def _reset_seq(self, seq: int) -> None:
        super()._reset_seq(seq)
        self._list_sizes[seq] = [None] * self.host.kv_heads

    def _add(self, seq: int, keys: torch.Tensor) -> None:
        rebuilt = self.build_due(seq, int(self.ntotal_array[seq]) + keys.shape[1])
        super()._add(seq, keys)
        if rebuilt:
            return
        for h, sizes in enumerate(self._list_sizes[seq]):
            if sizes is not None:  # the lists faiss's add put the keys in (it assigns them the same way)
                ivf = _faiss().extract_index_ivf(self._index[seq][h])
                np.add.at(sizes, ivf.quantizer.assign(_as_float32(keys[h]), 1).ravel(), 1)
                if sizes.all():  # refilled: faiss's own probe is right again
                    self._list_sizes[seq][h] = None

    def truncate(self, seq: int, n: int) -> None:
        if not self.rebuild_before(seq, min(n, int(self.ntotal_array[seq]))):
            super().truncate(seq, n)
        self._list_sizes[seq] = [self._empty_lists_sizes(index) for index in self._index[seq]]

    @staticmethod
    def _empty_lists_sizes(index) -> Optional[np.ndarray]:
        """The keys in each of ``index``'s lists when some are empty (k-means can leave lists empty on
        near-identical keys; a crop empties lists), else None."""
        if index is None:
            return None
        lists = _faiss().extract_index_ivf(index).invlists
        sizes = np.array([lists.list_size(i) for i in range(lists.nlist)], dtype=np.int64)
        return None if sizes.all() else sizes

    def _query_index(self, seq: int, h: int, index, qg: np.ndarray, k: int) -> np.ndarray:
        sizes = self._list_sizes[seq][h]
        if sizes is None:  # no list is empty
            return super()._query_index(seq, h, index, qg, k)
        ivf = _faiss().extract_index_ivf(index)
        empty = int((sizes == 0).sum())
        want = min(index.nprobe, sizes.size - empty)
        if want == 0:
            return np.full((qg.shape[0], k), -1, dtype=np.int64)
        dist, lists = ivf.quantizer.search(qg, min(sizes.size, index.nprobe + empty))
        live = (lists >= 0) & (sizes[np.maximum(lists, 0)] > 0)
        order = np.argsort(~live, axis=1, kind="stable")[:, :want]  # each query's nearest non-empty lists
        # faiss takes [G, nprobe] lists: the columns past `want` (fewer non-empty lists than nprobe) are -1, skipped
        chosen = np.full((qg.shape[0], index.nprobe), -1, dtype=np.int64)
        chosen_dist = np.zeros((qg.shape[0], index.nprobe), dtype=np.float32)
        chosen[:, :want] = np.take_along_axis(lists, order, 1)
        chosen_dist[:, :want] = np.take_along_axis(dist, order, 1)
        return index.search_preassigned(qg, k, chosen, chosen_dist)[1]

    def _new_index(self, n_train: int):
        faiss = _faiss()
        index = faiss.index_factory(self.host.head_dim, f"IVF{self.nlist_for(n_train)},{self.codes}",
                                    faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.cp.min_points_per_centroid = 1  # small tiers: no 39-per-list warning
        if hasattr(ivf, "pq"):  # nor from the product quantizer's own k-means (16 centroids per sub-quantizer)
            ivf.pq.cp.min_points_per_centroid = 1
        ivf.cp.spherical = True
        ivf.cp.niter = 10
        ivf.cp.max_points_per_centroid = 32
        return index

    def _set_effort(self, index, k: int, n: int) -> None:
        index.nprobe = self.nprobe([k], index.nlist, n)[0]

    def bytes_per_token(self) -> int:
        return 4 * self.host.head_dim + 8  # float32 vector + int64 id


class IVFSQ8Retriever(IVFRetriever):
    """IVF with 8-bit scalar-quantized codes (``IndexIVFScalarQuantizer`` QT_8bit): 1 byte per dimension."""

    name = "ivf-sq8"
    codes = "SQ8"

    def bytes_per_token(self) -> int:
        return self.host.head_dim + 8


class IVFPQRetriever(IVFRetriever):
    """IVF with 4-bit product-quantization fast-scan codes (``IVF{nlist},PQ{D/2}x4fs``: 2 dimensions per
    sub-quantizer, ``D/4`` bytes per key, scanned with SIMD lookup tables), then exact re-ranking: each query
    head's ``rerank x k`` best candidates by PQ score are re-scored with the exact keys from the host tier
    (counted in ``last_scanned``) and the top k kept. Option ``rerank`` (default 2; 1 keeps PQ ranking)."""

    name = "ivf-pq"

    # faiss's 4-bit product quantizer trains 16 centroids per sub-quantizer: fewer training keys fail every build
    options = dict(IVFRetriever.options, rerank=Option(2.0, low=1.0), min_train=Option(256, kind="int", low=16))

    def __init__(self, host, group_rule: str = "union", **options: Any):
        super().__init__(host, group_rule, **options)
        if host.head_dim % 2:
            raise ConfigError(f"ivf-pq needs an even head_dim, got {host.head_dim}")
        self.rerank = float(self.opts["rerank"])
        self.codes = f"PQ{host.head_dim // 2}x4fs"

    def _candidates(self, k: int, n: int) -> int:
        return min(n, int(math.ceil(self.rerank * k)))

    def _refine(self, seq: int, h: int, qg: np.ndarray, found: np.ndarray, k: int):
        if found.shape[1] <= k:
            return found, 0
        ids = torch.from_numpy(found).clamp_min(0)
        keys = self.host.keys(seq)[h]  # [N, D] (a view for a sequence stored in consecutive blocks)
        cand = keys[ids.flatten()].float().view(ids.shape[0], ids.shape[1], -1)  # [G, k', D]
        scores = torch.einsum("gd,gkd->gk", torch.from_numpy(qg), cand)
        valid = torch.from_numpy(found >= 0)
        scores = torch.where(valid, scores, torch.full_like(scores, float("-inf")))
        best = scores.topk(k, dim=1).indices
        # fewer than k candidates: the padding stays -1 (its clamped id 0 would select row 0 unfound)
        chosen = torch.where(torch.gather(valid, 1, best), torch.gather(ids, 1, best), -1)
        return chosen.numpy(), int(valid.sum())

    def bytes_per_token(self) -> int:
        return self.host.head_dim // 4 + 8


class HNSWRetriever(_FaissRetriever):
    """HNSW graph over float32 keys (``IndexHNSWFlat``, inner product); needs no training.

    A graph cannot drop nodes, so ``truncate`` (a crop: rejected drafts, prompt lookup) marks the cropped keys dead
    instead of rebuilding the graph (a rebuild per crop took 43 of 55 s of a prompt-lookup generate, and its batch
    insertion gave another graph than the one grown token by token): searches skip them (a faiss ``IDSelector``)
    and keys added later get new graph ids, mapped back to their host positions. The graph is rebuilt from the live
    keys once the dead ones outnumber them.
    """

    name = "hnsw"
    trains = False

    def __init__(self, host, group_rule: str = "union", **options: Any):
        super().__init__(host, group_rule, **options)
        # per sequence: the host position of each graph id (-1: cropped), None while they are the same
        self._positions: List[Optional[np.ndarray]] = [None] * host.batch
        self._live_bits: List[Optional[np.ndarray]] = [None] * host.batch  # packed: graph ids searches may return

    def _new_index(self, n_train: int):
        faiss = _faiss()
        index = faiss.IndexHNSWFlat(self.host.head_dim, self.M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 128
        return index

    def _build(self, seq: int, upto: int) -> None:
        super()._build(seq, upto)
        self._positions[seq] = self._live_bits[seq] = None

    def _reset_seq(self, seq: int) -> None:
        super()._reset_seq(seq)
        self._positions[seq] = self._live_bits[seq] = None

    def _add(self, seq: int, keys: torch.Tensor) -> None:
        first, built = int(self.ntotal_array[seq]), self._index[seq][0] is not None
        super()._add(seq, keys)
        pos = self._positions[seq]
        if built and pos is not None:  # the new graph ids hold the next host positions
            self._set_positions(seq, np.concatenate([pos, np.arange(first, first + keys.shape[1])]))

    def _set_positions(self, seq: int, pos: np.ndarray) -> None:
        self._positions[seq] = pos
        self._live_bits[seq] = np.packbits(pos >= 0, bitorder="little")

    def truncate(self, seq: int, n: int) -> None:
        total = int(self.ntotal_array[seq])
        n = min(n, total)
        index = self._index[seq][0]
        if n == total:
            return
        if n == 0 or index is None:
            super().truncate(seq, n)
            return
        pos = self._positions[seq]
        pos = np.arange(index.ntotal) if pos is None else pos
        pos = np.where(pos < n, pos, -1)
        if 2 * int((pos < 0).sum()) > index.ntotal:  # more dead than live: a graph of the live keys alone
            super().truncate(seq, n)
            return
        self._set_positions(seq, pos)
        self.ntotal_array[seq] = n

    def _query_index(self, seq: int, h: int, index, qg: np.ndarray, k: int) -> np.ndarray:
        pos = self._positions[seq]
        if pos is None:
            return index.search(qg, k)[1]
        faiss = _faiss()
        bits = self._live_bits[seq]
        params = faiss.SearchParametersHNSW()
        params.efSearch = index.hnsw.efSearch
        params.sel = faiss.IDSelectorBitmap(len(pos), faiss.swig_ptr(bits))
        found = index.search(qg, k, params=params)[1]
        return np.where(found >= 0, pos[np.maximum(found, 0)], -1)

    def _set_effort(self, index, k: int, n: int) -> None:
        index.hnsw.efSearch = max(k, int(math.ceil(self.ef_factor * k)))

    def bytes_per_token(self) -> int:
        return 4 * self.host.head_dim + 2 * self.M * 4  # vector + level-0 links (upper levels are ~1/M of it)
