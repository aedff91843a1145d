"""Tiered cache: every token in exactly one tier, in order, tiers sized as configured."""
import torch
from hypothesis import given, settings, strategies as st

from hetero import HeteroConfig, LayerCache, TieredKVCache


def _expected_tiers(total, sinks, window):
    n_sink = min(total, sinks)
    n_win = min(max(total - sinks, 0), window)
    return n_sink, total - n_sink - n_win, n_win


@settings(max_examples=60, deadline=None)
@given(
    sinks=st.integers(0, 5), window=st.integers(0, 9), block=st.integers(1, 6), batch=st.integers(1, 3),
    ops=st.lists(st.tuples(st.sampled_from(["prefill", "decode"]), st.lists(st.integers(0, 25), min_size=3,
                                                                              max_size=3)), max_size=12),
)
def test_token_accounting(sinks, window, block, batch, ops):
    cfg = HeteroConfig(window=window, sinks=sinks, block_tokens=block, retriever="all")
    layer = LayerCache(cfg)
    hkv, d = 2, 3
    logical = [[] for _ in range(batch)]
    counter = 0
    for kind, sizes in ops:
        t = 1 if kind == "decode" else max(sizes[:batch])
        lengths = [1] * batch if kind == "decode" else sizes[:batch]
        if kind == "decode" and t == 0:
            continue
        # token ids encoded in the key values: every entry of token i equals i
        keys = torch.full((batch, hkv, max(t, 1), d), -1.0)
        for b in range(batch):
            for j in range(lengths[b]):
                counter += 1
                keys[b, :, j] = counter
                logical[b].append(counter)
        layer.append(keys[:, :, :t] if t else keys[:, :, :0], (keys[:, :, :t] * 2) if t else keys[:, :, :0],
                     torch.tensor(lengths) if kind == "prefill" else None)
    if not layer.initialized:
        return
    for b in range(batch):
        k, v = layer.tokens(b)
        ids = k[0, :, 0].long().tolist()
        assert ids == logical[b]                    # every token exactly once, in order
        assert torch.equal(v, 2 * k)               # values travel with their keys
        n_sink, n_host, n_win = _expected_tiers(len(logical[b]), sinks, window)
        assert layer.host.length[b] == n_host
        assert int(layer.fast.lengths[b]) == n_sink + n_win
        assert layer.retriever.ntotal[b] == n_host
        host_ids = layer.host.keys(b)[0, :, 0].long().tolist()
        assert host_ids == logical[b][n_sink:n_sink + n_host]
    mem = layer.memory()
    per_token = hkv * d * 4 * 2
    assert mem["host_bytes"] == sum(layer.host.length) * per_token
    assert mem["fast_bytes"] == int(layer.fast.lengths.sum()) * per_token


def test_dense_layer_keeps_everything_on_fast_tier():
    cfg = HeteroConfig(window=4, sinks=1, dense_layers=(1,), retriever="all")
    cache = TieredKVCache(cfg, num_layers=2)
    k = torch.randn(1, 2, 50, 8)
    for layer in cache.layers:
        layer.append(k, k)
    assert cache[0].host_lengths() == [45] and cache[1].host_lengths() == [0]
    assert int(cache[1].fast.lengths[0]) == 50
    assert torch.equal(cache[1].tokens(0)[0], k[0])
    assert cache.memory()["host_bytes"] == 45 * 2 * 8 * 4 * 2


def test_host_keys_view_when_blocks_consecutive():
    cfg = HeteroConfig(window=2, sinks=0, block_tokens=4, retriever="all")
    layer = LayerCache(cfg)
    layer.append(torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8))
    view = layer.host.keys(0)
    assert view.data_ptr() == layer.host.k_pool.data_ptr()  # no copy for a single sequence


def test_kv_dtype_cast_on_store():
    cfg = HeteroConfig(window=2, sinks=0, kv_dtype="bf16", retriever="all")
    layer = LayerCache(cfg)
    k = torch.randn(1, 2, 10, 8)
    layer.append(k, k)
    assert layer.dtype == torch.bfloat16 and layer.host.k_pool.dtype == torch.bfloat16
    assert torch.equal(layer.tokens(0)[0], k[0].bfloat16())
