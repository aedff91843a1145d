"""Bad input raises a typed error with a clear message, and leaves the cache byte-identical."""
import pytest
import torch

from hetero import (ConfigError, DTypeError, HeteroAttention, HeteroConfig, InvalidValueError, LayerCache,
                    Selection, ShapeError, sparse_attention, window_attention)
from hetero.errors import HeteroError

from helpers import same_snapshot, snapshot

B, HKV, G, D = 2, 2, 4, 8


@pytest.fixture
def layer():
    cfg = HeteroConfig(window=4, sinks=1, retriever="exact", budget=3, block_tokens=4)
    lay = LayerCache(cfg)
    gen = torch.Generator().manual_seed(0)
    lay.append(torch.randn(B, HKV, 20, D, generator=gen), torch.randn(B, HKV, 20, D, generator=gen),
               torch.tensor([20, 11]))
    return lay


def q_ok(dtype=torch.float32):
    return torch.randn(B, HKV * G, D, dtype=dtype)


def kv_ok(t=1):
    return torch.randn(B, HKV, t, D), torch.randn(B, HKV, t, D)


BAD_APPENDS = [
    ("keys rank 2", lambda: (torch.randn(B, D), torch.randn(B, D), None), ShapeError, "rank"),
    ("keys rank 5", lambda: (torch.randn(B, HKV, 1, 1, D), torch.randn(B, HKV, 1, 1, D), None), ShapeError, "rank"),
    ("k/v shape mismatch", lambda: (torch.randn(B, HKV, 2, D), torch.randn(B, HKV, 3, D), None), ShapeError, "same shape"),
    ("wrong kv heads", lambda: (torch.randn(B, 3, 1, D), torch.randn(B, 3, 1, D), None), ShapeError, "Hkv=2"),
    ("wrong head dim", lambda: (torch.randn(B, HKV, 1, 4), torch.randn(B, HKV, 1, 4), None), ShapeError, "D=8"),
    ("wrong batch", lambda: (torch.randn(3, HKV, 1, D), torch.randn(3, HKV, 1, D), None), ShapeError, "B=2"),
    ("empty batch", lambda: (torch.randn(0, HKV, 1, D), torch.randn(0, HKV, 1, D), None), ShapeError, "empty batch"),
    ("k/v dtype mix", lambda: (torch.randn(B, HKV, 1, D), torch.randn(B, HKV, 1, D).half(), None), DTypeError, "same dtype"),
    ("integer keys", lambda: (torch.ones(B, HKV, 1, D, dtype=torch.int32),) * 2 + (None,), DTypeError, "dtype"),
    ("float64 keys", lambda: (torch.randn(B, HKV, 1, D, dtype=torch.float64),) * 2 + (None,), DTypeError, "kv_dtype"),
    ("NaN keys", lambda: (torch.full((B, HKV, 1, D), float("nan")), torch.randn(B, HKV, 1, D), None), InvalidValueError, "NaN"),
    ("inf values", lambda: (torch.randn(B, HKV, 1, D), torch.full((B, HKV, 1, D), float("inf")), None), InvalidValueError, "NaN or inf"),
    ("lengths too long", lambda: kv_ok(2) + (torch.tensor([3, 1]),), InvalidValueError, r"\[0, 2\]"),
    ("negative length", lambda: kv_ok(2) + (torch.tensor([-1, 1]),), InvalidValueError, r"\[0, 2\]"),
    ("lengths wrong shape", lambda: kv_ok(2) + (torch.tensor([1, 1, 1]),), ShapeError, "B=2"),
    ("float lengths", lambda: kv_ok(2) + (torch.tensor([1.0, 1.0]),), DTypeError, "integer"),
    ("not a tensor", lambda: ([[1.0]], [[1.0]], None), ShapeError, "torch.Tensor"),
]


