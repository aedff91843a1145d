"""One lazy registry mechanism for everything hetero picks by name: window backends, host backends, retrievers and
the device merges.

An entry maps a name to ``"module:attribute"``; the module is imported only when the entry is loaded, so that heavy
libraries (triton, numba, faiss, the C++ extension) load with the part that needs them. This is also the only way
the runtime (``hetero``) reaches the implementations in ``hetero.cpu``, ``hetero.gpu`` and ``hetero.retrieval``:
the import contract (``.importlinter``, checked in CI) forbids direct imports.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Dict, List, Optional

from .errors import ConfigError


class Registry:
    """Names -> lazily imported implementations, in preference order (what ``"auto"`` tries first).

    kind: what the entries are, for messages ("window backend"). env: an environment variable whose value
    replaces ``"auto"`` (tests and users force a backend with it)."""

    def __init__(self, kind: str, entries: Dict[str, str], env: Optional[str] = None):
        self.kind, self.env = kind, env
        self._entries = dict(entries)
        self._loaded: Dict[str, Any] = {}

    def names(self) -> List[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def load(self, name: str) -> Any:
        """The implementation called ``name`` (imported on first use); ``ConfigError`` for an unknown name,
        ``ImportError`` when its module cannot be imported."""
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}; registered: {self.names()}")
        if name not in self._loaded:
            module, attr = self._entries[name].split(":")
            self._loaded[name] = getattr(importlib.import_module(module), attr)
        return self._loaded[name]

    def resolve(self, requested: str) -> str:
        """``requested``, with ``"auto"`` replaced by the environment override when one is set (``ConfigError``
        naming the variable when it names nothing registered)."""
        if requested == "auto" and self.env:
            value = os.environ.get(self.env, "auto") or "auto"
            if value != "auto" and value not in self._entries:
                raise ConfigError(f"{self.env}={value!r} names no {self.kind}; registered: {self.names()} (or auto)")
            return value
        return requested


# cpp first: it serves CPU tensors only, so CUDA inputs pass on to triton, while CPU inputs never import triton
# (~0.2 s, for a backend that "auto" declines on the CPU anyway: it runs there only in its interpreter)
WINDOW_BACKENDS = Registry("window backend", {
    "cpp": "hetero.cpu.cpp_window:CppWindowBackend",
    "triton": "hetero.gpu.triton_window:TritonWindowBackend",
    "torch": "hetero.gpu.torch_window:TorchWindowBackend",
}, env="HETERO_WINDOW_BACKEND")

HOST_BACKENDS = Registry("host backend", {
    "cpp": "hetero.cpu.cpp_sparse:CppSparseBackend",
    "numba": "hetero.cpu.numba_sparse:NumbaSparseBackend",
    "torch": "hetero.cpu.torch_sparse:TorchSparseBackend",
}, env="HETERO_CPU_BACKEND")

RETRIEVERS = Registry("retriever", {
    "ivf-group": "hetero.retrieval.ivf_group:IVFGroupRetriever",
    "ivf": "hetero.retrieval.faiss_index:IVFRetriever",
    "ivf-sq8": "hetero.retrieval.faiss_index:IVFSQ8Retriever",
    "ivf-pq": "hetero.retrieval.faiss_index:IVFPQRetriever",
    "hnsw": "hetero.retrieval.faiss_index:HNSWRetriever",
    "lsh": "hetero.retrieval.lsh:LSHSampler",
    "exact": "hetero.retrieval.exact:ExactTopK",
    "all": "hetero.retrieval.exact:AllRetriever",
})

# merge(parts) on a device: the fused kernel of that device family (CPU float32 parts go to the C++ merge).
DEVICE_MERGES = Registry("device merge", {
    "cuda": "hetero.gpu.triton_window:merge_triton",
})
