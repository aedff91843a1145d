"""The tiered KV cache: a list of per-layer caches (like transformers' ``cache_utils``), each with a
fast tier (sinks + recent window), a host tier (everything older) and the retriever over the host tier.

Every token of every sequence is in exactly one tier. A call rejected for bad input changes nothing.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

import torch

from .config import HeteroConfig
from .errors import DTypeError, ShapeError
from .tiers import FastTier, HostTier
from .reference import default_scale
from .timing import Span
from .validation import check_finite, check_float, check_lengths, check_tensor

_KV_LAYOUT = "[B, Hkv, T, D] (or [B, Hkv, D] for one decode token)"


class LayerCache:
    """KV cache of one attention layer for a batch of sequences of different lengths.

    Created empty; the first ``append`` fixes batch size, KV heads, head dim, device (the fast tier's,
    from the keys) and storage dtype (``config.kv_dtype`` or the keys' dtype).

    Indexing: tokens pushed out of the window are copied into the host tier at once; handing them to the
    retriever (``add``) runs on ``indexer`` (a ``hetero.worker.Worker``) when one is given, else inline. An
    add the retriever calls constant-time (``cheap_add``: a decode step's keys into ivf-group's tail list)
    runs inline when nothing is queued ahead of it: on two cores the hand-off to the worker cost ~0.7 ms of
    GIL waiting for ~0.05 ms of work.
    ``wait_indexed()`` (called before every search) waits for this layer's queued adds, so a search always
    sees every token evicted before it. A failed add re-raises there, with the layer named, after the
    index is rebuilt from the host tier (the tokens themselves are never lost).
    """

    def __init__(self, config: HeteroConfig, layer_idx: int = 0, indexer=None):
        self.config = config
        self.layer_idx = layer_idx
        self.indexer = indexer
        self._pending = []  # futures of queued retriever adds, oldest first
        self.dense = layer_idx in config.dense_layers
        self.fast: Optional[FastTier] = None
        self.host: Optional[HostTier] = None
        self.retriever = None
        self.head_budget = None  # per-head budget state (hetero.budgets), created by HeteroAttention
        # "index_add" spans of recent adds (thread and times; the profiler's trace), at most 256 kept
        self.add_spans: Deque[Span] = deque(maxlen=256)

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

    def seq_lengths(self) -> List[int]:
        """Logical length (all tiers) of each sequence."""
        return list(self.fast.total) if self.fast is not None else []

    def host_lengths(self) -> List[int]:
        return list(self.host.length) if self.host is not None else []

    # ---- mutation ----------------------------------------------------------------------------------
    def _init(self, keys: torch.Tensor) -> None:
        from hetero.retrieval import retriever_class

        b, hkv, _, d = keys.shape
        dtype = self.config.torch_kv_dtype or keys.dtype
        window = None if self.dense else self.config.window
        self.fast = FastTier(b, hkv, d, self.config.sinks, window, dtype, keys.device)
        self.host = HostTier(b, hkv, d, dtype, self.config.block_tokens,
                             pin_memory=keys.device.type == "cuda")
        cls = retriever_class(self.config.retriever)
        self.retriever = cls(self.host, group_rule=self.config.group_rule, **self.config.retriever_options)
        self.retriever.softmax_scale = self.config.scale or default_scale(d)
        self.retriever.report_missed = self.config.head_budget == "adaptive"

    def check_append(self, keys: torch.Tensor, values: torch.Tensor, lengths=None):
        """Validate an ``append`` without changing anything; returns normalized (keys, values, lengths), lengths
        as B ints."""
        rank = keys.dim() if isinstance(keys, torch.Tensor) and keys.dim() == 3 else 4
        keys = check_tensor(keys, "keys", rank, _KV_LAYOUT)
        values = check_tensor(values, "values", rank, _KV_LAYOUT)
        if keys.dim() == 3:
            keys, values = keys.unsqueeze(2), values.unsqueeze(2)
        if keys.shape != values.shape:
            raise ShapeError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must have the same shape")
        check_float(keys, "keys")
        check_float(values, "values")
        if keys.dtype != values.dtype:
            raise DTypeError(f"keys ({keys.dtype}) and values ({values.dtype}) must have the same dtype")
        if keys.device != values.device:
            raise ShapeError(f"keys on {keys.device} and values on {values.device} must share a device")
        b, hkv, t, d = keys.shape
        if b == 0:
            raise ShapeError("empty batch: keys have B = 0 sequences")
        if hkv == 0 or d == 0:
            raise ShapeError(f"keys {tuple(keys.shape)} need Hkv >= 1 and D >= 1")
        if self.initialized:
            want = (self.batch, self.kv_heads, self.head_dim)
            if (b, hkv, d) != want:
                raise ShapeError(
                    f"keys {tuple(keys.shape)} do not match layer {self.layer_idx}'s cache: expected "
                    f"[B={want[0]}, Hkv={want[1]}, T, D={want[2]}]"
                )
            if keys.device != self.device:
                raise ShapeError(f"keys on {keys.device}, but layer {self.layer_idx}'s fast tier is on {self.device}")
        lengths = [t] * b if lengths is None else check_lengths(lengths, b, t).tolist()  # no tensor when None
        for name, x in (("keys", keys), ("values", values)):
            check_finite(x if min(lengths) == t else _used(x, lengths), name)
        return keys, values, lengths

    def append(self, keys: torch.Tensor, values: torch.Tensor, lengths=None) -> None:
        """Append new tokens (a prefill chunk or one decode token) to every sequence.

        keys, values: ``[B, Hkv, T, D]`` (or ``[B, Hkv, D]``), post-RoPE, any float dtype (stored as the
        cache's dtype). lengths: optional ``[B]`` ints; sequence ``b`` takes ``keys[b, :, :lengths[b]]``
        (default all ``T``). Tokens pushed out of the window move to the host tier and its retriever.
        """
        keys, values, lengths = self.check_append(keys, values, lengths)
        if not self.initialized:
            self._init(keys)
        keys, values = keys.to(self.dtype), values.to(self.dtype)
        for seq, n in enumerate(lengths):
            if n == 0:
                continue
            evicted_k, evicted_v = self.fast.append(seq, keys[seq, :, :n], values[seq, :, :n])
            if evicted_k.shape[1]:
                evicted_k, evicted_v = evicted_k.cpu(), evicted_v.cpu()
                self.host.append(seq, evicted_k, evicted_v)
                background = self.indexer is not None and not (  # queued work first: then the index is idle
                    all(f.done() for f in self._pending) and self.retriever.cheap_add(seq, evicted_k.shape[1]))
                if background:
                    self._pending.append(self.indexer.submit(self._timed_add, seq, evicted_k))
                else:  # no indexer, or an O(1) add with nothing queued ahead of it (order is kept either way)
                    self._timed_add(seq, evicted_k)

    def _timed_add(self, seq: int, keys: torch.Tensor) -> None:
        start = time.perf_counter()
        try:
            self.retriever.add(seq, keys)
        finally:
            self.add_spans.append(Span("index_add", start, time.perf_counter(), threading.current_thread().name))

    def wait_indexed(self) -> None:
        """Block until every token in the host tier has reached the retriever (see the class docstring)."""
        from .errors import HeteroError

        pending, self._pending = self._pending, []
        failure = None
        for fut in pending:
            try:
                fut.result()
            except Exception as e:  # keep draining: later adds may have queued behind the failed one
                failure = failure or e
        if failure is not None:
            self.resync_index()
            raise HeteroError(f"layer {self.layer_idx}: adding evicted tokens to the {self.config.retriever!r} "
                              f"index failed ({type(failure).__name__}: {failure}); the index was rebuilt from the "
                              "host tier") from failure

    def resync_index(self) -> None:
        """Rebuild the retriever from the host tier (every token the tier holds, in order)."""
        self.retriever.reset()
        for seq in range(self.batch):
            if self.host.length[seq]:
                self.retriever.add(seq, self.host.keys(seq))

    def reset(self) -> None:
        """Forget every token (shape facts are kept from the next append)."""
        for fut in self._pending:
            fut.cancel()
        self._pending = []
        self.fast = self.host = self.retriever = self.head_budget = None

    # ---- inspection --------------------------------------------------------------------------------
    def tokens(self, seq: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """All keys and values of ``seq`` in logical order, ``[Hkv, L, D]`` each (sinks, host, window)."""
        fk, fv = self.fast.tokens(seq)
        ns = min(self.fast.total[seq], self.config.sinks) if not self.dense else fk.shape[1]
        hk, hv = self.host.keys(seq).to(fk.device), self.host.values(seq).to(fk.device)
        return (torch.cat([fk[:, :ns], hk, fk[:, ns:]], dim=1), torch.cat([fv[:, :ns], hv, fv[:, ns:]], dim=1))

    def memory(self) -> Dict[str, int]:
        """Bytes per tier: stored tokens of the fast and host tiers, and the retriever's own index."""
        if not self.initialized:
            return {"fast_bytes": 0, "host_bytes": 0, "index_bytes": 0}
        return {"fast_bytes": self.fast.nbytes(), "host_bytes": self.host.nbytes(),
                "index_bytes": self.retriever.memory_bytes()}


def _used(x: torch.Tensor, lengths: List[int]) -> torch.Tensor:
    """The appended part of a ragged chunk, flattened (padding beyond ``lengths`` may hold anything)."""
    return torch.cat([x[b, :, :n].reshape(-1) for b, n in enumerate(lengths)])


class TieredKVCache:
    """KV cache of a whole model: ``layers[i]`` is layer ``i``'s ``LayerCache``; ``indexer`` (optional
    ``hetero.worker.Worker``) indexes evicted tokens in the background for every layer."""

    def __init__(self, config: HeteroConfig, num_layers: int, indexer=None):
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ShapeError(f"num_layers must be an int >= 1, got {num_layers!r}")
        self.config = config
        self.layers = [LayerCache(config, i, indexer) for i in range(num_layers)]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, idx: int) -> LayerCache:
        return self.layers[idx]

    def memory(self) -> Dict[str, int]:
        total = {"fast_bytes": 0, "host_bytes": 0, "index_bytes": 0}
        for layer in self.layers:
            for k, v in layer.memory().items():
                total[k] += v
        return total

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
