"""Every host sparse-attention backend against the float64 oracle."""
import dataclasses
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

from hetero import HeteroConfig, LayerCache, Selection, sparse_attention
from hetero.backends import BackendSet

_BACKENDS = BackendSet()


def get_backend(side, name):
    return _BACKENDS.get(side, name)
from hetero.reference import sparse_attention as ref_sparse

from helpers import ISA_LEVELS, isa_level, rel_err, usable_isa_levels

BACKENDS = ["cpp", "numba", "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}  # vs float64 on the same stored values


def _usable(name):
    be = get_backend("host", name)
    return not be.availability_reasons()


def _host(dtype, hkv, d, lengths, block_tokens=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layer = LayerCache(HeteroConfig(window=3, sinks=1, block_tokens=block_tokens, retriever="all"))
    t = max(lengths) + 4
    layer.append(torch.randn(len(lengths), hkv, t, d, generator=gen).to(dtype),
                 torch.randn(len(lengths), hkv, t, d, generator=gen).to(dtype), torch.tensor(lengths) + 4)
    return layer


def _selection(layer, k, gen, with_lw, g, shuffle=False):
    n = layer.host.length
    b, hkv = len(n), layer.kv_heads
    idx = torch.full((b, hkv, k), -1, dtype=torch.int32)
    for s in range(b):
        m = min(k, n[s])
        for h in range(hkv):
            chosen = torch.randperm(n[s], generator=gen)[:m]
            idx[s, h, :m] = chosen if shuffle else chosen.sort().values
    lw = -3 * torch.rand(b, hkv * g, k, generator=gen) if with_lw else None
    return Selection(idx, lw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
# group sizes: the kernels take queries in blocks of four and one block of the remaining 1-3
@pytest.mark.parametrize("hkv,g", [(2, 1), (1, 3), (2, 4), (2, 6), (1, 7), (1, 8), (3, 8)], ids=lambda x: str(x))
def test_backend_matches_float64_oracle(backend, dtype, hkv, g):
    if not _usable(backend):
        pytest.skip(f"{backend} unavailable: {get_backend('host', backend).availability_reasons()}")
    gen = torch.Generator().manual_seed(hkv * 10 + g)
    layer = _host(dtype, hkv, 64, [1023, 113, 0])
    for k, with_lw in itertools.product([0, 1, 15, 16, 17, 113, 1023], [False, True]):
        sel = _selection(layer, k, gen, with_lw, g)
        q = 2 * torch.randn(3, hkv * g, 64, generator=gen)
        if dtype == torch.bfloat16 and k % 2:  # bf16-valued queries (a bf16 model's): the C++ dpbf16 path
            q = q.bfloat16().float()
        want = ref_sparse(q.double(), layer.host.view(), sel, compute_dtype=torch.float64)
        got = sparse_attention(q, layer.host.view(), sel, backend=backend)
        assert got.out.dtype == torch.float32 and got.lse.dtype == torch.float32
        assert torch.equal(torch.isneginf(got.lse), torch.isneginf(want.lse)), (k, with_lw)
        assert rel_err(got.out, want.out) <= TOL[dtype], (k, with_lw)
        fin = torch.isfinite(want.lse)
        assert torch.allclose(got.lse.double()[fin], want.lse[fin], atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_head_dim_unsorted_indices_and_bf16_valued_query(backend):
    if not _usable(backend):
        pytest.skip("unavailable")
    gen = torch.Generator().manual_seed(7)
    layer = _host(torch.bfloat16, 2, 100, [300, 41], block_tokens=16)
    sel = _selection(layer, 57, gen, True, 4, shuffle=True)
    for q in (torch.randn(2, 8, 100, generator=gen), torch.randn(2, 8, 100, generator=gen).bfloat16().float()):
        want = ref_sparse(q.double(), layer.host.view(), sel, compute_dtype=torch.float64)
        got = sparse_attention(q, layer.host.view(), sel, backend=backend)
        assert rel_err(got.out, want.out) <= 2e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_unselected_rows_never_reaches_output(backend):
    if not _usable(backend):
        pytest.skip("unavailable")
    gen = torch.Generator().manual_seed(3)
    layer = _host(torch.float32, 2, 32, [200])
    sel = _selection(layer, 20, gen, False, 2)
    pool = layer.host.kv_in_use  # the rows a view holds (the room after them is not)
    keep = torch.zeros(pool.shape[:2], dtype=torch.bool)
    rows = layer.host.view().rows(sel.indices)[0]
    for h in range(2):
        keep[h, rows[h][sel.indices[0, h] >= 0]] = True
    q = torch.randn(1, 4, 32, generator=gen)
    want = ref_sparse(q.double(), layer.host.view(), sel, compute_dtype=torch.float64)
    pool[~keep] = float("nan")  # every row not selected, and the rows of its blocks not yet written
    got = sparse_attention(q, layer.host.view(), sel, backend=backend)
    assert torch.isfinite(got.out).all()
    assert rel_err(got.out, want.out) <= 2e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_log_weight_drops_key_and_all_dropped_is_empty(backend):
    if not _usable(backend):
        pytest.skip("unavailable")
    layer = _host(torch.float32, 1, 16, [10])
    idx = torch.arange(4, dtype=torch.int32).view(1, 1, 4)
    lw = torch.zeros(1, 2, 4)
    lw[0, 0] = float("-inf")  # query head 0: every key dropped
    lw[0, 1, 1] = float("-inf")
    q = torch.randn(1, 2, 16)
    got = sparse_attention(q, layer.host.view(), Selection(idx, lw), backend=backend)
    assert torch.isneginf(got.lse[0, 0]) and torch.equal(got.out[0, 0], torch.zeros(16))
    want = ref_sparse(q.double(), layer.host.view(), Selection(idx, lw), compute_dtype=torch.float64)
    assert rel_err(got.out[0, 1], want.out[0, 1]) <= 2e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_max_across_row_tiles(backend):
    """The kernels' online softmax runs over tiles of rows (C++ 32, numba 128): whole tiles dropped (-inf weights)
    before the first valid one, a maximum that grows tile after tile, and a row of padding in every tile."""
    if not _usable(backend):
        pytest.skip("unavailable")
    layer = _host(torch.float32, 1, 48, [700])
    gen = torch.Generator().manual_seed(5)
    idx = torch.arange(600, dtype=torch.int32).view(1, 1, 600).clone()
    idx[0, 0, 7::32] = -1
    q = torch.randn(1, 4, 48, generator=gen)
    lw = torch.linspace(0, 40, 600).view(1, 1, 600).repeat(1, 4, 1)  # later tiles dominate
    lw[0, 1, :300] = float("-inf")  # two numba tiles and more dropped before the first valid row
    lw[0, 2, 160:] = float("-inf")  # only the first tiles count
    lw[0, 3] = lw[0, 3].flip(0)  # the maximum comes first; later tiles only add to the sum
    sel = Selection(idx, lw)
    want = ref_sparse(q.double(), layer.host.view(), sel, compute_dtype=torch.float64)
    got = sparse_attention(q, layer.host.view(), sel, backend=backend)
    assert rel_err(got.out, want.out) <= 2e-6
    assert torch.allclose(got.lse.double(), want.lse, atol=1e-5, rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(hkv=st.integers(1, 3), g=st.integers(1, 9), d=st.sampled_from([1, 7, 16, 31, 32, 33, 64, 72, 96, 130]),
       dtype=st.sampled_from(DTYPES), lengths=st.lists(st.integers(0, 90), min_size=1, max_size=3),
       k=st.integers(0, 100), with_lw=st.booleans(), bf16_query=st.booleans(), seed=st.integers(0, 2 ** 16),
       level=st.integers(0, 3))
def test_cpp_kernel_matches_float64_oracle_on_any_group_and_head_dim(hkv, g, d, dtype, lengths, k, with_lw,
                                                                      bf16_query, seed, level):
    """The C++ kernel's blocked dots (four queries a block, then the remaining 1-3; AVX-512 four rows a block, AVX2
    two, then single rows) and its dpbf16 path (bf16-valued queries over bf16 rows) against float64, on any group
    size, head_dim, selection size and padding, at every ISA level up to the CPU's (``level`` beyond it: the CPU's)."""
    if not _usable("cpp"):
        pytest.skip("C++ extension not built")
    with isa_level(level):
        _check_cpp_against_oracle(hkv, g, d, dtype, lengths, k, with_lw, bf16_query, seed)


def _check_cpp_against_oracle(hkv, g, d, dtype, lengths, k, with_lw, bf16_query, seed):
    gen = torch.Generator().manual_seed(seed)
    layer = _host(dtype, hkv, d, lengths, block_tokens=16, seed=seed)
    sel = _selection(layer, k, gen, with_lw, g, shuffle=True)
    q = 2 * torch.randn(len(lengths), hkv * g, d, generator=gen)
    if bf16_query:
        q = q.bfloat16().float()
    view = layer.host.view()
    want = ref_sparse(q.double(), view, sel, compute_dtype=torch.float64)
    got = sparse_attention(q, view, sel, backend="cpp")
    assert torch.equal(torch.isneginf(got.lse), torch.isneginf(want.lse))
    # relative to sum_j p_j |v_j|, the size of the terms summed: a small head_dim can draw an output that cancels to
    # near zero, whose float32 sum is off by far more than TOL of itself (d = 1: 1.3e-5, the same before and after
    # the blocked dots), yet within TOL of the terms
    size = ref_sparse(q.double(), dataclasses.replace(view, v_pool=view.v_pool.abs()), sel,
                      compute_dtype=torch.float64).out
    assert float((got.out.double() - want.out).norm()) <= TOL[dtype] * float(size.norm())
    fin = torch.isfinite(want.lse)
    assert torch.allclose(got.lse.double()[fin], want.lse[fin], atol=1e-5, rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-120.0, 30.0, width=32) | st.just(float("-inf")), min_size=1, max_size=70),
       st.floats(-20.0, 30.0, width=32))
def test_numba_exp_polynomial_matches_exp(xs, shift):
    """The numba kernel's vectorized exp of (x - shift) in float32: within 3e-7 of exp in float64, exactly 0
    below -87.3 and for -inf."""
    import numpy as np

    from hetero.cpu.numba_sparse import _exp_shifted

    x = np.array(xs, dtype=np.float32)
    t = (x - np.float32(shift)).astype(np.float64)  # the difference is rounded to float32 first, as in the kernel
    want = np.exp(t)
    got = x.copy()
    ebits = np.empty(len(x), np.uint32)
    _exp_shifted(got, np.float32(shift), ebits, ebits.view(np.float32))
    lo = np.float64(np.float32(-87.3))  # the kernel's cut, compared in float32 (hypothesis found x = -87.3f)
    assert np.all(got[t < lo] == 0.0)
    keep = t >= lo
    assert np.allclose(got[keep], want[keep], rtol=3e-7, atol=0.0)


def test_fp16_subnormal_and_extreme_values_widen_exactly():
    """The numba fp16 path widens from bits: check subnormals, max and negative zero against torch."""
    from hetero.cpu.numba_sparse import NumbaSparseBackend
    from hetero.tiers import HostTier

    vals = torch.tensor([6.0e-8, -6.0e-8, 1.0e-5, 65504.0, -65504.0, -0.0, 0.5, 3.0], dtype=torch.float16)
    tier = HostTier(1, 1, 8, torch.float16, 4)
    tier.append(0, torch.zeros(1, 1, 8, dtype=torch.float16), vals.view(1, 1, 8))
    sel = Selection(torch.zeros(1, 1, 1, dtype=torch.int32))
    got = NumbaSparseBackend()(torch.zeros(1, 1, 8), tier.view(), sel, 1.0)
    assert torch.equal(got.out[0, 0], vals.float())  # one key, weight 1: out is exactly its value row


_ISA_SCRIPT = """
import itertools, json, torch
from hetero import HeteroConfig, LayerCache, Selection, sparse_attention
from hetero.native import info
from hetero.reference import sparse_attention as ref
torch.manual_seed(0)
errs = {}
# head_dim 72: the ragged tails of every vector width; 80 = 5 x 16: AVX2's bf16 even/odd split path; groups of 4,
# 6 and 7 queries: the kernels' blocks of four and of the remaining 1-3
for dtype, d, g in itertools.product((torch.float32, torch.bfloat16, torch.float16), (72, 80), (4, 6, 7)):
    layer = LayerCache(HeteroConfig(window=2, sinks=1, block_tokens=8, retriever="all"))
    layer.append(torch.randn(2, 2, 300, d).to(dtype), torch.randn(2, 2, 300, d).to(dtype), torch.tensor([300, 77]))
    # 51 rows: the last block of four (AVX-512) or two (AVX2) rows holds a single row
    idx = torch.stack([torch.stack([torch.randperm(n)[:51].sort().values for _ in range(2)]) for n in (297, 74)]).int()
    exact = torch.randn(2, 2 * g, d).bfloat16().float()  # bf16 values: the dpbf16 path where the CPU has it
    last_off = exact.clone()
    last_off[1, -1, -1] += 1e-3  # one float32 value in the last item's last query: the widening path
    for q in (torch.randn(2, 2 * g, d), exact, last_off):
        sel = Selection(idx, -torch.rand(2, 2 * g, 51))
        got = sparse_attention(q, layer.host.view(), sel, backend="cpp")
        want = ref(q.double(), layer.host.view(), sel, compute_dtype=torch.float64)
        e = float((got.out.double() - want.out).norm() / want.out.norm())
        errs[str(dtype)] = max(errs.get(str(dtype), 0.0), e)
print(json.dumps({"info": info(), "errs": errs}))
"""

@pytest.mark.parametrize("isa", ISA_LEVELS)
def test_cpp_every_isa_level_via_env_override(isa):
    if not _usable("cpp"):
        pytest.skip("C++ extension not built")
    if isa not in usable_isa_levels():
        pytest.skip(f"this CPU tops out at {usable_isa_levels()[-1]}")
    env = dict(os.environ, HETERO_CPU_ISA=isa)
    p = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["info"]["isa"] == isa
    assert max(res["errs"].values()) <= 2e-6, res


def test_cpp_isa_override_above_cpu_or_unknown_is_refused():
    if not _usable("cpp"):
        pytest.skip("C++ extension not built")
    env = dict(os.environ, HETERO_CPU_ISA="avx9000")
    code = "from hetero.native import load; load()"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode != 0 and "HETERO_CPU_ISA" in p.stderr and "allowed" in p.stderr


_VECTORS_SCRIPT = """
import json, os, sys
if sys.argv[1] == "numba-first":
    import numba
from hetero.cpu import numba_sparse
from hetero.retrieval import lsh  # a second numba module of hetero: must not change the first decision
from hetero.numba_setup import STATE
import numba, llvmlite.binding as llvm
llvm.initialize_native_target()
print(json.dumps({"state": STATE, "features": numba.config.CPU_FEATURES,
                  "avx512f": bool(llvm.get_host_cpu_features().get("avx512f", False))}))
"""


@pytest.mark.parametrize("case", ["default", "opt-out", "numba-first"])
def test_numba_wide_vectors_only_when_allowed(case):
    """The numba backend asks for 512-bit vectors before numba's first import, on AVX-512 CPUs only, and leaves
    numba alone when told to or when numba was imported first (hetero/numba_setup.py)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CPU_FEATURES", "NUMBA_CPU_NAME")}
    if case == "opt-out":
        env["HETERO_NUMBA_WIDE_VECTORS"] = "0"
    p = subprocess.run([sys.executable, "-c", _VECTORS_SCRIPT, case], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    wide = res["features"] is not None and "-prefer-256-bit" in res["features"]
    if case == "default" and res["avx512f"]:
        assert wide and res["state"].startswith("512-bit"), res
    else:
        assert not wide and res["state"].startswith("default vector width"), res
    if case == "numba-first":
        assert "imported before" in res["state"]


_TBB_SCRIPT = """
import json, sys
if sys.argv[1] == "numba-first":
    from numba import njit, prange

    @njit(parallel=True)
    def total(n):
        s = 0
        for i in prange(n):
            s += i
        return s

    total(8)  # numba's threading layer starts here, before hetero could load the tbb wheel's library
from hetero.cpu.numba_sparse import NumbaSparseBackend
from hetero.numba_setup import TBB_STATE
import numba
NumbaSparseBackend().warmup()
print(json.dumps({"state": TBB_STATE, "layer": numba.threading_layer()}))
"""


def _tbb_wheel_installed() -> bool:
    """Whether pip installed the tbb wheel here (decided apart from hetero's own lookup)."""
    import importlib.metadata

    try:
        importlib.metadata.version("tbb")
    except importlib.metadata.PackageNotFoundError:
        return False
    return sys.platform.startswith("linux")


@pytest.mark.parametrize("case", ["default", "env-tbb", "numba-first"])
def test_numba_threading_layer_is_tbb_where_the_wheel_is_installed(case):
    """pip puts the tbb wheel's libtbb where the loader does not look; the numba backend loads it by path, so that
    numba's own choice (TBB first) finds it, also when NUMBA_THREADING_LAYER=tbb asks for it (which failed with
    "No threading layer could be loaded" in a virtual environment). Too late once numba's threading layer runs."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    if case == "env-tbb":
        env["NUMBA_THREADING_LAYER"] = "tbb"
    p = subprocess.run([sys.executable, "-c", _TBB_SCRIPT, case], capture_output=True, text=True, env=env,
                       timeout=300)
    installed = _tbb_wheel_installed()
    if case == "env-tbb" and p.returncode != 0 and not installed:
        assert "No threading layer could be loaded" in p.stderr
        pytest.skip("no tbb wheel installed here (x86-64 Linux only), so numba has no TBB to load")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    if case == "numba-first":
        assert "was running before" in res["state"], res
    elif not installed:
        assert "not installed" in res["state"] or "Linux only" in res["state"], res
    else:
        assert res["state"].startswith("tbb wheel's library loaded") and res["layer"] == "tbb", res


def test_numba_warmup_compiles_every_dtype():
    be = get_backend("host", "numba")
    be.warmup()  # raises if any dtype fails to compile


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_selection_with_concentrated_attention_stays_accurate(backend):
    """20K selected rows, logits spread like the synthetic workload's: sequential float32 sums over all
    rows lost 2e-5 here (fixed by two-level sums in the C++ kernel)."""
    if not _usable(backend):
        pytest.skip("unavailable")
    from hetero.tools.workloads.synthetic import make_synthetic

    w = make_synthetic(20000, q_heads=4, kv_heads=1, head_dim=64, steps=1, dtype=torch.bfloat16, seed=1)
    layer = LayerCache(HeteroConfig(window=0, sinks=0, retriever="all", block_tokens=256))
    layer.append(w.keys[:, :, :20000], w.values[:, :, :20000])
    sel = layer.retriever.search(w.queries[0], [20000])
    want = ref_sparse(w.queries[0].double(), layer.host.view(), sel, compute_dtype=torch.float64)
    got = sparse_attention(w.queries[0], layer.host.view(), sel, backend=backend)
    assert rel_err(got.out, want.out) <= 2e-6


def test_cpp_extension_is_built_where_a_compiler_exists():
    """The build is optional so that hetero installs anywhere; where a C++ compiler exists, a missing
    extension is a bug that the numba fallback would otherwise hide."""
    import shutil

    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler on this machine")
    from hetero.native import load_error

    assert load_error() is None, load_error()


@pytest.mark.skipif(not _usable("cpp"), reason="C++ extension not built")
def test_cpp_pool_back_to_back_calls_match_one_thread():
    """Small calls (the caller may finish before a worker wakes, and must not wait for it) between large ones
    (workers join): 600 calls, each bit-identical to the same call on one thread, none hanging."""
    from hetero.cpu.cpp_sparse import CppSparseBackend

    gen = torch.Generator().manual_seed(5)
    layer = _host(torch.bfloat16, 8, 64, [700])
    two, one = CppSparseBackend(), CppSparseBackend()
    two.set_threads(2)
    one.set_threads(1)
    q = torch.randn(1, 16, 64, generator=gen)
    cases = [_selection(layer, k, gen, False, 2) for k in (1, 3, 8, 200, 2, 255)]
    want = [one(q, layer.host.view(), sel, 0.125) for sel in cases]
    for i in range(600):
        got = two(q, layer.host.view(), cases[i % len(cases)], 0.125)
        assert torch.equal(got.out, want[i % len(cases)].out) and torch.equal(got.lse, want[i % len(cases)].lse), i
