"""Failures half-way leave nothing half-done: index faults heal, closed workers refuse first, allocation failures
change nothing, and inputs that would reach native code unchecked on the lean path are refused."""
import dataclasses
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from hetero import (ConfigError, DTypeError, HeteroAttention, HeteroConfig, InvalidValueError, LayerCache, ShapeError,
                    sparse_attention, window_attention)
from hetero.errors import ClosedError, HeteroError, IndexSyncError
from hetero.worker import Worker

from helpers import oracle, rel_err, same_snapshot, snapshot

B, HKV, G, D = 2, 2, 3, 16


def _layer(retriever="exact", indexer=None, tokens=60, **kw):
    options = {"min_train": 16} if retriever == "ivf-group" else {}
    cfg = HeteroConfig(window=4, sinks=1, retriever=retriever, budget=8, block_tokens=4, retriever_options=options,
                       **kw)
    layer = LayerCache(cfg, indexer=indexer)
    gen = torch.Generator().manual_seed(0)
    layer.append(torch.randn(B, HKV, tokens, D, generator=gen), torch.randn(B, HKV, tokens, D, generator=gen),
                 [tokens, tokens - 17])
    layer.wait_indexed()
    return layer


class _FailingAdd:
    """The retriever's ``add`` raising ``error`` on its next call, then working again."""

    def __init__(self, layer, error):
        self.layer, self.error, self.original = layer, error, layer.retriever.add
        layer.retriever.add = self

    def __call__(self, seq, keys):
        self.layer.retriever.add = self.original
        raise self.error


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["exception", "interrupt"])
def test_failed_add_heals_from_the_tier_and_is_reported_once(background, error):
    indexer = Worker("test-indexer") if background else None
    layer = _layer("all", indexer=indexer)
    attn = HeteroAttention(layer.config)
    _FailingAdd(layer, error)
    k = torch.randn(B, HKV, 9, D)
    try:
        layer.append(k, torch.randn_like(k))  # 9 tokens push 9 out of the window: a Python add per sequence
    except KeyboardInterrupt:
        assert not background, "an interrupt in the background indexer must not surface in the caller"
    q = torch.randn(B, HKV * G, D)
    if isinstance(error, Exception):
        with pytest.raises(IndexSyncError, match="layer 0.*disk full.*rebuilt"):
            attn.run(q, layer)
    out = attn.run(q, layer)  # healed: no second report, and every host token is indexed again
    assert layer.retriever.ntotal == layer.host_lengths()
    assert rel_err(out, oracle(q, layer)) < 1e-5
    attn.close()
    if indexer is not None:
        indexer.close()


def test_interrupt_in_a_batch_append_keeps_every_token_and_heals():
    layer = _layer("ivf-group")
    _FailingAdd(layer, KeyboardInterrupt())
    before = layer.seq_lengths()
    k = torch.randn(B, HKV, 40, D)
    with pytest.raises(KeyboardInterrupt):
        layer.append(k, torch.randn_like(k))
    assert layer.seq_lengths() == [n + 40 for n in before]  # the tiers hold the whole chunk
    layer.wait_indexed()  # an interrupt was already reported: healed quietly
    assert layer.retriever.ntotal == layer.host_lengths()


def test_crop_with_a_failing_truncate_crops_the_tiers_and_heals_the_index():
    layer = _layer("exact")
    truncate = layer.retriever.truncate

    def failing(seq, n):
        raise RuntimeError("truncate failed")

    layer.retriever.truncate = failing
    layer.crop([30, 20])
    layer.retriever.truncate = truncate
    assert layer.seq_lengths() == [30, 20]
    with pytest.raises(IndexSyncError, match="truncate failed"):
        layer.wait_indexed()
    assert layer.retriever.ntotal == layer.host_lengths()


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
def test_a_decode_reports_an_earlier_index_failure_before_its_token_goes_in(background):
    """A failure left by an earlier call (a chunk's add, a crop's truncate) is reported by the next decode before it
    appends anything, so retrying that decode stores its token once."""
    indexer = Worker("test-indexer-decode") if background else None
    layer = _layer("all", indexer=indexer)
    attn = HeteroAttention(layer.config)
    plan = attn.plan(layer, HKV * G)
    _FailingAdd(layer, RuntimeError("disk full"))
    k = torch.randn(B, HKV, 9, D)
    layer.append(k, torch.randn_like(k))
    before = layer.seq_lengths()
    q, kt, vt = torch.randn(B, HKV * G, D), torch.randn(B, HKV, D), torch.randn(B, HKV, D)
    with pytest.raises(IndexSyncError, match="disk full"):
        attn.decode(q, kt, vt, layer, plan)
    assert layer.seq_lengths() == before
    out = attn.decode(q, kt, vt, layer, plan)  # the retry: healed, the token in once
    assert layer.seq_lengths() == [n + 1 for n in before]
    assert rel_err(out, oracle(q, layer)) < 1e-5
    attn.close()
    if indexer is not None:
        indexer.close()


