"""The profiling CLI: every subcommand runs, traces/plots are valid, user errors are one line with exit 2."""
import json
import subprocess
import sys

import pytest

from hetero.tools.workloads import smollm2

CLI = [sys.executable, "-m", "hetero.tools.cli"]
needs_model = pytest.mark.skipif(not smollm2.available(), reason=f"SmolLM2 not installed ({smollm2.INSTALL_HINT})")


def _run(*args, cwd=None, timeout=600):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout, cwd=cwd)


def _profile_with_pool_track(trace, *args, tries=3):
    """``hetero profile ... --trace trace`` until its trace has the pool thread's track, at most ``tries`` runs: the
    C++ pool's caller waits only for the workers that joined a run, so on a loaded machine the caller may run every
    item of every step before its pool thread gets a core (2 of 5 single runs at 60K tokens beside three busy
    processes on 2 vCPUs), and such a trace is correct without a pool track. Returns the last run's process and
    its trace's events and how many runs it took."""
    for run in range(1, tries + 1):
        p = _run("profile", *args, "--trace", str(trace))
        assert p.returncode == 0, p.stderr
        events = json.loads(trace.read_text())["traceEvents"]
        if any(e.get("ph") == "M" and e["args"].get("name") == "cpp host pool 1" for e in events):
            break
    return p, events, run


def _overlapping_threads(events):
    spans = [(e["ts"], e["ts"] + e["dur"], e["tid"], e["name"]) for e in events if e.get("ph") == "X"]
    return any(a[2] != b[2] and a[0] < b[1] and b[0] < a[1] for a in spans for b in spans)


def test_profile_trace_and_plot(tmp_path):
    trace, png = tmp_path / "t.json", tmp_path / "p.png"
    p, events, runs = _profile_with_pool_track(trace, "--context", "60000", "--heads", "8", "--kv-heads", "2",
                                               "--head-dim", "64", "--steps", "4", "--retriever", "exact", "--plot",
                                               str(png), "--json")
    r = json.loads(p.stdout)
    for key in ("context", "heads", "kv_heads", "head_dim", "window", "sinks", "budget", "retriever", "backends",
                "dense_ms", "hetero_ms", "speedup", "rel_error", "phases", "critical_path", "memory", "per_step"):
        assert key in r
    names = {e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "thread_name"}
    assert {"MainThread", "cpp host pool 1"} <= names, f"{runs} profiles"  # the step's phases and its pool thread
    assert all({"ts", "dur", "pid", "tid", "name"} <= set(e) for e in events if e["ph"] == "X")
    assert _overlapping_threads(events), "the window and host tracks never overlap"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.parametrize("warmup", [0, 1])
