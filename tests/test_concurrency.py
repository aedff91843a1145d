"""Concurrent callers: runs on the same layer are serialized by its lock, runs on different layers overlap; either
way each output equals the same call made alone (bit for bit: the kernels' reductions do not depend on timing)."""
import threading
import time

import pytest
import torch

from hetero import HeteroAttention, HeteroConfig, LayerCache

CALLS = 1000  # in all, over the two threads


def _layers(config, n_layers=2, tokens=700, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(n_layers):
        layer = LayerCache(config, layer_idx=i)
        k = torch.randn(2, 2, tokens, 32, generator=gen)
        layer.append(k.to(torch.bfloat16), torch.randn(2, 2, tokens, 32, generator=gen).to(torch.bfloat16),
                     [tokens, tokens - 123])
        layer.wait_indexed()
        layers.append(layer)
    return layers


def _in_threads(work):
    """Run each callable of ``work`` in its own thread, started together; re-raise the first failure."""
    errors, barrier = [], threading.Barrier(len(work))

    def body(fn):
        try:
            barrier.wait()
            fn()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=body, args=(fn,)) for fn in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("retriever", ["ivf-group", "exact"])
@pytest.mark.parametrize("same_layer", [True, False], ids=["same-layer", "different-layers"])
def test_concurrent_runs_equal_sequential(retriever, same_layer):
    config = HeteroConfig(window=64, sinks=4, budget=48, retriever=retriever,
                          retriever_options={"min_train": 64} if retriever == "ivf-group" else {})
    layers = _layers(config)
    attn = HeteroAttention(config)
    plan = attn.plan(layers, 8, torch.float32)
    gen = torch.Generator().manual_seed(1)
    queries = [torch.randn(2, 8, 32, generator=gen) for _ in range(CALLS // 2)]
    targets = [layers[0], layers[0] if same_layer else layers[1]]
    if retriever == "ivf-group":
        assert all(x.retriever.native_search_ready() for x in targets), "the C++ step should search the index"
    want = [[attn.run(q, layer, plan) for q in queries] for layer in targets]
    got = [[None] * len(queries) for _ in targets]

    def worker(t):
        def go():
            for i, q in enumerate(queries):
                got[t][i] = attn.run(q, targets[t], plan)
        return go

    _in_threads([worker(0), worker(1)])
    for t in range(2):
        bad = [i for i in range(len(queries)) if not torch.equal(got[t][i], want[t][i])]
        assert not bad, f"thread {t}: {len(bad)} of {len(queries)} outputs differ from the sequential ones ({bad[:5]})"
    attn.close()


@pytest.mark.parametrize("call", ["run", "decode"])
def test_two_caches_sharing_a_runtime_from_two_threads_equal_sequential(call):
    """Each cache's layer 0 has its own workspace in the plan (they were once keyed by layer index, so two requests'
    caches served by one runtime wrote each other's outputs); decode() reads its workspace under the layer's lock."""
    config = HeteroConfig(window=64, sinks=4, budget=48, retriever="exact")
    caches = [_layers(config, n_layers=1, seed=s)[0] for s in (0, 1)]
    attn = HeteroAttention(config)
    plan = attn.plan(caches[0], 8, torch.float32)
    attn.plan(caches[1], 8, torch.float32)
    assert plan.workspaces[caches[0]] is not plan.workspaces[caches[1]]
    gen = torch.Generator().manual_seed(3)
    steps = 150
    tokens = [[(torch.randn(2, 8, 32, generator=gen), torch.randn(2, 2, 32, generator=gen),
                torch.randn(2, 2, 32, generator=gen)) for _ in range(steps)] for _ in range(2)]

    def loop(t, layer, outs):
        for q, k, v in tokens[t]:
            if call == "decode":
                outs.append(attn.decode(q, k, v, layer, plan))
            else:
                outs.append(attn.run(q, layer, plan))

    want = [[], []]
    alone = [_layers(config, n_layers=1, seed=s)[0] for s in (0, 1)]
    for t in range(2):
        loop(t, alone[t], want[t])
    got = [[], []]
    _in_threads([lambda: loop(0, caches[0], got[0]), lambda: loop(1, caches[1], got[1])])
    for t in range(2):
        bad = [i for i in range(steps) if not torch.equal(got[t][i], want[t][i])]
        assert not bad, f"cache {t}: {len(bad)} of {steps} outputs differ from the sequential ones ({bad[:5]})"
    attn.close()


def test_concurrent_decode_loops_on_different_layers_equal_sequential():
    """Each thread appends a token to its own layer and runs it, 250 steps; then the same steps again, alone, on
    fresh copies of the layers: outputs and stored tokens agree."""
    config = HeteroConfig(window=32, sinks=2, budget=40, retriever="ivf-group", retriever_options={"min_train": 64})
    steps = 250
    gen = torch.Generator().manual_seed(2)
    new_k = [[torch.randn(2, 2, 32, generator=gen) for _ in range(steps)] for _ in range(2)]
    new_v = [[torch.randn(2, 2, 32, generator=gen) for _ in range(steps)] for _ in range(2)]
    queries = [[torch.randn(2, 8, 32, generator=gen) for _ in range(steps)] for _ in range(2)]

    def decode(attn, layer, t, outs):
        for s in range(steps):
            layer.append(new_k[t][s], new_v[t][s])
            outs.append(attn.run(queries[t][s], layer))

    alone = _layers(config)
    attn = HeteroAttention(config)
    want = [[], []]
    for t in range(2):
        decode(attn, alone[t], t, want[t])
    attn.close()
    together = _layers(config)
    attn = HeteroAttention(config)
    got = [[], []]
    _in_threads([lambda: decode(attn, together[0], 0, got[0]), lambda: decode(attn, together[1], 1, got[1])])
    attn.close()
    for t in range(2):
        assert all(torch.equal(a, b) for a, b in zip(got[t], want[t])), f"layer {t}: outputs differ"
        assert together[t].host_lengths() == alone[t].host_lengths()
        assert together[t].retriever.ntotal == together[t].host_lengths()
        for seq in range(2):
            assert all(torch.equal(a, b) for a, b in zip(together[t].tokens(seq), alone[t].tokens(seq)))


def test_decode_steps_while_another_thread_wakes_the_pool_equal_steps_alone():
    """``decode`` wakes its pool's workers ahead of its step (``wake_workers``); wakes from another thread at any
    moment, sleeping workers or not, change no output, and every step completes."""
    config = HeteroConfig(window=32, sinks=2, budget=40, retriever="ivf-group", retriever_options={"min_train": 64})
    steps = 300
    gen = torch.Generator().manual_seed(4)
    new_k = [torch.randn(2, 2, 32, generator=gen) for _ in range(steps)]
    new_v = [torch.randn(2, 2, 32, generator=gen) for _ in range(steps)]
    queries = [torch.randn(2, 8, 32, generator=gen) for _ in range(steps)]

    def decode(attn, layer, outs):
        plan = attn.plan(layer, 8)
        assert plan.cpu_fused
        for s in range(steps):
            outs.append(attn.decode(queries[s], new_k[s], new_v[s], layer, plan).clone())
            if s % 7 == 0:
                time.sleep(0.002)  # long enough for the workers to go to sleep

    attn = HeteroAttention(config)
    want = []
    decode(attn, _layers(config, n_layers=1)[0], want)
    attn.close()
    attn = HeteroAttention(config)
    layer = _layers(config, n_layers=1)[0]
    got, done = [], threading.Event()

    def waker():
        host = attn.plan(layer, 8).host
        while not done.is_set():
            host.wake_workers(50)
            time.sleep(0.0003)

    def decoder():
        try:
            decode(attn, layer, got)
        finally:
            done.set()

    _in_threads([decoder, waker])
    attn.close()
    assert len(got) == steps and all(torch.equal(a, b) for a, b in zip(got, want))


def test_a_runtime_dropped_without_close_frees_its_layer_and_its_threads():
    """Side by side, the runtime's host worker runs the host part; dropped without close(), the runtime, the layer
    its last job held and the worker's thread all go (the idle thread held the last job, so none of them went)."""
    import gc
    import weakref

    cfg = HeteroConfig(window=16, sinks=2, retriever="exact", overlap=True)
    threads_before = threading.active_count()
    refs = []
    for _ in range(3):
        layer = LayerCache(cfg)
        layer.append(torch.randn(1, 2, 200, 16), torch.randn(1, 2, 200, 16))
        attn = HeteroAttention(cfg)
        attn.run(torch.randn(1, 4, 16), layer)
        assert attn._worker is not None  # the host part ran on the runtime's own worker
        refs += [weakref.ref(layer), weakref.ref(attn)]
        del layer, attn
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)
    for _ in range(100):  # the stopped threads leave within moments
        if threading.active_count() <= threads_before:
            break
        threading.Event().wait(0.02)
    assert threading.active_count() <= threads_before


class _LockThenHook:
    """A layer's lock whose next acquisition first runs ``hook`` (which may take the lock itself): another thread's
    call landing exactly between a step's checks and its taking the lock, made deterministic."""

    def __init__(self, lock, hook):
        self.lock, self.hook = lock, hook

    def __enter__(self):
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return self.lock.__enter__()

    def __exit__(self, *exc):
        return self.lock.__exit__(*exc)


def _ivf_layer_and_twin(config, tokens=100):
    gen = torch.Generator().manual_seed(3)
    k, v = torch.randn(2, 2, tokens, 32, generator=gen), torch.randn(2, 2, tokens, 32, generator=gen)
    layers = [LayerCache(config) for _ in range(2)]
    for layer in layers:
        layer.append(k, v)
        layer.wait_indexed()
    return layers, gen


@pytest.mark.parametrize("change", ["crop_to_sinks", "reset", "reset_and_refill"])
def test_decode_after_another_threads_change_that_lands_before_its_lock_equals_the_change_then_decode(change):
    """A crop that empties the host tier (dropping a sequence's index) or a reset, landing after ``decode``'s checks
    and before its lock: the step sees the layer as it is then (it read the index's tables and the tiers' shape
    before under the lock: a crash), the same output as the change made first."""
    config = HeteroConfig(window=8, sinks=2, budget=0.2, retriever="ivf-group", retriever_options={"min_train": 16})
    (layer, twin), gen = _ivf_layer_and_twin(config)
    refill = torch.randn(2, 2, 40, 32, generator=gen), torch.randn(2, 2, 40, 32, generator=gen)

    def apply(target):
        if change == "crop_to_sinks":
            target.crop([2, 2])
        else:
            target.reset()
            if change == "reset_and_refill":
                target.append(*refill)

    attn = HeteroAttention(config)
    plan = attn.plan([layer, twin], 4)
    q, k, v = torch.randn(2, 4, 32, generator=gen), torch.randn(2, 2, 32, generator=gen), torch.randn(2, 2, 32,
                                                                                                      generator=gen)
    apply(twin)
    expected = attn.decode(q, k, v, twin, attn.plan(twin, 4))
    layer.lock = _LockThenHook(layer.lock, lambda: apply(layer))
    got = attn.decode(q, k, v, layer, plan)
    assert torch.equal(got, expected)
    assert layer.seq_lengths() == twin.seq_lengths()


def test_run_after_another_threads_reset_that_lands_before_its_lock_is_refused_as_on_an_empty_cache():
    from hetero import ShapeError

    config = HeteroConfig(window=8, sinks=2, budget=0.2, retriever="ivf-group", retriever_options={"min_train": 16})
    (layer, _), gen = _ivf_layer_and_twin(config)
    attn = HeteroAttention(config)
    plan = attn.plan(layer, 4)
    layer.lock = _LockThenHook(layer.lock, layer.reset)
    with pytest.raises(ShapeError, match="empty"):
        attn.run(torch.randn(2, 4, 32, generator=gen), layer, plan)


def test_an_append_after_another_threads_reset_that_lands_before_its_lock_starts_the_cache_anew():
    config = HeteroConfig(window=8, sinks=2, retriever="exact")
    (layer, _), gen = _ivf_layer_and_twin(config)
    k, v = torch.randn(2, 2, 32, generator=gen), torch.randn(2, 2, 32, generator=gen)
    layer.lock = _LockThenHook(layer.lock, layer.reset)
    layer.append(k, v)
    assert layer.seq_lengths() == [1, 1]
    assert torch.equal(layer.tokens(1)[0][:, 0], k[1])
