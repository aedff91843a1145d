"""Cheap per-phase timing: wall-clock spans with thread identity, also visible as torch.profiler ranges."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

# The phases a C++ step times into WORK.TIMES, in csrc/runner/step.h's order (kPhases): the step's window, its
# search, its host attention, the merge, and a decode_token's append. Its pool threads' trace spans carry the index
# of one of the first three.
NATIVE_PHASES = ("window", "retrieve", "host_attn", "merge", "evict")

# Which part of the runtime each recorded phase belongs to (the profiler's table, trace categories).
PHASE_SIDES = {"window": "fast tier", "merge": "fast tier", "dense_sdpa": "dense baseline", "evict": "cache",
               "index_add": "cache", "index_wait": "host", "retrieve": "host", "host_attn": "host",
               "transfer": "transfer"}


@dataclass(frozen=True)
class Span:
    """One timed phase: ``start``/``end`` in seconds (``time.perf_counter``), thread that ran it."""

    phase: str
    start: float
    end: float
    thread: str

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1e3


class PhaseRecorder:
    """Collects ``Span``s; ``totals_ms()`` sums them per phase."""

    def __init__(self) -> None:
        self.spans: List[Span] = []
        self._lock = threading.Lock()

    def span(self, phase: str) -> "_SpanTimer":
        """Time ``phase`` (a context manager); while a torch profiler is recording, also a ``hetero::<phase>``
        range. Ranges on the host worker's thread reach a trace when the profiler records every thread:
        ``torch.profiler.profile(experimental_config=torch.profiler._ExperimentalConfig(profile_all_threads=True))``.
        Without a profiler no range is opened: ~14 spans per decode step cost ~0.5 ms with cold caches."""
        return _SpanTimer(self, phase)

    def totals_ms(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for s in self.spans:
            out[s.phase] = out.get(s.phase, 0.0) + s.ms
        return out


class _SpanTimer:
    __slots__ = ("rec", "phase", "start", "range")

    def __init__(self, rec: PhaseRecorder, phase: str):
        self.rec, self.phase = rec, phase
        self.range: Optional[torch.profiler.record_function] = None

    def __enter__(self) -> None:
        if getattr(torch.autograd.profiler, "_is_profiler_enabled", True):  # unknown torch: always open the range
            self.range = torch.profiler.record_function(f"hetero::{self.phase}")
            self.range.__enter__()
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        end = time.perf_counter()
        with self.rec._lock:
            self.rec.spans.append(Span(self.phase, self.start, end, threading.current_thread().name))
        if self.range is not None:
            self.range.__exit__(*exc)
