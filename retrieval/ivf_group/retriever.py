"""The ivf-group retriever: one ``SeqIndex`` per sequence, searched by the C++ kernel (or its PyTorch reference)."""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from hetero import native
from hetero.config import MAX_THREADS, SEED_RANGE
from hetero.errors import InvalidValueError, UnsupportedError
from hetero.native_pool import RunnerBacked
from hetero.reference import partial_from_scores
from hetero.types import PartialAttention, Selection
from hetero.validation import check_finite

from ..base import Option, Retriever, flat_k, pad_rows, selection_from_groups, topk_group
from ..ivf_rules import IVF_OPTIONS, IVFLifecycle
from .codes import TAIL_TOKENS, QueryCodes, code_layout, flush_phase
from .index import SeqIndex, _Addrs
from .reference import estimate_torch, search_torch

_warned = False


class IVFGroupRetriever(IVFLifecycle, RunnerBacked, Retriever):
    """IVF over 4-bit (or 8-bit) codes, each probed list read once per GQA group, and with ``estimate`` (default)
    the unselected tokens estimated from their lists' means (see the package docstring)."""

    name = "ivf-group"
    pool, phase = "cpp search", "retrieve"
    native_kind = 2
    value_limit = 1e15  # k-means distances, code ranges and list sums stay far inside float32
    options = dict(IVF_OPTIONS, threads=Option(1, kind="int", low=1, high=MAX_THREADS),
                   seed=Option(1234, kind="int", low=SEED_RANGE[0], high=SEED_RANGE[1]),
                   code_bits=Option(4, kind="choice", choices=(4, 8)), estimate=Option(True, kind="bool"))

    def __init__(self, host, group_rule: str = "union", **options: Any):
        super().__init__(host, group_rule, **options)
        reasons = self.geometry_reasons(host.head_dim)
        if reasons:
            raise UnsupportedError(reasons[0])
        self.init_lifecycle(host.batch)
        self.seed, self.code_bits, self.estimate = self.opts["seed"], self.opts["code_bits"], self.opts["estimate"]
        self._seqs: List[Optional[SeqIndex]] = [None] * host.batch
        self._buffers = None  # _search_cpp's outputs kept between calls
        # float32 copies of a decode step's keys and values on their way into the index (_staged)
        self._stage = torch.empty(2, host.kv_heads * (TAIL_TOKENS // 4) * host.head_dim)
        self._runner = native.new_runner(self.opts["threads"])
        self._search_runner = self._runner  # the pool a search runs on (use_runner)
        if self._runner is None:
            global _warned
            if not _warned:
                warnings.warn(f"hetero: {native.load_error()}; ivf-group searches in PyTorch (slow)", stacklevel=2)
                _warned = True
        # what the C++ decode step reads (native_tables): per item b * Hkv + h, the addresses of that sequence's
        # index arrays (SeqIndex.pointers' order) and its lists (0: not built)
        items = host.batch * host.kv_heads
        self._tables = np.zeros((len(_Addrs._fields), items), dtype=np.uint64)
        self._nlists = np.zeros(items, dtype=np.int64)
        self.native_version = 0  # changes when the tables' shape facts change (the layer's descriptor is rebuilt)
        self._max_lists = 1
        self._ready = False

    # ---- index life cycle ---------------------------------------------------------------------------
    def _add(self, seq: int, keys: torch.Tensor) -> None:
        new_total = int(self.ntotal_array[seq]) + keys.shape[1]
        index = self._seqs[seq]
        if self.build_due(seq, new_total):
            if self.host.length[seq] < new_total:
                raise InvalidValueError(f"retriever out of sync with the host tier: {self.host.length[seq]} "
                                        f"tokens stored, {new_total} to index")
            # the tier's own rows (views), converted per head inside; its values passed the cache's checks
            built = SeqIndex(self.host.keys(seq, 0, new_total), self.host.values(seq, 0, new_total),
                             self.nlist_for(new_total), self.seed, self.code_bits,
                             check=lambda x: check_finite(x, "the keys added to the ivf-group index"),
                             runner=self._runner, flush_phase=flush_phase(self.layer_idx))
            self._seqs[seq] = built
            self.set_trained(seq, new_total)
        elif index is not None:
            first, n = int(self.ntotal_array[seq]), keys.shape[1]
            values = self.host.values(seq, first, first + n)
            if n <= TAIL_TOKENS // 4:  # a decode step's add (maybe a tail flush): float32 in reused buffers
                x, v = self._staged(keys, 0), self._staged(values, 1)
            else:
                x, v = keys.float().contiguous(), values.float().contiguous()
            check_finite(x, "the keys added to the ivf-group index")
            index.add(x, v, first)
        self._publish(seq)

    def _staged(self, x: torch.Tensor, which: int) -> torch.Tensor:
        """``x [Hkv, n, D]`` (n <= TAIL_TOKENS / 4) as float32 in buffer ``which`` (0 keys, 1 values), contiguous: a
        decode step's add allocates nothing."""
        return self._stage[which, :x.numel()].view(x.shape).copy_(x)

    def cheap_add(self, seq: int, n: int) -> bool:
        # into the tail list, or (natively) the tail assigned to lists and the keys into the emptied tail: ~2 ms at
        # 1024 lists x 8 heads (more in the rare flush that moves a full list and grows the arena), which the step
        # that adds them waits for anyway (the worker's hand-off costs ~0.7 ms more). The retriever's own pool
        # runs it: a Python search on the plan's shared pool is never held up behind another layer's build.
        index = self._seqs[seq]
        end = int(self.ntotal_array[seq]) + n
        if index is None or end > self.limit_array[seq]:
            return False
        return ((index.tail + n < TAIL_TOKENS and not index.flush_due(end, n))
                or (index.runner is not None and n <= TAIL_TOKENS // 4))

    def reset(self) -> None:
        super().reset()
        self.last_scanned = 0  # not the last C++ step's counts any more
        for seq in range(self.host.batch):
            self._reset_seq(seq)

    def _reset_seq(self, seq: int) -> None:
        self._seqs[seq] = None
        self.set_trained(seq, 0)
        self._publish(seq)

    def truncate(self, seq: int, n: int) -> None:
        n = min(n, int(self.ntotal_array[seq]))
        if self.rebuild_before(seq, n):
            return
        index = self._seqs[seq]
        if n == 0:
            self._reset_seq(seq)
        elif index is not None:
            index.truncate(n, lambda a, b: self.host.keys(seq, a, b).float(),
                           lambda a, b: self.host.values(seq, a, b).float())
            self._publish(seq)
        self.ntotal_array[seq] = n

    def next_cut(self, seq: int, cut: int) -> int:
        """Also each of the layer's flush points (``SeqIndex.flush_due``), where decode steps' tail list goes into
        the lists: the keys since the last one stay in the tail."""
        phase = self._seqs[seq].flush_phase
        flush = cut + 1 + (phase - cut - 1) % TAIL_TOKENS  # the next position p > cut with (p - phase) % 64 == 0
        return min(flush, super().next_cut(seq, cut))

    # ---- the C++ decode step's view of the index ----------------------------------------------------
    def _publish(self, seq: int) -> None:
        """Write sequence ``seq``'s array addresses into the tables the C++ decode step reads."""
        hkv = self.host.kv_heads
        rows = slice(seq * hkv, (seq + 1) * hkv)
        index = self._seqs[seq]
        if index is None:
            self._tables[:, rows] = 0
            self._nlists[rows] = 0
        else:
            index.pointers()
            for f, arr in enumerate(index.pointer_arrays()):
                self._tables[f, rows] = arr
            self._nlists[rows] = index.nlist + 1
        self._update_ready()
        most = int(self._nlists.max()) if self._nlists.size else 1
        if most > self._max_lists:
            self._max_lists = most
            self.native_version += 1

    @property
    def last_scanned(self) -> int:
        """Keys whose similarity to a query was computed in the last search: rows scanned x G (from the C++ step's
        counts when it searched last)."""
        if self._native_scanned is not None:
            return int(self._native_scanned.sum()) * self.last_group
        return self._last_scanned

    @last_scanned.setter
    def last_scanned(self, n: int) -> None:
        self._native_scanned, self._last_scanned = None, n

    def searched_natively(self, scanned: np.ndarray, group: int) -> None:
        """The C++ step searched last: ``scanned [items]`` (its workspace's rows scanned per item, read when asked)."""
        self._native_scanned, self.last_group = scanned, group

    def bytes_read(self, scanned: np.ndarray) -> int:
        """Codes and ids of the scanned rows, and per item the list directions (float16), mean norms, starts and
        counts that probing reads, and the mean values the estimate reads."""
        d = self.host.head_dim
        row = code_layout(d, self.code_bits)[1] + 4
        lists = self._nlists.astype(np.int64)
        per_list = 2 * d + 4 + 16 + (2 * d if self.estimate else 0)
        return int(np.asarray(scanned).sum()) * row + int(lists.sum()) * per_list

    def max_lists(self) -> int:
        """Lists (the tail included) of the largest sequence index: the probe workspace's row length."""
        return self._max_lists

    def native_tables(self) -> Dict[str, int]:
        t = {f"IVF_{name.upper()}": int(self._tables[i].ctypes.data) for i, name in enumerate(_Addrs._fields)}
        t.update(IVF_NLISTS=self._nlists.ctypes.data, IVF_MAX_LISTS=self._max_lists, IVF_TAIL_CAP=TAIL_TOKENS,
                 IVF_FLUSH_PHASE=flush_phase(self.layer_idx),
                 IVF_BITS=self.code_bits, IVF_DP=code_layout(self.host.head_dim, self.code_bits)[0],
                 IVF_PROBE_FACTOR=native.float_bits(self.probe_factor), IVF_ESTIMATE=int(self.estimate))
        return t

    def native_search_ready(self) -> bool:
        return self._ready

    @property
    def report_missed(self) -> bool:
        return self._report_missed

    @report_missed.setter
    def report_missed(self, on: bool) -> None:  # the adaptive budget's report needs the Python search
        self._report_missed = on
        if hasattr(self, "_seqs"):
            self._update_ready()

    @classmethod
    def geometry_reasons(cls, head_dim: int) -> List[str]:
        if head_dim > native.MAX_HEAD_DIM:
            return [f"ivf-group takes head_dim <= {native.MAX_HEAD_DIM} (its key codes and C++ search), got {head_dim}: "
                    "use retriever=\"ivf\", \"hnsw\" or \"exact\" for wider heads"]
        return []

    def use_runner(self, runner) -> None:
        self._search_runner = runner if runner is not None else self._runner

    def _update_ready(self) -> None:
        self._ready = (self._runner is not None and self.group_rule == "union" and not self.report_missed
                       and all(s is not None for s in self._seqs))

    def memory_bytes(self) -> int:
        return sum(s.nbytes() for s in self._seqs if s is not None)

    def buffers(self) -> List[Any]:
        return [a for s in self._seqs if s is not None
                for a in s.arenas_in_use() + [s.centroids_t, s.assign_t, s.ksum, s.vsum, s.vmean, s.mean_norm]]

    def bytes_per_token(self) -> int:
        return code_layout(self.host.head_dim, self.code_bits)[1] + 4  # codes + the int32 host position

    # ---- search -------------------------------------------------------------------------------------
    def probe_mask(self, index: SeqIndex, qg: torch.Tensor, ks: List[int], n: int) -> torch.Tensor:
        """Reference of the kernel's list choice: ``[Hkv, nlist + 1]`` uint8, the lists probed by any query of each
        KV head's group (``ks[h]``: keys per query of head h; each query probes its ``nprobe(k)`` best non-empty
        lists by ``q . centroid``), and the tail."""
        scores = np.matmul(qg.numpy(), index.centroids_t)                  # [Hkv, G, L]
        hkv, g, nlist = scores.shape
        live = index.count[:, :nlist] > 0                                  # [Hkv, L]: lists a crop left members in
        scores = np.where(live[:, None, :], scores, -np.inf)
        mask = np.zeros((hkv, nlist + 1), dtype=np.uint8)
        mask[:, nlist] = np.asarray(ks) > 0  # the tail (recent keys, not assigned yet) is always scanned
        nprobe = self.nprobe(ks, nlist, n)
        for p in set(nprobe) - {0}:
            heads = np.array([h for h in range(hkv) if nprobe[h] == p])
            best = np.argpartition(-scores[heads], p - 1, axis=2)[:, :, :p] if p < nlist else \
                np.broadcast_to(np.arange(nlist), (len(heads), g, nlist))
            mask[heads[:, None, None], best] = 1
        mask[:, :nlist] &= live
        return torch.from_numpy(mask)

    def prescale(self, index: SeqIndex, qg: torch.Tensor) -> QueryCodes:
        """``qg [Hkv, G, D]`` -> the queries in code space (``qs . codes = q . key - q . vmin``), quantized."""
        return QueryCodes.quantize(qg * index.step[:, None, :], index.dp)

    @property
    def scale(self) -> float:
        """The softmax scale the estimate and the missed-mass report use (LayerCache sets the layer's)."""
        return self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(self.host.head_dim)

    def _unselected_exact(self, seq: int, scores: torch.Tensor, found, per_head: List[int],
                          per_query: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """The estimate of a sequence whose index is not trained yet, computed exactly (its scan scored every
        key): out ``[Hq, D]`` and lse ``[Hq]`` of each query's attention over the host rows its selection left out
        (its KV head's union, or with ``per_query`` its own set); ``scores [Hkv, Ge, N]``: the queries estimated
        for against the sequence's host keys. A head without budget has no host part at all."""
        hkv, ge, n = scores.shape
        valid = torch.ones(hkv, ge, n, dtype=torch.bool)
        for h, ((ids, member), k) in enumerate(zip(found, per_head)):
            if k == 0:
                valid[h] = False
            elif per_query and member is not None:
                valid[h][:, ids.long()] = ~member
            else:
                valid[h][:, ids.long()] = False
        part = partial_from_scores(scores[None] * self.scale, self.host.values(seq).float()[None], valid[None])
        return part.out[0], part.lse[0]

    def _search(self, q: torch.Tensor, ks) -> Selection:
        hkv = self.host.kv_heads
        g = q.shape[1] // hkv
        ids, members, matrices, scanned = [], [], [], 0
        # the mass each query head's flat top-k leaves out, estimated over the scanned rows (per-head budgets)
        report = (self.report_missed and self.softmax_scale is not None and self._runner is not None
                  and (self.group_rule != "sum" or g == 1))
        missed_lse = torch.full((q.shape[0], q.shape[1]), float("-inf")) if report else None
        # the estimate of the unselected tokens, [B, Hq, D] / [B, Hq]; empty for a sequence with no search
        est = PartialAttention.empty(q.shape[0], q.shape[1], q.shape[2]) if self.estimate else None
        per_query = self.group_rule == "per-head" and g > 1
        for seq, per_head in enumerate(ks):
            n, index = int(self.ntotal_array[seq]), self._seqs[seq]
            qg = q[seq].reshape(hkv, g, -1)
            qe = None  # the queries estimated for, when they are not the searched ones
            if self.group_rule == "sum" and g > 1:
                qe, qg = qg.contiguous(), qg.sum(dim=1, keepdim=True)
            if not any(per_head):
                found = [(torch.empty(0, dtype=torch.int32), None)] * hkv
            elif index is None:  # not trained yet: exact scan of the few keys there are
                keys = self.host.keys(seq).float()
                scores = torch.bmm(qg, keys.transpose(1, 2))
                found = [topk_group(scores[h], k, "per-head" if self.group_rule == "per-head" else "union")
                         for h, k in enumerate(per_head)]
                scanned += sum(n * g for k in per_head if k)
                if est is not None:
                    est.out[seq], est.lse[seq] = self._unselected_exact(
                        seq, scores if qe is None else torch.bmm(qe, keys.transpose(1, 2)), found, per_head, per_query)
            else:
                est_seq = (est.out[seq], est.lse[seq]) if est is not None else None
                if self._runner is not None:
                    top, uni, cnt, rows, missed, _ = self._search_cpp(index, qg, per_head, n, flat_k(per_head), report,
                                                                      qe, est_seq)
                    if report:  # the codes' scores omit q . vmin: add it back, scaled
                        missed_lse[seq] = (missed + self.softmax_scale * (qg * index.vmin[:, None]).sum(-1)).flatten()
                else:
                    top, uni, cnt, rows = search_torch(index, self.prescale(index, qg),
                                                       self.probe_mask(index, qg, per_head, n), per_head, n)
                    if est_seq is not None:
                        out, lse = estimate_torch(index, qg if qe is None else qe, top, uni, cnt, per_query, self.scale)
                        est_seq[0].copy_(out.reshape(-1, out.shape[-1]))
                        est_seq[1].copy_(lse.flatten())
                scanned += int(rows.numpy().sum()) * g  # numpy: a torch reduction costs ~50 us with cold caches
                width = int(cnt.numpy().max())
                if self.group_rule != "per-head" or g == 1:  # the union rows as they are: no loop over heads
                    matrices.append(uni[:, :width])
                    continue
                found = [(uni[h, : cnt[h]], torch.stack([torch.isin(uni[h, : cnt[h]], t[t >= 0]) for t in top[h]]))
                         for h in range(hkv)]
            ids.append([f[0] for f in found]), members.append([f[1] for f in found])
            matrices.append(None)
        self.last_scanned = scanned
        self.last_missed_lse = missed_lse
        if all(m is not None for m in matrices):
            return Selection(pad_rows(matrices, hkv), estimate=est)
        for b, m in enumerate(matrices):  # mixed batch (a sequence not trained yet, or per-head membership)
            if m is not None:
                ids.insert(b, [row[row >= 0] for row in m])
                members.insert(b, [None] * hkv)
        return dataclasses.replace(selection_from_groups(ids, members, hkv, g), estimate=est)

    def _search_cpp(self, index: SeqIndex, qg: torch.Tensor, ks: List[int], n: int, k_ref: int = 0,
                    report_missed: bool = False, qe: Optional[torch.Tensor] = None,
                    est: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        """The C++ search (list choice and query quantization included, as ``probe_mask`` and ``prescale``):
        per-query top ids ``[Hkv, G, kmax]``, sorted union ``[Hkv, G*kmax]``, union sizes and rows scanned
        ``[Hkv]``, missed-mass estimates ``[Hkv, G]`` and the probe mask ``[Hkv, nlist + 1]`` it chose.
        est: optional contiguous float32 ``(out [Hkv * Ge, D], lse [Hkv * Ge])`` the estimate of the unselected
        tokens is written to, for the queries ``qe [Hkv, Ge, D]`` (default: ``qg``). The returned tensors are valid
        until the next search (buffers kept between calls; the union, which a Selection keeps, is fresh)."""
        hkv, g, _ = qg.shape
        dp = index.dp
        qg = qg.to(torch.float32).contiguous()
        kmax = max(ks)
        key = (hkv, g, kmax, index.nlist)
        if self._buffers is None or self._buffers[0] != key:  # ~8 allocations less per decode step
            self._buffers = (key, torch.empty(hkv, g, dtype=torch.float32),
                             torch.empty(hkv, index.nlist + 1, dtype=torch.uint8),
                             torch.empty(hkv, g, kmax, dtype=torch.int32), torch.empty(hkv, dtype=torch.int64),
                             torch.empty(hkv, dtype=torch.int64), np.empty((4, hkv), dtype=np.int64))
        _, missed, mask, top, cnt, rows, counts = self._buffers
        uni = torch.empty(hkv, g * kmax, dtype=torch.int32)
        counts[0], counts[1], counts[2], counts[3] = ks, n, k_ref, self.nprobe(ks, index.nlist, n)  # k, n, k_ref, nprobe
        base = counts.ctypes.data
        k_p, n_p, k_ref_p, nprobe_p = (base + 8 * hkv * i for i in range(4))
        a = index.pointers()
        est_args = (0, 0, 0, 0, 0, 0, 0, 0)
        if est is not None:
            qe = qg if qe is None else qe.to(torch.float32).contiguous()   # the same pointer: centroid scores reused
            est_args = (qe.data_ptr(), qe.shape[1], a.mean_norm, a.tail_ksum, a.vmean,
                        int(self.group_rule == "per-head" and g > 1), est[0].data_ptr(), est[1].data_ptr())
        lists = np.full(hkv, index.nlist + 1, dtype=np.int64)
        self._search_runner.ivf_search(
            qg.data_ptr(), qg.shape[2], a.centroids, nprobe_p, a.step, hkv, g, dp, index.bits,
            a.codes, a.ids, a.start, a.count, lists.ctypes.data, mask.shape[1], mask.data_ptr(), k_p, n_p,
            top.data_ptr(), kmax, uni.data_ptr(), cnt.data_ptr(), rows.data_ptr(), k_ref_p, float(self.scale),
            missed.data_ptr() if report_missed else 0, *est_args)
        return top, uni, cnt, rows, missed, mask
