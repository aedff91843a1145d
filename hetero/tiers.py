"""The two storage tiers of one layer's KV cache.

``FastTier``: sinks + a ring buffer of the recent window on the fast device, ``[B, Hkv, S + W, D]``; slots
``[0, lengths[b])`` are valid, so a window kernel only needs a length tensor.
``HostTier``: older tokens in host memory, paged: ``block_tokens``-row blocks of one ``[Hkv, R, 2, D]`` pool shared
by the batch (a token's key and value rows side by side, so a random row is one contiguous run of memory), one
block table row per sequence (pinned when the fast device is CUDA).

The per-sequence counters (``FastTier.total``, ``HostTier.length`` / ``capacity`` and the block table) are numpy
arrays the native decode step reads and updates in place (runner/append.h); ``version`` changes whenever a buffer
the native descriptors point at is reallocated. Both hold post-RoPE keys. Neither validates its inputs:
``LayerCache`` does, before touching them.
"""
from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .memory import HUGE_PAGE_BYTES, allocate_with_room, empty_host, populate, zeros_host
from .types import HostView


class FastTier:
    """Sinks and recent window of every sequence on the fast device.

    k, v: ``[B, Hkv, S + W, D]``; slots ``0..S-1`` hold the sinks, ``S..S+W-1`` a ring of the window: window token
    ``t`` (logical index, ``t >= S``) lives in slot ``S + (t - S) % W``. ``window=None`` makes the tier unbounded (a
    dense layer): token ``t`` lives in slot ``t``.
    total: ``[B]`` int64 numpy, logical tokens seen. lengths: ``[B]`` int32 on the device, valid slots (on the CPU
    a tensor sharing memory with ``lengths_np``; on CUDA ``lengths_np`` is the host mirror, ``sync_lengths`` copies
    it over asynchronously).
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, sinks: int, window: Optional[int],
                 dtype: torch.dtype, device: torch.device):
        self.sinks, self.window = sinks, window
        self.device = torch.device(device)
        slots = sinks + window if window is not None else 0
        self.k = self._zeros((batch, kv_heads, slots, head_dim), dtype)
        self.v = self._zeros((batch, kv_heads, slots, head_dim), dtype)
        self.total = np.zeros(batch, dtype=np.int64)
        if self.device.type == "cpu":
            self.lengths = torch.zeros(batch, dtype=torch.int32)
            self.lengths_np = self.lengths.numpy()
        else:
            self.lengths = torch.zeros(batch, dtype=torch.int32, device=self.device)
            self.lengths_np = np.zeros(batch, dtype=np.int32)
        self.version = 0

    def _zeros(self, shape, dtype: torch.dtype) -> torch.Tensor:
        if self.device.type == "cpu":  # the window is streamed every step: huge pages (hetero.memory)
            return zeros_host(shape, dtype)
        return torch.zeros(shape, dtype=dtype, device=self.device)

    @property
    def batch(self) -> int:
        return self.k.shape[0]

    def valid(self, total: int) -> int:
        """Valid slots of a sequence of ``total`` tokens."""
        if self.window is None:
            return total
        return min(total, self.sinks) + min(max(total - self.sinks, 0), self.window)

    def sync_lengths(self) -> None:
        """Publish ``lengths_np`` to the device tensor (a no-op on the CPU, where they share memory). On CUDA through
        a fresh pinned copy: the copy runs when the stream gets there, and ``lengths_np`` may change before; torch's
        pinned allocator keeps the buffer until then."""
        if self.device.type != "cpu":
            self.lengths.copy_(torch.from_numpy(self.lengths_np).pin_memory(), non_blocking=True)

    def _ring_runs(self, start: int, stop: int) -> List[Tuple[int, int]]:
        """Ring slots of window tokens ``[start, stop)`` (at most ``W`` of them) as runs ``(first slot, count)``:
        one run, or two when the range wraps around the ring's end."""
        s, w = self.sinks, self.window
        first, n = s + (start - s) % w, stop - start
        head = min(n, s + w - first)
        return [(first, head)] + ([(s, n - head)] if n > head else [])

    def _ring_take(self, seq: int, start: int, stop: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Copies of window tokens ``[start, stop)``, ``[Hkv, n, D]`` each."""
        runs = self._ring_runs(start, stop)
        k, v = self.k[seq], self.v[seq]
        if len(runs) == 1:
            a, n = runs[0]
            return k[:, a:a + n].clone(), v[:, a:a + n].clone()
        return (torch.cat([k[:, a:a + n] for a, n in runs], dim=1), torch.cat([v[:, a:a + n] for a, n in runs], dim=1))

    def _ring_put(self, seq: int, start: int, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Write ``[Hkv, n, D]`` tokens as window tokens ``start, start + 1, ...``."""
        off = 0
        for a, n in self._ring_runs(start, start + k_new.shape[1]):
            self.k[seq][:, a:a + n] = k_new[:, off:off + n]
            self.v[seq][:, a:a + n] = v_new[:, off:off + n]
            off += n

    def _ring_slots(self, start: int, stop: int) -> torch.Tensor:
        s, w = self.sinks, self.window
        if stop <= start:
            return torch.empty(0, dtype=torch.long, device=self.device)
        return s + (torch.arange(start, stop, device=self.device) - s) % w

    def reserve(self, seq: int, tokens: int) -> None:
        """Room for ``tokens`` more tokens of ``seq`` (a dense tier grows; a windowed one never needs to)."""
        self.reserve_all({seq: tokens})

    def reserve_all(self, tokens: Dict[int, int]) -> None:
        """Room for ``tokens[seq]`` more tokens of each ``seq``, in one allocation (all or nothing)."""
        if self.window is None and tokens:
            self._grow(max(int(self.total[seq]) + n for seq, n in tokens.items()))

    def _grow(self, needed: int) -> None:
        cap = self.k.shape[2]
        if needed <= cap:
            return
        new_cap = max(needed, cap + cap // 2, 64)
        b, h, _, d = self.k.shape
        k, v = self._zeros((b, h, new_cap, d), self.k.dtype), self._zeros((b, h, new_cap, d), self.v.dtype)
        k[:, :, :cap], v[:, :, :cap] = self.k, self.v
        self.k, self.v = k, v
        self.version += 1

    def evicting(self, seq: int, k_new: torch.Tensor, v_new: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The tokens appending ``[Hkv, n, D]`` tokens to ``seq`` would push out of the window, oldest first, copied
        (``[Hkv, m, D]`` each): every allocation of the append, made before it writes anything."""
        n = k_new.shape[1]
        t0, t1 = int(self.total[seq]), int(self.total[seq]) + n
        s, w = self.sinks, self.window
        if w is None:
            return k_new[:, :0], v_new[:, :0]
        old_start, new_start = max(s, t0 - w), max(s, t1 - w)
        parts_k, parts_v = [], []
        if min(t0, new_start) > old_start:  # old window tokens leaving, copied before append() overwrites them
            k_old, v_old = self._ring_take(seq, old_start, min(t0, new_start))
            parts_k.append(k_old)
            parts_v.append(v_old)
        first_in, skip_until = max(t0, s), max(t0, s, new_start)
        if skip_until > first_in:  # new tokens that never fit in the window
            parts_k.append(k_new[:, first_in - t0: skip_until - t0])
            parts_v.append(v_new[:, first_in - t0: skip_until - t0])
        if len(parts_k) == 1:
            return parts_k[0], parts_v[0]
        if parts_k:
            return torch.cat(parts_k, dim=1), torch.cat(parts_v, dim=1)
        return k_new[:, :0], v_new[:, :0]

    def append(self, seq: int, k_new: torch.Tensor, v_new: torch.Tensor,
               evicted: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Append ``[Hkv, n, D]`` tokens to sequence ``seq`` (``reserve`` first for a dense tier); return the tokens
        pushed out of the window, ``[Hkv, m, D]`` each, oldest first (they belong to the host tier now).
        ``evicted``: what ``evicting`` returned for this append, so that it allocates nothing here."""
        if evicted is None:
            evicted = self.evicting(seq, k_new, v_new)
        n = k_new.shape[1]
        t0, t1 = int(self.total[seq]), int(self.total[seq]) + n
        s, w = self.sinks, self.window
        if w is None:
            self.k[seq, :, t0:t1] = k_new
            self.v[seq, :, t0:t1] = v_new
        else:
            sink_end = min(s, t1)
            if t0 < sink_end:
                self.k[seq, :, t0:sink_end] = k_new[:, : sink_end - t0]
                self.v[seq, :, t0:sink_end] = v_new[:, : sink_end - t0]
            skip_until = max(t0, s, t1 - w)
            if t1 > skip_until:
                self._ring_put(seq, skip_until, k_new[:, skip_until - t0:], v_new[:, skip_until - t0:])
        self.total[seq] = t1
        self.lengths_np[seq] = self.valid(t1)
        return evicted

    def window_positions(self, seq: int) -> Tuple[int, int]:
        """Logical positions ``[start, stop)`` of the window tokens of ``seq`` (empty for a dense tier)."""
        t = int(self.total[seq])
        if self.window is None:
            return t, t
        return max(self.sinks, t - self.window), t

    def refill_range(self, seq: int, n: int) -> Tuple[int, int]:
        """Logical positions ``[lo, hi)`` that ``crop(seq, n)`` brings back into the window from the host tier (the
        ones that left it since the sequence was ``n`` tokens long; empty when none did)."""
        if self.window is None:
            return 0, 0
        lo, hi = max(self.sinks, n - self.window), min(n, self.window_positions(seq)[0])
        return lo, max(lo, hi)

    def crop(self, seq: int, n: int, refill_k: torch.Tensor, refill_v: torch.Tensor) -> None:
        """Keep the first ``n`` tokens of ``seq``; ``refill_k/v [Hkv, m, D]``: the tokens of ``refill_range(seq, n)``
        (from the host tier), written back to their ring slots. A ring slot is a function of the logical position,
        so the window tokens below ``n`` are already in place and the dropped ones are simply overwritten or left
        outside the valid range."""
        if self.window is not None and refill_k.shape[1]:
            self._ring_put(seq, self.refill_range(seq, n)[0], refill_k, refill_v)
        self.total[seq] = n
        self.lengths_np[seq] = self.valid(n)

    def tokens(self, seq: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``seq`` on this tier in logical order, ``[Hkv, n, D]`` each."""
        total = int(self.total[seq])
        if self.window is None:
            return self.k[seq, :, :total], self.v[seq, :, :total]
        ns = min(total, self.sinks)
        slots = torch.cat([torch.arange(ns, device=self.device),
                           self._ring_slots(max(self.sinks, total - self.window), total)])
        return self.k[seq][:, slots], self.v[seq][:, slots]

    def nbytes(self) -> int:
        """Bytes of valid token slots (keys + values)."""
        per_token = self.k.shape[1] * self.k.shape[3] * self.k.element_size() * 2
        return int(self.lengths_np.sum()) * per_token


def _populate_rows(pool_ref: "weakref.ref", addresses: List[int], length: int) -> None:
    """``populate`` each run of the pool ``pool_ref`` refers to, if it is still alive (a pool replaced while the job
    waited is not kept alive for it), held until done so that the runs stay mapped."""
    pool = pool_ref()
    if pool is None:
        return
    for address in addresses:
        if not populate(address, length):
            return


# A pageable host pool's room (HostTier._ensure_capacity): address space for RESERVE_FACTOR x the blocks it needs,
# and for at least RESERVE_TOKENS tokens of all its sequences together.
RESERVE_FACTOR = 4
RESERVE_TOKENS = 1 << 20


class HostTier:
    """Older tokens of every sequence in host memory, paged.

    kv_pool: ``[Hkv, R, 2, D]``; k_pool, v_pool: its ``[Hkv, R, D]`` views (row stride ``2 * D``).
    Block ``j`` is rows ``j*C .. j*C+C-1`` (``C = block_tokens``). Sequence ``b`` owns blocks ``blocks[b]`` in order
    (also row ``b`` of ``table``, ``[B, max_blocks]`` int32, -1 beyond them); host position ``i`` is row
    ``blocks[b][i // C] * C + i % C``. length / capacity: ``[B]`` int64 numpy, tokens stored / room in the blocks.
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, block_tokens: int,
                 pin_memory: bool = False):
        self.block_tokens = block_tokens
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, dtype
        self.pin_memory = pin_memory
        self._set_pool(self._alloc(0))
        self.blocks: List[List[int]] = [[] for _ in range(batch)]
        self.length = np.zeros(batch, dtype=np.int64)
        self.capacity = np.zeros(batch, dtype=np.int64)
        self._table_t = torch.full((batch, 4), -1, dtype=torch.int32)
        self.table = self._table_t.numpy()
        self._next_block = 0
        self.version = 0
        # populate_ahead: rows [0, _backed) of every KV head's region are backed by memory (or asked to be)
        self._page_rows = max(1, HUGE_PAGE_BYTES // (2 * head_dim * dtype.itemsize))
        self._backed = 0
        self._populating = None  # the populate in flight (a Future)

    @property
    def batch(self) -> int:
        return len(self.blocks)

    def populate_ahead(self, lead_rows: int, worker) -> bool:
        """Ask ``worker`` (a background thread) to back the next 2 MiB of rows of every KV head's pool region with
        memory, once the rows handed out come within ``lead_rows`` of those backed so far; True when it asked.

        A pageable pool's pages are backed at their first write. The append that starts a new 2 MiB of every KV
        head's region otherwise takes all their faults in one decode step, and every layer of a model on the same
        token: 8 KV heads cost 36 ms in one step on a VM whose host backs guest memory at its first touch (~5 ms a
        2 MiB page, AMD Zen 4). The advice keeps the rows' contents, so it may run beside the appends that write
        them. It waits for no one: a worker with work queued or running (an index build, another layer's adds or
        populate) is not given it, and the appends take their own faults then; so a layer whose indexer does it
        seldom gets it with a retriever whose decode adds run there (``native_kind`` 0: faiss, lsh), and the HF
        cache gives its layers a populator thread of their own (``LayerCache(populator=...)``). Pinned pools are
        backed when allocated."""
        reserved = self._next_block * self.block_tokens  # rows_reserved, without the property's call
        if reserved + lead_rows < self._backed or self.pin_memory or worker is None:
            return False  # nearly every append: a step's first Python after its kernels, with cold caches
        cap = self.kv_pool.shape[1]
        self._backed = max(self._backed, reserved)  # written, or about to be, by the appends themselves
        if self._backed >= cap:
            return False
        if self._populating is not None and not self._populating.done():
            return False
        pool, stop = self.kv_pool, min(cap, self._backed + self._page_rows)
        head_bytes = pool.stride(0) * pool.element_size()
        runs = [pool[0, self._backed].data_ptr() + h * head_bytes for h in range(self.kv_heads)]
        length = (stop - self._backed) * pool.stride(1) * pool.element_size()
        job = worker.try_submit(_populate_rows, weakref.ref(pool), runs, length, idle_only=True)
        if job is None:
            return False
        self._populating, self._backed = job, stop
        return True

    def populate_lead(self, layer_idx: int) -> int:
        """``populate_ahead``'s lead for a layer: half of 2 MiB of rows, plus one of 64 steps through the other half
        by layer (13 x layer mod 64, as the index's flush phase), so that a model's layers ask on different tokens
        and the background work is spread."""
        return self._page_rows // 2 + (13 * layer_idx) % 64 * max(1, self._page_rows // 128)

    def _alloc(self, blocks: int) -> torch.Tensor:
        return empty_host((self.kv_heads, blocks * self.block_tokens, 2, self.head_dim), self.dtype,
                          pin_memory=self.pin_memory)

    def _set_pool(self, kv_pool: torch.Tensor) -> None:
        self.kv_pool = kv_pool
        self.k_pool, self.v_pool = kv_pool[:, :, 0], kv_pool[:, :, 1]

    @property
    def capacity_blocks(self) -> int:
        return self.k_pool.shape[1] // self.block_tokens

    def blocks_needed(self, seq: int, tokens: int) -> int:
        """New blocks ``reserve(seq, tokens)`` would take."""
        have = int(self.capacity[seq] - self.length[seq])
        return max(0, -(-(tokens - have) // self.block_tokens))

    def reserve(self, seq: int, tokens: int) -> None:
        """Make room for ``tokens`` more tokens of ``seq`` without reallocating the pools later (``reserve_all``)."""
        self.reserve_all({seq: tokens})

    def reserve_all(self, tokens: Dict[int, int]) -> None:
        """Room for ``tokens[seq]`` more tokens of each ``seq``; blocks reserved together for a sequence are
        consecutive, which lets ``keys(seq)`` return a view. The pool and the block table grow once, before any
        block is handed out: a failed allocation leaves the tier as it was, for every sequence."""
        need = {seq: self.blocks_needed(seq, n) for seq, n in tokens.items()}
        need = {seq: n for seq, n in need.items() if n}
        if not need:
            return
        width = max(len(self.blocks[seq]) + n for seq, n in need.items())
        if width > self.table.shape[1]:  # grow the table first (nothing changes if an allocation fails)
            table = torch.full((self.batch, max(width, 2 * self.table.shape[1])), -1, dtype=torch.int32)
            table[:, : self.table.shape[1]] = self._table_t
        else:
            table = None
        self._ensure_capacity(self._next_block + sum(need.values()))
        if table is not None:
            self._table_t, self.table = table, table.numpy()
            self.version += 1
        for seq, n in need.items():
            first, have = self._next_block, len(self.blocks[seq])
            self.table[seq, have: have + n] = np.arange(first, first + n, dtype=np.int32)
            self.blocks[seq].extend(range(first, first + n))
            self._next_block += n
            self.capacity[seq] = (have + n) * self.block_tokens

    @property
    def rows_reserved(self) -> int:
        """Pool rows of the blocks handed out to sequences; the rows after them are room (not yet written, and where
        the pool is pageable not yet backed by memory)."""
        return self._next_block * self.block_tokens

    @property
    def kv_in_use(self) -> torch.Tensor:
        """``kv_pool [Hkv, rows_reserved, 2, D]``: the rows of the blocks handed out (each KV head's contiguous), without
        the room after them."""
        return self.kv_pool[:, :self.rows_reserved]

    def _ensure_capacity(self, blocks: int) -> None:
        cap = self.capacity_blocks
        if blocks <= cap:
            return
        # Growing copies the whole pool: 0.18 s at 37K rows and 0.68 s at 143K (8 KV heads, head_dim 128, bf16,
        # AMD Zen 4), in one decode step, and in every layer of a model on the same token. A pageable pool's pages are
        # backed by memory at their first write, so it reserves address space for RESERVE_FACTOR x the blocks it
        # needs and at least RESERVE_TOKENS tokens: the room costs no memory until tokens fill it, and a model
        # decodes to a million tokens without a copy. A pinned pool (CUDA) is backed when allocated, and so is one
        # where room is not free (strict overcommit, not Linux: memory.room_is_free) or refused (a ulimit): it grows
        # by 1.5x, with headroom so that a prefill's exact reservation is not followed by a copy a few decode steps
        # later.
        new_cap = max(blocks + blocks // 8 + 1, cap + cap // 2)
        rows = self.rows_reserved  # the rest was never handed out: copying it would back the new room with memory
        room = new_cap if self.pin_memory else max(RESERVE_FACTOR * blocks, -(-RESERVE_TOKENS // self.block_tokens))
        new = allocate_with_room(self._alloc, room, new_cap)
        new[:, :rows] = self.kv_pool[:, :rows]
        self._set_pool(new)
        self._backed = rows  # the copy backed these; the new room is not
        self.version += 1

    def append(self, seq: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append ``[Hkv, n, D]`` keys and values to the end of sequence ``seq`` (reserved beforehand, or here)."""
        n = keys.shape[1]
        if n == 0:
            return
        self.reserve(seq, n)
        start = int(self.length[seq])
        for dst_start, src_start, count in self._rows(seq, start, start + n):
            self.k_pool[:, dst_start: dst_start + count] = keys[:, src_start: src_start + count]
            self.v_pool[:, dst_start: dst_start + count] = values[:, src_start: src_start + count]
        self.length[seq] = start + n

    def truncate(self, seq: int, n: int) -> None:
        """Forget host positions ``>= n`` of ``seq`` (its blocks stay reserved for what comes next)."""
        self.length[seq] = min(int(self.length[seq]), n)

    def _rows(self, seq: int, start: int, stop: int):
        """Runs ``(pool_row, offset_from_start, count)`` covering host positions ``[start, stop)``."""
        c, blocks = self.block_tokens, self.blocks[seq]
        runs, pos = [], start
        while pos < stop:
            blk = pos // c
            run_end = min(stop, (blk + 1) * c)
            row = blocks[blk] * c + pos % c
            if runs and runs[-1][0] + runs[-1][2] == row:  # extends the previous run
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + run_end - pos)
            else:
                runs.append((row, pos - start, run_end - pos))
            pos = run_end
        return runs

    def keys(self, seq: int, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """``[Hkv, n, D]`` keys of ``seq`` at host positions ``[start, stop)`` (default: all), in order (a view when
        their blocks are consecutive)."""
        return self._gather_seq(self.k_pool, seq, start, stop)

    def values(self, seq: int, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """``[Hkv, n, D]`` values of ``seq`` at host positions ``[start, stop)``, as ``keys``."""
        return self._gather_seq(self.v_pool, seq, start, stop)

    def _gather_seq(self, pool: torch.Tensor, seq: int, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        stop = int(self.length[seq]) if stop is None else stop
        if not 0 <= start <= stop <= self.length[seq]:
            raise IndexError(f"host positions [{start}, {stop}) of sequence {seq} are outside [0, {self.length[seq]})")
        runs = self._rows(seq, start, stop)
        if not runs:
            return pool[:, :0]
        if len(runs) == 1:
            row, _, count = runs[0]
            return pool[:, row: row + count]
        return torch.cat([pool[:, row: row + count] for row, _, count in runs], dim=1)

    @property
    def block_table(self) -> torch.Tensor:
        """``[B, max_blocks]`` int32 block ids, ``-1`` where a sequence has fewer blocks (shares the tier's memory)."""
        return self._table_t

    @property
    def lengths(self) -> torch.Tensor:
        """``[B]`` int64 host tokens per sequence (a copy)."""
        return torch.from_numpy(self.length.copy())

    def view(self) -> HostView:
        """The tier as the kernels take it; its pools end at the rows handed out (the room after them is not part of
        any sequence, and a caller that copies a pool copies only what it holds)."""
        kv = self.kv_in_use
        return HostView(kv[:, :, 0], kv[:, :, 1], self._table_t, self.lengths, self.block_tokens)

    def nbytes(self) -> int:
        """Bytes of stored tokens (keys + values)."""
        return int(self.length.sum()) * self.kv_heads * self.head_dim * self.k_pool.element_size() * 2

