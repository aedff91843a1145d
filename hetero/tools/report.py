"""Human-readable output of ``hetero profile`` (rich tables)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict

from rich.console import Console
from rich.table import Table

from hetero.timing import PHASE_SIDES

_ERR = Console(stderr=True)


@contextmanager
def progress(description: str):
    """A spinner on stderr with elapsed time, for long prefills and index builds."""
    with _ERR.status(f"[bold]{description}[/bold]", spinner="dots"):
        yield


def verdict(r: Dict) -> str:
    """One line naming the side the decode step waited on (overlapped), or the larger side (on the same threads)."""
    side = "host side (retrieval + host attention)" if r["critical_path"] == "host" else "fast-tier window side"
    share = r.get("critical_share")
    if r.get("overlap", True):
        return (f"{side} is the critical path: {100 * share:.0f} % of the step" if share else
                f"{side} is the critical path")
    return f"{side} is the larger of the two sides" + (f": {100 * share:.0f} % of the step" if share else "")


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _summary(rows) -> Table:
    """A two-column table of ``(label, value)`` pairs."""
    table = Table(show_header=False)
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    for label, value in rows:
        table.add_row(label, value)
    return table


def print_profile(r: Dict, console: Console = None) -> None:
    console = console or Console()
    head = (f"{r.get('workload', 'synthetic')} workload, context {r['context']:,} tokens, batch {r['batch']}, "
            f"{r['heads']} q / {r['kv_heads']} kv heads, head_dim {r['head_dim']}, {r['kv_dtype']} KV, "
            f"{r['threads']} threads")
    cfg = (f"window {r['window']} + {r['sinks']} sinks, budget {r['budget']}, retriever {r['retriever']}, "
           f"backends window={r['backends']['window']} host={r['backends']['host']}, sides "
           f"{'side by side' if r.get('overlap', True) else 'on the same threads'}")
    console.print(f"[bold]hetero profile[/bold]  {head}\n  {cfg}")
    if r.get("warmup"):
        plural = "s" if r["warmup"] != 1 else ""
        console.print(f"  median of {r['steps']} decode steps, after {r['warmup']} warm-up step{plural} "
                      f"({', '.join(f'{x:.1f}' for x in r['warmup_ms'])} ms, not counted)")
    phases = Table(title="hetero decode step, one layer (median of steps)")
    phases.add_column("phase")
    phases.add_column("side")
    phases.add_column("ms", justify="right")
    phases.add_column("share of step", justify="right")
    sides = dict(PHASE_SIDES, transfer="both")  # the query goes to the host and the result back
    step = r["hetero_ms"] or 1.0
    for name, ms in r["phases"].items():
        phases.add_row(name, sides.get(name, ""), f"{ms:.3f}", f"{100 * ms / step:.1f} %")
    phases.add_row("[bold]step (wall)[/bold]", "", f"[bold]{r['hetero_ms']:.3f}[/bold]", "100 %")
    if "window_ms" in r:
        phases.add_row("  window side (wall)", "fast tier", f"{r['window_ms']:.3f}", f"{100 * r['window_ms'] / step:.1f} %")
        phases.add_row("  host side (wall)", "host", f"{r['host_ms']:.3f}", f"{100 * r['host_ms'] / step:.1f} %")
    console.print(phases)
    mem = r["memory"]
    console.print(_summary([
        ("dense SDPA (all tokens)", f"{r['dense_ms']:.3f} ms"),
        ("hetero step", f"{r['hetero_ms']:.3f} ms"),
        ("speedup", f"{r['speedup']:.2f}x"),
        ("rel_error (max over steps)", f"{r['rel_error']:.2e}"),
        ("host rows read", f"{100 * r['rows_read_fraction']:.2f} % of host tier"),
        ("fast tier", _bytes(mem["fast_bytes"])),
        ("host tier", _bytes(mem["host_bytes"])),
        ("retriever index", _bytes(mem["index_bytes"])),
    ]))
    if "critical_path" in r:
        tail = ("phases of the two sides overlap, so their sum exceeds the step" if r.get("overlap", True) else
                "the sides shared the same threads, each phase's time its share of their busy time (--overlap on "
                "runs them side by side on threads of their own)")
        console.print(f"[bold]verdict:[/bold] {verdict(r)}; {tail}")


def print_model_profile(r: Dict, console: Console = None) -> None:
    """End-to-end profile of a HuggingFace model: per-layer breakdown, tokens/s, agreement with dense."""
    console = console or Console()
    console.print(f"[bold]hetero profile --model {r['model']}[/bold]  prompt {r['context']:,} tokens, "
                  f"{r['steps']} decode steps, {r['layers']} layers; window {r['window']} + {r['sinks']} sinks, "
                  f"budget {r['budget']}, retriever {r['retriever']}")
    side = "critical" if r.get("overlap", True) else "larger side"
    t = Table(title="per layer, ms per decode step (mean)")
    for col in ("layer", "window", "retrieve", "host_attn", "merge", "step", side):
        t.add_column(col, justify="right")
    for row in r["per_layer"]:
        t.add_row(str(row["layer"]), *(f"{row[p]:.3f}" for p in ("window", "retrieve", "host_attn", "merge", "step")),
                  row["critical"])
    console.print(t)
    console.print(_summary([
        ("prefill (dense / hetero)", f"{r['prefill_s_dense']:.2f} s / {r['prefill_s_hetero']:.2f} s"),
        ("decode tokens/s (dense / hetero)", f"{r['tokens_per_s_dense']:.2f} / {r['tokens_per_s_hetero']:.2f}"),
        ("greedy tokens identical to dense", f"{r['tokens_agree']} / {r['steps']}"),
        ("first decode step's logits max |diff|", "no decode step" if r['first_logits_max_diff'] is None
         else f"{r['first_logits_max_diff']:.3e}"),
        ("fast tier / host tier / index",
         " / ".join(_bytes(r["memory"][k]) for k in ("fast_bytes", "host_bytes", "index_bytes"))),
    ]))
    console.print(f"[bold]verdict:[/bold] {r['verdict']}")
