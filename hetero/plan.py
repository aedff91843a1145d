"""The step plan (FlashInfer's plan/run): made once per decode step for every layer of a cache, used by
``HeteroAttention.run`` for each layer.

A plan fixes what every layer's step shares: the geometry (batch, heads, head dim, dtypes, device), the resolved
backends, whether the fused C++ step runs, the keys each query head reads per sequence and KV head, and the
workspaces each layer's step writes (the query in float32 — pinned on CUDA —, the window and host parts, the
selection buffers, the output). Workspaces belong to the runtime and are reused across steps while the geometry
holds. A plan stays valid while the lengths grow or shrink (it reads them at each step); used with another geometry
(batch, heads, dtypes, device) it raises ``StalePlanError``.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Dict, List, MutableMapping, Optional

import numpy as np
import torch

from . import native
from .backends import AttentionInputs, Backend
from .errors import StalePlanError
from .native_pool import SearchPool
from .timing import NATIVE_PHASES
from .types import Selection


@dataclass(frozen=True)
class StepGeometry:
    """What a plan is valid for: ``[B, Hq, D]`` queries of ``q_dtype`` over ``Hkv`` KV heads of ``kv_dtype``, the
    fast tier on ``device``."""

    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    kv_dtype: torch.dtype
    q_dtype: torch.dtype
    device: torch.device

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    def inputs(self, device: Optional[torch.device] = None) -> AttentionInputs:
        return AttentionInputs(device or self.device, self.kv_dtype, self.head_dim, self.q_heads, self.kv_heads,
                               self.batch)


class LayerWorkspace:
    """The buffers one layer's step writes, kept across steps (``kmax``: room for that many keys per query).

    q32 ``[B, Hq, D]`` float32 (pinned on CUDA: the host side reads the query there); win/host/est ``out [B, Hq, D]``
    and ``lse [B, Hq]`` float32 (host parts pinned on CUDA: copied to the device without a sync); the ivf-group
    search's per item (``b * Hkv + h``) keys, probe mask, top ids, union and its sizes; ``out`` ``[B, Hq, D]`` in the
    query dtype on the fast device; ``times``: the native phases' start and end (``hetero/native.py``)."""

    def __init__(self, g: StepGeometry, kmax: int, max_lists: int):
        b, hq, hkv, d = g.batch, g.q_heads, g.kv_heads, g.head_dim
        items = b * hkv
        pin = g.device.type == "cuda"

        def host(*shape, dtype=torch.float32):
            return torch.empty(shape, dtype=dtype, pin_memory=pin)

        self.kmax, self.max_lists = kmax, max_lists
        self.q32 = host(b, hq, d)
        self.q_host = host(b, hq, d, dtype=g.q_dtype) if pin else None  # the query as it comes off the device
        self.win_out, self.win_lse = torch.empty(b, hq, d), torch.empty(b, hq)
        self.host_out, self.host_lse = host(b, hq, d), host(b, hq)
        self.est_out, self.est_lse = torch.empty(b, hq, d), torch.empty(b, hq)
        self.k = np.zeros(items, dtype=np.int64)
        self.probe = np.zeros((items, max_lists), dtype=np.uint8)
        self.top = np.zeros((items, g.group, max(kmax, 1)), dtype=np.int32)
        self.union = np.full((items, g.group * max(kmax, 1)), -1, dtype=np.int32)
        self.union_count = np.zeros(items, dtype=np.int64)
        self.scanned = np.zeros(items, dtype=np.int64)
        self.times = np.zeros(2 * len(NATIVE_PHASES), dtype=np.float64)  # start / end of each phase
        self.out = torch.empty(b, hq, d, dtype=g.q_dtype, device=g.device)
        self.lse = torch.empty(b, hq)
        if g.device.type == "cuda":
            self.host_out_dev = torch.empty(b, hq, d, device=g.device)
            self.host_lse_dev = torch.empty(b, hq, device=g.device)
        self.last_call = None  # the formats the WORK descriptor was last set for (HeteroAttention._prepare_work)
        self.selection = None  # a Python selection the descriptor points at, kept alive until the next call
        self.work = native.Descriptor("work") if native.load() is not None else None
        if self.work is not None:
            self.work.set(HQ=hq, Q32=native.address(self.q32), WIN_OUT=native.address(self.win_out),
                          WIN_LSE=native.address(self.win_lse), HOST_OUT=native.address(self.host_out),
                          HOST_LSE=native.address(self.host_lse), IVF_K=native.address(self.k), IVF_KMAX=kmax,
                          IVF_PROBE=native.address(self.probe), IVF_PROBE_STRIDE=max_lists,
                          IVF_TOP=native.address(self.top),
                          IVF_UNION=native.address(self.union), IVF_UNION_COUNT=native.address(self.union_count),
                          IVF_SCANNED=native.address(self.scanned), IVF_EST_OUT=native.address(self.est_out),
                          IVF_EST_LSE=native.address(self.est_lse), LSE_OUT=native.address(self.lse))


