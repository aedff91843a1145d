"""Finite inputs that stop being finite where the kernels hold them (a storage dtype, float32 arithmetic), and
arguments that no kernel can use: each refused with a typed error before anything changes; the reference
backends normalise like the kernels."""
import math

import pytest
import torch

import hetero
from hetero import (ConfigError, HeteroAttention, HeteroConfig, InvalidValueError, LayerCache, PartialAttention,
                    Selection, ShapeError, merge, native, sparse_attention, window_attention)
from hetero.registry import HOST_BACKENDS
from hetero.validation import overflow_bound

from helpers import oracle, rel_err

needs_native = pytest.mark.skipif(native.load() is None, reason="C++ extension not built")
HOST = [b for b in ("cpp", "numba", "torch") if b in HOST_BACKENDS.names()]


def _layer(kv_dtype=None, tokens=40, d=16, **kw):
    cfg = HeteroConfig(window=8, sinks=2, retriever="all", block_tokens=8, kv_dtype=kv_dtype, **kw)
    layer = LayerCache(cfg)
    gen = torch.Generator().manual_seed(0)
    layer.append(torch.randn(1, 2, tokens, d, generator=gen), torch.randn(1, 2, tokens, d, generator=gen))
    return cfg, layer


@pytest.mark.parametrize("dtype,src,big", [(torch.float16, torch.float32, 1e5), (torch.bfloat16, torch.float32, 3.4e38),
                                           (torch.float32, torch.float64, 1e300)], ids=str)
def test_overflow_bound_is_where_the_cast_turns_inf(dtype, src, big):
    bound = overflow_bound(dtype)
    assert math.isfinite(torch.tensor([bound], dtype=src).to(dtype).item())
    assert torch.tensor([torch.finfo(dtype).max], dtype=src).to(dtype).item() == torch.finfo(dtype).max
    assert big >= bound and math.isinf(torch.tensor([big], dtype=src).to(dtype).item())


@pytest.mark.parametrize("path", ["prefill", "decode_append", "decode"])
def test_keys_beyond_the_storage_dtype_are_refused_and_nothing_is_stored(path):
    cfg, layer = _layer("float16")
    before = layer.tokens(0)[0].clone()
    k, v = torch.randn(1, 2, 16), torch.randn(1, 2, 16)
    k[0, 1, 3] = 1e5  # finite in float32, inf in float16
    with pytest.raises(InvalidValueError, match="float16"):
        if path == "prefill":
            layer.append(k[:, :, None].expand(1, 2, 3, 16), v[:, :, None].expand(1, 2, 3, 16))
        elif path == "decode_append":
            layer.append(k, v)
        else:
            attn = HeteroAttention(cfg)
            attn.decode(torch.randn(1, 4, 16), k, v, layer, attn.plan(layer, 4))
    assert torch.equal(layer.tokens(0)[0], before)
    k[0, 1, 3] = 65504.0  # float16's largest: stored as it is
    layer.append(k, v)
    assert layer.tokens(0)[0][1, -1, 3].item() == 65504.0


def test_float64_values_beyond_float32_are_refused():
    _, layer = _layer()
    host = layer.host.view()
    sel = Selection(torch.zeros(1, 2, 3, dtype=torch.int32))
    q = torch.randn(1, 4, 16, dtype=torch.float64)
    q[0, 0, 0] = 1e300
    with pytest.raises(InvalidValueError, match="float32"):
        sparse_attention(q, host, sel)
    with pytest.raises(InvalidValueError, match="float32"):
        window_attention(q, torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16))
    lw = torch.zeros(1, 4, 3, dtype=torch.float64)
    lw[0, 1, 2] = 1e300
    with pytest.raises(InvalidValueError, match="float32"):
        sparse_attention(torch.randn(1, 4, 16), host, Selection(sel.indices, log_weight=lw))
    for scale in (1e300, 10 ** 400, 1e-300):
        with pytest.raises(InvalidValueError, match="float32"):
            sparse_attention(torch.randn(1, 4, 16), host, sel, scale=scale)
        with pytest.raises(ConfigError, match="scale"):
            HeteroConfig(scale=scale)