def test_profile_warmup_steps_are_reported_apart(warmup):
    p = _run("profile", "--context", "3000", "--heads", "8", "--kv-heads", "2", "--steps", "2", "--warmup",
             str(warmup), "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert (r["steps"], r["warmup"], len(r["per_step"]), len(r["warmup_ms"])) == (2, warmup, 2, warmup)
    assert [s["step"] for s in r["per_step"]] == [0, 1] and all(ms > 0 for ms in r["warmup_ms"])



def _strict(text: str):
    """json.loads that refuses NaN and Infinity, as JSON parsers other than Python's do."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_profile_json_is_strict_json_when_a_figure_does_not_exist():
    """Side by side (not fused) a step has no fixed cost: null in the JSON, as at the top level, not NaN."""
    p = _run("profile", "--context", "3000", "--heads", "8", "--kv-heads", "2", "--steps", "2", "--overlap", "on",
             "--json")
    assert p.returncode == 0, p.stderr
    r = _strict(p.stdout)
    assert r["fixed_ms"] is None and all(s["fixed_ms"] is None for s in r["per_step"])

@pytest.mark.parametrize("preset", ["qwen2-7b", "smollm2"])
def test_profile_presets(preset):
    p = _run("profile", "--preset", preset, "--context", "3000", "--steps", "2", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert (r["heads"], r["kv_heads"]) == {"qwen2-7b": (28, 4), "smollm2": (9, 3)}[preset]


@pytest.mark.parametrize("overlap,words", [("on", "critical path"), ("off", "larger of the two sides"),
                                           ("auto", "larger of the two sides")])  # auto on a CPU: the same threads
def test_profile_table_has_verdict(overlap, words):
    p = _run("profile", "--context", "4000", "--heads", "8", "--kv-heads", "2", "--steps", "2", "--overlap", overlap)
    assert p.returncode == 0, p.stderr
    text = " ".join(p.stdout.split())  # rich wraps long lines
    assert words in text and "share of step" in text
    assert ("side by side" if overlap == "on" else "the same threads") in text


def test_trace_shows_the_native_pool_threads(tmp_path):
    """The fused step (the CPU default) runs its window, search and host rows as one pool run on the main thread and
    the host backend's pool; the main thread's track shows the run's wall time shared out by busy time, and the pool
    thread has a track of its own, one busy span per phase it took items of, named by that phase and inside the run
    (the calling thread may finish a small step before its pool thread gets a core, so no phase is required of the
    pool). On 2 vCPUs the caller ran every item of all eight steps alone in 3 of 6 profiles at 9K tokens (the pool
    thread placed on the caller's vCPU, or polling too late), 1 of 6 at 30K and 0 of 6 at 60K, whose ~1 ms steps
    leave it time to join, unless the machine is loaded (``_profile_with_pool_track``)."""
    trace = tmp_path / "t.json"
    _, events, runs = _profile_with_pool_track(trace, "--context", "60000", "--heads", "8", "--kv-heads", "2",
                                               "--head-dim", "64", "--steps", "8")
    names = {e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "thread_name"}
    assert "cpp host pool 1" in set(names.values()), f"no pool track in {runs} profiles"
    spans = [e for e in events if e.get("ph") == "X"]
    busy = [e for e in spans if names[e["tid"]] == "cpp host pool 1"]
    assert busy, "the pool thread has a track but no busy span"
    run_phases = ("window", "retrieve", "host_attn")
    runs = []  # the main thread's run phases are laid end to end: merged, one interval per step
    for e in sorted((e for e in spans if names[e["tid"]] == "MainThread" and e["name"] in run_phases),
                    key=lambda e: e["ts"]):
        if runs and e["ts"] <= runs[-1][1] + 1:
            runs[-1][1] = max(runs[-1][1], e["ts"] + e["dur"])
        else:
            runs.append([e["ts"], e["ts"] + e["dur"]])
    for b in busy:
        assert b["name"] in run_phases, b
        assert any(a - 1 <= b["ts"] and b["ts"] + b["dur"] <= z + 1 for a, z in runs), (b, runs)


@needs_model
def test_profile_real_workload():
    p = _run("profile", "--preset", "smollm2", "--workload", "real", "--context", "1000", "--steps", "4",
             "--retriever", "ivf", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["workload"] == "real" and r["context"] == 1000 and 0 <= r["rel_error"] < 0.5


@needs_model
def test_profile_model_end_to_end():
    p = _run("profile", "--model", "smollm2", "--context", "400", "--steps", "3", "--window", "64", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["layers"] == 30 and len(r["per_layer"]) == 30
    assert {"tokens_per_s_dense", "tokens_per_s_hetero", "tokens_agree", "memory", "verdict"} <= set(r)
    # the fast tier is on the CPU: the sides share the same threads, and a layer's step is their sum
    assert r["overlap"] is False and "the same threads" in r["verdict"]
    assert r["first_logits_max_diff"] > 0  # the first decode step read the host tier sparsely (the prefill: dense)
    row = r["per_layer"][0]
    assert row["step"] == pytest.approx(row["window"] + row["retrieve"] + row["host_attn"] + row["merge"])


def test_bench_sweep_writes_json_csv_png(tmp_path):
    out = tmp_path / "sw"
    p = _run("bench", "sweep", "--contexts", "2048,4096", "--budgets", "0.05,0.1", "--budget-context", "4096",
             "--steps", "2", "--preset", "smollm2", "--out", str(out))
    assert p.returncode == 0, p.stderr
    rows = json.loads((tmp_path / "sw.json").read_text())
    assert {r["kind"] for r in rows} == {"context", "budget"} and all(r["dense_ms"] > 0 for r in rows)
    assert (tmp_path / "sw.csv").read_text().startswith("kind,context")
    png = (tmp_path / "sw.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@needs_model
def test_bench_retrieval_small():
    p = _run("bench", "retrieval", "--context", "1024", "--positions", "4", "--layers", "1",
             "--retrievers", "exact,ivf-sq8,lsh-K9-L50")
    assert p.returncode == 0, p.stderr
    rows = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    assert rows and all({"retriever", "budget", "recall_at_k", "scanned_fraction", "rel_error", "lse_error",
                         "search_ms", "build_s", "bytes_per_token"} <= set(r) for r in rows)


@needs_model
def test_bench_needle_small():
    p = _run("bench", "needle", "--contexts", "400", "--depths", "0.5", "--retrievers", "exact")
    assert p.returncode == 0, p.stderr
    row = json.loads(p.stdout.splitlines()[-1])
    assert {"context", "depth", "retriever", "dense_correct", "hetero_correct", "tokens_per_s_dense",
            "tokens_per_s_hetero"} <= set(row)


@pytest.mark.parametrize("args,needle", [
    (["profile", "--preset", "gpt5"], "--preset"),
    (["profile", "--workload", "imaginary"], "--workload"),
    (["profile", "--workload", "real", "--context", "9000"], "8192"),
    (["profile", "--workload", "real", "--preset", "llama3-8b"], "smollm2"),
    (["profile", "--steps", "0"], "--steps"),
    (["bench", "nope"], "invalid choice"),
    (["profile", "--head-dim", "600", "--heads", "2", "--kv-heads", "1"], "head_dim <= 512"),  # before any prefill
    (["bench", "cpu-sparse", "--dtypes", "int8"], "--dtypes"),
    (["bench", "cpu-sparse", "--window", "0"], "--window"),
    (["bench", "sweep", "--contexts", "abc"], "--contexts"),
    (["bench", "sweep", "--steps", "0"], "--steps"),
    (["bench", "retrieval", "--retrievers", "nothing-like-it"], "--retrievers"),
    (["bench", "needle", "--depths", "2.0"], "--depths"),
    (["bench", "chat", "--chunk", "0"], "--chunk"),
    (["bench", "e2e", "--smollm2-context", "0"], "--smollm2-context"),
    (["bench", "sweep", "--contexts", "4000000"], "at most 1048576"),  # before a 4M-token run
    (["bench", "retrieval", "--layers", "99"], "layers 0-29"),  # before the minutes-long capture
    (["bench", "chat", "--context", "99999"], "8192 positions"),
    (["bench", "needle", "--contexts", "9000"], "8192 positions"),
])
def test_bad_values_one_line_exit_2(args, needle):
    p = _run(*args)
    assert p.returncode == 2, (p.returncode, p.stderr[-500:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], p.stderr
