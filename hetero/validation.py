"""Input checks shared by the public entry points. Each raises a typed error naming the argument,
what it got and what is allowed. Checks run before any state changes."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import native
from .errors import DTypeError, InvalidValueError, ShapeError

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_tensor(x, name: str, rank: int, layout: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ShapeError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != rank:
        raise ShapeError(f"{name} must have rank {rank} {layout}, got shape {tuple(x.shape)}")
    return x


def check_float(x: torch.Tensor, name: str, allowed: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    if x.dtype not in allowed:
        raise DTypeError(f"{name} has dtype {x.dtype}; allowed: {[str(d) for d in allowed]}")


_FINITE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def check_finite(x: torch.Tensor, name: str) -> None:
    if x.numel() and not all_finite(x):
        raise InvalidValueError(f"{name} contains NaN or inf")


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or inf in ``x``. CPU float32 / bfloat16 / float16 tensors of any strides are checked in one C++ call
    (csrc/finite.cpp: on a decode step's cold caches, torch's isfinite + all cost 0.1-0.2 ms per tensor); other
    tensors, or a build without the extension, by torch (the same answer)."""
    code = _FINITE_CODES.get(x.dtype)
    if code is not None and x.device.type == "cpu" and x.layout == torch.strided and x.dim() <= 8:
        ext = native.load()
        if ext is not None:
            return ext.all_finite(x.data_ptr(), code, x.shape, x.stride())
    return bool(torch.isfinite(x).all())


def check_lengths(lengths: Optional[torch.Tensor], batch: int, limit: int, name: str = "lengths") -> torch.Tensor:
    """``[B]`` integer counts in ``[0, limit]``; None means all ``limit``."""
    if lengths is None:
        return torch.full((batch,), limit, dtype=torch.int64)
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ShapeError(f"{name} must be [B={batch}], got shape {tuple(lengths.shape)}")
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise DTypeError(f"{name} must be an integer tensor, got {lengths.dtype}")
    lengths = lengths.to(torch.int64).cpu()
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > limit):
        raise InvalidValueError(f"{name} must lie in [0, {limit}], got {lengths.tolist()}")
    return lengths
