"""The CUDA append path run on the CPU: tokens leaving the window go through the eviction stage (hetero/evictions.py)
and land in the host tier when the host side needs them; everything a caller sees equals the direct path."""
import pytest
import torch

from hetero import HeteroAttention, HeteroConfig, InvalidValueError, LayerCache
from hetero.worker import Worker

from helpers import oracle, rel_err


def _pair(retriever, indexer=False, window=16, sinks=2):
    options = {"min_train": 32} if retriever == "ivf-group" else {}
    cfg = HeteroConfig(window=window, sinks=sinks, budget=24, retriever=retriever, retriever_options=options,
                       block_tokens=8)
    direct = LayerCache(cfg, indexer=Worker("direct") if indexer else None)
    staged = LayerCache(cfg, indexer=Worker("staged") if indexer else None)
    staged.staged_evictions = True
    return cfg, direct, staged


def _same_state(a, b):
    assert a.seq_lengths() == b.seq_lengths() and a.host_lengths() == b.host_lengths()
    assert a.retriever.ntotal == b.retriever.ntotal == b.host_lengths()
    for seq in range(a.batch):
        assert all(torch.equal(x, y) for x, y in zip(a.tokens(seq), b.tokens(seq)))


@pytest.mark.parametrize("retriever", ["all", "ivf-group", "ivf"])
@pytest.mark.parametrize("indexer", [False, True], ids=["inline", "background"])
def test_staged_path_equals_direct_path(retriever, indexer):
    cfg, direct, staged = _pair(retriever, indexer)
    attn = HeteroAttention(cfg)
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(2, 2, 150, 16, generator=gen)
    v = torch.randn(2, 2, 150, 16, generator=gen)
    for layer in (direct, staged):
        layer.append(k, v, [150, 97])
    assert staged.evictions_pending  # the prefill's evicted tokens wait in the stage
    for step in range(40):
        kk, vv = torch.randn(2, 2, 16, generator=gen), torch.randn(2, 2, 16, generator=gen)
        q = torch.randn(2, 6, 16, generator=gen)
        outs = []
        for layer in (direct, staged):
            layer.append(kk, vv)
            outs.append(attn.run(q, layer))
        assert not staged.evictions_pending  # the run landed them
        assert torch.equal(outs[0], outs[1]), step
        if retriever == "all":
            assert rel_err(outs[1], oracle(q, staged)) < 1e-5
    _same_state(direct, staged)
    for layer in (direct, staged):
        layer.crop([120, 60])
    _same_state(direct, staged)
    attn.close()
    for layer in (direct, staged):
        if layer.indexer is not None:
            layer.indexer.close()


def _logical(layer):
    return (layer.seq_lengths(), layer.host_lengths(), layer.retriever.ntotal,
            [t for seq in range(layer.batch) for t in layer.tokens(seq)])


def test_a_non_finite_staged_append_is_undone_when_it_lands():
    cfg, _, staged = _pair("ivf-group")
    gen = torch.Generator().manual_seed(1)
    staged.append(torch.randn(1, 2, 100, 16, generator=gen), torch.randn(1, 2, 100, 16, generator=gen))
    staged.host_lengths()  # land the prefill
    before = _logical(staged)
    bad = torch.randn(1, 2, 5, 16, generator=gen)
    bad[0, 1, 3, 7] = float("nan")
    staged.append(bad, torch.randn(1, 2, 5, 16, generator=gen))  # the device checks; the verdict comes back later
    attn = HeteroAttention(cfg)
    with pytest.raises(InvalidValueError, match="NaN or inf.*undone"):
        attn.run(torch.randn(1, 4, 16, generator=gen), staged)
    after = _logical(staged)  # the slots and rows past the lengths may hold the undone tokens: not compared
    assert before[:3] == after[:3] and all(torch.equal(x, y) for x, y in zip(before[3], after[3]))
    attn.run(torch.randn(1, 4, 16, generator=gen), staged)  # and the layer goes on
    attn.close()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")])
def test_a_non_finite_staged_append_is_refused_in_every_storage_dtype(dtype, bad):
    """The device's check compares magnitudes with the value limit in the storage dtype: float16 rounded the limit
    (1e15) to inf, and inf passed."""
    layer = LayerCache(HeteroConfig(window=3, sinks=0, block_tokens=2, retriever="all", budget=8))
    layer.staged_evictions = True
    k, v = torch.randn(1, 1, 8).to(dtype), torch.randn(1, 1, 8).to(dtype)
    v[0, 0, 3] = bad
    layer.append(k, v)
    with pytest.raises(InvalidValueError, match="undone"):
        layer.host_lengths()
    assert layer.seq_lengths() == [0]


def test_inspection_lands_pending_evictions():
    _, direct, staged = _pair("exact")
    k, v = torch.randn(1, 2, 60, 16), torch.randn(1, 2, 60, 16)
    for layer in (direct, staged):
        layer.append(k, v)
    assert staged.memory() == direct.memory()
    assert not staged.evictions_pending


@pytest.mark.parametrize("where", [0, 1, 2, 3])
def test_a_refused_staged_append_whose_evicted_tokens_hold_nan_leaves_the_index_whole(where):
    """The device's verdict lands with the evicted tokens: the append is undone without the index ever taking them
    (it refuses NaN keys, and rebuilding it from a tier that still held them failed: IndexSyncError on every step)."""
    cfg = HeteroConfig(window=3, sinks=0, block_tokens=2, retriever="ivf-group", retriever_options={"min_train": 6},
                       kv_dtype="bfloat16")
    layer = LayerCache(cfg)
    layer.staged_evictions = True
    gen = torch.Generator().manual_seed(where)
    for _ in range(3):
        layer.append(torch.randn(1, 1, 9, 8, generator=gen), torch.randn(1, 1, 9, 8, generator=gen))
    layer.host_lengths()
    before = [t.clone() for t in layer.tokens(0)]
    k = torch.randn(1, 1, 4, 8, generator=gen)
    k[0, 0, where, 1] = float("nan")
    with pytest.raises(InvalidValueError):
        layer.append(k, torch.randn_like(k))
        layer.host_lengths()  # lands the record: the verdict
    layer.wait_indexed()
    assert all(torch.equal(a, b) for a, b in zip(before, layer.tokens(0)))
    assert layer.retriever.ntotal == layer.host_lengths()
