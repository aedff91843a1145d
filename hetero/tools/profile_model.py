"""``hetero profile --model``: a HuggingFace model end to end, dense vs hetero on the same real prompt.

Prefill of ``context`` prompt tokens (the standard library prose of ``hetero.tools.workloads.real``), then
``steps`` greedy decode steps, once with the model's own SDPA + DynamicCache and once wrapped by hetero.
Reports decode tokens/s of both, greedy agreement, the first decode step's max logit difference (``None`` with
one step: the first token's logits come from the prefill, dense in both runs), the
per-layer phase breakdown of hetero's decode steps and bytes per tier.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List

import torch

from hetero.config import HeteroConfig
from hetero.errors import HeteroError


def _first_decode_logits_diff(ref, mine):
    """Max |difference| of the logits of the first decode step (``generate``'s ``logits[1]``: ``logits[0]`` is the
    prefill's, computed densely in both runs); None when there was no decode step."""
    return float((ref[1] - mine[1]).abs().max()) if len(ref) > 1 else None


def _load(name: str):
    if name == "smollm2":
        from .workloads import smollm2

        return smollm2.load()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        return (AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval(),
                AutoTokenizer.from_pretrained(name))
    except (OSError, ValueError, KeyError) as e:  # a folder transformers cannot load: one line, not a traceback
        raise HeteroError(f"--model {name}: transformers could not load it ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:300]})") from None


class _TokenClock:
    """A generate() stopping criterion that never stops and records when each new token was ready."""

    def __init__(self):
        self.times: List[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def timed_generate(model, ids, new_tokens: int, **kw):
    """Greedy ``model.generate`` with per-token timestamps from the same call.

    Returns ``(output, prefill_s, decode_tokens_per_s)``: prefill_s runs from the call to the first new token
    (prompt forward + first sample), decode tokens/s is ``(n - 1) / (t_last - t_first)`` over the n new tokens
    (0 when fewer than 2 were generated). Both come from one call: a separately timed prefill subtracted from a
    whole call would mix a cold and a warm prefill and can go negative on a small model.
    """
    from transformers import StoppingCriteriaList

    clock = _TokenClock()
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                             stopping_criteria=StoppingCriteriaList([clock]), **kw)
    prefill = (clock.times[0] if clock.times else time.perf_counter()) - t
    n = len(clock.times)
    tps = (n - 1) / (clock.times[-1] - clock.times[0]) if n >= 2 and clock.times[-1] > clock.times[0] else 0.0
    return out, prefill, tps


def profile_model(name: str, config: HeteroConfig, context: int, steps: int,
                  log: Callable[[str], None] = print) -> Dict:
    import hetero
    from hetero.hf import HeteroCache
    from .workloads.real import corpus_text

    if steps < 2:
        raise ValueError("--steps must be >= 2 for --model")
    dense, tok = _load(name)
    model, _ = _load(name)
    ids = tok(corpus_text(), return_tensors="pt").input_ids[:, :context]
    log(f"dense: prefill {ids.shape[1]} tokens + {steps} decode steps")
    ref, dense_prefill, dense_tps = timed_generate(dense, ids, steps, return_dict_in_generate=True,
                                                   output_logits=True)
    hetero.wrap(model, config)
    attn_modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
    for m in attn_modules:
        m._hetero_record = []
    log("hetero: same prompt and steps")
    mine, het_prefill, het_tps = timed_generate(model, ids, steps, return_dict_in_generate=True,
                                                output_logits=True)
    cache = HeteroCache(config, model.config.num_hidden_layers)  # measure tiers on a fresh run's cache
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False, past_key_values=cache)
    cache.close()
    # Side by side, a layer's step waits for the slower side; on the same threads (the CPU schedule), for both.
    overlapped = config.overlap_on(next(model.parameters()).device)
    per_layer = []
    for m in sorted(attn_modules, key=lambda m: m.layer_idx):
        recs = m._hetero_record
        del m._hetero_record
        if not recs:
            continue
        mean = lambda key: sum(r.get(key, 0.0) for r in recs) / len(recs)  # noqa: E731
        host, window = mean("retrieve") + mean("host_attn"), mean("window")
        per_layer.append({"layer": m.layer_idx, "window": window, "retrieve": mean("retrieve"),
                          "host_attn": mean("host_attn"), "merge": mean("merge"),
                          "step": (max(window, host) if overlapped else window + host) + mean("merge"),
                          "critical": "host" if host > window else "window"})
    agree = int((ref.sequences[0, ids.shape[1]:] == mine.sequences[0, ids.shape[1]:]).sum())
    host_bound = sum(1 for row in per_layer if row["critical"] == "host")
    return {
        "model": name, "context": ids.shape[1], "steps": steps, "layers": len(per_layer), "window": config.window,
        "sinks": config.sinks, "budget": config.budget, "retriever": config.retriever,
        "prefill_s_dense": round(dense_prefill, 3), "prefill_s_hetero": round(het_prefill, 3),
        "tokens_per_s_dense": round(dense_tps, 3), "tokens_per_s_hetero": round(het_tps, 3),
        "tokens_agree": agree, "first_logits_max_diff": _first_decode_logits_diff(ref.logits, mine.logits),
        "per_layer": per_layer, "memory": cache.memory(),
        "overlap": overlapped,
        "verdict": (f"the host side is the critical path in {host_bound} of {len(per_layer)} layers" if overlapped else
                    f"the sides shared the same threads, so every layer's step is their sum; the host side is the "
                    f"larger in {host_bound} of {len(per_layer)} layers"),
    }
