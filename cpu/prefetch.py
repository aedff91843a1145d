"""The software prefetch policy of the C++ kernels, chosen for the CPU at hand.

How far ahead to ask for the selected rows, into which cache level, and when, matters by a factor of up to two
and differs between CPUs (docs/performance.md, "Prefetch policy"). A policy is ``(far, near, lines, spread)``:
rows ``far`` ahead into L2, ``near`` ahead into L1, ``lines`` cache lines of each row (0: all), and ``spread`` 1 to
ask for the V rows during the value pass rather than beside their K rows. Measured (bf16, 2 threads):

- AMD EPYC Zen 4 (AVX-512): K|V rows 32 ahead into L2, nothing into L1, not spread (a near L1 prefetch cost a
  quarter of the rate); the window's contiguous rows 16 ahead into L2 and 4 into L1 (5-11 % over 8 into L2 alone,
  interleaved in one process);
- AMD EPYC Zen 3 (AVX2): 32 ahead into L2, 16 into L1, spread: with the slower AVX2 arithmetic, all of a tile's
  requests leaving during its dots overflowed the miss queues while the value pass left memory idle (spread:
  0.59 -> 0.84 of the random-read loop);
- AMD EPYC Zen 5 (family 26, AVX-512): the host rows as on Zen 4 (no policy of the calibration grid beat it
  beyond noise); the window's contiguous rows 16 ahead into L2 and 4 into L1 (4-8 % over 8 into L2 alone);
- Intel Xeon (family 6 model 167): 128 ahead into L2 and 8 into L1 ran 1.25x faster than the Zen 4 policy.

The policy of a kind of rows (``"host"``: random rows of the paged host tier; ``"window"``: the fast tier's
contiguous rows) comes from, in order:

1. ``HETERO_PREFETCH`` (``"far,near,lines[,spread]"``, or ``"host=...;window=..."``);
2. a calibration of this CPU model (``hetero env --calibrate``, :mod:`hetero.cpu.prefetch_calibrate`: the kernel
   timed on rows from DRAM over a grid of policies, the best kept under ``$HETERO_CACHE/prefetch/``; a file there
   that cannot be read as one is a ConfigError naming it, not skipped);
3. a table by vendor, family and model range, measured on the machines above; other CPUs get the Zen 4 policy
   (the safer one: no L1 prefetch).

``describe()`` says which applied and why (``hetero env``).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

from hetero import native
from hetero.errors import ConfigError

Policy = Tuple[int, int, int, int]  # far rows into L2, near rows into L1, lines per row (0: all), spread V (0/1)

# AMD family 25 (19h) holds two generations: models 00-0F, 20-5F are Zen 3 (Milan, Vermeer, Rembrandt, Cezanne),
# 10-1F, 60-AF Zen 4 (Genoa, Raphael, Phoenix, Bergamo).
_ZEN4_MODELS = frozenset(range(0x10, 0x20)) | frozenset(range(0x60, 0xB0))
_ZEN3_MODELS = frozenset(range(0x00, 0x10)) | frozenset(range(0x20, 0x60))
# AMD family 26 (1Ah) models 00-7F are Zen 5 (Turin, Strix, Granite Ridge, Krackan); later ones are left to the
# fallback until measured.
_ZEN5_MODELS = frozenset(range(0x00, 0x80))

class TableRow(NamedTuple):
    vendor: str
    family: str
    models: Optional[frozenset]  # None: any model of the family
    label: str
    policies: Dict[str, Policy]  # per kind of rows


# first match wins; measured with `hetero bench cpu-sparse` and its --window line
TABLE: List[TableRow] = [
    TableRow("GenuineIntel", "6", None, "Intel family 6", {"host": (128, 8, 0, 0), "window": (8, 0, 0, 0)}),
    TableRow("AuthenticAMD", "25", _ZEN4_MODELS, "AMD Zen 4", {"host": (32, 0, 0, 0), "window": (16, 4, 0, 0)}),
    TableRow("AuthenticAMD", "25", _ZEN3_MODELS, "AMD Zen 3", {"host": (32, 16, 0, 1), "window": (8, 0, 0, 0)}),
    TableRow("AuthenticAMD", "26", _ZEN5_MODELS, "AMD Zen 5", {"host": (32, 0, 0, 0), "window": (16, 4, 0, 0)}),
]
FALLBACK: Dict[str, Policy] = {"host": (32, 0, 0, 0), "window": (8, 0, 0, 0)}
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


def _policy(nums) -> Policy:
    """``[far, near, lines]`` or ``[far, near, lines, spread]`` as a Policy; ValueError unless they are ints in
    [0, 65536) and spread is 0 or 1."""
    nums = list(nums)
    if len(nums) == 3:
        nums.append(0)
    if len(nums) != 4 or not all(type(x) is int and 0 <= x < 1 << 16 for x in nums) or nums[3] not in (0, 1):
        raise ValueError(nums)
    return nums[0], nums[1], nums[2], nums[3]


def _parse(text: str) -> Dict[str, Policy]:
    """``"far,near,lines[,spread]"`` for every kind, or ``"host=...;window=..."``."""
    def one(part: str) -> Policy:
        return _policy(int(x) for x in part.split(","))

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
        raise ConfigError(f"HETERO_PREFETCH={text!r} is not allowed: 'far,near,lines[,spread]' (ints >= 0, "
                          "spread 0 or 1), or 'host=far,near,lines[,spread];window=far,near,lines[,spread]'") from None


def _calibrated(path: Path) -> Dict[str, Policy]:
    """The policies saved by this CPU model's calibration, {} when there is none. A file that is there but cannot
    be read or is not what ``save`` writes is a ConfigError naming it: ignoring it would run the kernels with
    another policy than the one the user calibrated, and say nothing."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ConfigError(f"prefetch calibration {path} cannot be read ({e}); fix its permissions or delete it")
    try:
        policies = json.loads(text)["policies"]
        return {kind: _policy(policies[kind]) for kind in KINDS if kind in policies}
    except (ValueError, TypeError, KeyError):
        raise ConfigError(f"prefetch calibration {path} is malformed: expected "
                          '{"policies": {"host": [far, near, lines, spread], "window": [...]}} with ints in [0, 65536) '
                          "and spread 0 or 1; run `hetero env --calibrate` again, or delete the file") from None


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
    saved = _calibrated(path)
    if kind in saved:
        _chosen[kind] = saved[kind], f"calibrated on this CPU model ({path})"
        return _chosen[kind]
    row = table_row(cpu)
    if row is not None:
        _chosen[kind] = row.policies[kind], f"table for {row.label} ({cpu['vendor']} family {cpu['family']} " \
                                            f"model {cpu['model']})"
    else:
        _chosen[kind] = FALLBACK[kind], f"no table entry for {cpu['vendor'] or 'this CPU'} family " \
                                        f"{cpu['family'] or '?'} (the policy without an L1 prefetch)"
    return _chosen[kind]


