"""Tooling around the runtime: the ``hetero`` CLI, the profiler, benchmarks, workloads, plots and traces. Nothing in
the runtime imports it (the import contract, ``.importlinter``)."""
