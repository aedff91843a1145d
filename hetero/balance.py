"""Splitting a decode step between the fast-device side and the host side.

Thread split (documented rule): of the ``T`` CPU threads, the host side (retrieval and the host kernel) gets
all ``T``, and the window side (when the fast tier lives on the CPU) gets ``Tw = clamp(round(T * share), 1, T)``,
``share`` starting at 1/2. Together the two sides may hold more threads than there are cores: the host side is
usually the critical path, and this way it keeps every core busy once the window side is done instead of
leaving the window's core idle. Measured on 2 vCPUs (128K tokens, window 4096, ivf-group, 2 % budget), step
time with window + host threads 1 + 1: 14.9 ms, 1 + 2: 9.9 ms, 2 + 2: 10.6 ms. With CUDA the window side runs
on the GPU and the host side gets all ``T`` threads. With one thread both sides share it.

``balance="auto"``: after ``warmup`` steps of a layer, the measured costs re-split threads so the two sides
finish together (costs assumed inversely proportional to threads), then move the host budget within
``[budget_floor, 2 x budget]``: down by 20 % while the host side is the critical path by more than 20 %,
up by 20 % while the window side is (the spare host time buys accuracy). ``critical`` names the side the
step waited on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass
class Split:
    window_threads: int
    host_threads: int


class Balancer:
    def __init__(self, threads: int, cuda: bool, auto: bool, warmup: int = 3,
                 scale_range: Tuple[float, float] = (0.5, 2.0)):
        self.threads, self.cuda, self.auto, self.warmup = threads, cuda, auto, warmup
        self.share = 0.5
        self.budget_scale = 1.0
        self.scale_range = scale_range  # [budget_floor / budget, 2]: the scale never leaves what the budget may reach
        self.steps = 0
        self.critical: Optional[str] = None

    def split(self) -> Split:
        t = self.threads
        if self.cuda:
            return Split(1, t)
        return Split(min(t, max(1, round(t * self.share))), t)

    def record(self, window_ms: float, host_ms: float, can_lower: bool, can_raise: bool) -> None:
        """One step's wall time of each side (host: from query copy to result)."""
        self.steps += 1
        self.critical = "host" if host_ms > window_ms else "window"
        if not self.auto or self.steps < self.warmup or self.cuda:
            return
        s = self.split()
        work_w, work_h = window_ms * s.window_threads, host_ms * s.host_threads  # thread-milliseconds
        if work_w + work_h > 0:
            self.share = work_w / (work_w + work_h)
        lo, hi = self.scale_range
        if host_ms > 1.2 * window_ms and can_lower:
            self.budget_scale = max(lo, self.budget_scale * 0.8)
        elif window_ms > 1.2 * host_ms and can_raise:
            self.budget_scale = min(hi, self.budget_scale * 1.2)
