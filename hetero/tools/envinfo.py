"""``hetero env``: what this machine and installation can do, and why a backend cannot."""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from typing import Dict, List

import torch

from hetero.backends import AttentionInputs, BackendSet
from hetero.errors import ConfigError
from hetero.registry import HOST_BACKENDS, WINDOW_BACKENDS

_PACKAGES = ("torch", "triton", "numba", "faiss-cpu", "transformers", "numpy", "pybind11")
_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
          "avx512_fp16", "amx_bf16")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_flags() -> List[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [x for x in _FLAGS if x in have]
    except OSError:
        pass
    return []


def cpu_model() -> str:
    """The CPU this runs on, as figures name it: model name, vendor, family and model number (Linux)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    key, value = (x.strip() for x in line.split(":", 1))
                    fields.setdefault(key, value)
                if not line.strip() and fields:
                    break
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    vendor = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD"}.get(fields.get("vendor_id", ""), fields.get("vendor_id"))
    if vendor and "family" not in name.lower():
        return f"{name} ({vendor} family {fields.get('cpu family', '?')} model {fields.get('model', '?')})"
    return name


def _numba_info() -> Dict:
    from hetero.numba_setup import load_tbb, prefer_wide_vectors

    try:
        vectors = prefer_wide_vectors()  # as the numba backend would, before numba's first import
        tbb = load_tbb()
        import numba
    except ImportError as e:
        return {"error": str(e)}
    try:
        BackendSet().get("host", "numba").warmup()  # a parallel kernel must have run to name the threading layer
        layer = numba.threading_layer()
    except Exception as e:  # report, never crash the report
        layer = f"unknown ({type(e).__name__}: {e})"
    return {"threads": numba.get_num_threads(), "max_threads": numba.config.NUMBA_NUM_THREADS,
            "threading_layer": layer, "tbb": tbb, "vectors": vectors}


def _prefetch_info() -> Dict:
    from hetero.cpu import prefetch

    return prefetch.describe()


def _faiss_threads():
    try:
        faiss = importlib.import_module("faiss")
        return faiss.omp_get_max_threads()
    except ImportError:
        return None


def _override_errors() -> List[str]:
    """What a backend override in the environment gets wrong (a name no backend has): every step would refuse it."""
    errors = []
    for reg in (WINDOW_BACKENDS, HOST_BACKENDS):
        try:
            reg.resolve("auto")
        except ConfigError as e:
            errors.append(str(e))
    return errors


def collect(kernels: bool = False) -> Dict:
    from hetero.native import info as cpp_info

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    out: Dict = {
        "python": sys.version.split()[0],
        "versions": {p: _version(p) for p in _PACKAGES},
        "cuda": {"available": torch.cuda.is_available(),
                 "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "cpu": {"model": cpu_model(), "flags": _cpu_flags(), "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                else os.cpu_count()},
        "cpp_extension": cpp_info(),
        "prefetch": _prefetch_info(),
        "threads": {"torch": torch.get_num_threads(), "faiss": _faiss_threads()},
        "numba": _numba_info(),
        "overrides": {k: os.environ.get(k) for k in ("HETERO_CPU_BACKEND", "HETERO_WINDOW_BACKEND", "HETERO_CPU_ISA",
                                                     "HETERO_HUGEPAGES", "HETERO_NUMBA_WIDE_VECTORS",
                                                     "TRITON_INTERPRET", "OMP_WAIT_POLICY")},
        "backends": {},
        "override_errors": _override_errors(),
    }
    backends = BackendSet()
    for side, reg, dev in (("window", WINDOW_BACKENDS, device), ("host", HOST_BACKENDS, torch.device("cpu"))):
        inputs = AttentionInputs(dev, torch.bfloat16, 128, 32, 8, 1)  # a Llama-3-8B layer
        for name in reg.names():
            try:
                be = backends.get(side, name)
                reasons = be.not_supported_reasons(inputs) + be.auto_reasons(inputs)
            except Exception as e:
                reasons = [f"failed to load: {type(e).__name__}: {e}"]
            out["backends"][f"{side}/{name}"] = {"usable": not reasons, "why_not": reasons}
    if kernels:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        p = subprocess.run([sys.executable, "-m", "hetero.gpu.compile_check"], capture_output=True, text=True, env=env)
        out["kernels"] = ([json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")] if p.returncode == 0
                          else {"error": p.stderr.strip().splitlines()[-1:]})
    return out


def print_env(info: Dict) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
    c.print(f"[bold]hetero env[/bold]  python {info['python']}, CUDA "
            f"{'yes: ' + str(info['cuda']['device']) if info['cuda']['available'] else 'no (fast tier runs on the CPU)'}")
    t = Table(show_header=False)
    for k, v in info["versions"].items():
        t.add_row(k, v)
    cpp = info["cpp_extension"]
    t.add_row("C++ extension", f"ISA {cpp['isa']} (detected {cpp['isa_detected']}), IVF code scan "
              f"{cpp.get('ivf_scan', '?')}, {cpp['threads']} threads" if "isa" in cpp else str(cpp.get("error")))
    t.add_row("CPU", info["cpu"]["model"])
    t.add_row("CPU flags", " ".join(info["cpu"]["flags"]) or "-")
    for kind, p in info["prefetch"].items():
        spread = ", V asked for in the value pass" if p.get("spread_v") else ""
        t.add_row(f"prefetch ({kind} rows)", f"{p['far_rows_l2']} rows ahead into L2, {p['near_rows_l1']} into L1, "
                  f"lines per row {p['lines_per_row']}{spread}: {p['why']}")
    t.add_row("cores usable", str(info["cpu"]["cores_usable"]))
    nb = info["numba"]
    t.add_row("threads", f"torch {info['threads']['torch']}, faiss {info['threads']['faiss']}, numba "
              f"{nb.get('threads')} (layer {nb.get('threading_layer')})")
    t.add_row("numba vectors", str(nb.get("vectors", nb.get("error"))))
    t.add_row("numba tbb", str(nb.get("tbb", nb.get("error"))))
    set_overrides = {k: v for k, v in info["overrides"].items() if v is not None}
    t.add_row("overrides", ", ".join(f"{k}={v}" for k, v in set_overrides.items()) or "none")
    for error in info["override_errors"]:
        t.add_row("[red]override error[/red]", error)
    c.print(t)
    b = Table(title="backends (bf16 KV, head_dim 128)")
    b.add_column("backend")
    b.add_column("usable")
    b.add_column("why not")
    for name, r in info["backends"].items():
        b.add_row(name, "yes" if r["usable"] else "no", "; ".join(r["why_not"]))
    c.print(b)
    if "kernels" in info and isinstance(info["kernels"], list):
        k = Table(title="Triton kernels compiled for NVIDIA GPUs (cuobjdump / nvdisasm)")
        for col in ("kernel", "arch", "dtype", "head_dim", "registers", "shared B", "stack B", "spill B", "HMMA"):
            k.add_column(col, justify="right")
        for r in info["kernels"]:
            k.add_row(r["kernel"], f"sm_{r['arch']}", r["dtype"], str(r["head_dim"]), str(r["registers"]),
                      str(r["shared_bytes"]), str(r["stack_bytes"]), str(r["local_bytes"]),
                      str(r["tensor_core_instructions"]))
        c.print(k)
