"""The prefetch policy: chosen per CPU, overridable, and without effect on any result."""
import json

import pytest
import torch

from hetero import ConfigError, HeteroConfig, LayerCache, Selection, native
from hetero.cpu import prefetch

needs_native = pytest.mark.skipif(native.load() is None, reason="C++ extension not built")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """No remembered choice, no environment override, an empty calibration folder."""
    monkeypatch.setattr(prefetch, "_chosen", {})
    monkeypatch.delenv("HETERO_PREFETCH", raising=False)
    monkeypatch.setenv("HETERO_CACHE", str(tmp_path))
    return tmp_path


def test_environment_overrides_everything(fresh, monkeypatch):
    monkeypatch.setenv("HETERO_PREFETCH", "host=40,2,3,1;window=0,4,0")
    assert prefetch.choose("host")[0] == (40, 2, 3, 1)
    assert prefetch.choose("window")[0] == (0, 4, 0, 0)
    assert "HETERO_PREFETCH" in prefetch.describe()["host"]["why"]


def test_one_policy_for_both_kinds(fresh, monkeypatch):
    monkeypatch.setenv("HETERO_PREFETCH", "16,0,1")
    assert prefetch.choose("host")[0] == prefetch.choose("window")[0] == (16, 0, 1, 0)


@pytest.mark.parametrize("text", ["1,2", "a,b,c", "host=1,2,3;fast=1,2,3", "-1,0,0", "70000,0,0", "host:1,2,3", "1,2,3,2",
                                  "1,2,3,0,0"])
def test_bad_environment_is_a_config_error_that_names_the_format(fresh, monkeypatch, text):
    monkeypatch.setenv("HETERO_PREFETCH", text)
    with pytest.raises(ConfigError, match="far,near,lines"):
        prefetch.choose("host")


def test_calibration_file_is_used_and_table_is_the_fallback(fresh, monkeypatch):
    cpu = {"vendor": "GenuineIntel", "family": "6", "model": "167", "name": "Test CPU"}
    monkeypatch.setattr(prefetch, "cpu_identity", lambda: cpu)
    assert prefetch.choose("host")[0] == prefetch.TABLE[0].policies["host"]
    path = prefetch.save({"host": (96, 4, 0, 1), "window": (16, 0, 0, 0)}, threads=2)
    assert path.is_relative_to(fresh) and json.loads(path.read_text())["cpu"] == cpu
    assert prefetch.choose("host") == ((96, 4, 0, 1), f"calibrated on this CPU model ({path})")
    monkeypatch.setattr(prefetch, "_chosen", {})
    path.write_text(json.dumps({"cpu": cpu, "threads": 2, "policies": {"host": [96, 4, 0]}}))  # before spread
    assert prefetch.choose("host")[0] == (96, 4, 0, 0)
    monkeypatch.setattr(prefetch, "_chosen", {})
    cpu = {"vendor": "SomeVendor", "family": "99", "model": "1", "name": "Other"}
    policy, why = prefetch.choose("host")
    assert policy == prefetch.FALLBACK["host"] and "no table entry" in why


@pytest.mark.parametrize("text", ["[1, 2]", '{"policies": {"host": [1, 2]}}', '{"policies": {"host": [-5, 0, 0, 0]}}',
                                  '{"policies": {"host": [32, 0', '{"policies": {"host": "abc"}}',
                                  '{"policies": {"host": [32, 0, 0, 7]}}', '{"policies": {"host": [32.5, 0, 0]}}',
                                  '{"policies": "host"}', '{"cpu": {}}'])
def test_malformed_calibration_file_is_a_config_error_naming_it(fresh, text):
    path = prefetch._cache_file()
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"{path}.*(--calibrate|delete)"):
        prefetch.choose("host")


def test_saved_calibration_is_validated_and_replaces_the_old_file_whole(fresh):
    with pytest.raises(ValueError):
        prefetch.save({"host": (32, 0, 0, 2)}, threads=2)
    assert not prefetch._cache_file().exists()
    path = prefetch.save({"host": (32, 0, 0, 0)}, threads=2)
    path = prefetch.save({"host": (64, 8, 0, 1)}, threads=2)
    assert prefetch.choose("host")[0] == (64, 8, 0, 1)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left beside it


