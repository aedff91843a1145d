"""``HeteroAttention``: one decode step of one layer = window part (fast device) + host part (retriever +
CPU kernel) fused exactly by log-sum-exp, the two parts running concurrently when the window is on a GPU.

Per step and layer: the query goes to the host (pinned staging and a side stream on CUDA); the host side
(wait for pending index adds, search, host kernel, result back) runs on a persistent worker thread while
the window kernel runs on the caller's thread (the native host kernels release the GIL); then the parts are
merged. Run side by side or one after the other (bit-identical results): ``HeteroConfig.overlap``, by default
side by side when the fast tier is on CUDA and one after the other when it shares the CPU with the host side.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .backends import HostBackend, WindowBackend, select_backend
from .balance import Balancer
from .budgets import AdaptiveHeadBudget
from .cache import LayerCache
from .config import HeteroConfig
from .errors import HeteroError, ShapeError
from .merge import merge
from .ops import check_query, check_selection, with_estimate
from .reference import default_scale
from .timing import PhaseRecorder, Span
from .types import PartialAttention, Selection
from .worker import Worker


@dataclass
class DecodeResult:
    """What ``HeteroAttention.run(..., return_details=True)`` returns.

    out: ``[B, Hq, D]`` in the query dtype. window, host: the two PartialAttentions (float32).
    selection: the retriever's choice (None when the host part was empty). timings_ms: ms per phase
    (window, transfer, retrieve, host_attn, merge; phases of the two sides overlap in time). spans: the
    phases with start/end times and thread names. rows_read: selected host rows, padding excluded, summed
    over sequences and KV heads. critical: the side the step waited on ("window" or "host").
    """

    out: torch.Tensor
    window: PartialAttention
    host: PartialAttention
    selection: Optional[Selection]
    timings_ms: Dict[str, float]
    spans: List[Span] = field(default_factory=list)
    rows_read: int = 0
    critical: Optional[str] = None
    window_ms: float = 0.0
    host_ms: float = 0.0


@dataclass
class _Plan:
    window: WindowBackend
    host: HostBackend
    staging: Optional[torch.Tensor] = None  # pinned [B, Hq, D] float32 query staging (CUDA only)


class HeteroAttention:
    """Decode attention over a ``LayerCache``.

    Usage per decode step: append the new token's K/V to each layer's cache, then ``run(q, layer)``.
    ``plan(layer)`` resolves backends, thread split and staging buffers once per layer geometry; ``run``
    calls it, so calling it yourself is optional. ``close()`` stops the host worker (also done at exit).
    ``native_trace = True``: ``run(..., return_details=True)`` also returns the busy spans of the native kernels'
    own pool threads (one per thread and call), so a trace shows every thread that worked.
    """

    def __init__(self, config: HeteroConfig, host_worker: Optional[Worker] = None):
        if not isinstance(config, HeteroConfig):
            raise ShapeError(f"config must be a HeteroConfig, got {type(config).__name__}")
        self.config = config
        self._plans: Dict[Tuple, _Plan] = {}
        self._own_worker = host_worker is None  # created on the first overlapped step
        self._worker = host_worker
        self._balancers: Dict[Tuple, Balancer] = {}
        self._stream = None
        self.native_trace = False

    def close(self) -> None:
        if self._own_worker and self._worker is not None:
            self._worker.close()

    def _host_worker(self) -> Worker:
        if self._worker is None:
            self._worker = Worker("hetero-host")
        return self._worker

    def balancer(self, layer: LayerCache) -> Balancer:
        key = (layer.layer_idx, layer.device)
        if key not in self._balancers:
            self._balancers[key] = Balancer(self.config.resolved_threads, layer.device.type == "cuda",
                                            self.config.balance == "auto")
        return self._balancers[key]

    def plan(self, layer: LayerCache) -> _Plan:
        """Backends for this layer's device, dtype and head dim (cached), staging buffers, thread split."""
        if not layer.initialized:
            raise ShapeError(f"layer {layer.layer_idx}'s cache is empty: append the prompt's keys first")
        key = (layer.device, layer.dtype, layer.head_dim, layer.batch, layer.kv_heads)
        if key not in self._plans:
            q_probe = torch.empty(layer.batch, layer.kv_heads, layer.head_dim, device=layer.device)
            window = select_backend("window", self.config.window_backend,
                                    lambda be: be.not_supported_reasons(q_probe, layer.fast.k), device=layer.device)
            host_view = layer.host.view()
            host = select_backend("host", self.config.host_backend,
                                  lambda be: be.not_supported_reasons(q_probe.cpu(), host_view),
                                  device=torch.device("cpu"))
            self._plans[key] = _Plan(window, host)
        split = self.balancer(layer).split()
        plan = self._plans[key]
        overlap = self.config.overlap_on(layer.device)
        if layer.device.type == "cpu":
            plan.window.set_threads(split.window_threads if overlap else self.config.resolved_threads)
        host_threads = split.host_threads if overlap else self.config.resolved_threads
        plan.host.set_threads(host_threads)
        layer.retriever.set_threads(host_threads)
        for part in (plan.window, plan.host, layer.retriever):
            part.set_native_trace(self.native_trace)
        return plan

    def budgets(self, layer: LayerCache, group: int):
        """Keys per query head: ``[B]`` (flat) or ``[B, Hkv]`` (adaptive), from the config's budget, the
        host-tier sizes, the group size ``G = Hq / Hkv`` (``budget_per="kv_head"`` splits a KV head's rows over
        its G query heads), the auto balance's scale and, when adaptive, the layer's previous steps."""
        scale = self.balancer(layer).budget_scale
        flat = [self.config.budget_for(n, scale) for n in layer.host.length]
        if self.config.budget_per == "kv_head" and self.config.group_rule != "sum":
            flat = [k if k >= n else -(-k // group) for k, n in zip(flat, layer.host.length)]
        if self.config.head_budget == "flat":
            return flat
        if layer.head_budget is None:
            layer.head_budget = AdaptiveHeadBudget(layer.batch, layer.kv_heads)
        return layer.head_budget.split(flat)

    # ---- the two sides ------------------------------------------------------------------------------
    def _query_to_host(self, q: torch.Tensor, plan: _Plan):
        """The query as float32 on the host, and an event to wait on before reading it (CUDA)."""
        if q.device.type != "cuda":
            return q.detach().to(torch.float32), None
        if plan.staging is None or plan.staging.shape != q.shape:
            plan.staging = torch.empty(q.shape, dtype=torch.float32, pin_memory=True)
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=q.device)
        self._stream.wait_stream(torch.cuda.current_stream(q.device))
        with torch.cuda.stream(self._stream):
            plan.staging.copy_(q.detach(), non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        return plan.staging, ready

    def _host_side(self, q_host, ready, layer: LayerCache, plan: _Plan, scale: float, rec: PhaseRecorder):
        t0 = time.perf_counter()
        if ready is not None:
            with rec.span("transfer"):
                ready.synchronize()
        with rec.span("index_wait"):
            layer.wait_indexed()
        with rec.span("retrieve"):
            selection = layer.retriever.search(q_host, self.budgets(layer, q_host.shape[1] // layer.kv_heads))
        check_selection(selection, q_host.shape[0], q_host.shape[1], layer.kv_heads, layer.host.length,
                        layer.head_dim)
        with rec.span("host_attn"):
            hpart = with_estimate(plan.host(q_host, layer.host.view(), selection, scale), selection)
        return hpart, selection, (time.perf_counter() - t0) * 1e3

    def run(self, q: torch.Tensor, layer: LayerCache, return_details: bool = False):
        """Attention of decode queries over every token of ``layer`` (fast and host tiers).

        q: ``[B, Hq, D]`` float, post-RoPE, on the fast tier's device; ``Hq = G * Hkv``.
        Returns ``out [B, Hq, D]`` in q's dtype, or a ``DecodeResult`` with the parts and timings.
        """
        if not isinstance(layer, LayerCache):
            raise ShapeError(f"layer must be a LayerCache, got {type(layer).__name__}")
        plan = self.plan(layer)
        check_query(q, layer.kv_heads, layer.head_dim, layer.batch)
        if q.device != layer.device:
            raise ShapeError(f"q is on {q.device}, layer {layer.layer_idx}'s fast tier on {layer.device}")
        scale = self.config.scale or default_scale(layer.head_dim)
        rec = PhaseRecorder()
        b, hq, d = q.shape
        has_host = not layer.dense and sum(layer.host.length) > 0
        future = None
        if has_host:
            with rec.span("transfer"):
                q_host, ready = self._query_to_host(q, plan)
            if self.config.overlap_on(layer.device):
                future = self._host_worker().submit(self._host_side, q_host, ready, layer, plan, scale, rec)
        t0 = time.perf_counter()
        with rec.span("window"):
            wpart = plan.window(q, layer.fast.k, layer.fast.v, layer.fast.lengths, scale)
        window_ms = (time.perf_counter() - t0) * 1e3
        selection, rows, host_ms = None, 0, 0.0
        if has_host:
            try:
                if future is not None:
                    hpart, selection, host_ms = future.result()
                else:
                    hpart, selection, host_ms = self._host_side(q_host, ready, layer, plan, scale, rec)
            except HeteroError:
                raise
            except Exception as e:
                raise HeteroError(f"host side of layer {layer.layer_idx} failed ({type(e).__name__}: {e})") from e
            with rec.span("transfer"):
                hpart = PartialAttention(hpart.out.to(q.device, non_blocking=True),
                                         hpart.lse.to(q.device, non_blocking=True))
            idx = selection.indices  # numpy on the host: a torch reduction costs ~50 us with the step's caches cold
            rows = int(np.count_nonzero(idx.numpy() >= 0)) if idx.device.type == "cpu" else int((idx >= 0).sum())
            if layer.head_budget is not None:
                layer.head_budget.update(wpart, hpart, layer.retriever)
        else:
            hpart = PartialAttention.empty(b, hq, d, device=q.device)
        balancer = self.balancer(layer)
        if has_host:
            n = max(layer.host.length)
            k_now = self.config.budget_for(n, balancer.budget_scale)
            floor = self.config.budget_for(n, 0.0)
            balancer.record(window_ms, host_ms, can_lower=k_now > floor,
                            can_raise=k_now < min(n, 2 * self.config.budget_for(n)))
        with rec.span("merge"):
            merged = merge([wpart, hpart])
            out = merged.out.to(q.dtype)
        native = [s for part in (plan.window, plan.host, layer.retriever) for s in part.take_native_spans()] \
            if self.native_trace else []  # taken every step: nothing piles up when no details are asked for
        if not return_details:
            return out
        return DecodeResult(out, wpart, hpart, selection, rec.totals_ms(), rec.spans + native, rows,
                            balancer.critical if has_host else "window", window_ms, host_ms)
