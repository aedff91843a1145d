"""hetero: heterogeneous CPU-GPU attention for long-context LLM decoding.

Sinks + recent window of the KV cache stay on the fast device; older tokens live in host memory, where a
retriever picks the keys that matter and a CPU kernel attends over them; both partial results are fused
exactly by log-sum-exp.

Public API: ``HeteroConfig``, ``TieredKVCache`` / ``LayerCache``, ``HeteroAttention``,
``PartialAttention``, ``Selection``, ``merge``, ``window_attention``, ``sparse_attention``,
``causal_attention``.
"""
from .attention import DecodeResult, HeteroAttention
from .cache import LayerCache, TieredKVCache
from .config import HeteroConfig
from .errors import (BackendUnavailableError, ConfigError, DTypeError, HeteroError, InvalidValueError,
                     ShapeError)
from .merge import merge
from .ops import sparse_attention, window_attention
from .reference import causal_attention
from .types import HostView, PartialAttention, Selection

__version__ = "0.1.0"


def wrap(model, config=None):
    """``hetero.hf.wrap``: make a transformers causal LM decode with hetero (imports transformers lazily)."""
    from .hf import wrap as _wrap

    return _wrap(model, config)

__all__ = [
    "BackendUnavailableError", "ConfigError", "DTypeError", "DecodeResult", "HeteroAttention", "HeteroConfig",
    "HeteroError", "HostView", "InvalidValueError", "LayerCache", "PartialAttention", "Selection", "ShapeError",
    "TieredKVCache", "causal_attention", "merge", "sparse_attention", "window_attention", "wrap",
]
