"""MagicPIG-style LSH sampling over the host tier (importance-corrected).

Per (sequence, KV head): L SimHash tables of K bits over *centered* keys ``k - mu`` (``mu``: mean of the
first keys added, i.e. the prefill; kept fixed afterwards). A query head samples key j when j shares its
bucket in at least 2 of the L tables. With ``theta`` the angle between q and ``k_j - mu``, one table
collides with probability ``p = (1 - theta/pi)^K`` and j is sampled with probability
``w_j = 1 - (1-p)^L - L p (1-p)^(L-1)``; the selection carries ``log_weight = -log w_j`` so that the host
part's ``exp(lse)`` is an unbiased estimate of the full host-tier sum (``out`` self-normalized).

Tables are arrays of per-bucket linked lists (``head[l, bucket]``, ``next[l, key]``): O(L) per added key,
and a query visits only its L buckets. Built and queried in Numba; hashing is one matmul per batch of keys.
The ``budget`` does not bound LSH: the sample size follows from K, L and the data (it is reported in
``last_scanned``: keys whose similarity was computed = the sampled ones).
"""
from __future__ import annotations

import importlib.util
import math
import warnings
from typing import Any

import numpy as np
import torch

from hetero.config import SEED_RANGE
from hetero.errors import ConfigError
from hetero.types import Selection

from .base import Option, Retriever, pad_rows

_warned_budget = False


