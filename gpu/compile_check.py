"""Compile the Triton kernels for real NVIDIA GPUs without one, and read what the hardware would run.

``triton.compile`` with a ``GPUTarget`` produces PTX and a cubin on any machine; the triton wheel ships
``cuobjdump`` and ``nvdisasm`` (``triton/backends/nvidia/bin``), which give registers, shared, stack and
local (spill) bytes per kernel and the SASS, where tensor-core instructions appear as HMMA / HGMMA.
Run in a process without ``TRITON_INTERPRET`` (the interpreter replaces ``@triton.jit`` functions).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from typing import Dict, List

DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
HEAD_DIMS = (64, 128)
ARCHS = (80, 90)


@dataclass
class KernelReport:
    kernel: str
    arch: int
    dtype: str
    head_dim: int
    registers: int
    shared_bytes: int
    stack_bytes: int
    local_bytes: int
    tensor_core_instructions: int

    def as_dict(self) -> Dict:
        return asdict(self)


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _resources(cubin: bytes) -> Dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return {
        "registers": int(fields.get("REG", -1)), "stack_bytes": int(fields.get("STACK", -1)),
        "shared_bytes": int(fields.get("SHARED", -1)), "local_bytes": int(fields.get("LOCAL", -1)),
        "tensor_core_instructions": len(re.findall(r"\b(HMMA|HGMMA)\b", sass)),
    }


def _compile(fn, signature, constexprs, arch: int, num_warps: int = 4):
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def window_kernel_report(arch: int, dtype: str, head_dim: int) -> KernelReport:
    from .triton_kernels import _window_decode_kernel
    import torch

    from .triton_window import MIN_ROWS, launch_config

    t = DTYPES[dtype]
    sig = {name: "i32" for name in _window_decode_kernel.arg_names}
    sig.update({"Q": "*fp32", "K": f"*{t}", "V": f"*{t}", "LENGTHS": "*i32", "OUT": "*fp32", "LSE": "*fp32",
                "scale_log2": "fp32"})
    block_n, num_warps = launch_config(getattr(torch, dtype))
    const = {"BLOCK_G": MIN_ROWS, "BLOCK_N": block_n, "BLOCK_D": head_dim, "UPCAST": False,
             "FP32_DOT": dtype == "float32"}
    sig.update({k: "constexpr" for k in const})
    compiled = _compile(_window_decode_kernel, sig, const, arch, num_warps)
    return KernelReport("window_decode", arch, dtype, head_dim, **_resources(compiled.asm["cubin"]))


def merge_kernel_report(arch: int, head_dim: int) -> KernelReport:
    from .triton_kernels import _merge_kernel

    sig = {name: "i32" for name in _merge_kernel.arg_names}
    sig.update({"PARTS_OUT": "*fp32", "PARTS_LSE": "*fp32", "OUT": "*fp32", "LSE": "*fp32"})
    const = {"BLOCK_P": 8, "BLOCK_D": head_dim}
    sig.update({k: "constexpr" for k in const})
    compiled = _compile(_merge_kernel, sig, const, arch)
    return KernelReport("merge", arch, "float32", head_dim, **_resources(compiled.asm["cubin"]))


def all_reports() -> List[KernelReport]:
    """Every kernel x arch x dtype x head dim the runtime supports."""
    reports = []
    for arch in ARCHS:
        for d in HEAD_DIMS:
            for dtype in DTYPES:
                reports.append(window_kernel_report(arch, dtype, d))
            reports.append(merge_kernel_report(arch, d))
    return reports


if __name__ == "__main__":
    import json

    for r in all_reports():
        print(json.dumps(r.as_dict()))
