"""Whole-model decoding: a transformers model decoding token by token with hetero, against the same model with
transformers' default cache (``DynamicCache``) + SDPA and with a preallocated ``StaticCache`` + SDPA, in the same
run. One JSON line per row:

``model, context, batch, tokens_per_s_dense, tokens_per_s_static, tokens_per_s_hetero, ratio, weights_bound``,
and what each row was measured under. ``tokens_per_s`` counts every sequence's tokens (batch x steps / time of the
measured steps, after warm-up steps). ``ratio`` = hetero / the faster dense baseline. ``weights_bound`` = the best
ratio possible when every step still reads the weights once: the faster baseline's step time over the step time of
the same model with a nearly empty cache (``floor_step_ms``, also measured here). The static, floor and hetero
decodes run interleaved, one step of each per round: each figure sits beside its references in time, not minutes
apart. The dense (``DynamicCache``) decode runs alone after them (``dense_alone``): each of its steps rebuilds and
frees its whole cache, which slowed the step after it of whichever run came next. Before any step every cache is
read once (``_read_once``), so that no run pays the first read of memory that sat idle inside its measured steps.

Rows:

* ``smollm2-135m``: SmolLM2-135M-Instruct's real weights (float32) on an 8K prompt of real prose; the prompt is
  prefilled once with the dense cache, and the same post-RoPE K/V fill the static cache and hetero's; greedy
  agreement of hetero with dense over 32 tokens (``tokens_agree``).
* ``llama3-8b-geometry``: Llama-3-8B's layer shapes (hidden 4096, 32 q / 8 KV heads, head_dim 128, MLP 14336,
  vocab 128256) with 4 layers and random weights, bfloat16, at 32K and 128K (batch 1) and 32K (batch 4). A prefill
  would take CPU-hours, so every cache is filled with the same synthetic post-RoPE K/V
  (``hetero.tools.workloads.synthetic``: clustered keys, so retrieval has structure to find).
"""
from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from hetero.config import HeteroConfig
from hetero.tools.argtypes import OneLineParser, list_of, nonneg_int, positive_int

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=262144,
                 tie_word_embeddings=False)


@dataclass
class Decoding:
    """One greedy decode of an interleaved measurement: its cache, its next input ``[B, 1]``, and the attention
    implementation the model runs it with."""
    cache: object
    next_ids: torch.Tensor
    attn: str
    tokens: List[torch.Tensor] = field(default_factory=list)
    times: List[float] = field(default_factory=list)


def _decode_interleaved(model, runs: Dict[str, Decoding], steps: int, warmup: int) -> Dict[str, Dict]:
    """``warmup + steps`` rounds of one greedy step of every run, the runs' order rotated each round: the machine's
    drift (a shared VM's memory bandwidth moves by 2x within minutes) and the cold caches a step leaves to the
    next fall on every run alike. Per run: the tokens ``[B, warmup + steps]`` and the measured steps' times (ms)."""
    names = list(runs)
    with torch.no_grad():
        for i in range(warmup + steps):
            for name in names[i % len(names):] + names[:i % len(names)]:
                run = runs[name]
                if model.config._attn_implementation != run.attn:
                    model.set_attn_implementation(run.attn)
                t = time.perf_counter()
                logits = model(input_ids=run.next_ids, past_key_values=run.cache, use_cache=True).logits[:, -1]
                run.next_ids = logits.argmax(-1, keepdim=True)
                run.times.append(time.perf_counter() - t)
                run.tokens.append(run.next_ids)
    return {name: {"tokens": torch.cat(run.tokens, dim=1), "step_ms": [1e3 * x for x in run.times[warmup:]]}
            for name, run in runs.items()}


def _tps(run: Dict, batch: int) -> float:
    return batch * len(run["step_ms"]) / (sum(run["step_ms"]) / 1e3)


def _hetero_cache(model, kv, config: HeteroConfig, padding: int = 0):
    """A HeteroCache filled with the per-layer ``kv [(k, v)]`` ``[B, Hkv, N, D]`` (index built before it returns)."""
    from hetero.hf import HeteroCache

    cache = HeteroCache(config, config=model.config, progress_tokens=0)
    for layer, (k, v) in zip(cache.layers, kv):
        layer.layer.append(k, v)
        layer.processed, layer.pad = k.shape[2], [padding] * k.shape[0]
        layer.lazy_initialization(k, v)
    for layer in cache.layers:
        layer.layer.wait_indexed()
    return cache


