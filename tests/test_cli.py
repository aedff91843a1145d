import json
import os
import subprocess
import sys

import pytest
import torch

CLI = [sys.executable, "-m", "hetero.tools.cli"]
SMALL = ["--context", "1500", "--heads", "8", "--kv-heads", "2", "--head-dim", "32", "--window", "128",
         "--steps", "2"]


def _run(*args, env=None):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=300, env=env)


def test_profile_exact_mode_json():
    p = _run("profile", *SMALL, "--retriever", "all", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    for key in ("context", "batch", "heads", "kv_heads", "head_dim", "window", "sinks", "budget", "retriever",
                "backends", "dense_ms", "hetero_ms", "speedup", "rel_error", "phases"):
        assert key in r
    assert set(r["phases"]) >= {"window", "retrieve", "host_attn", "merge", "transfer", "evict"}
    assert r["rel_error"] <= 1e-5
    assert r["context"] == 1500 and r["retriever"] == "all"


def test_profile_exact_topk_reports_error():
    p = _run("profile", *SMALL, "--retriever", "exact", "--budget", "0.3", "--json")  # tiny context: 11 clusters
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert 0 < r["rel_error"] < 0.5 and 0 < r["rows_read_fraction"] < 1


def test_profile_table_output():
    p = _run("profile", *SMALL, "--retriever", "exact")
    assert p.returncode == 0, p.stderr
    assert "speedup" in p.stdout and "host_attn" in p.stdout


@pytest.mark.parametrize("args,needle", [
    (["profile", "--context", "-5"], "--context"),
    (["profile", "--budget", "abc"], "--budget"),
    (["profile", "--budget", "1.5"], "budget"),
    (["profile", "--retriever", "nope"], "--retriever"),
    (["profile", "--heads", "6", "--kv-heads", "4"], "multiple"),
    (["nosuchcommand"], "invalid choice"),
])
def test_bad_flags_exit_2_with_one_line(args, needle):
    p = _run(*args)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], p.stderr


