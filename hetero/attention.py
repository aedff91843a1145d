"""``HeteroAttention``: one decode step of one layer = window part (fast device) + host part (retriever +
CPU kernel) fused exactly by log-sum-exp."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from .backends import HostBackend, WindowBackend, select_backend
from .budgets import AdaptiveHeadBudget
from .cache import LayerCache
from .config import HeteroConfig
from .errors import ShapeError
from .merge import merge
from .ops import check_query, check_selection
from .reference import default_scale
from .timing import PhaseRecorder, Span
from .types import PartialAttention, Selection


@dataclass
class DecodeResult:
    """What ``HeteroAttention.run(..., return_details=True)`` returns.

    out: ``[B, Hq, D]`` in the query dtype. window, host: the two PartialAttentions (float32).
    selection: the retriever's choice (None when the host part was empty). timings_ms: ms per phase
    (window, transfer, retrieve, host_attn, merge). rows_read: selected host rows, padding excluded,
    summed over sequences and KV heads.
    """

    out: torch.Tensor
    window: PartialAttention
    host: PartialAttention
    selection: Optional[Selection]
    timings_ms: Dict[str, float]
    spans: List[Span] = field(default_factory=list)
    rows_read: int = 0


class HeteroAttention:
    """Decode attention over a ``LayerCache``.

    Usage per decode step: append the new token's K/V to each layer's cache, then ``run(q, layer)``.
    ``plan(layer)`` resolves backends and thread counts; ``run`` calls it when the layer's geometry
    changes, so calling it yourself is optional.
    """

    def __init__(self, config: HeteroConfig):
        if not isinstance(config, HeteroConfig):
            raise ShapeError(f"config must be a HeteroConfig, got {type(config).__name__}")
        self.config = config
        self._plans: Dict[Tuple, Tuple[WindowBackend, HostBackend]] = {}

    def plan(self, layer: LayerCache) -> Tuple[WindowBackend, HostBackend]:
        """Backends for this layer's device, dtype and head dim (cached), and the thread count."""
        if not layer.initialized:
            raise ShapeError(f"layer {layer.layer_idx}'s cache is empty: append the prompt's keys first")
        key = (layer.device, layer.dtype, layer.head_dim)
        if key not in self._plans:
            q_probe = torch.empty(layer.batch, layer.kv_heads, layer.head_dim, device=layer.device)
            window = select_backend("window", self.config.window_backend,
                                    lambda be: be.not_supported_reasons(q_probe, layer.fast.k), device=layer.device)
            host_view = layer.host.view()
            host = select_backend("host", self.config.host_backend,
                                  lambda be: be.not_supported_reasons(q_probe.cpu(), host_view),
                                  device=torch.device("cpu"))
            host.set_threads(self.config.resolved_threads)
            self._plans[key] = (window, host)
        torch.set_num_threads(self.config.resolved_threads)
        return self._plans[key]

    def budgets(self, layer: LayerCache):
        """Keys per query head: ``[B]`` (flat) or ``[B, Hkv]`` (adaptive), from the config's budget, the
        host-tier sizes and, when adaptive, the layer's previous steps."""
        flat = [self.config.budget_for(n) for n in layer.host.length]
        if self.config.head_budget == "flat":
            return flat
        if layer.head_budget is None:
            layer.head_budget = AdaptiveHeadBudget(layer.batch, layer.kv_heads)
        return layer.head_budget.split(flat)

    def run(self, q: torch.Tensor, layer: LayerCache, return_details: bool = False):
        """Attention of decode queries over every token of ``layer`` (fast and host tiers).

        q: ``[B, Hq, D]`` float, post-RoPE, on the fast tier's device; ``Hq = G * Hkv``.
        Returns ``out [B, Hq, D]`` in q's dtype, or a ``DecodeResult`` with the parts and timings.
        """
        if not isinstance(layer, LayerCache):
            raise ShapeError(f"layer must be a LayerCache, got {type(layer).__name__}")
        window_be, host_be = self.plan(layer)
        check_query(q, layer.kv_heads, layer.head_dim, layer.batch)
        if q.device != layer.device:
            raise ShapeError(f"q is on {q.device}, layer {layer.layer_idx}'s fast tier on {layer.device}")
        scale = self.config.scale or default_scale(layer.head_dim)
        rec = PhaseRecorder()
        b, hq, d = q.shape
        with rec.span("window"):
            wpart = window_be(q, layer.fast.k, layer.fast.v, layer.fast.lengths, scale)
        selection, rows = None, 0
        if layer.dense or sum(layer.host.length) == 0:
            hpart = PartialAttention.empty(b, hq, d, device=q.device)
        else:
            with rec.span("transfer"):
                q_host = q.detach().to("cpu", torch.float32)
            with rec.span("retrieve"):
                selection = layer.retriever.search(q_host, self.budgets(layer))
            check_selection(selection, b, hq, layer.kv_heads, layer.host.length)
            with rec.span("host_attn"):
                hpart = host_be(q_host, layer.host.view(), selection, scale)
            with rec.span("transfer"):
                hpart = PartialAttention(hpart.out.to(q.device), hpart.lse.to(q.device))
            rows = int((selection.indices >= 0).sum())
            if layer.head_budget is not None:
                layer.head_budget.update(wpart, hpart)
        with rec.span("merge"):
            merged = merge([wpart, hpart])
            out = merged.out.to(q.dtype)
        if not return_details:
            return out
        return DecodeResult(out, wpart, hpart, selection, rec.totals_ms(), rec.spans, rows)
