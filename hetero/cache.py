"""The tiered KV cache: a list of per-layer caches (like transformers' ``cache_utils``), each with a fast tier
(sinks + recent window), a host tier (everything older) and the retriever over the host tier.

Every token of every sequence is in exactly one tier. A call is atomic: it completes, or it raises a typed error
and leaves the tiers and the index as they were (inputs are checked and memory is allocated before anything is
written). Concurrent calls on one layer (appends, crops, ``HeteroAttention.run``) are serialized by the layer's
lock; different layers run concurrently.
"""
from __future__ import annotations

import threading
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import interrupts, native
from .budgets import AdaptiveHeadBudget
from .config import HeteroConfig
from .errors import ConfigError, DTypeError, InvalidValueError, ShapeError
from .evictions import EvictionStage
from .indexing import IndexQueue
from .memory import in_storage_mode
from .reference import default_scale
from .registry import RETRIEVERS
from .tiers import FastTier, HostTier
from .validation import (VALUE_LIMIT, all_finite, check_finite, check_fits, check_float, check_kv, check_lengths,
                         check_tensor)
from .worker import Worker

MEMORY_KEYS = ("fast_bytes", "host_bytes", "index_bytes")  # what memory() reports, per layer or summed

_KV_LAYOUT = "[B, Hkv, T, D] (or [B, Hkv, D] for one decode token)"


def _used(x: torch.Tensor, lengths: List[int]) -> torch.Tensor:
    """The appended part of a ragged chunk, flattened (padding beyond ``lengths`` may hold anything)."""
    return torch.cat([x[b, :, :n].reshape(-1) for b, n in enumerate(lengths)])


