"""Host kernels (installed as ``hetero.cpu``): sparse attention over selected host-tier rows."""
