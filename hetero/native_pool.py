"""Thread count and tracing of an object that owns a C++ ``Runner`` (the extension's thread pool): the C++ window
and host backends and the ivf-group retriever. Depends only on ``hetero.timing``, so the retrievers can import it
without importing ``hetero.cpu``."""
from __future__ import annotations

from typing import List

from .timing import NATIVE_PHASES, Span


class RunnerBacked:
    """Mixin over ``self._runner`` (a Runner, or None where the object also works without the extension: then
    these do nothing). ``pool`` and ``phase`` name the pool threads' spans in a trace: threads
    ``"<pool> pool <i>"``, worker 0 being the calling thread, whose phase span the caller records itself."""

    pool: str = "cpp"
    phase: str = "?"
    _runner = None
    _trace_on = False

    def set_threads(self, threads: int) -> None:
        if self._runner is not None and self._runner.threads != int(threads):
            self._runner.set_threads(int(threads))

    def set_native_trace(self, on: bool) -> None:
        if self._runner is not None and on != self._trace_on:  # called every step: a C++ call only on a change
            self._runner.set_trace(on)
            self._trace_on = on

    def wake_workers(self, poll_us: int) -> None:
        """Have the pool's workers poll for a run for ``poll_us`` from now, waking those that sleep: a step about to
        start finds them awake (a sleeping one joins it tens of microseconds late on a VM)."""
        if self._runner is not None:
            self._runner.wake(poll_us)

    def take_native_spans(self) -> List[Span]:
        """The pool threads' spans since the last call; a decode step's per phase (its items interleave)."""
        if self._runner is None:
            return []
        return [Span(NATIVE_PHASES[phase] if phase >= 0 else self.phase, start, end, f"{self.pool} pool {worker}")
                for worker, start, end, phase in self._runner.take_trace() if worker > 0]


class SearchPool(RunnerBacked):
    """The C++ pool that retrievers' searches made in Python run on (a small chunk's positions, the side-by-side
    step, a per-head budget's missed-mass report): one per ``HeteroAttention``, shared by the retrievers of its
    layers and given the step's thread count by its plan. The fused C++ step searches on the host backend's pool
    instead. ``runner``: the extension's Runner, or None without the extension."""

    pool, phase = "cpp search", "retrieve"

    def __init__(self, runner) -> None:
        self._runner = runner

    @property
    def runner(self):
        return self._runner
