"""Input checks shared by the public entry points. Each raises a typed error naming the argument,
what it got and what is allowed. Checks run before any state changes."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

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


def check_finite(x: torch.Tensor, name: str) -> None:
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise InvalidValueError(f"{name} contains NaN or inf")


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
