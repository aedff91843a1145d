"""``hetero profile``: dense attention and hetero on the same decode inputs, side by side.

For each decode step: the step's new key/value is appended to hetero's cache (eviction to the host tier
and the retriever included in ``hetero_ms``) and to the dense KV; hetero runs; torch SDPA over all tokens
in the KV dtype runs (``dense_ms``, what a user would otherwise run); and a float32 reference over the
same stored KV gives ``rel_error = ||out - out_dense|| / ||out_dense||``. The reference runs after the timed steps, on
each step's saved output: it writes float32 chunk copies (~270 MB a step at 128K tokens), and a hetero step timed
after them paid for writing those lines back (2.81-2.82 against 2.55-2.56 ms at 128K tokens, AMD Zen 4). Between two
hetero steps only the dense baseline runs, as the rest of a model would.

The first ``warmup`` steps run the same way and are reported apart (``warmup_ms``), not in the medians: right after
a prefill, steps pay for first touches of the index and pool pages (2-5x a later step), and on a virtual machine that
hands freed memory back to its host, for that host reclaiming the prefill's temporaries (measured at 512K tokens: the
2-4 steps after a 4 GB index build took 10-100 ms, later ones 5.5-6 ms).
"""
from __future__ import annotations

import contextlib
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from hetero.attention import HeteroAttention
from hetero.cache import LayerCache, new_populator
from hetero.config import HeteroConfig
from hetero.merge import merge
from hetero.reference import default_scale, window_attention
from hetero.timing import Span
from .floor import floor_ms, measure_rates, rows_bytes, window_bytes
from .envinfo import cpu_model
from .workloads.synthetic import SyntheticWorkload, make_synthetic

PHASES = ("window", "index_wait", "retrieve", "host_attn", "merge", "transfer", "evict", "index_add", "plan")
PRESETS = {  # layer geometry of well-known models: (query heads, KV heads, head_dim)
    "llama3-8b": (32, 8, 128),
    "qwen2-7b": (28, 4, 128),
    "smollm2": (9, 3, 64),
}
_REF_CHUNK = 32768


@dataclass
class ProfileArgs:
    context: int = 32768
    batch: int = 1
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    steps: int = 5               # decode steps measured
    warmup: int = 2              # decode steps run first, reported apart (when the profile builds its workload)
    seed: int = 0
    kv_dtype: str = "bfloat16"
    workload: str = "synthetic"  # or "real": captured SmolLM2 attention (hetero.tools.workloads.real)
    layer: int = 15              # real workload: which layer
    native_threads: bool = False  # spans of the native kernels' pool threads too (a trace's thread tracks)
    device: str = "cpu"          # the fast tier's and the dense baseline's device; the host tier is in CPU memory


def _sig4(x: float) -> float:
    """x to 4 significant digits: a floor of a few microseconds rounded to 4 decimals lost a percent of itself (and
    ``floor_ratio``, computed before rounding, no longer matched hetero_ms / floor_ms)."""
    return float(f"{x:.4g}")


