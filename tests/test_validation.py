"""all_finite: the C++ check of strided CPU tensors against torch.isfinite on the same views."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from hetero.native import load
from hetero.errors import InvalidValueError
from hetero.validation import all_finite, check_finite

needs_ext = pytest.mark.skipif(load() is None, reason="C++ extension not built")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@needs_ext
@settings(max_examples=150, deadline=None)
@given(dtype=st.sampled_from(DTYPES), shape=st.lists(st.integers(0, 5), min_size=1, max_size=4),
       view=st.sampled_from(["contiguous", "slice", "transpose", "expand", "step"]),
       poison=st.sampled_from([None, float("nan"), float("inf"), float("-inf")]), seed=st.integers(0, 10 ** 6))
def test_all_finite_matches_torch_on_strided_views(dtype, shape, view, poison, seed):
    """A NaN / inf anywhere in the storage: flagged exactly when it lies inside the view."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn([s + 2 for s in shape], generator=gen).to(dtype)
    if poison is not None and base.numel():
        base.view(-1)[int(torch.randint(base.numel(), (1,), generator=gen))] = poison
    x = base[tuple(slice(0, s) for s in shape)]
    if view == "slice":
        x = base[tuple(slice(1, 1 + s) for s in shape)]
    elif view == "transpose" and x.dim() >= 2:
        x = x.transpose(0, -1)
    elif view == "expand":
        x = base.reshape(-1)[:1].expand(*shape)
    elif view == "step":
        x = base[tuple(slice(0, None, 2) for _ in shape)]
    assert all_finite(x) == bool(torch.isfinite(x).all())


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_finite_edges(dtype):
    x = torch.zeros(3, 7, dtype=dtype)
    assert all_finite(x) and all_finite(x[:, :0]) and all_finite(torch.tensor(1.0, dtype=dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[2, 6] = bad                                           # the last element
        assert not all_finite(y) and all_finite(y[:, :6]) and not all_finite(y.t())
        assert not all_finite(torch.tensor(bad, dtype=dtype))   # 0-d
    big = torch.full((2,), torch.finfo(dtype).max, dtype=dtype)
    tiny = torch.full((2,), torch.finfo(dtype).tiny / 4, dtype=dtype)    # subnormal
    assert all_finite(big) and all_finite(-big) and all_finite(tiny)
    with pytest.raises(InvalidValueError, match="x contains NaN or inf"):
        check_finite(torch.tensor([0.0, float("nan")], dtype=dtype), "x")


def test_all_finite_other_dtypes_and_ranks_use_torch():
    assert not all_finite(torch.tensor([1.0, float("inf")], dtype=torch.float64))
    assert all_finite(torch.zeros([1] * 9))                     # 9 dims: beyond the C++ path
    assert not all_finite(torch.full([1] * 9, float("nan")))
