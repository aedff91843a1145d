"""Backend registries, one per side (DESIGN.md "Backends").

* window (fast device): attention over sinks + window, ``(q, k, v, lengths, scale) -> PartialAttention``.
* host (CPU): attention over a ``Selection`` of host rows, ``(q, host_view, selection, scale) ->
  PartialAttention``.

Each backend declares what it supports and explains refusals with ``not_supported_reasons``; ``"auto"``
takes the first backend, in registry order, that supports the inputs; if none does the error lists every
backend's reasons. Implementations are imported lazily, only when their backend is asked about.
Environment overrides of ``"auto"``: ``HETERO_WINDOW_BACKEND``, ``HETERO_CPU_BACKEND``.
"""
from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .errors import BackendUnavailableError, ConfigError
from .timing import Span
from .types import HostView, PartialAttention, Selection


class Backend(ABC):
    """Common declaration of what a backend supports."""

    name: str = "?"
    devices: Tuple[str, ...] = ("cpu",)
    dtypes: Tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
    head_dims: Optional[Tuple[int, ...]] = None  # None: any

    def availability_reasons(self) -> List[str]:
        """Why this backend cannot run on this machine at all (missing library, no device...)."""
        return []

    def auto_reasons(self, device: torch.device) -> List[str]:
        """Why "auto" should not pick this backend for tensors on ``device`` even though it could run."""
        return []

    def reasons_for(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> List[str]:
        reasons = list(self.availability_reasons())
        if device.type not in self.devices:
            reasons.append(f"device {device.type} not in {list(self.devices)}")
        if dtype not in self.dtypes:
            reasons.append(f"KV dtype {dtype} not in {[str(d).replace('torch.', '') for d in self.dtypes]}")
        if self.head_dims is not None and head_dim not in self.head_dims:
            reasons.append(f"head_dim {head_dim} not in {list(self.head_dims)}")
        return reasons

    def set_native_trace(self, on: bool) -> None:
        """Record the busy spans of this backend's own native threads (``take_native_spans``); none by default."""

    def take_native_spans(self) -> List[Span]:
        """Spans of this backend's native pool threads since the last call (empty unless it has such threads)."""
        return []


class WindowBackend(Backend):
    """Dense attention over the fast tier. Inputs: q ``[B, Hq, D]``, k/v ``[B, Hkv, L, D]``,
    lengths ``[B]`` (valid slots), scale."""

    def not_supported_reasons(self, q: torch.Tensor, k: torch.Tensor) -> List[str]:
        return self.reasons_for(k.device, k.dtype, k.shape[-1])

    def set_threads(self, threads: int) -> None:
        """CPU threads this backend may use (its own pool; torch's intra-op pool by default)."""
        torch.set_num_threads(int(threads))

    @abstractmethod
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                 scale: float) -> PartialAttention:
        ...


class HostBackend(Backend):
    """Sparse attention over host rows. Inputs: q ``[B, Hq, D]`` (on the host), a ``HostView``, a
    ``Selection``, scale."""

    def not_supported_reasons(self, q: torch.Tensor, host: HostView) -> List[str]:
        return self.reasons_for(host.k_pool.device, host.k_pool.dtype, host.k_pool.shape[-1])

    def set_threads(self, threads: int) -> None:
        """Threads this backend may use for one call (torch's pool by default)."""

    @abstractmethod
    def __call__(self, q: torch.Tensor, host: HostView, selection: Selection, scale: float) -> PartialAttention:
        ...


# Registry order is "auto" preference order.
WINDOW_REGISTRY: Dict[str, str] = {
    "triton": "hetero.gpu.triton_window:TritonWindowBackend",
    "cpp": "hetero.cpu.cpp_window:CppWindowBackend",
    "torch": "hetero.gpu.torch_window:TorchWindowBackend",
}
HOST_REGISTRY: Dict[str, str] = {
    "cpp": "hetero.cpu.cpp_sparse:CppSparseBackend",
    "numba": "hetero.cpu.numba_sparse:NumbaSparseBackend",
    "torch": "hetero.cpu.torch_sparse:TorchSparseBackend",
}
_ENV = {"window": "HETERO_WINDOW_BACKEND", "host": "HETERO_CPU_BACKEND"}
_instances: Dict[Tuple[str, str], Backend] = {}


def _registry(side: str) -> Dict[str, str]:
    return WINDOW_REGISTRY if side == "window" else HOST_REGISTRY


def get_backend(side: str, name: str) -> Backend:
    """The backend instance called ``name`` on ``side`` ("window" or "host")."""
    reg = _registry(side)
    if name not in reg:
        raise ConfigError(f"unknown {side} backend {name!r}; registered: {list(reg)}")
    key = (side, name)
    if key not in _instances:
        module, cls = reg[name].split(":")
        _instances[key] = getattr(importlib.import_module(module), cls)()
    return _instances[key]


def select_backend(side: str, requested: str, reasons_of, device: Optional[torch.device] = None) -> Backend:
    """Resolve ``requested`` (a name or "auto") on ``side``; ``reasons_of(backend) -> list[str]``.

    An explicit name that cannot serve the inputs raises with its reasons; "auto" (or the environment
    override) takes the first backend with no reasons (including its ``auto_reasons(device)``), else raises
    listing every backend's reasons.
    """
    if requested == "auto":
        requested = os.environ.get(_ENV[side], "auto") or "auto"
    auto = requested == "auto"
    names: Sequence[str] = list(_registry(side)) if auto else [requested]
    collected = []
    for name in names:
        try:
            backend = get_backend(side, name)
        except ImportError as e:  # its library is not installed: a reason, not a crash
            collected.append(f"  {name}: failed to load ({type(e).__name__}: {e})")
            continue
        reasons = reasons_of(backend)
        if auto and device is not None:
            reasons = reasons + backend.auto_reasons(device)
        if not reasons:
            return backend
        collected.append(f"  {name}: " + "; ".join(reasons))
    raise BackendUnavailableError(f"no {side} backend supports these inputs (requested {requested!r}):\n"
                                  + "\n".join(collected))


def describe_backends(side: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> Dict[str, List[str]]:
    """``{name: reasons}`` for every backend on ``side`` (empty list: usable)."""
    out = {}
    for name in _registry(side):
        try:
            out[name] = get_backend(side, name).reasons_for(device, dtype, head_dim)
        except Exception as e:  # a backend whose module fails to import is unusable, with the reason
            out[name] = [f"failed to load: {type(e).__name__}: {e}"]
    return out
