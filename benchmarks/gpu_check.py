"""One command that proves the GPU paths on a machine with a CUDA device, offline, in a few minutes.

    python benchmarks/gpu_check.py [--contexts 32768,131072] [--steps 8] [--skip-tests] [--json-only]

1. The CUDA tests (``pytest -m cuda``): Triton kernels vs float64, the pinned host tier, overlapped steps equal to
   sequential ones, evictions under concurrent steps, a wrapped random-weight Llama in exact mode, no host sync.
2. A Llama-3-8B layer (32 query / 8 KV heads, head_dim 128, bf16, synthetic post-RoPE K/V) at each context, window
   4096 + 4 sinks, budget 2 %, ivf-group: hetero's decode step (append + plan + run) against dense SDPA with the
   whole K/V on the GPU, and against an offloading baseline (the layer's K/V in pinned host memory, copied to the
   GPU every step, then SDPA: what an offloaded cache does). Per phase, whether the host side hid behind the GPU
   side, host<->device bytes per step (from the step's copies), and the host syncs a step makes (counted with
   ``torch.cuda.set_sync_debug_mode("warn")``).
3. One JSON line at the end: every figure above, the GPU and CPU model.

Without CUDA it prints one line and exits 2. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fail(message: str) -> int:
    print(f"gpu_check: error: {message}", file=sys.stderr)
    return 2


def _run_tests(log) -> dict:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests"],
                       cwd=ROOT, capture_output=True, text=True, timeout=240)
    tail = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else p.stderr[-300:]
    log(f"cuda tests: {tail} ({time.perf_counter() - t:.0f} s)")
    if p.returncode not in (0, 5):
        log(p.stdout[-4000:])
    return {"returncode": p.returncode, "summary": tail, "seconds": round(time.perf_counter() - t, 1)}


def _gpu_ms(fn, repeats: int = 5) -> float:
    import torch

    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _layer_check(context: int, steps: int, log) -> dict:
    import torch

    from hetero import HeteroAttention, HeteroConfig, LayerCache
    from hetero.tools.profile import dense_sdpa
    from hetero.tools.workloads.synthetic import make_synthetic
    from hetero.worker import Worker

    dev = torch.device("cuda")
    b, hq, hkv, d = 1, 32, 8, 128
    work = make_synthetic(context, b, hq, hkv, d, steps + 2, torch.bfloat16, 0)
    keys, values = work.keys.to(dev), work.values.to(dev)
    queries = work.queries.to(dev).to(torch.bfloat16)
    config = HeteroConfig(window=4096, sinks=4, budget=0.02, retriever="ivf-group")
    indexer = Worker("gpu-check-indexer")
    layer = LayerCache(config, indexer=indexer)
    t = time.perf_counter()
    layer.append(keys[:, :, :context], values[:, :, :context])
    layer.wait_indexed()
    log(f"{context:,} tokens: prefill into the tiers and index {time.perf_counter() - t:.1f} s "
        f"(host tier pinned: {layer.host.kv_pool.is_pinned()})")
    attn = HeteroAttention(config)
    wall, phases, syncs, hidden = [], {}, 0, []
    offload_k = torch.empty(keys.shape, dtype=keys.dtype, pin_memory=True)
    offload_v = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    offload_k.copy_(keys)
    offload_v.copy_(values)
    for step in range(steps + 2):
        n = context + step + 1
        q = queries[step]
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            t = time.perf_counter()
            layer.append(keys[:, :, n - 1], values[:, :, n - 1])
            plan = attn.plan(layer, hq, q.dtype)
            res = attn.run(q, layer, plan, return_details=True)
            torch.cuda.synchronize()
            step_ms = (time.perf_counter() - t) * 1e3
            torch.cuda.set_sync_debug_mode("default")
        if step < 2:
            continue  # warm-up: the first steps compile kernels and touch fresh pages
        syncs += sum(1 for w in caught if "synchroniz" in str(w.message).lower())
        wall.append(step_ms)
        for name, ms in res.timings_ms.items():
            phases.setdefault(name, []).append(ms)
        window_gpu = _gpu_ms(lambda: plan.window(q, layer.fast.k, layer.fast.v, layer.fast.lengths, plan.scale), 3)
        hidden.append(res.timings_ms.get("host", 0.0) <= window_gpu)
    dense = _gpu_ms(lambda: dense_sdpa(queries[0], keys, values, context), 5)

    def offload():
        k = offload_k[:, :, :context].to(dev, non_blocking=True)
        v = offload_v[:, :, :context].to(dev, non_blocking=True)
        dense_sdpa(queries[0], k, v, context)

    offloaded = _gpu_ms(offload, 3)
    bytes_per_step = {
        "q_to_host": b * hq * d * 2, "host_part_to_device": b * hq * (d + 1) * 4,
        "evicted_token_to_host": b * hkv * d * 2 * 2, "lengths_to_device": b * 4,
    }
    attn.close()
    indexer.close()
    med = statistics.median(wall)
    row = {
        "context": context, "hetero_ms": round(med, 3), "dense_gpu_ms": round(dense, 3),
        "offload_ms": round(offloaded, 3), "speedup_vs_dense": round(dense / med, 3),
        "speedup_vs_offload": round(offloaded / med, 3),
        "phases_ms": {k: round(statistics.median(v), 4) for k, v in phases.items()},
        "host_hidden_steps": f"{sum(hidden)}/{len(hidden)}", "host_syncs_in_steps": syncs,
        "bytes_per_step": bytes_per_step, "bytes_per_step_total": sum(bytes_per_step.values()),
        "fused": plan.fused, "backends": {"window": plan.window.name, "host": plan.host.name},
    }
    log(json.dumps(row))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", default="32768,131072")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--json-only", action="store_true")
    ns = p.parse_args(argv)
    try:
        import torch
    except ImportError:
        return _fail("torch is not installed")
    if not torch.cuda.is_available():
        return _fail(f"no CUDA device is visible to torch {torch.__version__} (CUDA build "
                     f"{torch.version.cuda or 'none'}); run this on a machine with a GPU")
    os.environ.pop("TRITON_INTERPRET", None)
    log = (lambda s: None) if ns.json_only else (lambda s: print(s, file=sys.stderr, flush=True))
    from hetero.tools.envinfo import cpu_model

    summary = {"gpu": torch.cuda.get_device_name(), "cpu": cpu_model(), "torch": torch.__version__,
               "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d")}
    if not ns.skip_tests:
        summary["tests"] = _run_tests(log)
    summary["layers"] = [_layer_check(int(c), ns.steps, log) for c in ns.contexts.split(",")]
    summary["ok"] = (summary.get("tests", {}).get("returncode", 0) == 0
                     and all(r["host_syncs_in_steps"] == 0 for r in summary["layers"]))
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
