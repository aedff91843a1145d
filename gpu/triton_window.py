"""Triton window-attention backend and merge: wrappers that check, allocate and launch.

On CUDA this is the default window backend. Without CUDA the kernels run only under the Triton
interpreter (``TRITON_INTERPRET=1``, set before Triton is imported), which is how CI tests them; the
interpreter mis-computes ``tl.dot`` on bf16 operands, so under it bf16/fp16 tiles are upcast to float32
first (``UPCAST``); on CUDA they stay in their dtype and use tensor cores.
"""
from __future__ import annotations

import math
import os
from typing import List, Sequence

import torch
import triton

from hetero.backends import WindowBackend
from hetero.types import PartialAttention

from .triton_kernels import _merge_kernel, _window_decode_kernel

MIN_ROWS = 16  # tl.dot needs M >= 16 on GPUs: the G query heads are packed into at least 16 rows


def launch_config(dtype: torch.dtype):
    """(BLOCK_N keys per iteration, num_warps). Chosen from the sm_80/sm_90 compile reports
    (gpu/compile_check.py): with 4 warps, bf16 head_dim 128 needs 255 registers on sm_80 and fp32 spills to
    stack on sm_90; fp32 (IEEE dots on FMA units) still spills 528 B at BLOCK_N 64 on sm_90. These settings
    leave every kernel without stack or local memory at <= 220 registers."""
    return (16, 8) if dtype == torch.float32 else (64, 8)
MAX_HEAD_DIM = 256


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _num_splits(max_len: int, programs: int, device: torch.device) -> int:
    """Split long windows across programs so that a GPU has ~2 programs per SM (one split on the CPU)."""
    if device.type != "cuda" or max_len <= 256:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, math.ceil(2 * sms / max(programs, 1)))
    return max(1, min(want, math.ceil(max_len / 256)))


def window_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                  scale: float, splits: int = 0) -> PartialAttention:
    """Triton decode attention. q ``[B, Hq, D]``; k, v ``[B, Hkv, L, D]`` (last dim contiguous);
    lengths ``[B]``; splits: key-range splits per (sequence, KV head) merged by the merge kernel (0: chosen
    from the device). Returns PartialAttention (float32, natural-log lse)."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    if q.stride(2) != 1 or k.stride(3) != 1 or v.stride(3) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    lengths = lengths.to(device=k.device, dtype=torch.int32)
    max_len = k.shape[2]  # the slots, not lengths.max(): reading a device tensor's value would wait for the device
    block_n, num_warps = launch_config(k.dtype)
    splits = splits or _num_splits(max_len, b * hkv, k.device)
    split_len = max(block_n, triton.cdiv(triton.cdiv(max(max_len, 1), splits), block_n) * block_n)
    splits = max(1, triton.cdiv(max(max_len, 1), split_len))
    parts_out = torch.empty(b * hq, splits, d, device=q.device, dtype=torch.float32)
    parts_lse = torch.empty(b * hq, splits, device=q.device, dtype=torch.float32)
    block_g = max(MIN_ROWS, triton.next_power_of_2(g))
    block_d = max(16, triton.next_power_of_2(d))
    upcast = interpreting() and k.dtype != torch.float32
    _window_decode_kernel[(b * hkv, splits)](
        q, k, v, lengths, parts_out, parts_lse,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        parts_out.stride(0), parts_out.stride(1),
        parts_lse.stride(0),
        hkv, g, d, split_len, scale * 1.4426950408889634,
        BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d, UPCAST=upcast, FP32_DOT=k.dtype == torch.float32,
        num_warps=num_warps,
    )
    if splits == 1:
        return PartialAttention(parts_out.view(b, hq, d), parts_lse.view(b, hq))
    out, lse = _merge_rows(parts_out, parts_lse)
    return PartialAttention(out.view(b, hq, d), lse.view(b, hq))


def _merge_rows(parts_out: torch.Tensor, parts_lse: torch.Tensor):
    """parts_out ``[R, P, D]``, parts_lse ``[R, P]`` -> out ``[R, D]``, lse ``[R]`` (float32)."""
    r, p, d = parts_out.shape
    out = torch.empty(r, d, device=parts_out.device, dtype=torch.float32)
    lse = torch.empty(r, device=parts_out.device, dtype=torch.float32)
    if r == 0:
        return out, lse
    _merge_kernel[(r,)](
        parts_out, parts_lse, out, lse,
        parts_out.stride(0), parts_out.stride(1), parts_lse.stride(0), out.stride(0),
        p, d, BLOCK_P=max(2, triton.next_power_of_2(p)), BLOCK_D=max(16, triton.next_power_of_2(d)),
    )
    return out, lse


def merge_triton(parts: Sequence[PartialAttention]) -> PartialAttention:
    """``hetero.merge`` on the fast device with the Triton merge kernel (two or more parts, same shapes)."""
    b, hq, d = parts[0].out.shape
    outs = torch.stack([p.out.float() for p in parts], dim=2).reshape(b * hq, len(parts), d).contiguous()
    lses = torch.stack([p.lse.float() for p in parts], dim=2).reshape(b * hq, len(parts)).contiguous()
    out, lse = _merge_rows(outs, lses)
    return PartialAttention(out.view(b, hq, d), lse.view(b, hq))


class TritonWindowBackend(WindowBackend):
    """Split-K Triton decode kernel over sinks + window (CUDA, or CPU under the interpreter)."""

    name = "triton"
    devices = ("cuda", "cpu")

    def availability_reasons(self) -> List[str]:
        if not torch.cuda.is_available() and not interpreting():
            return ["no CUDA device (set TRITON_INTERPRET=1 to run the kernel in Triton's interpreter)"]
        return []

    def not_supported_reasons(self, inputs) -> List[str]:
        reasons = self.availability_reasons()
        if inputs.device.type == "cpu" and not interpreting():
            reasons.append("CPU tensors need TRITON_INTERPRET=1")
        if inputs.device.type not in self.devices:
            reasons.append(f"device {inputs.device.type} not in {list(self.devices)}")
        if inputs.kv_dtype not in self.dtypes:
            reasons.append(f"KV dtype {inputs.kv_dtype} not supported")
        if inputs.head_dim > MAX_HEAD_DIM:
            reasons.append(f"head_dim {inputs.head_dim} > {MAX_HEAD_DIM}")
        return reasons

    def auto_reasons(self, inputs) -> List[str]:
        if inputs.device.type == "cpu":
            return ["on CPU 'auto' takes a CPU backend: Triton runs there only in its (slow) interpreter; ask for "
                    "'triton' by name"]
        return []

    def __call__(self, q, k, v, lengths, scale) -> PartialAttention:
        return window_decode(q, k, v, lengths, scale)
