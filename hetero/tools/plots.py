"""Pictures of a profile run and of sweeps (matplotlib, no display needed)."""
from __future__ import annotations

from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_COLORS = {"window": "#4c72b0", "index_wait": "#ccb974", "index_add": "#64b5cd",
           "retrieve": "#dd8452", "host_attn": "#c44e52", "merge": "#8172b3",
           "transfer": "#937860", "evict": "#55a868"}


def plot_profile(result: Dict, path: str) -> None:
    """Per decode step: stacked phase times (bars), the two sides' wall times and dense SDPA (lines), and the
    relative error against dense attention (right axis, log scale)."""
    steps = result["per_step"]
    x = list(range(1, len(steps) + 1))
    fig, (ax, ax_err) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    bottom = [0.0] * len(steps)
    for phase, color in _COLORS.items():
        vals = [s["phases"].get(phase, 0.0) for s in steps]
        ax.bar(x, vals, bottom=bottom, color=color, label=phase, width=0.6)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.plot(x, [s["hetero_ms"] for s in steps], "k-o", label="hetero step (wall)")
    ax.plot(x, [s["dense_ms"] for s in steps], "k--s", label="dense SDPA")
    ax.set_xlabel("decode step")
    ax.set_ylabel("ms (phases of the two sides overlap)")
    ax.set_title(f"context {result['context']:,}, {result['retriever']}, budget {result['budget']}: "
                 f"{result['speedup']:.2f}x vs dense")
    ax.legend(fontsize=8, ncol=2)
    ax_err.semilogy(x, [max(s["rel_error"], 1e-12) for s in steps], "r-o")
    ax_err.set_xlabel("decode step")
    ax_err.set_ylabel("relative error vs dense")
    ax_err.set_title("accuracy")
    ax_err.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(rows: List[Dict], path: str) -> None:
    """Left: step time vs context (dense and hetero per retriever, log-log). Right: error vs budget."""
    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(12, 4.5))
    ctx_rows = [r for r in rows if r["kind"] == "context"]
    for retriever in sorted({r["retriever"] for r in ctx_rows}):
        rs = sorted((r for r in ctx_rows if r["retriever"] == retriever), key=lambda r: r["context"])
        ax_t.loglog([r["context"] for r in rs], [r["hetero_ms"] for r in rs], "-o", label=f"hetero ({retriever})")
    dense = sorted({r["context"]: r["dense_ms"] for r in ctx_rows}.items())
    if dense:
        ax_t.loglog([c for c, _ in dense], [d for _, d in dense], "k--s", label="dense SDPA")
    ax_t.set_xlabel("context (tokens)")
    ax_t.set_ylabel("decode step, one layer (ms)")
    ax_t.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    bud_rows = [r for r in rows if r["kind"] == "budget"]
    for retriever in sorted({r["retriever"] for r in bud_rows}):
        rs = sorted((r for r in bud_rows if r["retriever"] == retriever), key=lambda r: r["budget"])
        ax_e.loglog([r["budget"] for r in rs], [max(r["rel_error"], 1e-12) for r in rs], "-o", label=retriever)
    ax_e.set_xlabel("budget (fraction of the host tier)")
    ax_e.set_ylabel("relative error vs dense")
    ax_e.grid(True, which="both", alpha=0.3)
    if bud_rows:
        ax_e.legend(fontsize=8)
        ax_e.set_title(f"context {bud_rows[0]['context']:,}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
