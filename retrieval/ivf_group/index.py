"""One sequence's ivf-group index (all KV heads): the code arena with its list segments, the list statistics, the
tail list of recent keys, and the pointer tables the C++ kernels read."""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

from hetero import native
from hetero.memory import allocate_with_room, empty_host

from .codes import BLOCK, TAIL_TOKENS, bf16_bits, code_layout, whole_blocks

RESERVE_FACTOR = 4  # an arena's room: this many times the rows asked for (SeqIndex._alloc)


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
    vmin: int        # code range start [D] float32
    inv_step: int    # 1 / code step [D] float32
    step: int        # code step [D] float32
    tail_keys: int   # the tail's keys [TAIL_TOKENS, D] float32
    tail_values: int  # the tail's values [TAIL_TOKENS, D] float32


class SeqIndex:
    """One sequence's index, all KV heads: list directions (``centroids_t [Hkv, D, L]``), code ranges, list
    segments, list statistics.

    Built from ``keys, values [Hkv, n, D]`` in any float dtype (e.g. views of the host tier), converted to float32
    one head at a time into two buffers reused across heads: at 512K tokens x 8 heads x D 128 the build holds 0.5 GB
    of float32 instead of 4 GB (plus as much again in encoding temporaries), and frees little when it is done (on a
    machine that hands freed memory back to its hypervisor, reclaiming an old build's ~6 GB slowed the next decode
    steps 5-8x for tens of seconds). ``check``: called on each head's float32 keys (the caller's finiteness check).
    ``runner``: a C++ Runner (``hetero.native.new_runner``) that every assignment to lists runs on (the build's, a
    large add's, the tail flush's), and the flush's move: two native calls instead of ~30 numpy operations (4-9 ms
    per flush at 1024 lists x 8 heads); None: numpy. ``flush_phase``: ``codes.flush_phase`` of the layer."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, nlist: int, seed: int, bits: int = 8,
                 check=lambda x: None, runner=None, flush_phase: int = 0):
        import faiss

        self.runner = runner  # the extension's Runner the assignments and the tail flush run on (None: numpy)
        self.flush_phase = flush_phase  # codes.flush_phase: where the tail is flushed before it is full

        hkv, n, d = keys.shape
        self.bits, self.levels = bits, (1 << bits) - 1
        self.dp, self.row_bytes = code_layout(d, bits)               # row_bytes: one key's codes in the arena
        # transposed (q @ centroids_t scores lists), float16: unit directions, half the bytes a search reads
        self.centroids_t = np.empty((hkv, d, nlist), dtype=np.float16)
        # what new keys are assigned by: the trained centroids, fixed, so that where a key goes does not depend on
        # how the tokens were cut into adds (centroids_t follows the lists' means); float16 [Hkv, D, L], transposed
        self.assign_t = np.empty((hkv, d, nlist), dtype=np.float16)
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
            self.centroids_t[h] = self.assign_t[h] = km.centroids.T
            assign[h] = self.assign(kbuf[None], head0=h)[0]
            self.vmin[h] = kbuf.amin(dim=0)
            # the range in float64: keys near float32's limits would overflow max - min
            self.step[h] = ((kbuf.amax(dim=0).double() - kbuf.amin(dim=0).double()) / self.levels).clamp_min(1e-12)
        self._vmin_np, self._inv_step_np, self._step_np = self.vmin.numpy(), (1.0 / self.step).numpy(), self.step.numpy()
        self._range_addrs = (self._vmin_np.ctypes.data, self._inv_step_np.ctypes.data)  # [Hkv, D] float32 each
        counts = torch.stack([torch.bincount(a, minlength=nlist) for a in assign]).numpy()  # [Hkv, L]
        # List segments, numpy int64 [Hkv, L + 1] (a decode step touches single entries: cheap in numpy). The
        # last list is the tail: recent tokens, not assigned yet, scanned by every search.
        counts = np.concatenate([counts, np.zeros((hkv, 1), dtype=counts.dtype)], axis=1)
        # room for decode-step adds (a full list moves, see _relocate), whole blocks: every list starts on one
        self.cap = whole_blocks(counts + counts // 16 + 1)
        self.cap[:, nlist] = TAIL_TOKENS
        self.start = np.cumsum(self.cap, axis=1) - self.cap
        self.count = np.zeros_like(counts)
        self.used = self.cap.sum(axis=1)                             # arena rows handed out, per head
        self._alloc(whole_blocks(int(self.used.max()) + n // 16 + 64))
        self._clear(0, self.used_rows)
        self.tail_keys = torch.empty(hkv, TAIL_TOKENS, d)           # float keys of the tail, for assignment
        self.tail_values = torch.empty(hkv, TAIL_TOKENS, d)
        self._tail_keys_np, self._tail_values_np = self.tail_keys.numpy(), self.tail_values.numpy()
        self._tail_assign = np.empty((hkv, TAIL_TOKENS), dtype=np.int64)  # the native flush's list of each tail key
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
        # host positions at which the tail list was empty, oldest first (truncate restores the tail of a past state)
        self.tail_starts = [n]

    @property
    def nlist(self) -> int:
        """Lists with a centroid (the tail list, index ``nlist``, has none)."""
        return self.centroids_t.shape[2]

    @property
    def tail(self) -> int:
        return int(self.count[0, self.nlist])

    def assign(self, keys: torch.Tensor, head0: int = 0) -> torch.Tensor:
        """Nearest list by inner product with the trained centroids: ``keys [H, n, D]`` float32 of heads ``head0 ..``
        -> ``[H, n]`` int64 (one native call over the runner's threads, else numpy in chunks)."""
        hk, n, d = keys.shape
        out = torch.empty(hk, n, dtype=torch.long)
        centroids = self.assign_t[head0:head0 + hk]
        if self.runner is not None:
            x = keys.float().contiguous()  # (the kernel reads float32 [H, n, D])
            self.runner.ivf_assign(x.data_ptr(), hk, n, n * d, d, centroids.ctypes.data, centroids.shape[2],
                                   out.data_ptr())
            return out
        for s in range(0, n, 8192):  # [8192, L] float32 scores at a time
            out[:, s:s + 8192] = torch.from_numpy(np.matmul(keys[:, s:s + 8192].numpy(), centroids).argmax(axis=2))
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
        """Code and id arenas of at least ``rows`` rows per head, huge-page advised (lists are streamed): codes
        ``[Hkv, R / 16, row_bytes / 4, 16, 4]`` (block_rows' layout), ids ``[Hkv, R]``. Not zeroed: rows are cleared
        as they are handed out (``_clear``). Where untouched address space is free (``room_is_free``), room for
        ``RESERVE_FACTOR x rows``, backed by memory only where rows are written, as the host tier's pool (a growth
        copies the arena: 45 ms for a Llama-3-8B layer at 32K tokens on a VM that backs memory at its first touch);
        else, or if that is refused, 1.5x. Both arenas are replaced together or not at all."""
        hkv = self.count.shape[0]

        def arenas(r: int):
            return (empty_host((hkv, r // BLOCK, self.row_bytes // 4, BLOCK, 4), torch.uint8).numpy(),
                    empty_host((hkv, r), torch.int32).numpy())

        room, least = whole_blocks(RESERVE_FACTOR * rows), whole_blocks(rows * 3 // 2)
        self.codes, self.ids = allocate_with_room(arenas, room, least)
        self._pointers = None
        self.version = getattr(self, "version", 0) + 1  # the retriever republishes its pointer tables

    def _clear(self, first: int, stop: int, head: Optional[int] = None) -> None:
        """Zero arena rows ``[first, stop)`` (whole blocks) of ``head`` (None: every head), as they are handed out:
        the room after the rows in use is not written until then."""
        heads = slice(None) if head is None else head
        self.codes[heads, first // BLOCK:stop // BLOCK] = 0
        self.ids[heads, first:stop] = 0

    @property
    def arena_rows(self) -> int:
        return self.codes.shape[1] * BLOCK

    @property
    def used_rows(self) -> int:
        """Arena rows handed out to lists in the head that has handed out most (whole blocks; another head's rows
        beyond its own ``used`` are room, not cleared)."""
        return int(self.used.max())

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
        decode step's few keys go to the tail list (no centroid read: that is 2 MB per step at 1024 lists x 8
        heads); the tail is assigned to lists in one batch when it holds ``TAIL_TOKENS`` keys, when the add reaches
        the layer's flush phase (``flush_due``), or before a large add."""
        hkv, n, _ = keys.shape
        t = self.tail
        if n > TAIL_TOKENS - t:
            self.flush()
            if n > TAIL_TOKENS // 4:
                self._insert(keys, values, np.arange(first_id, first_id + n, dtype=np.int32))
                self.tail_starts.append(first_id + n)
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
        if self.tail == TAIL_TOKENS or self.flush_due(first_id + n, n):
            self.flush()

    def flush_due(self, end: int, n: int = 1) -> bool:
        """Whether an add of ``n`` keys ending before host position ``end`` reaches the layer's flush point (a
        position ``p`` with ``(p - phase) % TAIL_TOKENS == 0`` in ``(end - n, end]``) and so flushes the tail, full or
        not. The C++ decode append (one key) hands such a key to Python (runner/append.cpp native_add)."""
        return (end - self.flush_phase) % TAIL_TOKENS < n

    def flush(self) -> None:
        """Assign the tail's keys to their lists (by the trained centroids, ``assign``) and move them there."""
        t = self.tail
        if t == 0:
            return
        first = int(self.start[0, self.nlist])
        next_start = int(self.ids[0, first + t - 1]) + 1  # the same positions in every head's tail
        if self.runner is not None:
            self._flush_native(t)
        else:
            ids = self.ids[0, first:first + t].copy()
            self.count[:, self.nlist] = 0
            for stat in (self.ksum, self.vsum, self.vmean):
                stat[:, self.nlist] = 0
            self._insert(self.tail_keys[:, :t], self.tail_values[:, :t], ids)
        self.tail_starts.append(next_start)

    def _flush_native(self, t: int) -> None:
        """``flush`` in two native calls (csrc/ivf/ivf_lists.h): the assignment, then, once every list that lacks room
        has moved (``_relocate``, rare), the rows and statistics: the same float32 operations as the numpy path."""
        hkv, lists = self.count.shape
        assign = self._tail_assign.reshape(-1)[:hkv * t].reshape(hkv, t)  # [Hkv, t] as the kernel writes it
        d, nlist = self.assign_t.shape[1:]
        self.runner.ivf_assign(self._tail_keys_np.ctypes.data, hkv, t, TAIL_TOKENS * d, d, self.assign_t.ctypes.data,
                               nlist, assign.ctypes.data)
        self._make_room(*np.unique(assign + (np.arange(hkv) * lists)[:, None], return_counts=True))
        self.runner.ivf_tail_flush(*self._tail_args(t))

    def _tail_args(self, t: int) -> tuple:
        """``Runner.ivf_tail_flush``'s arguments over the current arenas."""
        hkv, d, nlist = self.centroids_t.shape
        return (hkv, d, nlist, t, TAIL_TOKENS, self.bits, self.dp,
                self.codes.ctypes.data, self.codes.strides[0], self.ids.ctypes.data, self.ids.shape[1],
                self.start.ctypes.data, self.count.ctypes.data, self.cap.ctypes.data, self.centroids_t.ctypes.data,
                self.mean_norm.ctypes.data, self.ksum.ctypes.data, self.vsum.ctypes.data, self.vmean.ctypes.data,
                self._tail_keys_np.ctypes.data, self._tail_values_np.ctypes.data, self._tail_assign.ctypes.data)

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
        self._make_room(pairs, sizes)
        start, count = self.start.reshape(-1), self.count.reshape(-1)  # views
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

    def _make_room(self, pairs: np.ndarray, sizes: np.ndarray) -> None:
        """Room for ``sizes[i]`` more keys in each (head, list) pair ``pairs[i]`` (flat ``head * (L + 1) + list``,
        distinct): the lists that lack it move to the arena's end first (rare)."""
        lists = self.count.shape[1]
        need = self.count.reshape(-1)[pairs] + sizes
        short = need > self.cap.reshape(-1)[pairs]
        for p, rows in zip(pairs[short], need[short]):
            self._relocate(int(p) // lists, int(p) % lists, int(rows))

    def _refresh(self, pairs: np.ndarray) -> None:
        """Recompute the mean value, the mean key's norm and unit direction of the (head, list) pairs ``pairs`` (flat
        ``head * (L + 1) + list``) from their sums; an empty list keeps its direction."""
        lists = self.count.shape[1]
        h, lst = pairs // lists, pairs % lists
        cnt = self.count[h, lst].astype(np.float32)
        inv = np.divide(np.float32(1.0), cnt, out=np.zeros_like(cnt), where=cnt > 0)
        self.vmean[h, lst] = bf16_bits(self.vsum[h, lst] * inv[:, None])
        ks = self.ksum[h, lst]
        ks64 = ks.astype(np.float64)  # squares summed in float64 in dimension order, as the native flush
        norm = np.sqrt(np.cumsum(ks64 * ks64, axis=1)[:, -1]).astype(np.float32)
        own = lst < self.nlist  # the tail list has no direction (every search scans it)
        self.mean_norm[h[own], lst[own]] = norm[own] * inv[own]
        live = own & (norm > 0)
        self.centroids_t[h[live], :, lst[live]] = ks[live] / norm[live, None]

    def _relocate(self, h: int, lst: int, need: int) -> None:
        """Move list ``lst`` of head ``h`` to the arena's end with room for ``need`` rows (at least twice)."""
        cap = whole_blocks(max(2 * int(self.cap[h, lst]), need))
        if int(self.used[h]) + cap > self.arena_rows:
            self._grow(int(self.used[h]) + cap)
        old, new, cnt = int(self.start[h, lst]), int(self.used[h]), int(self.count[h, lst])
        self._clear(new, new + cap, h)
        blocks = whole_blocks(cnt) // BLOCK  # lists start on block boundaries: move whole blocks
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
                      per_head(self.ksum, tail), per_head(self.vsum, tail), per_head(self.vmean, tail),
                      per_head(self._vmin_np), per_head(self._inv_step_np), per_head(self._step_np),
                      per_head(self._tail_keys_np), per_head(self._tail_values_np))
            self._pointers = (arrays, _Addrs(*(a.ctypes.data for a in arrays)))  # the arrays keep them valid
        return self._pointers[1]

    def pointer_arrays(self):
        """The uint64 ``[Hkv]`` address arrays behind ``pointers()``, in ``_Addrs`` order."""
        self.pointers()
        return self._pointers[0]

    def list_of(self, h: int, n_tokens: int) -> np.ndarray:
        """``[n_tokens]`` int64: the list (``L`` = the tail) holding each host position of head h, -1 if none."""
        out = np.full(n_tokens, -1, dtype=np.int64)
        for lst in range(self.nlist + 1):
            s = int(self.start[h, lst])
            out[self.ids[h, s:s + int(self.count[h, lst])]] = lst
        return out

    def _grow(self, rows: int) -> None:
        codes, ids = self.codes, self.ids
        self._alloc(rows)
        for h, used in enumerate(self.used.tolist()):  # each head's rows in use (its room was never written)
            self.codes[h, : used // BLOCK] = codes[h, : used // BLOCK]
            self.ids[h, : used] = ids[h, : used]

    def arenas_in_use(self) -> list:
        """Each head's code and id arena rows handed out to lists (contiguous views; the room after them is not
        memory yet)."""
        return [a for h, used in enumerate(self.used.tolist())
                for a in (self.codes[h, : used // BLOCK], self.ids[h, : used])]

    def truncate(self, n: int, keys_of, values_of) -> None:
        """The index as it was after ``n`` host tokens: the keys of host positions ``>= n`` removed (the newest: every
        list holds its ids in increasing order, the tail the newest of all), and the tail list holding again the
        keys it held then (``tail_starts``: the keys the tail had passed on to lists since come back to it, re-added
        in order, so its sums are the same as then). ``keys_of(first, stop)`` / ``values_of``: float32 ``[Hkv, m, D]``
        of host positions ``[first, stop)`` (the tier still holds them); the sums of the lists that lost members are
        reduced by them (equal to what they were up to rounding)."""
        hkv, lists = self.count.shape
        tail = self.nlist
        starts = [x for x in self.tail_starts if x <= n]
        cut = starts[-1] if starts else n  # where the tail began in the state after n tokens
        self.tail_starts = starts or [n]
        touched = []
        # lists forget every key from `cut` on: the lists whose newest id (their last) is >= cut, found at once
        count, start = self.count[:, :self.nlist], self.start[:, :self.nlist]
        last = np.take_along_axis(self.ids, np.maximum(start + count - 1, 0).astype(np.int64), axis=1)
        for h, lst in zip(*np.nonzero((count > 0) & (last >= cut))):
            h, lst = int(h), int(lst)
            s, c = int(self.start[h, lst]), int(self.count[h, lst])
            kept = int(np.searchsorted(self.ids[h, s:s + c], cut))
            removed = self.ids[h, s + kept:s + c].astype(np.int64)
            lo, hi = int(removed.min()), int(removed.max()) + 1
            self.ksum[h, lst] -= keys_of(lo, hi)[h].numpy()[removed - lo].sum(axis=0)
            self.vsum[h, lst] -= values_of(lo, hi)[h].numpy()[removed - lo].sum(axis=0)
            self.count[h, lst] = kept
            touched.append(h * lists + lst)
        if touched:
            self._refresh(np.asarray(touched))
        self.count[:, tail] = 0  # the tail, rebuilt from [cut, n) in host order
        for stat in (self.ksum, self.vsum, self.vmean):
            stat[:, tail] = 0
        if n > cut:
            self.add(keys_of(cut, n).contiguous(), values_of(cut, n).contiguous(), cut)

    def nbytes(self) -> int:
        """Bytes held: the arena rows handed out to lists (not the room after them), the list statistics and tables."""
        arena = int(self.used.sum()) * (self.row_bytes + 4)
        return (arena + 2 * self.centroids_t.nbytes + 3 * self.count.nbytes
                + 2 * self.tail_keys.numel() * 4 + self._tail_assign.nbytes  # centroids: the lists' and the trained
                + self.ksum.nbytes + self.vsum.nbytes + self.vmean.nbytes + self.mean_norm.nbytes)
