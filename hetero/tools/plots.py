"""Pictures of a profile run and of sweeps (matplotlib, no display needed)."""
from __future__ import annotations

from typing import Dict, List

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

_COLORS = {"window": "#4c72b0", "index_wait": "#ccb974", "index_add": "#64b5cd",
           "retrieve": "#dd8452", "host_attn": "#c44e52", "merge": "#8172b3",
           "transfer": "#937860", "evict": "#55a868"}


def plot_profile(result: Dict, path: str) -> None:
    """Per decode step: stacked phase times (bars), the two sides' wall times and dense SDPA (lines), and the
    relative error against dense attention (right axis, log scale)."""
    steps = result["per_step"]
    x = list(range(1, len(steps) + 1))
    fig, (ax, ax_err) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [2, 1]},
                                     layout="constrained")
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
    ax.legend(fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.13))  # below: bars and lines stay clear
    for a in (ax, ax_err):
        a.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))  # steps are whole numbers
    ax_err.semilogy(x, [max(s["rel_error"], 1e-12) for s in steps], "r-o")
    ax_err.set_xlabel("decode step")
    ax_err.set_ylabel("relative error vs dense")
    ax_err.set_title("accuracy")
    ax_err.grid(True, which="both", alpha=0.3)
    _plain_log_axis(ax_err.yaxis)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _tokens(n: float) -> str:
    """4096 -> '4K', 1048576 -> '1M', 10000 -> '10,000'."""
    n = int(round(n))
    for size, unit in ((1 << 20, "M"), (1 << 10, "K")):
        if n >= size and n % (size // 4) == 0:
            return f"{n / size:g}{unit}"
    return f"{n:,}"


def _budget(b: float) -> str:
    """A fraction of the host tier as a percentage (0.02 -> '2%'); a count of keys as an integer."""
    return f"{100 * b:g}%" if b < 1 else f"{b:,.0f}"


def _data_ticks(axis, values, label) -> None:
    """Ticks of a log axis exactly at the swept values, labelled short ('32K', '2%'); no minor-tick labels (the
    default scientific minor labels, 2x10^-2 next to 3x10^-2, are what collided)."""
    values = sorted(set(values))
    axis.set_major_locator(ticker.FixedLocator(values))
    axis.set_major_formatter(ticker.FixedFormatter([label(v) for v in values]))
    axis.set_minor_formatter(ticker.NullFormatter())
    if len(values) > 6:  # e.g. 4K..1M in powers of two: tilt them rather than let neighbours touch
        for t in axis.get_ticklabels():
            t.set_rotation(35)
            t.set_horizontalalignment("right")


def _plain_log_axis(axis) -> None:
    """A measured log axis labelled in plain numbers ('0.5', '20', '1e-05'), as many labels per decade as the
    span leaves room for: 1..9 within a decade, 1-2-5 up to three decades, powers of ten beyond."""
    lo, hi = sorted(axis.get_view_interval())
    decades = math.log10(hi / lo) if lo > 0 and hi > lo else 1.0
    subs = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0) if decades <= 1 else (1.0, 2.0, 5.0) if decades <= 3 else (1.0,)
    axis.set_major_locator(ticker.LogLocator(base=10, subs=subs))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
    axis.set_minor_locator(ticker.LogLocator(base=10, subs="auto"))
    axis.set_minor_formatter(ticker.NullFormatter())


def plot_sweep(rows: List[Dict], path: str) -> None:
    """Left: step time vs context (dense and hetero per retriever, log-log). Right: error vs budget."""
    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
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
    if ctx_rows:
        ax_t.legend(fontsize=8)
        _data_ticks(ax_t.xaxis, [r["context"] for r in ctx_rows], _tokens)
        _plain_log_axis(ax_t.yaxis)
        ax_t.set_title("step time vs context")
    bud_rows = [r for r in rows if r["kind"] == "budget"]
    for retriever in sorted({r["retriever"] for r in bud_rows}):
        rs = sorted((r for r in bud_rows if r["retriever"] == retriever), key=lambda r: r["budget"])
        ax_e.loglog([r["budget"] for r in rs], [max(r["rel_error"], 1e-12) for r in rs], "-o", label=retriever)
    fractions = all(r["budget"] < 1 for r in bud_rows)
    ax_e.set_xlabel("budget (% of the host tier)" if fractions else "budget (keys per query head)")
    ax_e.set_ylabel("relative error vs dense")
    ax_e.grid(True, which="both", alpha=0.3)
    if bud_rows:
        ax_e.legend(fontsize=8)
        ax_e.set_title(f"error vs budget, context {_tokens(bud_rows[0]['context'])}")
        _data_ticks(ax_e.xaxis, [r["budget"] for r in bud_rows], _budget)
        _plain_log_axis(ax_e.yaxis)
    fig.savefig(path, dpi=110)
    plt.close(fig)
