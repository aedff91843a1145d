"""Overlapped decode: identical results, real overlap, no token lost under delays, failures propagate."""
import math
import random
import threading
import time

import pytest
import torch

from hetero import HeteroAttention, HeteroConfig, HeteroError, LayerCache
from hetero.worker import Worker

from helpers import oracle, rel_err


def _layers(overlap, retriever="exact", n=600, seed=0, indexer=None, host_backend="auto"):
    gen = torch.Generator().manual_seed(seed)
    cfg = HeteroConfig(window=32, sinks=2, retriever=retriever, budget=0.1, overlap=overlap, host_backend=host_backend)
    layer = LayerCache(cfg, indexer=indexer)
    layer.append(torch.randn(2, 2, n, 32, generator=gen), torch.randn(2, 2, n, 32, generator=gen),
                 torch.tensor([n, n // 2]))
    return cfg, layer


@pytest.mark.parametrize("retriever", ["exact", "ivf", "ivf-group"])
def test_overlapped_step_is_bit_identical_to_sequential(retriever):
    gen = torch.Generator().manual_seed(1)
    steps = [(torch.randn(2, 2, 32, generator=gen), torch.randn(2, 2, 32, generator=gen),
              torch.randn(2, 8, 32, generator=gen)) for _ in range(12)]
    outs = {}
    for overlap in (False, True):
        cfg, layer = _layers(overlap, retriever)
        attn = HeteroAttention(cfg)
        res = []
        for k, v, q in steps:
            layer.append(k, v)
            res.append(attn.run(q, layer))
        outs[overlap] = torch.stack(res)
        attn.close()
    assert torch.equal(outs[False], outs[True])


def test_indexer_shared_with_host_worker_gives_identical_results():
    """The profiler and the HF cache queue index adds on the host side's own worker (adds ahead of searches)."""
    gen = torch.Generator().manual_seed(2)
    steps = [(torch.randn(2, 2, 32, generator=gen), torch.randn(2, 2, 32, generator=gen),
              torch.randn(2, 8, 32, generator=gen)) for _ in range(40)]
    outs = []
    for shared in (False, True):
        worker = Worker("test-shared")
        cfg, layer = _layers(True, "ivf-group", indexer=worker)
        attn = HeteroAttention(cfg, host_worker=worker if shared else None)
        outs.append(torch.stack([(layer.append(k, v), attn.run(q, layer))[1] for k, v, q in steps]))
        attn.close()
        worker.close()
        assert layer.retriever.ntotal == layer.host_lengths()
    assert torch.equal(outs[0], outs[1])


def test_phases_are_torch_profiler_ranges():
    cfg, layer = _layers(True, "ivf-group", n=3000)
    attn = HeteroAttention(cfg)
    q = torch.randn(2, 8, 32)
    attn.run(q, layer)
    from torch.profiler import _ExperimentalConfig

    with torch.profiler.profile(experimental_config=_ExperimentalConfig(profile_all_threads=True)) as prof:
        attn.run(q, layer)
    names = {e.name for e in prof.events()}
    assert {"hetero::window", "hetero::retrieve", "hetero::host_attn", "hetero::merge"} <= names
    attn.close()


def test_overlap_auto_runs_the_sides_one_after_the_other_when_the_fast_tier_is_on_the_cpu():
    """overlap="auto" (the default): side by side with a CUDA fast tier, one after the other on the caller's thread
    when the window shares the CPU with the host side; the same results as forcing either."""
    assert HeteroConfig().overlap == "auto"
    assert HeteroConfig().overlap_on(torch.device("cuda")) and not HeteroConfig().overlap_on(torch.device("cpu"))
    assert HeteroConfig(overlap=True).overlap_on(torch.device("cpu"))
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 8, 32, generator=gen)
    outs = {}
    for overlap in ("auto", False, True):
        cfg, layer = _layers(overlap, "ivf-group")
        attn = HeteroAttention(cfg)
        res = attn.run(q, layer, return_details=True)
        threads = {s.thread for s in res.spans if s.phase in ("retrieve", "host_attn")}
        assert threads == ({"hetero-host"} if overlap is True else {"MainThread"}), (overlap, threads)
        outs[overlap] = res.out
        attn.close()
    assert torch.equal(outs["auto"], outs[False]) and torch.equal(outs["auto"], outs[True])


def test_phases_of_the_two_sides_overlap_in_time():
    """The host side runs beside the window side, not after it. Each side waits inside its phase until the other
    has entered its own (so the check needs no luck with timing on loaded cores): run one after the other, the window
    side waits in vain and the test fails."""
    cfg, layer = _layers(True, "exact", n=2000)
    attn = HeteroAttention(cfg)
    q = torch.randn(2, 8, 32)
    plan = attn.plan(layer, 8)
    window_in, host_in = threading.Event(), threading.Event()

    class WindowThatWaits:
        def __init__(self, backend):
            self.backend = backend

        def __getattr__(self, name):
            return getattr(self.backend, name)

        def __call__(self, *args, **kwargs):
            window_in.set()
            assert host_in.wait(30), "the host side never started while the window side ran"
            return self.backend(*args, **kwargs)

    search = plan.search

    def search_that_waits(*args, **kwargs):
        host_in.set()
        assert window_in.wait(30), "the window side never started while the host side ran"
        return search(*args, **kwargs)

    plan.window, plan.search = WindowThatWaits(plan.window), search_that_waits
    res = attn.run(q, layer, plan, return_details=True)
    window = [s for s in res.spans if s.phase == "window"]
    host = [s for s in res.spans if s.phase in ("retrieve", "host_attn")]
    assert {s.thread for s in host} == {"hetero-host"} and window[0].thread != "hetero-host"
    assert any(w.start < h.end and h.start < w.end for w in window for h in host)


def test_eviction_under_random_indexing_delays_never_loses_or_duplicates():
    indexer = Worker("test-indexer", max_pending=8)
    cfg = HeteroConfig(window=16, sinks=2, retriever="all", overlap=True)
    layer = LayerCache(cfg, indexer=indexer)
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(2)
    layer.append(torch.randn(1, 1, 20, 8, generator=gen), torch.randn(1, 1, 20, 8, generator=gen))
    add = layer.retriever.add

    def slow_add(seq, keys):
        time.sleep(rng.random() * 0.002)
        add(seq, keys)

    layer.retriever.add = slow_add
    attn = HeteroAttention(cfg)
    for step in range(1000):
        k = torch.randn(1, 1, 8, generator=gen)
        layer.append(k, k)
        if step % 50 == 49:
            q = torch.randn(1, 2, 8, generator=gen)
            sel = attn.run(q, layer, return_details=True).selection
            n = layer.host.length[0]
            assert layer.retriever.ntotal == [n]
            assert sorted(sel.indices[0, 0].tolist()) == list(range(n))  # every host token, once
            assert rel_err(attn.run(q, layer), oracle(q, layer)) <= 1e-5
    layer.wait_indexed()
    assert layer.retriever.ntotal == layer.host_lengths() == [20 + 1000 - 18]
    attn.close()
    indexer.close()


def test_250_repeats_of_a_step_are_bit_identical():
    cfg, layer = _layers(True, "ivf", n=3000)
    attn = HeteroAttention(cfg)
    q = torch.randn(2, 8, 32)
    first = attn.run(q, layer)
    for _ in range(249):
        assert torch.equal(attn.run(q, layer), first)
    attn.close()


def test_worker_exception_propagates_with_context_and_next_step_works():
    cfg, layer = _layers(True, "exact")
    attn = HeteroAttention(cfg)
    q = torch.randn(2, 8, 32)
    good = attn.run(q, layer)
    search = layer.retriever.search
    layer.retriever.search = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(HeteroError, match="layer 0.*boom"):
        attn.run(q, layer)
    layer.retriever.search = search
    assert torch.equal(attn.run(q, layer), good)
    attn.close()


def test_failed_background_add_is_reported_and_index_rebuilt():
    indexer = Worker("test-indexer-2")
    cfg, layer = _layers(True, "ivf", indexer=indexer)  # faiss: every decode add goes through Python
    add, failed = layer.retriever.add, []

    def add_failing_once(seq, keys):  # the queued add runs on the indexer whenever it gets there: fail the first
        if not failed:
            failed.append(seq)
            raise ValueError("disk full")
        return add(seq, keys)

    layer.retriever.add = add_failing_once
    layer.append(torch.randn(2, 2, 32), torch.randn(2, 2, 32))
    attn = HeteroAttention(cfg)
    q = torch.randn(2, 8, 32)
    with pytest.raises(HeteroError, match="index failed.*disk full.*rebuilt"):
        attn.run(q, layer)
    layer.retriever.add = add
    assert failed
    assert layer.retriever.ntotal == layer.host_lengths()
    attn.close()
    indexer.close()


def test_prefill_leaves_fast_tier_at_sinks_plus_window():
    cfg, layer = _layers(True, "ivf", n=5000)
    per_token = 2 * 32 * 4 * 2
    assert layer.fast.nbytes() == 2 * (2 + 32) * per_token  # two sequences, both longer than sinks + window
    assert layer.memory()["host_bytes"] == (5000 + 2500 - 2 * 34) * per_token


def test_auto_balance_moves_budget_within_floor():
    cfg = HeteroConfig(window=8, sinks=1, retriever="exact", budget=0.2, budget_floor=0.05, balance="auto")
    layer = LayerCache(cfg)
    layer.append(torch.randn(1, 2, 4000, 32), torch.randn(1, 2, 4000, 32))
    attn = HeteroAttention(cfg)
    crit = set()
    for _ in range(12):
        res = attn.run(torch.randn(1, 4, 32), layer, return_details=True)
        crit.add(res.critical)
    bal = attn.balancer(layer)
    n = layer.host.length[0]
    k = cfg.budget_for(n, bal.budget_scale)
    assert cfg.budget_for(n, 0.0) <= k <= 2 * cfg.budget_for(n)
    assert crit <= {"host", "window"} and bal.critical in ("host", "window")
    attn.close()


@pytest.mark.parametrize("budget,floor", [(16, 8), (15, 8), (0.02, 0.01)])
def test_the_default_budget_floor_is_half_the_budget_in_its_units(budget, floor):
    """Half a count is a count: ``16 / 2`` read as a fraction made the floor the whole host tier."""
    cfg = HeteroConfig(budget=budget, balance="auto")
    assert cfg.resolved_budget_floor == floor
    assert cfg.budget_for(1000, 0.0) == cfg.budget_for(1000, 1.0) // 2 + (cfg.budget_for(1000, 1.0) % 2)
    assert cfg.budget_for(1000, 0.8) == max(math.ceil(cfg.budget_for(1000) * 0.8), cfg.budget_for(1000, 0.0))


def test_the_budget_scale_stays_in_floor_to_twice_the_budget():
    from hetero.balance import Balancer

    bal = Balancer(2, cuda=False, auto=True, warmup=0, scale_range=HeteroConfig(budget=16).budget_scale_range)
    for _ in range(200):
        bal.record(1.0, 5.0, can_lower=True, can_raise=True)  # the host side the critical path
    assert bal.budget_scale == 0.5
    for _ in range(200):
        bal.record(5.0, 1.0, can_lower=True, can_raise=True)
    assert bal.budget_scale == 2.0


@pytest.mark.parametrize("overlap", [False, True])
def test_auto_balance_never_reads_more_than_twice_the_budget(overlap):
    """The window side made slow: the budget rises to 2x and no further, on the fused step and side by side."""
    cfg = HeteroConfig(window=2048, sinks=1, retriever="exact", budget=16, balance="auto", overlap=overlap,
                       group_rule="sum")
    gen = torch.Generator().manual_seed(0)
    layer = LayerCache(cfg)
    layer.append(torch.randn(1, 2, 2600, 32, generator=gen), torch.randn(1, 2, 2600, 32, generator=gen))
    attn = HeteroAttention(cfg)
    rows = []
    for _ in range(30):
        res = attn.run(torch.randn(1, 4, 32, generator=gen), layer, return_details=True)
        rows.append(res.rows_read)
    assert max(rows) <= 2 * 2 * 16 and attn.balancer(layer).budget_scale <= 2.0
    attn.close()


def test_auto_balance_applies_its_thread_split_to_the_window_side():
    cfg = HeteroConfig(window=64, sinks=1, retriever="exact", budget=0.1, balance="auto", overlap=True, threads=2,
                       window_backend="cpp")
    layer = LayerCache(cfg)
    layer.append(torch.randn(1, 2, 600, 32), torch.randn(1, 2, 600, 32))
    attn = HeteroAttention(cfg)
    plan = attn.plan(layer, 4)
    for share, want in ((1.0, 2), (0.0, 1)):
        attn.balancer(layer).share = share
        attn.run(torch.randn(1, 4, 32), layer, plan)
        assert plan.window._runner.threads == want
    attn.close()


def test_worker_shuts_down_cleanly_at_exit(tmp_path):
    import subprocess
    import sys

    code = ("import torch\nfrom hetero import HeteroAttention, HeteroConfig, LayerCache\n"
            "cfg = HeteroConfig(window=4, sinks=1, retriever='exact')\nl = LayerCache(cfg)\n"
            "l.append(torch.randn(1, 1, 100, 8), torch.randn(1, 1, 100, 8))\n"
            "a = HeteroAttention(cfg)\na.run(torch.randn(1, 2, 8), l)\nprint('done')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "done", p.stderr


@pytest.mark.parametrize("retriever", ["ivf", "ivf-group", "ivf-pq", "hnsw", "lsh"])
def test_background_indexing_with_training_while_tokens_keep_arriving(retriever):
    """The first add (which trains the index) may run after later tokens reached the host tier: the build
    must index exactly the tokens of that add, and the queued adds the rest, no token twice."""
    indexer = Worker("test-indexer-3")
    gen = torch.Generator().manual_seed(6)
    cfg = HeteroConfig(window=16, sinks=2, retriever=retriever, budget=0.2)
    layer = LayerCache(cfg, indexer=indexer)
    gate = threading.Event()
    blocker = indexer.submit(gate.wait, 60)  # hold the indexer until the appends below have run ahead of it
    layer.append(torch.randn(1, 2, 2000, 16, generator=gen), torch.randn(1, 2, 2000, 16, generator=gen))
    for _ in range(20):
        layer.append(torch.randn(1, 2, 16, generator=gen), torch.randn(1, 2, 16, generator=gen))
    gate.set()
    assert blocker.result()
    layer.wait_indexed()
    assert layer.retriever.ntotal == layer.host_lengths()
    if retriever == "ivf-group":
        assert int(layer.retriever._seqs[0].count.sum(axis=1).max()) == layer.host.length[0]
    elif retriever != "lsh":
        assert layer.retriever._index[0][0].ntotal == layer.host.length[0]
    indexer.close()
