"""One validated configuration object for the whole runtime."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from .errors import ConfigError
from .registry import HOST_BACKENDS, RETRIEVERS, WINDOW_BACKENDS
from .validation import scale_ok

KV_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
GROUP_RULES = ("union", "per-head", "sum")
MAX_BUDGET_KEYS = 2 ** 53  # a key count the native step holds exactly in a float64
MAX_THREADS = 1024  # more than any CPU this runs on has; the native pools take an int
MAX_TOKENS = 2 ** 31 - 1  # token positions are int32 (selections, index ids)
SEED_RANGE = (-2 ** 31, 2 ** 31 - 1)  # faiss's k-means takes an int seed


def _fail(name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"HeteroConfig.{name}={value!r} is not allowed: {allowed}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def canonical_dtype_name(value: Union[str, torch.dtype, None], name: str = "kv_dtype") -> Optional[str]:
    """'bf16' / torch.bfloat16 / 'bfloat16' -> 'bfloat16'; None stays None (keep the input dtype)."""
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        for k, v in KV_DTYPES.items():
            if v == value:
                return k
        raise _fail(name, value, f"one of {sorted(KV_DTYPES)}")
    if isinstance(value, str):
        v = _DTYPE_ALIASES.get(value.lower(), value.lower())
        if v in KV_DTYPES:
            return v
    raise _fail(name, value, f"one of {sorted(KV_DTYPES)} (or bf16/fp16/fp32), or None")


@dataclass(frozen=True)
class HeteroConfig:
    """Configuration of hetero's tiers, retrieval and backends.

    window: recent tokens kept on the fast device (>= 0, < 2**31 like every token count).
    sinks: first tokens of each sequence kept on the fast device (>= 0).
    budget: host keys per KV head (``budget_per="kv_head"``, default: the rows a GQA group shares and the
        host side reads) or per query head (``"query_head"``): an int count (>= 0), or a float fraction in
        ``(0, 1]`` of that sequence's host tier (rounded up). With ``"kv_head"`` each of the G query heads
        of a group ranks ``ceil(k / G)`` keys, so the group's union holds at most ``G * ceil(k / G)`` rows: k
        when G divides k, fewer than ``k + G`` otherwise (a budget of 1 key reads up to G rows; a budget covering the
        whole host tier selects all of it).
    retriever: name in the retriever registry (``hetero.registry.RETRIEVERS.names()``): ``"ivf-group"``
        (default: IVF over 4-bit codes, lists read once per GQA group by hetero's C++ kernel, the unselected
        tokens estimated from their lists' means), ``"ivf-sq8"``,
        ``"ivf"``, ``"ivf-pq"``, ``"hnsw"`` (faiss), ``"lsh"``, ``"exact"`` (brute-force top-k), ``"all"`` (every host
        token: exact attention).
    retriever_options: keyword options of the retriever (validated here: an unknown option or a value out of range
        raises ``ConfigError`` naming it).
    group_rule: how a GQA group's queries choose shared rows: ``"union"`` of per-head top sets (each head's
        ``ceil(k / G)`` with the default ``budget_per="kv_head"``, so at most ``G * ceil(k / G)`` rows; its k each
        with ``"query_head"``, up to ``G * k`` rows; the most accurate), ``"per-head"`` (the same rows, but each
        head attends only to its own), or ``"sum"`` of the group's scores (exactly ``k`` rows).
    head_budget: ``"flat"`` (every KV head gets the budget) or ``"adaptive"`` (HGCA-style: a layer's total
        is redistributed over KV heads every step by the square root of the attention mass the flat split
        left out in the previous step, when the retriever reports it (``exact``; ``ivf-group`` estimates it over
        the rows it scanned), else by the host tier's share
        of attention mass; see ``hetero/budgets.py``).
    window_backend / host_backend: backend names or ``"auto"``; the environment variables
        ``HETERO_WINDOW_BACKEND`` / ``HETERO_CPU_BACKEND`` override ``"auto"``.
    threads: CPU threads for host work (None: all cores of this process).
    kv_dtype: storage dtype of both tiers (``"float32" | "bfloat16" | "float16"``); None keeps the
        dtype of the first keys appended (float64 keys need one set).
    block_tokens: host-tier page size in tokens (>= 1).
    dense_layers: layer indices kept fully on the fast device (no host tier, exact attention).
    scale: softmax scale (None: ``1/sqrt(head_dim)``).
    overlap: ``"auto"`` (default), True or False. True runs the host side on a background worker while the window
        side runs; False runs them on the caller's thread and the same pool threads (the fused C++ step takes their
        items in one pool run; the same results bit for bit). ``"auto"``: True when the fast tier is on CUDA (the window leaves the CPU to the host
        side), False when it is on the CPU, where both sides share the same cores and memory bus (measured on 2
        vCPUs, 128K tokens: 5.2 ms per step one after the other, 6.0-7.3 ms side by side; docs/performance.md).
    balance: ``"fixed"`` thread split and budget, or ``"auto"`` (``hetero/balance.py``): re-split threads
        and move the budget within ``[budget_floor, 2 x budget]`` from measured costs.
    budget_floor: the accuracy floor of ``balance="auto"`` (same units as ``budget``; None: ``budget / 2``).
    sparse_chunk_tokens: a chunk of at most this many query tokens (assisted decoding's drafts, a short turn)
        attends the host tier as decode tokens do, each query through the retriever; longer chunks (a prompt, a
        long turn) attend it exactly (``hetero/chunk.py``). The chunks of ``generate()``'s chunked prefill count
        the prefill so far: a short last chunk of a long prompt is attended exactly, as the one-shot prefill is.
    """

    window: int = 1024
    sinks: int = 4
    budget: Union[int, float] = 0.02
    budget_per: str = "kv_head"
    retriever: str = "ivf-group"
    retriever_options: Mapping[str, Any] = field(default_factory=dict)
    group_rule: str = "union"
    head_budget: str = "flat"
    window_backend: str = "auto"
    host_backend: str = "auto"
    threads: Optional[int] = None
    kv_dtype: Optional[str] = None
    block_tokens: int = 256
    dense_layers: Tuple[int, ...] = ()
    scale: Optional[float] = None
    overlap: Union[bool, str] = "auto"
    balance: str = "fixed"
    budget_floor: Optional[Union[int, float]] = None
    sparse_chunk_tokens: int = 16

    def __post_init__(self) -> None:
        for name in ("window", "sinks", "block_tokens", "budget", "budget_floor", "sparse_chunk_tokens", "threads",
                     "scale"):  # numpy scalars (a budget read from an array) as the Python numbers they hold
            v = getattr(self, name)
            if isinstance(v, (np.integer, np.floating)):
                object.__setattr__(self, name, v.item())
        for name in ("window", "sinks", "block_tokens"):
            v = getattr(self, name)
            low = 1 if name == "block_tokens" else 0
            if not _is_int(v) or not low <= v <= MAX_TOKENS:
                raise _fail(name, v, f"an int in [{low}, 2**31 - 1] (token positions are int32)")
        b = self.budget
        budget_rule = "an int count in [0, 2**53] or a float fraction in (0, 1]"  # counts stay exact as float64
        if _is_int(b):
            if not 0 <= b <= MAX_BUDGET_KEYS:
                raise _fail("budget", b, budget_rule)
        elif isinstance(b, float):
            if not (math.isfinite(b) and 0.0 < b <= 1.0):
                raise _fail("budget", b, budget_rule)
        else:
            raise _fail("budget", b, budget_rule)
        if not isinstance(self.retriever, str) or self.retriever not in RETRIEVERS:
            raise _fail("retriever", self.retriever, f"one of {RETRIEVERS.names()}")
        if not isinstance(self.retriever_options, Mapping):
            raise _fail("retriever_options", self.retriever_options, "a mapping of keyword options")
        object.__setattr__(self, "retriever_options", dict(self.retriever_options))
        RETRIEVERS.load(self.retriever).check_options(self.retriever_options)  # a ConfigError naming the option
        if self.group_rule not in GROUP_RULES:
            raise _fail("group_rule", self.group_rule, f"one of {GROUP_RULES}")
        if self.budget_per not in ("kv_head", "query_head"):
            raise _fail("budget_per", self.budget_per, "'kv_head' or 'query_head'")
        if self.head_budget not in ("flat", "adaptive"):
            raise _fail("head_budget", self.head_budget, "'flat' or 'adaptive'")
        if self.window_backend != "auto" and self.window_backend not in WINDOW_BACKENDS:
            raise _fail("window_backend", self.window_backend, f"'auto' or one of {WINDOW_BACKENDS.names()}")
        if self.host_backend != "auto" and self.host_backend not in HOST_BACKENDS:
            raise _fail("host_backend", self.host_backend, f"'auto' or one of {HOST_BACKENDS.names()}")
        if not _is_int(self.sparse_chunk_tokens) or self.sparse_chunk_tokens < 0:
            raise _fail("sparse_chunk_tokens", self.sparse_chunk_tokens, "an int >= 0")
        if self.threads is not None and (not _is_int(self.threads) or not 1 <= self.threads <= MAX_THREADS):
            raise _fail("threads", self.threads, f"None (all cores) or an int in [1, {MAX_THREADS}]")
        object.__setattr__(self, "kv_dtype", canonical_dtype_name(self.kv_dtype))
        try:
            layers = tuple(self.dense_layers)
        except TypeError:
            raise _fail("dense_layers", self.dense_layers, "a sequence of layer indices (ints >= 0)") from None
        if not all(_is_int(x) and x >= 0 for x in layers) or len(set(layers)) != len(layers):
            raise _fail("dense_layers", self.dense_layers, "distinct ints >= 0")
        object.__setattr__(self, "dense_layers", tuple(sorted(layers)))
        if not isinstance(self.overlap, bool) and self.overlap != "auto":
            raise _fail("overlap", self.overlap, "'auto', True or False")
        if self.balance not in ("fixed", "auto"):
            raise _fail("balance", self.balance, "'fixed' or 'auto'")
        f = self.budget_floor
        if f is not None and not ((_is_int(f) and _is_int(b) and 0 <= f <= b) or
                                  (isinstance(f, float) and isinstance(b, float) and 0.0 < f <= b)):
            raise _fail("budget_floor", f, "None, or the same kind as budget (count or fraction) and <= budget")
        if self.scale is not None and not scale_ok(self.scale):
            raise _fail("scale", self.scale, "None or a number in [1.18e-38, 1e3] (the kernels' float32 scores must "
                        "not overflow)")

    def __hash__(self) -> int:  # the generated one fails on the retriever_options dict
        return hash(tuple(tuple(sorted(v.items())) if isinstance(v, dict) else v
                          for v in (getattr(self, f.name) for f in fields(self))))

    def overlap_on(self, device: torch.device) -> bool:
        """Whether the two sides of a decode step run side by side when the fast tier is on ``device``."""
        return self.overlap if isinstance(self.overlap, bool) else torch.device(device).type == "cuda"

    @property
    def torch_kv_dtype(self) -> Optional[torch.dtype]:
        return None if self.kv_dtype is None else KV_DTYPES[self.kv_dtype]

    @property
    def resolved_threads(self) -> int:
        if self.threads is not None:
            return self.threads
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - non-Linux
            return os.cpu_count() or 1

    def budget_for(self, host_tokens: int, scale: float = 1.0) -> int:
        """The budget's key count for a host tier of ``host_tokens`` tokens (never more than it holds): per KV head
        with ``budget_per="kv_head"`` (its G query heads then rank ``ceil(k / G)`` each, ``plan.flat_budgets``), per
        query head with ``"query_head"``. ``scale`` (balance="auto") multiplies it, never below ``budget_floor``."""
        def keys(budget):
            return math.ceil(budget * host_tokens - 1e-9) if isinstance(budget, float) else budget

        k = keys(self.budget) * scale
        if scale != 1.0:
            k = max(k, keys(self.resolved_budget_floor))
        return max(0, min(int(math.ceil(k - 1e-9)), int(host_tokens)))

    @property
    def resolved_budget_floor(self) -> Union[int, float]:
        """``budget_floor``, or half the budget in its units: a fraction for a fraction, a count (rounded up) for a
        count (``budget / 2`` of a count would read as a fraction of the tier)."""
        if self.budget_floor is not None:
            return self.budget_floor
        return self.budget / 2 if isinstance(self.budget, float) else -(-self.budget // 2)

    @property
    def budget_scale_range(self) -> Tuple[float, float]:
        """The range ``balance="auto"`` moves the budget's scale in: ``[budget_floor / budget, 2]``."""
        return (self.resolved_budget_floor / self.budget if self.budget else 1.0), 2.0

    def with_(self, **changes: Any) -> "HeteroConfig":
        """A validated copy with some fields changed."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(f"unknown HeteroConfig field(s) {sorted(unknown)}; fields are "
                              f"{[f.name for f in fields(self)]}")
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """The fields that differ from the defaults, as JSON values (``from_dict`` reads them back, the rest taking
        their defaults): what ``save_pretrained`` writes for a ``generation_config.hetero_config`` (transformers
        serializes a dataclass through its ``to_dict``). A file then names only what was chosen, so a default
        that changes later still applies to it."""
        defaults = HeteroConfig()
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if getattr(self, f.name) != getattr(defaults, f.name)
               or type(getattr(self, f.name)) is not type(getattr(defaults, f.name))}
        if "dense_layers" in out:
            out["dense_layers"] = list(self.dense_layers)
        if "retriever_options" in out:
            out["retriever_options"] = dict(self.retriever_options)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "HeteroConfig":
        """A config from ``to_dict``'s output (a saved ``generation_config.json``); fields left out take their
        defaults, an unknown key is a ConfigError naming it."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"a hetero config must be a mapping of HeteroConfig fields, got {type(data).__name__}")
        return cls().with_(**data)