def test_a_decode_whose_own_index_add_fails_says_its_token_is_stored():
    """The decode's own token reaches the index through Python (faiss), and that add fails: the token is in the
    tiers (the index heals from them), so the error says so and that run() gives the step's output."""
    layer = _layer("ivf")
    attn = HeteroAttention(layer.config)
    plan = attn.plan(layer, HKV * G)
    before = layer.seq_lengths()
    _FailingAdd(layer, RuntimeError("disk full"))
    q = torch.randn(B, HKV * G, D)
    with pytest.raises(IndexSyncError, match="are stored: call run"):
        attn.decode(q, torch.randn(B, HKV, D), torch.randn(B, HKV, D), layer, plan)
    assert layer.seq_lengths() == [n + 1 for n in before]
    assert torch.isfinite(attn.run(q, layer, plan)).all()
    assert layer.retriever.ntotal == layer.host_lengths()
    attn.close()


@pytest.mark.parametrize("path", ["chunk", "decode"])
def test_append_after_the_indexer_closed_is_refused_before_anything_changes(path):
    indexer = Worker("test-indexer-closed")
    layer = _layer("ivf-group", indexer=indexer)
    indexer.close()
    before = snapshot(layer)
    k = torch.randn(B, HKV, D) if path == "decode" else torch.randn(B, HKV, 5, D)
    with pytest.raises(ClosedError, match="indexer"):
        layer.append(k, torch.randn_like(k))
    assert same_snapshot(before, snapshot(layer))


def test_closed_worker_refuses_with_a_typed_error():
    w = Worker("test-closed")
    w.close()
    with pytest.raises(ClosedError):
        w.submit(print)
    assert w.try_submit(print) is None


def test_try_submit_does_not_wait_for_a_full_queue():
    w = Worker("test-full", max_pending=2)
    gate = threading.Event()
    first = w.submit(gate.wait)  # the thread takes it and waits: two more fill the queue
    while not w._running[0]:
        time.sleep(0.001)
    assert w.try_submit(int, 0, idle_only=True) is None  # a call is running: work that must not delay it waits
    queued = [w.try_submit(int, 1), w.try_submit(int, 2)]
    t = time.perf_counter()
    assert w.try_submit(int, 3) is None and time.perf_counter() - t < 0.5
    gate.set()
    assert first.result(5) and [f.result(5) for f in queued] == [1, 2]
    assert w.try_submit(int, 4, idle_only=True).result(5) == 4  # idle again once its results are given
    w.close()


def test_a_call_taken_from_the_queue_but_not_yet_started_keeps_the_worker_busy(monkeypatch):
    """Between the thread's taking a call from the queue and marking it running, the queue is empty and no call runs:
    the worker must still count as busy, or idle-only work (a page populate) queues behind a real call."""
    import hetero.worker as worker_module

    entered, release = threading.Event(), threading.Event()

    class HeldFuture(worker_module.Future):
        def set_running_or_notify_cancel(self):  # the thread has taken the call: hold it at exactly that point
            entered.set()
            release.wait(5)
            return super().set_running_or_notify_cancel()

    monkeypatch.setattr(worker_module, "Future", HeldFuture)
    w = Worker("test-taken-not-started")
    first = w.submit(int, 1)
    assert entered.wait(5) and w._queue.empty() and w._running[0] is None
    assert w.try_submit(int, 2, idle_only=True) is None
    release.set()
    assert first.result(5) == 1
    w.close()


