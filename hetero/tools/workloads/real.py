"""Real attention: post-RoPE queries, keys and values of SmolLM2-135M over real text, cached on disk.

Text: the Python standard library's own prose (its LICENSE and the docstrings of a fixed list of modules),
available offline wherever Python is. ``capture(context)`` runs the model once over ``context`` tokens and
records, per layer, ``q [Hq, T, D]``, ``k, v [Hkv, T, D]`` (bfloat16) as the attention kernels see them.
Captures are cached under ``$HETERO_CACHE/captures`` (default ``~/.cache/hetero``); build one ahead with
``python -m hetero.tools.workloads.real --context 8192``.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from . import smollm2
from .smollm2 import WorkloadUnavailable

# Modules whose docstrings are long English prose (stable across CPython 3.10-3.13).
_MODULES = ("argparse", "asyncio", "collections", "concurrent.futures", "contextlib", "csv", "dataclasses",
            "datetime", "decimal", "difflib", "doctest", "email", "enum", "fractions", "functools", "heapq",
            "http.client", "inspect", "itertools", "json", "logging", "mailbox", "multiprocessing", "os",
            "pathlib", "pickle", "pydoc", "random", "re", "shutil", "socket", "sqlite3", "statistics",
            "string", "subprocess", "tarfile", "threading", "typing", "unittest", "urllib.parse", "uuid",
            "warnings", "xml.dom", "zipfile")


def corpus_text() -> str:
    """Deterministic English text from the standard library (LICENSE first, then module docstrings)."""
    import warnings

    with warnings.catch_warnings():  # some attributes warn on access (deprecated aliases)
        warnings.simplefilter("ignore")
        return _corpus_text()


def _corpus_text() -> str:
    parts: List[str] = []
    lic = os.path.join(os.path.dirname(os.__file__), "LICENSE.txt")
    if os.path.exists(lic):
        parts.append(open(lic, encoding="utf-8", errors="replace").read())
    for name in _MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for obj in [mod] + [getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 200 and getattr(obj, "__module__", name).startswith(name.split(".")[0]):
                parts.append(doc.strip())
    return "\n\n".join(dict.fromkeys(parts))  # keep order, drop repeated docstrings


@dataclass
class RealCapture:
    """Per layer ``q [Hq, T, D]``, ``k [Hkv, T, D]``, ``v [Hkv, T, D]`` in bfloat16, post-RoPE."""

    q: Dict[int, torch.Tensor]
    k: Dict[int, torch.Tensor]
    v: Dict[int, torch.Tensor]
    context: int
    text_sha: str

    @property
    def layers(self) -> List[int]:
        return sorted(self.k)

    @property
    def num_layers(self) -> int:
        return len(self.k)


def _cache_path(context: int, layers: Optional[Sequence[int]], text_sha: str) -> str:
    tag = "all" if layers is None else "-".join(map(str, layers))
    return os.path.join(smollm2.cache_root(), "captures", f"smollm2_ctx{context}_L{tag}_{text_sha[:12]}.pt")


def capture(context: int = 8192, layers: Optional[Sequence[int]] = None, build: bool = True,
            log=lambda s: print(s, file=sys.stderr, flush=True)) -> RealCapture:
    """The capture for ``context`` tokens (all layers, or ``layers``); loaded from the cache, else built if
    ``build`` (one forward pass of the model), else ``WorkloadUnavailable`` naming the build command."""
    text = corpus_text()
    sha = hashlib.sha256(text.encode()).hexdigest()
    path = _cache_path(context, layers, sha)
    if os.path.exists(path):
        data = torch.load(path)
        return RealCapture(data["q"], data["k"], data["v"], data["context"], sha)
    if not build:
        raise WorkloadUnavailable(f"no cached capture at {path}; build it with: "
                                  f"python -m hetero.tools.workloads.real --context {context}")
    model, tok = smollm2.load(attn_implementation="sdpa")
    ids = tok(text, return_tensors="pt").input_ids[:, :context]
    if ids.shape[1] < context:
        raise WorkloadUnavailable(f"the corpus has only {ids.shape[1]} tokens, fewer than context={context}")
    wanted = set(range(model.config.num_hidden_layers)) if layers is None else set(layers)
    rec_q, rec_k, rec_v = {}, {}, {}
    name = _register_recorder(rec_q, rec_k, rec_v, wanted)
    model.set_attn_implementation(name)
    t = time.perf_counter()
    log(f"capturing SmolLM2 attention over {context} tokens ({len(wanted)} layers)...")
    with torch.no_grad():
        model(ids, use_cache=False)
    log(f"captured in {time.perf_counter() - t:.1f} s")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"q": rec_q, "k": rec_k, "v": rec_v, "context": context}, path)
    return RealCapture(rec_q, rec_k, rec_v, context, sha)


def _register_recorder(rec_q, rec_k, rec_v, wanted) -> str:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def record(module, query, key, value, attention_mask, **kwargs):
        i = module.layer_idx
        if i in wanted:
            rec_q[i] = query[0].detach().to(torch.bfloat16).clone()
            rec_k[i] = key[0].detach().to(torch.bfloat16).clone()
            rec_v[i] = value[0].detach().to(torch.bfloat16).clone()
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("hetero_capture", record)
    AttentionMaskInterface.register("hetero_capture", sdpa_mask)
    return "hetero_capture"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hetero.tools.workloads.real", description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=8192)
    ns = p.parse_args(argv)
    try:
        cap = capture(ns.context)
    except WorkloadUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{cap.num_layers} layers, context {cap.context}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