class LayerCache:
    """KV cache of one attention layer for a batch of sequences of different lengths.

    Created empty; the first ``append`` fixes batch size, KV heads, head dim, device (the fast tier's, from the
    keys) and storage dtype (``config.kv_dtype`` or the keys' dtype). ``indexer``: an optional
    ``hetero.worker.Worker`` that indexes evicted tokens in the background (``hetero/indexing.py``). ``populator``:
    an optional ``Worker`` that backs the host tier's next pages with memory ahead of the appends
    (``HostTier.populate_ahead``); without one the indexer does it when it is idle, which a retriever whose decode
    adds run on it (faiss, lsh) seldom leaves it.
    """

    def __init__(self, config: HeteroConfig, layer_idx: int = 0, indexer=None, populator=None):
        if not isinstance(config, HeteroConfig):
            raise ConfigError(f"config must be a hetero.HeteroConfig, got {type(config).__name__} (build one with "
                              "HeteroConfig(**fields))")
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
            raise ConfigError(f"layer_idx must be an int >= 0, got {layer_idx!r}")
        self.config = config
        self.layer_idx = layer_idx
        self.dense = layer_idx in config.dense_layers
        self.fast: Optional[FastTier] = None
        self.host: Optional[HostTier] = None
        self.retriever = None
        self.index = IndexQueue(layer_idx, config.retriever, indexer)
        self.populator = populator
        self.head_budget = None  # per-head budget state (hetero.budgets), made with the tiers if the config asks
        self.lock = threading.Lock()
        self._desc = None
        self._desc_key = None
        self._flags = None
        self._native_ok = False
        self.geometry = None  # (batch, kv_heads, head_dim, dtype, device) once the first append fixed them
        # evicted tokens reach the host tier through pinned staging (hetero/evictions.py): set at the first append
        # for a CUDA fast tier (tests set it before, to run that path on the CPU)
        self.staged_evictions = False
        self._stage: Optional[EvictionStage] = None

    # ---- shape facts -------------------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        return self.fast is not None

    @property
    def batch(self) -> int:
        return self.fast.batch if self.fast is not None else 0

    @property
    def kv_heads(self) -> int:
        return self.fast.k.shape[1] if self.fast is not None else 0

    @property
    def head_dim(self) -> int:
        return self.fast.k.shape[3] if self.fast is not None else 0

    @property
    def dtype(self) -> Optional[torch.dtype]:
        return self.fast.k.dtype if self.fast is not None else None

    @property
    def device(self) -> Optional[torch.device]:
        return self.fast.k.device if self.fast is not None else None

    @property
    def indexer(self):
        return self.index.indexer

    def seq_lengths(self) -> List[int]:
        """Logical length (all tiers) of each sequence."""
        return self.fast.total.tolist() if self.fast is not None else []

    @property
    def evictions_pending(self) -> bool:
        """Tokens that left a CUDA window and have not reached the host tier yet (``prepare_host_side`` lands them)."""
        return bool(self._stage)

    def host_lengths(self) -> List[int]:
        with self.lock:  # (another thread's append moves the tiers' counts together)
            self._land_locked()
            return self.host.length.tolist() if self.host is not None else []

    @property
    def add_spans(self):
        """Spans of recent index adds (the profiler's trace)."""
        return self.index.spans

    # ---- building ----------------------------------------------------------------------------------
    def _build(self, keys: torch.Tensor) -> Tuple[FastTier, HostTier, object]:
        """Tiers and retriever for the geometry of ``keys``, not yet attached (a failure leaves the cache empty)."""
        b, hkv, _, d = keys.shape
        dtype = self.config.torch_kv_dtype or keys.dtype
        if dtype not in native.DTYPE_CODES:
            raise ShapeError(f"keys of dtype {keys.dtype} cannot be stored: set HeteroConfig.kv_dtype to float32, "
                             "bfloat16 or float16")
        window = None if self.dense else self.config.window
        fast = FastTier(b, hkv, d, self.config.sinks, window, dtype, keys.device)
        host = HostTier(b, hkv, d, dtype, self.config.block_tokens, pin_memory=keys.device.type == "cuda")
        cls = RETRIEVERS.load(self.config.retriever)
        retriever = cls(host, group_rule=self.config.group_rule, **self.config.retriever_options)
        retriever.softmax_scale = self.config.scale or default_scale(d)
        retriever.layer_idx = self.layer_idx
        retriever.report_missed = self.config.head_budget == "adaptive"
        return fast, host, retriever

    def _attach(self, fast, host, retriever) -> None:
        self.fast, self.host, self.retriever = fast, host, retriever
        self.index.bind(retriever, host)
        if self.config.head_budget == "adaptive" and not self.dense:
            self.head_budget = AdaptiveHeadBudget(fast.batch, fast.k.shape[1])
        self._flags = np.zeros(fast.batch, dtype=np.int64)
        self._flags_addr = native.address(self._flags)
        self._populate_lead = host.populate_lead(self.layer_idx)
        self._populate_worker = self.populator if self.populator is not None else self.index.indexer
        self._desc_key = None
        self._decode_shape = torch.Size((fast.batch, fast.k.shape[1], fast.k.shape[3]))
        self.geometry = (fast.batch, fast.k.shape[1], fast.k.shape[3], fast.k.dtype, fast.device)
        self.staged_evictions = self.staged_evictions or fast.device.type == "cuda"
        self._stage = EvictionStage(fast.device)
        self._native_ok = (fast.device.type == "cpu" and not self.dense and native.load() is not None
                           and fast.k.shape[3] <= native.MAX_HEAD_DIM
                           and not self.staged_evictions)

    # ---- appending ---------------------------------------------------------------------------------
    def check_append(self, keys: torch.Tensor, values: torch.Tensor, lengths=None, check_values: bool = True):
        """Validate an ``append`` without changing anything; returns normalized (keys, values, lengths), lengths
        as B ints. ``check_values=False`` leaves the NaN/inf check to the caller (a CUDA append does it on the
        device, without a host sync)."""
        rank = keys.dim() if isinstance(keys, torch.Tensor) and keys.dim() == 3 else 4
        check_kv(keys, values, "keys", "values", rank, _KV_LAYOUT)
        if keys.dim() == 3:
            keys, values = keys.unsqueeze(2), values.unsqueeze(2)
        b, hkv, t, d = keys.shape
        if b == 0:
            raise ShapeError("empty batch: keys have B = 0 sequences")
        if hkv == 0 or d == 0:
            raise ShapeError(f"keys {tuple(keys.shape)} need Hkv >= 1 and D >= 1")
        if keys.dtype == torch.float64 and self.config.kv_dtype is None:
            raise DTypeError("float64 keys need a storage dtype: set HeteroConfig.kv_dtype (float32, bfloat16, "
                             "float16)")
        if self.initialized:
            want = (self.batch, self.kv_heads, self.head_dim)
            if (b, hkv, d) != want:
                raise ShapeError(f"keys {tuple(keys.shape)} do not match layer {self.layer_idx}'s cache: expected "
                                 f"[B={want[0]}, Hkv={want[1]}, T, D={want[2]}]")
            if keys.device != self.device:
                raise ShapeError(f"keys on {keys.device}, but layer {self.layer_idx}'s fast tier is on {self.device}")
        lengths = [t] * b if lengths is None else check_lengths(lengths, b, t).tolist()  # no tensor when None
        if check_values:
            storage = self.fast.k.dtype if self.initialized else (self.config.torch_kv_dtype or keys.dtype)
            limit = self._value_limit()
            narrows = torch.finfo(storage).max < limit  # float16 storage: its own range is the tighter bound
            for name, x in (("keys", keys), ("values", values)):
                used = x if min(lengths) == t else _used(x, lengths)
                if all_finite(used, limit) and not narrows:  # one pass; the details below only for a refusal
                    continue
                check_finite(used, name)
                why = (f"the {self.config.retriever!r} index takes |x| <= {limit:g} (its float32 distances and sums "
                       "overflow beyond)" if self._index_limit() == limit else
                       f"attention takes |x| <= {limit:g} (beyond, float32 scores overflow)")
                check_fits(used, storage, f"{name} (stored as {str(storage).replace('torch.', '')})", limit, why)
        return keys, values, lengths

    @in_storage_mode
    def append(self, keys: torch.Tensor, values: torch.Tensor, lengths=None) -> None:
        """Append new tokens (a prefill chunk or one decode token) to every sequence.

        keys, values: ``[B, Hkv, T, D]`` (or ``[B, Hkv, D]``), post-RoPE, float32 / bfloat16 / float16, or float64
        when ``kv_dtype`` is set (stored as the cache's dtype; a value the storage dtype cannot hold is refused). lengths: optional ``[B]`` ints; sequence ``b`` takes ``keys[b, :, :lengths[b]]``
        (default all ``T``). Tokens pushed out of the window move to the host tier and its retriever.
        """
        if lengths is None and self._native_ok and self._append_decode_fast(keys, values):
            return
        with self.lock:
            staged = self.staged_evictions or (isinstance(keys, torch.Tensor) and keys.device.type == "cuda")
            keys, values, lengths = self.check_append(keys, values, lengths, check_values=not staged)
            self.index.check_open()
            if staged:
                self._land_locked()  # an earlier append's evictions reach the host tier first (host order)
            parts = self._build(keys) if not self.initialized else (self.fast, self.host, self.retriever)
            fast, host, _ = parts
            dtype = fast.k.dtype
            keys, values = keys.to(dtype), values.to(dtype)  # allocations before any write
            finite = None
            if staged:  # the device's verdict on the stored values (a finite value may overflow the storage dtype),
                # read back with the evicted tokens (hetero/evictions.py)
                used_k = keys if min(lengths) == keys.shape[2] else _used(keys, lengths)
                used_v = values if min(lengths) == keys.shape[2] else _used(values, lengths)
                # NaN and inf compare False too: one pass each. The comparison runs in the storage dtype, which
                # would round a limit beyond its range to inf (float16's 1e15), and inf <= inf holds
                limit = min(self._value_limit(), torch.finfo(dtype).max)
                finite = (used_k.abs() <= limit).all() & (used_v.abs() <= limit).all()
            # room first, one allocation per tier: nothing is written if one fails
            fast.reserve_all(dict(enumerate(lengths)))
            host.reserve_all({seq: (t + n - fast.valid(t + n)) - (t - fast.valid(t))  # tokens leaving the window
                              for seq, (t, n) in enumerate(zip(fast.total.tolist(), lengths))})
            if not self.initialized:
                self._attach(*parts)
            rec = self._stage.open(fast.total.tolist()) if staged else None
            # every sequence's evicted copies first: a failed allocation leaves all of them as they were
            evicted = {seq: fast.evicting(seq, keys[seq, :, :n], values[seq, :, :n])
                       for seq, n in enumerate(lengths) if n}
            with interrupts.deferred():  # a Ctrl-C between a slot's overwrite and its token's host append loses it
                self._write_locked(evicted, keys, values, lengths, rec, finite)
            self.populate_host_ahead()

    def _write_locked(self, evicted, keys, values, lengths, rec, finite) -> None:
        """append()'s writes, its copies made: the fast tier, the host tier (or the stage), then the index adds."""
        fast, host, staged = self.fast, self.host, rec is not None
        adds = []
        self.index.begin_write()
        for seq, (evicted_k, evicted_v) in evicted.items():
            n = lengths[seq]
            fast.append(seq, keys[seq, :, :n], values[seq, :, :n], (evicted_k, evicted_v))
            if not evicted_k.shape[1]:
                continue
            if staged:
                self._stage.stage(rec, seq, evicted_k, evicted_v)
            else:
                first = int(host.length[seq])
                host.append(seq, evicted_k, evicted_v)
                adds.append((seq, first, evicted_k.shape[1]))
        fast.sync_lengths()
        if staged:
            self._stage.seal(rec, finite)
        for seq, first, n in adds:
            self.index.add(seq, first, n)
        self.index.end_write()

    def _land(self) -> None:
        """Staged evictions into the host tier before an inspection reads it (takes the lock only when some wait)."""
        if self._stage:
            with self.lock:
                self._land_locked()

    def _land_locked(self) -> None:
        """Staged evictions into the host tier and the index (waits for their copies); an append whose keys or values
        the device found not finite is undone here and reported. Caller holds the lock."""
        if not self._stage:
            return
        for rec in self._stage.take():
            refused = rec.finite is not None and not bool(rec.finite)
            adds = []
            if not refused:
                self.index.begin_write()
            for seq, k, v in rec.tokens:
                adds.append((seq, int(self.host.length[seq]), k.shape[1]))
                self.host.append(seq, k, v)
            if refused:  # the tiers go back (the crop refills the window from the host tier); the index never saw
                self._crop_locked(rec.lengths_before)  # these tokens, nor rebuilds from them
                raise InvalidValueError(f"keys or values appended to layer {self.layer_idx} contained NaN or inf, or "
                                        f"values beyond {self._value_limit():g} in magnitude (checked on the device): "
                                        "that append was undone")
            for seq, first, n in adds:
                self.index.add(seq, first, n)
            self.index.end_write()

    def prepare_host_side(self) -> None:
        """Before a step's host side reads the host tier: staged evictions landed, every host token indexed (a failed
        add healed and reported). Caller holds the lock."""
        self._land_locked()
        if not self.index.idle:
            self.index.wait()

    def _append_decode_fast(self, k, v) -> bool:
        """One decode token per sequence (``[B, Hkv, D]`` or ``[B, Hkv, 1, D]`` on the CPU) in one C++ call, which
        also refuses NaN and inf before changing anything. False (nothing done) for anything else: the general path
        then checks the inputs and explains what is wrong."""
        geometry = self.geometry
        token = self.native_token(k, v)
        if token is None:
            return False
        with self.lock:
            if not self._native_ok or self.geometry is not geometry:  # another thread reset the layer meanwhile
                return False
            self.index.check_open()
            self._append_native(token[0], token[1])
            self.populate_host_ahead()
        return True

    def populate_host_ahead(self) -> None:
        """The host tier's next rows backed by memory on the populator thread (else the indexer's), ahead of the
        appends that write them (``HostTier.populate_ahead``): once per append. Caller holds the lock."""
        if self.host is not None:
            self.host.populate_ahead(self._populate_lead, self._populate_worker)

    def native_token(self, k, v):
        """``(k, v, stride_b, stride_h, dtype_code)`` when k and v are one decode token per sequence the C++ append
        takes as they are: ``[B, Hkv, D]`` or ``[B, Hkv, 1, D]`` on the CPU, this layer's shape, a supported dtype,
        rows contiguous (the C++ side reads ``data_ptr`` with the two strides); None otherwise. No view is made: two
        slices cost more than the rest of the checks, with a decode step's caches cold."""
        if type(k) is not torch.Tensor or type(v) is not torch.Tensor:
            return None
        shape, stride, dtype = k.shape, k.stride(), k.dtype
        if len(shape) == 4:
            if shape[2] != 1 or (shape[0], shape[1], shape[3]) != self._decode_shape:
                return None
        elif len(shape) != 3 or shape != self._decode_shape:
            return None
        v_stride = v.stride()  # (a size-1 token dimension's stride is whatever its producer left: not compared)
        if (v.shape != shape or dtype != v.dtype or dtype not in native.DTYPE_CODES or not k.is_cpu or not v.is_cpu
                or stride[:2] != v_stride[:2] or stride[-1] != 1 or v_stride[-1] != 1):
            return None
        return k, v, stride[0], stride[1], native.DTYPE_CODES[dtype]

    def _index_limit(self) -> Optional[float]:
        """The largest |key| or |value| this layer's index takes (``Retriever.value_limit``), None for any."""
        return None if self.dense else RETRIEVERS.load(self.config.retriever).value_limit

    def _value_limit(self) -> float:
        """The largest |key| or |value| this layer stores: attention's ``VALUE_LIMIT``, or its index's if lower."""
        index = self._index_limit()
        return VALUE_LIMIT if index is None else min(index, VALUE_LIMIT)

    def native_layer(self):
        """The LAYER descriptor (csrc/runner/step.h) of this layer's storage, rebuilt when a buffer moved."""
        key = (self.fast.version, self.host.version, getattr(self.retriever, "native_version", 0),
               id(self.fast), id(self.host))
        if self._desc_key != key:
            d = self._desc or native.Descriptor("layer")
            f, h, r = self.fast, self.host, self.retriever
            cpu_fast = f.device.type == "cpu"
            d.set(B=f.batch, HKV=self.kv_heads, D=self.head_dim, KV_DTYPE=native.DTYPE_CODES[self.dtype],
                  SINKS=f.sinks, WINDOW=-1 if f.window is None else f.window, FAST_SLOTS=f.k.shape[2],
                  FAST_K=f.k.data_ptr() if cpu_fast else 0, FAST_V=f.v.data_ptr() if cpu_fast else 0,
                  FAST_STRIDE_B=f.k.stride(0), FAST_STRIDE_H=f.k.stride(1), FAST_STRIDE_N=f.k.stride(2),
                  FAST_LENGTHS=native.address(f.lengths_np), FAST_TOTAL=native.address(f.total),
                  HOST_K=h.k_pool.data_ptr(), HOST_V=h.v_pool.data_ptr(), HOST_STRIDE_H=h.k_pool.stride(0),
                  HOST_STRIDE_N=h.k_pool.stride(1), HOST_TABLE=native.address(h.table),
                  HOST_MAX_BLOCKS=h.table.shape[1], HOST_BLOCK_TOKENS=h.block_tokens,
                  HOST_LENGTHS=native.address(h.length), HOST_CAPACITY=native.address(h.capacity),
                  INDEX_KIND=r.native_kind, INDEX_NTOTAL=native.address(r.ntotal_array),
                  VALUE_LIMIT=native.float_bits(self._value_limit()),
                  INDEX_LIMIT=native.address(r.limit_array), **r.native_tables())
            self._desc, self._desc_key = d, key
        return self._desc

    def _append_native(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """One decode token per sequence (``k, v [B, Hkv, D]`` on the CPU) in one C++ call."""
        ext = native.load()
        flags = self._flags
        idle = int(self.index.idle)
        # the tiers may hold the token before its index add is queued: an interrupt in between leaves the mark,
        # and the next settle heals the gap (nothing written: no gap, the mark is dropped there)
        self.index.begin_write()
        for _ in range(2):
            code = ext.append_decode(self.native_layer().address, k.data_ptr(), v.data_ptr(), k.stride(0),
                                     k.stride(1), native.DTYPE_CODES[k.dtype], idle, self._flags_addr)
            if code == ext.APPEND_NEED_BLOCKS:  # reserve (allocates; nothing written yet), then again
                self.reserve_flagged()
                continue
            if code == ext.APPEND_NOT_FINITE:  # refused, nothing changed: the Python checks say exactly why
                self.index.end_write()
                bad = np.flatnonzero(flags).tolist()
                self.check_append(k, v, None, check_values=True)
                raise InvalidValueError(f"keys or values of sequences {bad} were refused by the native append")
            if code != 0:
                self.queue_native_leftovers()
            self.index.end_write()
            return
        raise RuntimeError("append_decode: host blocks still full after reserving")  # pragma: no cover

    def reserve_flagged(self) -> None:
        """A block for each sequence a refused native append flagged as full (``APPEND_NEED_BLOCKS``: nothing was
        written), so that the same call succeeds when made again. Caller holds the lock."""
        self.host.reserve_all({seq: 1 for seq in np.flatnonzero(self._flags).tolist()})

    def queue_native_leftovers(self) -> None:
        """The index adds a successful native append left to Python (its flags: the host position, or -1). Caller
        holds the lock."""
        flags = self._flags
        for seq in np.flatnonzero(flags >= 0).tolist():
            self.index.add(seq, int(flags[seq]), 1)

    # ---- rolling back ------------------------------------------------------------------------------
    @in_storage_mode
    def crop(self, lengths: Sequence[int]) -> None:
        """Keep the first ``lengths[b]`` tokens of each sequence (at most what it holds): the window gets back the
        tokens that had left it since, and the host tier and the index forget the rest, as if the dropped tokens
        had never been appended."""
        if lengths is None:  # (check_lengths reads None as "all", which for a crop would silently keep everything)
            raise ShapeError("crop(lengths): lengths must be [B] ints, the tokens each sequence keeps; got None")
        with self.lock:
            if not self.initialized:
                return
            lengths = check_lengths(lengths, self.batch, np.iinfo(np.int64).max, "lengths").tolist()
            self.index.check_open()
            self._land_locked()
            with interrupts.deferred():
                self._crop_locked(lengths)

    def take_back_decode_token(self) -> None:
        """Take out the token a decode step just appended to every sequence (the step failed after it went in), as
        if it had never been appended. Caller holds the lock."""
        with interrupts.deferred():
            self._crop_locked((self.fast.total - 1).tolist())

    def _crop_locked(self, lengths: List[int]) -> None:
        """``crop`` with the lock held and the lengths checked."""
        self.index.settle()  # nothing may still be on its way into the index; a failed add heals (reported later)
        fast, host = self.fast, self.host
        s = self.config.sinks if not self.dense else 0
        # every sequence's refill copied before any sequence changes: an allocation that fails then leaves them all
        crops = []
        for seq, n in enumerate(lengths):
            n = min(n, int(fast.total[seq]))
            if n == int(fast.total[seq]):
                continue
            lo, hi = fast.refill_range(seq, n)
            refill_k = host.keys(seq, lo - s, hi - s) if hi > lo else fast.k[seq, :, :0]
            refill_v = host.values(seq, lo - s, hi - s) if hi > lo else fast.v[seq, :, :0]
            keep_host = max(0, lo - s) if not self.dense else 0
            crops.append((seq, n, keep_host, refill_k.to(fast.device, copy=True), refill_v.to(fast.device, copy=True)))
        interrupt = None
        self.index.begin_write()  # an interrupt between a truncate and its tier's leaves them apart: settle checks
        for seq, n, keep_host, refill_k, refill_v in crops:
            if not self.index.broken:
                try:  # reads the removed keys from the tier: before it shrinks
                    self.retriever.truncate(seq, keep_host)
                except BaseException as e:  # the tiers still crop; the index heals from them at the next wait
                    self.index.record_failure(e)
                    interrupt = interrupt or (None if isinstance(e, Exception) else e)
            fast.crop(seq, n, refill_k, refill_v)
            host.truncate(seq, keep_host)
        self.index.end_write()
        fast.sync_lengths()
        if interrupt is not None:
            raise interrupt

    # ---- index -------------------------------------------------------------------------------------
    @in_storage_mode
    def wait_indexed(self) -> None:
        """Block until every token in the host tier has reached the retriever (see ``hetero/indexing.py``)."""
        if self.initialized:
            with self.lock:  # not while an append is half-way through the tier (settle would see its gap)
                self._land_locked()
                self.index.wait()

    def reset(self) -> None:
        """Forget every token (shape facts are kept from the next append)."""
        with self.lock, interrupts.deferred():  # a Ctrl-C half-way would leave a layer no step can use
            self._native_ok = False  # first: the C++ append must not reach tiers being dropped
            try:
                if self._stage is not None:
                    self._stage.drop()
            finally:  # whatever the staging did, the layer ends empty (its index unbound with its tiers)
                self.index.cancel()
                self.fast = self.host = self.retriever = self.head_budget = None
                self._desc_key = None

    # ---- inspection --------------------------------------------------------------------------------
    def tokens(self, seq: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """All keys and values of ``seq`` in logical order, ``[Hkv, L, D]`` each (sinks, host, window): one snapshot,
        read under the layer's lock (not to be called with ``layer.lock`` held)."""
        if not self.initialized:
            raise ShapeError(f"layer {self.layer_idx}'s cache is empty: it holds no tokens of any sequence")
        if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)) or not 0 <= seq < self.batch:
            raise ShapeError(f"seq must be an int in [0, {self.batch}) (the cache's batch), got {seq!r}")
        with self.lock:  # one snapshot: another thread's append moves tokens from the window to the host tier
            self._land_locked()
            if self.fast is None:  # reset by another thread since the checks above
                raise ShapeError(f"layer {self.layer_idx}'s cache is empty: it holds no tokens of any sequence")
            fk, fv = self.fast.tokens(seq)
            ns = min(int(self.fast.total[seq]), self.config.sinks) if not self.dense else fk.shape[1]
            hk, hv = self.host.keys(seq).to(fk.device), self.host.values(seq).to(fk.device)
            return (torch.cat([fk[:, :ns], hk, fk[:, ns:]], dim=1), torch.cat([fv[:, :ns], hv, fv[:, ns:]], dim=1))

    def memory(self) -> Dict[str, int]:
        """Bytes per tier: the tokens the fast and host tiers hold, and the retriever's index as allocated. What the
        tiers allocate is more: the fast tier's sinks + window slots from the first append on, the host tier in whole
        blocks of ``block_tokens`` (and room reserved ahead)."""
        if not self.initialized:
            return dict.fromkeys(MEMORY_KEYS, 0)
        with self.lock:
            self._land_locked()
            if self.fast is None:  # reset by another thread since the check above
                return dict.fromkeys(MEMORY_KEYS, 0)
            return {"fast_bytes": self.fast.nbytes(), "host_bytes": self.host.nbytes(),
                    "index_bytes": self.retriever.memory_bytes()}


