"""Retrievers: pick the host-tier keys that matter for a query (installed as ``hetero.retrieval``).

Registry by name; implementations are imported lazily so that heavy libraries (faiss, numba) load only
when their retriever is used.
"""
from __future__ import annotations

import importlib
from typing import Dict, List

from .base import Retriever

_REGISTRY: Dict[str, str] = {
    "all": "hetero.retrieval.exact:AllRetriever",
    "exact": "hetero.retrieval.exact:ExactTopK",
    "ivf": "hetero.retrieval.faiss_index:IVFRetriever",
    "ivf-sq8": "hetero.retrieval.faiss_index:IVFSQ8Retriever",
    "ivf-pq": "hetero.retrieval.faiss_index:IVFPQRetriever",
    "ivf-group": "hetero.retrieval.ivf_group:IVFGroupRetriever",
    "hnsw": "hetero.retrieval.faiss_index:HNSWRetriever",
    "lsh": "hetero.retrieval.lsh:LSHSampler",
}


def available_retrievers() -> List[str]:
    """Names accepted by ``HeteroConfig.retriever``."""
    return sorted(_REGISTRY)


def retriever_class(name: str) -> type:
    from hetero.errors import ConfigError

    if name not in _REGISTRY:
        raise ConfigError(f"unknown retriever {name!r}; available: {available_retrievers()}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["Retriever", "available_retrievers", "retriever_class"]
