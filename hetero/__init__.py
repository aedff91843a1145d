"""hetero: heterogeneous CPU-GPU attention for long-context LLM decoding.

Sinks + recent window of the KV cache stay on the fast device; older tokens live in host memory, where a
retriever picks the keys that matter and a CPU kernel attends over them; both partial results are fused
exactly by log-sum-exp.

Public API: ``HeteroConfig``, ``TieredKVCache`` / ``LayerCache``, ``HeteroAttention``,
``PartialAttention``, ``Selection``, ``merge``, ``window_attention``, ``sparse_attention``,
``causal_attention``.

OpenMP: unless the environment says otherwise, hetero sets ``OMP_WAIT_POLICY=PASSIVE`` when it is imported
before torch. torch's OpenMP workers otherwise spin for a while after every parallel region, and on a small
CPU they take the cores hetero's own kernel threads need (measured on 2 vCPUs: the C++ window kernel on 2
threads took 3.3 ms with spinning workers, 1.8 ms without). Import hetero first, or set it yourself: imported
after an OpenMP torch with the variable unset, hetero warns (``PerformanceWarning``), since it is too late then.
"""
import os as _os
import sys as _sys

_TORCH_FIRST = "torch" in _sys.modules
if not _TORCH_FIRST:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .attention import DecodeResult, HeteroAttention
from .cache import LayerCache, TieredKVCache
from .config import HeteroConfig
from .errors import (BackendUnavailableError, ClosedError, ConfigError, DTypeError, HeteroError, IndexSyncError,
                     InvalidValueError, PerformanceWarning, ShapeError, StalePlanError, UnsupportedError)
from .merge import merge
from .ops import sparse_attention, window_attention
from .reference import causal_attention
from .types import HostView, PartialAttention, Selection

__version__ = "0.1.0"


def _warn_spinning_openmp() -> None:
    import torch

    if _TORCH_FIRST and "OMP_WAIT_POLICY" not in _os.environ and "OpenMP" in torch.__config__.parallel_info():
        import warnings

        warnings.warn("torch was imported before hetero with OMP_WAIT_POLICY unset: torch's OpenMP workers spin "
                      "after each parallel region and take the cores hetero's kernel threads need (a 128K decode "
                      "step ran 1.3-1.4x slower on 2 cores). Import hetero before torch (and transformers), or "
                      "set OMP_WAIT_POLICY=PASSIVE in the environment.", PerformanceWarning, stacklevel=3)


_warn_spinning_openmp()


def wrap(model, config=None, progress_tokens=None):
    """``hetero.hf.wrap``: make a transformers causal LM decode with hetero (imports ``hetero.hf``, which registers
    the "hetero" attention with transformers). config: a ``HeteroConfig`` (None: the defaults); progress_tokens:
    prompts at least this long show a prefill progress bar (None: ``hetero.hf.DEFAULT_PROGRESS_TOKENS``)."""
    from .hf import wrap as _wrap

    return _wrap(model, config) if progress_tokens is None else _wrap(model, config, progress_tokens)


def unwrap(model):
    """``hetero.hf.unwrap``: the model's previous attention implementation."""
    from .hf import unwrap as _unwrap

    return _unwrap(model)


if "transformers" in _sys.modules:  # transformers is loaded already: register "hetero" now (else: import hetero.hf)
    from . import hf as _hf  # noqa: F401

__all__ = [
    "BackendUnavailableError", "ClosedError", "ConfigError", "DTypeError", "DecodeResult", "HeteroAttention",
    "HeteroConfig", "HeteroError", "HostView", "IndexSyncError", "InvalidValueError", "LayerCache", "PartialAttention",
    "PerformanceWarning", "Selection", "ShapeError", "StalePlanError", "TieredKVCache", "UnsupportedError",
    "causal_attention", "merge", "sparse_attention", "unwrap", "window_attention", "wrap",
]
