"""Human-readable output of ``hetero profile`` (rich tables)."""
from __future__ import annotations

from typing import Dict

from rich.console import Console
from rich.table import Table


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_profile(r: Dict, console: Console = None) -> None:
    console = console or Console()
    head = (f"context {r['context']:,} tokens, batch {r['batch']}, {r['heads']} q / {r['kv_heads']} kv heads, "
            f"head_dim {r['head_dim']}, {r['kv_dtype']} KV, {r['threads']} threads")
    cfg = (f"window {r['window']} + {r['sinks']} sinks, budget {r['budget']}, retriever {r['retriever']}, "
           f"backends window={r['backends']['window']} host={r['backends']['host']}")
    console.print(f"[bold]hetero profile[/bold]  {head}\n  {cfg}")
    phases = Table(title="hetero decode step, one layer (median of steps)")
    phases.add_column("phase")
    phases.add_column("ms", justify="right")
    phases.add_column("share", justify="right")
    total = sum(r["phases"].values()) or 1.0
    for name, ms in r["phases"].items():
        phases.add_row(name, f"{ms:.3f}", f"{100 * ms / total:.1f} %")
    phases.add_row("[bold]step[/bold]", f"[bold]{r['hetero_ms']:.3f}[/bold]", "")
    console.print(phases)
    summary = Table(show_header=False)
    summary.add_column("", style="bold")
    summary.add_column("", justify="right")
    summary.add_row("dense SDPA (all tokens)", f"{r['dense_ms']:.3f} ms")
    summary.add_row("hetero step", f"{r['hetero_ms']:.3f} ms")
    summary.add_row("speedup", f"{r['speedup']:.2f}x")
    summary.add_row("rel_error (max over steps)", f"{r['rel_error']:.2e}")
    summary.add_row("host rows read", f"{100 * r['rows_read_fraction']:.2f} % of host tier")
    mem = r["memory"]
    summary.add_row("fast tier", _bytes(mem["fast_bytes"]))
    summary.add_row("host tier", _bytes(mem["host_bytes"]))
    summary.add_row("retriever index", _bytes(mem["index_bytes"]))
    console.print(summary)