@pytest.mark.parametrize("name,make,err,match", BAD_APPENDS, ids=[b[0] for b in BAD_APPENDS])
def test_bad_append_rejected_and_cache_unchanged(layer, name, make, err, match):
    before = snapshot(layer)
    k, v, lengths = make()
    with pytest.raises(err, match=match):
        layer.append(k, v, lengths)
    assert same_snapshot(before, snapshot(layer))


def test_nan_in_ragged_padding_is_accepted(layer):
    k, v = kv_ok(3)
    k[1, :, 1:] = float("nan")  # beyond lengths[1] = 1: never stored
    layer.append(k, v, torch.tensor([3, 1]))
    assert torch.isfinite(layer.tokens(1)[0]).all()


BAD_QUERIES = [
    ("q rank 4", lambda: torch.randn(B, HKV * G, 1, D), ShapeError, "rank 3"),
    ("q head dim", lambda: torch.randn(B, HKV * G, D + 1), ShapeError, "head_dim"),
    ("Hq not multiple", lambda: torch.randn(B, 5, D), ShapeError, "multiple"),
    ("q batch", lambda: torch.randn(B + 1, HKV * G, D), ShapeError, "batch"),
    ("q empty batch", lambda: torch.randn(0, HKV * G, D), ShapeError, "empty batch"),
    ("q int", lambda: torch.ones(B, HKV * G, D, dtype=torch.int64), DTypeError, "dtype"),
    ("q float64", lambda: torch.randn(B, HKV * G, D, dtype=torch.float64), DTypeError,
     "allowed: float32, bfloat16, float16$"),
    ("q NaN", lambda: torch.full((B, HKV * G, D), float("nan")), InvalidValueError, "NaN"),
    ("q inf", lambda: torch.full((B, HKV * G, D), float("-inf")), InvalidValueError, "inf"),
]


@pytest.mark.parametrize("name,make,err,match", BAD_QUERIES, ids=[b[0] for b in BAD_QUERIES])
def test_bad_query_rejected_and_cache_unchanged(layer, name, make, err, match):
    before = snapshot(layer)
    with pytest.raises(err, match=match):
        HeteroAttention(layer.config).run(make(), layer)
    assert same_snapshot(before, snapshot(layer))



@pytest.mark.parametrize("host_tokens", [0, 12], ids=["host_empty", "host_filled"])
@pytest.mark.parametrize("view", ["contiguous", "strided_last_dim"])
def test_a_query_with_nan_is_refused_with_a_plan_whatever_its_strides(view, host_tokens):
    """With a plan given, the fused step checks the query itself; a query it cannot take (its last dimension
    strided) runs the general path, which must check it too, also when no retriever search would see it."""
    cfg = HeteroConfig(window=64, sinks=4)
    lay = LayerCache(cfg)
    lay.append(torch.randn(B, HKV, 68 + host_tokens, D), torch.randn(B, HKV, 68 + host_tokens, D))
    attn = HeteroAttention(cfg)
    plan = attn.plan(lay, HKV * G)
    q = q_ok() if view == "contiguous" else torch.randn(B, HKV * G, D, 2)[..., 0]
    q[0, 1, 5] = float("nan")
    before = snapshot(lay)
    with pytest.raises(InvalidValueError, match="NaN or inf"):
        attn.run(q, lay, plan)
    assert same_snapshot(before, snapshot(lay))


def test_causal_attention_of_an_empty_batch_is_refused_as_the_other_ops_refuse_it():
    from hetero import causal_attention

    with pytest.raises(ShapeError, match="empty batch"):
        causal_attention(torch.randn(0, 4, 3, D), torch.randn(0, 2, 3, D), torch.randn(0, 2, 3, D))
    with pytest.raises(ShapeError, match="empty batch"):
        window_attention(torch.randn(0, 4, D), torch.randn(0, 2, 3, D), torch.randn(0, 2, 3, D))


