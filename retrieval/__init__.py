"""Retrievers: pick the host-tier keys that matter for a query (installed as ``hetero.retrieval``).

They are chosen by name through ``hetero.registry.RETRIEVERS``; implementations import their heavy libraries
(faiss, numba) only when a retriever is built.
"""
from __future__ import annotations

from typing import List

from hetero.registry import RETRIEVERS

from .base import Option, Retriever


def available_retrievers() -> List[str]:
    """Names accepted by ``HeteroConfig.retriever``."""
    return sorted(RETRIEVERS.names())


__all__ = ["Option", "Retriever", "available_retrievers"]
