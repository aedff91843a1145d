"""``HeteroAttention.decode``: a decode token's append and the step over it in one call. It must equal
``layer.append`` then ``run`` bit for bit (every retriever, dtype, ragged batch, through host-block growth and the
index adds it leaves to Python), refuse a bad query or token before anything changes, and allocate nothing."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from hetero import HeteroAttention, HeteroConfig, LayerCache, native
from hetero.errors import HeteroError

needs_native = pytest.mark.skipif(native.load() is None, reason="C++ extension not built")


def _pair(retriever, dtype, batch, tokens=300, block_tokens=64):
    """Two identical layers (one for decode, one for append + run) and their runtimes."""
    cfg = HeteroConfig(window=48, sinks=4, budget=40, retriever=retriever, kv_dtype=dtype, block_tokens=block_tokens,
                       retriever_options={"min_train": 64} if retriever == "ivf-group" else {})
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(batch, 2, tokens, 32, generator=gen)
    v = torch.randn(batch, 2, tokens, 32, generator=gen)
    lengths = [tokens - 29 * b for b in range(batch)]
    layers = []
    for _ in range(2):
        layer = LayerCache(cfg)
        layer.append(k, v, lengths)
        layer.wait_indexed()
        layers.append(layer)
    return cfg, layers, (HeteroAttention(cfg), HeteroAttention(cfg)), gen


@needs_native
@pytest.mark.parametrize("retriever", ["ivf-group", "exact", "all", "ivf"])
@pytest.mark.parametrize("dtype,qdtype", [("bfloat16", torch.bfloat16), ("float32", torch.float32),
                                          ("float16", torch.float32)])
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_equals_append_then_run(retriever, dtype, qdtype, batch):
    """150 steps (several host blocks fill, the ivf-group tail list fills and goes to Python): identical outputs,
    lengths and host rows."""
    cfg, (a, b), (attn_a, attn_b), gen = _pair(retriever, dtype, batch)
    for step in range(150):
        k = torch.randn(batch, 2, 1, 32, generator=gen).to(qdtype)
        v = torch.randn(batch, 2, 1, 32, generator=gen).to(qdtype)
        q = torch.randn(batch, 8, 32, generator=gen).to(qdtype)
        pa, pb = attn_a.plan(a, 8, qdtype), attn_b.plan(b, 8, qdtype)
        out_a = attn_a.decode(q, k, v, a, pa)
        b.append(k, v)
        out_b = attn_b.run(q, b, pb)
        assert torch.equal(out_a, out_b), f"step {step}"
    assert a.seq_lengths() == b.seq_lengths() and a.host_lengths() == b.host_lengths()
    for seq in range(batch):
        for x, y in zip(a.tokens(seq), b.tokens(seq)):
            assert torch.equal(x, y)
    for attn in (attn_a, attn_b):
        attn.close()


@needs_native
def test_decode_records_the_append_as_its_own_phase():
    cfg, (a, _), (attn, _), gen = _pair("ivf-group", "bfloat16", 2)
    attn.record_phases = True
    plan = attn.plan(a, 8, torch.bfloat16)
    attn.decode(torch.randn(2, 8, 32).bfloat16(), torch.randn(2, 2, 32), torch.randn(2, 2, 32), a, plan)
    phases = attn.phases(plan, a)
    assert phases["evict"] > 0 and phases["window"] > 0 and phases["retrieve"] > 0
    a.append(torch.randn(2, 2, 32), torch.randn(2, 2, 32))
    attn.run(torch.randn(2, 8, 32).bfloat16(), a, plan)
    assert attn.phases(plan, a)["evict"] == 0  # a step alone appends nothing
    attn.close()


def _snapshot(layer):
    return (layer.seq_lengths(), layer.host_lengths(), [[t.clone() for t in layer.tokens(s)] for s in range(layer.batch)])


def _same(x, y):
    assert x[0] == y[0] and x[1] == y[1]
    for ta, tb in zip(x[2], y[2]):
        assert all(torch.equal(p, q) for p, q in zip(ta, tb))


@pytest.mark.parametrize("retriever", ["ivf-group", "exact"])
@pytest.mark.parametrize("bad", ["q_nan", "q_inf", "k_nan", "v_inf", "q_shape", "q_gqa", "k_shape", "out_shape",
                                 "out_dtype", "q_type", "plan_type"])
def test_bad_input_changes_nothing(retriever, bad):
    """A refused decode leaves the layer as it was: lengths, host tier, window, every token."""
    cfg, (a, _), (attn, _), gen = _pair(retriever, "bfloat16", 2)
    plan = attn.plan(a, 8, torch.bfloat16)
    for _ in range(3):  # warm: the native path has run
        attn.decode(torch.randn(2, 8, 32).bfloat16(), torch.randn(2, 2, 32), torch.randn(2, 2, 32), a, plan)
    q, k, v = torch.randn(2, 8, 32).bfloat16(), torch.randn(2, 2, 32), torch.randn(2, 2, 32)
    if bad == "q_nan":
        q[1, 3, 5] = float("nan")
    elif bad == "q_inf":
        q[0, 0, 0] = float("inf")
    elif bad == "k_nan":
        k[1, 1, 7] = float("nan")
    elif bad == "v_inf":
        v[0, 1, 0] = float("-inf")
    elif bad == "q_shape":
        q = torch.randn(2, 6, 32).bfloat16()  # valid GQA, not the plan's
    elif bad == "q_gqa":
        q = torch.randn(2, 7, 32).bfloat16()
    elif bad == "k_shape":
        k = torch.randn(2, 3, 32)
    out, step_plan = None, plan
    if bad == "out_shape":
        out = torch.empty(2, 8, 31, dtype=torch.bfloat16)
    elif bad == "out_dtype":
        out = torch.empty(2, 8, 32)
    elif bad == "q_type":
        q = q.tolist()
    elif bad == "plan_type":
        step_plan = "plan"
    before = _snapshot(a)
    with pytest.raises(HeteroError) as err:
        attn.decode(q, k, v, a, step_plan, out=out)
    if bad in ("q_nan", "q_inf", "k_nan", "v_inf"):
        assert "NaN or inf" in str(err.value)
    _same(before, _snapshot(a))
    good = attn.decode(torch.randn(2, 8, 32).bfloat16(), torch.randn(2, 2, 32), torch.randn(2, 2, 32), a, plan)
    assert torch.isfinite(good).all()  # the layer still works
    attn.close()


@needs_native
def test_decode_allocates_nothing_after_warm_up():
    cfg, (a, _), (attn, _), gen = _pair("ivf-group", "bfloat16", 2, tokens=600, block_tokens=4096)
    plan = attn.plan(a, 8, torch.bfloat16)
    inputs = [(torch.randn(2, 8, 32).bfloat16(), torch.randn(2, 2, 32).bfloat16(), torch.randn(2, 2, 32).bfloat16())
              for _ in range(110)]  # 100 measured: the ivf-group tail flushes on the way
    for q, k, v in inputs[:10]:
        attn.decode(q, k, v, a, plan, out=attn.output(plan, a))
    flushes = len(a.retriever._seqs[0].tail_starts)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for q, k, v in inputs[10:]:
            attn.decode(q, k, v, a, plan, out=attn.output(plan, a))
    allocations = sum(1 for e in prof.events() if getattr(e, "cpu_memory_usage", 0) > 0)
    assert allocations == 0
    assert len(a.retriever._seqs[0].tail_starts) > flushes        # a flush was among the measured steps
    attn.close()


def _decode_beside_append_then_run(monkeypatch, attn_a, attn_b, a, b, gen, steps):
    """``steps`` decode steps of ``a`` through ``attn_a.decode`` against ``b.append`` + ``attn_b.run``, outputs equal
    bit for bit at every step; returns how many times decode fell back to its general path."""
    fallbacks = []
    general = attn_a._append_then_run
    monkeypatch.setattr(attn_a, "_append_then_run", lambda *args: fallbacks.append(1) or general(*args))
    for step in range(steps):
        k, v = torch.randn(2, 2, 1, 32, generator=gen), torch.randn(2, 2, 1, 32, generator=gen)
        q = torch.randn(2, 8, 32, generator=gen).bfloat16()
        out_a = attn_a.decode(q, k, v, a, attn_a.plan(a, 8, torch.bfloat16))
        b.append(k, v)
        assert torch.equal(out_a, attn_b.run(q, b, attn_b.plan(b, 8, torch.bfloat16))), f"step {step}"
    return len(fallbacks)


@needs_native
def test_decode_reserves_full_host_blocks_within_the_native_step(monkeypatch):
    """A token whose sequence's host blocks are full: decode reserves a block and makes the same native call again,
    rather than falling back to append-then-run; outputs equal append + run throughout."""
    cfg, (a, b), (attn_a, attn_b), gen = _pair("ivf-group", "bfloat16", 2, block_tokens=16)
    blocks = [len(x) for x in a.host.blocks]
    assert _decode_beside_append_then_run(monkeypatch, attn_a, attn_b, a, b, gen, 40) == 0
    assert all(len(x) > n for x, n in zip(a.host.blocks, blocks))  # every sequence filled at least one block
    for attn in (attn_a, attn_b):
        attn.close()


@needs_native
@pytest.mark.parametrize("retriever", ["ivf-group", "exact"])
@pytest.mark.parametrize("window", [16, 1100])
def test_fused_step_is_the_same_on_every_pool_size(retriever, window):
    """A step's searches, window chunks and host-row chunks run as one pool run, each host item waiting for its own
    search: on 1, 2 and 3 threads (more threads than some phases have items), over a ragged batch whose items have
    different search costs, with a window of one chunk and of three, every step's output is the same bit for bit."""
    batch, tokens = 3, 3000
    gen = torch.Generator().manual_seed(7)
    k = torch.randn(batch, 2, tokens, 32, generator=gen)
    v = torch.randn(batch, 2, tokens, 32, generator=gen)
    lengths = [tokens - 900 * b for b in range(batch)]
    steps = [(torch.randn(batch, 8, 32, generator=gen), torch.randn(batch, 2, 32, generator=gen),
              torch.randn(batch, 2, 32, generator=gen)) for _ in range(40)]
    outs = []
    for threads in (1, 2, 3):
        cfg = HeteroConfig(window=window, sinks=4, budget=0.3, retriever=retriever, threads=threads,
                           retriever_options={"min_train": 64} if retriever == "ivf-group" else {})
        layer = LayerCache(cfg)
        layer.append(k, v, lengths)
        layer.wait_indexed()
        attn = HeteroAttention(cfg)
        got = []
        for q, kn, vn in steps:
            plan = attn.plan(layer, 8, torch.float32)
            assert plan.fused
            got.append(attn.decode(q, kn, vn, layer, plan))
        attn.close()
        outs.append(got)
    for threads, got in zip((2, 3), outs[1:]):
        for step, (x, y) in enumerate(zip(outs[0], got)):
            assert torch.equal(x, y), (threads, step)