def total_memory(layers: Sequence[LayerCache]) -> Dict[str, int]:
    """``LayerCache.memory()`` summed over ``layers``."""
    total = dict.fromkeys(MEMORY_KEYS, 0)
    for layer in layers:
        for k, v in layer.memory().items():
            total[k] += v
    return total


def new_populator() -> Worker:
    """The populate thread a model's cache gives its layers (``LayerCache(populator=...)``): a few asks queued at
    most, since a populate that cannot start at once is skipped and asked again at the next append."""
    return Worker("hetero-populate", max_pending=4)


class TieredKVCache:
    """KV cache of a whole model: ``layers[i]`` is layer ``i``'s ``LayerCache``; ``indexer`` and ``populator``
    (optional ``hetero.worker.Worker``s, ``LayerCache``'s) serve every layer. Without a populator the cache makes
    one thread for all its layers (as the HF cache does): without it, a layer with no indexer, or whose indexer is
    busy with its adds, backs no host page ahead, and every layer takes the first-touch faults of a new 2 MiB of
    each KV head on the same token (~5 ms a page on a VM whose host backs guest memory at first touch)."""

    def __init__(self, config: HeteroConfig, num_layers: int, indexer=None, populator=None):
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ConfigError(f"num_layers must be an int >= 1, got {num_layers!r}")
        self.config = config
        if populator is None:
            populator = new_populator()  # a daemon, stopped when the cache is collected
        self.populator = populator
        self.layers = [LayerCache(config, i, indexer, populator) for i in range(num_layers)]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, idx: int) -> LayerCache:
        return self.layers[idx]

    def memory(self) -> Dict[str, int]:
        """Bytes per tier summed over layers (``LayerCache.memory``'s keys)."""
        return total_memory(self.layers)

    def crop(self, lengths: Sequence[int]) -> None:
        for layer in self.layers:
            layer.crop(lengths)

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