def test_tokens_of_a_sequence_the_cache_does_not_hold_is_a_shape_error(layer):
    with pytest.raises(ShapeError, match="empty"):
        LayerCache(layer.config).tokens(0)
    for seq in (B, -1, 1.0, True):
        with pytest.raises(ShapeError, match=r"seq must be an int in \[0, 2\)"):
            layer.tokens(seq)


def test_crop_to_none_is_refused_rather_than_read_as_keep_all(layer):
    before = snapshot(layer)
    with pytest.raises(ShapeError, match="got None"):
        layer.crop(None)
    assert same_snapshot(before, snapshot(layer))


@pytest.mark.parametrize("q_dtype", ["float32", torch.float64, torch.int8])
def test_plan_names_the_query_dtypes_it_takes(layer, q_dtype):
    with pytest.raises(DTypeError, match="q_dtype must be a torch.dtype: torch.float32, torch.bfloat16 or torch.f"):
        HeteroAttention(layer.config).plan(layer, HKV * G, q_dtype)


def test_a_plan_made_by_another_runtime_is_refused(layer):
    """A plan carries its runtime's budget, scale and backends: run by another runtime it would silently apply them."""
    from hetero.errors import StalePlanError

    mine, other = HeteroAttention(layer.config), HeteroAttention(layer.config.with_(budget=1.0))
    plan = other.plan(layer, HKV * G)
    other.close()
    for call in (lambda: mine.run(q_ok(), layer, plan), lambda: mine.decode(q_ok(), *kv_ok(), layer, plan)):
        before = snapshot(layer)
        with pytest.raises(StalePlanError, match="another HeteroAttention"):
            call()
        assert same_snapshot(before, snapshot(layer))


@pytest.mark.parametrize("q_heads", [0, -2, 2.0, True, "8"])
def test_plan_refuses_a_q_heads_that_is_not_a_positive_multiple_of_the_kv_heads(layer, q_heads):
    attn = HeteroAttention(layer.config)
    attn.plan(layer, 2 * layer.kv_heads)  # a cached plan must not answer for 2.0 either
    with pytest.raises(ShapeError, match="positive multiple"):
        attn.plan(layer, q_heads)

def test_run_on_empty_layer_is_clear():
    cfg = HeteroConfig()
    with pytest.raises(ShapeError, match="empty"):
        HeteroAttention(cfg).run(q_ok(), LayerCache(cfg))


BAD_CONFIGS = [
    ({"budget": -1}, "budget"), ({"budget": 0.0}, "budget"), ({"budget": 1.5}, "budget"),
    ({"budget": float("nan")}, "budget"), ({"budget": "2%"}, "budget"), ({"window": -1}, "window"),
    ({"window": 2.5}, "window"), ({"sinks": -3}, "sinks"), ({"retriever": "nope"}, "retriever"),
    ({"kv_dtype": "int8"}, "kv_dtype"), ({"threads": 0}, "threads"), ({"block_tokens": 0}, "block_tokens"),
    ({"group_rule": "max"}, "group_rule"), ({"host_backend": "cuda"}, "host_backend"),
    ({"dense_layers": (1, 1)}, "dense_layers"), ({"dense_layers": (-1,)}, "dense_layers"),
    ({"scale": 0}, "scale"), ({"window": True}, "window"), ({"overlap": "yes"}, "overlap"), ({"overlap": 1}, "overlap"),
    ({"window": 2 ** 31}, "window"), ({"sinks": 2 ** 40}, "sinks"), ({"block_tokens": 2 ** 62}, "block_tokens"),
]


@pytest.mark.parametrize("retriever,options", [("ivf-group", {"threads": 5000}), ("ivf", {"threads": 2 ** 31}),
                                               ("ivf-group", {"seed": 2 ** 40}), ("lsh", {"seed": -2 ** 63})])
