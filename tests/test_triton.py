"""Triton window and merge kernels under the interpreter (conftest sets TRITON_INTERPRET=1), and compiled
for sm_80 / sm_90 with the CUDA tools in the triton wheel."""
import json
import os
import subprocess
import sys

import pytest
import torch

from hetero import PartialAttention, merge, window_attention
from hetero.reference import window_attention as ref_window

from helpers import rel_err

triton_window = pytest.importorskip("hetero.gpu.triton_window")
interpreter_only = pytest.mark.skipif(not triton_window.interpreting(), reason="CPU tensors through Triton need its "
                                "interpreter (TRITON_INTERPRET=1, set where there is no GPU); tests/test_cuda.py runs "
                                "these kernels on the GPU")

LENGTHS = [0, 1, 63, 64, 65, 113]


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("hkv,g", [(2, 1), (1, 3), (2, 4), (1, 8), (3, 8)], ids=str)
@pytest.mark.parametrize("splits", [1, 3])
def test_window_kernel_matches_float64(dtype, hkv, g, splits):
    gen = torch.Generator().manual_seed(hkv * 100 + g)
    d = 64
    k = torch.randn(len(LENGTHS), hkv, 130, d, generator=gen).to(dtype)
    v = torch.randn(len(LENGTHS), hkv, 130, d, generator=gen).to(dtype)
    k[:, :, 120:] = float("nan")  # beyond every length: must never reach the output
    v[:, :, 120:] = float("nan")
    q = 2 * torch.randn(len(LENGTHS), hkv * g, d, generator=gen)
    lengths = torch.tensor(LENGTHS)
    want = ref_window(q.double(), k.double(), v.double(), lengths, compute_dtype=torch.float64)
    got = triton_window.window_decode(q, k, v, lengths, d ** -0.5, splits=splits)
    assert torch.equal(torch.isneginf(got.lse), torch.isneginf(want.lse))
    assert torch.isfinite(got.out).all()
    assert rel_err(got.out, want.out) <= 1e-5
    fin = torch.isfinite(want.lse)
    assert torch.allclose(got.lse.double()[fin], want.lse[fin], atol=1e-5)


@interpreter_only
def test_window_kernel_odd_head_dim_and_noncontiguous_inputs():
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(2, 40, 3, 20, generator=gen)  # [B, L, Hkv, D] -> permuted view, not contiguous
    k, v = base.permute(0, 2, 1, 3), (base * 0.5).permute(0, 2, 1, 3)
    q = torch.randn(2, 20, 12, generator=gen).transpose(1, 2)  # [B, Hq, D] with non-unit last stride
    lengths = torch.tensor([40, 17])
    got = window_attention(q, k, v, lengths, backend="triton")
    want = ref_window(q.double(), k.double(), v.double(), lengths, compute_dtype=torch.float64)
    assert rel_err(got.out, want.out) <= 1e-5


@interpreter_only
def test_merge_kernel_matches_torch_merge_with_edge_cases():
    gen = torch.Generator().manual_seed(2)
    parts = [PartialAttention(torch.randn(2, 4, 8, generator=gen), 30 * torch.randn(2, 4, generator=gen))
             for _ in range(3)]
    lse_special = torch.tensor([[float("-inf"), float("inf"), 1e4, -1e4], [float("-inf")] * 4])
    parts.append(PartialAttention(torch.randn(2, 4, 8, generator=gen), lse_special))
    parts.append(PartialAttention.empty(2, 4, 8))
    want = merge(parts)
    got = triton_window.merge_triton(parts)
    assert torch.allclose(got.out, want.out, atol=1e-6) and not torch.isnan(got.out).any()
    assert torch.equal(torch.isinf(got.lse), torch.isinf(want.lse))
    fin = torch.isfinite(want.lse)
    assert torch.allclose(got.lse[fin], want.lse[fin], rtol=1e-6)
    empty = triton_window.merge_triton([PartialAttention.empty(1, 2, 8)] * 2)
    assert torch.equal(empty.out, torch.zeros(1, 2, 8)) and torch.isneginf(empty.lse).all()


@interpreter_only
def test_hetero_attention_with_triton_window_backend_is_exact():
    from hetero import HeteroAttention, HeteroConfig, LayerCache

    from helpers import oracle

    cfg = HeteroConfig(window=70, sinks=2, retriever="all", window_backend="triton", host_backend="torch")
    layer = LayerCache(cfg)
    layer.append(torch.randn(2, 2, 150, 32), torch.randn(2, 2, 150, 32), torch.tensor([150, 30]))
    q = torch.randn(2, 8, 32)
    res = HeteroAttention(cfg).run(q, layer, return_details=True)
    assert rel_err(res.out, oracle(q, layer)) <= 1e-5


def test_compiled_for_sm80_and_sm90_no_spills_tensor_cores():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-m", "hetero.gpu.compile_check"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    reports = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    seen = {(r["kernel"], r["arch"], r["dtype"], r["head_dim"]) for r in reports}
    for arch in (80, 90):
        for d in (64, 128):
            for dtype in ("float32", "bfloat16", "float16"):
                assert ("window_decode", arch, dtype, d) in seen
            assert ("merge", arch, "float32", d) in seen
    for r in reports:
        assert r["local_bytes"] == 0 and r["stack_bytes"] == 0, r  # no spills
        assert 0 < r["registers"] <= 255, r
        if r["kernel"] == "window_decode" and r["dtype"] in ("bfloat16", "float16"):
            assert r["tensor_core_instructions"] > 0, r  # HMMA / HGMMA in the SASS
