"""ivf-group's code layout (csrc/ivf/ivf_scan.h), the queries in code space, and bfloat16 helpers."""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

TAIL_TOKENS = 64  # recent keys kept unassigned in the always-scanned tail list


def flush_phase(layer_idx: int) -> int:
    """Where layer ``layer_idx``'s tails are flushed: when an add ends at a host position ``p`` with ``(p - phase) %
    TAIL_TOKENS == 0`` (or the tail is full). Layers differ (13 is prime to 64), so a model's layers flush on
    different decode tokens, up to 64 layers one per token, instead of all on the same one."""
    return (13 * layer_idx) % TAIL_TOKENS


BLOCK = 16  # arena rows per block of the transposed code layout (csrc/ivf_scan.h)


def code_layout(head_dim: int, bits: int) -> Tuple[int, int]:
    """``(Dp, row_bytes)``: head_dim padded for the kernels (to 16, or 32 for 4 bits) and the arena bytes per key."""
    align = 32 if bits == 4 else 16
    dp = -(-head_dim // align) * align
    return dp, dp * bits // 8


def whole_blocks(rows):
    """Rows (or a row count) rounded up to whole blocks."""
    return -(-rows // BLOCK) * BLOCK


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even: the C++ encode's float_to_bf16_bits, bit for bit."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def bf16_values(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits -> float32 values."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def block_rows(codes: np.ndarray) -> np.ndarray:
    """Code rows ``[n, row_bytes]`` uint8 in the arena's blocked layout: ``[ceil(n / 16), row_bytes / 4, 16, 4]``
    (block, 4-byte group, row in block, byte), zero rows padding the last block. This is the memory layout the
    kernels read (csrc/ivf_scan.h ``code_offset``)."""
    n, rb = codes.shape
    out = np.zeros((whole_blocks(n) // BLOCK, rb // 4, BLOCK, 4), dtype=np.uint8)
    rows = np.arange(n)
    out[rows // BLOCK, :, rows % BLOCK, :] = codes.reshape(n, rb // 4, 4)
    return out


class QueryCodes:
    """A group's queries in code space, quantized: ``qs [Hkv, G, Dp] ~= qscale[..., None] * qi``.

    qi: ``[Hkv, G, Dp]`` int8 in [-127, 127] (symmetric, per query: ``qscale = max |qs| / 127``), zero padded
    from D to Dp. qscale: ``[Hkv, G]`` float32. The ranking error this adds is a fraction of the codes' own
    (measured against 8-bit key codes on real attention, docs/performance.md; 4-bit codes are coarser still).
    """

    def __init__(self, qi: torch.Tensor, qscale: torch.Tensor):
        self.qi, self.qscale = qi, qscale

    @classmethod
    def quantize(cls, qs: torch.Tensor, dp: int) -> QueryCodes:
        x = qs.numpy()  # numpy: a decode step's few thousand values cost ~1 us per op here, torch's round ~300 us
        amax = np.abs(x).max(axis=-1)
        step = (amax / np.float32(127.0)).astype(np.float32)  # 0 also below 127 x the smallest subnormal
        qscale = np.where(step > 0, step, np.float32(1.0)).astype(np.float32)
        qi = np.zeros((*x.shape[:-1], dp), dtype=np.int8)
        qi[..., : x.shape[-1]] = np.clip(np.rint(x / qscale[..., None]), -127, 127)
        return cls(torch.from_numpy(qi), torch.from_numpy(qscale))

    def scores(self, h: int, codes: np.ndarray) -> torch.Tensor:
        """``[G, n]`` float32 scores of KV head h's queries against ``codes [n, Dp]`` uint8, with the kernels'
        arithmetic: the exact integer dot product, converted to float32, times qscale."""
        dots = self.qi[h].to(torch.int64) @ torch.from_numpy(np.ascontiguousarray(codes)).to(torch.int64).T
        return dots.to(torch.float32) * self.qscale[h][:, None]
