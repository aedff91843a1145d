"""Every input check of the public entry points, one function per public type. Each raises a typed
``HeteroError`` naming the argument, what it got and what is allowed. Checks run before any state changes, and
before native code reads any memory."""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import numpy as np
import torch

from . import native
from .errors import DTypeError, InvalidValueError, ShapeError
from .types import HostView, PartialAttention, Selection

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
KV_STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(x, name: str, rank: int, layout: str) -> torch.Tensor:
    """A dense (strided) tensor with data of rank ``rank``."""
    if not isinstance(x, torch.Tensor):
        raise ShapeError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise ShapeError(f"{name} must be a dense (strided) tensor {layout}, got layout {x.layout}")
    if x.is_meta:
        raise ShapeError(f"{name} is a meta tensor (it has no data); pass a tensor on the CPU or a CUDA device")
    if x.dim() != rank:
        raise ShapeError(f"{name} must have rank {rank} {layout}, got shape {tuple(x.shape)}")
    return x


def check_float(x: torch.Tensor, name: str, allowed: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    if x.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise DTypeError(f"{name} has dtype {x.dtype}; allowed: {names}")


_FINITE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# The largest |q|, |k| or |v| attention takes (csrc/runner/step.h kValueLimit): scores scale * q.k over head_dim
# < 2**16 with scale <= MAX_SCALE stay below 6.6e37, inside float32, and so do the value sums. A finite input beyond
# it could make a score inf and its part silently wrong (a key of 1e37 dropped its whole window part), so it is
# refused instead. Real models' activations are many orders of magnitude below.
VALUE_LIMIT = 1e15


def check_finite(x: torch.Tensor, name: str) -> None:
    if x.numel() and not all_finite(x):
        raise InvalidValueError(f"{name} contains NaN or inf")


def check_in_range(x: torch.Tensor, name: str) -> None:
    """``x`` (a query, key or value) finite and within ``VALUE_LIMIT``: ``InvalidValueError`` naming which."""
    if x.numel() and not all_finite(x, VALUE_LIMIT):
        if not all_finite(x):
            raise InvalidValueError(f"{name} contains NaN or inf")
        raise InvalidValueError(f"{name} holds values up to {float(x.detach().abs().max()):.6g} in magnitude; "
                                f"attention takes |x| <= {VALUE_LIMIT:g} (beyond, float32 scores overflow)")


def overflow_bound(dtype: torch.dtype) -> float:
    """A magnitude below which every value stays finite in ``dtype``: its largest finite value plus half a unit in
    its last place (where round to nearest even goes to inf), less 2^-22 of it, as a float64 cast may round twice
    (through float32)."""
    big = float(torch.finfo(dtype).max)
    return (big + float(torch.finfo(dtype).eps) * 2.0 ** (math.frexp(big)[1] - 2)) * (1 - 2.0 ** -22)


def check_fits(x: torch.Tensor, dtype: torch.dtype, name: str, limit: Optional[float] = None,
               why: str = "") -> None:
    """``x`` (finite) stays finite once cast to ``dtype``, and within ``limit`` in magnitude when one is given
    (``why`` says whose): ``InvalidValueError`` naming the range otherwise. At most one read of ``x``, no copy;
    nothing to read when ``dtype`` holds every value of ``x.dtype`` and there is no limit."""
    narrows = torch.finfo(dtype).max < torch.finfo(x.dtype).max
    if x.numel() == 0 or not (narrows or limit is not None):
        return
    lo, hi = torch.aminmax(x.detach())
    top = max(-float(lo), float(hi))
    if narrows and top >= overflow_bound(dtype):
        raise InvalidValueError(f"{name} holds finite values beyond {str(dtype).replace('torch.', '')}'s range "
                                f"(|x| <= {float(torch.finfo(dtype).max):.6g}), up to {top:.6g}: they would become inf")
    if limit is not None and top > limit:
        raise InvalidValueError(f"{name} hold values up to {top:.6g} in magnitude: {why}")


def all_finite(x: torch.Tensor, limit: Optional[float] = None) -> bool:
    """No NaN or inf in ``x`` (and no magnitude above ``limit`` when given). CPU float32 / bfloat16 / float16
    tensors of any strides are checked in one C++ call (csrc/common/finite.cpp: on a decode step's cold caches,
    torch's isfinite + all cost 0.1-0.2 ms per tensor); other tensors, or a build without the extension, by torch
    (the same answer)."""
    code = _FINITE_CODES.get(x.dtype)
    if code is not None and x.device.type == "cpu" and x.layout == torch.strided and x.dim() <= 8:
        ext = native.load()
        if ext is not None:
            bits = 0xFFFFFFFF if limit is None else _max_abs_bits(x.dtype, limit)
            return ext.all_finite(x.data_ptr(), code, x.shape, x.stride(), bits)
    if limit is None:
        return bool(torch.isfinite(x).all())
    return bool((x.abs() <= _largest_at_most(x.dtype, limit)).all())  # NaN compares False


@functools.lru_cache(maxsize=None)
def _largest_at_most(dtype: torch.dtype, limit: float) -> float:
    """The largest value of ``dtype`` that is at most ``limit`` (float64 and anything else: ``limit``)."""
    if dtype not in _FINITE_CODES:
        return limit
    x = torch.tensor(limit, dtype=torch.float64).to(torch.float32)
    if float(x) > limit:
        x = torch.nextafter(x, torch.tensor(0.0))
    if dtype == torch.bfloat16:  # float32 bits with the low half cleared: rounded toward zero
        x = (x.view(torch.int32) & ~0xFFFF).view(torch.float32)
    elif dtype == torch.float16:
        x = x.clamp(max=float(torch.finfo(torch.float16).max)).to(torch.float16)
        if float(x) > limit:
            x = torch.nextafter(x, torch.tensor(0.0, dtype=torch.float16))
    return float(x)


@functools.lru_cache(maxsize=None)
def _max_abs_bits(dtype: torch.dtype, limit: float) -> int:
    """The bits of ``_largest_at_most`` in ``dtype`` (what csrc/common/finite.cpp compares magnitudes with)."""
    x = torch.tensor(_largest_at_most(dtype, limit), dtype=dtype)
    assert limit >= 0, limit  # (a sign bit left in would read as a magnitude past every finite one)
    return int(x.view(torch.int32 if dtype == torch.float32 else torch.int16)) & (
        0x7FFFFFFF if dtype == torch.float32 else 0x7FFF)


# The largest softmax scale: scores scale * q.k with |q|, |k| <= VALUE_LIMIT over head_dim < 2**16 stay below
# 6.6e37, inside float32 (models use 1/sqrt(head_dim), or 1/head_dim).
MAX_SCALE = 1e3


def scale_ok(scale) -> bool:
    """A real number the kernels can multiply by in float32 with no score overflowing: in [float32's smallest
    normal, ``MAX_SCALE``]."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        return False
    try:
        x = float(scale)
    except OverflowError:
        return False
    return float(torch.finfo(torch.float32).tiny) <= x <= MAX_SCALE


def check_scale(scale, name: str = "scale") -> None:
    """None (1/sqrt(D)) or a number > 0 within float32's normal range."""
    if scale is not None and not scale_ok(scale):
        raise InvalidValueError(f"{name} must be None (1/sqrt(head_dim)) or a number in [1.18e-38, {MAX_SCALE:g}] "
                                f"(the kernels' float32 scores must not overflow), got {scale!r}")


def holds_bool(x) -> bool:
    """Whether a (nested) list or tuple holds a bool: numpy and torch read ``[True, 2]`` as the ints ``[1, 2]``."""
    return isinstance(x, (list, tuple)) and any(isinstance(e, (bool, np.bool_)) or holds_bool(e) for e in x)


def check_lengths(lengths, batch: int, limit: int, name: str = "lengths") -> torch.Tensor:
    """``[B]`` integer counts in ``[0, limit]`` (a tensor, a numpy array or a list of ints); None means all
    ``limit``. Returns them as a CPU int64 tensor."""
    if lengths is None:
        return torch.full((batch,), limit, dtype=torch.int64)
    if not isinstance(lengths, torch.Tensor):
        try:
            arr = np.asarray(lengths)
        except (TypeError, ValueError):
            arr = None
        if arr is None or arr.dtype == object or arr.dtype.kind not in "iu" or holds_bool(lengths):
            raise DTypeError(f"{name} must be [B={batch}] integers (a tensor or a list of ints), got {lengths!r}")
        if arr.size and arr.dtype.kind == "u" and int(arr.max()) > limit:  # before int64 would wrap it negative
            raise InvalidValueError(f"{name} must lie in [0, {limit}], got {arr.tolist()}")
        lengths = torch.from_numpy(arr.astype(np.int64))
    if lengths.is_meta or lengths.layout != torch.strided:
        raise ShapeError(f"{name} must be a dense tensor with data, got {lengths!r}")
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ShapeError(f"{name} must be [B={batch}], got shape {tuple(lengths.shape)}")
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise DTypeError(f"{name} must be an integer tensor, got {lengths.dtype}")
    lengths = lengths.to(torch.int64).cpu()
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > limit):
        raise InvalidValueError(f"{name} must lie in [0, {limit}], got {lengths.tolist()}")
    return lengths


