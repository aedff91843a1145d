import subprocess
import sys

import pytest
import torch

from hetero import BackendUnavailableError, HeteroConfig, LayerCache, window_attention
from hetero.backends import describe_backends, get_backend, select_backend


def _layer(dtype=torch.float32, d=16):
    layer = LayerCache(HeteroConfig(window=2, sinks=1, retriever="all"))
    layer.append(torch.randn(1, 2, 20, d).to(dtype), torch.randn(1, 2, 20, d).to(dtype))
    return layer


def test_auto_prefers_cpp_then_numba_then_torch(monkeypatch):
    monkeypatch.delenv("HETERO_CPU_BACKEND", raising=False)
    layer = _layer()
    q = torch.randn(1, 4, 16)
    host = layer.host.view()
    chosen = select_backend("host", "auto", lambda be: be.not_supported_reasons(q, host))
    expected = "cpp" if not get_backend("host", "cpp").availability_reasons() else "numba"
    assert chosen.name == expected


def test_auto_window_backend_on_cpu_is_cpp_never_the_interpreter(monkeypatch):
    monkeypatch.delenv("HETERO_WINDOW_BACKEND", raising=False)
    q, k = torch.randn(1, 4, 16), torch.randn(1, 2, 8, 16)
    chosen = select_backend("window", "auto", lambda be: be.not_supported_reasons(q, k), device=k.device).name
    assert chosen == ("cpp" if not get_backend("window", "cpp").availability_reasons() else "torch")


def test_env_override_selects_backend(monkeypatch):
    monkeypatch.setenv("HETERO_CPU_BACKEND", "numba")
    layer = _layer()
    q = torch.randn(1, 4, 16)
    assert select_backend("host", "auto", lambda be: be.not_supported_reasons(q, layer.host.view())).name == "numba"


def test_impossible_request_lists_every_backend_reason():
    def refuse(be):
        return [f"{be.name} says no"]

    with pytest.raises(BackendUnavailableError) as info:
        select_backend("host", "auto", refuse)
    msg = str(info.value)
    for name in ("cpp", "numba", "torch"):
        assert f"{name}: {name} says no" in msg


def test_explicit_backend_that_cannot_serve_raises_with_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a CPU-only machine outside the tests
    q, k = torch.randn(1, 4, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(BackendUnavailableError, match="triton: .*TRITON_INTERPRET"):
        window_attention(q, k, k, backend="triton")


def test_describe_backends_reports_each():
    info = describe_backends("host", torch.device("cpu"), torch.bfloat16, 128)
    assert set(info) == {"cpp", "numba", "torch"} and info["torch"] == []


_FALLBACK = r"""
import importlib.abc, sys, warnings
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "hetero._native":
            raise ImportError("simulated: extension not built")
sys.meta_path.insert(0, Block())
import torch
from hetero import HeteroConfig, LayerCache, sparse_attention, Selection
layer = LayerCache(HeteroConfig(window=2, sinks=1, retriever="all"))
layer.append(torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16))
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    from hetero.backends import select_backend
    q = torch.randn(1, 4, 16)
    be = select_backend("host", "auto", lambda be: be.not_supported_reasons(q, layer.host.view()))
    be2 = select_backend("host", "auto", lambda be: be.not_supported_reasons(q, layer.host.view()))
print(be.name, len([x for x in w if "falls back to numba" in str(x.message)]))
"""


def test_missing_extension_falls_back_to_numba_with_one_warning():
    p = subprocess.run([sys.executable, "-c", _FALLBACK], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["numba", "1"]
