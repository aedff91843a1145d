"""Benchmarks reachable as ``hetero bench <name>`` and as scripts under ``benchmarks/``."""