def check_kv(keys, values, name_k: str = "k", name_v: str = "v", rank: int = 4,
             layout: str = "[B, Hkv, L, D]") -> None:
    """A key/value pair: same shape, dtype, device and strides, a float storage dtype, contiguous rows."""
    check_tensor(keys, name_k, rank, layout)
    check_tensor(values, name_v, rank, layout)
    if keys.shape != values.shape:
        raise ShapeError(f"{name_k} {tuple(keys.shape)} and {name_v} {tuple(values.shape)} must have the same shape")
    check_float(keys, name_k)
    if keys.dtype != values.dtype:
        raise DTypeError(f"{name_k} ({keys.dtype}) and {name_v} ({values.dtype}) must have the same dtype")
    if keys.device != values.device:
        raise ShapeError(f"{name_k} on {keys.device} and {name_v} on {values.device} must share a device")
    if keys.shape[1] == 0 or keys.shape[-1] == 0:
        raise ShapeError(f"{name_k} {tuple(keys.shape)} has no heads or no head_dim: {layout} needs Hkv >= 1, D >= 1")


def check_query(q, kv_heads: int, head_dim: int, batch: int, name: str = "q",
                allowed: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    """``q [B, Hq, D]``: of an ``allowed`` floating dtype, finite, ``B >= 1`` matching, ``Hq`` a multiple of
    ``Hkv``."""
    check_tensor(q, name, 3, "[B, Hq, D]")
    check_float(q, name, allowed)
    b, hq, d = q.shape
    if b == 0:
        raise ShapeError(f"empty batch: {name} has B = 0")
    if b != batch:
        raise ShapeError(f"{name} has batch {b}, the KV has {batch} sequences")
    if d != head_dim:
        raise ShapeError(f"{name} has head_dim {d}, the KV has head_dim {head_dim}")
    if hq == 0 or hq % kv_heads:
        raise ShapeError(f"{name} has {hq} heads, which is not a positive multiple of the {kv_heads} KV heads "
                         "(GQA needs Hq = G * Hkv)")
    check_in_range(q, name)
    check_fits(q, torch.float32, name)  # the kernels take the query in float32
    return q


def check_host_view(view) -> None:
    """A ``HostView`` that native kernels may read: pools ``[Hkv, R, D]`` on the CPU with contiguous rows and equal
    strides, a block table ``[B, max_blocks]`` whose first ``ceil(lengths[b] / block_tokens)`` entries of every
    sequence are blocks inside the pools (no ``-1`` holes), lengths ``[B]`` >= 0."""
    if not isinstance(view, HostView):
        raise ShapeError(f"host must be a hetero.HostView, got {type(view).__name__}")
    check_tensor(view.k_pool, "host.k_pool", 3, "[Hkv, R, D]")
    check_tensor(view.v_pool, "host.v_pool", 3, "[Hkv, R, D]")
    k, v = view.k_pool, view.v_pool
    if k.shape[0] == 0 or k.shape[2] == 0:
        raise ShapeError(f"host.k_pool {tuple(k.shape)} has no heads or no head_dim: [Hkv, R, D] needs Hkv >= 1, D >= 1")
    if k.shape != v.shape:
        raise ShapeError(f"host.k_pool {tuple(k.shape)} and host.v_pool {tuple(v.shape)} must have the same shape")
    if k.dtype != v.dtype:
        raise DTypeError(f"host.k_pool ({k.dtype}) and host.v_pool ({v.dtype}) must have the same dtype")
    check_float(k, "host.k_pool", KV_STORAGE_DTYPES)
    if k.device.type != "cpu" or v.device.type != "cpu":
        raise ShapeError(f"host pools must be in host memory (device cpu), got {k.device} / {v.device}")
    if k.stride(2) != 1 or v.stride() != k.stride():
        raise ShapeError(f"host pools need contiguous rows and equal strides, got {k.stride()} and {v.stride()}")
    bt = view.block_tokens
    if isinstance(bt, bool) or not isinstance(bt, int) or bt < 1:
        raise InvalidValueError(f"host.block_tokens must be an int >= 1, got {bt!r}")
    table = check_tensor(view.block_table, "host.block_table", 2, "[B, max_blocks]")
    if table.dtype not in INDEX_DTYPES or table.device.type != "cpu":
        raise DTypeError(f"host.block_table must be int32 (or int64) on the CPU, got {table.dtype} on {table.device}")
    lengths = check_tensor(view.lengths, "host.lengths", 1, f"[B={table.shape[0]}]")
    if lengths.shape[0] != table.shape[0]:
        raise ShapeError(f"host.lengths must be [B={table.shape[0]}] (the block table's rows), got "
                         f"{tuple(lengths.shape)}")
    if lengths.dtype not in INDEX_DTYPES:
        raise DTypeError(f"host.lengths must be int64 (or int32), got {lengths.dtype}")
    lens = lengths.cpu().numpy().astype(np.int64)
    if (lens < 0).any():
        raise InvalidValueError(f"host.lengths must be >= 0, got {lens.tolist()}")
    blocks_in_pool = k.shape[1] // bt
    need = -(-lens // bt)
    if need.size and int(need.max()) > table.shape[1]:
        raise InvalidValueError(f"host.lengths {lens.tolist()} need up to {int(need.max())} blocks of {bt} tokens, the "
                                f"block table has {table.shape[1]} per sequence")
    tab = table.cpu().numpy()
    for b, n in enumerate(need.tolist()):
        used = tab[b, :n]
        if n and (int(used.min()) < 0 or int(used.max()) >= blocks_in_pool):
            raise InvalidValueError(f"host.block_table row {b}: its first {n} entries (for {int(lens[b])} tokens) must "
                                    f"be blocks in [0, {blocks_in_pool}) of the pools, got {used.tolist()}")


def check_selection(selection, batch: int, q_heads: int, kv_heads: int, host_lengths,
                    head_dim: Optional[int] = None) -> None:
    """Indices ``[B, Hkv, k]`` int32/int64 on the CPU in ``[-1, host_length[b])``; log_weight ``[B, Hq, k]`` float,
    no NaN or +inf; estimate a float32 ``PartialAttention`` ``[B, Hq, D]`` (D = ``head_dim`` when given)."""
    if not isinstance(selection, Selection):
        raise ShapeError(f"selection must be a hetero.Selection, got {type(selection).__name__}")
    idx = check_tensor(selection.indices, "selection.indices", 3, "[B, Hkv, k]")
    if idx.dtype not in INDEX_DTYPES:
        raise DTypeError(f"selection.indices must be int32 (or int64), got {idx.dtype}")
    if idx.device.type != "cpu":
        raise ShapeError(f"selection.indices must be in host memory, got {idx.device}")
    if tuple(idx.shape[:2]) != (batch, kv_heads):
        raise ShapeError(f"selection.indices {tuple(idx.shape)} must be [B={batch}, Hkv={kv_heads}, k]")
    if idx.numel():
        flat = idx.numpy().reshape(idx.shape[0], -1)  # numpy: each torch reduction costs ~50 us with cold caches
        lo, hi = int(flat.min()), flat.max(axis=1).tolist()
        if lo < -1 or any(h >= int(n) for h, n in zip(hi, host_lengths)):
            raise InvalidValueError(
                f"selection.indices must lie in [-1, host_length) per sequence (host lengths "
                f"{list(map(int, host_lengths))}); got min {lo}, per-sequence max {hi}")
    lw = selection.log_weight
    if lw is not None:
        check_tensor(lw, "selection.log_weight", 3, "[B, Hq, k]")
        if tuple(lw.shape) != (batch, q_heads, idx.shape[2]):
            raise ShapeError(f"selection.log_weight {tuple(lw.shape)} must be [B={batch}, Hq={q_heads}, "
                             f"k={idx.shape[2]}]")
        check_float(lw, "selection.log_weight")
        if lw.device.type != "cpu":
            raise ShapeError(f"selection.log_weight must be in host memory, got {lw.device}")
        if bool(torch.isnan(lw).any()) or bool(torch.isposinf(lw).any()):
            raise InvalidValueError("selection.log_weight must not hold NaN or +inf (-inf drops a key)")
        top = float(lw.detach().max()) if lw.numel() and lw.dtype == torch.float64 else 0.0
        if top >= overflow_bound(torch.float32):
            raise InvalidValueError(f"selection.log_weight holds {top:.6g}, beyond float32's range (the "
                                    "kernels add it in float32, where it would be +inf)")
    est = selection.estimate
    if est is not None:
        check_part(est, "selection.estimate")
        want = (batch, q_heads, est.out.shape[-1] if head_dim is None else head_dim)
        if tuple(est.out.shape) != want or tuple(est.lse.shape) != want[:2]:
            raise ShapeError(f"selection.estimate must have out [B={batch}, Hq={q_heads}, D={want[2]}] and lse "
                             f"[B, Hq], got out {tuple(est.out.shape)}, lse {tuple(est.lse.shape)}")
        if est.out.dtype != torch.float32 or est.lse.dtype != torch.float32:
            raise DTypeError(f"selection.estimate must be float32, got {est.out.dtype} / {est.lse.dtype}")


def check_selected_rows(view: HostView, selection: Selection) -> None:
    """The host rows ``selection`` picks hold no NaN or inf and nothing beyond ``VALUE_LIMIT`` (the standalone op's
    check; the runtime's tiers refuse such values when they are appended). Reads only the selected rows."""
    idx = selection.indices.to(torch.int64)
    valid = idx >= 0
    if not bool(valid.any()):
        return
    b, hkv, k = idx.shape
    bt = view.block_tokens
    pos = idx.clamp(min=0)
    blocks = torch.gather(view.block_table.to(torch.int64), 1, (pos // bt).reshape(b, -1)).reshape(b, hkv, k)
    rows = (blocks * bt + pos % bt)[valid]
    heads = torch.arange(hkv).view(1, hkv, 1).expand(b, hkv, k)[valid]
    for name, pool in (("k_pool", view.k_pool), ("v_pool", view.v_pool)):
        if not all_finite(pool[heads, rows], VALUE_LIMIT):
            raise InvalidValueError(f"host.{name}: a row selection.indices picks holds NaN or inf, or values beyond "
                                    f"{VALUE_LIMIT:g} in magnitude")


def check_part(part, name: str) -> None:
    """A ``PartialAttention``: out ``[B, Hq, D]`` (or ``[B, Hq, C, D]`` for a chunk) and lse of its leading shape,
    floating point, on one device, no NaN in lse (a broken part must be refused, not merged away)."""
    if not isinstance(part, PartialAttention):
        raise ShapeError(f"{name} must be a hetero.PartialAttention, got {type(part).__name__}")
    for field, t in (("out", part.out), ("lse", part.lse)):
        if not isinstance(t, torch.Tensor) or t.is_meta or t.layout != torch.strided:
            raise ShapeError(f"{name}.{field} must be a dense tensor with data, got {type(t).__name__}")
    if part.out.dim() not in (3, 4) or tuple(part.out.shape[:-1]) != tuple(part.lse.shape):
        raise ShapeError(f"{name}: expected out [B, Hq, D] (or [B, Hq, C, D]) and lse [B, Hq] (or [B, Hq, C]), got "
                         f"out {tuple(part.out.shape)}, lse {tuple(part.lse.shape)}")
    if not (part.out.is_floating_point() and part.lse.is_floating_point()):
        raise DTypeError(f"{name}: out and lse must be floating point, got {part.out.dtype}, {part.lse.dtype}")
    if part.out.device != part.lse.device:
        raise ShapeError(f"{name}: out on {part.out.device} and lse on {part.lse.device} must share a device")
    if part.lse.numel() and bool(torch.isnan(part.lse).any()):
        raise InvalidValueError(f"{name}.lse holds NaN: the part is broken (an empty part is lse = -inf, out = 0)")
    if part.out.numel() and not bool((torch.isfinite(part.out) | torch.isneginf(part.lse).unsqueeze(-1)).all()):
        raise InvalidValueError(f"{name}.out holds NaN or inf where its lse is not -inf: the part is broken")