class StepPlan:
    """One decode step's plan over a cache's layers (``HeteroAttention.plan``).

    geometry: ``StepGeometry``. window, host: the resolved backends. fused: the layers' steps run as one C++ call
    each (``hetero/native.py``). workspaces: each LayerCache's buffers, keyed by the layer itself (weakly), so that
    two caches' layers of the same index never share one. search_pool: the native pool of the searches made in
    Python (``search``). owner: the ``HeteroAttention`` that made it (its config, backends and pools are the plan's;
    another runtime refuses it).
    budget: the rule the steps apply to each sequence's host length (``budget_fields``; the C++ step computes the
    keys itself). A plan stays valid while the geometry holds: lengths may grow."""

    def __init__(self, geometry: StepGeometry, window: Backend, host: Backend, fused: bool, scale: float, config,
                 workspaces: MutableMapping, search_pool: Optional[SearchPool] = None, owner=None):
        self._owner = None if owner is None else weakref.ref(owner)  # (the runtime holds its plan: no cycle)
        self.geometry, self.window, self.host, self.fused, self.scale = geometry, window, host, fused, scale
        self.search_pool = search_pool
        self.config = config
        self.workspaces = workspaces
        self.budget = budget_fields(config, geometry.group)
        g = geometry
        self.on_cpu = g.device.type == "cpu"
        self.q_heads = g.q_heads
        self.cpu_fused = fused and self.on_cpu  # HeteroAttention.decode's one-call path applies
        # what check() compares, built once: a layer's geometry tuple (LayerCache.geometry) and the query's
        self.layer_geometry = (g.batch, g.kv_heads, g.head_dim, g.kv_dtype, g.device)
        self._q_shape, self._q_device = torch.Size((g.batch, g.q_heads, g.head_dim)), g.device.index
        self._q_device = -1 if g.device.type == "cpu" else (g.device.index or 0)

    def budgets_for(self, layer, scale: float = 1.0) -> np.ndarray:
        """``[B, Hkv]`` keys per query head of ``layer`` now (the Python paths; the fused step computes the same)."""
        if layer.head_budget is not None:
            flat = flat_budgets(self.config, layer.host.length, layer.kv_heads, self.geometry.group, scale)
            caps = layer.host.length.tolist()
            return layer.head_budget.split(flat[:, 0].tolist(), caps).numpy().astype(np.int64)
        return flat_budgets(self.config, layer.host.length, layer.kv_heads, self.geometry.group, scale)

    def search(self, layer, q: torch.Tensor, scale: float = 1.0) -> Selection:
        """``layer``'s retriever searched in Python for ``q [B, Hq, D]`` (float32, on the CPU) under this step's
        budgets (``budgets_for``), on the plan's search pool: the step's threads, not the retriever's own pool."""
        layer.retriever.use_runner(self.search_pool.runner if self.search_pool is not None else None)
        return layer.retriever.search(q, self.budgets_for(layer, scale).tolist())

    def check(self, q: torch.Tensor, layer, runtime) -> None:
        """``StalePlanError`` unless ``runtime`` made this plan and ``q`` and ``layer`` have its geometry (cheap)."""
        g = self.geometry
        if self._owner is None or self._owner() is not runtime:
            raise StalePlanError("the step plan was made by another HeteroAttention (its config, budget and backends "
                                 "are that runtime's): make one with this runtime's plan()")
        if (layer.geometry != self.layer_geometry or q.shape != self._q_shape or q.dtype != g.q_dtype
                or q.get_device() != self._q_device or q.is_meta or q.layout != torch.strided):
            raise StalePlanError(
                f"the step plan was made for q [{g.batch}, {g.q_heads}, {g.head_dim}] {g.q_dtype} on {g.device} over "
                f"{g.kv_heads} KV heads of {g.kv_dtype}; got q {tuple(q.shape)} {q.dtype} on {q.device} and layer "
                f"{layer.layer_idx} with [B={layer.batch}, Hkv={layer.kv_heads}] {layer.dtype} on {layer.device}: "
                "make a new plan (HeteroAttention.plan) after the geometry changes")


def budget_fields(config, group: int) -> Dict[str, int]:
    """WORK descriptor fields of the config's budget rule (csrc/runner/runner.cpp budget_keys)."""
    fraction = isinstance(config.budget, float)
    floor = config.resolved_budget_floor
    split = group if config.budget_per == "kv_head" and config.group_rule != "sum" else 1
    return dict(BUDGET_KIND=int(fraction), BUDGET_VALUE=native.float_bits(float(config.budget)),
                BUDGET_SCALE=native.float_bits(1.0), FLOOR_KIND=int(isinstance(floor, float)),
                FLOOR_VALUE=native.float_bits(float(floor)), BUDGET_SPLIT=split)


def flat_budgets(config, host_lengths: np.ndarray, kv_heads: int, group: int, scale: float = 1.0) -> np.ndarray:
    """``[B, Hkv]`` keys per query head from the config's budget and the host lengths: ``budget_per="kv_head"``
    (default) splits a KV head's rows over its ``G`` query heads (``ceil(k / G)`` each, unless they cover the whole
    host tier or the group shares one ranking, ``group_rule="sum"``)."""
    out = np.empty((len(host_lengths), kv_heads), dtype=np.int64)
    for b, n in enumerate(np.asarray(host_lengths).tolist()):
        k = config.budget_for(n, scale)
        if config.budget_per == "kv_head" and config.group_rule != "sum" and k < n:
            k = -(-k // group)
        out[b] = k
    return out


def workspace_kmax(need: int) -> int:
    """Room for ``need`` keys per query with headroom, so that a fraction budget growing with the host tier
    reallocates the workspace rarely (every ~25 % growth), not every step."""
    return max(16, int(math.ceil(need * 1.25)))
