"""HuggingFace transformers integration: ``hetero.wrap(model, config)`` and keep calling ``generate()``.

Pieces:

* ``HeteroCache``: a ``transformers.cache_utils.Cache`` whose layers hold hetero ``LayerCache``s (sinks +
  window on the model's device, older tokens in host memory behind a retriever). ``get_seq_length`` reports
  every token processed (all tiers), which drives position ids.
* ``hetero_attention``: registered with ``AttentionInterface`` as ``"hetero"`` (with the sdpa mask function,
  so padded batches get their masks). Prefill (several query tokens): dense SDPA over the prompt, then the
  prompt's real tokens (left padding removed using the mask) move into the tiers and the index is built.
  Decode (one query token): ``HeteroAttention.run`` over the tiers.
* ``wrap``: checks the architecture, switches the model to the ``"hetero"`` attention, and makes
  ``generate()`` create a ``HeteroCache`` unless one is passed.

The cache's ``update`` returns the key/value tensors tagged with their layer state (a Python attribute on
the returned tensor), which the attention function reads: no global state, so several wrapped models and
caches coexist. Attention called with another cache (e.g. a plain ``forward`` with ``DynamicCache``) falls back
to SDPA over the key/value it is given, which is then exact.
"""
from __future__ import annotations

import functools
from typing import List, Optional

import torch

from .attention import HeteroAttention
from .cache import LayerCache
from .config import HeteroConfig
from .errors import HeteroError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ATTN_NAME = "hetero"


class UnsupportedModelError(HeteroError, ValueError):
    """The model uses a feature hetero does not implement; the message names it."""


def unsupported_features(config) -> List[str]:
    """Why hetero cannot serve a model with this config (empty: supported)."""
    reasons = []
    model_type = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        reasons.append("encoder-decoder architecture")
    if getattr(config, "add_cross_attention", False):
        reasons.append("cross-attention")
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, name, None):
            reasons.append(f"logit soft-capping ({name}={getattr(config, name)})")
    if getattr(config, "kv_lora_rank", None) or getattr(config, "q_lora_rank", None):
        reasons.append("multi-head latent attention (MLA)")
    layer_types = getattr(config, "layer_types", None) or []
    sliding = getattr(config, "sliding_window", None)
    if "sliding_attention" in layer_types:
        reasons.append("sliding-window attention layers (layer_types)")
    elif sliding and getattr(config, "use_sliding_window", True):
        reasons.append(f"sliding-window attention (sliding_window={sliding})")
    if model_type not in SUPPORTED_MODEL_TYPES:
        reasons.append(f"architecture {model_type!r} is not one hetero has verified (supported: "
                       f"{', '.join(SUPPORTED_MODEL_TYPES)})")
    return reasons


@functools.lru_cache(maxsize=None)
def _classes():
    """Build the Cache classes on first use, so that importing hetero does not import transformers."""
    from transformers.cache_utils import Cache, CacheLayerMixin

    class HeteroCacheLayer(CacheLayerMixin):
        """One attention layer's cache: a hetero ``LayerCache`` plus the bookkeeping transformers needs."""

        is_sliding = False
        is_compileable = False

        def __init__(self, config: HeteroConfig, layer_idx: int, indexer=None, progress=None, parent=None):
            super().__init__()
            self.layer = LayerCache(config, layer_idx, indexer)
            self.progress = progress
            self.parent = parent  # the HeteroCache: owns the decode-step runtime shared by all layers
            self.processed = 0  # tokens seen, padding included: what position ids count
            self.pending = None  # prompt K/V waiting for the attention call (it has the padding mask)

        def lazy_initialization(self, key_states, value_states) -> None:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            if key_states.shape[2] > 1 or self.processed == 0:
                if self.processed > 0:
                    raise HeteroError("hetero's cache takes a multi-token chunk only as the first (prefill) call; "
                                      "continue a conversation with a new cache, or decode token by token")
                self.pending = (key_states, value_states)
            else:
                self.layer.append(key_states[:, :, 0], value_states[:, :, 0])
                self.processed += 1
            key_states._hetero_layer = self
            return key_states, value_states

        def get_seq_length(self) -> int:
            return self.processed

        def get_mask_sizes(self, query_length: int):
            return self.processed + query_length, 0

        def get_max_length(self) -> int:
            return -1

        def reset(self) -> None:
            self.layer.reset()
            self.processed = 0
            self.pending = None

        def reorder_cache(self, beam_idx) -> None:
            raise HeteroError("beam search is not supported by hetero's cache (use greedy or sampling)")

    class HeteroCache(Cache):
        """transformers Cache over hetero's tiers: ``layers[i].layer`` is layer i's ``LayerCache``.

        Tokens moved to the host tier are indexed on a background worker, so a layer's index build during
        prefill overlaps the next layers' compute (each layer's first search waits for its own builds).
        Prompts of ``progress_tokens`` tokens or more show a progress bar on stderr, one tick per layer.
        """

        def __init__(self, config: HeteroConfig, num_layers: int, progress_tokens: int = 16384):
            from .worker import Worker

            self.indexer = Worker("hetero-indexer")
            self.prefill_progress = _PrefillProgress(num_layers, progress_tokens)
            super().__init__(layers=[HeteroCacheLayer(config, i, self.indexer, self.prefill_progress, self)
                                     for i in range(num_layers)])
            self.config = config
            self._attention: Optional[HeteroAttention] = None

        def attention(self, scaling: Optional[float]) -> HeteroAttention:
            """The decode-step runtime of this cache (one host worker for all layers)."""
            if self._attention is None or self._attention.config.scale != scaling:
                if self._attention is not None:
                    self._attention.close()
                # the indexer doubles as the host worker: a layer's index add and its search share one FIFO
                # thread (no cross-thread wait in the decode step)
                cfg = self.config.with_(scale=scaling)
                self._attention = HeteroAttention(cfg, host_worker=self.indexer)
            return self._attention

        def close(self) -> None:
            """Finish pending index work, stop the indexer and host worker threads (also done at exit)."""
            for lay in self.layers:
                lay.layer.wait_indexed()
            self.indexer.close()
            if self._attention is not None:
                self._attention.close()

        def memory(self):
            """Bytes per tier summed over layers (``fast_bytes``, ``host_bytes``, ``index_bytes``)."""
            total = {"fast_bytes": 0, "host_bytes": 0, "index_bytes": 0}
            for lay in self.layers:
                for k, v in lay.layer.memory().items():
                    total[k] += v
            return total

    return HeteroCacheLayer, HeteroCache


