"""The lean decode step: one plan per step for all layers, reused while the geometry holds; ``run`` on the plan's
workspaces allocates nothing after warm-up; the profile reports the step's fixed cost and its bytes-moved floor."""
import json
import subprocess
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from hetero import HeteroAttention, HeteroConfig, LayerCache, native
from hetero.balance import Balancer
from hetero.chunk import chunk_attention
from hetero.errors import StalePlanError

from helpers import oracle, rel_err

needs_native = pytest.mark.skipif(native.load() is None, reason="C++ extension not built")


def _model(retriever="ivf-group", layers=3, tokens=900, batch=2, seed=0):
    cfg = HeteroConfig(window=64, sinks=4, budget=48, retriever=retriever,
                       retriever_options={"min_train": 64} if retriever == "ivf-group" else {})
    gen = torch.Generator().manual_seed(seed)
    cache = []
    for i in range(layers):
        layer = LayerCache(cfg, layer_idx=i)
        layer.append(torch.randn(batch, 2, tokens, 32, generator=gen).bfloat16(),
                     torch.randn(batch, 2, tokens, 32, generator=gen).bfloat16(), [tokens - 37 * b for b in range(batch)])
        layer.wait_indexed()
        cache.append(layer)
    return cfg, cache, gen


def _decode_step(attn, cache, gen, hq=8):
    """One model step the HF way: append each layer's token, plan once, run every layer into its workspace."""
    for layer in cache:
        layer.append(torch.randn(layer.batch, 2, 32, generator=gen).bfloat16(),
                     torch.randn(layer.batch, 2, 32, generator=gen).bfloat16())
    plan = attn.plan(cache, hq, torch.bfloat16)
    qs = [torch.randn(cache[0].batch, hq, 32, generator=gen).bfloat16() for _ in cache]
    return plan, qs


@needs_native
@pytest.mark.parametrize("batch", [1, 3])
def test_run_allocates_nothing_after_warm_up(batch):
    """100 steps of 3 layers: the C++ step searches, attends and merges into the workspace; torch's allocator sees
    no tensor created inside ``run`` (counted by the profiler's memory events)."""
    cfg, cache, gen = _model(batch=batch)
    attn = HeteroAttention(cfg)
    for _ in range(5):
        plan, qs = _decode_step(attn, cache, gen)
        for layer, q in zip(cache, qs):
            attn.run(q, layer, plan, out=attn.output(plan, layer))
    assert plan.fused and all(x.retriever.native_search_ready() for x in cache)
    allocations = 0
    for _ in range(100):
        plan, qs = _decode_step(attn, cache, gen)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for layer, q in zip(cache, qs):
                attn.run(q, layer, plan, out=attn.output(plan, layer))
        allocations += sum(1 for e in prof.events() if e.name == "[memory]")
    assert allocations == 0
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:  # the counter sees a clone
        attn.run(qs[0], cache[0], plan)
    assert any(e.name == "[memory]" for e in prof.events())
    attn.close()


@needs_native
def test_one_plan_serves_every_layer_and_step_until_the_geometry_changes():
    cfg, cache, gen = _model()
    attn, alone = HeteroAttention(cfg), HeteroAttention(cfg)
    first, _ = _decode_step(attn, cache, gen)
    for _ in range(3):
        plan, qs = _decode_step(attn, cache, gen)
        assert plan is first
        for layer, q in zip(cache, qs):  # the shared plan gives what a one-layer plan of its own gives
            assert torch.equal(attn.run(q, layer, plan), alone.run(q, layer))
    with pytest.raises(StalePlanError):
        attn.run(torch.randn(2, 8, 32), cache[0], plan)  # float32 q under a bfloat16 plan
    assert attn.plan(cache, 16, torch.bfloat16) is not first
    attn.close()
    alone.close()



class _CountingRunner:
    """A Runner that counts the searches made on it."""

    def __init__(self, inner):
        self.inner, self.searches = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def ivf_search(self, *args):
        self.searches += 1
        return self.inner.ivf_search(*args)


@needs_native
def test_searches_made_in_python_run_on_the_plans_pool_with_the_steps_threads():
    """A small chunk's positions and a per-head budget's step search in Python: on the plan's search pool (one per
    HeteroAttention, the config's threads), not on each retriever's own one-thread pool."""
    gen = torch.Generator().manual_seed(0)
    cfg = HeteroConfig(window=64, sinks=4, budget=48, threads=2, head_budget="adaptive",
                       retriever_options={"min_train": 64})
    layer = LayerCache(cfg)
    layer.append(torch.randn(2, 2, 900, 32, generator=gen), torch.randn(2, 2, 900, 32, generator=gen))
    layer.wait_indexed()
    attn = HeteroAttention(cfg)
    plan = attn.plan(layer, 8)
    assert plan.search_pool.runner.threads == cfg.resolved_threads
    spy = plan.search_pool._runner = _CountingRunner(plan.search_pool.runner)
    attn.run(torch.randn(2, 8, 32, generator=gen), layer, plan)  # adaptive budgets: the search is in Python
    assert spy.searches == 2  # one native search per sequence
    chunk_attention(attn, layer, torch.randn(2, 8, 3, 32, generator=gen), torch.randn(2, 2, 3, 32, generator=gen),
                    torch.randn(2, 2, 3, 32, generator=gen))
    assert spy.searches == 2 + 3 * 2  # and per position of the chunk
    attn.close()


