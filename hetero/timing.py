"""Cheap per-phase timing: wall-clock spans with thread identity, also visible as torch.profiler ranges."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List

import torch

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

    @contextmanager
    def span(self, phase: str) -> Iterator[None]:
        """Time ``phase``; also a ``hetero::<phase>`` torch.profiler range (~6 us). Ranges on the host worker's
        thread reach a trace when the profiler records every thread:
        ``torch.profiler.profile(experimental_config=torch.profiler._ExperimentalConfig(profile_all_threads=True))``."""
        with torch.profiler.record_function(f"hetero::{phase}"):
            start = time.perf_counter()
            try:
                yield
            finally:
                end = time.perf_counter()
                with self._lock:
                    self.spans.append(Span(phase, start, end, threading.current_thread().name))

    def totals_ms(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for s in self.spans:
            out[s.phase] = out.get(s.phase, 0.0) + s.ms
        return out
