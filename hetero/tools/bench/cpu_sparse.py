"""Host sparse-attention kernels against the memory wall.

Workload: one sequence, 8 KV heads x 4 query heads, head_dim 128, a host tier of 128K tokens per
head, k selected rows per KV head (fresh random, sorted indices every iteration: retrievers return sorted
rows), several layers' tiers rotated so that the footprint is >= 4x the last-level cache and rows come from
DRAM. ``gbps`` counts the bytes of the selected K and V rows; ``membw_gbps`` is a streaming read measured
in the same run with the same threads; ``random_read_gbps`` is the ceiling for this access pattern: a
bare C++ loop reading the same rows of the same pools (each token's fused K|V run) with the same threads,
nothing computed, timed in the same interleaved rounds as the kernels (best of its prefetch forms); ``speedup_vs_torch`` is the torch reference's median time over the backend's, same
inputs. One JSON object per line.
"""
from __future__ import annotations

import functools
import json
import math
import statistics
import sys
import time
from typing import List, Optional

import torch

from hetero.backends import AttentionInputs, BackendSet
from hetero.config import KV_DTYPES
from hetero.memory import empty_host
from hetero.tiers import HostTier
from hetero.types import Selection

from hetero.tools.membw import last_level_cache_bytes, streaming_read_gbps
from hetero.tools.argtypes import OneLineParser, list_of, names_from, nonneg_int, positive_int

_BACKENDS = BackendSet()


def _inputs(q: torch.Tensor, view) -> AttentionInputs:
    return AttentionInputs(torch.device("cpu"), view.k_pool.dtype, q.shape[2], q.shape[1], view.k_pool.shape[0],
                           q.shape[0])


def _make_layers(n_layers: int, hkv: int, tokens: int, d: int, dtype: torch.dtype, block_tokens: int):
    """Host tiers exactly as hetero stores them (fused K|V rows, paged, huge-page advised)."""
    views = []
    for _ in range(n_layers):
        tier = HostTier(1, hkv, d, dtype, block_tokens)
        tier.reserve(0, tokens)
        step = 16384
        for start in range(0, tokens, step):
            n = min(step, tokens - start)
            tier.append(0, torch.randn(hkv, n, d).to(dtype), torch.randn(hkv, n, d).to(dtype))
        views.append(tier.view())
    return views


def _index_sets(count: int, hkv: int, tokens: int, k: int, gen: torch.Generator) -> List[torch.Tensor]:
    sets = []
    for _ in range(count):
        idx = torch.stack([torch.randperm(tokens, generator=gen)[:k] for _ in range(hkv)])
        sets.append(idx.sort(dim=-1).values.to(torch.int32).unsqueeze(0))
    return sets


_READ_FORMS = [(0, False), (8, False), (32, False), (64, True), (128, True)]


def _read_offsets(view, sel: Selection):
    """Byte offsets of the selected fused K|V runs of one sequence (int64 [Hkv * k]) and the run length."""
    idx = sel.indices[0].long()  # [Hkv, k] positions
    kp = view.k_pool
    elem = kp.element_size()
    heads = torch.arange(idx.shape[0]).unsqueeze(1)
    offsets = ((heads * kp.stride(0) + view.rows(idx.unsqueeze(0))[0] * kp.stride(1)) * elem).flatten()
    return offsets.contiguous(), 2 * kp.shape[2] * elem  # K row and V row are adjacent in the fused pool


class _ReadRuns:
    """The ceiling loop as a timed entry: reads exactly the selected runs, prefetching ``prefetch`` runs ahead
    into L1 (or L2 with ``to_l2``), nothing computed. Offsets are computed before the timed call."""

    def __init__(self, runner, prefetch: int, to_l2: bool) -> None:
        self.runner, self.prefetch, self.to_l2 = runner, prefetch, to_l2
        self.name = f"read prefetch{'t2' if to_l2 else 't0'} {prefetch}"

    def prepare(self, q, view, sel, scale):
        offsets, run = _read_offsets(view, sel)
        base = view.k_pool.data_ptr()
        return lambda: self.runner.random_read(base, offsets.data_ptr(), offsets.numel(), run, self.prefetch,
                                               self.to_l2)