@pytest.mark.parametrize("backend", HOST)
def test_a_selected_host_row_with_nan_is_refused(backend):
    _, layer = _layer()
    host = layer.host.view()
    kv = layer.host.kv_in_use.clone()  # [Hkv, R, 2, D]: K and V rows side by side
    kv[1, 5, 0, 0] = float("nan")
    bad = type(host)(kv[:, :, 0], kv[:, :, 1], host.block_table, host.lengths, host.block_tokens)
    picks = torch.tensor([[[0, 3, -1], [4, 5, 6]]], dtype=torch.int32)
    with pytest.raises(InvalidValueError, match="k_pool"):
        sparse_attention(torch.randn(1, 4, 16), bad, Selection(picks), backend=backend)
    other = torch.tensor([[[0, 5, -1], [4, 6, 7]]], dtype=torch.int32)  # row 5 of head 0 only: fine
    assert torch.isfinite(sparse_attention(torch.randn(1, 4, 16), bad, Selection(other), backend=backend).out).all()


def test_budget_and_threads_out_of_range_are_config_errors():
    HeteroConfig(budget=2 ** 53, threads=1024)
    for kw in ({"budget": 2 ** 53 + 1}, {"budget": 10 ** 19}, {"budget": 10 ** 400}, {"threads": 1025},
               {"threads": 2 ** 31}):
        with pytest.raises(ConfigError, match=next(iter(kw))):
            HeteroConfig(**kw)
    _, layer = _layer()
    with pytest.raises(InvalidValueError, match="threads"):
        sparse_attention(torch.randn(1, 4, 16), layer.host.view(), Selection(torch.zeros(1, 2, 1, dtype=torch.int32)),
                         threads=2 ** 31)


def test_window_attention_names_the_storage_dtypes_for_float64_keys():
    k = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    with pytest.raises(hetero.DTypeError, match="float32, bfloat16, float16"):
        window_attention(torch.randn(1, 4, 8), k, k)


def test_no_heads_or_no_head_dim_is_a_shape_error():
    with pytest.raises(ShapeError, match="Hkv >= 1"):
        window_attention(torch.randn(1, 4, 8), torch.randn(1, 0, 5, 8), torch.randn(1, 0, 5, 8))
    with pytest.raises(ShapeError, match="D >= 1"):
        window_attention(torch.randn(1, 4, 0), torch.randn(1, 2, 5, 0), torch.randn(1, 2, 5, 0))


@pytest.mark.parametrize("make", [lambda: torch.zeros(1, 4, 16).expand(2, 4, 16),
                                  lambda: torch.zeros(2, 4, 16, requires_grad=True)], ids=["expanded", "requires_grad"])
def test_out_that_shares_memory_or_needs_grad_is_refused(make):
    cfg = HeteroConfig(window=8, sinks=2, retriever="all", block_tokens=8)
    layer = LayerCache(cfg)
    layer.append(torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16))
    attn = HeteroAttention(cfg)
    before = layer.tokens(0)[0].shape
    with pytest.raises(ShapeError, match="out must be"):
        attn.run(torch.randn(2, 4, 16), layer, out=make())
    with pytest.raises(ShapeError, match="out must be"):
        attn.decode(torch.randn(2, 4, 16), torch.randn(2, 2, 16), torch.randn(2, 2, 16), layer, attn.plan(layer, 4),
                    out=make())
    assert layer.tokens(0)[0].shape == before


def test_decode_takes_exactly_one_token():
    cfg, layer = _layer()
    attn = HeteroAttention(cfg)
    n = layer.tokens(0)[0].shape[1]
    with pytest.raises(ShapeError, match="one token"):
        attn.decode(torch.randn(1, 4, 16), torch.randn(1, 2, 2, 16), torch.randn(1, 2, 2, 16), layer,
                    attn.plan(layer, 4))
    assert layer.tokens(0)[0].shape[1] == n


