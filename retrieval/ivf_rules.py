"""The life cycle every IVF retriever follows (faiss's ``ivf`` family and ``ivf-group``), written once.

* Training: a sequence's index is built on the first add that brings at least ``min_train`` keys; until then
  searches scan every key exactly (and say so in ``last_scanned``).
* Lists: ``nlist`` = the power of two nearest ``6 sqrt(N)`` of the training set, within [16, 1024] (an option
  overrides it).
* Retraining: when a sequence holds more than ``retrain_factor`` (4) times the keys its index was built on, the
  index is rebuilt from the host tier at that add.
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
    """Mixin over ``self.opts`` (the ``IVF_OPTIONS``) and ``self.ntotal_array``: when to build, how many lists,
    how many to probe. ``trained_on[seq]`` is the size a sequence's index was built on (0: not built)."""

    opts: Dict
    ntotal_array: np.ndarray
    limit_array: np.ndarray

    def init_lifecycle(self, batch: int) -> None:
        self.probe_factor = float(self.opts["probe_factor"])
        self.min_train, self.retrain_factor = self.opts["min_train"], self.opts["retrain_factor"]
        self.nlist_option: Optional[int] = self.opts["nlist"]
        self.trained_on = [0] * batch
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
        self.limit_array[seq] = self.min_train - 1 if not n else int(math.floor(self.retrain_factor * n + 1e-9))

    def nprobe(self, ks: List[int], nlist: int, n: int) -> List[int]:
        """Lists each query of head h probes: ``ceil(nlist * min(1, probe_factor * sqrt(k / N)))``, 0 if k = 0, all
        of them if k >= N (a budget covering the host tier selects all of it, whatever ``probe_factor``)."""
        return [0 if k == 0 or n == 0 else nlist if k >= n else
                max(1, min(nlist, math.ceil(nlist * min(1.0, self.probe_factor * math.sqrt(k / n))))) for k in ks]
