"""Shared test helpers: float64 oracles over a cache's logical tokens."""
from __future__ import annotations

import contextlib

import torch

from hetero import native
from hetero.reference import dense_attention

ISA_LEVELS = ["scalar", "avx2", "avx512", "avx512_bf16"]  # the C++ extension's levels, lowest first


def usable_isa_levels() -> list:
    """The ISA levels this CPU can run (up to the one the extension detected)."""
    return ISA_LEVELS[: ISA_LEVELS.index(native.info()["isa_detected"]) + 1]


@contextlib.contextmanager
def isa_level(level: int):
    """The C++ kernels at ``ISA_LEVELS[level]``, capped at the CPU's (``set_isa``, every Runner), restored after."""
    usable = usable_isa_levels()
    before = native.info()["isa"]
    native.load().set_isa(usable[min(level, len(usable) - 1)])
    try:
        yield
    finally:
        native.load().set_isa(before)


def oracle(q: torch.Tensor, layer, scale=None) -> torch.Tensor:
    """Float64 attention of ``q [B, Hq, D]`` over every token each sequence has in ``layer``."""
    outs = []
    for b in range(q.shape[0]):
        k, v = layer.tokens(b)
        part = dense_attention(q[b:b + 1].double(), k[None].double(), v[None].double(), scale=scale,
                               compute_dtype=torch.float64)
        outs.append(part.out[0])
    return torch.stack(outs)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    denom = ref.norm()
    return float((x - ref).norm() / denom) if denom > 0 else float(x.norm())


def snapshot(layer):
    """Everything a LayerCache holds, to check that a rejected call changed nothing."""
    if not layer.initialized:
        return None
    f, h = layer.fast, layer.host
    kv = h.kv_in_use  # the pool's room after the blocks handed out belongs to no sequence
    return (f.k.clone(), f.v.clone(), list(f.total), f.lengths.clone(), kv[:, :, 0].clone(), kv[:, :, 1].clone(),
            [list(b) for b in h.blocks], list(h.length), list(layer.retriever.ntotal))


def same_snapshot(a, b) -> bool:
    if a is None or b is None:
        return a is b
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or not torch.equal(x.view(torch.uint8) if x.dtype.is_floating_point else x,
                                                      y.view(torch.uint8) if y.dtype.is_floating_point else y):
                return False
        elif x != y:
            return False
    return True
