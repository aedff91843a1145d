"""Numba kernels of the LSH sampler (``retrieval/lsh.py``), imported on the sampler's first use so that
importing hetero, or building a config that names ``lsh``, does not import numba."""
from hetero.numba_setup import prefer_wide_vectors

prefer_wide_vectors()  # before numba's first import (see hetero/numba_setup.py)

from numba import njit  # noqa: E402


@njit(cache=True)
def insert(codes, first_id, heads, nxt):
    """Push keys ``first_id + i`` (codes ``[n, L]``) onto their buckets' lists."""
    n, tables = codes.shape
    for i in range(n):
        key = first_id + i
        for t in range(tables):
            b = codes[i, t]
            nxt[t, key] = heads[t, b]
            heads[t, b] = key


@njit(cache=True)
def collide(qcodes, heads, nxt, min_collisions, counts, out, lens):
    """For each query (codes ``[G, L]``): keys sharing a bucket in >= min_collisions tables -> ``out[g, :lens[g]]``.
    ``counts`` must be zero on entry and is zero again on return."""
    g_size, tables = qcodes.shape
    for g in range(g_size):
        m = 0
        for t in range(tables):
            key = heads[t, qcodes[g, t]]
            while key >= 0:
                counts[key] += 1
                if counts[key] == min_collisions:
                    out[g, m] = key
                    m += 1
                key = nxt[t, key]
        lens[g] = m
        for t in range(tables):  # reset only what was touched
            key = heads[t, qcodes[g, t]]
            while key >= 0:
                counts[key] = 0
                key = nxt[t, key]