def dense_sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """What a user would run without hetero: SDPA over all ``n`` tokens, in the KV dtype.

    q ``[B, Hq, D]``; keys/values ``[B, Hkv, >= n, D]``. The G query heads of a group are passed as G
    query rows of their KV head (no KV copy for GQA, the fastest exact form on CPU). Returns ``[B, Hq, D]``.
    """
    b, hq, d = q.shape
    hkv = keys.shape[1]
    qg = q.to(keys.dtype).reshape(b, hkv, hq // hkv, d)
    out = torch.nn.functional.scaled_dot_product_attention(qg, keys[:, :, :n], values[:, :, :n])
    return out.reshape(b, hq, d)


def reference_output(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, n: int,
                     scale: float, scratch: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Float32 attention over the first ``n`` stored tokens, computed in chunks fused by ``merge``.

    scratch: optional float32 ``[B, Hkv, >= chunk, D]`` buffers the chunks are converted into (``reference_scratch``).
    Without them each chunk allocates and frees its float32 copy: at 512K tokens ~4 GB of fresh pages per decode
    step between two measured hetero steps (with them, the 512K step's host attention measured 3.7-4.7 ms instead
    of 4-11 ms, the 128K step's per-step spread 7.8-9.3 ms instead of 7.3-10.7 ms)."""
    parts = []
    b = q.shape[0]
    for start in range(0, n, _REF_CHUNK):
        stop = min(n, start + _REF_CHUNK)
        k, v = keys[:, :, start:stop], values[:, :, start:stop]
        if scratch is not None:
            k = scratch[0][:, :, : stop - start].copy_(k)
            v = scratch[1][:, :, : stop - start].copy_(v)
        lengths = torch.full((b,), stop - start, dtype=torch.long)
        parts.append(window_attention(q, k, v, lengths, scale=scale))
    return merge(parts).out


def reference_scratch(keys: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two float32 chunk buffers for ``reference_output`` over ``keys [B, Hkv, N, D]``, allocated once."""
    b, hkv, _, d = keys.shape
    shape = (b, hkv, min(n, _REF_CHUNK), d)
    return (torch.empty(shape, dtype=torch.float32, device=keys.device),
            torch.empty(shape, dtype=torch.float32, device=keys.device))


def real_workload(context: int, steps: int, layer: int, dtype: torch.dtype) -> SyntheticWorkload:  # steps: all
    """One layer of captured SmolLM2 attention as a workload: the first ``context`` tokens are the prompt,
    the next ``steps`` are decoded with their real queries (context + steps <= 8192). The capture ran in float32;
    keys, values and queries are rounded to ``dtype``, as the same model run in ``dtype`` would compute them."""
    from .workloads.real import capture

    total = context + steps
    if total > 8192:
        raise ValueError(f"the real workload has 8192 tokens: --context {context} + {steps} decode steps (warm-up "
                         "included) is too long")
    # captures exist for 1024 and 8192 tokens (the smaller one builds in seconds)
    cap = capture(1024 if total <= 1024 else 8192)
    if layer not in cap.k:
        raise ValueError(f"--layer {layer} not in the capture (layers 0..{cap.num_layers - 1})")
    k, v, q = cap.k[layer][None, :, :total], cap.v[layer][None, :, :total], cap.q[layer][:, context:total]
    return SyntheticWorkload(k.to(dtype), v.to(dtype), q.permute(1, 0, 2)[:, None].to(dtype).float(), context)


def _median(xs: List[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def run_profile(config: HeteroConfig, args: ProfileArgs, workload: Optional[SyntheticWorkload] = None,
                log: Callable[[str], None] = lambda s: print(s, file=sys.stderr), progress=None) -> Dict:
    """Profile ``args.steps`` decode steps of one layer, after ``args.warmup`` steps reported apart; returns the
    JSON-ready result dict. A given ``workload`` decodes all its steps: the ones beyond ``args.steps`` come first,
    as warm-up. ``progress``: optional callable ``(description)`` -> context manager, shown around long work
    (prefill, index build)."""
    from hetero.config import KV_DTYPES

    torch.set_num_threads(config.resolved_threads)
    dtype = KV_DTYPES[args.kv_dtype]
    if workload is None:
        total = args.steps + args.warmup
        if args.workload == "real":
            log(f"loading captured SmolLM2 attention, layer {args.layer}, context {args.context}")
            workload = real_workload(args.context, total, args.layer, dtype)
        else:
            log(f"building synthetic workload: context {args.context}, batch {args.batch}, "
                f"{args.heads}/{args.kv_heads} heads, head_dim {args.head_dim}, {args.kv_dtype}")
            workload = make_synthetic(args.context, args.batch, args.heads, args.kv_heads, args.head_dim,
                                      total, dtype, args.seed)
    warmup = max(0, workload.steps - args.steps)
    device = torch.device(args.device)
    keys, values, n0 = workload.keys.to(device), workload.values.to(device), workload.context
    queries = workload.queries.to(device)
    # CUDA work is asynchronous: every clock read below waits for what was queued before it
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    heads, kv_heads, head_dim = queries.shape[2], keys.shape[1], keys.shape[3]
    scale = config.scale or default_scale(head_dim)

    from hetero.worker import Worker

    # Evicted tokens a Python add must index (training, a full tail list) reach the index in the background; the
    # native decode append indexes the rest itself. The host tier's next pages are backed on a thread of their own,
    # as in a model's cache (the indexer of a faiss or lsh layer is seldom idle for it).
    indexer, populator = Worker("hetero-indexer"), new_populator()
    layer = LayerCache(config.with_(kv_dtype=args.kv_dtype), indexer=indexer, populator=populator)
    attn = HeteroAttention(layer.config)
    attn.native_trace = args.native_threads
    attn.record_phases = True
    t = time.perf_counter()
    ctx = progress(f"prefill: {n0:,} tokens into the tiers, building the {config.retriever} index") if progress \
        else contextlib.nullcontext()
    with ctx:
        layer.append(keys[:, :, :n0], values[:, :, :n0])
        layer.wait_indexed()  # the index build is part of the prefill
        sync()
    prefill_s = time.perf_counter() - t
    log(f"prefill into tiers: {prefill_s:.2f} s (host tier {layer.host_lengths()} tokens)")
    q_dtype = queries.dtype
    plan = attn.plan(layer, heads, q_dtype)
    rates = measure_rates(layer.host, config.resolved_threads)
    log(f"read rates: streaming {rates.stream_gbps:.1f} GB/s, random {rates.run_bytes}-byte runs "
        f"{rates.random_gbps:.1f} GB/s")

    dense_ms, hetero_ms, errors, rows, steps_out, spans, warm_ms = [], [], [], [], [], [], []
    fixed, floors, checks = [], [], []
    scratch = reference_scratch(keys, n0 + workload.steps)
    phases: Dict[str, List[float]] = {p: [] for p in PHASES}
    for step in range(workload.steps):
        if step == warmup:  # the measured steps start here
            dense_ms, hetero_ms, rows, steps_out, spans, fixed, floors, checks = [], [], [], [], [], [], [], []
            phases = {p: [] for p in PHASES}
        n = n0 + step + 1
        layer.add_spans.clear()
        q, k_new, v_new = queries[step], keys[:, :, n - 1], values[:, :, n - 1]  # the caller's inputs
        sync()
        t = time.perf_counter()
        if plan.fused and plan.on_cpu:  # what a model's layer does: a plan per step, then token and step in one call
            plan = attn.plan(layer, heads, q_dtype)
            t_plan = time.perf_counter()
            out = attn.decode(q, k_new, v_new, layer, plan, out=attn.output(plan, layer))
            t_end = time.perf_counter()
            evict_ms, plan_ms = attn.phases(plan, layer)["evict"], (t_plan - t) * 1e3
        else:
            layer.append(k_new, v_new)
            sync()
            t_evict = time.perf_counter()
            plan = attn.plan(layer, heads, q_dtype)
            t_plan = time.perf_counter()
            if plan.fused:
                out = attn.run(q, layer, plan, out=attn.output(plan, layer))
            else:
                res = attn.run(q, layer, plan, return_details=True)
            sync()
            t_end = time.perf_counter()
            evict_ms, plan_ms = (t_evict - t) * 1e3, (t_plan - t_evict) * 1e3
            spans.append(Span("evict", t, t_evict, "MainThread"))
        if plan.fused:
            step_phases = attn.phases(plan, layer)
            stats = attn.step_stats(plan, layer)
            # a decode call's append is counted in the fixed cost, with the Python around the native step
            native_ms = sum(v for p, v in step_phases.items() if p != "evict")
            spans.extend(attn.phase_spans(plan, layer))
        else:
            out, step_phases, native_ms = res.out, dict(res.timings_ms), 0.0
            stats = {"rows_read": res.rows_read,
                     "index_bytes": layer.retriever.last_bytes_read() if res.selection is not None else 0}
            spans.extend(res.spans)
        hetero_ms.append((t_end - t) * 1e3)
        spans.extend(layer.add_spans)  # this step's Python index add, if any
        add_ms = sum(s.ms for s in layer.add_spans)
        fixed.append(hetero_ms[-1] - native_ms if plan.fused else float("nan"))
        floors.append(floor_ms(window_bytes(layer) + stats["index_bytes"], rows_bytes(layer, stats["rows_read"]),
                               rates))
        torch.set_num_threads(config.resolved_threads)  # the dense baseline gets every thread
        t = time.perf_counter()
        dense_sdpa(q, keys, values, n)
        sync()
        t_dense = time.perf_counter()
        dense_ms.append((t_dense - t) * 1e3)
        spans.append(Span("dense_sdpa", t, t_dense, "MainThread"))
        checks.append((q, n, out.to(torch.float32, copy=True)))  # checked after the timed steps
        step_phases = {p: step_phases.get(p, 0.0) for p in PHASES}
        step_phases.update(evict=evict_ms, index_add=add_ms, plan=plan_ms)
        for p in PHASES:
            phases[p].append(step_phases[p])
        host_total = sum(layer.host_lengths()) * layer.kv_heads
        rows.append(stats["rows_read"] / host_total if host_total else 0.0)
        window_side = step_phases["window"]
        host_side = step_phases["retrieve"] + step_phases["host_attn"] + step_phases.get("index_wait", 0.0)
        steps_out.append({"step": step - warmup, "hetero_ms": round(hetero_ms[-1], 4),
                          "dense_ms": round(dense_ms[-1], 4), "rel_error": None,
                          "fixed_ms": round(fixed[-1], 4), "floor_ms": _sig4(floors[-1]),
                          "window_ms": round(window_side, 4), "host_ms": round(host_side, 4),
                          "critical": "host" if host_side > window_side else "window",
                          "phases": {p: round(v, 4) for p, v in step_phases.items()}})
        if step < warmup:
            warm_ms.append(round(hetero_ms[-1], 4))
        what = (f"warm-up {step + 1}/{warmup}" if step < warmup else
                f"step {step - warmup + 1}/{workload.steps - warmup}")
        log(f"{what}: hetero {hetero_ms[-1]:.2f} ms, dense {dense_ms[-1]:.2f} ms")
    attn.close()
    layer.wait_indexed()
    indexer.close()
    populator.close()
    for row, (q, n, out) in zip(steps_out, checks):
        ref = reference_output(q, keys, values, n, scale, scratch)
        row["rel_error"] = float((out - ref).norm() / ref.norm())
        errors.append(row["rel_error"])
    log(f"rel_error against the float32 reference: max {max(errors):.2e} over {len(errors)} steps" if errors else
        "no measured steps")

    d_ms, h_ms = _median(dense_ms), _median(hetero_ms)
    window_med, host_med = _median([s["window_ms"] for s in steps_out]), _median([s["host_ms"] for s in steps_out])
    critical = "host" if host_med > window_med else "window"
    return {
        "context": n0, "batch": keys.shape[0], "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
        "kv_dtype": args.kv_dtype, "workload": args.workload, "device": device.type, "window": config.window, "sinks": config.sinks,
        "budget": config.budget, "budget_per": config.budget_per, "retriever": config.retriever,
        "backends": {"window": plan.window.name, "host": plan.host.name},
        "threads": config.resolved_threads, "overlap": config.overlap_on(layer.device),
        "steps": workload.steps - warmup, "warmup": warmup, "warmup_ms": warm_ms,
        "dense_ms": round(d_ms, 4), "hetero_ms": round(h_ms, 4),
        "speedup": round(d_ms / h_ms, 4) if h_ms > 0 else None,
        "fused": plan.fused,
        "fixed_ms": round(_median(fixed), 4) if plan.fused else None,
        "floor_ms": _sig4(_median(floors)), "floor_ratio": round(h_ms / _median(floors), 3) if floors else None,
        "stream_gbps": round(rates.stream_gbps, 2), "random_read_gbps": round(rates.random_gbps, 2),
        "cpu": cpu_model(),
        "rel_error": max(errors) if errors else None, "rel_error_mean": _median(errors),
        "phases": {p: round(_median(v), 4) for p, v in phases.items()},
        "window_ms": round(window_med, 4), "host_ms": round(host_med, 4), "critical_path": critical,
        "critical_share": round(max(window_med, host_med) / h_ms, 4) if h_ms > 0 else None,
        "rows_read_fraction": round(_median(rows), 6),
        "memory": layer.memory(), "prefill_s": round(prefill_s, 3), "per_step": steps_out,
        "_spans": spans,
    }