@needs_native
def test_backends_take_an_explicit_policy_despite_a_malformed_calibration(fresh):
    """`hetero env --calibrate` builds its backends with explicit policies, so it can replace a broken file."""
    from hetero.cpu.cpp_sparse import CppSparseBackend
    from hetero.cpu.cpp_window import CppWindowBackend

    path = prefetch._cache_file()
    path.parent.mkdir(parents=True)
    path.write_text("{")
    with pytest.raises(ConfigError):
        CppWindowBackend()
    policy = native.pack_prefetch(8, 0, 0)
    assert CppSparseBackend(prefetch=policy).prefetch == CppWindowBackend(prefetch=policy).prefetch == policy


@needs_native
def test_pack_prefetch_refuses_values_out_of_range():
    assert native.pack_prefetch(128, 8, 0) != native.pack_prefetch(8, 128, 0)
    assert native.pack_prefetch(32, 16, 0, 1) != native.pack_prefetch(32, 16, 0, 0)
    with pytest.raises((ValueError, OverflowError, TypeError)):
        native.pack_prefetch(1 << 16, 0, 0)
    with pytest.raises(ValueError):
        native.pack_prefetch(32, 0, 0, 2)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_policies_change_no_bit_of_the_result(dtype):
    from hetero.cpu.cpp_sparse import CppSparseBackend
    from hetero.cpu.cpp_window import CppWindowBackend

    gen = torch.Generator().manual_seed(3)
    layer = LayerCache(HeteroConfig(window=3, sinks=1, block_tokens=5, retriever="all"))
    k = torch.randn(2, 2, 301, 64, generator=gen).to(dtype)
    layer.append(k, torch.randn_like(k, dtype=torch.float32).to(dtype), torch.tensor([301, 190]))
    q = torch.randn(2, 8, 64, generator=gen)
    idx = torch.stack([torch.stack([torch.randperm(186, generator=gen)[:97].sort().values for _ in range(2)])
                       for _ in range(2)]).to(torch.int32)
    sel = Selection(idx)
    wk, wv = torch.randn(2, 2, 77, 64, generator=gen).to(dtype), torch.randn(2, 2, 77, 64, generator=gen).to(dtype)
    lengths = torch.tensor([77, 40], dtype=torch.int32)
    host, window = CppSparseBackend(), CppWindowBackend()
    results = []
    for policy in [(0, 0, 0), (128, 8, 0), (1, 1, 1), (32, 0, 2), (300, 200, 0), (32, 16, 0, 1), (1, 3, 1, 1),
                   (300, 0, 0, 1)]:
        host.prefetch = window.prefetch = native.pack_prefetch(*policy)
        h = host(q, layer.host.view(), sel, 0.125)
        w = window(q, wk, wv, lengths, 0.125)
        results.append((h.out, h.lse, w.out, w.lse))
    for got in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, results[0]))


@pytest.mark.parametrize("model,label", [("1", "Zen 3"), ("33", "Zen 3"), ("17", "Zen 4"), ("97", "Zen 4"),
                                         ("160", "Zen 4")])
def test_amd_family_25_table_tells_zen3_from_zen4(fresh, monkeypatch, model, label):
    cpu = {"vendor": "AuthenticAMD", "family": "25", "model": model, "name": "AMD EPYC"}
    monkeypatch.setattr(prefetch, "cpu_identity", lambda: cpu)
    (policy, why), (window, _) = prefetch.choose("host"), prefetch.choose("window")
    assert label in why
    assert policy[3] == (1 if label == "Zen 3" else 0)  # the V rows spread over the value pass on Zen 3 only
    assert window == ((16, 4, 0, 0) if label == "Zen 4" else (8, 0, 0, 0))  # contiguous rows: L1 too on Zen 4


@pytest.mark.parametrize("model,label", [("2", "AMD Zen 5"), ("68", "AMD Zen 5"), ("200", "no table entry")])
def test_amd_family_26_table_has_zen5_and_falls_back_beyond_it(fresh, monkeypatch, model, label):
    cpu = {"vendor": "AuthenticAMD", "family": "26", "model": model, "name": "AMD EPYC"}
    monkeypatch.setattr(prefetch, "cpu_identity", lambda: cpu)
    (host, why), (window, _) = prefetch.choose("host"), prefetch.choose("window")
    assert label in why
    assert host == prefetch.FALLBACK["host"]
    assert window == ((16, 4, 0, 0) if label == "AMD Zen 5" else prefetch.FALLBACK["window"])
