"""``ivf-group``: an IVF index over 4-bit (or 8-bit) key codes whose probed lists are read once per GQA group.

faiss's IVF scans a list once per query; the G query heads of a KV head share their keys, so here every
list probed by any of them is read once and scored against all G (hetero's C++ kernel, ``csrc/ivf_*``), and
each query head keeps its exact top-k over every row scanned for the group. Per (sequence, KV head):

* Coarse quantizer: spherical k-means (faiss ``Kmeans``, 10 iterations, <= 32 training points per list),
  ``nlist`` = the power of two nearest ``6 sqrt(N)`` within [16, 1024], keys assigned by inner product.
* Codes: per-dimension min/max of the keys it was built on, ``code_bits`` (8 or 4) per dimension, uniform
  levels (``Dp`` = ``D`` rounded up to 16, or 32 for 4 bits; a key is ``Dp * code_bits / 8`` bytes plus a 4-byte
  host position; 4-bit codes pack dimension ``j`` and ``j + Dp / 2`` into byte ``j``). A query is pre-scaled and
  quantized to int8 (``QueryCodes``) so that ``q . key`` ~= a per-query constant + ``qscale * (qi . codes)``; the
  constant does not change a query's ranking, and the integer dot product (``vpdpbusd`` with AVX-512 VNNI) keeps
  the scan near the memory rate. Keys added later outside the range are clamped to it. 4-bit codes halve the
  bytes a search reads for a little accuracy (docs/performance.md, "Retrievers on real attention"). The arena
  stores rows in blocks of 16, transposed by 4-byte groups (``block_rows``), so one vector instruction scores
  16 rows against a broadcast query group with no horizontal sums.
* Recent keys: a decode step's evicted keys go to a tail list that every search scans, and are assigned to
  their lists (one batched centroid search) every ``TAIL_TOKENS`` (64) tokens; assigning each token on its
  own read all centroids (4 MB at 1024 lists x 8 heads x D 128) every step.
* Lists live in segments of one code arena with spare room (1/16 + 1 rows per list rounded up to a block of
  16, 1/16 at the end); a list that fills up moves to the arena's end with twice the room (the arena grows by
  half when needed), so a decode step's add is O(1). ``memory_bytes`` counts the whole arena, the centroids and
  the list statistics: 1.44x ``bytes_per_token`` at 128K tokens per head and head_dim 128 (the arena alone 1.19x),
  3.7x at 8K (1.63x; lists of ~16 keys padded to blocks of 16, and 2 x 512 lists x D floats of statistics).
* Probing: each query head ranks the lists by ``q . centroid`` and takes ``nprobe = ceil(nlist *
  min(1, probe_factor * sqrt(k / N)))``, the same rule as the faiss IVF retrievers; the group scans the union.
* Training and retraining as the faiss IVF retrievers: built on the first add that brings ``min_train``
  keys (exact scan before that), rebuilt from the host tier when it holds ``retrain_factor`` times the keys
  it was built on.
* Group rules: ``union`` (of the per-head top-k sets), ``per-head`` (the same rows, each head attends only
  its own top-k), ``sum`` (one search with the group's summed query).
* List statistics: each list keeps the sum of its members' keys and values; ``centroids_t`` holds each list's unit
  mean direction (float16; what probing ranks by; faiss's k-means centroids only assign new keys), and the mean
  key's norm and the mean value (bfloat16) sit beside it.
* Estimate of the rest (``estimate=True``, the default): the host tokens a search does not select still carry
  attention mass, and dropping them renormalizes the softmax over the selected ones. The search returns, with its
  Selection, attention over the unselected tokens estimated per list: each list's ``n`` unselected members count
  as ``n`` copies of its mean key and mean value (logit ``scale * q . mean_key + log n``), the lists' means fused
  exactly like real rows (RetroInfer's estimation zone, at list granularity). It reads one bfloat16 mean-value
  row per list (the centroid scores it reuses from probing). On real attention (SmolLM2, all layers, 1-5 %
  budgets) it cut the output error 2.3-3.4x; a Jensen correction from the lists' key variance made it worse there
  (docs/performance.md).

Without the C++ extension the same search runs in PyTorch (``search_torch``: the reference, much slower),
with a one-time warning.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, List, NamedTuple, Optional, Tuple

import numpy as np
import torch

from hetero import native
from hetero.errors import ConfigError, InvalidValueError
from hetero.memory import zeros_host
from hetero.native_pool import RunnerBacked
from hetero.types import PartialAttention, Selection
from hetero.validation import check_finite

from .base import Retriever, flat_k, pad_rows, selection_from_groups, topk_group
from .faiss_index import _nearest_pow2

TAIL_TOKENS = 64  # recent keys kept unassigned in the always-scanned tail list
_warned = False


BLOCK = 16  # arena rows per block of the transposed code layout (csrc/ivf_scan.h)


def code_layout(head_dim: int, bits: int) -> Tuple[int, int]:
    """``(Dp, row_bytes)``: head_dim padded for the kernels (to 16, or 32 for 4 bits) and the arena bytes per key."""
    align = 32 if bits == 4 else 16
    dp = -(-head_dim // align) * align
    return dp, dp * bits // 8


def _blocks(rows):
    """Rows (or a row count) rounded up to whole blocks."""
    return -(-rows // BLOCK) * BLOCK


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even: the C++ encode's float_to_bf16_bits, bit for bit."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def bf16_values(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits -> float32 values."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def block_rows(codes: np.ndarray) -> np.ndarray:
    """Code rows ``[n, row_bytes]`` uint8 in the arena's blocked layout: ``[ceil(n / 16), row_bytes / 4, 16, 4]``
    (block, 4-byte group, row in block, byte), zero rows padding the last block. This is the memory layout the
    kernels read (csrc/ivf_scan.h ``code_offset``)."""
    n, rb = codes.shape
    out = np.zeros((_blocks(n) // BLOCK, rb // 4, BLOCK, 4), dtype=np.uint8)
    rows = np.arange(n)
    out[rows // BLOCK, :, rows % BLOCK, :] = codes.reshape(n, rb // 4, 4)
    return out


class _Addrs(NamedTuple):
    """Addresses of uint64 ``[Hkv]`` arrays, one entry per head, that the C++ kernels take."""

    codes: int       # code arena, blocked layout (block_rows) uint8
    ids: int         # id arena [cap] int32
    start: int       # list starts [L + 1] int64
    count: int       # list sizes [L + 1] int64
    centroids: int   # unit mean directions [D, L] float16
    mean_norm: int   # |mean key| [L] float32
    vmean: int       # mean values [L + 1, D] bfloat16
    tail_ksum: int   # the tail list's key sum [D] float32
    tail_vsum: int   # the tail list's value sum [D] float32
    tail_vmean: int  # the tail list's mean value [D] bfloat16


class _SeqIndex:
    """One sequence's index, all KV heads: list directions (``centroids_t [Hkv, D, L]``), code ranges, list
    segments, list statistics.

    Built from ``keys, values [Hkv, n, D]`` in any float dtype (e.g. views of the host tier), converted to float32
    one head at a time into two buffers reused across heads: at 512K tokens x 8 heads x D 128 the build holds 0.5 GB
    of float32 instead of 4 GB (plus as much again in encoding temporaries), and frees little when it is done (on a
    VM that hands freed memory back to its host, reclaiming the old build's ~6 GB slowed the next decode steps 5-8x
    for tens of seconds). ``check``: called on each head's float32 keys (the caller's finiteness check)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, nlist: int, seed: int, bits: int = 8,
                 check=lambda x: None):
        import faiss

        hkv, n, d = keys.shape
        self.bits, self.levels = bits, (1 << bits) - 1
        self.dp, self.row_bytes = code_layout(d, bits)               # row_bytes: one key's codes in the arena
        # transposed (q @ centroids_t scores lists), float16: unit directions, half the bytes a search reads
        self.centroids_t = np.empty((hkv, d, nlist), dtype=np.float16)
        self.quantizers = []
        self.vmin = torch.empty(hkv, d)                              # [Hkv, D] code range per dimension
        self.step = torch.empty(hkv, d)
        kbuf, vbuf = torch.empty(n, d), torch.empty(n, d)            # one head's keys / values as float32
        assign = torch.empty(hkv, n, dtype=torch.long)
        for h in range(hkv):
            kbuf.copy_(keys[h])
            check(kbuf)
            km = faiss.Kmeans(d, nlist, niter=10, spherical=True, max_points_per_centroid=32,
                              min_points_per_centroid=1, seed=seed + h)
            km.train(kbuf.numpy())
            self.centroids_t[h] = km.centroids.T
            self.quantizers.append(km.index)  # IndexFlatIP over the centroids
            assign[h] = torch.from_numpy(km.index.search(kbuf.numpy(), 1)[1][:, 0])
            self.vmin[h] = kbuf.amin(dim=0)
            self.step[h] = ((kbuf.amax(dim=0) - self.vmin[h]) / self.levels).clamp_min(1e-12)
        self._vmin_np, self._inv_step_np = self.vmin.numpy(), (1.0 / self.step).numpy()
        self._range_addrs = (self._vmin_np.ctypes.data, self._inv_step_np.ctypes.data)  # [Hkv, D] float32 each
        counts = torch.stack([torch.bincount(a, minlength=nlist) for a in assign]).numpy()  # [Hkv, L]
        # List segments, numpy int64 [Hkv, L + 1] (a decode step touches single entries: cheap in numpy). The
        # last list is the tail: recent tokens, not assigned yet, scanned by every search.
        counts = np.concatenate([counts, np.zeros((hkv, 1), dtype=counts.dtype)], axis=1)
        # room for decode-step adds (a full list moves, see _relocate), whole blocks: every list starts on one
        self.cap = _blocks(counts + counts // 16 + 1)
        self.cap[:, nlist] = TAIL_TOKENS
        self.start = np.cumsum(self.cap, axis=1) - self.cap
        self.count = np.zeros_like(counts)
        self.used = self.cap.sum(axis=1)                             # arena rows handed out, per head
        self._alloc(_blocks(int(self.used.max()) + n // 16 + 64))
        self.tail_keys = torch.empty(hkv, TAIL_TOKENS, d)           # float keys of the tail, for assignment
        self.tail_values = torch.empty(hkv, TAIL_TOKENS, d)
        # Per (head, list), the tail list last: sums of the members' keys and values (float32 [Hkv, L + 1, D]), the
        # mean key's norm (float32 [Hkv, L]; its direction is centroids_t's column) and the mean value (bfloat16 bits
        # [Hkv, L + 1, D]: what the estimate reads, half the bytes of float32, ample for an estimate).
        self.ksum = np.zeros((hkv, nlist + 1, d), dtype=np.float32)
        self.vsum = np.zeros_like(self.ksum)
        self.vmean = np.zeros((hkv, nlist + 1, d), dtype=np.uint16)
        self.mean_norm = np.zeros((hkv, nlist), dtype=np.float32)
        ids = np.arange(n, dtype=np.int32)
        for h in range(hkv):
            kbuf.copy_(keys[h])
            vbuf.copy_(values[h])
            self._insert(kbuf[None], vbuf[None], ids, assign[h:h + 1], head0=h)

    @property
    def nlist(self) -> int:
        """Lists with a centroid (the tail list, index ``nlist``, has none)."""
        return self.centroids_t.shape[2]

    @property
    def tail(self) -> int:
        return int(self.count[0, self.nlist])

    def assign(self, keys: torch.Tensor) -> torch.Tensor:
        """Nearest list by inner product: ``keys [Hkv, n, D]`` -> ``[Hkv, n]`` int64 (faiss's blocked GEMM +
        argmax: 4x faster than torch.bmm + argmax over a prefill, and no ``[n, nlist]`` score matrix)."""
        if keys.shape[1] <= 16:  # a decode step's add: one small batched matmul (torch.bmm: 6.6 ms here, numpy 0.1)
            return torch.from_numpy(np.matmul(keys.numpy(), self.centroids_t).argmax(axis=2))
        out = torch.empty(keys.shape[:2], dtype=torch.long)
        for h, quantizer in enumerate(self.quantizers):
            out[h] = torch.from_numpy(quantizer.search(np.ascontiguousarray(keys[h].numpy()), 1)[1][:, 0])
        return out

    def encode(self, keys: torch.Tensor, head0: int = 0) -> np.ndarray:
        """``keys [H, n, D]`` float32 of heads ``head0 ..`` -> codes ``[H, n, row_bytes]`` uint8 (packed when 4-bit)."""
        hk, n, d = keys.shape
        vmin_np, inv_np = self._vmin_np[head0:head0 + hk, None], self._inv_step_np[head0:head0 + hk, None]
        if n <= TAIL_TOKENS:  # a tail flush: numpy's small-array ops cost a few us, torch's ~10
            x = np.rint((keys.numpy() - vmin_np) * inv_np)
            codes = np.zeros((hk, n, self.dp), dtype=np.uint8)
            codes[:, :, :d] = np.clip(x, 0, self.levels)
        else:  # the same float32 arithmetic, in chunks: a prefill's temporaries stay small
            vmin, inv = torch.from_numpy(vmin_np), torch.from_numpy(inv_np)
            codes8 = torch.zeros(hk, n, self.dp, dtype=torch.uint8)
            for s in range(0, n, 65536):
                x = keys[:, s:s + 65536] - vmin
                codes8[:, s:s + 65536, :d] = x.mul_(inv).round_().clamp_(0, self.levels)
            codes = codes8.numpy()
        if self.bits == 4:
            half = self.dp // 2
            return codes[..., :half] | (codes[..., half:] << 4)
        return codes

    def _alloc(self, rows: int) -> None:
        """Zeroed code and id arenas of ``rows`` rows (a multiple of BLOCK) per head, huge-page advised (lists are
        streamed): codes ``[Hkv, rows / 16, row_bytes / 4, 16, 4]`` (block_rows' layout), ids ``[Hkv, rows]``."""
        hkv = self.count.shape[0]
        self.codes = zeros_host((hkv, rows // BLOCK, self.row_bytes // 4, BLOCK, 4), torch.uint8).numpy()
        self.ids = zeros_host((hkv, rows), torch.int32).numpy()
        self._pointers = None

    @property
    def arena_rows(self) -> int:
        return self.codes.shape[1] * BLOCK

    def put_rows(self, heads: np.ndarray, rows: np.ndarray, codes: np.ndarray) -> None:
        """Write code rows ``codes [..., row_bytes]`` at arena rows ``rows`` of heads ``heads`` (broadcast together)."""
        self.codes[heads, rows // BLOCK, :, rows % BLOCK, :] = codes.reshape(*codes.shape[:-1], -1, 4)

    def row_codes(self, h: int, rows: np.ndarray) -> np.ndarray:
        """Head h's arena rows ``rows [n]`` as one 8-bit code per dimension: ``[n, Dp]`` uint8 (4-bit rows unpacked)."""
        codes = self.codes[h, rows // BLOCK, :, rows % BLOCK, :].reshape(len(rows), self.row_bytes)
        if self.bits == 8:
            return codes
        return np.concatenate([codes & 0x0F, codes >> 4], axis=-1)

    def add(self, keys: torch.Tensor, values: torch.Tensor, first_id: int) -> None:
        """Append ``keys, values [Hkv, n, D]`` float32 with host positions ``first_id ..`` (all heads at once). A
        decode step's few keys go to the tail list (no centroid read: that is 4 MB per step at 1024 lists x 8
        heads); the tail is assigned to lists in one batch when it holds ``TAIL_TOKENS`` keys, or before a large
        add."""
        hkv, n, _ = keys.shape
        t = self.tail
        if n > TAIL_TOKENS - t:
            self.flush()
            if n > TAIL_TOKENS // 4:
                self._insert(keys, values, np.arange(first_id, first_id + n, dtype=np.int32))
                return
            t = 0
        ext = native.load()
        tail = self.nlist
        if ext is not None and all(x.dtype == torch.float32 and x.is_contiguous() for x in (keys, values)):
            # one call instead of ~20 numpy operations (each 10-50 us on a decode step's cold caches)
            first_rows = self.start[:, tail] + t                         # [Hkv] int64: each head's own tail segment
            a = self.pointers()
            ext.ivf_encode_rows(keys.data_ptr(), hkv, n, keys.shape[2], *self._range_addrs, self.bits, self.dp,
                                a.codes, a.ids, first_rows.ctypes.data, first_id, values.data_ptr(), a.tail_ksum,
                                a.tail_vsum, a.tail_vmean, t + n)
        else:
            rows = self.start[:, tail, None] + t + np.arange(n)         # [Hkv, n]
            heads = np.arange(hkv)[:, None]
            self.put_rows(heads, rows, self.encode(keys))
            self.ids[heads, rows] = np.arange(first_id, first_id + n, dtype=np.int32)
            for j in range(n):  # one key at a time, in the kernel's order (the same float32 sums)
                self.ksum[:, tail] += keys[:, j].numpy()
                self.vsum[:, tail] += values[:, j].numpy()
            self.vmean[:, tail] = bf16_bits(self.vsum[:, tail] / np.float32(t + n))
        self.tail_keys[:, t:t + n] = keys
        self.tail_values[:, t:t + n] = values
        self.count[:, tail] += n
        if self.tail == TAIL_TOKENS:
            self.flush()

    def flush(self) -> None:
        """Assign the tail's keys to their lists."""
        t = self.tail
        if t == 0:
            return
        first = int(self.start[0, self.nlist])
        ids = self.ids[0, first:first + t].copy()  # the same positions in every head's tail
        self.count[:, self.nlist] = 0
        for stat in (self.ksum, self.vsum, self.vmean):
            stat[:, self.nlist] = 0
        self._insert(self.tail_keys[:, :t], self.tail_values[:, :t], ids)

    def _insert(self, keys: torch.Tensor, values: torch.Tensor, ids: np.ndarray,
                assign: Optional[torch.Tensor] = None, head0: int = 0) -> None:
        """Write ``keys [H, n, D]`` of heads ``head0 ..`` (host positions ``ids [n]``, values ``[H, n, D]``) into
        their lists and their lists' statistics; ``assign [H, n]`` their lists (default: computed)."""
        hkv, n, _ = keys.shape
        if assign is None:
            assign = self.assign(keys)
        codes = self.encode(keys, head0).reshape(hkv * n, self.row_bytes)
        lists = self.count.shape[1]
        # one slot per (head, list) pair in a flat [Hkv * nlist] view; group the new keys by pair
        pair = (assign + (head0 + torch.arange(hkv))[:, None] * lists).flatten().numpy()
        order = np.argsort(pair, kind="stable")
        pairs, first, sizes = np.unique(pair[order], return_index=True, return_counts=True)
        start, count, cap = self.start.reshape(-1), self.count.reshape(-1), self.cap.reshape(-1)  # views
        for p in pairs[count[pairs] + sizes > cap[pairs]]:  # overflowing lists move first (rare)
            self._relocate(int(p) // lists, int(p) % lists, int(count[p] + sizes[pairs == p][0]))
        rank = np.arange(len(order)) - np.repeat(first, sizes)
        dest = np.repeat(start[pairs] + count[pairs], sizes) + rank
        head = head0 + order // n
        self.put_rows(head, dest, codes[order])
        self.ids[head, dest] = ids[order % n]
        count[pairs] += sizes
        flat = torch.from_numpy(pair)
        d = keys.shape[2]
        torch.from_numpy(self.ksum).view(-1, d).index_add_(0, flat, keys.reshape(-1, d))
        torch.from_numpy(self.vsum).view(-1, d).index_add_(0, flat, values.reshape(-1, d))
        self._refresh(pairs)

    def _refresh(self, pairs: np.ndarray) -> None:
        """Recompute the mean value, the mean key's norm and unit direction of the (head, list) pairs ``pairs`` (flat
        ``head * (L + 1) + list``) from their sums; an empty list keeps its direction."""
        lists = self.count.shape[1]
        h, lst = pairs // lists, pairs % lists
        cnt = self.count[h, lst].astype(np.float32)
        inv = np.divide(np.float32(1.0), cnt, out=np.zeros_like(cnt), where=cnt > 0)
        self.vmean[h, lst] = bf16_bits(self.vsum[h, lst] * inv[:, None])
        ks = self.ksum[h, lst]
        norm = np.linalg.norm(ks, axis=1).astype(np.float32)
        own = lst < self.nlist  # the tail list has no direction (every search scans it)
        self.mean_norm[h[own], lst[own]] = norm[own] * inv[own]
        live = own & (norm > 0)
        self.centroids_t[h[live], :, lst[live]] = ks[live] / norm[live, None]

    def _relocate(self, h: int, lst: int, need: int) -> None:
        """Move list ``lst`` of head ``h`` to the arena's end with room for ``need`` rows (at least twice)."""
        cap = _blocks(max(2 * int(self.cap[h, lst]), need))
        if int(self.used[h]) + cap > self.arena_rows:
            self._grow(int(self.used[h]) + cap)
        old, new, cnt = int(self.start[h, lst]), int(self.used[h]), int(self.count[h, lst])
        blocks = _blocks(cnt) // BLOCK  # lists start on block boundaries: move whole blocks
        self.codes[h, new // BLOCK:new // BLOCK + blocks] = self.codes[h, old // BLOCK:old // BLOCK + blocks]
        self.ids[h, new:new + cnt] = self.ids[h, old:old + cnt]
        self.start[h, lst], self.cap[h, lst] = new, cap
        self.used[h] += cap

    def pointers(self) -> _Addrs:
        """Addresses of the uint64 ``[Hkv]`` arrays the kernels take (``_Addrs``). Cached until the arena is
        reallocated (numpy's ``.ctypes.data`` builds an object per access: ~10-20 us each on a decode step's cold
        caches)."""
        if self._pointers is None:
            tail = self.nlist

            def per_head(a, row=0):
                base = a.ctypes.data + row * a.strides[1]
                return (base + np.arange(a.shape[0], dtype=np.uint64) * np.uint64(a.strides[0])).astype(np.uint64)

            arrays = (per_head(self.codes), per_head(self.ids), per_head(self.start), per_head(self.count),
                      per_head(self.centroids_t), per_head(self.mean_norm), per_head(self.vmean),
                      per_head(self.ksum, tail), per_head(self.vsum, tail), per_head(self.vmean, tail))
            self._pointers = (arrays, _Addrs(*(a.ctypes.data for a in arrays)))  # the arrays keep them valid
        return self._pointers[1]

    def list_of(self, h: int, n_tokens: int) -> np.ndarray:
        """``[n_tokens]`` int64: the list (``L`` = the tail) holding each host position of head h, -1 if none."""
        out = np.full(n_tokens, -1, dtype=np.int64)
        for lst in range(self.nlist + 1):
            s = int(self.start[h, lst])
            out[self.ids[h, s:s + int(self.count[h, lst])]] = lst
        return out

    def _grow(self, rows: int) -> None:
        codes, ids = self.codes, self.ids
        self._alloc(_blocks(max(rows, self.arena_rows * 3 // 2)))
        self.codes[:, : codes.shape[1]] = codes
        self.ids[:, : ids.shape[1]] = ids

    def nbytes(self) -> int:
        return (self.codes.nbytes + self.ids.nbytes + 3 * self.centroids_t.nbytes + 3 * self.count.nbytes
                + 2 * self.tail_keys.numel() * 4  # centroids: ours (float16) and the faiss quantizers' (float32)
                + self.ksum.nbytes + self.vsum.nbytes + self.vmean.nbytes + self.mean_norm.nbytes)


class IVFGroupRetriever(RunnerBacked, Retriever):
    """IVF over 4-bit (or 8-bit) codes, each probed list read once per GQA group, and with ``estimate`` (default)
    the unselected tokens estimated from their lists' means (see the module docstring)."""

    name = "ivf-group"
    pool, phase = "cpp search", "retrieve"

    def __init__(self, host, group_rule: str = "union", probe_factor: float = 1.0, min_train: int = 256,
                 retrain_factor: float = 4.0, nlist: Optional[int] = None, threads: int = 1, seed: int = 1234,
                 code_bits: int = 4, estimate: bool = True, **options: Any):
        super().__init__(host, group_rule, **options)
        if not isinstance(estimate, bool):
            raise ConfigError(f"retriever option estimate={estimate!r} is not allowed: True or False")
        self.estimate = estimate
        for name, val, low in (("probe_factor", probe_factor, 0.0), ("retrain_factor", retrain_factor, 1.0)):
            if not isinstance(val, (int, float)) or not val > low:
                raise ConfigError(f"retriever option {name}={val!r} is not allowed: a number > {low}")
        for name, val in (("min_train", min_train), ("threads", threads)):
            if not isinstance(val, int) or val < 1:
                raise ConfigError(f"retriever option {name}={val!r} is not allowed: an int >= 1")
        if code_bits not in (4, 8) or isinstance(code_bits, bool):
            raise ConfigError(f"retriever option code_bits={code_bits!r} is not allowed: 4 or 8")
        if nlist is not None and (not isinstance(nlist, int) or nlist < 1):
            raise ConfigError(f"retriever option nlist={nlist!r} is not allowed: None or an int >= 1")
        self.probe_factor, self.min_train, self.retrain_factor = float(probe_factor), min_train, retrain_factor
        self.nlist_option, self.seed, self.code_bits = nlist, seed, code_bits
        self._seqs: List[Optional[_SeqIndex]] = [None] * host.batch
        self._trained_on = [0] * host.batch
        self._runner = None
        self._buffers = None  # _search_cpp's outputs kept between calls
        self._runner = native.new_runner(threads)
        if self._runner is None:
            global _warned
            if not _warned:
                warnings.warn(f"hetero: {native.load_error()}; ivf-group searches in PyTorch (slow)", stacklevel=2)
                _warned = True

    # ---- index life cycle ---------------------------------------------------------------------------
    def _nlist(self, n: int) -> int:
        return self.nlist_option or _nearest_pow2(6 * math.sqrt(n), 16, 1024)

    def _add(self, seq: int, keys: torch.Tensor) -> None:
        new_total = self._ntotal[seq] + keys.shape[1]
        index = self._seqs[seq]
        if (index is None and new_total >= self.min_train) or \
                (index is not None and new_total > self.retrain_factor * self._trained_on[seq]):
            if self.host.length[seq] < new_total:
                raise InvalidValueError(f"retriever out of sync with the host tier: {self.host.length[seq]} "
                                        f"tokens stored, {new_total} to index")
            # the tier's own rows (views), converted per head inside; its values passed the cache's checks
            self._seqs[seq] = _SeqIndex(self.host.keys(seq, 0, new_total), self.host.values(seq, 0, new_total),
                                        min(self._nlist(new_total), new_total), self.seed, self.code_bits,
                                        check=lambda x: check_finite(x, "the keys added to the ivf-group index"))
            self._trained_on[seq] = new_total
        elif index is not None:
            x = keys.float().contiguous()
            check_finite(x, "the keys added to the ivf-group index")
            first = self._ntotal[seq]
            index.add(x, self.host.values(seq, first, first + x.shape[1]).float().contiguous(), first)

    def cheap_add(self, seq: int, n: int) -> bool:
        index = self._seqs[seq]
        return (index is not None and index.tail + n < TAIL_TOKENS
                and self._ntotal[seq] + n <= self.retrain_factor * self._trained_on[seq])

    def reset(self) -> None:
        super().reset()
        self._seqs = [None] * self.host.batch
        self._trained_on = [0] * self.host.batch

    def memory_bytes(self) -> int:
        return sum(s.nbytes() for s in self._seqs if s is not None)

    def bytes_per_token(self) -> int:
        return code_layout(self.host.head_dim, self.code_bits)[1] + 4  # codes + the int32 host position

    # ---- search -------------------------------------------------------------------------------------
    def nprobe(self, ks: List[int], nlist: int, n: int) -> List[int]:
        """Lists each query of head h probes: ``ceil(nlist * min(1, probe_factor * sqrt(k / N)))``, 0 if k = 0."""
        return [0 if k == 0 else max(1, min(nlist, math.ceil(nlist * min(1.0, self.probe_factor * math.sqrt(k / n)))))
                for k in ks]

    def probe_mask(self, index: _SeqIndex, qg: torch.Tensor, ks: List[int], n: int) -> torch.Tensor:
        """Reference of the kernel's list choice: ``[Hkv, nlist + 1]`` uint8, the lists probed by any query of each
        KV head's group (``ks[h]``: keys per query of head h; each query probes its ``nprobe(k)`` best lists by
        ``q . centroid``), and the tail."""
        scores = np.matmul(qg.numpy(), index.centroids_t)                  # [Hkv, G, L]
        hkv, g, nlist = scores.shape
        mask = np.zeros((hkv, nlist + 1), dtype=np.uint8)
        mask[:, nlist] = np.asarray(ks) > 0  # the tail (recent keys, not assigned yet) is always scanned
        nprobe = self.nprobe(ks, nlist, n)
        for p in set(nprobe) - {0}:
            heads = np.array([h for h in range(hkv) if nprobe[h] == p])
            best = np.argpartition(-scores[heads], p - 1, axis=2)[:, :, :p] if p < nlist else \
                np.broadcast_to(np.arange(nlist), (len(heads), g, nlist))
            mask[heads[:, None, None], best] = 1
        return torch.from_numpy(mask)

    def prescale(self, index: _SeqIndex, qg: torch.Tensor) -> QueryCodes:
        """``qg [Hkv, G, D]`` -> the queries in code space (``qs . codes = q . key - q . vmin``), quantized."""
        return QueryCodes.quantize(qg * index.step[:, None, :], index.dp)

    @property
    def scale(self) -> float:
        """The softmax scale the estimate and the missed-mass report use (LayerCache sets the layer's)."""
        return self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(self.host.head_dim)

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
            n, index = self._ntotal[seq], self._seqs[seq]
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

    def _search_cpp(self, index: _SeqIndex, qg: torch.Tensor, ks: List[int], n: int, k_ref: int = 0,
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
        self._runner.ivf_search(
            qg.data_ptr(), qg.shape[2], a.centroids, nprobe_p, index.step.data_ptr(), hkv, g, dp, index.bits,
            a.codes, a.ids, a.start, a.count, mask.shape[1], mask.data_ptr(), k_p, n_p, top.data_ptr(), kmax,
            uni.data_ptr(), cnt.data_ptr(), rows.data_ptr(), k_ref_p, float(self.scale),
            missed.data_ptr() if report_missed else 0, *est_args)
        return top, uni, cnt, rows, missed, mask


class QueryCodes:
    """A group's queries in code space, quantized: ``qs [Hkv, G, Dp] ~= qscale[..., None] * qi``.

    qi: ``[Hkv, G, Dp]`` int8 in [-127, 127] (symmetric, per query: ``qscale = max |qs| / 127``), zero padded
    from D to Dp. qscale: ``[Hkv, G]`` float32. The ranking error this adds is a fraction of the codes' own
    (measured against 8-bit key codes on real attention, docs/performance.md; 4-bit codes are coarser still).
    """

    def __init__(self, qi: torch.Tensor, qscale: torch.Tensor):
        self.qi, self.qscale = qi, qscale

    @classmethod
    def quantize(cls, qs: torch.Tensor, dp: int) -> QueryCodes:
        x = qs.numpy()  # numpy: a decode step's few thousand values cost ~1 us per op here, torch's round ~300 us
        amax = np.abs(x).max(axis=-1)
        qscale = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
        qi = np.zeros((*x.shape[:-1], dp), dtype=np.int8)
        qi[..., : x.shape[-1]] = np.clip(np.rint(x / qscale[..., None]), -127, 127)
        return cls(torch.from_numpy(qi), torch.from_numpy(qscale))

    def scores(self, h: int, codes: np.ndarray) -> torch.Tensor:
        """``[G, n]`` float32 scores of KV head h's queries against ``codes [n, Dp]`` uint8, with the kernels'
        arithmetic: the exact integer dot product, converted to float32, times qscale."""
        dots = self.qi[h].to(torch.int64) @ torch.from_numpy(np.ascontiguousarray(codes)).to(torch.int64).T
        return dots.to(torch.float32) * self.qscale[h][:, None]


def estimate_torch(index: _SeqIndex, qe: torch.Tensor, top: torch.Tensor, uni: torch.Tensor, cnt: torch.Tensor,
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
    n_tokens = int(index.ids.max()) + 1 if index.ids.size else 0
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


def search_torch(index: _SeqIndex, qs: QueryCodes, mask: torch.Tensor, ks: List[int], n: int):
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
