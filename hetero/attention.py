"""``HeteroAttention``: the decode-step runtime. Per step, ``plan(cache)`` once for every layer; per layer,
``run(q, layer, plan)``: the window part (fast device) and the host part (retriever + CPU kernel) fused exactly by
log-sum-exp.

Three ways a layer's step runs, chosen by the plan:

* fused, fast tier on the CPU (the default there): one C++ call does the window attention, the ivf-group search
  (or attends a selection another retriever made in Python), the host rows, the estimate of the unselected tokens
  and the fusion, and writes the output in the query's dtype; nothing is allocated.
* fused, fast tier on CUDA: the Triton window kernel runs on the GPU while the calling thread runs the host part
  in C++ on the query copied to pinned memory; the host result goes back from pinned buffers and the merge runs on
  the GPU. The only host wait is for the query's copy.
* generic: any other backend pair (numba, torch, Triton under the interpreter, side by side on the CPU), each part
  in Python, the host side on a worker thread when ``overlap`` is on. Results are the same to rounding.
"""
from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from . import native
from .backends import BackendSet
from .balance import Balancer
from .cache import LayerCache
from .config import HeteroConfig
from .errors import (ClosedError, ConfigError, DTypeError, HeteroError, IndexSyncError, InvalidValueError,
                     ShapeError)
from .memory import in_storage_mode
from .merge import fuse
from .native_pool import SearchPool
from .plan import LayerWorkspace, StepGeometry, StepPlan, workspace_kmax
from .reference import default_scale
from .timing import NATIVE_PHASES, PhaseRecorder, Span
from .types import PartialAttention, Selection
from .validation import VALUE_LIMIT, check_in_range, check_query, check_selection
from .worker import Worker



@dataclass
class DecodeResult:
    """What ``HeteroAttention.run(..., return_details=True)`` returns.

    out: ``[B, Hq, D]`` in the query dtype. window, host: the two PartialAttentions (float32; host includes the
    retriever's estimate of the unselected tokens). selection: the rows the host part read (indices ``[B, Hkv, k]``,
    k = 0 while the host tier is empty; None for a dense layer). timings_ms: ms per phase that ran: the fused step's
    evict, window, retrieve, host_attn, merge; the general path's window, transfer, retrieve, host_attn, merge (the
    profiler adds index_wait, index_add). spans: the phases with
    start/end times and thread names. rows_read: selected host rows, padding excluded, summed over sequences and KV
    heads. critical: the side the step waited on ("window" or "host"). native_ms: time inside the C++ kernels.
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
    native_ms: float = 0.0


def _layers_of(cache) -> List[LayerCache]:
    if isinstance(cache, LayerCache):
        return [cache]
    layers = getattr(cache, "layers", cache)
    out = [getattr(x, "layer", x) for x in layers]  # hetero.hf's cache layers hold a LayerCache
    if not out or not all(isinstance(x, LayerCache) for x in out):
        raise ShapeError(f"plan() takes a LayerCache, a TieredKVCache, a HeteroCache or a list of LayerCaches, got "
                         f"{type(cache).__name__}")
    return out


def _overlapping(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (an expanded view): its dims, by stride, must each step over
    all of the smaller ones."""
    reach = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n > 1):
        if stride < reach:
            return True
        reach = stride * size
    return False


