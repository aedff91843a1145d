"""Retrievers judged on real attention (SmolLM2-135M over real text, ``hetero.tools.workloads.real``).

For each layer, the first ``context - positions`` tokens are the prompt (prefill into the tiers: window +
sinks on the fast side, the rest into the host tier and the retriever's index, timed as ``build_s``); then
the last ``positions`` tokens are decoded one by one through ``HeteroAttention`` with their real queries,
keys and values (each step evicts a token into the index, as in real decoding). Against a float64 oracle
over all tokens up to the position:

* ``rel_error``: ``||o_h - o_full_h|| / ||o_full_h||`` of the merged output, mean over layers, query heads
  and positions; ``lse_error``: mean ``|lse - lse_full|``;
* ``recall_at_k``: share of each query head's exact top-k host keys (k from the budget) that were selected;
* ``scanned_fraction``: keys whose similarity was computed per query / host-tier size;
* ``search_ms``: mean retriever time per layer and step; ``bytes_per_token``: index bytes per host token
  per KV head. One JSON object per line.
"""
from __future__ import annotations

import json
import math
import sys
import time
from typing import Dict, List, Optional

import torch

from hetero.errors import ConfigError
from hetero.attention import HeteroAttention
from hetero.tools.bench import run_reporting_missing_workload
from hetero.cache import LayerCache
from hetero.config import HeteroConfig
from hetero.tools.argtypes import OneLineParser, list_of, nonneg_int, positive_int
from hetero.tools.workloads import smollm2

BUDGETS = (0.01, 0.02, 0.05)


def default_rows(budgets=BUDGETS) -> List[Dict]:
    rows = []
    for b in budgets:
        rows.append({"retriever": "exact-per-head", "name": "exact", "group_rule": "per-head", "budget": b})
        rows.append({"retriever": "exact-per-head+adaptive", "name": "exact", "group_rule": "per-head",
                     "head_budget": "adaptive", "budget": b})
        rows.append({"retriever": "exact", "name": "exact", "group_rule": "union", "budget": b})
        for ann in ("ivf", "ivf-sq8", "ivf-group", "ivf-pq", "hnsw"):
            rows.append({"retriever": ann, "name": ann, "group_rule": "union", "budget": b})
        rows.append({"retriever": "ivf+adaptive", "name": "ivf", "group_rule": "union", "head_budget": "adaptive",
                     "budget": b})
        rows.append({"retriever": "ivf-group+adaptive", "name": "ivf-group", "group_rule": "union",
                     "head_budget": "adaptive", "budget": b})
        rows.append({"retriever": "ivf-group-no-estimate", "name": "ivf-group", "group_rule": "union", "budget": b,
                     "options": {"estimate": False}})
    for k_bits, tables in ((9, 50), (9, 100), (9, 150), (8, 100), (10, 150)):
        rows.append({"retriever": f"lsh-K{k_bits}-L{tables}", "name": "lsh", "budget": 0.02,
                     "options": {"K": k_bits, "L": tables}})
    for name in ("exact", "ivf"):
        rows.append({"retriever": name, "name": name, "group_rule": "union", "budget": 0.02, "dense_layers": [0]})
    return rows


class _Oracle:
    """Float64 full attention and exact per-head host scores at each decode position of one layer."""

    def __init__(self, q, k, v, positions: List[int], sinks: int, window: int, scale: float):
        self.out, self.lse, self.host_scores = {}, {}, {}
        g = q.shape[0] // k.shape[0]
        kd, vd = k.double(), v.double()
        for t in positions:
            qt = q[:, t].double()  # [Hq, D]
            s = torch.einsum("hgd,hnd->hgn", qt.view(k.shape[0], g, -1), kd[:, : t + 1]) * scale  # [Hkv, G, T]
            s = s.reshape(q.shape[0], t + 1)
            self.lse[t] = torch.logsumexp(s, dim=1)
            self.out[t] = torch.einsum("hn,hnd->hd", torch.softmax(s, dim=1).view(k.shape[0], g, -1).reshape(
                q.shape[0], -1), vd[:, : t + 1].repeat_interleave(g, dim=0))
            host_end = max(sinks, t + 1 - window)
            self.host_scores[t] = s[:, sinks:host_end]  # [Hq, n_host]