@needs_native
def test_decode_under_an_equal_config_takes_the_native_call(monkeypatch):
    """A runtime whose config equals the layer's in everything a layer is built with, but is another object (the HF
    cache's runtime carries the model's softmax scale: ``config.with_(scale=...)``), still appends and attends in
    one native call, and equals append + run under the same runtime."""
    cfg, (a, b), _, gen = _pair("ivf-group", "bfloat16", 2)
    scaled = cfg.with_(scale=0.125)
    attn_a, attn_b = HeteroAttention(scaled), HeteroAttention(scaled)
    assert _decode_beside_append_then_run(monkeypatch, attn_a, attn_b, a, b, gen, 20) == 0
    for attn in (attn_a, attn_b):
        attn.close()


@needs_native
@pytest.mark.parametrize("path", ["native", "general"])
def test_decode_under_an_incompatible_config_is_refused_before_the_token_goes_in(monkeypatch, path):
    """A step plan made by a runtime the layer fits, handed to one whose config builds layers differently (another
    window): refused before any append (none is attempted), on the one-call path and on the general one."""
    cfg, (a, _), (good, _), gen = _pair("ivf-group", "bfloat16", 2)
    attn = HeteroAttention(cfg.with_(window=64))
    plan = good.plan(a, 8, torch.bfloat16)
    if path == "general":  # what a token the native append cannot take goes through
        monkeypatch.setattr(a, "native_token", lambda k, v: None)
    appends = []
    monkeypatch.setattr(a, "append", lambda *args, **kw: appends.append(1))
    monkeypatch.setattr(a, "_append_native", lambda *args, **kw: appends.append(1))
    before = _snapshot(a)
    with pytest.raises(HeteroError, match="window"):
        attn.decode(torch.randn(2, 8, 32).bfloat16(), torch.randn(2, 2, 32), torch.randn(2, 2, 32), a, plan)
    assert not appends
    _same(before, _snapshot(a))
    for x in (attn, good):
        x.close()


