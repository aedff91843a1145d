"""512-bit vectors for hetero's numba kernels on AVX-512 CPUs.

LLVM tunes the Intel AVX-512 CPUs it knows for 256-bit vectors ("prefer-256-bit"), so numba's vectorized loops
use ymm registers where zmm would halve the instructions: on an Intel Xeon (Emerald Rapids, which LLVM reports as
rocketlake) zmm cut the numba sparse kernel's arithmetic per bf16 row by a fifth (docs/performance.md).

Numba reads its target features once per process, when it is first imported. So before the numba backend imports
numba, ``prefer_wide_vectors()`` sets ``NUMBA_CPU_FEATURES`` to the host's features without the 256-bit
preference. It leaves everything alone when ``NUMBA_CPU_FEATURES`` or ``NUMBA_CPU_NAME`` is set, when
``HETERO_NUMBA_WIDE_VECTORS=0``, when the CPU has no AVX-512F, or when numba is already imported; ``STATE`` says
which (``hetero env`` prints it). The preference then holds for every numba function the process compiles, not
only hetero's.
"""
from __future__ import annotations

import os
import sys

_UNDECIDED = "not configured (the numba backend was not loaded)"
STATE = _UNDECIDED


def prefer_wide_vectors() -> str:
    """Set numba's target features for 512-bit vectors if nothing says otherwise; returns the state. Decides once
    per process: later calls (another numba module of hetero, ``hetero env``) return the first decision, which
    they could not make again (by then numba is imported and the features are set)."""
    global STATE
    if STATE != _UNDECIDED:
        return STATE
    if os.environ.get("HETERO_NUMBA_WIDE_VECTORS", "1") == "0":
        STATE = "default vector width (HETERO_NUMBA_WIDE_VECTORS=0)"
    elif os.environ.get("NUMBA_CPU_FEATURES") or os.environ.get("NUMBA_CPU_NAME"):
        STATE = "default vector width (NUMBA_CPU_FEATURES / NUMBA_CPU_NAME set by the environment)"
    elif "numba" in sys.modules:
        STATE = "default vector width (numba was imported before hetero's numba backend)"
    else:
        import llvmlite.binding as llvm

        llvm.initialize_native_target()
        features = llvm.get_host_cpu_features()
        if not features.get("avx512f", False):
            STATE = "default vector width (no AVX-512F)"
        else:
            os.environ["NUMBA_CPU_FEATURES"] = features.flatten() + ",-prefer-256-bit"
            STATE = "512-bit vectors (NUMBA_CPU_FEATURES without prefer-256-bit)"
    return STATE
