"""Workloads for profiling and benchmarks: ``synthetic`` (structured random attention, any size)."""