@pytest.mark.parametrize("backend", HOST)
def test_host_backends_take_tensors_that_require_grad(backend):
    _, layer = _layer()
    host = layer.host.view()
    sel = Selection(torch.tensor([[[0, 3, 9], [4, 5, 6]]], dtype=torch.int32),
                    log_weight=torch.zeros(1, 4, 3, requires_grad=True))
    q = torch.randn(1, 4, 16, requires_grad=True)
    got = sparse_attention(q, host, sel, backend=backend)
    ref = sparse_attention(q.detach(), host, Selection(sel.indices), backend="torch")
    assert torch.allclose(got.out.detach(), ref.out, atol=1e-5)


def test_reference_backends_divide_by_the_weights_sum():
    """Large logits: weights taken as exp(s - lse) carry lse's float32 rounding into the output (5e-3 here)."""
    k = torch.full((1, 1, 6, 4), 255.0, dtype=torch.float16)
    v = torch.full((1, 1, 6, 4), 1000.0)
    q = torch.full((1, 2, 4), 255.0)
    for backend in ("torch", "cpp") if native.load() is not None else ("torch",):
        part = window_attention(q, k, v.to(torch.float16), backend=backend)
        assert torch.allclose(part.out, torch.full_like(part.out, 1000.0), rtol=1e-6), backend


def test_merge_refuses_a_part_whose_out_is_nan_under_a_finite_lse():
    good = PartialAttention(torch.randn(1, 2, 4), torch.zeros(1, 2))
    bad = PartialAttention(torch.tensor([[[1.0, float("nan"), 0, 0], [0, 0, 0, 0]]]), torch.zeros(1, 2))
    with pytest.raises(InvalidValueError, match="out"):
        merge([good, bad])
    empty = PartialAttention(bad.out, torch.tensor([[float("-inf"), 0.0]]))  # NaN under -inf: an empty part's
    assert torch.isfinite(merge([good, empty]).out).all()


@pytest.mark.parametrize("q,k", [((1, 8, 10, 16), (1, 2, 7, 16)), ((8, 10, 16), (1, 2, 10, 16)),
                                 ((1, 6, 10, 16), (1, 4, 10, 16)), ((2, 8, 10, 16), (1, 2, 10, 16))],
                         ids=["T", "rank", "group", "batch"])
def test_causal_attention_refuses_what_does_not_fit(q, k):
    with pytest.raises(ShapeError):
        hetero.causal_attention(torch.randn(q), torch.randn(k), torch.randn(k))


def test_causal_attention_refuses_integer_inputs():
    x = torch.ones(1, 2, 4, 8, dtype=torch.int64)
    with pytest.raises(hetero.DTypeError):
        hetero.causal_attention(x, x, x)


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_causal_attention_refuses_nan_and_inf(which, bad):
    """SDPA gives a silent row of zeros for a NaN query and NaN rows for an infinite key."""
    x = {n: torch.randn(1, 4 if n == "q" else 2, 6, 8) for n in "qkv"}
    x[which][0, 0, 3, 1] = bad
    with pytest.raises(InvalidValueError, match=f"^{which} contains NaN or inf"):
        hetero.causal_attention(x["q"], x["k"], x["v"])


def test_host_view_pools_of_two_dtypes_are_a_dtype_error():
    pool = torch.randn(2, 8, 4)
    view = hetero.HostView(pool, pool.bfloat16(), torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([8]), 4)
    sel = hetero.Selection(torch.zeros(1, 2, 1, dtype=torch.int32))
    with pytest.raises(hetero.DTypeError, match="same dtype"):
        hetero.sparse_attention(torch.randn(1, 2, 4), view, sel)


