"""Chrome / Perfetto trace-event JSON from recorded spans (open in chrome://tracing or ui.perfetto.dev).

One track per thread (named by ``thread_name`` metadata events), complete events (``"ph": "X"``) in
microseconds from the first span, so the window side and the host worker appear as parallel tracks.
"""
from __future__ import annotations

import json
from typing import Dict, Iterable, List

from hetero.timing import PHASE_SIDES, Span


def trace_events(spans: Iterable[Span], pid: int = 1) -> List[Dict]:
    spans = list(spans)
    if not spans:
        return []
    t0 = min(s.start for s in spans)
    tids: Dict[str, int] = {}
    events: List[Dict] = []
    for s in spans:
        tid = tids.setdefault(s.thread, len(tids) + 1)
        events.append({"name": s.phase, "cat": PHASE_SIDES.get(s.phase, "other"), "ph": "X", "pid": pid, "tid": tid,
                       "ts": round((s.start - t0) * 1e6, 3), "dur": round((s.end - s.start) * 1e6, 3)})
    for name, tid in tids.items():
        events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}})
    events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": "hetero"}})
    return events


def write_trace(path: str, spans: Iterable[Span]) -> int:
    """Write the trace file; returns the number of complete events."""
    events = trace_events(spans)
    with open(path, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
    return sum(1 for e in events if e["ph"] == "X")
