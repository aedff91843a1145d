import math

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

from hetero import PartialAttention, merge
from hetero.errors import ShapeError
from hetero.reference import dense_attention, window_attention


def _attention_over(q, k, v, idx, dtype):
    """PartialAttention of q over the keys at positions idx (possibly empty)."""
    sub_k, sub_v = k[:, :, idx], v[:, :, idx]
    lengths = torch.full((q.shape[0],), len(idx), dtype=torch.long)
    return window_attention(q.to(dtype), sub_k.to(dtype), sub_v.to(dtype), lengths, compute_dtype=dtype)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 300), parts=st.integers(1, 64), seed=st.integers(0, 2**31 - 1), g=st.sampled_from([1, 4]))
@example(n=226, parts=10, seed=41284, g=1)  # 1.16e-6: over the 1e-6 this test once had
def test_split_invariance(n, parts, seed, g):
    gen = torch.Generator().manual_seed(seed)
    b, hkv, d = 2, 2, 16
    q = torch.randn(b, hkv * g, d, generator=gen, dtype=torch.float64) * 2
    k = torch.randn(b, hkv, n, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, n, d, generator=gen, dtype=torch.float64)
    full = dense_attention(q, k, v, compute_dtype=torch.float64)
    owner = torch.randint(parts, (n,), generator=gen)  # random partition, some parts empty
    perm = torch.randperm(parts, generator=gen).tolist()  # merge order must not matter
    pieces = [_attention_over(q, k, v, (owner == p).nonzero().flatten(), torch.float32) for p in perm]
    merged = merge(pieces)
    assert merged.out.dtype == torch.float32
    if n == 0:
        assert torch.all(merged.out == 0) and torch.all(torch.isneginf(merged.lse))
        return
    rel = (merged.out.double() - full.out).norm() / full.out.norm()
    # the float32 pieces' own rounding (up to 7e-7 for the unsplit float32 attention over 300 random cases) plus the
    # merge's rescaling of up to 64 parts: at most 1.21e-6 over 3000 random cases, so ~21 float32 epsilons
    assert rel <= 2.5e-6
    assert torch.allclose(merged.lse.double(), full.lse, rtol=1e-6, atol=1e-5)


def test_all_empty_gives_zero_and_neg_inf():
    e = PartialAttention.empty(2, 3, 8)
    m = merge([e, e, e])
    assert torch.equal(m.out, torch.zeros(2, 3, 8))
    assert torch.isneginf(m.lse).all()
    assert not torch.isnan(m.out).any()


def test_empty_part_is_neutral_even_with_garbage_out():
    a = PartialAttention(torch.randn(1, 2, 4), torch.tensor([[0.5, -3.0]]))
    garbage = PartialAttention(torch.full((1, 2, 4), float("nan")), torch.full((1, 2), float("-inf")))
    m = merge([garbage, a])
    assert torch.allclose(m.out, a.out) and torch.allclose(m.lse, a.lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_one_part_alone_follows_the_empty_part_rule(dtype):
    garbage = PartialAttention(torch.tensor([[[1.0, float("nan"), 3.0], [2.0, 2.0, 2.0]]], dtype=dtype),
                               torch.tensor([[float("-inf"), 0.25]], dtype=dtype))
    m = merge([garbage])
    assert torch.equal(m.out[0, 0], torch.zeros(3, dtype=dtype)) and torch.equal(m.out[0, 1], garbage.out[0, 1])
    assert torch.equal(m.lse, garbage.lse)


def test_pos_inf_takes_all_weight():
    a = PartialAttention(torch.ones(1, 1, 4), torch.tensor([[float("inf")]]))
    b = PartialAttention(torch.full((1, 1, 4), 7.0), torch.tensor([[3.0]]))
    m = merge([a, b])
    assert torch.equal(m.out, torch.ones(1, 1, 4)) and torch.isposinf(m.lse).all()
    c = PartialAttention(torch.full((1, 1, 4), 3.0), torch.tensor([[float("inf")]]))
    m2 = merge([a, c, b])
    assert torch.allclose(m2.out, torch.full((1, 1, 4), 2.0))  # +inf parts share equally
    assert not torch.isnan(m2.out).any()


@pytest.mark.parametrize("logit", [1e4, 5e4, -5e4, 1e30])
def test_extreme_logits_stay_finite(logit):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 2, 10, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 2, 10, 8, generator=gen, dtype=torch.float64)
    scale = logit / 8  # logits of order |logit|
    full = dense_attention(q, k, v, scale=scale, compute_dtype=torch.float64)
    lengths = torch.full((1,), 5, dtype=torch.long)
    a = window_attention(q.float(), k[:, :, :5].float(), v[:, :, :5].float(), lengths, scale=scale)
    b = window_attention(q.float(), k[:, :, 5:].float(), v[:, :, 5:].float(), lengths, scale=scale)
    m = merge([a, b])
    assert torch.isfinite(m.out).all() and not torch.isnan(m.lse).any()
    if math.isfinite(logit * 100) and abs(logit) <= 5e4:
        assert (m.out.double() - full.out).norm() / full.out.norm() < 1e-5