def _layer_run(cfg: HeteroConfig, layer_idx: int, q, k, v, oracle: _Oracle, positions: List[int]) -> Dict:
    layer = LayerCache(cfg, layer_idx)
    attn = HeteroAttention(cfg)
    t0 = time.perf_counter()
    layer.append(k[None, :, : positions[0]], v[None, :, : positions[0]])
    build_s = time.perf_counter() - t0
    acc = {"err": [], "lse": [], "recall": [], "scan": [], "search": []}
    g = q.shape[0] // k.shape[0]
    for t in positions:
        layer.append(k[None, :, t], v[None, :, t])
        res = attn.run(q[None, :, t].float(), layer, return_details=True)
        full = oracle.out[t]
        acc["err"].extend(((res.out[0].double() - full).norm(dim=1) / full.norm(dim=1)).tolist())
        merged_lse = torch.logaddexp(res.window.lse[0].double(), res.host.lse[0].double())
        acc["lse"].extend((merged_lse - oracle.lse[t]).abs().tolist())
        n_host = int(layer.host.length[0])
        if layer.dense or n_host == 0:
            continue
        acc["search"].append(res.timings_ms.get("retrieve", 0.0))
        acc["scan"].append(layer.retriever.last_scanned / (q.shape[0] * n_host))
        kk = cfg.budget_for(n_host)
        if kk and res.selection is not None:
            exact_top = oracle.host_scores[t].topk(min(kk, n_host), dim=1).indices  # [Hq, k]
            sel = res.selection.indices[0].long()  # [Hkv, m]
            lw = res.selection.log_weight
            for hq in range(q.shape[0]):
                chosen = sel[hq // g]
                if lw is not None:
                    chosen = chosen[torch.isfinite(lw[0, hq]) & (chosen >= 0)]
                hit = torch.isin(exact_top[hq], chosen).float().mean().item()
                acc["recall"].append(hit)
    index_bytes = layer.retriever.memory_bytes() if not layer.dense else 0
    return {"acc": acc, "build_s": build_s, "index_bytes": index_bytes,
            "host_tokens": int(layer.host.length[0]) * layer.kv_heads if not layer.dense else 0}


def _mean(x: List[float]) -> Optional[float]:
    return float(sum(x) / len(x)) if x else None


def run(context: int = 8192, positions: int = 64, window: int = 256, sinks: int = 4, layers=None, rows=None,
        threads: Optional[int] = None, out=sys.stdout, log=lambda s: print(s, file=sys.stderr, flush=True)) -> List[Dict]:
    from hetero.tools.workloads.real import capture

    cap = capture(context, log=log)
    layer_ids = cap.layers if layers is None else list(layers)
    missing = [i for i in layer_ids if i not in cap.k]
    if missing:
        raise ConfigError(f"layers {missing} are not in the captured workload (layers {min(cap.k)}-{max(cap.k)})")
    if positions > context:
        raise ConfigError(f"positions={positions} is more than the context's {context} tokens")
    pos = list(range(context - positions, context))
    scale = 1.0 / math.sqrt(cap.k[layer_ids[0]].shape[-1])
    log(f"oracle over {len(layer_ids)} layers x {positions} positions...")
    oracles = {i: _Oracle(cap.q[i], cap.k[i], cap.v[i], pos, sinks, window, scale) for i in layer_ids}
    results = []
    for spec in rows or default_rows():
        cfg = HeteroConfig(window=window, sinks=sinks, budget=spec["budget"], retriever=spec["name"],
                           retriever_options=spec.get("options", {}), group_rule=spec.get("group_rule", "union"),
                           head_budget=spec.get("head_budget", "flat"), kv_dtype="bf16", threads=threads,
                           budget_per="query_head",
                           dense_layers=tuple(spec.get("dense_layers", ())))
        acc = {"err": [], "lse": [], "recall": [], "scan": [], "search": []}
        build_s = index_bytes = host_tokens = 0.0
        t0 = time.perf_counter()
        for i in layer_ids:
            r = _layer_run(cfg, i, cap.q[i], cap.k[i], cap.v[i], oracles[i], pos)
            for key in acc:
                acc[key].extend(r["acc"][key])
            build_s += r["build_s"]
            index_bytes += r["index_bytes"]
            host_tokens += r["host_tokens"]
        row = {
            "retriever": spec["retriever"], "budget": spec["budget"], "group_rule": spec.get("group_rule", "union"),
            "head_budget": spec.get("head_budget", "flat"), "dense_layers": bool(spec.get("dense_layers")),
            "recall_at_k": _mean(acc["recall"]), "scanned_fraction": _mean(acc["scan"]),
            "rel_error": _mean(acc["err"]), "lse_error": _mean(acc["lse"]), "search_ms": _mean(acc["search"]),
            "build_s": round(build_s, 3), "bytes_per_token": round(index_bytes / host_tokens, 1) if host_tokens else 0,
            "context": context, "window": window, "sinks": sinks, "positions": positions, "layers": len(layer_ids),
            "options": spec.get("options", {}), "seconds": round(time.perf_counter() - t0, 1),
        }
        results.append(row)
        print(json.dumps(row), file=out, flush=True)
    return results


def main(argv: Optional[List[str]] = None) -> int:
    p = OneLineParser(prog="hetero bench retrieval", description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=positive_int, default=8192)
    p.add_argument("--positions", type=positive_int, default=64)
    p.add_argument("--window", type=nonneg_int, default=256)
    p.add_argument("--sinks", type=nonneg_int, default=4)
    p.add_argument("--layers", type=list_of(nonneg_int), default=None,
                   help="comma-separated layer indices (default: all)")
    p.add_argument("--retrievers", default=None, help="only rows whose retriever name starts with one of these")
    p.add_argument("--threads", type=positive_int, default=None)
    ns = p.parse_args(argv)
    rows = default_rows()
    if ns.retrievers:
        keep = tuple(ns.retrievers.split(","))
        rows = [r for r in rows if r["retriever"].startswith(keep)]
        if not rows:
            p.error(f"--retrievers {ns.retrievers}: no row's retriever starts with it (rows: "
                    f"{', '.join(sorted({r['retriever'] for r in default_rows()}))})")
    layers = ns.layers
    if layers and max(layers) >= smollm2.LAYERS:  # before the capture, which takes minutes
        p.error(f"--layers {max(layers)}: SmolLM2 has layers 0-{smollm2.LAYERS - 1}")
    if ns.context > smollm2.POSITIONS:
        p.error(f"--context {ns.context}: SmolLM2 has {smollm2.POSITIONS} positions")
    return run_reporting_missing_workload(
        "hetero bench retrieval", lambda: run(ns.context, ns.positions, ns.window, ns.sinks, layers, rows, ns.threads))


if __name__ == "__main__":
    sys.exit(main())