def test_a_worker_whose_call_has_returned_its_result_is_idle():
    """A caller that got its result may ask at once for ``idle_only`` work: the thread's own bookkeeping after the
    result is set does not count as busy. The done-callback runs on the worker's thread, in exactly that moment."""
    w = Worker("test-idle-after-result")
    asked = []
    gate = threading.Event()
    first = w.submit(gate.wait, 5)  # the callback is attached before the call can end: it runs on the worker's thread
    first.add_done_callback(lambda _: asked.append((threading.current_thread().name,
                                                    w.try_submit(int, 2, idle_only=True))))
    gate.set()
    assert first.result(5) is True
    deadline = time.perf_counter() + 5
    while not asked and time.perf_counter() < deadline:
        time.sleep(0.001)
    assert asked and asked[0][0] == "test-idle-after-result"
    assert asked[0][1] is not None and asked[0][1].result(5) == 2
    w.close()


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4])
def test_allocation_failure_in_a_later_append_changes_nothing(monkeypatch, fail_at):
    """The pool, the block table and the fast tier each grow once per append; memory running out at any of them
    (from the fail_at-th allocation on: the pool's refused reservation of room falls back to a smaller one) leaves
    every sequence's blocks, capacity and tokens as they were."""
    import hetero.tiers as tiers

    layer = _layer("exact", tokens=20)
    before = snapshot(layer) + (layer.host.capacity.copy().tolist(), layer.host.table.copy().tolist())
    calls = []
    real_empty, real_full = tiers.empty_host, torch.full

    def counted(real):
        def alloc(*a, **kw):
            calls.append(1)
            if len(calls) >= fail_at:
                raise MemoryError("injected")
            return real(*a, **kw)
        return alloc

    monkeypatch.setattr(tiers, "empty_host", counted(real_empty))
    monkeypatch.setattr(tiers.torch, "full", counted(real_full))
    k = torch.randn(B, HKV, 3000, D)
    try:
        layer.append(k, torch.randn_like(k))
    except MemoryError:
        pass
    else:  # fewer allocations than fail_at: nothing to inject
        assert len(calls) < fail_at
        return
    monkeypatch.undo()
    after = snapshot(layer) + (layer.host.capacity.copy().tolist(), layer.host.table.copy().tolist())
    assert same_snapshot(before, after)
    layer.append(k, torch.randn_like(k))  # and the layer works after it
    assert layer.seq_lengths() == [3020, 3003]


def test_float64_queries_are_refused_with_the_allowed_dtypes():
    layer = _layer()
    with pytest.raises(DTypeError, match="float32, bfloat16, float16"):
        HeteroAttention(layer.config).run(torch.randn(B, HKV * G, D, dtype=torch.float64), layer)


def test_a_layer_of_another_retriever_is_refused_under_an_existing_plan():
    mine, other = _layer("exact"), _layer("all")
    attn = HeteroAttention(mine.config)
    plan = attn.plan(mine, HKV * G)
    with pytest.raises(ConfigError, match="retriever: layer 'all', runtime 'exact'"):
        attn.run(torch.randn(B, HKV * G, D), other, plan)


def test_a_layer_of_another_budget_runs_with_the_runtimes_budget():
    layer = _layer("exact")
    wide = HeteroAttention(layer.config.with_(budget=1.0))  # the step decides the budget: every host key
    q = torch.randn(B, HKV * G, D)
    assert rel_err(wide.run(q, layer), oracle(q, layer)) < 1e-5


