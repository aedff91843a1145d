"""Exact mode (retriever="all"): window part + host part + merge equals dense attention."""
import pytest
import torch

from hetero import HeteroAttention, HeteroConfig, LayerCache
from hetero.errors import InvalidValueError, UnsupportedError
from hetero.reference import dense_attention

from helpers import oracle, rel_err

WINDOW, SINKS = 8, 2


def _run(lengths, hkv, g, d=16, dtype=torch.float32, decode_steps=2, window=WINDOW, sinks=SINKS, seed=0,
         retriever="all", block_tokens=4):
    gen = torch.Generator().manual_seed(seed)
    b = len(lengths)
    cfg = HeteroConfig(window=window, sinks=sinks, retriever=retriever, block_tokens=block_tokens, budget=1.0)
    layer = LayerCache(cfg)
    t = max(max(lengths), 1)
    k = torch.randn(b, hkv, t, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, t, d, generator=gen).to(dtype)
    layer.append(k, v, torch.tensor(lengths))
    attn = HeteroAttention(cfg)
    results = []
    for _ in range(decode_steps):
        layer.append(torch.randn(b, hkv, d, generator=gen).to(dtype), torch.randn(b, hkv, d, generator=gen).to(dtype))
        q = (torch.randn(b, hkv * g, d, generator=gen) * 2).to(dtype)
        results.append((q, attn.run(q, layer), oracle(q, layer)))
    return layer, results


LENGTHS = [0, 1, SINKS + WINDOW - 1, SINKS + WINDOW, SINKS + WINDOW + 1, 37, 113]


@pytest.mark.parametrize("g", [1, 3, 4, 8])
@pytest.mark.parametrize("n", LENGTHS)
def test_exact_mode_batch1_fp32(n, g):
    _, results = _run([n], hkv=2, g=g)
    for _, out, ref in results:
        assert out.dtype == torch.float32
        assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("hkv,g", [(1, 8), (2, 4), (4, 1), (3, 3)])  # MQA, GQA, MHA
def test_exact_mode_ragged_batch3(hkv, g):
    _, results = _run([113, 0, SINKS + WINDOW + 1], hkv=hkv, g=g)
    for _, out, ref in results:
        for b in range(3):
            assert rel_err(out[b], ref[b]) <= 1e-5


def test_exact_mode_no_window_no_sinks():
    _, results = _run([50, 3], hkv=2, g=2, window=0, sinks=0)
    for _, out, ref in results:
        assert rel_err(out, ref) <= 1e-5



@pytest.mark.parametrize("retriever", ["all", "exact"])
def test_heads_wider_than_the_kernels_take_run_on_the_python_path(retriever):
    """head_dim 513 is above what the C++ kernels, the fused step and the native append take (512): the plan picks
    backends that can run it, the decode tokens go through the general append, and the result is still exact."""
    layer, results = _run([40, 13], hkv=2, g=2, d=513, retriever=retriever, decode_steps=3)
    for _, out, ref in results:
        assert rel_err(out, ref) <= 1e-5
    plan = HeteroAttention(layer.config).plan(layer, 4)
    assert not plan.fused and plan.window.name != "cpp" and plan.host.name != "cpp"


def test_ivf_group_refuses_heads_wider_than_its_codes_before_anything_is_stored():
    layer = LayerCache(HeteroConfig(window=8, sinks=2, retriever="ivf-group"))
    with pytest.raises(UnsupportedError, match="head_dim <= 512"):
        layer.append(torch.randn(1, 2, 40, 520), torch.randn(1, 2, 40, 520))
    assert not layer.initialized and layer.seq_lengths() == []

def test_exact_mode_odd_block_size_many_decode_steps():
    _, results = _run([57, 30, 9], hkv=2, g=4, block_tokens=7, decode_steps=20)
    for _, out, ref in results:
        assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_exact_mode_low_precision_within_2x_of_torch(dtype):
    """Stored in bf16/fp16, hetero's error vs float64 is at most 2x that of PyTorch computing the same
    attention natively in that dtype (SDPA over the same rounded K/V)."""
    layer, results = _run([300, 41, 12], hkv=2, g=4, d=32, dtype=dtype, decode_steps=3)
    for q, out, ref in results:
        assert out.dtype == dtype
        for b in range(3):
            k, v = layer.tokens(b)
            qg = q[b:b + 1].reshape(1, 2, 4, 32)
            torch_out = torch.nn.functional.scaled_dot_product_attention(qg, k[None], v[None]).reshape(1, 8, 32)
            e_torch = rel_err(torch_out[0], ref[b])
            assert rel_err(out[b], ref[b]) <= 2 * e_torch + 1e-7