def HeteroCache(config: HeteroConfig, num_layers: int, progress_tokens: int = 16384):  # noqa: N802
    """A transformers ``Cache`` whose layers are hetero's tiered caches (a factory that reads like the class)."""
    return _classes()[1](config, num_layers, progress_tokens)


class _PrefillProgress:
    """A rich progress bar on stderr over the layers of a long prefill (silent for short prompts)."""

    def __init__(self, num_layers: int, min_tokens: int):
        self.num_layers, self.min_tokens = num_layers, min_tokens
        self._bar = None
        self._task = None

    def layer_done(self, layer_idx: int, tokens: int) -> None:
        if tokens < self.min_tokens:
            return
        if self._bar is None:
            from rich.progress import Progress

            self._bar = Progress(transient=False)
            self._bar.start()
            self._task = self._bar.add_task(f"hetero prefill: {tokens:,} tokens into the tiers", total=self.num_layers)
        self._bar.update(self._task, completed=layer_idx + 1)
        if layer_idx + 1 >= self.num_layers:
            self._bar.stop()
            self._bar = None


def _real_tokens(attention_mask: Optional[torch.Tensor], batch: int, length: int, device) -> torch.Tensor:
    """``[B, T]`` bool: which prompt tokens are real (not padding), read off the prompt's last mask row."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    row = attention_mask[:, 0, -1, -length:]
    return row if row.dtype == torch.bool else torch.isfinite(row) & (row > torch.finfo(row.dtype).min)


def hetero_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``AttentionInterface`` function: query ``[B, Hq, Lq, D]`` (post-RoPE), key/value ``[B, Hkv, Lk, D]``;
    returns ``(out [B, Lq, Hq, D], None)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state = getattr(key, "_hetero_layer", None)
    if state is None:  # not our cache: the key/value are complete, SDPA is exact
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if state.pending is not None:  # prefill: dense over the prompt, then the prompt moves into the tiers
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                        **kwargs)
        k, v = state.pending
        state.pending = None
        b, _, t, _ = k.shape
        real = _real_tokens(attention_mask, b, t, k.device)
        order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)  # real tokens first, in order
        idx = order[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        state.layer.append(torch.gather(k, 2, idx), torch.gather(v, 2, idx), real.sum(dim=1).cpu())
        state.processed += t
        if state.progress is not None:
            state.progress.layer_done(state.layer.layer_idx, t)
        return out, None
    cache_attention = state.parent.attention(scaling)
    record = getattr(module, "_hetero_record", None)
    if record is None:
        out = cache_attention.run(query[:, :, 0, :], state.layer)  # [B, Hq, D]
    else:  # profiling: keep the step's phase timings per layer
        res = cache_attention.run(query[:, :, 0, :], state.layer, return_details=True)
        record.append(res)
        out = res.out
    return out.unsqueeze(1), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, hetero_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def wrap(model, config: Optional[HeteroConfig] = None):
    """Make a loaded transformers causal LM decode with hetero; returns the same model.

    ``model.generate(...)`` then creates a ``HeteroCache`` (unless you pass ``past_key_values``); greedy,
    sampling and streaming work unchanged, batches may be left-padded. Raises ``UnsupportedModelError``
    naming the feature for models hetero cannot serve exactly (sliding-window layers, soft-capping,
    encoder-decoder, MLA, cross-attention).
    """
    config = config or HeteroConfig()
    reasons = unsupported_features(model.config)
    if reasons:
        raise UnsupportedModelError(f"hetero cannot wrap this {type(model).__name__}: " + "; ".join(reasons))
    _register()
    model.set_attn_implementation(ATTN_NAME)
    num_layers = model.config.num_hidden_layers
    original = getattr(model.generate, "_hetero_original", model.generate)

    @functools.wraps(original)
    def generate(*args, **kwargs):
        if kwargs.get("past_key_values") is not None:
            return original(*args, **kwargs)
        cache = HeteroCache(config, num_layers)
        kwargs["past_key_values"] = cache
        try:
            return original(*args, **kwargs)
        finally:
            cache.close()  # the cache is ours: stop its indexer thread

    generate._hetero_original = original
    model.generate = generate
    model.hetero_config = config
    return model
