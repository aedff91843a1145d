import os
import subprocess
import sys
import textwrap

import pytest


def test_subpackages_install_under_hetero_only(tmp_path):
    code = (
        "import hetero.gpu, hetero.cpu, hetero.retrieval, importlib.util\n"
        "assert all(importlib.util.find_spec(m) is None for m in ('gpu', 'cpu', 'retrieval')), 'top-level leak'\n"
        "print('ok')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_import_is_light(tmp_path):
    """Importing hetero must not pull in heavy optional modules (they load with their backend)."""
    code = ("import sys, hetero\n"
            "heavy = [m for m in ('triton', 'numba', 'faiss', 'transformers') if m in sys.modules]\n"
            "print(heavy)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr


def test_without_numba_the_cpp_path_runs_and_numba_users_are_told_the_extra(tmp_path):
    """numba is the tested fallback, not a requirement: with it absent, a step runs on the C++ host kernel, and
    what needs numba (the 'lsh' retriever, host_backend='numba') says which extra to install."""
    code = textwrap.dedent("""
        import sys
        sys.modules["numba"] = None  # import numba raises ImportError, as when it is not installed
        import importlib.util
        importlib.util.find_spec = (lambda f: lambda name, *a: None if name == "numba" else f(name, *a))(
            importlib.util.find_spec)
        import torch
        from hetero import BackendUnavailableError, ConfigError, HeteroAttention, HeteroConfig, LayerCache
        cfg = HeteroConfig(window=8, sinks=2, retriever="exact", host_backend="auto")
        layer = LayerCache(cfg)
        layer.append(torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16))
        out = HeteroAttention(cfg).run(torch.randn(1, 4, 16), layer)
        assert torch.isfinite(out).all()
        try:
            HeteroConfig(retriever="lsh")
        except ConfigError as e:
            assert "hetero[numba]" in str(e), e
        else:
            raise AssertionError("lsh accepted without numba")
        try:
            HeteroAttention(cfg.with_(host_backend="numba")).run(torch.randn(1, 4, 16), layer)
        except BackendUnavailableError as e:
            assert "numba" in str(e), e
        else:
            raise AssertionError("the numba backend ran without numba")
        print("ok")
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stdout + p.stderr


def _import_warnings(code: str, **env) -> str:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    p = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True,
                       env={**base, **env}, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stderr


def test_import_after_torch_warns_of_spinning_openmp_only_when_it_is_too_late():
    import torch

    if "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("this torch build has no OpenMP")
    late = _import_warnings("import torch, hetero")
    assert "PerformanceWarning" in late and "OMP_WAIT_POLICY" in late
    assert "PerformanceWarning" not in _import_warnings("import hetero, torch, os; "
                                                        "assert os.environ['OMP_WAIT_POLICY'] == 'PASSIVE'")
    assert "PerformanceWarning" not in _import_warnings("import torch, hetero", OMP_WAIT_POLICY="ACTIVE")


def test_an_extension_built_from_other_sources_is_not_loaded_and_says_to_rebuild(monkeypatch):
    """A stale build (an editable install whose C++ was not rebuilt) would take calls with the wrong arguments."""
    import types

    import hetero
    from hetero import native

    fake = types.SimpleNamespace(ABI=native.ABI - 1)
    monkeypatch.setattr(native, "_ext", None)
    monkeypatch.setattr(native, "_load_error", None)
    monkeypatch.setattr(hetero, "_native", fake, raising=False)
    monkeypatch.setitem(sys.modules, "hetero._native", fake)
    assert native.load() is None
    assert "out of date" in native.load_error() and "rebuild" in native.load_error()
