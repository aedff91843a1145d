"""The Retriever interface (DESIGN.md): incremental ``add``, ``search(q, budgets) -> Selection``, ``truncate``.

A retriever declares its options (``Option`` specs in ``options``) so that ``HeteroConfig`` validates
``retriever_options`` when it is built, before any cache exists; the constructor takes the validated values.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from hetero.errors import ConfigError, DTypeError, InvalidValueError, ShapeError
from hetero.tiers import HostTier
from hetero.timing import Span
from hetero.types import Selection
from hetero.validation import check_in_range, holds_bool


@dataclass(frozen=True)
class Option:
    """One retriever option: a default and what is allowed.

    kind: ``"int"``, ``"number"`` (int or float), ``"bool"`` or ``"choice"`` (one of ``choices``); ``low`` /
    ``high`` bound numbers (``low_open``: ``> low`` instead of ``>= low``); ``none_ok``: None is allowed."""

    default: Any
    kind: str = "number"
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    choices: Tuple[Any, ...] = ()
    none_ok: bool = False

    def allowed(self) -> str:
        if self.kind == "bool":
            text = "True or False"
        elif self.kind == "choice":
            text = " or ".join(map(repr, self.choices))
        else:
            what = "an int" if self.kind == "int" else "a number"
            show = (lambda x: str(int(x))) if self.kind == "int" else (lambda x: f"{x:g}")
            bounds = []
            if self.low is not None:
                bounds.append(f"{'>' if self.low_open else '>='} {show(self.low)}")
            if self.high is not None:
                bounds.append(f"<= {show(self.high)}")
            text = what + (" " + " and ".join(bounds) if bounds else "")
        return ("None or " if self.none_ok else "") + text

    def valid(self, value: Any) -> bool:
        if value is None:
            return self.none_ok
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "choice":
            return not isinstance(value, bool) and value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high


class Retriever(ABC):
    """Chooses host-tier rows for decode queries, one index per KV head.

    Bound to one layer's ``HostTier``; told about every token appended to it through ``add`` (in host order, right
    after the tier stored it). GQA: the ``G`` query heads of a KV head's group are searched together and share one
    selection (``group_rule``: ``"union"`` of per-head top-k, or ``"sum"`` of scores).

    Native decode path (hetero/native.py): ``native_kind`` says how the C++ append treats this index: 0 every add
    comes through ``add`` from Python, 1 the index only counts tokens (exhaustive retrievers), 2 ivf-group's tail
    append. ``ntotal_array`` / ``limit_array`` (int64 ``[B]``) are what the C++ append reads and advances.

    ``value_limit``: the largest ``|key|`` or ``|value|`` the index's float32 arithmetic takes (k-means and graph
    distances, code ranges, list sums), or None. The cache refuses larger ones before storing them: beyond it faiss's
    k-means aborts the process.
    """

    name: str = "?"
    options: ClassVar[Dict[str, Option]] = {}
    native_kind: int = 0
    value_limit: ClassVar[Optional[float]] = None

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> Dict[str, Any]:
        """Every option with its default filled in; ``ConfigError`` naming the option, its value and what is allowed
        for an unknown option or a value out of range."""
        if not isinstance(options, Mapping):
            raise ConfigError(f"retriever_options={options!r} is not allowed: a mapping of option names to values")
        unknown = sorted(set(options) - set(cls.options))
        if unknown:
            known = ", ".join(sorted(cls.options)) or "none"
            raise ConfigError(f"retriever {cls.name!r} has no option(s) {unknown}; its options: {known}")
        out = {}
        for key, spec in cls.options.items():
            value = options.get(key, spec.default)
            if not spec.valid(value):
                raise ConfigError(f"retriever {cls.name!r} option {key}={value!r} is not allowed: {spec.allowed()}")
            out[key] = value
        return out

    def __init__(self, host: HostTier, group_rule: str = "union", **options: Any):
        self.opts = self.check_options(options)
        self.host = host
        self.group_rule = group_rule
        self.layer_idx = 0  # the layer served (set by LayerCache before the first add; ivf-group staggers by it)
        self.ntotal_array = np.zeros(host.batch, dtype=np.int64)
        # the largest ntotal a native add may reach without Python (training, retraining); no limit by default
        self.limit_array = np.full(host.batch, np.iinfo(np.int64).max, dtype=np.int64)
        self.last_scanned = 0  # keys whose similarity to a query was computed in the last search
        self.last_group = 1  # query heads per KV head in the last search
        # Softmax scale of the layer (set by LayerCache), and what a retriever can report from its last search
        # when asked (``report_missed``): log of each query head's host mass outside its top ``flat_k`` keys
        # (``last_missed_lse``, exact or estimated) and, if it scored every host key, log of all its host mass
        # (``last_host_lse``), both ``[B, Hq]`` float32. The adaptive per-head budget splits by sqrt of the missed
        # share (hetero/budgets.py).
        self.softmax_scale: Optional[float] = None
        self.report_missed = False  # set by LayerCache when the adaptive per-head budget needs the report
        self.last_host_lse: Optional[torch.Tensor] = None
        self.last_missed_lse: Optional[torch.Tensor] = None

    @property
    def ntotal(self) -> List[int]:
        """Tokens indexed per sequence (equals the host tier's length once every add has run)."""
        return self.ntotal_array.tolist()

    def add(self, seq: int, keys: torch.Tensor) -> None:
        """Index ``keys [Hkv, n, D]``, host positions ``ntotal[seq] .. ntotal[seq] + n - 1`` of ``seq``. The count
        advances only when the add completed, so a failed add leaves ``ntotal`` behind the tier (healed by a
        rebuild, ``LayerCache``)."""
        self._add(seq, keys)
        self.ntotal_array[seq] += keys.shape[1]

    def _add(self, seq: int, keys: torch.Tensor) -> None:
        """Index structures update; exhaustive retrievers read the host tier and need none."""

    def reset(self) -> None:
        self.ntotal_array[:] = 0

    def truncate(self, seq: int, n: int) -> None:
        """Forget host positions ``>= n`` of ``seq`` (the host tier still holds them while this runs). The default
        rebuilds the sequence's index from its first ``n`` host keys; retrievers that can remove the newest keys in
        place override it."""
        self.rebuild(seq, n)

    def rebuild(self, seq: int, n: int) -> None:
        """The index of ``seq``'s first ``n`` host keys, built anew from the host tier (``truncate``; a healed failed
        add, ``IndexQueue.resync``). The default adds them in one piece; retrievers whose index depends on how the
        keys came (the IVF builds, LSH's centering mean) rebuild it as its adds left it."""
        self._reset_seq(seq)
        self.ntotal_array[seq] = 0
        if n:
            self.add(seq, self.host.keys(seq, 0, n))

    def _reset_seq(self, seq: int) -> None:
        """Drop every index structure of ``seq`` (``truncate``'s rebuild starts from here)."""

    def memory_bytes(self) -> int:
        """Bytes this retriever holds beyond the host tier itself."""
        return 0

    def buffers(self) -> List[Any]:
        """The large arrays (tensors or numpy arrays) this retriever keeps beyond the host tier, where it owns them
        (for tools that read its memory; a faiss index's own memory is not listed)."""
        return []

    def cheap_add(self, seq: int, n: int) -> bool:
        """True when adding ``n`` keys to ``seq`` is short (no training; at most an assignment of a few dozen keys,
        rarely with a list moved): the cache then adds them inline instead of handing the work to the background
        worker, since the step that adds them waits for the index anyway."""
        return False

    def bytes_read(self, scanned: np.ndarray) -> int:
        """Index bytes a search streamed when it scored ``scanned[b * Hkv + h]`` keys per item (the floor of a step,
        ``hetero profile``); exhaustive retrievers read the keys themselves."""
        return int(np.asarray(scanned).sum()) * self.host.head_dim * self.host.k_pool.element_size()

    def native_tables(self) -> Dict[str, int]:
        """LAYER descriptor fields (runner/step.h) of this index beyond INDEX_*, for ``native_kind`` 2."""
        return {}

    def native_search_ready(self) -> bool:
        """Whether the fused C++ step can search this index itself (ivf-group, every sequence trained)."""
        return False

    @classmethod
    def geometry_reasons(cls, head_dim: int) -> List[str]:
        """Why this retriever cannot index keys of ``head_dim`` (empty: it can); checked before anything is stored."""
        return []

    def use_runner(self, runner) -> None:
        """Run this retriever's native searches on ``runner`` (a C++ Runner) from now on: ``HeteroAttention``'s plan
        hands its search pool to the retrievers of its layers, so that a search made in Python has the step's
        threads. None: the retriever's own pool again. Retrievers without a native search ignore it."""

    def set_threads(self, threads: int) -> None:
        """Threads of the retriever's own native pool (the one it searches on when no runner is handed to it)."""

    def set_native_trace(self, on: bool) -> None:
        """Record the busy spans of the retriever's native pool threads (``take_native_spans``); none by default."""

    def take_native_spans(self) -> List[Span]:
        """Spans of the retriever's native pool threads since the last call (empty unless it has such threads)."""
        return []

    def search(self, q: torch.Tensor, budgets) -> Selection:
        """Select host rows for decode queries.

        q: ``[B, Hq, D]`` floating (searched in float32); budgets: keys per query head, ``B`` ints (one per
        sequence) or ``[B, Hkv]`` (one per KV head's group); clamped to ``[0, ntotal[b]]``. Returns
        ``Selection`` with ``indices [B, Hkv, k]`` int32, sorted ascending per row, ``-1`` padding at the end.
        """
        ks = self._check_query(q, budgets)
        self.last_group = q.shape[1] // self.host.kv_heads
        return self._search(q.float(), ks)

    def keys_read(self) -> int:
        """Keys (index rows, or host keys for an exhaustive scan) the last search read, each once per KV head
        however many of its group's queries scored it: ``last_scanned / G`` (a lower bound where the queries scanned
        apart, as faiss's do)."""
        return self.last_scanned // max(1, self.last_group)

    def last_bytes_read(self) -> int:
        """Index bytes the last search streamed (``bytes_read`` of ``keys_read``): what a step's floor counts."""
        return self.bytes_read(np.array([self.keys_read()]))

    @abstractmethod
    def _search(self, q: torch.Tensor, ks: List[List[int]]) -> Selection:
        """ks[b][h]: keys per query head of KV head h's group in sequence b (already clamped)."""

    def _check_query(self, q: torch.Tensor, budgets) -> List[List[int]]:
        if not isinstance(q, torch.Tensor) or q.dim() != 3:
            raise ShapeError(f"query must be [B, Hq, D], got {getattr(q, 'shape', type(q))}")
        b, hq, d = q.shape
        if b != self.host.batch or d != self.host.head_dim or hq % self.host.kv_heads:
            raise ShapeError(
                f"query {tuple(q.shape)} does not fit the host tier (batch {self.host.batch}, "
                f"{self.host.kv_heads} KV heads, head_dim {self.host.head_dim}): need [B, G*Hkv, D]"
            )
        if not q.is_floating_point():
            raise DTypeError(f"q must be floating point, got {q.dtype}")
        check_in_range(q, "q")
        hkv = self.host.kv_heads
        ntotal = self.ntotal
        rows = _int_rows(budgets, b, hkv)
        if rows is not None:  # plain ints (the decode step's case): no tensor operations
            return [[min(k, n) for k in row] for row, n in zip(rows, ntotal)]
        try:
            t = torch.as_tensor(budgets)
            if t.is_floating_point() or t.dtype == torch.bool or holds_bool(budgets):
                raise TypeError
            t = t.long().reshape(b, -1) if t.numel() in (b, b * hkv) else None
        except (TypeError, ValueError, RuntimeError):
            t = None
        if t is None or bool((t < 0).any()):
            raise InvalidValueError(f"budgets must be {b} ints >= 0 or [B={b}, Hkv={hkv}] ints >= 0, got {budgets!r}")
        t = t.expand(b, hkv)
        return [[max(0, min(int(k), n)) for k in row] for row, n in zip(t.tolist(), ntotal)]


def _int_rows(budgets, b: int, hkv: int) -> Optional[List[List[int]]]:
    """``budgets`` as ``[B][Hkv]`` ints when it is a list of B ints >= 0 or of B lists of Hkv ints >= 0; else None
    (the tensor path then accepts or rejects it with the full message)."""
    if not isinstance(budgets, (list, tuple)) or len(budgets) != b:
        return None
    if all(type(k) is int and k >= 0 for k in budgets):
        return [[k] * hkv for k in budgets]
    if all(isinstance(row, (list, tuple)) and len(row) == hkv and all(type(k) is int and k >= 0 for k in row)
           for row in budgets):
        return [list(row) for row in budgets]
    return None


def flat_k(per_head: Sequence[int]) -> int:
    """The flat split's keys per query head of a sequence: the mean of its per-KV-head budgets (an adaptive split
    keeps their sum)."""
    return round(sum(per_head) / len(per_head))


def pad_rows(rows: List[torch.Tensor], kv_heads: int) -> torch.Tensor:
    """Stack per-sequence ``[Hkv, k_b]`` index tensors into ``[B, Hkv, max k_b]`` int32, padded with -1."""
    if len(rows) == 1 and rows[0].dtype == torch.int32:  # one sequence: a view
        return rows[0].unsqueeze(0).contiguous()
    width = max((r.shape[-1] for r in rows), default=0)
    out = torch.full((len(rows), kv_heads, width), -1, dtype=torch.int32)
    for i, r in enumerate(rows):
        out[i, :, : r.shape[-1]] = r
    return out


def topk_group(scores: torch.Tensor, k: int, group_rule: str):
    """Shared rows for one KV head from its group's scores.

    scores: ``[G, N]`` float. Returns ``(ids [m] int32 sorted ascending, member [G, m] bool or None)``:
    ``"sum"``: top-k of the group's summed scores (m = k). ``"union"``: union of every head's top-k
    (m <= G * k). ``"per-head"``: the same union, plus ``member[g, j]`` = row j is in head g's own top-k
    (the caller turns the others into -inf log-weights, so each head attends to exactly its top-k).
    """
    g, n = scores.shape
    if k == 0 or n == 0:
        return torch.empty(0, dtype=torch.int32), None
    if group_rule == "sum" or g == 1:
        return scores.sum(dim=0).topk(k, sorted=False).indices.sort().values.to(torch.int32), None
    top = scores.topk(k, dim=-1, sorted=False).indices  # [G, k]
    ids = torch.unique(top)
    member = None
    if group_rule == "per-head":
        member = torch.zeros(g, len(ids), dtype=torch.bool)
        member.scatter_(1, torch.searchsorted(ids, top), True)
    return ids.to(torch.int32), member


def selection_from_groups(ids: List[List[torch.Tensor]], members, kv_heads: int, group: int) -> Selection:
    """Assemble per (sequence, KV head) row lists (and optional per-head membership) into a Selection."""
    rows = []
    for per_seq in ids:
        width = max((len(x) for x in per_seq), default=0)
        mat = torch.full((kv_heads, width), -1, dtype=torch.int32)
        for h, x in enumerate(per_seq):
            mat[h, : len(x)] = x
        rows.append(mat)
    idx = pad_rows(rows, kv_heads)
    if not any(m is not None for per_seq in members for m in per_seq):
        return Selection(idx)
    lw = torch.full((len(ids), kv_heads * group, idx.shape[2]), float("-inf"))
    for b, per_seq in enumerate(members):
        for h, m in enumerate(per_seq):
            n = len(ids[b][h])
            if m is None:
                lw[b, h * group:(h + 1) * group, :n] = 0.0
            else:
                lw[b, h * group:(h + 1) * group, :n] = torch.where(m, 0.0, float("-inf"))
    return Selection(idx, lw)