@needs_native
def test_a_search_made_in_python_is_the_fused_steps_retrieve_phase(monkeypatch):
    """The exact retriever searches in Python before the fused C++ step: that search is the step's ``retrieve``
    phase (a span before the window's, on the same clock), and the balancer's host time is the search and the host
    rows, not a timestamp."""
    recorded = []
    monkeypatch.setattr(Balancer, "record", lambda self, w, h, **kw: recorded.append((w, h)))
    gen = torch.Generator().manual_seed(0)
    cfg = HeteroConfig(window=64, sinks=4, budget=48, retriever="exact", balance="auto")
    layer = LayerCache(cfg)
    layer.append(torch.randn(2, 2, 900, 32, generator=gen), torch.randn(2, 2, 900, 32, generator=gen))
    attn = HeteroAttention(cfg)
    plan = attn.plan(layer, 8)
    res = attn.run(torch.randn(2, 8, 32, generator=gen), layer, plan, return_details=True)
    assert plan.fused
    t = res.timings_ms
    assert t["retrieve"] > 0
    spans = {s.phase: s for s in attn.phase_spans(plan, layer)}
    assert spans["retrieve"].end <= spans["window"].start < spans["retrieve"].end + 1.0
    window_ms, host_ms = recorded[-1]
    assert host_ms == pytest.approx(t["retrieve"] + t["host_attn"], abs=1e-6)
    attn.close()

def test_exact_retriever_through_the_plan_equals_the_oracle():
    cfg, cache, gen = _model("all")
    attn = HeteroAttention(cfg)
    plan, qs = _decode_step(attn, cache, gen)
    for layer, q in zip(cache, qs):
        assert rel_err(attn.run(q.float(), layer, attn.plan(cache, 8)).float(), oracle(q.float(), layer)) < 1e-5
    attn.close()


@needs_native
@pytest.mark.parametrize("context,overlap", [(3000, "off"), (3000, "on"), (200, "off")])
def test_profile_reports_fixed_cost_and_floor_beside_the_step(context, overlap):
    """The floor is there whichever path runs (the general one counted no index bytes) and for a prompt the window
    holds (no host row to time the random reads on: it was null)."""
    p = subprocess.run([sys.executable, "-m", "hetero.tools.cli", "profile", "--preset", "smollm2", "--context",
                        str(context), "--window", "256", "--steps", "3", "--overlap", overlap, "--json"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["fused"] is (overlap == "off")
    if overlap == "on":
        assert r["fixed_ms"] is None  # measured against the fused step's native spans only
    else:
        assert 0 <= r["fixed_ms"] < r["hetero_ms"]
    assert 0 < r["floor_ms"] and r["floor_ratio"] == pytest.approx(r["hetero_ms"] / r["floor_ms"], rel=0.01)
    assert r["stream_gbps"] > 0 and r["random_read_gbps"] > 0 and r["cpu"]


@needs_native
@pytest.mark.parametrize("retriever", ["all", "ivf-group"])
def test_fused_step_without_fast_slots_reports_an_empty_window_part(retriever):
    """window = sinks = 0: the fused step has no fast-tier part; its details (and the adaptive budget that reads
    them) get out 0, lse -inf, never what the workspace held before."""
    gen = torch.Generator().manual_seed(0)
    cfg = HeteroConfig(window=0, sinks=0, budget=1.0, retriever=retriever, block_tokens=16,
                       retriever_options={"min_train": 64} if retriever == "ivf-group" else {})
    layer = LayerCache(cfg)
    k, v = torch.randn(1, 2, 300, 32, generator=gen), torch.randn(1, 2, 300, 32, generator=gen)
    layer.append(k, v)
    layer.wait_indexed()
    attn = HeteroAttention(cfg)
    plan = attn.plan(layer, 4)
    assert plan.fused
    for w in plan.workspaces.values():
        w.win_out.fill_(7.0), w.win_lse.fill_(50.0)  # what torch.empty may hold
    q = torch.randn(1, 4, 32, generator=gen)
    res = attn.run(q, layer, plan, return_details=True)
    assert torch.equal(res.window.out, torch.zeros_like(res.window.out))
    assert torch.isneginf(res.window.lse).all()
    assert rel_err(res.out, oracle(q, layer)) < 1e-5
    attn.close()


def test_asking_again_for_the_same_plan_takes_the_short_path(monkeypatch):
    """A one-layer decode loop asks for its plan every step, q_dtype left to its default: a few comparisons, not a
    re-plan under the runtime's lock."""
    layer = LayerCache(HeteroConfig(window=16, sinks=2, retriever="all"))
    layer.append(torch.randn(1, 2, 100, 16), torch.randn(1, 2, 100, 16))
    attn = HeteroAttention(layer.config)
    plan = attn.plan(layer, 4)
    calls = []
    real = HeteroAttention._plan_locked
    monkeypatch.setattr(HeteroAttention, "_plan_locked", lambda self, *a: calls.append(a) or real(self, *a))
    assert attn.plan(layer, 4) is plan and attn.plan(layer, 4, torch.float32) is plan and not calls
    attn.close()
