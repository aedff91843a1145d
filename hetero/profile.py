"""``hetero profile``: dense attention and hetero on the same decode inputs, side by side.

For each decode step: the step's new key/value is appended to hetero's cache (eviction to the host tier
and the retriever included in ``hetero_ms``) and to the dense KV; hetero runs; torch SDPA over all tokens
in the KV dtype runs (``dense_ms``, what a user would otherwise run); and a float32 reference over the
same stored KV gives ``rel_error = ||out - out_dense|| / ||out_dense||``.
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from .attention import HeteroAttention
from .cache import LayerCache
from .config import HeteroConfig
from .merge import merge
from .reference import default_scale, window_attention
from .workloads.synthetic import SyntheticWorkload, make_synthetic

PHASES = ("window", "retrieve", "host_attn", "merge", "transfer", "evict")
_REF_CHUNK = 32768


@dataclass
class ProfileArgs:
    context: int = 32768
    batch: int = 1
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    steps: int = 5
    seed: int = 0
    kv_dtype: str = "bfloat16"


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
                     scale: float) -> torch.Tensor:
    """Float32 attention over the first ``n`` stored tokens, computed in chunks fused by ``merge``."""
    parts = []
    b = q.shape[0]
    for start in range(0, n, _REF_CHUNK):
        stop = min(n, start + _REF_CHUNK)
        lengths = torch.full((b,), stop - start, dtype=torch.long)
        parts.append(window_attention(q, keys[:, :, start:stop], values[:, :, start:stop], lengths, scale=scale))
    return merge(parts).out


def _median(xs: List[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def run_profile(config: HeteroConfig, args: ProfileArgs, workload: Optional[SyntheticWorkload] = None,
                log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Dict:
    """Profile ``args.steps`` decode steps of one layer; returns the JSON-ready result dict."""
    from .config import KV_DTYPES

    torch.set_num_threads(config.resolved_threads)
    dtype = KV_DTYPES[args.kv_dtype]
    if workload is None:
        log(f"building synthetic workload: context {args.context}, batch {args.batch}, "
            f"{args.heads}/{args.kv_heads} heads, head_dim {args.head_dim}, {args.kv_dtype}")
        workload = make_synthetic(args.context, args.batch, args.heads, args.kv_heads, args.head_dim,
                                  args.steps, dtype, args.seed)
    keys, values, n0 = workload.keys, workload.values, workload.context
    scale = config.scale or default_scale(args.head_dim)

    layer = LayerCache(config.with_(kv_dtype=args.kv_dtype))
    attn = HeteroAttention(layer.config)
    t = time.perf_counter()
    layer.append(keys[:, :, :n0], values[:, :, :n0])
    prefill_s = time.perf_counter() - t
    log(f"prefill into tiers: {prefill_s:.2f} s (host tier {layer.host_lengths()} tokens)")
    plan = attn.plan(layer)

    dense_ms, hetero_ms, errors, rows = [], [], [], []
    phases: Dict[str, List[float]] = {p: [] for p in PHASES}
    for step in range(workload.steps):
        n = n0 + step + 1
        t = time.perf_counter()
        layer.append(keys[:, :, n - 1], values[:, :, n - 1])
        evict_ms = (time.perf_counter() - t) * 1e3
        q = workload.queries[step]
        t = time.perf_counter()
        res = attn.run(q, layer, return_details=True)
        hetero_ms.append((time.perf_counter() - t) * 1e3 + evict_ms)
        t = time.perf_counter()
        dense_sdpa(q, keys, values, n)
        dense_ms.append((time.perf_counter() - t) * 1e3)
        ref = reference_output(q, keys, values, n, scale)
        errors.append(float((res.out.float() - ref).norm() / ref.norm()))
        for p in PHASES:
            phases[p].append(evict_ms if p == "evict" else res.timings_ms.get(p, 0.0))
        host_total = sum(layer.host_lengths()) * layer.kv_heads
        rows.append(res.rows_read / host_total if host_total else 0.0)
        log(f"step {step + 1}/{workload.steps}: hetero {hetero_ms[-1]:.2f} ms, dense {dense_ms[-1]:.2f} ms, "
            f"rel_error {errors[-1]:.2e}")

    d_ms, h_ms = _median(dense_ms), _median(hetero_ms)
    return {
        "context": n0, "batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads,
        "head_dim": args.head_dim, "kv_dtype": args.kv_dtype, "window": config.window, "sinks": config.sinks,
        "budget": config.budget, "retriever": config.retriever,
        "backends": {"window": plan.window.name, "host": plan.host.name},
        "threads": config.resolved_threads, "steps": workload.steps,
        "dense_ms": round(d_ms, 4), "hetero_ms": round(h_ms, 4),
        "speedup": round(d_ms / h_ms, 4) if h_ms > 0 else None,
        "rel_error": max(errors) if errors else None, "rel_error_mean": _median(errors),
        "phases": {p: round(_median(v), 4) for p, v in phases.items()},
        "rows_read_fraction": round(_median(rows), 6),
        "memory": layer.memory(), "prefill_s": round(prefill_s, 3),
    }