def _check_out_shape(out, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    """``ShapeError`` unless ``out`` is a ``shape`` tensor of ``dtype`` on ``device`` with contiguous rows, no
    element sharing memory with another, and no autograd history to keep."""
    if (not isinstance(out, torch.Tensor) or tuple(out.shape) != shape or out.dtype != dtype or out.device != device
            or out.stride(-1) != 1 or out.requires_grad or _overlapping(out)):
        dims = ", ".join(str(x) for x in shape)
        got = (f"{tuple(out.shape)} {out.dtype} on {out.device}, strides {out.stride()}"
               f"{', requires_grad' if out.requires_grad else ''}" if isinstance(out, torch.Tensor)
               else type(out).__name__)
        raise ShapeError(f"out must be a [{dims}] {dtype} tensor on {device} with contiguous rows, no two elements "
                         f"in the same memory, and requires_grad off; got {got}")


DECODE_Q_DTYPES = tuple(native.DTYPE_CODES)  # the step writes its output in the query's dtype
# decode() wakes the C++ pool's workers as it starts and has them poll this long for its step: between a model's
# layers they sleep, and a worker woken by the step itself joined it 51-82 us late (SmolLM2-135M, 8K, one layer
# step ~250 us on 2 threads, AMD Zen 4); woken ahead, ~1 us late, and the layer's decode call 240 against 246 us,
# the wake included. The Python before the step takes ~60-170 us; polling past it spins into the next layer's
# matrix products.
WAKE_POLL_US = 300


def _host_side_error(layer: LayerCache, e: Exception) -> HeteroError:
    """A retriever's or host kernel's own exception, typed and naming the layer."""
    return HeteroError(f"host side of layer {layer.layer_idx} failed ({type(e).__name__}: {e})")


class HeteroAttention:
    """Decode attention over ``LayerCache``s.

    Per decode step: append the new token's K/V to each layer's cache, ``plan = attn.plan(cache, q_heads)``, then
    ``attn.run(q, layer, plan)`` per layer. ``run(q, layer)`` without a plan makes a one-layer plan itself (handy,
    not the lean path). ``close()`` stops the host worker (also done at exit). ``native_trace = True``: details also
    carry the busy spans of the native kernels' pool threads.

    A layer's config must match the runtime's in what its storage was built for (window, sinks, retriever and its
    options, block_tokens, kv_dtype, dense_layers, group_rule, head_budget: else ``ConfigError``); the runtime's own
    budget, scale, backends, threads, overlap and balance apply to every layer it runs.

    Threads: ``run`` calls on the same layer are serialized by the layer's lock (and its appends and crops with
    them); calls on different layers may run at once, sharing the runtime's backends, whose native pool takes one
    call at a time. Outputs equal those of the same calls made one after another.
    """

    def __init__(self, config: HeteroConfig, host_worker: Optional[Worker] = None):
        if not isinstance(config, HeteroConfig):
            raise ConfigError(f"config must be a hetero.HeteroConfig, got {type(config).__name__}")
        self.config = config
        self.backends = BackendSet()
        self._own_worker = host_worker is None  # created on the first side-by-side step
        self._worker = host_worker
        self._balancers: Dict[int, Balancer] = {}
        self._geometry: Optional[StepGeometry] = None
        self._plan: Optional[StepPlan] = None
        self._lock = threading.Lock()  # plan() and workspace growth (runs of different layers may race on them)
        self._checked: Dict[int, HeteroConfig] = {}  # id(layer config) -> that config, once found compatible
        self._stream = None
        self._search_pool: Optional[SearchPool] = None  # the first plan creates it
        self._closed = False
        self.native_trace = False
        self.record_phases = False  # fused steps record their native phases (``phases``) without details

    def close(self) -> None:
        self._closed = True
        if self._own_worker and self._worker is not None:
            self._worker.close()

    def _host_worker(self) -> Worker:
        if self._worker is None:
            self._worker = Worker("hetero-host")
        return self._worker

    def balancer(self, layer: LayerCache) -> Balancer:
        if layer.layer_idx not in self._balancers:
            self._balancers[layer.layer_idx] = Balancer(self.config.resolved_threads, layer.device.type == "cuda",
                                                        self.config.balance == "auto",
                                                        scale_range=self.config.budget_scale_range)
        return self._balancers[layer.layer_idx]

    # ---- plan ---------------------------------------------------------------------------------------
    @in_storage_mode
    def plan(self, cache, q_heads: Optional[int] = None, q_dtype: Optional[torch.dtype] = None) -> StepPlan:
        """The plan of the decode steps over ``cache``'s layers (a ``LayerCache``, a ``TieredKVCache``, a
        ``hetero.hf.HeteroCache`` or a list of LayerCaches) for queries ``[B, q_heads, D]`` of ``q_dtype`` (default
        float32): backends, whether the fused C++ step runs, workspaces. It stays valid while the geometry holds
        (lengths may grow); asking again with the same geometry returns it at the cost of a few comparisons."""
        p = self._plan  # the per-step call of a one-layer decode loop: its plan, after a handful of comparisons
        if (p is not None and type(cache) is LayerCache and cache.config is self.config and type(q_heads) is int
                and q_heads == p.q_heads and (q_dtype or torch.float32) is p.geometry.q_dtype
                and cache.geometry == p.layer_geometry
                and cache in p.workspaces and not self._closed):
            return p
        if self._closed:
            raise ClosedError("this HeteroAttention was closed; create a new one")
        with self._lock:
            return self._plan_locked(_layers_of(cache), q_heads, q_dtype)

    def _plan_locked(self, layers: List[LayerCache], q_heads, q_dtype) -> StepPlan:
        ref = next((x for x in layers if x.initialized and not x.dense), None) or \
            next((x for x in layers if x.initialized), None)
        if ref is None:
            raise ShapeError("the cache is empty: append the prompt's keys first")
        if q_heads is None:
            q_heads = self._geometry.q_heads if self._geometry is not None else ref.kv_heads
        elif isinstance(q_heads, bool) or not isinstance(q_heads, int) or q_heads <= 0 or q_heads % ref.kv_heads:
            raise ShapeError(f"q_heads={q_heads!r} must be a positive multiple of the {ref.kv_heads} KV heads")
        q_dtype = q_dtype or torch.float32
        if not isinstance(q_dtype, torch.dtype) or q_dtype not in native.DTYPE_CODES:
            got = q_dtype if isinstance(q_dtype, torch.dtype) else f"{q_dtype!r} (a {type(q_dtype).__name__})"
            raise DTypeError(f"q_dtype must be a torch.dtype: torch.float32, torch.bfloat16 or torch.float16 (the step "
                             f"writes its output in the query's dtype), got {got}")
        cached = self._plan
        if (cached is not None and cached.geometry.q_heads == q_heads and cached.geometry.q_dtype == q_dtype
                and cached.geometry.batch == ref.batch and cached.geometry.kv_heads == ref.kv_heads
                and cached.geometry.head_dim == ref.head_dim
                and cached.geometry.kv_dtype == ref.dtype and cached.geometry.device == ref.device):
            self._ensure_workspaces(cached, layers)
            return cached
        g = StepGeometry(ref.batch, q_heads, ref.kv_heads, ref.head_dim, ref.dtype, q_dtype, ref.device)
        self._geometry = g
        window = self.backends.select("window", self.config.window_backend, g.inputs())
        host = self.backends.select("host", self.config.host_backend, g.inputs(torch.device("cpu")))
        threads = self.config.resolved_threads
        overlap = self.config.overlap_on(g.device)
        if g.device.type == "cpu":
            fused = window.native_step and host.native_step and not overlap
            window.set_threads(threads if not overlap else self.balancer(ref).split().window_threads)
        else:
            fused = host.native_step and window.name == "triton"
        host.set_threads(threads)
        if self._search_pool is None:
            self._search_pool = SearchPool(native.new_runner(threads))
        self._search_pool.set_threads(threads)
        for part in (window, host, self._search_pool):
            part.set_native_trace(self.native_trace)
        scale = self.config.scale or default_scale(g.head_dim)
        plan = StepPlan(g, window, host, fused and native.load() is not None, scale, self.config,
                        weakref.WeakKeyDictionary(), self._search_pool, self)
        self._ensure_workspaces(plan, layers)
        self._plan = plan
        return plan

    def _ensure_workspaces(self, plan: StepPlan, layers: Sequence[LayerCache]) -> None:
        for x in layers:
            if x.initialized:
                self._check_compatible(x)
            if x not in plan.workspaces and x.initialized:
                self._grow_workspace(plan, x)

    _MATCH = ("window", "sinks", "retriever", "retriever_options", "group_rule", "head_budget", "block_tokens",
              "kv_dtype", "dense_layers")

    def _check_compatible(self, layer: LayerCache) -> None:
        """``ConfigError`` when ``layer`` was built with a config this runtime would run wrongly (another retriever,
        window, sinks...). What only a step decides may differ, and the runtime's applies: the budget (``budget``,
        ``budget_per``, ``budget_floor``), scale, backends, threads, overlap and balance. Checked once per config."""
        if self._checked.get(id(layer.config)) is layer.config:
            return
        diff = [f"{name}: layer {getattr(layer.config, name)!r}, runtime {getattr(self.config, name)!r}"
                for name in self._MATCH if getattr(layer.config, name) != getattr(self.config, name)]
        if diff:
            raise ConfigError(f"layer {layer.layer_idx} was built with another config than this HeteroAttention's ("
                              + "; ".join(diff) + "): run it with HeteroAttention(layer.config) or a config that "
                              "differs only in what a step decides (budget, scale, backends, threads, overlap, balance)")
        self._checked[id(layer.config)] = layer.config

    def _grow_workspace(self, plan: StepPlan, layer: LayerCache, need_k: int = 0) -> LayerWorkspace:
        """A workspace for ``layer`` with room for its current budget (or ``need_k`` keys) and lists."""
        old = plan.workspaces.get(layer)
        budgets = plan.budgets_for(layer) if not layer.dense else np.zeros(1, dtype=np.int64)
        kmax = workspace_kmax(max(need_k, int(budgets.max()) if budgets.size else 0, old.kmax if old else 0))
        lists = layer.retriever.max_lists() if hasattr(layer.retriever, "max_lists") else 1
        ws = LayerWorkspace(plan.geometry, kmax, max(lists + 16, 2 * lists, old.max_lists if old else 0))
        if ws.work is not None:
            ws.work.set(**plan.budget)
        plan.workspaces[layer] = ws
        return ws

    # ---- run ----------------------------------------------------------------------------------------
    @in_storage_mode
    def run(self, q: torch.Tensor, layer: LayerCache, plan: Optional[StepPlan] = None,
            out: Optional[torch.Tensor] = None, return_details: bool = False):
        """Attention of decode queries over every token of ``layer`` (fast and host tiers).

        q: ``[B, Hq, D]`` float, post-RoPE, on the fast tier's device; ``Hq = G * Hkv``. plan: this step's
        ``StepPlan`` (made here when None). out: optional ``[B, Hq, D]`` tensor of q's dtype and device written in
        place (``HeteroAttention.output(plan, layer)`` is the workspace's). Returns ``out [B, Hq, D]`` in q's dtype, or a
        ``DecodeResult`` with the parts and timings.
        """
        if self._closed:
            raise ClosedError("this HeteroAttention was closed; create a new one")
        if type(layer) is not LayerCache and not isinstance(layer, LayerCache):
            raise ShapeError(f"layer must be a LayerCache, got {type(layer).__name__}")
        if not layer.initialized:
            raise ShapeError(f"layer {layer.layer_idx}'s cache is empty: append the prompt's keys first")
        given = plan is not None
        plan = self._resolve_plan(q, layer, plan)
        fused = plan.fused and q.stride(-1) == 1
        if given and not fused and plan.on_cpu:  # the fused step checks the query itself
            check_in_range(q, "q")  # (a CUDA query: on its host copy, _host_side)
        if layer.config is not self.config:
            self._check_compatible(layer)  # a dict lookup once checked
        ws = plan.workspaces.get(layer)
        if ws is None:  # a layer the plan was not made over (planned with another list of layers)
            with self._lock:
                self._ensure_workspaces(plan, [layer])
            ws = plan.workspaces[layer]
        if out is not None and out is not ws.out:
            self._check_out(out, plan)
        with layer.lock:
            if layer.fast is None or layer.geometry != plan.layer_geometry:  # another thread reset it meanwhile
                if layer.fast is None:
                    raise ShapeError(f"layer {layer.layer_idx}'s cache is empty: append the prompt's keys first")
                plan.check(q, layer, self)
            if layer.retriever.softmax_scale != plan.scale:  # the estimate uses the step's scale
                layer.retriever.softmax_scale = plan.scale
            if plan.on_cpu and layer.evictions_pending:
                layer.prepare_host_side()  # a CPU tier run the CUDA way (staged evictions): land them first
            if not layer.index.idle:
                layer.index.wait()  # heals and reports a failed add, before any search
            if fused:
                if plan.on_cpu:
                    return self._run_fused_cpu(q, layer, plan, out, return_details)
                return self._run_fused_cuda(q, layer, plan, out, return_details)
            return self._run_generic(q, layer, plan, out, return_details)

    @in_storage_mode
    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: LayerCache, plan: StepPlan,
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One decode step of ``layer``: append this step's key and value, then attend the query over every token;
        the same result as ``layer.append(k, v)`` then ``run(q, layer, plan, out)``.

        q: ``[B, Hq, D]``; k, v: ``[B, Hkv, D]`` or ``[B, Hkv, 1, D]``, post-RoPE; plan: this step's ``StepPlan``;
        out: optional ``[B, Hq, D]`` of q's dtype written in place. Returns ``out`` (or a new ``[B, Hq, D]``).
        On the CPU with the C++ step and an ``ivf-group`` (or dense) host part this is one native call: the token's
        append and the step, the GIL released. A query with NaN or inf is refused before the token is appended.
        """
        if type(plan) is StepPlan and plan.cpu_fused:
            plan.host.wake_workers(WAKE_POLL_US)  # they come up while the checks below run
        if not self._closed and isinstance(layer, LayerCache) and layer.config is not self.config:
            self._check_compatible(layer)  # an equal config (the HF cache's runtime has the model's scale) runs on;
            # another is refused before the token goes in, on either path below (a dict lookup once checked)
        token = (layer.native_token(k, v) if type(plan) is StepPlan and plan.cpu_fused and type(layer) is LayerCache
                 and layer._native_ok and type(q) is torch.Tensor and not self._closed else None)
        if token is not None:
            plan.check(q, layer, self)
            ws = plan.workspaces.get(layer)
        if token is None or ws is None or q.stride(-1) != 1:
            return self._append_then_run(q, k, v, layer, plan, out)
        dst = ws.out if out is None else out
        if dst is not ws.out:
            self._check_out(dst, plan)
        timed = self.record_phases or self.config.balance == "auto" or layer.head_budget is not None
        tk, tv, stride_b, stride_h, kv_dtype = token
        ext = native.load()
        with layer.lock:
            layer.index.check_open()
            # what another thread's reset, crop or append may have changed since the checks above, read under the
            # lock: the C++ call below trusts the tiers' shape and an index its tables describe
            mode = (self._host_mode(layer) if layer.fast is not None and layer.geometry == plan.layer_geometry
                    and layer.index.idle else 1)
            if mode != 1:
                if layer.retriever.softmax_scale != plan.scale:
                    layer.retriever.softmax_scale = plan.scale
                self._prepare_work(ws, q, dst, layer, plan, mode, True, timed)
                layer.index.begin_write()  # until the adds left to Python are queued (LayerCache._append_native)
                appended = step = None
                try:
                    for _ in range(2):
                        appended, step = plan.host._runner.decode_token(
                            layer.native_layer().address, ws.work.address, tk.data_ptr(), tv.data_ptr(), stride_b,
                            stride_h, kv_dtype, 1, layer._flags_addr, q.data_ptr(), dst.data_ptr())
                        if appended != ext.APPEND_NEED_BLOCKS:
                            break
                        layer.reserve_flagged()  # a sequence's host blocks were full: nothing ran; the same again
                    if appended > 0:  # appended; index adds left to Python, which the step waits for
                        layer.queue_native_leftovers()
                    layer.index.end_write()
                    layer.populate_host_ahead()
                    if not step:  # the workspace is read under the lock: another thread's step on it writes it next
                        self._after_step(layer, ws, plan, mode, timed)
                        return dst if out is not None else dst.clone()
                except BaseException:  # (a Ctrl-C too) after the token went in: it goes back out, as on the
                    if appended is not None and appended >= 0 and step != ext.STEP_QUERY_NOT_FINITE:  # other path
                        layer.take_back_decode_token()
                    raise
                before = (layer.fast.total - 1).tolist()  # a decode appends one token to every sequence
        if mode == 1:  # searched in Python, waiting for index adds, or changed by another thread: the general path
            return self._append_then_run(q, k, v, layer, plan, out)
        if step == ext.STEP_QUERY_NOT_FINITE:
            raise InvalidValueError(f"q contains NaN or inf, or values beyond {VALUE_LIMIT:g} in magnitude (the "
                                    "step's key and value were not appended)")
        if appended < 0:  # refused before any change (k or v not finite or beyond the limit): the general path says
            return self._append_then_run(q, k, v, layer, plan, out)
        return self._run_after_append(q, layer, plan, out, before)  # the token is in; the step waits for adds or grows

    def _run_after_append(self, q, layer, plan, out, before, token=None):
        """``run`` after a decode's token went in (``token``: ``(k, v)`` appended here first); a failure takes it back
        out, so that a retry is exact, except a failed index add, which is healed with the token kept and says so.
        ``before``: the lengths before the token, or None for a layer that was empty."""
        try:
            if token is not None:
                layer.append(*token)
            return self.run(q, layer, plan, out=out)
        except IndexSyncError as e:  # the token's own index add failed (healed): the token is in, the step not run
            raise IndexSyncError(f"{e} (this decode's key and value are stored: call run(q, layer, plan) for the "
                                 "step's output, do not decode them again)") from e
        except BaseException:
            if before is not None:
                layer.crop(before)
            else:
                layer.reset()
            raise

    def _append_then_run(self, q, k, v, layer, plan, out):
        """decode() in two calls, the query checked before the token goes in (a refused step appends nothing)."""
        if self._closed:
            raise ClosedError("this HeteroAttention was closed; create a new one")
        if type(layer) is not LayerCache and not isinstance(layer, LayerCache):
            raise ShapeError(f"layer must be a LayerCache, got {type(layer).__name__}")
        # everything run() would refuse is refused here, before the token goes in
        if layer.initialized:
            plan = self._resolve_plan(q, layer, plan)
            if q.device.type == "cpu":  # its values too (a CUDA query is checked on its host copy, without a sync)
                check_query(q, layer.kv_heads, layer.head_dim, layer.batch, allowed=DECODE_Q_DTYPES)
            if out is not None:
                self._check_out(out, plan)
        else:  # nothing to plan against yet: what can be checked without the layer's geometry
            if not isinstance(q, torch.Tensor):
                raise ShapeError(f"q must be a torch.Tensor [B, Hq, D], got {type(q).__name__}")
            if plan is not None and type(plan) is not StepPlan:
                raise ShapeError(f"plan must be a StepPlan (HeteroAttention.plan), got {type(plan).__name__}")
            if out is not None:
                _check_out_shape(out, tuple(q.shape), q.dtype, q.device)
        for name, x in (("k", k), ("v", v)):  # one token (append() takes any count)
            if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[2] != 1:
                raise ShapeError(f"decode() appends one token: {name} must be [B, Hkv, D] or [B, Hkv, 1, D], got "
                                 f"{tuple(x.shape)} (append several with layer.append)")
        if layer.initialized and not layer.index.idle:
            with layer.lock:
                layer.index.wait()  # an index failure is reported (and healed) before the token goes in, not after
        before = layer.fast.total.tolist() if layer.initialized else None
        # (a Ctrl-C held back over append's write is raised after it: the token goes back out)
        return self._run_after_append(q, layer, plan, out, before, token=(k, v))

    def _resolve_plan(self, q, layer: LayerCache, plan: Optional[StepPlan]) -> StepPlan:
        """``plan`` checked against ``q`` and ``layer`` (``ShapeError`` or ``StalePlanError``), or, when None, ``q``
        checked (``check_query``) and a plan made for it."""
        if plan is None:
            check_query(q, layer.kv_heads, layer.head_dim, layer.batch, allowed=DECODE_Q_DTYPES)
            if q.device != layer.device:
                raise ShapeError(f"q is on {q.device}, layer {layer.layer_idx}'s fast tier on {layer.device}")
            return self.plan(layer, q.shape[1], q.dtype)
        if type(plan) is not StepPlan:
            raise ShapeError(f"plan must be a StepPlan (HeteroAttention.plan), got {type(plan).__name__}")
        if type(q) is not torch.Tensor and not isinstance(q, torch.Tensor):
            raise ShapeError(f"q must be a torch.Tensor [B, Hq, D], got {type(q).__name__}")
        plan.check(q, layer, self)
        return plan

    @staticmethod
    def _check_out(out, plan: StepPlan) -> None:
        g = plan.geometry
        _check_out_shape(out, (g.batch, g.q_heads, g.head_dim), g.q_dtype, g.device)

    @staticmethod
    def _host_mode(layer: LayerCache) -> int:
        """0: no host part (a dense layer), 2: the C++ step searches the index, 1: the retriever searches in Python
        (an empty host tier gives an empty part either way)."""
        if layer.dense:
            return 0
        return 2 if layer.retriever.native_search_ready() else 1

    def _prepare_work(self, ws: LayerWorkspace, q: torch.Tensor, out: torch.Tensor, layer: LayerCache,
                      plan: StepPlan, mode: int, window_on: bool, timed: bool) -> Optional[Selection]:
        """Fill the WORK descriptor of this call; for a selection made in Python, search and point at it."""
        w = ws.work
        qs, os_ = q.stride(), out.stride()
        key = (q.dtype, qs[0], qs[1], out.dtype, os_[0], os_[1], window_on, mode, timed)
        if ws.last_call != key:  # a decode loop calls with the same formats every step: set them once
            w.set(SCALE=native.float_bits(plan.scale), Q_DTYPE=native.DTYPE_CODES[q.dtype], Q_STRIDE_B=qs[0],
                  Q_STRIDE_H=qs[1], OUT_DTYPE=native.DTYPE_CODES[out.dtype], OUT_STRIDE_B=os_[0], OUT_STRIDE_H=os_[1],
                  WINDOW_ON=int(window_on), HOST_MODE=mode, FAST_PREFETCH=getattr(plan.window, "prefetch", 0),
                  HOST_PREFETCH=plan.host.prefetch, TIMES=native.address(ws.times) if timed else 0)
            ws.last_call = key
        if self.config.balance == "auto":
            w.set(BUDGET_SCALE=native.float_bits(self.balancer(layer).budget_scale))
        if mode == 2:
            return None
        if mode == 1:
            t_search = time.perf_counter()  # the native step marks no search of its own: its span is this one's
            q32 = ws.q_host.float() if q.device.type == "cuda" else q.detach().float()
            try:
                sel = plan.search(layer, q32, self.balancer(layer).budget_scale)
            except (HeteroError, MemoryError):
                raise
            except Exception as e:  # typed as on the general path
                raise _host_side_error(layer, e) from e
            if timed:
                ws.times[2:4] = (t_search, time.perf_counter())  # NATIVE_PHASES[1], "retrieve" (same clock)
            check_selection(sel, layer.batch, q.shape[1], layer.kv_heads, layer.host.length.tolist(), layer.head_dim)
            idx = sel.indices.to(torch.int32).contiguous()
            counts = native.used_counts(idx)
            lw = None if sel.log_weight is None else sel.log_weight.float().contiguous()
            est = sel.estimate
            if est is not None:  # the step reads these buffers: held below, not temporaries of this line
                est = PartialAttention(est.out.contiguous(), est.lse.contiguous())
            ws.selection = (idx, lw, est, counts)  # kept alive until the next call
            w.set(SEL_INDICES=idx.data_ptr(), SEL_K=idx.shape[2], SEL_COUNTS=native.address(counts),
                  SEL_LOG_WEIGHT=native.address(lw),
                  SEL_EST_OUT=0 if est is None else est.out.data_ptr(),
                  SEL_EST_LSE=0 if est is None else est.lse.data_ptr())
            return Selection(idx, lw, est)
        return None

    def _run_fused_cpu(self, q, layer, plan, out, details):
        dst = plan.workspaces[layer].out if out is None else out
        timed = details or self.record_phases or self.config.balance == "auto" or layer.head_budget is not None
        t0 = time.perf_counter()
        ws, mode, sel = self._decode_step(plan, layer, q, dst, True, timed)
        if out is None and ws.out is not dst:  # the workspace grew: its new output buffer
            ws.out.copy_(dst)
            dst = ws.out
        self._after_step(layer, ws, plan, mode, timed)
        if not details:
            return dst if out is not None else dst.clone()
        return self._fused_details(dst, ws, layer, plan, mode, sel, t0)

    def _decode_step(self, plan: StepPlan, layer: LayerCache, q: torch.Tensor, dst: torch.Tensor, window_on: bool,
                     timed: bool):
        """Prepare the WORK descriptor and run the C++ step; a workspace too small for this step (a budget that
        outgrew it, an index with more lists) grows and the step runs again. Returns (workspace, mode, selection)."""
        ext = native.load()
        mode = self._host_mode(layer)
        for _ in range(3):
            ws = plan.workspaces[layer]
            sel = self._prepare_work(ws, q, dst, layer, plan, mode, window_on, timed)
            code = plan.host._runner.decode_step(layer.native_layer().address, ws.work.address, q.data_ptr(),
                                                 dst.data_ptr())
            if code == 0:
                return ws, mode, sel
            if code == ext.STEP_QUERY_NOT_FINITE:
                raise InvalidValueError(f"q contains NaN or inf, or values beyond {VALUE_LIMIT:g} in magnitude")
            with self._lock:
                self._grow_workspace(plan, layer, 0 if code == ext.STEP_NEED_PROBE else int(code))
        raise RuntimeError(f"layer {layer.layer_idx}: the step's workspace did not fit after growing it")

    def _after_step(self, layer: LayerCache, ws: LayerWorkspace, plan: StepPlan, mode: int, timed: bool) -> None:
        if mode == 2:
            layer.retriever.searched_natively(ws.scanned, plan.geometry.group)
        if layer.head_budget is not None and mode:
            layer.head_budget.update(PartialAttention(ws.win_out, ws.win_lse), PartialAttention(ws.host_out,
                                                                                               ws.host_lse),
                                     layer.retriever)
        if self.config.balance == "auto" and mode:
            t = ws.times  # the host side: its search and its rows (a search in Python ran before the window)
            self.balancer(layer).record((t[1] - t[0]) * 1e3, (t[3] - t[2] + t[5] - t[4]) * 1e3, can_lower=True,
                                        can_raise=True)

    def _fused_details(self, dst, ws, layer, plan, mode, sel, t0) -> DecodeResult:
        t = ws.times
        timings = self.phases(plan, layer)
        spans = [Span(name, t[2 * i], t[2 * i + 1], "MainThread") for i, name in enumerate(NATIVE_PHASES)
                 if t[2 * i + 1] > t[2 * i]]
        window = PartialAttention(ws.win_out.clone(), ws.win_lse.clone())
        if mode == 0:
            host = PartialAttention.empty(*ws.win_out.shape)
        else:
            parts = [PartialAttention(ws.host_out.clone(), ws.host_lse.clone())]
            est = (PartialAttention(ws.est_out, ws.est_lse) if mode == 2 and layer.retriever.estimate else
                   (sel.estimate if sel is not None else None))
            if est is not None:
                parts.append(est)
            host = fuse(parts) if len(parts) > 1 else parts[0]
        if mode == 2:
            width = int(ws.union_count.max()) if ws.union_count.size else 0
            idx = torch.from_numpy(ws.union[:, :width].copy()).view(layer.batch, layer.kv_heads, width)
            est = PartialAttention(ws.est_out.clone(), ws.est_lse.clone()) if layer.retriever.estimate else None
            sel = Selection(idx, estimate=est)
            rows = int(ws.union_count.sum())
        else:
            rows = int((sel.indices >= 0).sum()) if sel is not None else 0
        native_ms = sum(timings.values())
        window_ms = timings["window"]
        host_ms = timings["retrieve"] + timings["host_attn"]
        spans += self._native_spans(plan, layer)
        out = dst if dst is not ws.out else dst.clone()
        return DecodeResult(out, window, host, sel if mode else None, timings, spans, rows,
                            "host" if host_ms > window_ms else "window", window_ms, host_ms, native_ms)

    def _native_spans(self, plan, layer) -> List[Span]:
        if not self.native_trace:
            return []
        return [s for part in (plan.window, plan.host, plan.search_pool) for s in part.take_native_spans()]

    def _run_fused_cuda(self, q, layer, plan, out, details):
        """Window on the GPU (Triton), host part in C++ on the calling thread meanwhile, merge on the GPU."""
        ws = plan.workspaces[layer]
        dst = ws.out if out is None else out
        mode = 0 if layer.dense else 1
        rec = PhaseRecorder()
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=q.device)
        current = torch.cuda.current_stream(q.device)
        ready = None
        if mode:
            with rec.span("transfer"):
                self._stream.wait_stream(current)  # q is produced on the current stream
                with torch.cuda.stream(self._stream):
                    ws.q_host.copy_(q.detach(), non_blocking=True)  # into pinned memory: asynchronous
                    q.record_stream(self._stream)  # q's memory is not reused before this copy ran
                    ready = torch.cuda.Event()
                    ready.record(self._stream)
        with rec.span("window"):
            wpart = plan.window(q, layer.fast.k, layer.fast.v, layer.fast.lengths, plan.scale)
        if mode:
            with rec.span("transfer"):
                layer.prepare_host_side()  # this append's evicted tokens into the host tier and the index
                ready.synchronize()  # the host waits for the query's copy, never for the window kernel
            with rec.span("host"):  # host rows and estimate fused into the pinned HOST_OUT / HOST_LSE
                ws, mode, _ = self._decode_step(plan, layer, ws.q_host, ws.host_out, False, details)
            with rec.span("transfer"):
                ws.host_out_dev.copy_(ws.host_out, non_blocking=True)  # from pinned memory: asynchronous
                ws.host_lse_dev.copy_(ws.host_lse, non_blocking=True)
            parts = [wpart, PartialAttention(ws.host_out_dev, ws.host_lse_dev)]
        else:
            parts = [wpart]
        with rec.span("merge"):
            merged = fuse(parts)
            dst.copy_(merged.out)
        if not details:
            return dst if out is not None else dst.clone()
        host = parts[1] if mode else PartialAttention.empty(*wpart.out.shape, device=q.device)
        return DecodeResult(dst.clone(), wpart, host, None, rec.totals_ms(), rec.spans,
                            int(ws.union_count.sum()) if mode == 2 else 0)

    # ---- generic path -------------------------------------------------------------------------------
    def _query_to_host(self, q: torch.Tensor, staging: Optional[torch.Tensor]):
        """The query on the host (float32 on the CPU; on CUDA copied into the pinned ``staging``), and an event to wait
        on before reading it (CUDA)."""
        if q.device.type != "cuda":
            return q.detach().to(torch.float32), None
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=q.device)
        self._stream.wait_stream(torch.cuda.current_stream(q.device))
        with torch.cuda.stream(self._stream):
            staging.copy_(q.detach(), non_blocking=True)
            q.record_stream(self._stream)  # q's memory is not reused before this copy ran
            ready = torch.cuda.Event()
            ready.record(self._stream)
        return staging, ready

    def _host_side(self, q_host, ready, layer: LayerCache, plan: StepPlan, rec: PhaseRecorder):
        t0 = time.perf_counter()
        with rec.span("transfer"):
            layer.prepare_host_side()  # staged evictions (a CUDA fast tier) into the host tier and the index
            if ready is not None:
                ready.synchronize()
                check_in_range(q_host, "q")  # a CUDA query is checked here, on its copy, not with a device sync
                q_host = q_host.float()
        with rec.span("retrieve"):
            selection = plan.search(layer, q_host, self.balancer(layer).budget_scale)
        check_selection(selection, q_host.shape[0], q_host.shape[1], layer.kv_heads, layer.host.length.tolist(),
                        layer.head_dim)
        with rec.span("host_attn"):
            hpart = plan.host(q_host, layer.host.view(), selection, plan.scale)
        return hpart, selection, (time.perf_counter() - t0) * 1e3

    def _run_generic(self, q, layer, plan, out, details):
        rec = PhaseRecorder()
        b, hq, d = q.shape
        has_host = not layer.dense and (bool(layer.host.length.any()) or layer.evictions_pending)
        future = None
        if has_host:
            with rec.span("transfer"):
                q_host, ready = self._query_to_host(q, plan.workspaces[layer].q_host)
            if self.config.overlap_on(layer.device):
                future = self._host_worker().submit(self._host_side, q_host, ready, layer, plan, rec)
        if future is not None and self.config.balance == "auto" and q.device.type == "cpu":
            plan.window.set_threads(self.balancer(layer).split().window_threads)  # the measured split, per layer
        t0 = time.perf_counter()
        with rec.span("window"):
            wpart = plan.window(q, layer.fast.k, layer.fast.v, layer.fast.lengths, plan.scale)
        window_ms = (time.perf_counter() - t0) * 1e3
        selection, rows, host_ms = None, 0, 0.0
        if has_host:
            try:
                if future is not None:
                    hpart, selection, host_ms = future.result()
                else:
                    hpart, selection, host_ms = self._host_side(q_host, ready, layer, plan, rec)
            except (HeteroError, MemoryError):  # (out of memory stays what it is: callers act on it)
                raise
            except Exception as e:
                raise _host_side_error(layer, e) from e
            parts = [hpart] if selection.estimate is None else [hpart, selection.estimate]
            if q.device.type == "cuda":  # through pinned memory: a copy from pageable memory would sync
                with rec.span("transfer"):
                    parts = [PartialAttention(p.out.pin_memory().to(q.device, non_blocking=True),
                                              p.lse.pin_memory().to(q.device, non_blocking=True)) for p in parts]
            hpart = parts[0] if len(parts) == 1 else fuse(parts)  # the details' host part: rows and estimate
            rows = int(np.count_nonzero(selection.indices.numpy() >= 0))
            if layer.head_budget is not None:
                layer.head_budget.update(wpart, parts[0], layer.retriever)
        else:
            hpart = PartialAttention.empty(b, hq, d, device=q.device)
            parts = []
        balancer = self.balancer(layer)
        if has_host:
            n = int(layer.host.length.max())
            k_now = self.config.budget_for(n, balancer.budget_scale)
            floor = self.config.budget_for(n, 0.0)
            balancer.record(window_ms, host_ms, can_lower=k_now > floor,
                            can_raise=k_now < min(n, 2 * self.config.budget_for(n)))
        with rec.span("merge"):  # all parts at once, as the fused step does (the same result bit for bit)
            merged = fuse([wpart] + parts)
            result = merged.out.to(q.dtype)
        if out is not None:
            out.copy_(result)
            result = out
        native = self._native_spans(plan, layer)
        if not details:
            return result
        return DecodeResult(result, wpart, hpart, selection, rec.totals_ms(), rec.spans + native, rows,
                            balancer.critical if has_host else "window", window_ms, host_ms)

    # ---- helpers ------------------------------------------------------------------------------------
    @staticmethod
    def phases(plan: StepPlan, layer: LayerCache) -> Dict[str, float]:
        """Milliseconds of each native phase (window, retrieve, host_attn, merge) of ``layer``'s last fused step under
        ``plan`` (recorded when ``record_phases`` or details are on; zeros otherwise)."""
        t = plan.workspaces[layer].times
        return {name: max(0.0, float(t[2 * i + 1] - t[2 * i]) * 1e3) for i, name in enumerate(NATIVE_PHASES)}

    @staticmethod
    def step_stats(plan: StepPlan, layer: LayerCache) -> Dict[str, int]:
        """What ``layer``'s last fused step read: ``rows_read`` (selected host rows, padding excluded, over sequences
        and KV heads) and ``index_bytes`` (the index data the search streamed)."""
        ws = plan.workspaces[layer]
        if HeteroAttention._host_mode(layer) == 2:
            return {"rows_read": int(ws.union_count.sum()), "index_bytes": layer.retriever.bytes_read(ws.scanned)}
        sel = ws.selection
        rows = int((sel[0] >= 0).sum()) if sel is not None else 0
        return {"rows_read": rows, "index_bytes": layer.retriever.last_bytes_read()}

    def phase_spans(self, plan: StepPlan, layer: LayerCache) -> List[Span]:
        """Spans of ``layer``'s last fused step: its native phases on the calling thread (window, search and host
        rows run as one pool run, whose wall time they share by busy time, laid end to end) and, with
        ``native_trace``, each pool thread's busy span per phase (its first item of the phase to its last)."""
        t = plan.workspaces[layer].times
        phases = [(name, t[2 * i], t[2 * i + 1]) for i, name in enumerate(NATIVE_PHASES) if t[2 * i + 1] > t[2 * i]]
        return [Span(name, a, b, "MainThread") for name, a, b in phases] + self._native_spans(plan, layer)

    def output(self, plan: StepPlan, layer: LayerCache) -> torch.Tensor:
        """The workspace output ``[B, Hq, D]`` of ``layer`` under ``plan`` (``run(..., out=...)`` without allocating;
        overwritten by the layer's next step)."""
        return plan.workspaces[layer].out