def table_row(cpu: Dict[str, str]) -> Optional[TableRow]:
    """The first TABLE row for this CPU's vendor, family and model, or None."""
    try:
        model = int(cpu["model"])
    except ValueError:
        model = -1
    for row in TABLE:
        if cpu["vendor"] == row.vendor and cpu["family"] == row.family and (row.models is None or model in row.models):
            return row
    return None


def packed(kind: str) -> int:
    return native.pack_prefetch(*choose(kind)[0])


def describe() -> Dict[str, Dict]:
    """What ``hetero env`` shows: each kind's policy and why."""
    out = {}
    for kind in KINDS:
        (far, near, lines, spread), why = choose(kind)
        out[kind] = {"far_rows_l2": far, "near_rows_l1": near, "lines_per_row": lines or "all",
                     "spread_v": bool(spread), "why": why}
    return out


def save(policies: Dict[str, Policy], threads: int) -> Path:
    """Keep ``policies`` as this CPU model's calibration and use them from now on."""
    policies = {kind: _policy(p) for kind, p in policies.items()}
    path = _cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    # written whole, then renamed over the old file: a process reading it meanwhile (or a crash) never sees half
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
        try:
            f.write(json.dumps({"cpu": cpu_identity(), "threads": threads, "policies": policies}, indent=1))
            f.close()
            os.replace(f.name, path)
        except BaseException:
            os.unlink(f.name)
            raise
    _chosen.clear()
    return path
