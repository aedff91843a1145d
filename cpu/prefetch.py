"""The software prefetch policy of the C++ kernels, chosen for the CPU at hand.

How far ahead to ask for the selected rows, into which cache level, matters by a factor of up to two and differs
between CPUs (docs/performance.md, "Prefetch policy"): on an AMD EPYC Zen 4 the host kernel ran best with K|V rows
32 ahead into L2 and nothing into L1 (a near L1 prefetch cost a quarter of the rate); on an Intel Xeon (family 6
model 167) rows 128 ahead into L2 and 8 ahead into L1 ran 1.25x faster than that policy (bf16, 2 threads).

The policy of a kind of rows (``"host"``: random rows of the paged host tier; ``"window"``: the fast tier's
contiguous rows) comes from, in order:

1. ``HETERO_PREFETCH`` (``"far,near,lines"``, or ``"host=far,near,lines;window=far,near,lines"``);
2. a calibration of this CPU model (``hetero env --calibrate``, :mod:`hetero.cpu.prefetch_calibrate`: the kernel timed on rows from DRAM over a grid of
   policies, the best kept under ``$HETERO_CACHE/prefetch/``);
3. a table by vendor and family, measured on the machines above; other CPUs get the Zen 4 policy (the safer one:
   no L1 prefetch).

``describe()`` says which applied and why (``hetero env``).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, Tuple

from hetero import native
from hetero.errors import ConfigError

Policy = Tuple[int, int, int]  # far rows into L2, near rows into L1, lines per row (0: all)

# (vendor, family) -> policy per kind of rows; measured with `hetero bench cpu-sparse` and the window line of it
TABLE: Dict[Tuple[str, str], Dict[str, Policy]] = {
    ("GenuineIntel", "6"): {"host": (128, 8, 0), "window": (8, 0, 0)},
    ("AuthenticAMD", "25"): {"host": (32, 0, 0), "window": (8, 0, 0)},
}
FALLBACK: Dict[str, Policy] = {"host": (32, 0, 0), "window": (8, 0, 0)}
KINDS = ("host", "window")
_chosen: Dict[str, Tuple[Policy, str]] = {}


def cpu_identity() -> Dict[str, str]:
    """vendor, family, model and model name of this CPU (from /proc/cpuinfo; empty strings where unknown)."""
    info = {"vendor": "", "family": "", "model": "", "name": ""}
    keys = {"vendor_id": "vendor", "cpu family": "family", "model": "model", "model name": "name"}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                if key.strip() in keys:
                    info[keys[key.strip()]] = value.strip()
    except OSError:
        pass
    return info


def _cache_file() -> Path:
    cpu = cpu_identity()
    root = Path(os.environ.get("HETERO_CACHE") or Path.home() / ".cache" / "hetero")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{cpu['vendor']}-{cpu['family']}-{cpu['model']}-{cpu['name']}").strip("-")
    return root / "prefetch" / f"{slug or 'unknown-cpu'}.json"


def _parse(text: str) -> Dict[str, Policy]:
    """``"far,near,lines"`` for every kind, or ``"host=...;window=..."``."""
    def one(part: str) -> Policy:
        nums = [int(x) for x in part.split(",")]
        if len(nums) != 3 or not all(0 <= x < 1 << 16 for x in nums):
            raise ValueError(part)
        return nums[0], nums[1], nums[2]

    try:
        if "=" not in text:
            return {kind: one(text) for kind in KINDS}
        out = {}
        for item in text.split(";"):
            kind, _, part = item.partition("=")
            if kind.strip() not in KINDS:
                raise ValueError(kind)
            out[kind.strip()] = one(part)
        return out
    except ValueError:
        raise ConfigError(f"HETERO_PREFETCH={text!r} is not allowed: 'far,near,lines' (three ints >= 0), or "
                          "'host=far,near,lines;window=far,near,lines'") from None


def choose(kind: str) -> Tuple[Policy, str]:
    """The policy for ``kind`` (``"host"`` or ``"window"``) and why it was chosen (decided once per process)."""
    if kind in _chosen:
        return _chosen[kind]
    env = os.environ.get("HETERO_PREFETCH")
    cpu = cpu_identity()
    if env:
        policies = _parse(env)
        if kind in policies:
            _chosen[kind] = policies[kind], f"HETERO_PREFETCH={env}"
            return _chosen[kind]
    path = _cache_file()
    try:
        saved = json.loads(path.read_text())
        if kind in saved.get("policies", {}):
            _chosen[kind] = tuple(saved["policies"][kind]), f"calibrated on this CPU model ({path})"
            return _chosen[kind]
    except (OSError, ValueError):
        pass
    row = TABLE.get((cpu["vendor"], cpu["family"]))
    if row is not None:
        _chosen[kind] = row[kind], f"table for {cpu['vendor']} family {cpu['family']}"
    else:
        _chosen[kind] = FALLBACK[kind], f"no table entry for {cpu['vendor'] or 'this CPU'} family " \
                                        f"{cpu['family'] or '?'} (the policy without an L1 prefetch)"
    return _chosen[kind]


def packed(kind: str) -> int:
    return native.pack_prefetch(*choose(kind)[0])


def describe() -> Dict[str, Dict]:
    """What ``hetero env`` shows: each kind's policy and why."""
    out = {}
    for kind in KINDS:
        (far, near, lines), why = choose(kind)
        out[kind] = {"far_rows_l2": far, "near_rows_l1": near, "lines_per_row": lines or "all", "why": why}
    return out


def save(policies: Dict[str, Policy], threads: int) -> Path:
    """Keep ``policies`` as this CPU model's calibration and use them from now on."""
    path = _cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"cpu": cpu_identity(), "threads": threads, "policies": policies}, indent=1))
    _chosen.clear()
    return path
