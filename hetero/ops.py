"""Standalone attention operations over q/k/v tensors, validated and dispatched to a backend.

These are the building blocks ``HeteroAttention`` uses; call them directly to run one part yourself. Every input is
checked (``hetero.validation``) before a kernel reads memory. The backends they run belong to this module (one
instance per backend, shared by the callers of these functions; their native pools serialize concurrent calls).
"""
from __future__ import annotations

import threading
from typing import Optional

import torch

from .backends import AttentionInputs, BackendSet
from .config import MAX_THREADS
from .errors import InvalidValueError, ShapeError
from .merge import merge
from .reference import default_scale
from .types import HostView, PartialAttention, Selection
from .validation import (KV_STORAGE_DTYPES, check_float, check_in_range, check_host_view, check_kv, check_lengths,
                         check_query, check_scale, check_selected_rows, check_selection)

_backends = BackendSet()
_lock = threading.Lock()


def _select(side: str, requested: str, inputs: AttentionInputs):
    with _lock:
        return _backends.select(side, requested, inputs)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None, backend: str = "auto") -> PartialAttention:
    """Decode attention over the fast tier (sinks + window).

    q: ``[B, Hq, D]`` float; k, v: ``[B, Hkv, L, D]`` float32/bfloat16/float16, ``Hq = G * Hkv``, no NaN or inf in
    their valid slots; lengths: ``[B]`` ints, valid slots per sequence (default ``L``). Returns PartialAttention
    (``out [B, Hq, D]``, ``lse [B, Hq]`` float32, natural log).
    """
    check_kv(k, v)
    check_float(k, "k", KV_STORAGE_DTYPES)  # what the fast tier stores (its backends take no other)
    check_query(q, k.shape[1], k.shape[3], k.shape[0])
    check_scale(scale)
    if q.device != k.device:
        raise ShapeError(f"q is on {q.device}, k and v on {k.device}")
    lengths = check_lengths(lengths, k.shape[0], k.shape[2])
    for name, x in (("k", k), ("v", v)):
        if int(lengths.min()) == k.shape[2]:
            check_in_range(x, name)
        else:
            for b, n in enumerate(lengths.tolist()):
                check_in_range(x[b, :, :n], f"{name}[{b}] (its {n} valid slots)")
    inputs = AttentionInputs(k.device, k.dtype, k.shape[3], q.shape[1], k.shape[1], k.shape[0])
    impl = _select("window", backend, inputs)
    return impl(q, k, v, lengths.to(k.device), default_scale(q.shape[-1]) if scale is None else scale)


def sparse_attention(q: torch.Tensor, host: HostView, selection: Selection, scale: Optional[float] = None,
                     backend: str = "auto", threads: Optional[int] = None) -> PartialAttention:
    """Attention over host-tier rows chosen by ``selection`` (the host part).

    q: ``[B, Hq, D]`` float (host memory); host: ``HostView`` (``k_pool``/``v_pool`` ``[Hkv, R, D]``, a block table
    whose used entries are blocks of the pools); selection: indices ``[B, Hkv, k]`` (-1 skipped), optional log_weight
    ``[B, Hq, k]``, optional estimate of the unselected rows (merged into the result). Returns PartialAttention on
    the host.
    """
    check_host_view(host)
    hkv, d = host.k_pool.shape[0], host.k_pool.shape[2]
    check_query(q, hkv, d, host.block_table.shape[0])
    check_scale(scale)
    if q.device.type != "cpu":
        raise ShapeError(f"q must be in host memory for the host part, got {q.device}")
    check_selection(selection, q.shape[0], q.shape[1], hkv, host.lengths.tolist(), d)
    check_selected_rows(host, selection)
    inputs = AttentionInputs(torch.device("cpu"), host.k_pool.dtype, d, q.shape[1], hkv, q.shape[0])
    impl = _select("host", backend, inputs)
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
            raise InvalidValueError(f"threads must be None or an int in [1, {MAX_THREADS}], got {threads!r}")
        impl.set_threads(threads)
    part = impl(q, host, selection, default_scale(d) if scale is None else scale)
    return part if selection.estimate is None else merge([part, selection.estimate])