class _Kernel:
    """A host backend as a timed entry."""

    def __init__(self, backend) -> None:
        self.backend, self.name = backend, backend.name

    def prepare(self, q, view, sel, scale):
        return lambda: self.backend(q, view, sel, scale)


def _ceiling_entries(threads: int) -> List[_ReadRuns]:
    """The ceiling loop in each prefetch form (needs the C++ module; none without it): into L1 0 / 8 / 32 runs
    ahead, into L2 64 / 128 runs ahead (the kernel's own form, the faster of the two on the CPUs measured: docs/performance.md)."""
    from hetero import native

    runner = native.new_runner(min(native.usable_cores(), threads))
    if runner is None:
        return []
    return [_ReadRuns(runner, pf, l2) for pf, l2 in _READ_FORMS]


_ROUNDS, _WARMUP = 3, 3


def _calls_per_entry(runs: int, rounds: int = _ROUNDS, warmup: int = _WARMUP) -> int:
    """Calls _time_rounds makes of each entry (timed and warm-up) for ``runs`` timed ones."""
    return rounds * (max(1, -(-runs // rounds)) + warmup)


def _time_rounds(prepares, runs: int, rounds: int = _ROUNDS, warmup: int = _WARMUP) -> List[float]:
    """Median seconds per entry over ``runs`` calls; ``prepares[j](i)`` returns entry j's call number i (i counts
    every call of every entry, so each call can get fresh inputs). Entries alternate in blocks over ``rounds``
    rounds, so a noisy shared machine slows them alike (a ceiling measured apart from the kernels can differ from
    theirs by a quarter); the first ``warmup`` calls of every block are not timed (compilation, page faults, threads
    of the previous entry, and the cache and TLB state the previous entry left, which slows the first calls of the
    next). Only the call is timed, not the preparation of its arguments."""
    times = [[] for _ in prepares]
    per_block = max(1, -(-runs // rounds))
    i = 0
    for _ in range(rounds):
        for j, prepare in enumerate(prepares):
            for call in range(per_block + warmup):
                fn = prepare(i)
                i += 1
                t = time.perf_counter()
                fn()
                if call >= warmup:
                    times[j].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def _time_interleaved(entries, q, views, index_sets, scale, runs: int) -> List[float]:
    """_time_rounds over kernels or forms of the ceiling loop, call i on tier i and index set i (rotating)."""
    def prepare(entry):
        return lambda i: entry.prepare(q, views[i % len(views)], Selection(index_sets[i % len(index_sets)]), scale)

    return _time_rounds([prepare(e) for e in entries], runs)


def run(backends: List[str], dtypes: List[str], ks: List[int], threads: int, tokens: int = 131072,
        kv_heads: int = 8, group: int = 4, head_dim: int = 128, runs: int = 21, block_tokens: int = 256,
        seed: int = 0, out=sys.stdout, layers: int = 0,
        membw_bytes: int = 1 << 30) -> List[dict]:
    """One JSON row per (dtype, k, backend). ``layers=0``: as many host tiers as make the footprint >= 4x
    the last-level cache."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    llc = last_level_cache_bytes()
    rows = []
    membw = streaming_read_gbps(threads, membw_bytes)
    for dtype_name in dtypes:
        dtype = KV_DTYPES[dtype_name]
        layer_bytes = 2 * kv_heads * tokens * head_dim * dtype.itemsize
        n_layers = layers or max(2, math.ceil(4 * llc / layer_bytes))
        views = _make_layers(n_layers, kv_heads, tokens, head_dim, dtype, block_tokens)
        q = torch.randn(1, kv_heads * group, head_dim, generator=gen)
        scale = 1 / math.sqrt(head_dim)
        for k in ks:
            usable, skipped = [], []
            for name in dict.fromkeys(["torch"] + backends):  # torch first: the reference, always timed
                be = _BACKENDS.get("host", name)
                reasons = be.not_supported_reasons(_inputs(q, views[0]))
                if reasons:
                    skipped.append({"backend": name, "dtype": dtype_name, "k": k, "skipped": "; ".join(reasons)})
                else:
                    be.set_threads(threads)
                    usable.append(be)
            reads = _ceiling_entries(threads)
            reference, fast = usable[0], usable[1:]  # torch; the kernels under test, interleaved with the reads
            entries = [_Kernel(be) for be in fast] + reads
            # a fresh index set for every call of every entry: no rows left in a cache by an earlier call
            per_entry = _calls_per_entry(runs)
            index_sets = _index_sets(per_entry * (len(entries) + 1) + 1, kv_heads, tokens, k, gen)
            medians = _time_interleaved(entries, q, views, index_sets, scale, runs)
            # the torch reference (10-20 ms a call on all threads, large temporaries) is timed on its own, after
            # the interleave: inside it, the entry after it ran its first four or five calls up to 4x slower, and
            # always the same entry, so that kernel alone paid for it and the reads never did
            t_torch = _time_interleaved([_Kernel(reference)], q, views, index_sets[per_entry * len(entries):],
                                        scale, runs)[0]
            medians = [t_torch] + medians
            sel_bytes = 2 * kv_heads * k * head_dim * views[0].k_pool.element_size()
            ceiling = sel_bytes / min(medians[len(usable):]) / 1e9 if reads else None
            for be, t in zip(usable, medians[:len(usable)]):
                if be.name not in backends:
                    continue
                gbps = sel_bytes / t / 1e9
                row = {
                    "backend": be.name, "dtype": dtype_name, "k": k, "threads": threads,
                    "median_us": round(t * 1e6, 1), "gbps": round(gbps, 4), "membw_gbps": round(membw, 2),
                    "ratio_to_membw": round(gbps / membw, 3),
                    "random_read_gbps": round(ceiling, 2) if ceiling else None,
                    "ratio_to_random_read": round(gbps / ceiling, 3) if ceiling else None,
                    "speedup_vs_torch": round(t_torch / t, 2), "torch_us": round(t_torch * 1e6, 1),
                    "footprint_gb": round(n_layers * layer_bytes / 1e9, 2), "llc_mb": round(llc / 2**20),
                    "runs": runs, "isa": _isa(be.name),
                }
                rows.append(row)
                print(json.dumps(row), file=out, flush=True)
            for row in skipped:
                rows.append(row)
                print(json.dumps(row), file=out, flush=True)
        del views
    return rows


def row_costs(backends: List[str], dtypes: List[str], k: int = 2048, tokens: int = 131072, kv_heads: int = 8,
              group: int = 4, head_dim: int = 128, calls: int = 60, seed: int = 0, layers: int = 0,
              out=sys.stdout) -> List[dict]:
    """Nanoseconds per selected row on one thread, two cases per (backend, dtype): ``l1`` reads the same 64 rows
    over and over (the kernel's arithmetic alone), ``dram`` fresh random rows of tiers rotated beyond the LLC
    (arithmetic plus misses); and ``read_only``, the ceiling loop over fresh rows of the same tiers (the best of its
    prefetch forms). All of them are timed in the same interleaved rounds (``_time_rounds``): measured apart, the
    read-only loop moved by up to 2x between runs while the kernels did not. ``dram`` near ``read_only`` means the
    arithmetic hides behind the misses, near ``l1 + read_only`` that it does not (docs/performance.md)."""
    from hetero.native import load

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(seed)
    llc = last_level_cache_bytes()
    ext = load()
    rows = []
    for dtype_name in dtypes:
        dtype = KV_DTYPES[dtype_name]
        layer_bytes = 2 * kv_heads * tokens * head_dim * dtype.itemsize
        views = _make_layers(layers or max(2, math.ceil(4 * llc / layer_bytes)), kv_heads, tokens, head_dim, dtype,
                             256)
        q = torch.randn(1, kv_heads * group, head_dim, generator=gen)
        scale = 1 / math.sqrt(head_dim)
        kernels = []
        for name in backends:
            be = _BACKENDS.get("host", name)
            if not be.not_supported_reasons(_inputs(q, views[0])):
                be.set_threads(1)
                kernels.append(be)
        reads = [_ReadRuns(ext.Runner(1), pf, l2) for pf, l2 in _READ_FORMS] if ext is not None else []
        n_entries = 2 * len(kernels) + len(reads)
        fresh = _index_sets(_calls_per_entry(calls) * n_entries + 1, kv_heads, tokens, k, gen)
        same = Selection(fresh[0][..., :64].repeat(1, 1, -(-k // 64))[..., :k].contiguous())

        def in_l1(entry):
            return lambda i: entry.prepare(q, views[0], same, scale)

        def from_dram(entry):
            return lambda i: entry.prepare(q, views[i % len(views)], Selection(fresh[i % len(fresh)]), scale)

        prepares = [f(_Kernel(be)) for be in kernels for f in (in_l1, from_dram)] + [from_dram(r) for r in reads]
        times = _time_rounds(prepares, calls) if prepares else []
        per_row = [round(t / (kv_heads * k) * 1e9, 1) for t in times]
        read_ns = min(per_row[2 * len(kernels):]) if reads else None
        for j, be in enumerate(kernels):
            row = {"backend": be.name, "dtype": dtype_name, "k": k, "threads": 1, "ns_per_row_read_only": read_ns,
                   "ns_per_row_l1": per_row[2 * j], "ns_per_row_dram": per_row[2 * j + 1]}
            rows.append(row)
            print(json.dumps(row), file=out, flush=True)
        del views
    return rows


def window_line(threads: int, rows: int = 4096, kv_heads: int = 8, group: int = 4, head_dim: int = 128,
                dtype_name: str = "bfloat16", runs: int = 21, membw_bytes: int = 1 << 30, seed: int = 0,
                out=sys.stdout) -> List[dict]:
    """The fast tier's window kernel on the CPU (``cpp``): attention of one sequence's G x Hkv queries over ``rows``
    contiguous rows per KV head, in buffers allocated as the fast tier allocates its own (``hetero.memory``: advised
    for huge pages). Windows are rotated over >= 4x the LLC, so each call reads its rows from DRAM, as a decode step
    does after the rest of the model has run. ``gbps`` counts the window's K and V bytes.

    Two references from the same run: ``membw_gbps``, a long streaming read (``membw_bytes``, measured first), and
    ``window_read_gbps``, a streaming read (``torch.sum`` on the same threads) of the same window buffers, timed in
    rounds alternating with the kernel, so that a noisy machine slows both alike. The second is what the kernel's
    bytes can cost at best: 2 x Hkv separate runs of ``rows`` rows per call, each a new stream.

    One row per query kind, timed in the same rounds: ``query`` ``"bfloat16"`` holds values of the KV dtype, as a
    model in that dtype computes them (the kernel's bf16 dot products take them as they are), ``"float32"`` any
    float32 values (the kernel widens the keys instead)."""
    dtype = KV_DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(seed)
    window_bytes = 2 * kv_heads * rows * head_dim * dtype.itemsize
    count = max(2, math.ceil(4 * last_level_cache_bytes() / window_bytes))

    def window_buffer():
        return empty_host((1, kv_heads, rows, head_dim), dtype).copy_(torch.randn(1, kv_heads, rows, head_dim,
                                                                                   generator=gen))

    kvs = [(window_buffer(), window_buffer()) for _ in range(count)]
    q32 = torch.randn(1, kv_heads * group, head_dim, generator=gen)
    queries = {dtype_name: q32.to(dtype).float(), "float32": q32}
    lengths = torch.tensor([rows], dtype=torch.int32)
    backend = _BACKENDS.get("window", "cpp")
    backend.set_threads(threads)
    torch.set_num_threads(threads)
    membw = streaming_read_gbps(threads, membw_bytes)
    scale = 1 / math.sqrt(head_dim)
    # whole 32-bit words where the rows allow it (torch's sum of 16-bit integers does not vectorize)
    words = (lambda t: t.view(torch.float32)) if (head_dim * dtype.itemsize) % 4 == 0 else (lambda t: t)
    kernel = lambda q: lambda i: functools.partial(backend, q, *kvs[i % count], lengths, scale)  # noqa: E731
    read = lambda i: lambda: [words(x).sum() for x in kvs[i % count]]  # noqa: E731
    *times, t_read = _time_rounds([kernel(q) for q in queries.values()] + [read], runs)
    read_gbps = window_bytes / t_read / 1e9
    rows_out = []
    for query, t in zip(queries, times):
        gbps = window_bytes / t / 1e9
        row = {"kernel": "window", "backend": "cpp", "dtype": dtype_name, "query": query, "rows": rows,
               "kv_heads": kv_heads, "group": group, "head_dim": head_dim, "threads": threads,
               "median_us": round(t * 1e6, 1), "gbps": round(gbps, 4), "membw_gbps": round(membw, 2),
               "ratio_to_membw": round(gbps / membw, 3), "window_read_gbps": round(read_gbps, 2),
               "ratio_to_window_read": round(gbps / read_gbps, 3), "isa": _isa("cpp")}
        print(json.dumps(row), file=out, flush=True)
        rows_out.append(row)
    return rows_out


def _isa(backend: str) -> Optional[str]:
    if backend != "cpp":
        return None
    from hetero.native import info

    return info().get("isa")


HOST_DTYPES = ["bfloat16", "float32"]  # --dtypes' default, but for --window (bfloat16)


def main(argv: Optional[List[str]] = None) -> int:
    from hetero.registry import HOST_BACKENDS

    p = OneLineParser(prog="hetero bench cpu-sparse", description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default=",".join(HOST_BACKENDS.names()))
    p.add_argument("--dtypes", type=names_from(list(KV_DTYPES)), default=None,
                   help=f"KV dtypes (default {','.join(HOST_DTYPES)}; --window: bfloat16)")
    p.add_argument("--k", type=list_of(positive_int), default=None,
                   help="selected rows per KV head (default 512,2048,8192; --row-cost: 2048)")
    p.add_argument("--threads", type=positive_int, default=None, help="threads (default: all cores)")
    p.add_argument("--tokens", type=positive_int, default=131072)
    p.add_argument("--runs", type=positive_int, default=21)
    p.add_argument("--layers", type=nonneg_int, default=0, help="host tiers rotated (0: footprint >= 4x LLC)")
    p.add_argument("--membw-mb", type=positive_int, default=1024, help="buffer of the streaming-read measurement")
    p.add_argument("--row-cost", action="store_true",
                   help="instead: ns per selected row on one thread, rows in L1 vs from DRAM (first k only)")
    p.add_argument("--window", type=positive_int, default=None, metavar="ROWS",
                   help="instead: the CPU window kernel over ROWS contiguous rows x --kv-heads x --head-dim, "
                        "--group queries per KV head, against a long streaming read and a streaming read of the same "
                        "window buffers, same run")
    p.add_argument("--kv-heads", type=positive_int, default=8, help="--window: KV heads (8)")
    p.add_argument("--group", type=positive_int, default=4, help="--window: query heads per KV head (4)")
    p.add_argument("--head-dim", type=positive_int, default=128, help="--window: head_dim (128)")
    ns = p.parse_args(argv)
    from hetero.config import HeteroConfig

    over = [k for k in (ns.k or []) if k > ns.tokens]
    if over:  # each KV head selects k distinct rows of the tier
        p.error(f"--k {','.join(map(str, over))}: more rows than --tokens {ns.tokens} holds per KV head")
    if ns.row_cost:
        row_costs([b for b in ns.backends.split(",") if b and b != "torch"], ns.dtypes or HOST_DTYPES,
                  ns.k[0] if ns.k else 2048, ns.tokens, calls=ns.runs, layers=ns.layers)
        return 0

    threads = ns.threads or HeteroConfig().resolved_threads
    if ns.window is not None:
        for dtype_name in ns.dtypes or ["bfloat16"]:
            window_line(threads, ns.window, ns.kv_heads, ns.group, ns.head_dim, dtype_name, runs=ns.runs,
                        membw_bytes=ns.membw_mb << 20)
        return 0
    run([b for b in ns.backends.split(",") if b], ns.dtypes or HOST_DTYPES, ns.k or [512, 2048, 8192],
        threads, tokens=ns.tokens, runs=ns.runs, layers=ns.layers, membw_bytes=ns.membw_mb << 20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
