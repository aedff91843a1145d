"""Passkey retrieval: a number hidden at a depth of real filler text, asked back, SmolLM2 dense vs hetero.

Filler: the standard library prose of ``hetero.tools.workloads.real``. For each context (2K/4K/8K tokens) and
depth (0 %-100 % of the filler), the needle "The pass key is NNNNN. Remember it." is inserted, the chat
template wraps "<text> What is the pass key?", and greedy decoding answers (a hit: the digits appear in the
answer). Dense: the model's own SDPA + DynamicCache. hetero: window 256, 4 sinks, budget 3 %, per retriever.
One JSON line per (context, depth, retriever).
"""
from __future__ import annotations

import json
import random
import sys
from typing import List, Optional

import torch

from hetero.tools.bench import run_reporting_missing_workload
from hetero.config import HeteroConfig
from hetero.errors import ConfigError
from hetero.tools.argtypes import OneLineParser, float_in, list_of, positive_int
from hetero.tools.workloads import smollm2

RETRIEVERS = ("exact", "ivf", "ivf-sq8", "ivf-group", "hnsw", "lsh")


def build_prompt(tok, filler_ids: List[int], context: int, depth: float, key: str) -> torch.Tensor:
    """Chat-formatted prompt of at most ``context`` tokens with the needle at ``depth`` of the filler. Decoding
    and re-tokenizing the filler can change its length, so the filler shrinks until the prompt fits."""
    needle = tok(f" The pass key is {key}. Remember it. {key} is the pass key. ", add_special_tokens=False).input_ids
    question = "What is the pass key? Answer with the number only."
    frame = tok.apply_chat_template([{"role": "user", "content": "X\n\n" + question}], add_generation_prompt=True)
    room = context - len(needle) - len(frame)
    while room > 0:
        body = filler_ids[:room]
        at = int(round(depth * len(body)))
        content = tok.decode(body[:at] + needle + body[at:]) + "\n\n" + question
        ids = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                      return_tensors="pt")
        ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
        if ids.shape[1] <= context:
            return ids
        room -= ids.shape[1] - context
    raise ConfigError(f"--contexts {context} is too small for the needle and the question: give at least a few "
                      "hundred tokens")


def _answer(model, tok, ids, new_tokens: int):
    """The greedy answer and its decode tokens/s (prefill excluded; ``timed_generate``)."""
    from hetero.tools.profile_model import timed_generate

    out, _, tps = timed_generate(model, ids, new_tokens)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), tps


def run(contexts=(2048, 4096, 8192), depths=(0.0, 0.25, 0.5, 0.75, 1.0), retrievers=RETRIEVERS, budget=0.03,
        window=256, sinks=4, new_tokens=12, seed=0, out=sys.stdout) -> List[dict]:
    import hetero
    from hetero.tools.workloads.real import corpus_text

    dense, tok = smollm2.load()
    filler = tok(corpus_text(), add_special_tokens=False).input_ids
    models = {}
    for name in retrievers:
        m, _ = smollm2.load()
        models[name] = hetero.wrap(m, HeteroConfig(window=window, sinks=sinks, budget=budget, retriever=name))
    rng = random.Random(seed)
    rows = []
    for context in contexts:
        for depth in depths:
            key = str(rng.randint(10000, 99999))
            ids = build_prompt(tok, filler, context, depth, key)
            dense_text, dense_tps = _answer(dense, tok, ids, new_tokens)
            for name, model in models.items():
                text, tps = _answer(model, tok, ids, new_tokens)
                row = {"context": context, "prompt_tokens": ids.shape[1], "depth": depth, "retriever": name,
                       "budget": budget, "window": window, "sinks": sinks, "dense_correct": key in dense_text,
                       "hetero_correct": key in text, "tokens_per_s_dense": round(dense_tps, 3),
                       "tokens_per_s_hetero": round(tps, 3), "dense_answer": dense_text.strip()[:40],
                       "hetero_answer": text.strip()[:40]}
                rows.append(row)
                print(json.dumps(row), file=out, flush=True)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = OneLineParser(prog="hetero bench needle", description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=list_of(positive_int), default="2048,4096,8192")
    p.add_argument("--depths", type=list_of(float_in(0.0, 1.0)), default="0,0.25,0.5,0.75,1")
    p.add_argument("--retrievers", default=",".join(RETRIEVERS))
    p.add_argument("--budget", type=float_in(0.0, 1.0, low_open=True), default=0.03)
    ns = p.parse_args(argv)
    contexts, depths = ns.contexts, ns.depths
    if max(contexts) > smollm2.POSITIONS:
        p.error(f"--contexts {max(contexts)}: SmolLM2 has {smollm2.POSITIONS} positions")
    for name in ns.retrievers.split(","):  # refused before the model loads
        try:
            HeteroConfig(window=256, sinks=4, budget=ns.budget, retriever=name)
        except ConfigError as e:
            p.error(f"--retrievers {name}: {e}")
    return run_reporting_missing_workload(
        "hetero bench needle", lambda: run(contexts, depths, ns.retrievers.split(","), ns.budget))


if __name__ == "__main__":
    sys.exit(main())