@pytest.mark.parametrize("args,needle", [
    (["profile", "--model", "/nonexistent/model"], "no such folder"),
    (["profile", "--model", "{tmp}"], "no config.json"),
    (["profile", "--model", "smollm2", "--steps", "1"], "--steps 1"),
    (["profile", "--model", "smollm2", "--batch", "2", "--plot", "x.png"], "--batch, --plot"),
    (["profile", "--model", "smollm2", "--layer", "3"], "--layer"),
    (["profile", "--layer", "3"], "--workload real"),
    (["profile", "--workload", "real", "--layer", "99"], "layers 0..29"),
    (["profile", "--device", "cuda"] if not torch.cuda.is_available() else ["profile", "--device", "tpu"], "--device"),
    (["profile", "--window-backend", "triton"] if not torch.cuda.is_available() else
     ["profile", "--host-backend", "nosuch"], "backend"),
    (["profile", "--trace", "/nonexistent/t.json"], "does not exist"),
    (["profile", "--trace", "{tmp}"], "is a folder"),
    (["profile", "--plot", "/proc/hetero-test.png"], "cannot be written"),
    (["profile", "--plot", "{tmp}/p.txt"], "matplotlib writes"),
    (["profile", "--trace", ""], "empty path"),
    (["profile", "--workload", "real", "--batch", "2"], "--batch applies to the synthetic workload"),
    (["profile", "--workload", "real", "--seed", "1"], "--seed applies to the synthetic workload"),
    (["bench", "cpu-sparse", "--k", "8192", "--tokens", "4096"], "more rows than --tokens"),
    (["bench", "sweep", "--retrievers", "nope", "--out", "{tmp}/s"], "--retrievers nope"),
    (["bench", "sweep", "--budgets", "0.02,1.5", "--out", "{tmp}/s"], "--budgets 1.5"),
    (["bench", "needle", "--retrievers", "ivf,nope"], "--retrievers nope"),
])
def test_profile_refuses_before_running_the_workload(args, needle, tmp_path):
    """One line, exit 2, and nothing of the workload started (no prefill line on stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # triton then needs a real GPU
    p = _run(*[a.replace("{tmp}", str(tmp_path)) for a in args], env=env)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], p.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("missing,args,needle", [
    ("matplotlib", ["profile", "--plot", "{tmp}/p.png"], "--plot needs matplotlib"),
    ("transformers", ["profile", "--model", "smollm2"], "--model needs transformers"),
])
def test_profile_names_a_missing_optional_dependency_first(monkeypatch, capsys, tmp_path, missing, args, needle):
    import importlib.util

    from hetero.tools import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    assert cli.main([a.replace("{tmp}", str(tmp_path)) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not list(tmp_path.iterdir())


def test_profile_names_an_unreadable_model_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"")
    p = _run("profile", "--model", str(tmp_path))
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot read its config.json" in lines[0], p.stderr


def test_profile_names_missing_weights(monkeypatch, capsys):
    from hetero.tools import cli
    from hetero.tools.workloads import smollm2

    def missing():
        raise smollm2.WorkloadUnavailable("the SmolLM2 weights package is not installed")

    monkeypatch.setattr(smollm2, "package_folder", missing)
    assert cli.main(["profile", "--model", "smollm2"]) == 2
    assert "--model smollm2: the SmolLM2 weights package is not installed" in capsys.readouterr().err


def test_env_json_lists_backends_and_threads():
    p = _run("env", "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert {"versions", "cpu", "cpp_extension", "threads", "numba", "backends", "cuda"} <= set(info)
    assert info["backends"]["host/torch"]["usable"] is True
    assert "why_not" in info["backends"]["window/triton"]


def test_env_table():
    p = _run("env")
    assert p.returncode == 0, p.stderr
    assert "backends" in p.stdout and "host/cpp" in p.stdout


def test_bench_cpu_sparse_small_rows_have_documented_keys():
    p = _run("bench", "cpu-sparse", "--tokens", "4096", "--k", "64", "--runs", "3", "--layers", "1",
             "--membw-mb", "64", "--backends", "cpp,numba,torch", "--dtypes", "bfloat16")
    assert p.returncode == 0, p.stderr
    rows = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    assert {r["backend"] for r in rows} == {"cpp", "numba", "torch"}
    for r in rows:
        assert {"backend", "dtype", "k", "gbps", "membw_gbps", "ratio_to_membw", "speedup_vs_torch"} <= set(r)
        assert r["gbps"] > 0 and r["membw_gbps"] > 0


def test_bench_cpu_sparse_window_line_against_streaming():
    p = _run("bench", "cpu-sparse", "--window", "256", "--runs", "3", "--membw-mb", "64")
    assert p.returncode == 0, p.stderr
    rows = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    # one row per query kind (bf16 values, as a bf16 model's; any float32), against the same two reads
    assert [r["query"] for r in rows] == ["bfloat16", "float32"]
    assert len({r["window_read_gbps"] for r in rows}) == 1 and len({r["membw_gbps"] for r in rows}) == 1
    for r in rows:
        assert r["kernel"] == "window" and r["rows"] == 256 and r["dtype"] == "bfloat16"
        assert r["gbps"] > 0 and r["ratio_to_membw"] == pytest.approx(r["gbps"] / r["membw_gbps"], rel=0.01, abs=1e-3)
        assert r["window_read_gbps"] > 0
        assert r["ratio_to_window_read"] == pytest.approx(r["gbps"] / r["window_read_gbps"], rel=0.01, abs=1e-3)


def test_bench_cpu_sparse_row_cost_rows():
    p = _run("bench", "cpu-sparse", "--row-cost", "--tokens", "4096", "--k", "100", "--runs", "3", "--layers", "2",
             "--backends", "cpp,numba,torch", "--dtypes", "float32")
    assert p.returncode == 0, p.stderr
    rows = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    assert {r["backend"] for r in rows} == {"cpp", "numba"}  # the torch reference is not a kernel to cost
    for r in rows:
        assert r["k"] == 100 and r["threads"] == 1
        assert r["ns_per_row_l1"] > 0 and r["ns_per_row_dram"] > 0 and r["ns_per_row_read_only"] > 0


def test_bench_cpu_sparse_row_cost_defaults_to_2048_rows():
    """The documented default: the parsed --k list was compared with its unparsed default string, so --row-cost
    without --k costed 512 rows."""
    p = _run("bench", "cpu-sparse", "--row-cost", "--tokens", "4096", "--runs", "2", "--layers", "1",
             "--backends", "cpp", "--dtypes", "float32")
    assert p.returncode == 0, p.stderr
    rows = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    assert rows and all(r["k"] == 2048 for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the check runs; tested on GPU machines")
def test_gpu_check_without_cuda_exits_2_with_one_line():
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], p.stderr


def test_bare_hetero_lists_the_commands_and_help_names_the_budget_unit():
    p = _run()
    assert p.returncode == 0 and all(c in p.stdout for c in ("profile", "env", "bench")), p.stdout + p.stderr
    text = " ".join(_run("profile", "--help").stdout.split())
    assert "per KV head" in text and "--host-backend {auto,cpp,numba,torch}" in text