def test_meta_and_sparse_queries_on_the_plan_path_are_refused_in_a_child_process():
    """Given a plan, ``run`` checks only the plan's geometry; a meta or sparse q used to reach the C++ step with a
    null pointer (a segfault). Run in a child process so that a regression is a failure, not a dead session."""
    code = textwrap.dedent("""
        import torch
        from hetero import HeteroAttention, HeteroConfig, LayerCache, HeteroError
        cfg = HeteroConfig(window=8, sinks=1, retriever="ivf-group", budget=8, retriever_options={"min_train": 16})
        layer = LayerCache(cfg)
        layer.append(torch.randn(1, 2, 400, 16), torch.randn(1, 2, 400, 16))
        layer.wait_indexed()
        attn = HeteroAttention(cfg)
        plan = attn.plan(layer, 4)
        for q in (torch.empty(1, 4, 16, device="meta"), torch.randn(1, 4, 16).to_sparse()):
            try:
                attn.run(q, layer, plan)
            except HeteroError as e:
                print("refused", type(e).__name__)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split().count("refused") == 2, p.stdout


@pytest.mark.parametrize("scale", [float("nan"), 0.0, -1.0, float("inf"), "0.1", True])
def test_scale_is_checked_by_both_operations(scale):
    layer = _layer()
    q = torch.randn(B, HKV * G, D)
    with pytest.raises(InvalidValueError, match="scale"):
        window_attention(q, layer.fast.k, layer.fast.v, layer.fast.lengths, scale=scale)
    from hetero import Selection

    sel = Selection(torch.zeros(B, HKV, 1, dtype=torch.int32))
    with pytest.raises(InvalidValueError, match="scale"):
        sparse_attention(q, layer.host.view(), sel, scale=scale)


def test_meta_host_lengths_are_refused():
    layer = _layer()
    view = dataclasses.replace(layer.host.view(), lengths=torch.empty(B, dtype=torch.int64, device="meta"))
    from hetero import Selection

    with pytest.raises(ShapeError, match="host.lengths is a meta tensor"):
        sparse_attention(torch.randn(B, HKV * G, D), view, Selection(torch.zeros(B, HKV, 1, dtype=torch.int32)))


def test_uint64_lengths_beyond_int64_name_the_values_given():
    import numpy as np

    layer = _layer()
    with pytest.raises(InvalidValueError, match=str(2 ** 63 + 5)):
        layer.crop(np.array([2 ** 63 + 5, 3], dtype=np.uint64))


def test_bools_are_not_counts():
    """numpy and torch read [True, 2] as [1, 2]: a crop or a budget of bools was taken as counts."""
    layer = _layer()
    before = layer.fast.total.tolist()
    with pytest.raises(DTypeError, match="integers"):
        layer.crop([True, 2])
    assert layer.fast.total.tolist() == before
    with pytest.raises(InvalidValueError, match="budgets"):
        layer.retriever.search(torch.randn(layer.batch, layer.kv_heads * 2, layer.head_dim), [True] * layer.batch)


def test_every_public_error_is_a_hetero_error():
    for err in (ConfigError, DTypeError, InvalidValueError, ShapeError, ClosedError, IndexSyncError):
        assert issubclass(err, HeteroError)


@pytest.mark.parametrize("retriever", ["exact", "ivf-group"])
def test_a_gqa_group_beyond_the_native_kernels_runs_exactly_through_another_backend(retriever):
    """72 query heads on one KV head: the C++ kernels take groups up to 64; the step must pick a backend that takes
    it (and say so in the plan), not die in the runner."""
    options = {"min_train": 16} if retriever == "ivf-group" else {}
    cfg = HeteroConfig(window=8, sinks=1, retriever=retriever, budget=1.0, retriever_options=options)
    layer = LayerCache(cfg)
    gen = torch.Generator().manual_seed(3)
    layer.append(torch.randn(1, 1, 300, 16, generator=gen), torch.randn(1, 1, 300, 16, generator=gen))
    layer.wait_indexed()
    attn = HeteroAttention(cfg)
    plan = attn.plan(layer, 72)
    q = torch.randn(1, 72, 16, generator=gen)
    assert rel_err(attn.run(q, layer, plan), oracle(q, layer)) < 1e-4
    assert not plan.fused or (plan.window.max_group or 72) >= 72


def test_lsh_says_once_that_it_ignores_the_budget(monkeypatch):
    import hetero.retrieval.lsh as lsh

    monkeypatch.setattr(lsh, "_warned_budget", False)  # once per process: an earlier test may have seen it
    cfg = HeteroConfig(window=8, sinks=1, retriever="lsh", budget=8)
    with pytest.warns(UserWarning, match="ignores the budget"):
        LayerCache(cfg).append(torch.randn(1, 2, 100, 16), torch.randn(1, 2, 100, 16))


def _logical(layer):
    """What a LayerCache holds as tokens (not the bytes of its unused capacity): each sequence's keys and values in
    order, the tiers' lengths and the index's counts."""
    return ([layer.tokens(b) for b in range(layer.batch)], list(layer.fast.total), list(layer.host.length),
            list(layer.retriever.ntotal))


def _same_logical(a, b) -> bool:
    return (all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a[0], b[0])) and len(a[0]) ==
            len(b[0]) and a[1:] == b[1:])


@pytest.mark.parametrize("fail_seq", [0, 1])
def test_allocation_failure_while_copying_a_sequences_evicted_tokens_changes_no_sequence(monkeypatch, fail_seq):
    """The copies of the tokens leaving each sequence's window are all made before any sequence is written: one
    failing leaves every sequence, the host tier and the index as they were."""
    import hetero.tiers as tiers

    layer = _layer("exact", tokens=20)
    before = _logical(layer)
    real, calls = tiers.FastTier._ring_take, []

    def take(self, seq, *a):
        calls.append(seq)
        if seq == fail_seq:
            raise MemoryError("injected")
        return real(self, seq, *a)

    monkeypatch.setattr(tiers.FastTier, "_ring_take", take)
    k, v = torch.randn(B, HKV, 3, D), torch.randn(B, HKV, 3, D)
    with pytest.raises(MemoryError):
        layer.append(k, v)
    monkeypatch.undo()
    assert fail_seq in calls and _same_logical(before, _logical(layer)) and layer.index.idle
    layer.append(k, v)
    fresh = _layer("exact", tokens=20)
    fresh.append(k, v)
    assert _same_logical(_logical(fresh), _logical(layer))


def test_an_index_left_behind_with_nothing_recorded_is_found_healed_and_reported(monkeypatch):
    """An interrupt between a host-tier write and its index add records nothing; the counts disagree, so the next
    step heals the index from the tier (and says so) instead of searching an index that misses tokens."""
    from hetero.indexing import IndexQueue

    layer = _layer("exact", tokens=20)

    def interrupted(self, *a):
        raise KeyboardInterrupt  # between the tier's write and the add, where no add records anything

    monkeypatch.setattr(IndexQueue, "add", interrupted)
    k = torch.randn(B, HKV, 6, D)
    with pytest.raises(KeyboardInterrupt):
        layer.append(k, torch.randn_like(k))
    monkeypatch.undo()
    assert list(layer.retriever.ntotal) != list(layer.host.length) and not layer.index.idle
    attn = HeteroAttention(layer.config.with_(budget=1.0))
    q = torch.randn(B, HKV * G, D)
    with pytest.raises(IndexSyncError, match="out of step"):
        attn.run(q, layer)
    assert rel_err(attn.run(q, layer), oracle(q, layer)) < 1e-5


def test_ctrl_c_during_an_append_lands_after_it_and_loses_nothing(monkeypatch):
    """A SIGINT that arrives between a window slot's overwrite and the host append is raised when the append is
    done: every token is where it belongs. Python's own handler is installed for the test: a process started in
    the background by a shell without job control inherits SIGINT ignored, and hetero then leaves it alone."""
    import os
    import signal

    import hetero.tiers as tiers

    layer = _layer("exact", tokens=20)
    real = tiers.HostTier.append

    def signalled(self, *a):
        os.kill(os.getpid(), signal.SIGINT)  # delivered at the next bytecode boundary of the main thread
        return real(self, *a)

    monkeypatch.setattr(tiers.HostTier, "append", signalled)
    k, v = torch.randn(B, HKV, 6, D), torch.randn(B, HKV, 6, D)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            layer.append(k, v)
    finally:
        signal.signal(signal.SIGINT, inherited)
    monkeypatch.undo()
    fresh = _layer("exact", tokens=20)
    fresh.append(k, v)
    assert _same_logical(_logical(fresh), _logical(layer)) and layer.index.idle


def test_a_decode_whose_step_fails_takes_its_token_back(monkeypatch):
    layer = _layer("exact", tokens=20)
    attn = HeteroAttention(layer.config)
    before = _logical(layer)
    real = type(layer.retriever).search

    def failing(self, *a, **kw):
        raise MemoryError("injected")

    monkeypatch.setattr(type(layer.retriever), "search", failing)
    q, k, v = torch.randn(B, HKV * G, D), torch.randn(B, HKV, D), torch.randn(B, HKV, D)
    with pytest.raises(MemoryError):
        attn.decode(q, k, v, layer, attn.plan(layer, HKV * G))
    assert _same_logical(before, _logical(layer))
    monkeypatch.setattr(type(layer.retriever), "search", real)
    got = attn.decode(q, k, v, layer, attn.plan(layer, HKV * G))
    fresh = _layer("exact", tokens=20)
    fresh.append(k, v)
    assert torch.equal(got, HeteroAttention(fresh.config).run(q, fresh))


def test_an_add_queued_before_a_reset_reports_nothing_against_the_new_tokens(monkeypatch):
    import threading

    indexer = Worker("test-reset-inflight")
    layer = _layer("exact", indexer=indexer, tokens=20)
    entered, release = threading.Event(), threading.Event()

    def slow_failing(self, seq, keys):
        entered.set()
        release.wait(10)
        raise RuntimeError("the old add failed")

    monkeypatch.setattr(type(layer.retriever), "add", slow_failing)
    k = torch.randn(B, HKV, 6, D)
    layer.append(k, torch.randn_like(k))
    assert entered.wait(10)
    layer.reset()
    monkeypatch.undo()
    layer.append(torch.randn(B, HKV, 30, D), torch.randn(B, HKV, 30, D))
    release.set()
    layer.wait_indexed()  # nothing to report: the failed add belonged to the tokens reset() dropped
    assert list(layer.retriever.ntotal) == list(layer.host.length)
    indexer.close()


def test_a_call_submitted_while_the_worker_closes_fails_or_runs_never_hangs(monkeypatch):
    """submit()'s check and its put are one step against close(): the call is refused, or it runs."""
    import threading
    import time

    import hetero.worker as worker_module

    w = Worker("test-close-race")

    class SlowFuture(worker_module.Future):
        def __init__(self):
            time.sleep(0.2)  # widens the window between submit's start and its put
            super().__init__()

    monkeypatch.setattr(worker_module, "Future", SlowFuture)
    result = []
    t = threading.Thread(target=lambda: result.append(_submit_or_closed(w)))
    t.start()
    time.sleep(0.05)
    w.close()
    t.join(10)
    fut = result[0]
    assert fut == "closed" or fut.result(timeout=10) == 42


def _submit_or_closed(w):
    try:
        return w.submit(lambda: 42)
    except ClosedError:
        return "closed"


def test_a_forked_child_serves_its_workers_and_the_parent_goes_on():
    """After os.fork() the child has no worker thread of the parent's: its queued calls run on a new one (a call
    the parent's thread was running fails there), so neither process waits forever."""
    code = textwrap.dedent("""
        import os, threading, time, hetero, torch
        from hetero.worker import Worker
        w = Worker("forked")
        gate = threading.Event()
        running = w.submit(gate.wait)          # the parent's thread is inside this call at the fork
        while w._running[0] is not running:
            time.sleep(0.001)
        queued = w.submit(lambda: 7)
        pid = os.fork()
        if pid == 0:
            try:
                running.result(timeout=10)
                os._exit(3)
            except hetero.ClosedError:
                pass
            os._exit(0 if queued.result(timeout=10) == 7 and w.submit(lambda: 8).result(timeout=10) == 8 else 4)
        gate.set()
        _, status = os.waitpid(pid, 0)
        assert running.result(timeout=10) is True and queued.result(timeout=10) == 7
        print("child", os.waitstatus_to_exitcode(status))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "child 0" in out.stdout, out.stderr


@pytest.mark.parametrize("overlap", [False, True])
def test_storage_made_under_inference_mode_is_written_outside_it(overlap):
    """Decode steps under ``torch.inference_mode()`` train the index and grow the step's workspaces; tensors made
    there could not be written outside it: the next chunk's index add and the next steps failed."""
    from helpers import oracle, rel_err

    gen = torch.Generator().manual_seed(2)
    cfg = HeteroConfig(window=16, sinks=2, budget=1.0, retriever="ivf-group", overlap=overlap,
                       retriever_options={"min_train": 64, "retrain_factor": 1.5})
    layer = LayerCache(cfg)
    layer.append(torch.randn(1, 2, 40, 16, generator=gen), torch.randn(1, 2, 40, 16, generator=gen))  # untrained
    attn = HeteroAttention(cfg)
    with torch.inference_mode():
        plan = attn.plan(layer, 4)
        for _ in range(150):  # trains at 64 host keys, retrains at 96, grows the workspaces
            attn.decode(torch.randn(1, 4, 16, generator=gen), torch.randn(1, 2, 16, generator=gen),
                        torch.randn(1, 2, 16, generator=gen), layer, plan)
        layer.wait_indexed()
    assert layer.retriever._seqs[0] is not None
    layer.append(torch.randn(1, 2, 5, 16, generator=gen), torch.randn(1, 2, 5, 16, generator=gen))
    layer.wait_indexed()
    for _ in range(3):
        q = torch.randn(1, 4, 16, generator=gen)
        out = attn.decode(q, torch.randn(1, 2, 16, generator=gen), torch.randn(1, 2, 16, generator=gen), layer, plan)
        assert rel_err(out, oracle(q, layer)) < 1e-5


def _native_ready(layer) -> bool:
    from hetero import native

    return native.load() is not None and layer._native_ok


def test_an_interrupt_between_the_native_append_and_its_index_add_is_found_and_healed(monkeypatch):
    """The C++ decode append stores the token and leaves a faiss index's add to Python: a Ctrl-C before that add
    leaves the write mark, so the next step finds the index behind the tier, heals it and says so."""
    from hetero.indexing import IndexQueue

    layer = _layer("ivf", tokens=40)
    if not _native_ready(layer):
        pytest.skip("the C++ extension is not built: no native append")
    real = IndexQueue.add

    def interrupted(self, seq, first, n):
        if seq == 1:
            raise KeyboardInterrupt
        return real(self, seq, first, n)

    monkeypatch.setattr(IndexQueue, "add", interrupted)
    with pytest.raises(KeyboardInterrupt):
        layer.append(torch.randn(B, HKV, D), torch.randn(B, HKV, D))
    monkeypatch.undo()
    assert list(layer.retriever.ntotal) != list(layer.host.length) and not layer.index.idle
    with pytest.raises(IndexSyncError, match="out of step"):
        layer.wait_indexed()
    assert list(layer.retriever.ntotal) == list(layer.host.length) and layer.index.idle


def test_a_native_decode_whose_step_fails_afterwards_takes_its_token_back(monkeypatch):
    """The C++ decode call appends the token, then leaves the step to run() (a workspace to grow): when that fails,
    the token goes back out, so that the same decode again appends it once."""
    import hetero.plan as plan_mod

    cfg = HeteroConfig(window=8, sinks=1, retriever="ivf-group", budget=0.5, block_tokens=4,
                       retriever_options={"min_train": 16})
    layer, attn = LayerCache(cfg), HeteroAttention(cfg)
    gen = torch.Generator().manual_seed(0)
    layer.append(torch.randn(B, HKV, 40, D, generator=gen), torch.randn(B, HKV, 40, D, generator=gen))
    if not _native_ready(layer):
        pytest.skip("the C++ extension is not built: no native decode")
    plan = attn.plan(layer, HKV * G)
    attn.decode(torch.randn(B, HKV * G, D), torch.randn(B, HKV, D), torch.randn(B, HKV, D), layer, plan)
    layer.append(torch.randn(B, HKV, 200, D, generator=gen), torch.randn(B, HKV, 200, D, generator=gen))
    layer.wait_indexed()
    plan = attn.plan(layer, HKV * G)  # the host tier grew 5x: the budget outgrows the workspace made before
    before = _logical(layer)

    def no_memory(self, *a, **kw):
        raise MemoryError("injected")

    q, k, v = torch.randn(B, HKV * G, D), torch.randn(B, HKV, D), torch.randn(B, HKV, D)
    monkeypatch.setattr(plan_mod.LayerWorkspace, "__init__", no_memory)
    with pytest.raises(MemoryError):
        attn.decode(q, k, v, layer, plan)
    monkeypatch.undo()
    assert _same_logical(before, _logical(layer))
    attn.decode(q, k, v, layer, plan)
    assert [int(n) for n in layer.fast.total] == [int(n) + 1 for n in before[1]]


@pytest.mark.parametrize("fail_seq", [0, 1])
def test_a_crop_whose_refill_copy_fails_changes_no_sequence(monkeypatch, fail_seq):
    """Every sequence's refill is copied before any sequence is cropped: one copy failing leaves them all."""
    import hetero.tiers as tiers

    layer = _layer("exact", tokens=30)
    before = _logical(layer)
    real = tiers.HostTier.keys

    def keys(self, seq, *a):
        if seq == fail_seq:
            raise MemoryError("injected")
        return real(self, seq, *a)

    monkeypatch.setattr(tiers.HostTier, "keys", keys)
    with pytest.raises(MemoryError):
        layer.crop([20, 8])
    monkeypatch.undo()
    assert _same_logical(before, _logical(layer))


def test_a_reset_whose_staging_fails_still_leaves_an_empty_usable_layer(monkeypatch):
    layer = _layer("ivf", tokens=40)

    class FailingStage:
        def drop(self):
            raise KeyboardInterrupt

        def __bool__(self):
            return False

    layer._stage = FailingStage()
    with pytest.raises(KeyboardInterrupt):
        layer.reset()
    assert not layer.initialized
    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(B, HKV, 30, D, generator=gen), torch.randn(B, HKV, 30, D, generator=gen)
    layer.append(k, v)
    q = torch.randn(B, HKV * G, D)
    attn = HeteroAttention(layer.config.with_(budget=1.0))
    assert rel_err(attn.run(q, layer), oracle(q, layer)) < 1e-5


def test_tokens_read_while_another_thread_appends_are_one_snapshot():
    """tokens() reads both tiers under the layer's lock: each snapshot is the positions 0..n-1, in order."""
    cfg = HeteroConfig(window=8, sinks=2, retriever="exact", budget=8, block_tokens=4)
    layer = LayerCache(cfg)

    def token(pos):  # a key whose every element is its position
        return torch.full((1, 1, 1, 4), float(pos)), torch.zeros(1, 1, 1, 4)

    layer.append(*token(0))
    stop, bad = threading.Event(), []

    def appender():
        for pos in range(1, 3000):
            layer.append(*token(pos))
        stop.set()

    t = threading.Thread(target=appender)
    t.start()
    while not stop.is_set():
        keys = layer.tokens(0)[0][0, :, 0]
        if not torch.equal(keys, torch.arange(keys.shape[0], dtype=keys.dtype)):
            bad.append(keys.tolist())
    t.join()
    assert not bad, bad[0]


@pytest.mark.parametrize("overlap", [False, True], ids=["fused", "general"])
def test_a_retriever_that_fails_is_reported_as_the_host_side_of_the_layer(monkeypatch, overlap):
    layer = _layer("exact", tokens=20, overlap=overlap)
    attn = HeteroAttention(layer.config)

    def failing(self, *a, **kw):
        raise RuntimeError("injected")

    monkeypatch.setattr(type(layer.retriever), "search", failing)
    with pytest.raises(HeteroError, match=r"host side of layer 0 failed \(RuntimeError: injected\)"):
        attn.run(torch.randn(B, HKV * G, D), layer)


@pytest.mark.parametrize("rebuild_fails", [False, True], ids=["healed", "healed-at-the-retry"])
@pytest.mark.parametrize("retriever", ["ivf", "ivf-sq8", "ivf-pq", "lsh", "exact"])
def test_an_index_healed_after_a_failed_add_is_the_index_the_adds_would_have_made(retriever, rebuild_fails):
    """The rebuild after a failed add follows the adds that went in: an IVF index on the sizes it was built on
    before (not trained anew on the whole tier), LSH tables centred on the first add's mean; a rebuild that fails
    too keeps both for its retry. Later steps then equal those of a cache whose add never failed, bit for bit."""
    options = {"min_train": 64} if retriever.startswith("ivf") else {}  # trained on the first of two chunks
    cfg = HeteroConfig(window=8, sinks=1, retriever=retriever, budget=0.25, block_tokens=8,
                       retriever_options=options)
    gen = torch.Generator().manual_seed(5)
    chunks = [(torch.randn(B, HKV, 150, D, generator=gen), torch.randn(B, HKV, 150, D, generator=gen))
              for _ in range(2)]
    steps = [(torch.randn(B, HKV * G, D, generator=gen), torch.randn(B, HKV, D, generator=gen),
              torch.randn(B, HKV, D, generator=gen)) for _ in range(4)]
    outs = []
    for fail in (False, True):
        layer, attn = LayerCache(cfg), HeteroAttention(cfg)
        layer.append(*chunks[0])
        layer.wait_indexed()
        if fail:
            _FailingAdd(layer, RuntimeError("disk full"))
        layer.append(*chunks[1])
        if fail and rebuild_fails:
            _FailingAdd(layer, RuntimeError("still full"))  # the rebuild's first add
            with pytest.raises(IndexSyncError, match="rebuilding .* failed"):
                layer.wait_indexed()
        if fail:
            with pytest.raises(IndexSyncError, match="still full" if rebuild_fails else "disk full"):
                layer.wait_indexed()
        outs.append([attn.decode(q, k, v, layer, attn.plan(layer, HKV * G)) for q, k, v in steps])
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_a_native_decode_interrupted_after_its_write_takes_its_token_back(monkeypatch):
    """A Ctrl-C between the C++ decode call's write and the end of decode(): the token goes back out, as on the
    two-call path, so that the same decode again appends it once."""
    layer = _layer("ivf-group", tokens=40)
    if not _native_ready(layer):
        pytest.skip("the C++ extension is not built: no native decode")
    attn = HeteroAttention(layer.config)
    plan = attn.plan(layer, HKV * G)
    q, k, v = torch.randn(B, HKV * G, D), torch.randn(B, HKV, D), torch.randn(B, HKV, D)
    attn.decode(q, k, v, layer, plan)  # the plan's workspaces exist: the next decode is one native call
    before = _logical(layer)

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(LayerCache, "populate_host_ahead", interrupted)
    with pytest.raises(KeyboardInterrupt):
        attn.decode(q, k, v, layer, plan)
    monkeypatch.undo()
    assert _same_logical(before, _logical(layer))