def _static_cache(model, kv, max_len: int):
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_len)
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


def _read_once(cache) -> None:
    """Read every byte a cache holds once (a hetero cache: its tiers and index arrays) and drop the result.

    On the shared VMs measured here, memory that sat untouched while other large buffers were written and freed
    (the other caches, an index build's temporaries) is slow to read the first time: a 512 MB host tier read in
    33-257 ms against 16-18 ms once read (the guest's page counters unchanged: the hypervisor's doing). A dense
    step reads all of its cache and pays that once, in its warm-up steps; hetero reads a few rows per step and
    paid it over tens of steps, its layer built first at up to 8x its host-row time. Reading every cache once
    before the warm-up puts the cost outside the measured steps for all of them alike."""
    from hetero.hf import HeteroCache

    if isinstance(cache, HeteroCache):
        arrays = []
        for layer in cache.layers:
            lc = layer.layer
            if lc.initialized:
                # each KV head's rows in use, one contiguous run each (the pool's room after them is not read)
                arrays += [lc.fast.k, lc.fast.v] + list(lc.host.kv_in_use)
                arrays += lc.retriever.buffers()
    else:
        arrays = [t for layer in cache.layers for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor)]
    for a in arrays:
        t = a if isinstance(a, torch.Tensor) else torch.from_numpy(a)
        if t.numel():
            t.reshape(-1).view(torch.uint8).max()


def _dynamic_cache(model, kv):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=list(kv), config=model.config)  # its updates concatenate: kv stays intact


def _floor_cache(model, batch: int, dtype):
    """A 16-token ``DynamicCache``: a step over it is everything but attention (weights, norms, Python)."""
    from transformers import DynamicCache

    cfg = model.config
    kv = [(torch.randn(batch, cfg.num_key_value_heads, 16, cfg.head_dim, dtype=dtype),
           torch.randn(batch, cfg.num_key_value_heads, 16, cfg.head_dim, dtype=dtype))
          for _ in range(cfg.num_hidden_layers)]
    return DynamicCache(ddp_cache_data=kv, config=cfg)


def _row(name: str, model, kv, first: torch.Tensor, config: HeteroConfig, steps: int, warmup: int, dtype,
         note: str, agree: bool = False) -> Dict:
    """One JSON row: the static, floor and hetero decodes interleaved step by step, then the dense one alone (all
    four caches are alive at once: about three copies of ``kv`` and hetero's tiers). A ``DynamicCache`` step
    concatenates its whole cache anew and frees the old copy (GBs at 128K); interleaved, the next step of another
    run found its memory slow to read (``_read_once``): hetero's step over the floor's took 28.5 ms instead of
    12.3-13.0 (Llama-3-8B geometry, 128K, 4 layers; with the static run interleaved instead, 12.3)."""
    import hetero
    from hetero.hf import ATTN_NAME
    from hetero.tools.envinfo import cpu_model

    b, n = first.shape[0], kv[0][0].shape[2]
    cache = None
    try:
        hetero.wrap(model, config)  # registers hetero's attention; each decode below sets the implementation it runs
        cache = _hetero_cache(model, kv, config)
        runs = {"dense": Decoding(_dynamic_cache(model, kv), first, "sdpa"),
                "static": Decoding(_static_cache(model, kv, n + steps + warmup + 1), first, "sdpa"),
                "floor": Decoding(_floor_cache(model, b, dtype), torch.zeros(b, 1, dtype=torch.long), "sdpa"),
                "hetero": Decoding(cache, first, ATTN_NAME)}
        for run in runs.values():
            _read_once(run.cache)
        dense = runs.pop("dense")
        out = _decode_interleaved(model, runs, steps, warmup)
        out.update(_decode_interleaved(model, {"dense": dense}, steps, warmup))
        memory = cache.memory()
    finally:  # the model as it came, whatever failed (a cache that did not fit, an interrupt)
        if cache is not None:
            cache.close()
        hetero.unwrap(model)
        runs = cache = None
        gc.collect()
    dense, static, het = out["dense"], out["static"], out["hetero"]
    floor = statistics.median(out["floor"]["step_ms"])
    tps_d, tps_s, tps_h = _tps(dense, b), _tps(static, b), _tps(het, b)
    best = max(tps_d, tps_s)
    best_ms = 1e3 * b / best
    row = {"model": name, "context": n, "batch": b, "steps": steps, "warmup": warmup,
           "tokens_per_s_dense": round(tps_d, 3), "tokens_per_s_static": round(tps_s, 3),
           "tokens_per_s_hetero": round(tps_h, 3), "ratio": round(tps_h / best, 3),
           "weights_bound": round(best_ms / floor, 3), "floor_step_ms": round(floor, 3),
           "step_ms_dense": round(statistics.median(dense["step_ms"]), 3),
           "step_ms_static": round(statistics.median(static["step_ms"]), 3),
           "step_ms_hetero": round(statistics.median(het["step_ms"]), 3),
           "hetero": {"window": config.window, "sinks": config.sinks, "budget": config.budget,
                      "retriever": config.retriever}, "memory": memory, "kv": note, "interleaved": True,
           "dense_alone": True,
           "threads": torch.get_num_threads(), "cpu": cpu_model()}
    if agree:
        row["tokens_agree"] = int((dense["tokens"] == het["tokens"]).sum())
        row["tokens_compared"] = int(dense["tokens"].numel())
    return row


