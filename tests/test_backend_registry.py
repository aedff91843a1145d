import subprocess
import sys

import pytest
import torch

from hetero import BackendUnavailableError, ConfigError, HeteroAttention, HeteroConfig, LayerCache, window_attention
from hetero.backends import AttentionInputs, BackendSet
from hetero.registry import HOST_BACKENDS, RETRIEVERS, WINDOW_BACKENDS, Registry

CPU_INPUTS = AttentionInputs(torch.device("cpu"), torch.bfloat16, 64, 8, 2, 1)


def test_auto_prefers_cpp_then_numba_then_torch(monkeypatch):
    monkeypatch.delenv("HETERO_CPU_BACKEND", raising=False)
    backends = BackendSet()
    chosen = backends.select("host", "auto", CPU_INPUTS)
    expected = "cpp" if not backends.get("host", "cpp").availability_reasons() else "numba"
    assert chosen.name == expected


def test_auto_window_backend_on_cpu_is_cpp_never_the_interpreter(monkeypatch):
    monkeypatch.delenv("HETERO_WINDOW_BACKEND", raising=False)
    backends = BackendSet()
    chosen = backends.select("window", "auto", CPU_INPUTS).name
    assert chosen == ("cpp" if not backends.get("window", "cpp").availability_reasons() else "torch")


def test_env_override_selects_backend(monkeypatch):
    monkeypatch.setenv("HETERO_CPU_BACKEND", "numba")
    assert BackendSet().select("host", "auto", CPU_INPUTS).name == "numba"


@pytest.mark.parametrize("var,side", [("HETERO_CPU_BACKEND", "host"), ("HETERO_WINDOW_BACKEND", "window")])
def test_env_override_naming_no_backend_is_refused_with_the_variable_named(monkeypatch, var, side):
    monkeypatch.setenv(var, "cuda-magic")
    with pytest.raises(ConfigError, match=f"{var}='cuda-magic' names no"):
        BackendSet().select(side, "auto", CPU_INPUTS)


def test_impossible_request_prints_the_inputs_and_every_backend_reason():
    big = AttentionInputs(torch.device("cpu"), torch.bfloat16, 64, 130 * 2, 2, 1)  # a GQA group of 130
    with pytest.raises(BackendUnavailableError) as info:
        BackendSet().select("host", "numba", AttentionInputs(torch.device("cuda"), torch.bfloat16, 64, 8, 2, 1))
    assert "device=cuda" in str(info.value) and "numba: device cuda not in ['cpu']" in str(info.value)
    # "auto" over a group too large for the C++ kernel falls back (the plan probes with the real Hq)
    assert BackendSet().select("host", "auto", big).name in ("numba", "torch")


def test_plan_falls_back_when_the_group_is_too_large_for_the_cpp_kernel():
    cfg = HeteroConfig(window=4, sinks=1, retriever="all")
    layer = LayerCache(cfg)
    layer.append(torch.randn(1, 1, 40, 16), torch.randn(1, 1, 40, 16))
    attn = HeteroAttention(cfg)
    q = torch.randn(1, 70, 16)  # MQA with 70 query heads: G = 70 > 64
    plan = attn.plan(layer, 70)
    assert plan.host.name != "cpp" and plan.window.name != "cpp" and not plan.fused
    out = attn.run(q, layer, plan)
    from helpers import oracle, rel_err

    assert rel_err(out, oracle(q, layer)) < 1e-5


def test_explicit_backend_that_cannot_serve_raises_with_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a CPU-only machine outside the tests
    q, k = torch.randn(1, 4, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(BackendUnavailableError, match="triton: .*TRITON_INTERPRET"):
        window_attention(q, k, k, backend="triton")


def test_registries_are_lazy_and_reject_unknown_names():
    reg = Registry("thing", {"a": "hetero.does_not_exist:Nothing"})
    assert reg.names() == ["a"] and "a" in reg
    with pytest.raises(ConfigError, match="unknown thing 'b'; registered: \\['a'\\]"):
        reg.load("b")
    with pytest.raises(ImportError):
        reg.load("a")
    assert set(HOST_BACKENDS.names()) == {"cpp", "numba", "torch"}
    assert set(WINDOW_BACKENDS.names()) == {"cpp", "torch", "triton"}
    assert "ivf-group" in RETRIEVERS.names() and "all" in RETRIEVERS.names()


def test_every_backend_explains_itself_for_one_inputs_bundle():
    backends = BackendSet()
    for side, reg in (("window", WINDOW_BACKENDS), ("host", HOST_BACKENDS)):
        for name in reg.names():
            reasons = backends.get(side, name).not_supported_reasons(CPU_INPUTS)
            assert isinstance(reasons, list) and all(isinstance(r, str) for r in reasons)
    assert backends.get("host", "torch").not_supported_reasons(CPU_INPUTS) == []


_NO_TRITON = r"""
import sys
import torch
from hetero import HeteroAttention, HeteroConfig, LayerCache
layer = LayerCache(HeteroConfig(window=16, sinks=2, budget=0.1))
layer.append(torch.randn(1, 2, 300, 64), torch.randn(1, 2, 300, 64))
attn = HeteroAttention(layer.config)
plan = attn.plan(layer, 8, torch.float32)
attn.decode(torch.randn(1, 8, 64), torch.randn(1, 2, 64), torch.randn(1, 2, 64), layer, plan)
print("triton" in sys.modules)
"""


def test_a_cpu_step_on_auto_backends_does_not_import_triton():
    """On CPU tensors "auto" takes the C++ window backend before Triton is ever loaded: importing triton costs
    ~0.2 s on the first plan, for a backend "auto" declines on the CPU."""
    from hetero.native import load_error

    if load_error() is not None:
        pytest.skip(f"without the C++ extension auto loads triton to ask it: {load_error()}")
    p = subprocess.run([sys.executable, "-c", _NO_TRITON], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "False"


_FALLBACK = r"""
import importlib.abc, sys, warnings
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "hetero._native":
            raise ImportError("simulated: extension not built")
sys.meta_path.insert(0, Block())
import torch
from hetero import HeteroAttention, HeteroConfig, LayerCache
from hetero.backends import AttentionInputs, BackendSet
layer = LayerCache(HeteroConfig(window=2, sinks=1, retriever="all"))
layer.append(torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16))
inputs = AttentionInputs(torch.device("cpu"), torch.float32, 16, 4, 2, 1)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    be = BackendSet().select("host", "auto", inputs)
    be2 = BackendSet().select("host", "auto", inputs)
    attn = HeteroAttention(layer.config)
    q = torch.randn(1, 4, 16)
    out = attn.run(q, layer)
print(be.name, len([x for x in w if "falls back to numba" in str(x.message)]), tuple(out.shape))
"""


def test_missing_extension_falls_back_to_numba_with_one_warning():
    p = subprocess.run([sys.executable, "-c", _FALLBACK], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["numba", "1", "(1,", "4,", "16)"]