def test_a_plan_is_made_again_for_layers_of_another_head_dim():
    """The cached plan's workspaces are sized for its head_dim: reused for a wider layer, the query staging
    overflowed its buffer in C++."""
    cfg = HeteroConfig(window=8, sinks=0, budget=4, retriever="all", threads=1)
    a, b = LayerCache(cfg, 0), LayerCache(cfg, 1)
    a.append(torch.randn(1, 1, 40, 16), torch.randn(1, 1, 40, 16))
    b.append(torch.randn(1, 1, 40, 32), torch.randn(1, 1, 40, 32))
    attn = HeteroAttention(cfg)
    attn.plan(a, 2)
    assert attn.plan(b, 2).geometry.head_dim == 32
    q = torch.randn(1, 2, 32)
    assert rel_err(attn.run(q, b), oracle(q, b)) < 1e-5
    attn.close()


def test_a_query_at_the_value_limit_does_not_break_the_ivf_search_and_one_beyond_is_refused():
    """q * code step beyond float32 made the search's scores 0 * inf = NaN, and its top-k indexed out of its
    histogram (a crash). At the limit attention takes (1e15) the step runs and stays finite; beyond, it is refused
    before anything runs."""
    gen = torch.Generator().manual_seed(0)
    cfg = HeteroConfig(window=8, sinks=0, budget=2, retriever="ivf-group", threads=1,
                       retriever_options=dict(code_bits=4, min_train=64))
    layer = LayerCache(cfg)
    k = torch.randn(1, 1, 400, 16, generator=gen)
    k[..., 0] *= 20.0  # a code step of ~8 in dimension 0
    layer.append(k, torch.randn(1, 1, 400, 16, generator=gen))
    attn = HeteroAttention(cfg)
    assert layer.retriever.native_search_ready()
    q = torch.randn(1, 1, 16, generator=gen)
    q[..., 0] = -1e15
    for _ in range(3):
        res = attn.run(q, layer, return_details=True)
        assert torch.isfinite(res.out).all() and 0 < res.rows_read <= 2
    q[..., 0] = -1e38
    for call in (lambda: attn.run(q, layer), lambda: attn.run(q, layer, attn.plan(layer, 1))):
        with pytest.raises(InvalidValueError, match="1e\\+15"):
            call()
    attn.close()


def _exact_layer(where: str, big: float):
    """An exact-mode layer (every host key read) of 20 tokens, one key of ``big`` in the host tier or the window."""
    cfg = HeteroConfig(window=8, sinks=0, budget=1.0, retriever="all", block_tokens=4)
    layer = LayerCache(cfg)
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 1, 20, 64, generator=gen), torch.randn(1, 1, 20, 64, generator=gen)
    k[0, 0, 3 if where == "host" else 15] = big
    return cfg, layer, k, v


