"""Hypothesis-driven fuzzing of the public API through a child process (tests/fuzz_cases.py): no input may crash
the process, every refusal must be a ``HeteroError``, a rejected call leaves the cache and the index as they were,
and after faults injected into the retriever's ``add`` (exceptions and interrupts, inline and on the background
indexer) the index holds every host token again.

``HETERO_FUZZ_EXAMPLES`` scales the number of cases per family (default 1 x the numbers below); the cases are
the same on every run (derandomized) unless ``HETERO_FUZZ_RANDOM=1``.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

SCALE = float(os.environ.get("HETERO_FUZZ_EXAMPLES", "1"))
RANDOM = os.environ.get("HETERO_FUZZ_RANDOM") == "1"
WORKER = Path(__file__).with_name("fuzz_cases.py")
COUNTS = {}  # (family, outcome) -> cases (reported at the end of the module)
FIRED = []  # faults that fired in the sequence cases


class Child:
    """The worker process; restarted after a crash (the crash itself is the failing case)."""

    def __init__(self):
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)

    def run(self, spec):
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait(timeout=30)
            err = self.proc.stderr.read()[-2000:]
            self.proc = None
            pytest.fail(f"the worker process died (exit {code}) on case {spec}: {err}")
        verdict = json.loads(line)
        key = (spec["case"], verdict["outcome"])
        COUNTS[key] = COUNTS.get(key, 0) + 1
        FIRED.append(verdict.get("fired", 0))
        return verdict

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def child():
    c = Child()
    yield c
    c.close()
    print(f"\nfuzz cases: {sorted(COUNTS.items())} (total {sum(COUNTS.values())}; faults fired {sum(FIRED)})")


def _settings(n):
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, derandomize=not RANDOM, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _expect_clean(verdict, spec):
    assert not verdict["violations"], f"{verdict['violations']} on case {spec}"


# ---- host views and selections -------------------------------------------------------------------------------
odd_ints = st.sampled_from([-(2 ** 31), -7, -2, -1, 0, 1, 2, 3, 7, 63, 64, 65, 1000, 2 ** 31 - 1])
view_mutation = st.one_of(
    st.fixed_dictionaries({"kind": st.just("table_entry"), "a": st.integers(0, 7), "b": st.integers(0, 7),
                           "value": odd_ints}),
    st.fixed_dictionaries({"kind": st.sampled_from(["table_empty", "table_rank", "lengths_list", "pool_strided",
                                                    "pool_meta", "pool_swap_strides"])}),
    st.fixed_dictionaries({"kind": st.sampled_from(["table_narrow", "pool_short", "pools_cut"]),
                           "a": st.integers(0, 40)}),
    st.fixed_dictionaries({"kind": st.just("table_dtype"), "value": st.sampled_from(["int64", "int16", "float32"])}),
    st.fixed_dictionaries({"kind": st.just("lengths_set"), "a": st.integers(0, 7), "value": odd_ints}),
    st.fixed_dictionaries({"kind": st.just("lengths_dtype"), "value": st.sampled_from(["int32", "float32", "bool"])}),
    st.fixed_dictionaries({"kind": st.just("block_tokens"),
                           "value": st.sampled_from([0, -1, 1, 2, 3, 4, 5, 8, 100, True, "4", 2.0])}),
    st.fixed_dictionaries({"kind": st.just("pool_dtype"), "value": st.sampled_from(["float64", "int8", "float16"])}),
)
selection_mutation = st.one_of(
    st.fixed_dictionaries({"kind": st.just("index_value"), "a": st.integers(0, 500), "value": odd_ints}),
    st.fixed_dictionaries({"kind": st.just("index_dtype"), "value": st.sampled_from(["int64", "int16", "float32"])}),
    st.fixed_dictionaries({"kind": st.sampled_from(["index_shape", "index_rank", "not_selection"]),
                           "a": st.integers(0, 3)}),
    st.fixed_dictionaries({"kind": st.just("weight"), "a": st.integers(0, 5),
                           "value": st.sampled_from([0.0, -1.0, float("-inf"), float("inf"), float("nan")])}),
    st.fixed_dictionaries({"kind": st.just("estimate"), "a": st.integers(0, 3),
                           "value": st.sampled_from([0.0, float("-inf"), float("nan")])}),
)


@st.composite
def sparse_specs(draw):
    batch = draw(st.integers(1, 3))
    return {"case": "sparse", "seed": draw(st.integers(0, 2 ** 16)), "hkv": draw(st.integers(1, 3)),
            "g": draw(st.sampled_from([1, 2, 3, 8])), "d": draw(st.sampled_from([1, 8, 17, 64])),
            "dtype": draw(st.sampled_from(["float32", "bfloat16", "float16"])),
            "block_tokens": draw(st.sampled_from([1, 3, 4, 16])),
            "lengths": draw(st.lists(st.integers(0, 70), min_size=batch, max_size=batch)),
            "k": draw(st.sampled_from([0, 1, 5, 33])), "weights": draw(st.booleans()),
            "backend": draw(st.sampled_from(["auto", "cpp", "numba", "torch"])),
            "view_mutations": draw(st.lists(view_mutation, max_size=2)),
            "selection_mutations": draw(st.lists(selection_mutation, max_size=2))}


@_settings(260)
@given(spec=sparse_specs())
def test_fuzz_sparse_attention_views_and_selections(child, spec):
    _expect_clean(child.run(spec), spec)


# ---- window attention ------------------------------------------------------------------------------------------
@st.composite
def window_specs(draw):
    batch, slots = draw(st.integers(1, 3)), draw(st.sampled_from([0, 1, 5, 16, 33]))
    lengths = draw(st.one_of(st.none(), st.lists(st.integers(0, slots), min_size=batch, max_size=batch)))
    bad_lengths = st.sampled_from([[-1] * batch, [slots + 1] * batch, [0.5] * batch, ["3"] * batch, [1] * (batch + 1),
                                   "abc", 3, [[1]] * batch, [True] * batch])
    mutation = st.one_of(
        st.fixed_dictionaries({"kind": st.just("poison_valid"), "a": st.integers(0, 40),
                               "value": st.sampled_from([float("nan"), float("inf"), float("-inf")])}),
        st.fixed_dictionaries({"kind": st.sampled_from(["poison_padding", "v_strided", "q_meta", "q_nan", "q_int",
                                                        "kv_rank"])}),
        st.fixed_dictionaries({"kind": st.just("lengths"), "value": bad_lengths}),
    )
    return {"case": "window", "seed": draw(st.integers(0, 2 ** 16)), "batch": batch, "slots": slots,
            "hkv": draw(st.integers(1, 3)), "g": draw(st.sampled_from([1, 4, 7])),
            "d": draw(st.sampled_from([1, 16, 33])), "dtype": draw(st.sampled_from(["float32", "bfloat16", "float16"])),
            "lengths": lengths, "backend": draw(st.sampled_from(["auto", "cpp", "torch"])),
            "mutations": draw(st.lists(mutation, max_size=2))}


@_settings(140)
@given(spec=window_specs())
def test_fuzz_window_attention(child, spec):
    _expect_clean(child.run(spec), spec)


# ---- merge -------------------------------------------------------------------------------------------------
@_settings(100)
@given(spec=st.fixed_dictionaries({
    "case": st.just("merge"), "seed": st.integers(0, 2 ** 16), "batch": st.integers(1, 3), "heads": st.integers(1, 4),
    "d": st.sampled_from([1, 8]),
    "parts": st.lists(st.sampled_from(["ok", "ok", "ok", "empty", "nan_lse", "posinf", "big", "shape", "half", "none",
                                       "tensor"]), max_size=5),
    "container": st.sampled_from(["list", "list", "tuple", "generator", "single"])}))
def test_fuzz_merge(child, spec):
    _expect_clean(child.run(spec), spec)


# ---- configs ------------------------------------------------------------------------------------------------
FIELD_VALUES = {
    "window": [0, 1, 8, -1, 2.5, "8", None, True],
    "sinks": [0, 1, 4, -3, 1.0, None],
    "budget": [0, 1, 7, 0.5, 1.0, 0.0, 1.5, -1, float("nan"), "0.1", None],
    "block_tokens": [1, 4, 16, 0, -4, 3.5],
    "retriever": ["all", "exact", "ivf-group", "ivf", "hnsw", "lsh", "nope", 3],
    "retriever_options": [{}, {"min_train": 8}, {"nlist": 0}, {"probe_factor": -1.0}, {"probe_factor": "x"},
                          {"bogus": 1}, {"K": 30}, {"K": 4, "L": 8}, {"code_bits": 5}, {"M": 1}, [1, 2]],
    "threads": [None, 1, 2, 0, -1, 1.5],
    "kv_dtype": [None, "float32", "bfloat16", "float16", "int8", "float64", 7],
    "group_rule": ["max", "mean", "any", "bogus"],
    "head_budget": ["flat", "adaptive", "other"],
    "overlap": ["auto", True, False, "yes"],
    "balance": ["fixed", "auto", "sometimes"],
    "dense_layers": [(), (0,), (0, 0), (-1,), "0", 5],
    "scale": [None, 0.1, 0.0, -1.0, float("inf")],
    "window_backend": ["auto", "cpp", "torch", "nope"],
    "host_backend": ["auto", "cpp", "numba", "torch", "nope"],
    "budget_floor": [None, 1, 0.01, -1],
    "sparse_chunk_tokens": [0, 4, -1],
}


@st.composite
def config_specs(draw):
    fields = draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), max_size=5, unique=True))
    kwargs = {f: draw(st.sampled_from(FIELD_VALUES[f])) for f in fields}
    return {"case": "config", "seed": draw(st.integers(0, 2 ** 16)), "kwargs": kwargs,
            "as_dict": draw(st.integers(0, 9)) == 0}


@_settings(120)
@given(spec=config_specs())
def test_fuzz_configs(child, spec):
    spec = json.loads(json.dumps(spec, default=list))  # tuples as lists, as the child sees them
    _expect_clean(child.run(spec), spec)


# ---- append / decode / run / crop sequences with faults in add ------------------------------------------------
@st.composite
def sequence_specs(draw):
    batch = draw(st.integers(1, 3))
    lengths = st.lists(st.integers(0, 40), min_size=batch, max_size=batch)
    op = st.one_of(
        st.fixed_dictionaries({"kind": st.just("append"), "lengths": lengths, "poison": st.sampled_from([0, 0, 0, 1]),
                               "ragged": st.booleans()}),
        st.fixed_dictionaries({"kind": st.just("decode"), "poison": st.sampled_from([False, False, False, True])}),
        st.fixed_dictionaries({"kind": st.just("run")}),
        st.fixed_dictionaries({"kind": st.just("crop"), "lengths": lengths}),
        st.fixed_dictionaries({"kind": st.just("bad_shape")}),
        st.fixed_dictionaries({"kind": st.just("fault"), "after": st.integers(0, 3),
                               "fault": st.sampled_from(["exception", "interrupt"])}),
    )
    ops = draw(st.lists(op, min_size=1, max_size=10))
    if draw(st.booleans()):
        ops = [{"kind": "fault", "after": 0, "fault": draw(st.sampled_from(["exception", "interrupt"]))},
               {"kind": "append", "lengths": [30] * batch, "poison": 0, "ragged": True}] + ops
    return {"case": "sequence", "seed": draw(st.integers(0, 2 ** 16)),
            "retriever": draw(st.sampled_from(["all", "exact", "ivf-group", "ivf-group", "ivf", "hnsw", "lsh"])),
            "indexer": draw(st.booleans()), "batch": batch, "hkv": draw(st.integers(1, 2)),
            "g": draw(st.sampled_from([1, 3])), "d": draw(st.sampled_from([8, 16])),
            "dtype": draw(st.sampled_from(["float32", "bfloat16"])), "window": draw(st.sampled_from([0, 2, 5])),
            "sinks": draw(st.sampled_from([0, 1])), "block_tokens": draw(st.sampled_from([1, 4, 16])),
            "budget": draw(st.sampled_from([4, 0.5, 1.0])), "ops": ops}


@_settings(120)
@given(spec=sequence_specs())
def test_fuzz_append_run_crop_sequences_with_faults(child, spec):
    _expect_clean(child.run(spec), spec)


def test_fuzz_faults_were_injected(child):
    """The fault cases must reach ``add`` (a fault armed after the last add never fires: some must)."""
    spec = {"case": "sequence", "seed": 1, "retriever": "ivf-group", "indexer": False, "batch": 2, "hkv": 1, "g": 1,
            "d": 8, "dtype": "float32", "window": 2, "sinks": 1, "block_tokens": 4, "budget": 4,
            "ops": [{"kind": "fault", "after": 0, "fault": "exception"},
                    {"kind": "append", "lengths": [30, 30], "poison": 0, "ragged": True}, {"kind": "run"},
                    {"kind": "fault", "after": 1, "fault": "interrupt"},
                    {"kind": "append", "lengths": [9, 9], "poison": 0, "ragged": True}, {"kind": "run"}]}
    verdict = child.run(spec)
    _expect_clean(verdict, spec)
    assert verdict["fired"] == 2