def test_exact_topk_with_full_budget_is_exact():
    _, results = _run([113, 20], hkv=2, g=4, retriever="exact")
    for _, out, ref in results:
        assert rel_err(out, ref) <= 1e-5


def test_nan_in_unused_fast_slots_never_reaches_output():
    layer, _ = _run([5], hkv=2, g=2, decode_steps=0)
    layer.fast.k[:, :, int(layer.fast.lengths[0]):] = float("nan")
    layer.fast.v[:, :, int(layer.fast.lengths[0]):] = float("nan")
    q = torch.randn(1, 4, 16)
    out = HeteroAttention(layer.config).run(q, layer)
    assert torch.isfinite(out).all()
    assert rel_err(out, oracle(q, layer)) <= 1e-5


def test_details_report_parts_and_timings():
    layer, _ = _run([60], hkv=2, g=2, decode_steps=0)
    q = torch.randn(1, 4, 16)
    res = HeteroAttention(layer.config).run(q, layer, return_details=True)
    assert set(res.timings_ms) >= {"window", "retrieve", "host_attn", "merge"}
    assert res.rows_read == 2 * layer.host.length[0]
    full = dense_attention(q.double(), *(t[None].double() for t in layer.tokens(0)), compute_dtype=torch.float64)
    lse = torch.logaddexp(res.window.lse.double(), res.host.lse.double())
    assert torch.allclose(lse, full.lse, atol=1e-5)


@pytest.mark.parametrize("chunk,g", [(1, 4), (5, 4), (20, 4), (7, 3)])
def test_small_chunk_into_a_warm_cache_is_exact(chunk, g):
    """A chunk of at most ``sparse_chunk_tokens`` queries (a short turn, assisted decoding's drafts) over a ragged
    warm cache in exact mode: each position equals float64 attention over the stored tokens and the chunk's own up
    to it. At G * C > 64 the folded fast-tier part takes more than one window call (20 positions x 4 heads)."""
    from hetero.chunk import chunk_attention

    gen = torch.Generator().manual_seed(5)
    hkv, d, lengths = 2, 16, [90, 61]
    cfg = HeteroConfig(window=WINDOW, sinks=SINKS, retriever="all", block_tokens=4, budget=1.0, sparse_chunk_tokens=24)
    layer = LayerCache(cfg)
    layer.append(torch.randn(2, hkv, 90, d, generator=gen), torch.randn(2, hkv, 90, d, generator=gen),
                 torch.tensor(lengths))
    q = torch.randn(2, hkv * g, chunk, d, generator=gen) * 2
    k, v = torch.randn(2, hkv, chunk, d, generator=gen), torch.randn(2, hkv, chunk, d, generator=gen)
    out = chunk_attention(HeteroAttention(cfg), layer, q, k, v)
    for b in range(2):
        sk, sv = layer.tokens(b)
        for i in range(chunk):
            keys = torch.cat([sk, k[b, :, : i + 1]], dim=1)[None].double()
            vals = torch.cat([sv, v[b, :, : i + 1]], dim=1)[None].double()
            want = dense_attention(q[b:b + 1, :, i].double(), keys, vals, compute_dtype=torch.float64).out[0]
            assert rel_err(out[b, :, i], want) < 1e-5, (b, i)