@pytest.mark.parametrize("where", ["host", "window"])
@pytest.mark.parametrize("path", ["prefill", "decode_append"])
def test_a_finite_key_whose_scores_overflow_float32_is_refused_and_one_at_the_limit_is_exact(where, path):
    """A key of 1e37 (finite in float32) made q.k inf: the part holding it came back empty (lse -inf) and the
    output silently wrong. Refused at append; at the limit, 1e15, the output equals the float64 softmax."""
    for big, refused in ((1e37, True), (1e15, False)):
        cfg, layer, k, v = _exact_layer(where, big)
        chunks = [(k, v)] if path == "prefill" else [(k[:, :, t], v[:, :, t]) for t in range(20)]  # C++ append
        for kt, vt in chunks:
            before = layer.seq_lengths()
            if refused and bool((kt.abs() == big).any()):
                with pytest.raises(InvalidValueError, match="attention takes"):
                    layer.append(kt, vt)
                assert layer.seq_lengths() == before
                break
            layer.append(kt, vt)
        if refused:
            continue
        q = torch.full((1, 1, 64), 1e-12)
        out = HeteroAttention(cfg).run(q, layer)
        keys, values = layer.tokens(0)
        w = torch.softmax(keys[0].double() @ q[0, 0].double() / 8, 0)
        torch.testing.assert_close(out[0, 0].double(), w @ values[0].double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_query_limit_is_the_same_on_every_path_down_to_the_last_representable_value(dtype):
    """The largest value of q's dtype at most 1e15 runs, the next one up is refused, through the fused C++ step,
    the general path (a strided query) and the standalone op: one limit (csrc/runner/step.h's, read here)."""
    from hetero.validation import VALUE_LIMIT, _largest_at_most

    if native.load() is not None:
        assert native.load().VALUE_LIMIT == VALUE_LIMIT
    cfg, layer = _layer()
    attn = HeteroAttention(cfg)
    plan = attn.plan(layer, 4, dtype)
    top = _largest_at_most(dtype, VALUE_LIMIT)
    above = float(torch.nextafter(torch.tensor(top, dtype=dtype), torch.tensor(float("inf"), dtype=dtype)))
    cases = [(top, True)] + ([(above, False)] if math.isfinite(above) else [])  # float16: nothing beyond 65504
    for value, ok in cases:
        q = torch.randn(1, 4, 16).to(dtype) * 1e-3
        q[0, 2, 5] = value
        strided = torch.zeros(1, 4, 16, 2, dtype=dtype)[..., 0]
        strided.copy_(q)
        calls = [lambda: attn.run(q, layer, plan), lambda: attn.run(strided, layer, plan),
                 lambda: window_attention(q, *(x[None] for x in layer.tokens(0)))]
        for call in calls:
            if ok:
                r = call()
                assert torch.isfinite(r.out if isinstance(r, PartialAttention) else r).all()
            else:
                with pytest.raises(InvalidValueError):
                    call()


@pytest.mark.parametrize("retriever", ["ivf-group", "ivf", "hnsw"])
@pytest.mark.parametrize("path", ["prefill", "decode"])
def test_keys_beyond_what_an_index_takes_are_refused_before_anything_is_stored(retriever, path):
    """faiss's k-means aborted the process on keys near float32's limit (finite, but their distances are not)."""
    gen = torch.Generator().manual_seed(0)
    cfg = HeteroConfig(window=8, sinks=0, budget=2, retriever=retriever, threads=1,
                       retriever_options=dict(min_train=64) if retriever == "ivf-group" else {})
    layer = LayerCache(cfg)
    layer.append(torch.randn(1, 1, 100, 16, generator=gen), torch.randn(1, 1, 100, 16, generator=gen))
    before = layer.seq_lengths()
    k = torch.randn(1, 1, 3 if path == "prefill" else 1, 16, generator=gen)
    k[0, 0, -1, 0] = 2e38
    with pytest.raises(InvalidValueError, match=retriever):
        layer.append(k, torch.randn_like(k))
    assert layer.seq_lengths() == before
    exact = LayerCache(cfg.with_(retriever="exact", retriever_options={}))  # no index: attention's own limit
    with pytest.raises(InvalidValueError, match="attention takes"):
        exact.append(k, torch.randn_like(k))
    k[0, 0, -1, 0] = 1e14
    exact.append(k, torch.randn_like(k))


@pytest.mark.parametrize("probe_factor", [1.0, 0.5, 0.2])
def test_a_budget_covering_the_host_tier_selects_all_of_it_whatever_probe_factor(probe_factor):
    gen = torch.Generator().manual_seed(0)
    cfg = HeteroConfig(window=8, sinks=2, budget=1.0, retriever="ivf-group", threads=1,
                       retriever_options=dict(min_train=64, probe_factor=probe_factor))
    layer = LayerCache(cfg)
    layer.append(torch.randn(1, 2, 1990, 16, generator=gen), torch.randn(1, 2, 1990, 16, generator=gen))
    attn = HeteroAttention(cfg)
    q = torch.randn(1, 4, 16, generator=gen)
    res = attn.run(q, layer, return_details=True)
    assert res.rows_read == 2 * 1980
    k, v = layer.tokens(0)
    w = torch.softmax(q[0].double().unsqueeze(1) @ k.double().repeat_interleave(2, 0).transpose(1, 2) / 4.0, -1)
    ref = (w @ v.double().repeat_interleave(2, 0)).squeeze(1)
    assert float((res.out[0].double() - ref).norm() / ref.norm()) < 1e-5
    attn.close()
