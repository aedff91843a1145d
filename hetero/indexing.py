"""Keeping one layer's retriever in step with its host tier.

Tokens pushed out of the window are stored in the host tier at once and handed to the retriever (``add``) in host
order, inline or on a background worker (``indexer``, a ``hetero.worker.Worker``). An add the retriever calls short
(``cheap_add``: a decode step's keys into ivf-group's tail list, or its native flush) runs inline when nothing is
queued ahead of it: on two cores the hand-off to the worker cost ~0.7 ms of GIL waiting for ~0.05 ms of work, and
the step that adds the keys waits for the index anyway. The C++
decode append indexes natively only while the queue is idle, so the order is kept either way.

A failed add (or a crop's failed ``truncate``), inline or in the background, an exception or an interrupt, never
leaves the index silently behind the tier: the queue records it; ``settle()`` (before a crop) rebuilds the index
from the host tier, and ``wait()`` (before every search) does the same and raises ``IndexSyncError`` naming the
layer (an interrupt is not reported again: it already was). The rebuild follows the adds that went in: ivf, ivf-sq8
and ivf-pq are built on the sizes they were built on before and lsh centred on its first add's mean, so later steps
equal those of a cache whose add never failed (unless an add that failed, or was skipped while the index was broken,
would have built it: the rebuild adds the keys since the last build in the pieces decode steps would); ivf-group
(its tail list filled as decode steps fill it) and hnsw (another graph) come out close, not equal. A write that did
not finish (an interrupt between a tier write and its add) leaves its ``begin_write`` mark: the next ``settle``
compares the index's token counts with the tier's and heals a gap the same way. An add queued before a ``reset``
neither adds to nor reports against the cache that follows. The tokens themselves are never lost.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Deque, List, Optional

import numpy as np

from .errors import ClosedError, IndexSyncError
from .timing import Span


class IndexQueue:
    def __init__(self, layer_idx: int, retriever_name: str, indexer=None):
        self.layer_idx, self.retriever_name, self.indexer = layer_idx, retriever_name, indexer
        self.retriever = None
        self.host = None
        self._pending: List[Future] = []
        self._failure: Optional[BaseException] = None
        self._reported = True  # whether the recorded failure needs no report at the next wait (interrupts)
        self._report: Optional[BaseException] = None  # a healed failure not yet reported
        self._epoch = 0  # advanced by cancel() (a reset): adds queued before it belong to a cache that is gone
        self._writing = False  # between begin_write and end_write: the tier may hold tokens not yet handed here
        # "index_add" spans of recent adds (thread and times; the profiler's trace), at most 256 kept
        self.spans: Deque[Span] = deque(maxlen=256)

    def bind(self, retriever, host) -> None:
        self.retriever, self.host = retriever, host

    def check_open(self) -> None:
        """Refuse, before the caller changes anything, when the background indexer was closed."""
        if self.indexer is not None and self.indexer.closed:
            raise ClosedError(f"layer {self.layer_idx}: the indexer thread it was given was closed "
                              "(HeteroCache.close(), or its Worker's close()); "
                              "build a new cache to continue")

    @property
    def idle(self) -> bool:
        """Nothing queued, failed or unreported, and no write left unfinished: the index holds every host token, and
        a native add may go next."""
        return not self._writing and self._quiet()

    def begin_write(self) -> None:
        """The caller (holding the layer's lock) is about to write the tier and hand this queue the adds."""
        self._writing = True

    def end_write(self) -> None:
        """Every add of the write was handed here (a write cut short keeps the mark, for ``settle`` to check)."""
        self._writing = False

    def _quiet(self) -> bool:
        """Nothing queued, failed or unreported (finished adds collected)."""
        if self._failure is not None or self._report is not None:
            return False
        if self._pending and all(f.done() for f in self._pending):
            self._collect()
        return not self._pending

    def _gap(self) -> Optional[str]:
        """The sequences whose index holds another count of tokens than the host tier, or None (~1 us)."""
        if self.retriever is None or self.host is None:
            return None
        have, want = self.retriever.ntotal_array[:self.host.batch], self.host.length
        if np.array_equal(have, want):
            return None
        bad = np.flatnonzero(have != want)
        return (f"sequences {bad.tolist()} have {have[bad].tolist()} tokens indexed and {want[bad].tolist()} in the "
                "host tier")

    @property
    def broken(self) -> bool:
        return self._failure is not None

    def add(self, seq: int, first: int, n: int) -> None:
        """Index host positions ``[first, first + n)`` of ``seq`` (already stored in the tier)."""
        if n <= 0:
            return
        # (an append adds its sequences one after another: the tier holds the later ones' tokens already)
        if self.indexer is not None and not (self._quiet() and self.retriever.cheap_add(seq, n)):
            self._pending.append(self.indexer.submit(self._run, seq, first, n, epoch=self._epoch))
        else:  # no indexer, or an O(1) add with nothing queued ahead of it
            self._run(seq, first, n, inline=True, epoch=self._epoch)

    def _run(self, seq: int, first: int, n: int, inline: bool = False, epoch: int = 0) -> None:
        start = time.perf_counter()
        retriever, host = self.retriever, self.host
        try:
            if self._failure is not None or epoch != self._epoch:
                return  # a broken index is rebuilt from the tier at the next wait(); a reset cache has no such tokens
            have = int(retriever.ntotal_array[seq])
            if have != first:
                raise IndexSyncError(f"layer {self.layer_idx}: sequence {seq} has {have} tokens indexed, the next "
                                     f"add starts at host position {first}")
            retriever.add(seq, host.keys(seq, first, first + n))
        except Exception as e:
            if epoch == self._epoch:
                self._failure, self._reported = e, False
            if not inline:
                raise  # the future carries it too
        except BaseException as e:  # an interrupt: the index is healed at the next wait, the interrupt goes on
            if epoch == self._epoch:
                self._failure, self._reported = e, True
            raise
        finally:
            self.spans.append(Span("index_add", start, time.perf_counter(), threading.current_thread().name))

    def record_failure(self, e: BaseException) -> None:
        """An index operation outside ``add`` failed (a crop's ``truncate``): heal and report it like a failed add.
        The first failure is the one reported."""
        if self._failure is None:
            self._failure, self._reported = e, not isinstance(e, Exception)

    def _collect(self) -> None:
        pending, self._pending = self._pending, []
        for fut in pending:
            try:
                fut.result()
            except BaseException as e:  # keep draining: later adds may have queued behind the failed one
                if self._failure is None:
                    self._failure, self._reported = e, not isinstance(e, Exception)

    def settle(self) -> None:
        """Block until every host token has reached the retriever, and heal a failed add (rebuild from the tier);
        its report waits for the next ``wait``. Raises ``IndexSyncError`` only when the rebuild itself fails."""
        self._collect()
        if self._failure is None:
            gap = self._gap() if self._writing else None
            self._writing = False
            if gap is None:
                return
            self._failure, self._reported = IndexSyncError(
                f"layer {self.layer_idx}: the index fell out of step with the host tier ({gap}), as an interrupt "
                "between a tier write and its add leaves it"), False
        failure, reported = self._failure, self._reported
        self.resync()
        if not reported and self._report is None:
            self._report = failure

    def wait(self) -> None:
        """``settle``, then report a healed failure once: ``IndexSyncError`` naming the layer and the cause (an
        interrupt is not reported again: it already was)."""
        self.settle()
        failure, self._report = self._report, None
        if failure is not None:
            raise IndexSyncError(f"layer {self.layer_idx}: adding evicted tokens to the {self.retriever_name!r} index "
                                 f"failed ({type(failure).__name__}: {failure}); the index was rebuilt from the host "
                                 "tier") from failure

    def resync(self) -> None:
        """Rebuild the retriever from the host tier, every sequence as its adds left it (``Retriever.rebuild``). While
        a rebuild fails the index stays marked broken, and the next ``wait`` tries again."""
        try:
            for seq in range(self.host.batch):
                self.retriever.rebuild(seq, int(self.host.length[seq]))
        except BaseException as e:
            self._failure, self._reported = e, False
            raise IndexSyncError(f"layer {self.layer_idx}: rebuilding the {self.retriever_name!r} index from the "
                                 f"host tier failed ({type(e).__name__}: {e})") from e
        self._failure = None

    def cancel(self) -> None:
        """Drop queued adds (``reset``); one already running finishes on the old tier and reports nothing here."""
        self._epoch += 1
        for fut in self._pending:
            fut.cancel()
        self._pending = []
        self._failure = self._report = None
        self._writing = False
        self.retriever = self.host = None  # until the next bind()
