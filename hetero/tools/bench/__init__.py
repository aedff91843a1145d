"""Benchmarks reachable as ``hetero bench <name>`` and as scripts under ``benchmarks/``."""
from __future__ import annotations

import sys
from typing import Callable


def run_reporting_missing_workload(prog: str, fn: Callable[[], object]) -> int:
    """Run a benchmark that needs the SmolLM2 workload: 0 when it ran; a one-line error naming the install or
    build command and exit status 2 when the workload is missing."""
    from hetero.tools.workloads.smollm2 import WorkloadUnavailable

    try:
        fn()
    except WorkloadUnavailable as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0
