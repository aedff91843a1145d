"""``hetero bench sweep``: step time vs context and error vs budget, dense measured side by side.

For each context (synthetic workload, preset geometry) and retriever: ``hetero profile``'s measurement
(median of ``steps`` decode steps, dense SDPA over all tokens in the same run). Then, at one context, error
and time per budget. Writes ``<out>.json`` (all rows), ``<out>.csv`` and ``<out>.png`` (step time vs context,
log-log; error vs budget), and prints one JSON object per row.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import sys
from typing import List, Optional

import torch

from hetero.config import KV_DTYPES, HeteroConfig
from hetero.errors import HeteroError
from hetero.tools.profile import PRESETS, ProfileArgs, run_profile
from hetero.tools.workloads.synthetic import make_synthetic
from hetero.tools.argtypes import OneLineParser, budget, list_of, nonneg_int, positive_int

_FIELDS = ("kind", "context", "retriever", "budget", "dense_ms", "hetero_ms", "speedup", "rel_error", "window_ms",
           "host_ms", "critical_path", "rows_read_fraction", "prefill_s")


def _row(kind: str, result: dict) -> dict:
    return {k: (kind if k == "kind" else result.get(k)) for k in _FIELDS}


def run(contexts: List[int], retrievers: List[str], budgets: List[float], budget_context: int, preset: str,
        window: int, steps: int, out_prefix: str, log=lambda s: print(s, file=sys.stderr, flush=True)) -> List[dict]:
    heads, kv_heads, head_dim = PRESETS[preset]
    rows = []

    def measure(kind, context, retriever, budget, workload):
        config = HeteroConfig(window=window, sinks=4, budget=budget, retriever=retriever)
        args = ProfileArgs(context=context, heads=heads, kv_heads=kv_heads, head_dim=head_dim, steps=steps)
        result = run_profile(config, args, workload=workload, log=lambda s: None)
        row = _row(kind, result)
        rows.append(row)
        print(json.dumps(row), flush=True)
        log(f"{kind} context {context:,} {retriever} budget {budget}: hetero {row['hetero_ms']:.2f} ms, "
            f"dense {row['dense_ms']:.2f} ms, rel_error {row['rel_error']:.3g}")

    for context in contexts:
        log(f"workload: context {context:,} ({preset})")
        workload = make_synthetic(context, 1, heads, kv_heads, head_dim, steps, KV_DTYPES["bfloat16"])
        for retriever in retrievers:
            measure("context", context, retriever, budgets[len(budgets) // 2], workload)
        del workload
    workload = make_synthetic(budget_context, 1, heads, kv_heads, head_dim, steps, KV_DTYPES["bfloat16"])
    for retriever in retrievers:
        for budget in budgets:
            measure("budget", budget_context, retriever, budget, workload)
    with open(out_prefix + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    with open(out_prefix + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    from hetero.tools.plots import plot_sweep

    plot_sweep(rows, out_prefix + ".png")
    log(f"wrote {out_prefix}.json, {out_prefix}.csv, {out_prefix}.png")
    return rows


def preflight(out_prefix: str, retrievers: List[str], budgets: List[float], window: int) -> None:
    """What would otherwise fail only after some or all of the measuring, refused first: a ``HeteroError`` (one
    line, exit 2 through the CLI) for a retriever or budget the config refuses, when matplotlib, which draws
    ``<out>.png``, is missing, or when an output file cannot be written."""
    for retriever in retrievers:
        for b in budgets:
            try:
                HeteroConfig(window=window, sinks=4, budget=b, retriever=retriever)
            except HeteroError as e:
                raise HeteroError(f"--retrievers {retriever} --budgets {b}: {e}") from None
    if importlib.util.find_spec("matplotlib") is None:
        raise HeteroError(f"sweep needs matplotlib to draw {out_prefix}.png: pip install 'hetero[plot]'")
    from hetero.tools.preflight import check_output_path

    for ext in (".json", ".csv", ".png"):
        check_output_path("--out", out_prefix + ext)


def main(argv: Optional[List[str]] = None) -> int:
    p = OneLineParser(prog="hetero bench sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=list_of(positive_int), default="8192,32768,131072",
                   help="comma-separated, each at most 1048576")
    p.add_argument("--retrievers", default="ivf-group", help="comma-separated retriever names")
    p.add_argument("--budgets", type=list_of(budget), default="0.01,0.02,0.05",
                   help="comma-separated: fractions of the host tier (e.g. 0.02) or key counts (e.g. 500); the rows "
                        "over --budget-context take each, the rows over --contexts the middle one (of an even count, "
                        "the upper middle)")
    p.add_argument("--budget-context", type=positive_int, default=32768)
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b")
    p.add_argument("--window", type=nonneg_int, default=1024)
    p.add_argument("--steps", type=positive_int, default=3)
    p.add_argument("--out", default="sweep", help="output prefix: <out>.json, <out>.csv, <out>.png")
    ns = p.parse_args(argv)
    if max(ns.contexts) > 1 << 20:
        p.error(f"--contexts {max(ns.contexts)}: at most 1048576")
    preflight(ns.out, ns.retrievers.split(","), ns.budgets, ns.window)
    torch.manual_seed(0)
    run(ns.contexts, ns.retrievers.split(","), ns.budgets,
        ns.budget_context, ns.preset, ns.window, ns.steps, ns.out)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except HeteroError as e:
        print(f"hetero bench sweep: error: {e}", file=sys.stderr)
        sys.exit(2)