class LSHSampler(Retriever):
    """SimHash sampling with importance weights (options ``K`` bits per table, ``L`` tables, ``seed``)."""

    name = "lsh"
    value_limit = 1e15  # projections and norms in float32

    options = {
        "K": Option(9, kind="int", low=1, high=20),
        "L": Option(120, kind="int", low=1),
        "seed": Option(0, kind="int", low=SEED_RANGE[0], high=SEED_RANGE[1]),
        "min_collisions": Option(2, kind="int", low=1),
    }

    @classmethod
    def check_options(cls, options):
        if importlib.util.find_spec("numba") is None:  # its collision kernels are numba's
            raise ConfigError("retriever 'lsh' needs numba, which is not installed: pip install 'hetero[numba]'")
        out = super().check_options(options)
        if out["L"] < out["min_collisions"]:  # no key could ever collide in enough tables: an empty host part
            raise ConfigError(f"retriever 'lsh' options L={out['L']}, min_collisions={out['min_collisions']}: need "
                              "L >= min_collisions")
        return out

    def __init__(self, host, group_rule: str = "union", **options: Any):
        super().__init__(host, group_rule, **options)
        global _warned_budget
        if not _warned_budget:
            warnings.warn("hetero: the 'lsh' retriever samples the keys that collide with the query in enough tables; "
                          "it ignores the budget (the share of host keys it reads is reported as rows read)",
                          stacklevel=3)
            _warned_budget = True
        self.K, self.L, self.min_collisions = self.opts["K"], self.opts["L"], self.opts["min_collisions"]
        from . import lsh_kernels

        self._kernels = lsh_kernels
        gen = torch.Generator().manual_seed(self.opts["seed"])
        hkv, d = host.kv_heads, host.head_dim
        self.planes = torch.randn(hkv, self.L * self.K, d, generator=gen)  # per KV head
        self._pow2 = 2 ** torch.arange(self.K, dtype=torch.int32)
        self._mu = [None] * host.batch           # [Hkv, D] per sequence
        self._mu_keys = [0] * host.batch         # keys the centering mean was taken over (the first add's)
        self._heads = [None] * host.batch        # [Hkv] arrays [L, 2^K]
        self._next = [None] * host.batch         # [Hkv] arrays [L, capacity]
        self._counts = [None] * host.batch

    def _codes(self, x: torch.Tensor, h: int) -> np.ndarray:
        """SimHash codes ``[n, L]`` int32 of vectors ``x [n, D]`` under KV head h's planes."""
        bits = (x.float() @ self.planes[h].T) > 0  # [n, L*K]
        return (bits.view(-1, self.L, self.K).to(torch.int32) * self._pow2).sum(-1).to(torch.int32).numpy()

    def _add(self, seq: int, keys: torch.Tensor) -> None:
        hkv, n = self.host.kv_heads, keys.shape[1]
        if self._mu[seq] is None:
            self._mu[seq] = keys.float().mean(dim=1)
            self._mu_keys[seq] = n
            self._heads[seq] = [np.full((self.L, 2 ** self.K), -1, np.int32) for _ in range(hkv)]
            self._next[seq] = [np.full((self.L, max(1024, 2 * n)), -1, np.int32) for _ in range(hkv)]
            self._counts[seq] = np.zeros(max(1024, 2 * n), np.int32)
        first = int(self.ntotal_array[seq])
        cap = self._next[seq][0].shape[1]
        if first + n > cap:  # grow geometrically
            new_cap = max(first + n, 2 * cap)
            for h in range(hkv):
                grown = np.full((self.L, new_cap), -1, np.int32)
                grown[:, :cap] = self._next[seq][h]
                self._next[seq][h] = grown
            self._counts[seq] = np.zeros(new_cap, np.int32)
        for h in range(hkv):
            codes = self._codes(keys[h].float() - self._mu[seq][h], h)
            self._kernels.insert(codes, first, self._heads[seq][h], self._next[seq][h])

    def reset(self) -> None:
        super().reset()
        b = self.host.batch
        self._mu, self._heads, self._next, self._counts = [None] * b, [None] * b, [None] * b, [None] * b
        self._mu_keys = [0] * b

    def rebuild(self, seq: int, n: int) -> None:
        """The tables of ``seq``'s first ``n`` host keys as its adds left them (a healed failed add,
        ``IndexQueue.resync``): centred on the mean of the keys of its first add, as then (one add of all ``n`` would
        centre them on another mean), the rest added after. The tables do not depend on how the rest came."""
        first = min(n, self._mu_keys[seq]) if self._mu_keys[seq] else n  # (kept by a rebuild that failed)
        self._reset_seq(seq)
        self.ntotal_array[seq] = 0
        if first:
            self.add(seq, self.host.keys(seq, 0, first))
        if n > first:
            self.add(seq, self.host.keys(seq, first, n))

    def _reset_seq(self, seq: int) -> None:
        self._mu[seq] = self._heads[seq] = self._next[seq] = self._counts[seq] = None

    def truncate(self, seq: int, n: int) -> None:
        """Keys are pushed onto the front of their buckets' lists, so every list holds ids in decreasing order: a
        bucket forgets the ids ``>= n`` by moving its head past them; the tables are then as they were after n keys.
        A crop into the first add, whose keys the centering mean was taken over, rebuilds from the n keys instead
        (the mean of dropped keys would stay)."""
        n = min(n, int(self.ntotal_array[seq]))
        if self._heads[seq] is None or n < self._mu_keys[seq]:
            super().truncate(seq, n)
            return
        for heads, nxt in zip(self._heads[seq], self._next[seq]):
            tables = np.arange(heads.shape[0])[:, None]
            while True:
                drop = heads >= n
                if not drop.any():
                    break
                heads[drop] = nxt[np.broadcast_to(tables, heads.shape)[drop], heads[drop]]
        self.ntotal_array[seq] = n

    def collision_probability(self, cos: torch.Tensor) -> torch.Tensor:
        """``w = P(>= min_collisions of L tables collide)`` for angle ``acos(cos)``."""
        theta = torch.arccos(cos.clamp(-1.0, 1.0))
        p = (1.0 - theta / math.pi) ** self.K
        if self.min_collisions == 1:
            return 1.0 - (1.0 - p) ** self.L
        return 1.0 - (1.0 - p) ** self.L - self.L * p * (1.0 - p) ** (self.L - 1)

    def _search(self, q: torch.Tensor, ks) -> Selection:
        hkv = self.host.kv_heads
        g = q.shape[1] // hkv
        b = q.shape[0]
        rows, weights, scanned = [], [], 0
        for seq in range(b):
            n = int(self.ntotal_array[seq])
            if n == 0 or self._mu[seq] is None:
                rows.append(torch.empty(hkv, 0, dtype=torch.int32))
                weights.append(torch.empty(hkv * g, 0))
                continue
            keys = self.host.keys(seq)
            per_head_ids, per_head_lw = [], []
            for h in range(hkv):
                qg = q[seq, h * g:(h + 1) * g]  # [G, D]
                out = np.empty((g, n), np.int32)
                lens = np.zeros(g, np.int64)
                self._kernels.collide(self._codes(qg, h), self._heads[seq][h], self._next[seq][h], self.min_collisions,
                         self._counts[seq], out, lens)
                sampled = [torch.from_numpy(out[i, : lens[i]].copy()) for i in range(g)]
                union = torch.unique(torch.cat(sampled)) if sum(map(len, sampled)) else torch.empty(0, dtype=torch.int32)
                scanned += sum(map(len, sampled))
                centered = keys[h, union.long()].float() - self._mu[seq][h]  # [m, D]
                # a zero query (a zero embedding row, e.g. a pad token's) has no angle: cos 0, not 0 / 0
                norms = (qg.norm(dim=1, keepdim=True) * centered.norm(dim=1)).clamp_min(torch.finfo(torch.float32).tiny)
                cos = (qg @ centered.T) / norms
                lw = -torch.log(self.collision_probability(cos).clamp_min(1e-30))  # [G, m]
                member = torch.zeros(g, len(union), dtype=torch.bool)
                for i in range(g):  # keys another head of the group sampled are not in this head's estimate
                    member[i] = torch.isin(union, sampled[i])
                per_head_ids.append(union.to(torch.int32))
                per_head_lw.append(torch.where(member, lw, torch.full_like(lw, float("-inf"))))
            width = max(len(x) for x in per_head_ids)
            mat = torch.full((hkv, width), -1, dtype=torch.int32)
            lwm = torch.full((hkv * g, width), float("-inf"))
            for h in range(hkv):
                m = len(per_head_ids[h])
                mat[h, :m] = per_head_ids[h]
                lwm[h * g:(h + 1) * g, :m] = per_head_lw[h]
            rows.append(mat)
            weights.append(lwm)
        self.last_scanned = scanned
        idx = pad_rows(rows, hkv)
        lw = torch.full((b, hkv * g, idx.shape[2]), float("-inf"))
        for seq, w in enumerate(weights):
            lw[seq, :, : w.shape[1]] = w
        return Selection(idx, lw)

    def memory_bytes(self) -> int:
        total = 0
        for heads, nxt in zip(self._heads, self._next):
            if heads is not None:
                total += sum(x.nbytes for x in heads) + sum(x.nbytes for x in nxt)
        return total
