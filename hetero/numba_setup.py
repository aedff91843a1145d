"""numba set up for hetero's kernels before numba's first import: 512-bit vectors, and TBB's threading layer.

**Vectors.** LLVM tunes the Intel AVX-512 CPUs it knows for 256-bit vectors ("prefer-256-bit"), so numba's
vectorized loops use ymm registers where zmm would halve the instructions: on an Intel Xeon (Emerald Rapids, which
LLVM reports as rocketlake) zmm cut the numba sparse kernel's arithmetic per bf16 row by a fifth
(docs/performance.md).

Numba reads its target features once per process, when it is first imported. So before the numba backend imports
numba, ``prefer_wide_vectors()`` sets ``NUMBA_CPU_FEATURES`` to the host's features without the 256-bit
preference. It leaves everything alone when ``NUMBA_CPU_FEATURES`` or ``NUMBA_CPU_NAME`` is set, when
``HETERO_NUMBA_WIDE_VECTORS=0``, when the CPU has no AVX-512F, or when numba is already imported; ``STATE`` says
which (``hetero env`` prints it). The preference then holds for every numba function the process compiles, not
only hetero's.

**Threading layer.** numba tries TBB first (its ``THREADING_LAYER_PRIORITY`` is tbb, omp, workqueue), but finds
libtbb only on the dynamic loader's path, and pip installs the ``tbb`` wheel's library into ``<prefix>/lib``, which
is not on it (numba issues 7148, 9740): in a virtual environment numba falls back to omp. Under omp, the workers of
a ``prange`` sleep as soon as a parallel region ends (the ``OMP_WAIT_POLICY=PASSIVE`` hetero sets for torch's sake
reaches numba's OpenMP too), and each takes a fixed share of the next call: with calls spaced apart, as a model's
layers space them, a call's median was about twice its best (docs/performance.md). TBB's workers poll for a moment
before they sleep, as hetero's C++ pool does, and the caller takes over a share no worker has started.
``load_tbb()`` loads the wheel's library by path, so that numba's own lookup finds it; the choice stays numba's
(``NUMBA_THREADING_LAYER`` still picks a layer; ``tbb`` there works in a virtual environment too). It does nothing
when numba's threading layer is already running, when a libtbb is loaded already (numba takes that one), off Linux,
or when the ``tbb`` wheel is not installed; ``TBB_STATE`` says which (``hetero env`` prints it and the layer numba
chose).
"""
from __future__ import annotations

import ctypes
import importlib.metadata
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


TBB_STATE = _UNDECIDED
_TBB_LIBRARY = "libtbb.so.12"  # the name numba's TBB layer is linked against


def load_tbb() -> str:
    """Load the ``tbb`` wheel's libtbb so that numba's threading layer can be TBB; returns the state. Decides once
    per process, like ``prefer_wide_vectors``."""
    global TBB_STATE
    if TBB_STATE != _UNDECIDED:
        return TBB_STATE
    parallel = sys.modules.get("numba.np.ufunc.parallel")
    if parallel is not None and getattr(parallel, "_is_initialized", False):
        TBB_STATE = "numba's choice (its threading layer was running before hetero's numba backend loaded)"
    elif not sys.platform.startswith("linux"):
        TBB_STATE = "numba's choice (the tbb wheel is loaded by hetero on Linux only)"
    elif (loaded := _loaded_tbb_version()) is not None:  # numba finds that one by its name: a second copy is moot
        TBB_STATE = f"numba's choice (a libtbb of interface version {loaded} was already loaded)"
    else:
        path = _tbb_wheel_library()
        if path is None:
            TBB_STATE = "numba's choice (the tbb wheel is not installed: pip install tbb)"
        else:
            try:
                # local: numba's TBB layer finds it by its soname; its symbols need not be everyone's
                ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
                TBB_STATE = f"tbb wheel's library loaded ({path})"
            except OSError as e:
                TBB_STATE = f"numba's choice (the tbb wheel's {path} did not load: {e})"
    return TBB_STATE


def _loaded_tbb_version():
    """The interface version of a libtbb.so.12 this process has loaded already, or None."""
    try:
        lib = ctypes.CDLL(_TBB_LIBRARY, mode=os.RTLD_NOLOAD)
    except OSError:
        return None
    try:
        version = lib.TBB_runtime_interface_version
    except AttributeError:  # a libtbb.so.12 without it: older than any numba takes
        return 0
    version.restype = ctypes.c_int
    return int(version())


def _tbb_wheel_library():
    """The path of the installed ``tbb`` distribution's libtbb.so.12, or None."""
    try:
        files = importlib.metadata.distribution("tbb").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == _TBB_LIBRARY:
            path = os.path.realpath(str(f.locate()))
            if os.path.exists(path):
                return path
    return None