def test_a_retriever_option_no_native_call_can_take_is_refused_at_construction(retriever, options):
    """Else it fails at the first append, as an untyped error from pybind11 or faiss (or starts 5000 threads)."""
    with pytest.raises(ConfigError, match=f"option {next(iter(options))}=.*<= (1024|2147483647)"):
        HeteroConfig(retriever=retriever, retriever_options=options)


def test_numpy_numbers_are_taken_as_the_python_numbers_they_hold_and_equal_configs_hash_alike():
    import numpy as np

    cfg = HeteroConfig(budget=np.int64(5), window=np.int32(64), scale=np.float32(0.125), retriever_options={"K": 8},
                       retriever="lsh")
    assert type(cfg.budget) is int and type(cfg.window) is int and type(cfg.scale) is float
    assert cfg == HeteroConfig(budget=5, window=64, scale=0.125, retriever_options={"K": 8}, retriever="lsh")
    assert len({cfg, cfg.with_(), HeteroConfig(budget=5)}) == 2


@pytest.mark.parametrize("kwargs,field", BAD_CONFIGS, ids=[str(c[0]) for c in BAD_CONFIGS])
def test_bad_config_names_field_and_allowed(kwargs, field):
    with pytest.raises(ConfigError) as info:
        HeteroConfig(**kwargs)
    msg = str(info.value)
    assert f"HeteroConfig.{field}=" in msg and "allowed" in msg


def test_config_with_rejects_unknown_field():
    with pytest.raises(ConfigError, match="unknown"):
        HeteroConfig().with_(windw=3)


def _host_view(layer):
    return layer.host.view()


BAD_SELECTIONS = [
    ("index beyond host", lambda: Selection(torch.full((B, HKV, 2), 15, dtype=torch.int32)), InvalidValueError, "host_length"),
    ("index below -1", lambda: Selection(torch.full((B, HKV, 2), -2, dtype=torch.int32)), InvalidValueError, "-1"),
    ("float indices", lambda: Selection(torch.zeros(B, HKV, 2)), DTypeError, "int32"),
    ("indices wrong heads", lambda: Selection(torch.zeros(B, 3, 2, dtype=torch.int32)), ShapeError, "Hkv=2"),
    ("log_weight shape", lambda: Selection(torch.zeros(B, HKV, 2, dtype=torch.int32), torch.zeros(B, HKV, 2)), ShapeError, "Hq=8"),
    ("log_weight NaN", lambda: Selection(torch.zeros(B, HKV, 2, dtype=torch.int32), torch.full((B, 8, 2), float("nan"))), InvalidValueError, "NaN"),
]


@pytest.mark.parametrize("name,make,err,match", BAD_SELECTIONS, ids=[b[0] for b in BAD_SELECTIONS])
def test_bad_selection_rejected(layer, name, make, err, match):
    before = snapshot(layer)
    with pytest.raises(err, match=match):
        sparse_attention(q_ok(), _host_view(layer), make())
    assert same_snapshot(before, snapshot(layer))


def test_window_attention_rejects_mismatched_kv():
    with pytest.raises(DTypeError, match="must have the same dtype"):
        window_attention(q_ok(), torch.randn(B, HKV, 4, D), torch.randn(B, HKV, 4, D).half())
    with pytest.raises(ShapeError, match="must have the same shape"):
        window_attention(q_ok(), torch.randn(B, HKV, 4, D), torch.randn(B, HKV, 5, D))


def test_unknown_backend_lists_registered():
    with pytest.raises(ConfigError, match="registered"):
        window_attention(q_ok(), torch.randn(B, HKV, 4, D), torch.randn(B, HKV, 4, D), backend="nope")


def test_retriever_rejects_negative_budget(layer):
    with pytest.raises(InvalidValueError, match="budgets"):
        layer.retriever.search(q_ok(), [-1, 2])


def test_every_error_is_a_hetero_error():
    for err in (ShapeError, DTypeError, InvalidValueError, ConfigError):
        assert issubclass(err, HeteroError)
