"""Backends of the two sides of a step (DESIGN.md "Backends"), chosen from ``hetero.registry``.

* window (fast device): attention over sinks + window, ``(q, k, v, lengths, scale) -> PartialAttention``.
* host (CPU): attention over a ``Selection`` of host rows, ``(q, host_view, selection, scale) -> PartialAttention``.

Each backend declares what it supports and explains refusals with ``not_supported_reasons(inputs)`` over one
``AttentionInputs`` bundle; ``"auto"`` takes the first backend, in registry order, that supports the inputs; if
none does, the error prints the inputs and every backend's reasons. A backend instance belongs to one owner (a
``HeteroAttention`` runtime, or the standalone operations): it may hold a thread pool, never per-layer state.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from .errors import BackendUnavailableError
from .registry import HOST_BACKENDS, WINDOW_BACKENDS, Registry
from .timing import Span
from .types import HostView, PartialAttention, Selection


@dataclass(frozen=True)
class AttentionInputs:
    """What backends decide on: the K/V's device and dtype, head dim, query and KV heads, batch."""

    device: torch.device
    kv_dtype: torch.dtype
    head_dim: int
    q_heads: int
    kv_heads: int
    batch: int

    @property
    def group(self) -> int:
        return self.q_heads // max(self.kv_heads, 1)

    def __str__(self) -> str:
        return (f"device={self.device.type}, kv_dtype={str(self.kv_dtype).replace('torch.', '')}, "
                f"head_dim={self.head_dim}, heads={self.q_heads}/{self.kv_heads} (G={self.group}), batch={self.batch}")


class Backend(ABC):
    """Common declaration of what a backend supports."""

    name: str = "?"
    devices: Tuple[str, ...] = ("cpu",)
    dtypes: Tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
    max_group: Optional[int] = None  # largest GQA group (query heads per KV head); None: any
    max_head_dim: Optional[int] = None  # largest head_dim; None: any
    native_step: bool = False  # the fused C++ decode step computes this side itself (hetero/native.py)

    def availability_reasons(self) -> List[str]:
        """Why this backend cannot run on this machine at all (missing library, no device...)."""
        return []

    def not_supported_reasons(self, inputs: AttentionInputs) -> List[str]:
        reasons = list(self.availability_reasons())
        if inputs.device.type not in self.devices:
            reasons.append(f"device {inputs.device.type} not in {list(self.devices)}")
        if inputs.kv_dtype not in self.dtypes:
            reasons.append(f"KV dtype {inputs.kv_dtype} not in {[str(d).replace('torch.', '') for d in self.dtypes]}")
        if self.max_group is not None and inputs.group > self.max_group:
            reasons.append(f"GQA group of {inputs.group} query heads > {self.max_group}")
        if self.max_head_dim is not None and inputs.head_dim > self.max_head_dim:
            reasons.append(f"head_dim {inputs.head_dim} > {self.max_head_dim}")
        return reasons

    def auto_reasons(self, inputs: AttentionInputs) -> List[str]:
        """Why "auto" should not pick this backend for these inputs even though it could run them."""
        return []

    def set_threads(self, threads: int) -> None:
        """CPU threads this backend may use (its own pool; torch's intra-op pool by default)."""

    def set_native_trace(self, on: bool) -> None:
        """Record the busy spans of this backend's own native threads (``take_native_spans``); none by default."""

    def take_native_spans(self) -> List[Span]:
        """Spans of this backend's native pool threads since the last call (empty unless it has such threads)."""
        return []


class WindowBackend(Backend):
    """Dense attention over the fast tier. q ``[B, Hq, D]``, k/v ``[B, Hkv, L, D]``, lengths ``[B]`` valid slots."""

    def set_threads(self, threads: int) -> None:
        torch.set_num_threads(int(threads))

    @abstractmethod
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                 scale: float) -> PartialAttention:
        ...


class HostBackend(Backend):
    """Sparse attention over host rows. q ``[B, Hq, D]`` (host memory), a ``HostView``, a ``Selection``."""

    @abstractmethod
    def __call__(self, q: torch.Tensor, host: HostView, selection: Selection, scale: float) -> PartialAttention:
        ...


_SIDES = {"window": WINDOW_BACKENDS, "host": HOST_BACKENDS}


def registry(side: str) -> Registry:
    return _SIDES[side]


class BackendSet:
    """The backend instances of one owner, created on first use (one per name and side)."""

    def __init__(self) -> None:
        self._instances: Dict[Tuple[str, str], Backend] = {}

    def get(self, side: str, name: str) -> Backend:
        key = (side, name)
        if key not in self._instances:
            self._instances[key] = registry(side).load(name)()
        return self._instances[key]

    def select(self, side: str, requested: str, inputs: AttentionInputs) -> Backend:
        """Resolve ``requested`` (a name or "auto") for ``inputs``. An explicit name that cannot serve them raises
        with its reasons; "auto" (or the environment override) takes the first backend with none (including its
        ``auto_reasons``), else raises listing every backend's reasons."""
        reg = registry(side)
        requested = reg.resolve(requested)
        auto = requested == "auto"
        collected = []
        for name in reg.names() if auto else [requested]:
            try:
                backend = self.get(side, name)
            except ImportError as e:  # its library is not installed: a reason, not a crash
                collected.append(f"  {name}: failed to load ({type(e).__name__}: {e})")
                continue
            reasons = backend.not_supported_reasons(inputs) + (backend.auto_reasons(inputs) if auto else [])
            if not reasons:
                return backend
            collected.append(f"  {name}: " + "; ".join(reasons))
        raise BackendUnavailableError(f"no {side} backend supports these inputs ({inputs}; requested "
                                      f"{requested!r}):\n" + "\n".join(collected))

    def all(self) -> List[Backend]:
        return list(self._instances.values())