@needs_native
def test_a_token_as_a_models_projection_leaves_it_takes_the_native_call(monkeypatch):
    """k and v ``[B, Hkv, 1, D]`` as a model's projection leaves them (a transposed view, whose size-1 token dimension
    has a stride of its own, different for k and v) take the one-call path with no copy, and decode what
    contiguous ``[B, Hkv, D]`` tokens decode; rows that are not contiguous, or another shape, take the general path."""
    cfg, (a, b), (attn_a, attn_b), gen = _pair("ivf-group", "bfloat16", 2)
    fallbacks = []
    general = attn_a._append_then_run
    monkeypatch.setattr(attn_a, "_append_then_run", lambda *args: fallbacks.append(1) or general(*args))
    for step in range(30):
        k = torch.randn(2, 1, 2 * 32, generator=gen).view(2, 1, 2, 32).transpose(1, 2)  # [B, Hkv, 1, D]
        v = torch.randn(2, 1, 2 * 32, generator=gen).view(2, 1, 2, 32).transpose(1, 2)
        v = torch.as_strided(v, v.shape, (v.stride(0), v.stride(1), 7, 1))  # the token stride: any
        assert k.stride(2) != v.stride(2) and a.native_token(k, v)[0] is k
        q = torch.randn(2, 8, 32, generator=gen).bfloat16()
        out_a = attn_a.decode(q, k, v, a, attn_a.plan(a, 8, torch.bfloat16))
        out_b = attn_b.decode(q, k[:, :, 0].contiguous(), v[:, :, 0].contiguous(), b,
                              attn_b.plan(b, 8, torch.bfloat16))
        assert torch.equal(out_a, out_b), f"step {step}"
    assert not fallbacks
    k = torch.randn(2, 2, 1, 64, generator=gen)
    assert a.native_token(k[..., ::2], k[..., ::2]) is None                       # rows not contiguous
    assert a.native_token(k[..., :32], k[..., 32:].transpose(0, 1)) is None       # another shape
    assert a.native_token(torch.randn(2, 2, 2, 32), torch.randn(2, 2, 2, 32)) is None  # two tokens
    for attn in (attn_a, attn_b):
        attn.close()
