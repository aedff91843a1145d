"""Fast-device kernels (installed as ``hetero.gpu``): window attention over sinks + recent window."""
