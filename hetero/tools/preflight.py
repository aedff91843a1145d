"""Checks ``hetero profile`` runs before any workload: a run of minutes must not end in an error it could have
reported at once. Each check raises a ``HeteroError`` naming the option, what was wrong and what is allowed."""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Dict

import torch

from hetero.backends import AttentionInputs, BackendSet
from hetero.config import KV_DTYPES, HeteroConfig
from hetero.errors import BackendUnavailableError, ConfigError, HeteroError
from hetero.registry import RETRIEVERS

SMOLLM2_LAYERS = 30  # the real workload's captured layers (hetero.tools.workloads.real)
# options of the one-layer profile that --model does not use, with their "not given" values
SYNTHETIC_ONLY: Dict[str, object] = {"batch": None, "preset": None, "heads": None, "kv_heads": None,
                                     "head_dim": None, "workload": None, "layer": None, "warmup": None,
                                     "kv_dtype": None, "seed": None, "trace": None, "plot": None}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resolve_device(requested: str) -> torch.device:
    """``--device``: "auto" is CUDA when present, else the CPU; "cuda" without a CUDA device is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise HeteroError("--device cuda: no CUDA device is visible to torch (torch "
                          f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use --device cpu")
    return torch.device(requested)


def check_output_path(option: str, path: str) -> None:
    """``path`` can be written: it is opened for appending (and removed again if it did not exist), which is the
    one test every file system answers truthfully (permission bits say nothing on /proc, read-only mounts...)."""
    if not path:
        raise HeteroError(f"{option}: an empty path; give a file path")
    p = Path(path)
    if p.is_dir():
        raise HeteroError(f"{option} {path}: is a folder; give a file path")
    if not p.parent.is_dir():
        raise HeteroError(f"{option} {path}: folder {p.parent} does not exist")
    existed = p.exists()
    try:
        with open(p, "ab"):
            pass
    except OSError as e:
        raise HeteroError(f"{option} {path}: cannot be written ({e.strerror or e})") from None
    if not existed:
        p.unlink()


def check_model(ns: argparse.Namespace) -> None:
    """``--model``: its dependencies and weights are there and no option it ignores was given."""
    ignored = [_flag(k) for k, unset in SYNTHETIC_ONLY.items() if getattr(ns, k) != unset]
    if ignored:
        raise HeteroError(f"--model profiles the whole model on its own prompt; {', '.join(ignored)} "
                          f"{'is' if len(ignored) == 1 else 'are'} for the one-layer profile only: drop "
                          f"{'it' if len(ignored) == 1 else 'them'}")
    if ns.steps < 2:
        raise HeteroError(f"--steps {ns.steps}: --model needs >= 2 decode steps (tokens/s is measured between them)")
    if ns.device == "cuda":
        raise HeteroError("--device cuda: --model runs on the CPU; profile one layer on CUDA without --model")
    for module, extra in (("transformers", "hf"), ("accelerate", "hf")):
        if importlib.util.find_spec(module) is None:
            raise HeteroError(f"--model needs {module}: pip install 'hetero[{extra}]'")
    if ns.model == "smollm2":
        from .workloads import smollm2

        try:
            smollm2.package_folder()
        except smollm2.WorkloadUnavailable as e:
            raise HeteroError(f"--model smollm2: {e}") from None
        if importlib.util.find_spec("gguf") is None:
            raise HeteroError(f"--model smollm2 needs gguf: {smollm2.INSTALL_HINT}")
        return
    folder = Path(ns.model)
    if not folder.is_dir():
        raise HeteroError(f"--model {ns.model}: no such folder; give 'smollm2' or a local HuggingFace model folder "
                          "(config.json, weights, tokenizer)")
    if not (folder / "config.json").is_file():
        raise HeteroError(f"--model {ns.model}: no config.json in that folder; it must hold a HuggingFace model")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise HeteroError(f"--model {ns.model}: no weights (*.safetensors or *.bin) in that folder")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        raise HeteroError(f"--model {ns.model}: transformers cannot read its config.json ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:300]})") from None


def check_backends(config: HeteroConfig, device: torch.device, heads: int, kv_heads: int, head_dim: int,
                   batch: int, kv_dtype: str) -> None:
    """Both requested backends can serve the profile's inputs (the same selection a step makes)."""
    dtype = KV_DTYPES[kv_dtype]
    backends = BackendSet()
    for side, requested, on in (("window", config.window_backend, device), ("host", config.host_backend,
                                                                           torch.device("cpu"))):
        inputs = AttentionInputs(on, dtype, head_dim, heads, kv_heads, batch)
        try:
            backends.select(side, requested, inputs)
        except BackendUnavailableError as e:
            raise HeteroError(f"--{side}-backend {requested}: " + " ".join(str(e).split())) from None


def check_profile(ns: argparse.Namespace, config: HeteroConfig, device: torch.device,
                  geometry=None) -> None:
    """Everything ``hetero profile`` can know before it runs. ``geometry``: (heads, kv_heads, head_dim) of the
    one-layer profile (None with --model)."""
    if ns.model:
        check_model(ns)
        return
    if ns.trace is not None:
        check_output_path("--trace", ns.trace)
    if ns.plot is not None:
        check_output_path("--plot", ns.plot)
        if importlib.util.find_spec("matplotlib") is None:
            raise HeteroError("--plot needs matplotlib: pip install 'hetero[plot]'")
        from matplotlib.figure import Figure

        formats = Figure().canvas.get_supported_filetypes()
        ext = Path(ns.plot).suffix.lower().lstrip(".")
        if ext not in formats:
            raise HeteroError(f"--plot {ns.plot}: matplotlib writes {', '.join('.' + f for f in sorted(formats))}; "
                              f"{'.' + ext if ext else 'no extension'} is none of them")
    if ns.workload == "real":
        given = [f for f in ("batch", "seed") if getattr(ns, f) is not None]
        if given:
            raise HeteroError(f"--workload real replays one captured SmolLM2 sequence: {', '.join(map(_flag, given))} "
                              "applies to the synthetic workload only")
    if ns.workload == "real" and ns.layer is not None and ns.layer >= SMOLLM2_LAYERS:
        raise HeteroError(f"--layer {ns.layer}: the real workload is SmolLM2's attention, layers 0..{SMOLLM2_LAYERS - 1}")
    heads, kv_heads, head_dim = geometry
    reasons = RETRIEVERS.load(config.retriever).geometry_reasons(head_dim)
    if reasons:
        raise HeteroError(reasons[0])
    try:
        check_backends(config, device, heads, kv_heads, head_dim, ns.batch or 1, ns.kv_dtype or "bfloat16")
    except ConfigError as e:
        raise HeteroError(str(e)) from None