@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("chunk", [1, 6])
def test_a_chunk_attends_its_own_tokens_as_stored_in_kv_dtype(chunk, warm):
    """float32 keys and values into a bfloat16 cache: a chunk's positions attend its own earlier tokens as the
    cache stores them (rounded to bfloat16), as they attend the stored ones and as decoding the same tokens one by
    one would, into a warm cache and as the first chunk of an empty one."""
    from hetero.chunk import chunk_attention

    gen = torch.Generator().manual_seed(6)
    hkv, g, d = 2, 2, 16
    cfg = HeteroConfig(window=WINDOW, sinks=SINKS, retriever="all", budget=1.0, kv_dtype="bfloat16",
                       sparse_chunk_tokens=24)
    layer = LayerCache(cfg)
    if warm:
        layer.append(torch.randn(1, hkv, 40, d, generator=gen), torch.randn(1, hkv, 40, d, generator=gen))
    q = torch.randn(1, hkv * g, chunk, d, generator=gen) * 2
    k, v = torch.randn(1, hkv, chunk, d, generator=gen), torch.randn(1, hkv, chunk, d, generator=gen)
    out = chunk_attention(HeteroAttention(cfg), layer, q, k, v)
    sk, sv = layer.tokens(0) if warm else (k[0, :, :0], v[0, :, :0])
    own_k, own_v = k[0].to(torch.bfloat16), v[0].to(torch.bfloat16)
    for i in range(chunk):
        keys = torch.cat([sk.double(), own_k[:, : i + 1].double()], dim=1)[None]
        vals = torch.cat([sv.double(), own_v[:, : i + 1].double()], dim=1)[None]
        want = dense_attention(q[:, :, i].double(), keys, vals, compute_dtype=torch.float64).out[0]
        assert rel_err(out[0, :, i], want) < 1e-5, i


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("chunk", [3, 30])
def test_a_chunk_with_a_nan_query_is_refused_on_every_path(chunk, dense):
    """Small (folded, per-position host search) and long chunks, sparse and dense layers: a NaN in a real query row
    raises as a decode step does; NaN in a left-padded row (not attended) does not."""
    from hetero.chunk import chunk_attention

    cfg = HeteroConfig(window=WINDOW, sinks=SINKS, retriever="all", budget=1.0, dense_layers=(0,) if dense else ())
    layer = LayerCache(cfg)
    layer.append(torch.randn(2, 2, 60, 16), torch.randn(2, 2, 60, 16))
    q, k, v = torch.randn(2, 4, chunk, 16), torch.randn(2, 2, chunk, 16), torch.randn(2, 2, chunk, 16)
    q[1, 2, -1, 3] = float("nan")
    with pytest.raises(InvalidValueError, match="q contains NaN"):
        chunk_attention(HeteroAttention(cfg), layer, q, k, v)
    q[1, 2, -1, 3] = 0.0
    q[1, 1, 0, 0] = float("nan")  # sequence 1 has one real token: its first row is padding
    out = chunk_attention(HeteroAttention(cfg), layer, q, k, v, [chunk, 1])
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1, :, -1]).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hkv,g,c", [(1, 1, 1), (2, 3, 5), (3, 4, 17)])
def test_partial_attention_both_paths_against_float64(hkv, g, c, causal):
    """The chunk's own part: the fused CPU kernel and the matmul form the other devices take (called here on the CPU),
    each against float64 softmax attention with its log-sum-exp, logits up to ~1e2 so the sum's rounding shows."""
    from hetero.chunk import _partial_attention_matmul, partial_attention

    gen = torch.Generator().manual_seed(7)
    d, n = 16, c if causal else 2 * c + 3
    q = torch.randn(hkv * g, c, d, generator=gen) * 4
    k, v = torch.randn(hkv, n, d, generator=gen) * 4, torch.randn(hkv, n, d, generator=gen)
    kk, vv = k.double().repeat_interleave(g, 0), v.double().repeat_interleave(g, 0)
    s = q.double() @ kk.transpose(1, 2) * 0.25
    if causal:
        s = s.masked_fill(torch.ones(c, n, dtype=torch.bool).triu(1), float("-inf"))
    want_lse = torch.logsumexp(s, -1)
    want = torch.softmax(s, -1) @ vv
    for got in (partial_attention(q, k, v, 0.25, causal), _partial_attention_matmul(q, k, v, 0.25, causal)):
        assert got.out.dtype == torch.float32 and got.out.shape == (hkv * g, c, d)
        assert rel_err(got.out, want) < 2e-5
        assert torch.allclose(got.lse.double(), want_lse, rtol=1e-6, atol=1e-4)