def smollm2_row(context: int = 8192, steps: int = 32, warmup: int = 3, config: Optional[HeteroConfig] = None) -> Dict:
    from hetero.tools.workloads import smollm2
    from hetero.tools.workloads.real import corpus_text

    model, tok = smollm2.load()
    ids = tok(corpus_text(), return_tensors="pt").input_ids[:, :context]
    from transformers import DynamicCache

    prefill = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(ids, past_key_values=prefill, logits_to_keep=1).logits
    kv = [(layer.keys, layer.values) for layer in prefill.layers]
    first = logits[:, -1].argmax(-1, keepdim=True)
    return _row("smollm2-135m", model, kv, first, config or HeteroConfig(), steps, warmup, torch.float32,
                "the real prompt's K/V (one dense prefill)", agree=True)


def llama3_rows(contexts=(32768, 131072), batches=(1,), batch4_context: int = 32768, layers: int = 4,
                steps: int = 16, warmup: int = 3, config: Optional[HeteroConfig] = None) -> List[Dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from hetero.tools.workloads.synthetic import make_synthetic

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=layers, **LLAMA3_8B)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16).eval()
    config = config or HeteroConfig(window=4096, sinks=4, budget=0.02)
    runs = [(n, b) for n in contexts for b in batches] + ([(batch4_context, 4)] if batch4_context else [])
    rows = []
    for n, b in runs:
        kv = []
        for i in range(layers):
            w = make_synthetic(n, b, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, 1,
                               torch.bfloat16, seed=i)
            kv.append((w.keys[:, :, :n].contiguous(), w.values[:, :, :n].contiguous()))
            del w
        first = torch.zeros(b, 1, dtype=torch.long)
        rows.append(_row("llama3-8b-geometry", model, kv, first, config, steps, warmup, torch.bfloat16,
                         "synthetic post-RoPE K/V (clustered keys), the same in every cache"))
        del kv
        gc.collect()
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = OneLineParser(prog="hetero bench e2e", description=" ".join(__doc__.split("\n\n")[:2]))
    p.add_argument("--rows", default="smollm2,llama3", help="which rows: smollm2, llama3 (comma separated)")
    p.add_argument("--contexts", type=list_of(positive_int), default="32768,131072",
                   help="Llama-3-8B-geometry contexts, batch 1")
    p.add_argument("--batch4-context", type=nonneg_int, default=32768, help="the batch-4 row's context (0: none)")
    p.add_argument("--steps", type=positive_int, default=16,
                   help="measured decode steps per row (the SmolLM2 row takes at least 32: its greedy agreement)")
    p.add_argument("--warmup", type=nonneg_int, default=3)
    p.add_argument("--smollm2-context", type=positive_int, default=8192)
    p.add_argument("--json", action="store_true", help="JSON lines only (the default prints them too)")
    ns = p.parse_args(argv)
    rows = [r for r in ns.rows.split(",") if r]
    unknown = set(rows) - {"smollm2", "llama3"}
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}; choose from smollm2, llama3")
    from hetero.tools.bench import run_reporting_missing_workload

    def run():
        if "smollm2" in rows:
            print(json.dumps(smollm2_row(ns.smollm2_context, max(ns.steps, 32), ns.warmup)), flush=True)
        if "llama3" in rows:
            contexts = tuple(ns.contexts)
            for row in llama3_rows(contexts, batch4_context=ns.batch4_context, steps=ns.steps, warmup=ns.warmup):
                print(json.dumps(row), flush=True)

    return run_reporting_missing_workload("hetero bench e2e", run)


if __name__ == "__main__":
    sys.exit(main())