def test_merge_rejects_bad_parts():
    a = PartialAttention.empty(1, 2, 4)
    with pytest.raises(ShapeError, match="at least one"):
        merge([])
    with pytest.raises(ShapeError, match="part 1"):
        merge([a, PartialAttention.empty(1, 3, 4)])


def _edge_case_parts(parts: int, rows: int, seed: int):
    """out ``[P, 2, rows, 8]``, lse ``[P, 2, rows]`` (P >= 2, rows >= 5) with the merge's edge cases mixed into one
    batch: all parts empty, an empty part holding garbage, one +inf part, two +inf parts, extreme logits."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.randn(parts, 2, rows, 8, generator=gen)
    lse = torch.randn(parts, 2, rows, generator=gen) * 30
    lse[:, 0, 0] = float("-inf")                        # all parts empty
    lse[1, 0, 1] = float("-inf")
    out[1, 0, 1] = float("nan")                         # empty part with garbage
    lse[parts - 1, 1, 2] = float("inf")                 # one +inf part
    lse[:2, 1, 3] = float("inf")                        # two +inf parts share the weight
    lse[:, 1, 4] = torch.tensor([1e30, -1e30, 0.0, 5.0, -5.0])[:parts]  # extreme
    return out, lse


@pytest.mark.parametrize("parts", [2, 3, 5])
def test_native_merge_matches_the_torch_reference_on_edge_cases(parts):
    """CPU float32 parts are fused by the C++ merge (the one the decode step uses): against the PyTorch reference,
    with empty parts holding garbage, +inf parts and extreme logits mixed in one batch."""
    from hetero.merge import merge_reference
    from hetero.native import load

    if load() is None:
        pytest.skip("C++ extension not built")
    out, lse = _edge_case_parts(parts, 7, seed=6)
    lse[:, 1, 5] = torch.tensor([-1e30, float("-inf"), 3.0, 0.0, 1.0])[:parts]  # one part empty, one extreme
    ps = [PartialAttention(out[i], lse[i]) for i in range(parts)]
    got, want = merge(ps), merge_reference(ps)
    assert not torch.isnan(got.out).any() and not torch.isnan(got.lse).any()
    assert torch.equal(torch.isinf(got.lse), torch.isinf(want.lse))
    torch.testing.assert_close(got.lse, want.lse, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.out, want.out, rtol=1e-6, atol=1e-6)
    merged64 = merge([PartialAttention(p.out.double(), p.lse.double()) for p in ps])  # float64: the reference
    assert merged64.out.dtype == torch.float64
    torch.testing.assert_close(merged64.out.float(), want.out, rtol=1e-5, atol=1e-5)


def test_merge_refuses_a_nan_lse_instead_of_erasing_the_valid_parts():
    from hetero import InvalidValueError

    good = PartialAttention(torch.ones(1, 2, 4), torch.zeros(1, 2))
    broken = PartialAttention(torch.ones(1, 2, 4), torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(InvalidValueError, match="NaN"):
        merge([good, broken])


@pytest.mark.parametrize("bad, match", [(None, "list of PartialAttention"), ([None], "part 0 must be"),
                                        ([(torch.zeros(1, 2, 4), torch.zeros(1, 2))], "part 0 must be")])
def test_merge_rejects_what_is_not_a_list_of_parts(bad, match):
    from hetero import ShapeError

    with pytest.raises(ShapeError, match=match):
        merge(bad)
