"""Prefill and a second chat turn through ``generate()``: SmolLM2-135M (real weights, float32) on an 8K prompt of
real prose, with transformers' ``DynamicCache`` + SDPA and with a ``HeteroCache`` (exact mode, ``retriever="all"``,
and the default retriever), in the same run. One JSON line per row.

* ``prefill`` rows: ``generate(prompt, max_new_tokens=1)`` one-shot and with ``prefill_chunk_size`` (1K), wall time
  of the call (the prefill and one token); ``logits_max_diff`` of the first token's logits against the dense
  one-shot run; ``fast_peak_layer_bytes`` from the cache's byte accounting (the most K/V one layer held on the fast
  device).
* ``turn2`` rows: after turn 1 (the prompt and ``--new-tokens`` answered), a second user message is appended and
  ``generate(history, past_key_values=cache)`` runs again on the reused cache: ``turn2_ms`` is the whole call (the
  new tokens' prefill and ``--new-tokens`` tokens), ``turn2_first_token_ms`` the time from the call to its first
  token (a streamer's clock). ``tokens_agree`` compares the turn-2 answer with the dense one.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Dict, List, Optional

import torch

from hetero.config import HeteroConfig
from hetero.tools.argtypes import OneLineParser, positive_int
from hetero.tools.workloads import smollm2

TURN2 = "<|im_end|>\n<|im_start|>user\nSummarize the passage above in two sentences.<|im_end|>\n<|im_start|>assistant\n"


def _caches(model):
    """The caches compared: name -> (hetero config or None for dense)."""
    return {"dense": None, "hetero-exact": HeteroConfig(window=1024, sinks=4, retriever="all"),
            "hetero-default": HeteroConfig(window=1024, sinks=4)}


def _new_cache(model, config: Optional[HeteroConfig]):
    import hetero
    from transformers import DynamicCache

    from hetero.hf import HeteroCache

    if config is None:
        if getattr(model, "hetero_config", None) is not None:
            hetero.unwrap(model)
        return DynamicCache(config=model.config)
    hetero.wrap(model, config, progress_tokens=0)
    return HeteroCache(config, config=model.config, progress_tokens=0)


def _timed_generate(model, ids, cache, **kw):
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, **kw)
    return out, 1e3 * (time.perf_counter() - t)


def _memory(cache) -> Dict:
    return cache.memory() if hasattr(cache, "memory") else {}


def _close(cache) -> None:
    if hasattr(cache, "close"):
        cache.close()


def prefill_rows(model, ids: torch.Tensor, chunk: int) -> List[Dict]:
    rows, ref = [], None
    for name, config in _caches(model).items():
        for chunked in (False, True):
            cache = _new_cache(model, config)
            kw = {"prefill_chunk_size": chunk} if chunked else {}
            out, ms = _timed_generate(model, ids, cache, max_new_tokens=1, **kw)
            logits = out.logits[0]
            if ref is None:
                ref = logits
            mem = _memory(cache)
            rows.append({"row": "prefill", "cache": name, "context": ids.shape[1],
                         "chunk": chunk if chunked else None, "prefill_ms": round(ms, 1),
                         "logits_max_diff": float((logits - ref).abs().max()),
                         "fast_peak_layer_bytes": mem.get("fast_peak_layer_bytes")})
            _close(cache)
    dense = {r["chunk"]: r["prefill_ms"] for r in rows if r["cache"] == "dense"}
    for r in rows:
        r["ratio_to_dense_one_shot"] = round(r["prefill_ms"] / dense[None], 3)
    return rows


class _FirstToken:
    """A generate() streamer that notes when the first new token arrives (its first ``put`` is the prompt)."""

    def __init__(self):
        self.puts, self.first = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def turn2_rows(model, ids: torch.Tensor, turn2: torch.Tensor, new_tokens: int) -> List[Dict]:
    rows, ref = [], None
    for name, config in _caches(model).items():
        cache = _new_cache(model, config)
        first, _ = _timed_generate(model, ids, cache, max_new_tokens=new_tokens)
        history = torch.cat([first.sequences, turn2], dim=1)
        streamer, start = _FirstToken(), time.perf_counter()
        out, ms = _timed_generate(model, history, cache, max_new_tokens=new_tokens, streamer=streamer)
        answer = out.sequences[:, history.shape[1]:]
        _close(cache)
        if ref is None:
            ref = answer
        rows.append({"row": "turn2", "cache": name, "context": ids.shape[1], "turn2_new_tokens": turn2.shape[1] + 1,
                     "answer_tokens": new_tokens, "turn2_ms": round(ms, 1),
                     "turn2_first_token_ms": round(1e3 * (streamer.first - start), 1),
                     "tokens_agree": int((answer == ref).sum()), "tokens_compared": int(ref.numel())})
    dense = next(r for r in rows if r["cache"] == "dense")
    for r in rows:
        r["first_token_ratio_to_dense"] = round(r["turn2_first_token_ms"] / dense["turn2_first_token_ms"], 3)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = OneLineParser(prog="hetero bench chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=positive_int, default=8192, help="prompt tokens (real prose)")
    p.add_argument("--chunk", type=positive_int, default=1024, help="prefill_chunk_size of the chunked rows")
    p.add_argument("--new-tokens", type=positive_int, default=16, help="tokens answered per turn")
    p.add_argument("--rows", default="prefill,turn2", help="which rows: prefill, turn2 (comma separated)")
    p.add_argument("--json", action="store_true", help="JSON lines only (the default prints them too)")
    ns = p.parse_args(argv)
    if ns.context > smollm2.POSITIONS:
        p.error(f"--context {ns.context}: SmolLM2 has {smollm2.POSITIONS} positions")
    wanted = [r for r in ns.rows.split(",") if r]
    if set(wanted) - {"prefill", "turn2"}:
        p.error(f"unknown rows {sorted(set(wanted) - {'prefill', 'turn2'})}; choose from prefill, turn2")
    from hetero.tools.bench import run_reporting_missing_workload

    def run():
        from hetero.tools.envinfo import cpu_model
        from hetero.tools.workloads.real import corpus_text

        model, tok = smollm2.load()
        ids = tok(corpus_text(), return_tensors="pt").input_ids[:, :ns.context]
        turn2 = tok(TURN2, return_tensors="pt", add_special_tokens=False).input_ids
        for config in _caches(model).values():  # compile and page in every path before anything is timed
            cache = _new_cache(model, config)
            _timed_generate(model, ids[:, :64], cache, max_new_tokens=2)
            _close(cache)
        common = {"model": "smollm2-135m", "threads": torch.get_num_threads(), "cpu": cpu_model()}
        rows = (prefill_rows(model, ids, ns.chunk) if "prefill" in wanted else []) + \
            (turn2_rows(model, ids, turn2, ns.new_tokens) if "turn2" in wanted else [])
        for r in rows:
            print(json.dumps({**common, **r}), flush=True)

    return run_reporting_missing_workload("hetero bench chat", run)


if __name__ == "__main__":
    sys.exit(main())
