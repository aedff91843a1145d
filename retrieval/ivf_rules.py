"""The life cycle every IVF retriever follows (faiss's ``ivf`` family and ``ivf-group``), written once.

* Training: a sequence's index is built on the first add that brings at least ``min_train`` keys; until then
  searches scan every key exactly (and say so in ``last_scanned``).
* Lists: ``nlist`` = the power of two nearest ``6 sqrt(N)`` of the training set, within [16, 1024] (an option
  overrides it).
* Retraining: when a sequence holds more than ``retrain_factor`` (4) times the keys its index was built on, the
  index is rebuilt from the host tier at that add.
* Cropping below the last build (its keys were partly the dropped ones: rejected draft tokens): the index is
  rebuilt as it stood after the kept keys, on the build before that, or none (``rebuild_before``).
* Budget -> search effort: each query probes ``nprobe = ceil(nlist * min(1, probe_factor * sqrt(k / N)))`` lists
  (``probe_factor`` 1: a 1 / 2 / 5 % budget scans about 10 / 14 / 22 % of the keys); the C++ decode step applies
  the same rule (csrc/runner/runner.cpp).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np

from .base import Option

IVF_OPTIONS: Dict[str, Option] = {
    "probe_factor": Option(1.0, low=0.0, low_open=True),
    "min_train": Option(256, kind="int", low=1),
    "retrain_factor": Option(4.0, low=1.0, low_open=True),
    "nlist": Option(None, kind="int", low=1, none_ok=True),
}


def nearest_pow2(x: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, 2 ** round(math.log2(max(x, 1.0))))))


class IVFLifecycle:
    """Mixin over a ``Retriever``'s ``self.opts`` (the ``IVF_OPTIONS``), ``ntotal_array``, ``add``, ``_reset_seq``
    and ``host``: when to build, how many lists, how many to probe. ``trained_on[seq]`` is the size a sequence's
    index was built on (0: not built); ``builds[seq]`` every build's size since the index was last dropped."""

    opts: Dict
    ntotal_array: np.ndarray
    limit_array: np.ndarray

    def init_lifecycle(self, batch: int) -> None:
        self.probe_factor = float(self.opts["probe_factor"])
        self.min_train, self.retrain_factor = self.opts["min_train"], self.opts["retrain_factor"]
        self.nlist_option: Optional[int] = self.opts["nlist"]
        self.trained_on = [0] * batch
        self.builds: List[List[int]] = [[] for _ in range(batch)]
        for seq in range(batch):
            self.set_trained(seq, 0)

    def nlist_for(self, n_train: int) -> int:
        return min(self.nlist_option or nearest_pow2(6 * math.sqrt(n_train), 16, 1024), n_train)

    def build_due(self, seq: int, new_total: int) -> bool:
        """Whether the add that brings ``seq`` to ``new_total`` keys (re)builds its index."""
        built = self.trained_on[seq]
        return (not built and new_total >= self.min_train) or (built and new_total > self.retrain_factor * built)

    def set_trained(self, seq: int, n: int) -> None:
        """Record a (re)build on ``n`` keys (0: not built) and the largest count the next adds may reach before
        one is due again (what the native append may do without Python)."""
        self.trained_on[seq] = n
        if n:
            self.builds[seq].append(n)
        else:
            self.builds[seq] = []
        self.limit_array[seq] = self.min_train - 1 if not n else int(math.floor(self.retrain_factor * n + 1e-9))

    def rebuild_before(self, seq: int, n: int) -> bool:
        """``truncate`` to ``n`` keys when that drops keys the last build was made on: the index rebuilt as it stood
        after ``n`` keys, on the same keys as then (the latest earlier build of at most ``n``, or none: below it the
        keys are searched exactly), then the rest of the ``n`` added. False, nothing done, when the last build's keys
        are all kept (the newest keys are then removed in place)."""
        if not self.trained_on[seq] or n >= self.trained_on[seq]:
            return False
        self.rebuild(seq, n)
        return True

    def rebuild(self, seq: int, n: int) -> None:
        """The index of ``seq``'s first ``n`` host keys, rebuilt as its adds left it: on the latest recorded build of
        at most ``n`` keys (none: below it the keys are searched exactly), then the rest added in the pieces decode
        steps would make (``add_since_build``). ``rebuild_before`` and a healed failed add (``IndexQueue.resync``)."""
        history = list(self.builds[seq])
        earlier = [size for size in history if size <= n]
        start = earlier[-1] if earlier else 0
        self._reset_seq(seq)
        self.ntotal_array[seq] = 0
        try:
            if start:
                self.add(seq, self.host.keys(seq, 0, start))  # builds on exactly these keys (a build had >= min_train)
                self.add_since_build(seq, start, n)
            elif n:
                self.add(seq, self.host.keys(seq, 0, n))
        except BaseException:  # the history stays for the next try (a failed rebuild is tried again)
            self.builds[seq] = history
            raise
        self.builds[seq] = earlier[:-1] + self.builds[seq]

    def add_since_build(self, seq: int, first: int, stop: int) -> None:
        """``rebuild_before``'s adds of host positions ``[first, stop)`` after the build on ``first`` keys, in the
        pieces decode steps adding one key at a time would leave the same index with (``next_cut``)."""
        cut = first
        while cut < stop:
            end = min(stop, self.next_cut(seq, cut))
            self.add(seq, self.host.keys(seq, cut, end))
            cut = end

    def next_cut(self, seq: int, cut: int) -> int:
        """The host count after ``cut`` at which decode steps would next change the index's make-up: the first past
        the retrain limit (that add rebuilds). Indexes whose lists depend only on the keys in them need no other."""
        return int(self.limit_array[seq]) + 1

    def nprobe(self, ks: List[int], nlist: int, n: int) -> List[int]:
        """Lists each query of head h probes: ``ceil(nlist * min(1, probe_factor * sqrt(k / N)))``, 0 if k = 0, all
        of them if k >= N (a budget covering the host tier selects all of it, whatever ``probe_factor``)."""
        return [0 if k == 0 or n == 0 else nlist if k >= n else
                max(1, min(nlist, math.ceil(nlist * min(1.0, self.probe_factor * math.sqrt(k / n))))) for k in ks]
