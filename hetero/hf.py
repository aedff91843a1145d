"""HuggingFace transformers integration. Importing this module registers the ``"hetero"`` attention.

Pieces:

* ``HeteroCache``: a ``transformers.cache_utils.Cache`` whose layers (``HeteroCacheLayer``) hold hetero
  ``LayerCache``s: sinks + window on the model's device, older tokens in host memory behind a retriever.
  ``get_seq_length`` counts every token processed (padding included), which drives position ids; ``crop`` rolls
  the tiers and the index back (assisted and prompt-lookup decoding).
* ``hetero_attention``: the attention function. One query token: ``HeteroAttention.run`` under a step plan made
  at the first layer of each forward. Several (a prompt, its chunks, a new turn, draft tokens): attention of the
  chunk over the tiers and itself (``hetero/chunk.py``), then the chunk's tokens enter the tiers.
* Registration: ``AttentionInterface`` / ``AttentionMaskInterface`` (the sdpa mask, so padded batches get their
  masks), and ``generate()`` of a model whose attention implementation is ``"hetero"`` builds a ``HeteroCache``
  when none is passed (hetero settings from ``generate(hetero_config=...)`` or ``generation_config.hetero_config``,
  which ``save_pretrained`` writes as ``HeteroConfig.to_dict()`` and a loaded config holds as that dict).
  ``wrap`` / ``unwrap`` switch a loaded model.

Mistakes are refused rather than decoded wrongly: a ``HeteroCache`` under another attention implementation raises at
its next update; hetero's attention handed another cache (or none) warns once and computes exact dense attention
over what it was given; ``output_attentions``, beam search (before the prompt goes in), another batch size, a crop
into the left padding and ``copy.deepcopy`` raise, leaving the cache as it was. A forward that fails part-way rolls
back the failing layer and those before it; layers left holding different positions (a failure outside hetero's
attention) are refused at the next forward with the ``crop`` (or ``reset``) that repairs them.
"""
from __future__ import annotations

import threading
import warnings
import weakref
from typing import List, Optional

import torch
from transformers import AttentionInterface, GenerationMixin, PretrainedConfig
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .attention import HeteroAttention
from .cache import LayerCache, new_populator, total_memory
from .chunk import chunk_attention
from .config import HeteroConfig
from .errors import ConfigError, HeteroError, InvalidValueError, ShapeError, UnsupportedError
from .worker import Worker

# Decoder architectures whose attention is plain softmax attention over every past token, verified token-identical
# to their own SDPA decoding in exact mode (tests/test_hf.py); their features around the attention (qk-norm, partial
# rotary, no-RoPE layers, attention multipliers, MoE) happen before or after it.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gpt_neox", "olmo", "olmo2", "stablelm",
                         "granite", "cohere", "starcoder2", "smollm3", "mixtral", "qwen2_moe", "qwen3_moe")
ATTN_NAME = "hetero"
DEFAULT_PROGRESS_TOKENS = 16384


class UnsupportedModelError(UnsupportedError):
    """The model uses a feature hetero does not implement; the message names it."""


def unsupported_features(config) -> List[str]:
    """Why hetero cannot serve a model with this config (empty: supported)."""
    reasons = []
    model_type = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        reasons.append("encoder-decoder architecture")
    if getattr(config, "add_cross_attention", False):
        reasons.append("cross-attention")
    if getattr(config, "attn_logit_softcapping", None):  # (a final_logit_softcapping acts on the LM head only)
        reasons.append(f"attention logit soft-capping (attn_logit_softcapping={config.attn_logit_softcapping})")
    if getattr(config, "kv_lora_rank", None) or getattr(config, "q_lora_rank", None):
        reasons.append("multi-head latent attention (MLA)")
    layer_types = getattr(config, "layer_types", None)
    sliding = getattr(config, "sliding_window", None)
    longest = getattr(config, "max_position_embeddings", None)
    if layer_types:  # the config's own account of every layer
        other = sorted({t for t in layer_types if t != "full_attention"})
        if "sliding_attention" in other:
            reasons.append(f"sliding-window attention layers (layer_types; sliding_window={sliding})")
            other.remove("sliding_attention")
        if other:
            reasons.append(f"attention layers other than full attention (layer_types: {', '.join(other)})")
    elif sliding and getattr(config, "use_sliding_window", True) and not (longest and sliding >= longest):
        reasons.append(f"sliding-window attention (sliding_window={sliding})")
    if model_type not in SUPPORTED_MODEL_TYPES:
        reasons.append(f"architecture {model_type!r} is not one hetero has verified (supported: "
                       f"{', '.join(SUPPORTED_MODEL_TYPES)})")
    return reasons


class _Shared:
    """What the layers of one HeteroCache share: the config, the indexer thread, the decode runtime (one per softmax
    scale), the step plan of the current forward and the prefill progress bar. Holds no reference to the cache, so
    a cache nobody holds any more is freed at once (and its indexer thread stopped, ``HeteroCache.__init__``)."""

    def __init__(self, config: HeteroConfig, num_layers: int, progress_tokens: int):
        self.config = config
        self.indexer = Worker("hetero-indexer")
        # the host tiers' page backing ahead of the appends, on a thread of its own: the indexer runs every layer's
        # adds and flushes, and with faiss or lsh a decode add of some layer is nearly always queued there
        self.populator = new_populator()
        self.progress = _PrefillProgress(num_layers, progress_tokens)
        self.layers: List[LayerCache] = []
        self.cache_layers: List[weakref.ref] = []  # the HeteroCacheLayers, weakly (no cycle keeps a cache alive)
        self._runtime: Optional[HeteroAttention] = None
        self.plan = None
        self.peak_fast_bytes = 0
        self.forward_start = 0  # positions every layer held when the current forward began
        self.checked_config = None  # the model config unsupported_features() last passed
        self.prefill_start: Optional[int] = None  # inside generate()'s chunked prefill: the positions held before it

    def prefill_tokens(self, processed: int, chunk: int) -> Optional[int]:
        """Inside generate()'s chunked prefill, its tokens up to the end of a chunk of ``chunk`` tokens into a layer
        holding ``processed`` positions (``chunk_attention``'s ``turn_tokens``); None outside one."""
        return None if self.prefill_start is None else processed + chunk - self.prefill_start

    def layers_in_step(self, model_layers: Optional[int]) -> None:
        """At a forward's first layer: every layer the model runs holds the same positions, and stores what it
        counts, else a forward failed part-way outside hetero's attention (where nothing rolls it back) and this one
        would mix them."""
        layers = [ref() for ref in self.cache_layers[:model_layers]]
        held = [lay.processed for lay in layers]
        stored = [lay.stores(n) for lay, n in zip(layers, held)]
        if len(set(held)) == 1 and all(stored):
            return
        fix = (f"cache.crop({min(held)}), which keeps the first {min(held)} positions in every layer (crop(-n) "
               "drops n from each layer's own count and leaves them apart)") if min(held) and all(stored) else \
            "cache.reset()"
        raise UnsupportedError(f"this HeteroCache's layers hold different numbers of positions ({held}"
                               f"{'' if all(stored) else ', some storing others than they count'}): an earlier "
                               f"forward failed part-way; call {fix} to return to a position all of them hold")

    def drop_unattended(self) -> None:
        """Every layer forgets an update that reached no hetero attention call (nothing of it was stored)."""
        for ref in self.cache_layers:
            lay = ref()
            if lay is not None:
                lay.drop_update()

    def roll_back(self, failed_layer: int) -> None:
        """A forward failed at ``failed_layer``: it and the layers before it forget what this forward stored (the
        failing layer may have stored its tokens before the failure surfaced: an interrupt held back over a write
        is raised after it)."""
        for ref in self.cache_layers[:failed_layer + 1]:
            ref().rewind(self.forward_start)

    def runtime(self, scaling: Optional[float]) -> HeteroAttention:
        """The decode runtime of this cache for the model's softmax scale."""
        if self._runtime is None or self._runtime.config.scale != scaling:
            if self._runtime is not None:
                self._runtime.close()
            self._runtime = HeteroAttention(self.config.with_(scale=scaling))
        return self._runtime

    def close(self) -> None:
        self.indexer.close()
        self.populator.close()
        if self._runtime is not None:
            self._runtime.close()


class HeteroCacheLayer(CacheLayerMixin):
    """One attention layer's cache: a hetero ``LayerCache`` plus what transformers' cache contract needs."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, shared: _Shared, layer_idx: int):
        super().__init__()
        self.shared = shared
        self.layer = LayerCache(shared.config, layer_idx, shared.indexer, shared.populator)
        self.processed = 0  # tokens seen, padding included: what position ids count
        self.pad: List[int] = []  # left padding of each sequence's first prompt (never stored)
        self.pending = None  # a chunk's K/V waiting for the attention call
        self.token = None  # a decode token's K/V waiting for the attention call (HeteroAttention.decode)
        self.attended = True  # hetero's attention consumed the last update (else another implementation did)

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.attended:  # forget the update no attention consumed, so that the cache serves the next call
            self.shared.drop_unattended()
            raise UnsupportedError(
                f"layer {self.layer.layer_idx}: this HeteroCache's last update never reached hetero's attention (a "
                f"model whose attention implementation is not {ATTN_NAME!r}, where a step would attend only to its new "
                "tokens; or a forward stopped between the two). That update is dropped, so the next call is served; "
                "use the cache with a model whose attention is hetero's (attn_implementation='hetero' or "
                "hetero.wrap(model))")
        layer = self.layer
        if layer.initialized and key_states.shape[0] != layer.batch:
            raise ShapeError(f"layer {layer.layer_idx}: {key_states.shape[0]} sequences into a HeteroCache that "
                             f"holds {layer.batch}; a cache serves one batch (reset() it, or use a new one)")
        if layer.initialized and (key_states.shape[1], key_states.shape[3]) != (layer.kv_heads, layer.head_dim):
            raise ShapeError(f"layer {layer.layer_idx}: keys of {key_states.shape[1]} KV heads x head_dim "
                             f"{key_states.shape[3]} into a HeteroCache that holds {layer.kv_heads} x {layer.head_dim} "
                             "(another model's): a cache serves one model (reset() it, or use a new one)")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.attended = False
        shared = self.shared  # (a chunked prefill's last token is still the prompt's: hetero_attention reads it so)
        # (a sequence that holds only left padding so far may get more: one token of a chunked prefill of a padded
        # batch is a chunk, whose padding the chunk path records)
        if (key_states.shape[2] == 1 and self.processed > 0 and self.processed not in self.pad and (
                shared.prefill_start is None
                or shared.prefill_tokens(self.processed, 1) <= shared.config.sparse_chunk_tokens)):
            self.token = (key_states, value_states)  # a decode token: appended with the step, in one native call
        else:  # a chunk: attended over the tiers first, then appended (hetero_attention)
            self.pending = (key_states, value_states)
            fast = self.layer.fast.nbytes() if self.layer.initialized else 0
            self.shared.peak_fast_bytes = max(self.shared.peak_fast_bytes, fast + 2 * key_states.numel()
                                              * key_states.element_size())
        key_states._hetero_layer = self
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.processed

    def get_mask_sizes(self, query_length: int):
        return self.processed + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def crop(self, max_length: int) -> None:
        """``crop(-n)``: forget the last n tokens (transformers' convention, ``crop(0)`` changes nothing); ``crop(n)``,
        n > 0: keep the first n positions (the older convention). The window gets back the tokens that had left it,
        the host tier and the index forget the rest."""
        keep = self.processed + max_length if max_length <= 0 else min(max_length, self.processed)
        self.drop_update()  # an update of a forward that never reached the attention is moot now
        if keep < 0:
            raise InvalidValueError(f"crop({max_length}) forgets the last {-max_length} positions, and this cache "
                                    f"holds {self.processed}; crop(-n) takes n <= {self.processed}, and reset() "
                                    "empties the cache")
        if keep >= self.processed or not self.layer.initialized:
            self.processed = max(0, min(self.processed, keep))
            return
        if keep < max(self.pad, default=0):  # every layer refuses alike, so the first leaves the cache whole
            raise UnsupportedError(f"crop to {keep} positions would cut into the first prompt's left padding "
                                   f"({self.pad} per sequence), which a HeteroCache never stored; crop to "
                                   f">= {max(self.pad)} positions, or reset()")
        self.layer.crop(self._stored(keep))
        self.processed = keep

    def reset(self) -> None:
        self.layer.reset()
        self.processed, self.pad = 0, []
        self.drop_update()

    def drop_update(self) -> None:
        """Forget the last update's K/V if no attention call has taken them (nothing of them is stored)."""
        self.pending = self.token = None
        self.attended = True

    def stores(self, positions: int) -> bool:
        """Whether the tiers hold exactly ``positions`` positions of each sequence (less its left padding)."""
        if not self.layer.initialized:
            return positions == 0 or positions <= max(self.pad, default=0)
        return self.layer.fast.total.tolist() == self._stored(positions)

    def rewind(self, positions: int) -> None:
        """Back to ``positions`` positions (a failed forward's tokens forgotten), whatever ``processed`` says."""
        self.drop_update()
        if positions == 0:
            self.reset()
            return
        self.pad = [min(p, positions) for p in self.pad]  # a chunk of padding only this forward counted goes too
        if self.layer.initialized:
            self.layer.crop(self._stored(positions))
        self.processed = positions

    def _stored(self, positions: int) -> List[int]:
        """Tokens each sequence stores at ``positions`` positions (its left padding is never stored)."""
        return [max(0, positions - p) for p in (self.pad or [0] * self.layer.batch)]

    def reorder_cache(self, beam_idx) -> None:
        raise UnsupportedError("beam search is not supported by hetero's cache (use greedy or sampling)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats == 1:  # (generate() asks for it with num_return_sequences=1 in some modes): nothing to do
            return
        raise UnsupportedError(f"expanding a HeteroCache's batch ({repeats} copies of each sequence) is not supported "
                               "(one sequence per prompt): repeat the prompts before the prefill instead")

    def batch_select_indices(self, indices) -> None:
        raise UnsupportedError("selecting sequences of a HeteroCache is not supported")


def _no_layer_offloading(method: str) -> UnsupportedError:
    return UnsupportedError(f"HeteroCache.{method}: a HeteroCache places its own tiers (the window on the fast device, "
                            "older tokens in host memory); transformers' layer offloading does not apply")


class HeteroCache(Cache):
    """A transformers ``Cache`` over hetero's tiers: ``layers[i].layer`` is layer i's ``LayerCache``.

    ``HeteroCache(hetero_config, config=model.config)`` (or ``HeteroCache(hetero_config, num_layers)``): HF-style,
    ``config`` is the model's config (its layer count); ``hetero_config`` a ``HeteroConfig`` (default:
    ``HeteroConfig()``). Tokens moved to
    the host tier are indexed on a background thread, so a layer's index build during a prefill overlaps the next
    layers' compute. Prompts of ``progress_tokens`` tokens or more show a progress bar on stderr, one tick per layer.
    ``close()`` (or leaving a ``with`` block, or dropping the last reference) stops that thread.
    """

    def __init__(self, hetero_config: Optional[HeteroConfig] = None, num_layers: Optional[int] = None, *,
                 config: Optional[PretrainedConfig] = None, progress_tokens: int = DEFAULT_PROGRESS_TOKENS):
        if isinstance(hetero_config, PretrainedConfig) and config is None:  # HeteroCache(model.config)
            hetero_config, config = None, hetero_config
        hetero_config = HeteroConfig() if hetero_config is None else hetero_config
        if not isinstance(hetero_config, HeteroConfig):
            raise ConfigError(f"hetero_config must be a hetero.HeteroConfig, got {type(hetero_config).__name__}")
        if num_layers is None and config is not None:
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ConfigError(f"HeteroCache needs the model's layer count: pass config=model.config or num_layers=N "
                              f"(an int >= 1), got {num_layers!r}")
        if isinstance(progress_tokens, bool) or not isinstance(progress_tokens, int) or progress_tokens < 0:
            raise ConfigError(f"progress_tokens must be an int >= 0, got {progress_tokens!r}")
        missing = [i for i in hetero_config.dense_layers if i >= num_layers]
        if missing:
            raise ConfigError(f"HeteroConfig.dense_layers names layers {missing} of a model with {num_layers} layers "
                              f"(0 .. {num_layers - 1})")
        shared = _Shared(hetero_config, num_layers, progress_tokens)
        layers = [HeteroCacheLayer(shared, i) for i in range(num_layers)]
        shared.layers = [x.layer for x in layers]
        shared.cache_layers = [weakref.ref(x) for x in layers]
        super().__init__(layers=layers)
        self.config = hetero_config
        self._shared = shared
        self._finalizer = weakref.finalize(self, shared.close)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if not 0 <= layer_idx < len(self.layers):
            raise ConfigError(f"this HeteroCache has {len(self.layers)} layers and the model updated layer {layer_idx}: "
                              "build it for the model, HeteroCache(hetero_config, config=model.config)")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def __copy__(self):
        return self.__deepcopy__({})

    def __deepcopy__(self, memo):
        raise UnsupportedError("a HeteroCache cannot be copied (its tiers live in pinned and native memory, its index "
                               "on a worker thread); to continue one prompt several ways, crop() the cache back to "
                               "the prompt between continuations, or prefill a new cache per continuation")

    def __reduce_ex__(self, protocol):
        raise UnsupportedError("a HeteroCache cannot be pickled (its tiers live in pinned and native memory, its index "
                               "on a worker thread); keep the token ids and prefill a new cache from them")

    def offload(self, *args, **kwargs) -> None:
        raise _no_layer_offloading("offload")

    def prefetch(self, *args, **kwargs) -> None:
        raise _no_layer_offloading("prefetch")

    def __enter__(self) -> "HeteroCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Finish pending index work and stop the indexer thread (also done when the cache is freed, or at exit). A
        failed add not yet reported is raised (``IndexSyncError``) after the thread is stopped."""
        try:
            for lay in self.layers:
                lay.layer.wait_indexed()
        finally:
            self._finalizer()

    def memory(self):
        """Bytes per tier summed over layers (``fast_bytes``, ``host_bytes``, ``index_bytes``) and the most the fast
        tier of one layer held at once (``fast_peak_layer_bytes``: stored tokens plus a chunk in flight)."""
        total = total_memory([lay.layer for lay in self.layers])
        total["fast_peak_layer_bytes"] = self._shared.peak_fast_bytes
        return total


class _PrefillProgress:
    """A rich progress bar on stderr over the layers of a long prefill (silent for short prompts)."""

    def __init__(self, num_layers: int, min_tokens: int):
        self.num_layers, self.min_tokens = num_layers, min_tokens
        self._bar = None
        self._task = None

    def layer_done(self, layer_idx: int, tokens: int) -> None:
        if not self.min_tokens or tokens < self.min_tokens:
            return
        if self._bar is None:
            from rich.console import Console
            from rich.progress import Progress

            self._bar = Progress(transient=False, console=Console(stderr=True))
            self._bar.start()
            self._task = self._bar.add_task(f"hetero prefill: {tokens:,} tokens into the tiers", total=self.num_layers)
        self._bar.update(self._task, completed=layer_idx + 1)
        if layer_idx + 1 >= self.num_layers:
            self._bar.stop()
            self._bar = None


def _attended(attention_mask: torch.Tensor) -> torch.Tensor:
    """The keys the mask's last query row attends in each of its heads, ``[B, H, Lk]`` bool (``True`` / a finite
    additive 0 = attended; H is 1 for a mask shared by every head)."""
    return _as_bool(attention_mask[:, :, -1, :])


def _as_bool(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else torch.isfinite(mask) & (mask > torch.finfo(mask.dtype).min)


_MASK_ROWS = 1024  # query rows compared at once (bounds the temporaries of a long prompt's check)


def _mask_is_causal(attention_mask: Optional[torch.Tensor], pad: List[int], start: int) -> bool:
    """Whether every query row of a chunk at positions ``start ..`` attends exactly its sequence's keys from its left
    padding ``pad[b]`` up to its own position: the causal mask a HeteroCache serves. Rows of padding queries (their
    outputs are dropped) must attend nothing, or everything (an SDPA workaround for empty rows). A mask of packed
    documents or a bidirectional prefix is not causal over the stored tokens. None is causal."""
    if attention_mask is None:
        return True
    m = attention_mask
    lq, lk = m.shape[-2], m.shape[-1]
    cols = torch.arange(lk, device=m.device)
    first = torch.tensor(pad, device=m.device)[:, None, None, None]                       # [B, 1, 1, 1]
    for r0 in range(0, lq, _MASK_ROWS):
        pos = torch.arange(r0, min(lq, r0 + _MASK_ROWS), device=m.device) + start         # query positions
        got = _as_bool(m[:, :, r0:r0 + len(pos), :])                                       # [B, H, R, Lk]
        want = (cols <= pos[:, None]) & (cols >= first)                                   # [B, 1, R, Lk]
        real = pos[:, None] >= first                                                      # [B, 1, R, 1]
        padding_ok = ~got.any(-1, keepdim=True) | got.all(-1, keepdim=True)
        if not bool(torch.where(real, (got == want).all(-1, keepdim=True), padding_ok).all()):
            return False
    return True


def _real_lengths(attention_mask: Optional[torch.Tensor], batch: int, length: int) -> List[int]:
    """Real (not padding) tokens of each sequence in a chunk of ``length`` query tokens, read off the mask's last
    row (``True`` / a finite additive 0 = attended); None means every token is real."""
    if attention_mask is None:
        return [length] * batch
    return _attended(attention_mask)[:, 0, -length:].sum(dim=1).tolist()  # (_mask_fits compares every head)


def _mask_fits(attention_mask: Optional[torch.Tensor], pad: List[int]) -> bool:
    """Whether the mask's last query row attends exactly each sequence's keys from its left padding ``pad[b]`` on:
    all a HeteroCache serves (left padding of the first prompt, never stored). A hole anywhere else (a masked token
    inside the prompt, right padding, a later token masked out) would be attended here and not by the model. None
    means every key is attended."""
    if attention_mask is None:
        return not any(pad)
    real = _attended(attention_mask)                                     # [B, H, Lk] (B may be 1: broadcast)
    rows = [real[b if real.shape[0] > 1 else 0] for b in range(len(pad))]
    return all(not bool(row[:, :p].any()) and bool(row[:, p:].all()) for row, p in zip(rows, pad))


def _sliding_note(module) -> str:
    """What to add to a mask's refusal for a model with a sliding window (one wrap() let in: it was no shorter than
    the model's positions, which the context has now passed)."""
    window = getattr(getattr(module, "config", None), "sliding_window", None)
    return (f" (this model's sliding_window={window} now leaves tokens out: hetero serves full attention only, so "
            f"keep the context within {window} tokens)") if isinstance(window, int) and window > 0 else ""


def _refuse_mask(layer_idx: int, pad: List[int], attention_mask: Optional[torch.Tensor],
                 note: str = "") -> UnsupportedError:
    if attention_mask is None:
        return UnsupportedError(f"layer {layer_idx}: this HeteroCache holds left-padded sequences ({pad} padding "
                                "tokens each), and the forward gave no attention_mask: pass the attention_mask "
                                "(generate() does) so that the padding stays out of attention")
    real = _attended(attention_mask)
    hole = ("a HeteroCache attends every stored token, so a mask with holes, right padding or a sliding window cannot "
            "be served; left-pad the first prompt instead")
    for b, p in enumerate(pad):
        row = real[b if real.shape[0] > 1 else 0]                        # [H, Lk]
        seen, every = row.any(dim=0), row.all(dim=0)
        if not bool(seen.any()):
            return UnsupportedError(f"layer {layer_idx}: the attention mask's last query row attends no key of "
                                    f"sequence {b}: {hole}" + note)
        first = int(seen.nonzero()[0])  # the first key some head attends
        missed = (~every[first:]).nonzero()
        if missed.numel():  # a key left out after an attended one: never padding
            where = first + int(missed[0])
            return UnsupportedError(f"layer {layer_idx}: the attention mask leaves out position {where} of sequence "
                                    f"{b} in some head: {hole}" + note)
        if first < p:
            return UnsupportedError(f"layer {layer_idx}: the attention mask attends sequence {b}'s left padding (its "
                                    f"first {p} positions), which a HeteroCache never stored: pass the attention "
                                    "mask of the whole conversation so far, with that padding masked out" + note)
        if first > p:
            return UnsupportedError(f"layer {layer_idx}: the attention mask leaves out position {p} of sequence {b}, "
                                    f"past its left padding of {p} tokens: {hole}" + note)
    return UnsupportedError(f"layer {layer_idx}: the attention mask does not fit the left padding of {pad} tokens "
                            "this HeteroCache holds: " + hole + note)


_warned_dense = False


def hetero_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``AttentionInterface`` function: query ``[B, Hq, Lq, D]`` (post-RoPE), key/value ``[B, Hkv, Lk, D]`` (what
    the cache's update returned); returns ``(out [B, Lq, Hq, D], None)``."""
    global _warned_dense
    state = getattr(key, "_hetero_layer", None)
    if kwargs.get("output_attentions"):
        if state is not None:  # the layer's update is dropped (nothing was stored): the cache stays usable
            state.drop_update()
        raise UnsupportedError("output_attentions is not available with hetero's attention: the host tier's tokens "
                               "are read sparsely, so there is no full attention matrix; load the model with "
                               "attn_implementation='eager' to inspect attention weights")
    if state is None:  # not our cache (or none): the key/value are complete, dense attention is exact
        if not _warned_dense:
            warnings.warn("hetero: the 'hetero' attention was given no HeteroCache (use_cache=False, or another cache "
                          "passed as past_key_values): it computes exact dense attention (SDPA) over the keys it got",
                          stacklevel=2)
            _warned_dense = True
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    state.attended = True
    shared, layer = state.shared, state.layer
    if layer.layer_idx == 0:  # before the first layer stores anything: a cache of other layers is refused whole
        model_config = getattr(module, "config", None)
        if model_config is not None and model_config is not shared.checked_config:
            reasons = unsupported_features(model_config)  # what wrap() refuses, for attn_implementation="hetero"
            if reasons:
                state.drop_update()
                raise UnsupportedModelError(f"hetero's attention cannot serve this model: {'; '.join(reasons)}")
            shared.checked_config = model_config
        model_layers = getattr(model_config, "num_hidden_layers", None)
        model_layers = model_layers if isinstance(model_layers, int) else None
        if model_layers is not None and model_layers != len(shared.layers):
            state.drop_update()
            raise ConfigError(f"this HeteroCache has {len(shared.layers)} layers and the model {model_layers}: build "
                              "it for the model, HeteroCache(hetero_config, config=model.config)")
        try:
            shared.layers_in_step(model_layers)
        except UnsupportedError:
            state.drop_update()
            raise
        shared.forward_start = state.processed
    if kwargs.get("softcap") is not None:  # a cap the config check above did not see (a config without the field)
        state.drop_update()
        raise UnsupportedModelError(f"layer {layer.layer_idx}: attention logit soft-capping (softcap="
                                    f"{kwargs['softcap']}) is not implemented by hetero's attention")
    chunk = state.pending  # (taken by the step: read here for an error's message)
    try:
        return _attend_layer(state, module, query, attention_mask, scaling)
    except BaseException as e:  # nothing half-done: the layers before this one forget this forward's tokens
        shared.roll_back(layer.layer_idx)
        if isinstance(e, InvalidValueError) and not str(e).startswith("layer "):  # say which model layer, and in what
            step = "decode step" if chunk is None else f"{chunk[0].shape[2]}-token chunk"
            raise InvalidValueError(f"layer {layer.layer_idx}, {step}: {e}") from e
        raise


def _attend_layer(state, module, query, attention_mask, scaling):
    """hetero_attention's step of one layer, the checks common to every layer done."""
    shared, layer = state.shared, state.layer
    runtime = shared.runtime(scaling)
    if state.pending is None:  # one decode token
        if layer.layer_idx == 0 or shared.plan is None:
            if not _mask_fits(attention_mask, state.pad):  # (the layers share it; no mask: no padding stored)
                state.token = None
                raise _refuse_mask(layer.layer_idx, state.pad, attention_mask, _sliding_note(module))
            shared.plan = runtime.plan(shared.layers, query.shape[1], query.dtype)
        q = query[:, :, 0, :]
        record = getattr(module, "_hetero_record", None)  # profiling: the native phases of this layer's steps
        runtime.record_phases = record is not None
        k, v = state.token
        state.token = None
        out = runtime.decode(q, k, v, layer, shared.plan, out=runtime.output(shared.plan, layer))
        state.processed += 1  # counted once the token is in (a refused step leaves the cache as it was)
        if record is not None:
            record.append(runtime.phases(shared.plan, layer))
        return out.unsqueeze(1), None
    k, v = state.pending
    state.pending = None
    b, _, c, _ = k.shape
    lengths = _real_lengths(attention_mask, b, c)
    # Padding is the first prompt's left padding: in a later chunk only for a sequence that holds nothing real yet
    # (its padding longer than the chunks of a chunked prefill)
    empty = [True] * b if state.processed == 0 else [p == state.processed for p in state.pad]
    if any(n != c and not e for n, e in zip(lengths, empty)):
        raise UnsupportedError(f"layer {layer.layer_idx}: a chunk of {c} tokens into a warm HeteroCache holds "
                               f"padding ({lengths} real tokens per sequence) after real tokens; only the first "
                               "prompt of a batch may be left-padded")
    pad = [(p if state.processed else 0) + (c - n if e else 0)
           for p, n, e in zip(state.pad or [0] * b, lengths, empty)]
    if not _mask_fits(attention_mask, pad):
        raise _refuse_mask(layer.layer_idx, pad, attention_mask, _sliding_note(module))
    if layer.layer_idx == 0 and not _mask_is_causal(attention_mask, pad, state.processed):  # (the layers share it)
        raise UnsupportedError(f"layer 0: the attention mask of this {c}-token chunk is not causal over the stored "
                               "tokens (a query sees a later key, or misses an earlier one that is not left padding: "
                               "packed documents, a bidirectional prefix, a tree of drafts); a HeteroCache serves "
                               "causal attention with left padding only" + _sliding_note(module))
    state.pad = pad
    # a chunk of generate()'s chunked prefill reads the host tier as the prefill so far would in one chunk
    turn = shared.prefill_tokens(state.processed, c)
    out = chunk_attention(runtime, layer, query, k, v, lengths, turn_tokens=turn)  # [B, Hq, C, D]
    if min(lengths) == c:
        layer.append(k, v)
    else:  # the first prompt of a padded batch: each sequence's real tokens, moved to the front
        idx = torch.arange(c, device=k.device)
        order = torch.stack([torch.cat([idx[c - n:], idx[:c - n]]) for n in lengths])
        gather = order[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        layer.append(torch.gather(k, 2, gather), torch.gather(v, 2, gather), lengths)
    state.processed += c
    shared.plan = None  # the next decode step plans again (the chunk may have made the first prefill)
    shared.progress.layer_done(layer.layer_idx, c)
    return out.transpose(1, 2), None


# ---- registration --------------------------------------------------------------------------------------
_registered = threading.Lock()
_original_prepare_cache = GenerationMixin._prepare_cache_for_generation
_original_prepare_config = GenerationMixin._prepare_generation_config
_original_prefill = GenerationMixin._prefill


def _prepare_generation_config(self, generation_config, **kwargs):
    """``generate(hetero_config=...)``: taken off the model kwargs (which would refuse it) onto the generation
    config, where ``_prepare_cache_for_generation`` reads it."""
    hetero_config = kwargs.pop("hetero_config", None)
    if hetero_config is not None:  # (this hook serves every model of the process, wrapped or not)
        if getattr(self.config, "_attn_implementation", None) != ATTN_NAME:
            raise ConfigError(f"generate(hetero_config=...) on a {type(self).__name__} whose attention is "
                              f"{getattr(self.config, '_attn_implementation', None)!r}, not {ATTN_NAME!r}: it would "
                              "be ignored; hetero.wrap(model) first")
        if not isinstance(hetero_config, HeteroConfig):
            raise ConfigError(f"generate(hetero_config=...) takes a hetero.HeteroConfig, got "
                              f"{type(hetero_config).__name__}")
    generation_config, model_kwargs = _original_prepare_config(self, generation_config, **kwargs)
    if hetero_config is not None:
        generation_config.hetero_config = hetero_config
    return generation_config, model_kwargs


def _saved_hetero_config(generation_config) -> Optional[HeteroConfig]:
    """``generation_config.hetero_config``: a HeteroConfig, or the dict ``save_pretrained`` wrote for one (a
    generation config loaded from disk holds that); None when unset."""
    value = getattr(generation_config, "hetero_config", None)
    if value is None or isinstance(value, HeteroConfig):
        return value
    if isinstance(value, dict):
        return HeteroConfig.from_dict(value)
    raise ConfigError(f"generation_config.hetero_config must be a hetero.HeteroConfig (or the dict of one that "
                      f"save_pretrained wrote), got {type(value).__name__}")


def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
    """A model whose attention is "hetero" gets a ``HeteroCache`` when ``generate()`` is given no cache (and uses
    one: ``use_cache=False`` keeps none); any other model is left to transformers. Beam search is refused here,
    before the prompt is prefilled once per beam into a cache that cannot reorder them."""
    hetero_model = getattr(self.config, "_attn_implementation", None) == ATTN_NAME
    given = model_kwargs.get("past_key_values")
    builds_hetero = hetero_model and given is None and generation_config.cache_implementation is None
    if ((builds_hetero or isinstance(given, HeteroCache))
            and (generation_config.num_beams or 1) > 1 and generation_config.use_cache is not False):
        raise UnsupportedError(f"beam search (num_beams={generation_config.num_beams}) is not supported by hetero's "
                               "cache, which cannot reorder its sequences; use greedy decoding or sampling")
    wanted = _saved_hetero_config(generation_config)
    if isinstance(given, HeteroCache) and wanted is not None and wanted != given.config:
        raise ConfigError("generate() was given a hetero_config (or generation_config.hetero_config) and a "
                          "HeteroCache built with another one: the cache's own applies to its tiers, so one of "
                          "them would be ignored; pass only the cache, or build it with that config")
    if builds_hetero and generation_config.use_cache is not False:
        config = wanted or getattr(self, "hetero_config", None)
        progress = getattr(self, "hetero_progress_tokens", DEFAULT_PROGRESS_TOKENS)
        cache = HeteroCache(config, config=self.config, progress_tokens=progress)
        if generation_config.is_assistant:
            cache.activate_past_recording()
        model_kwargs["past_key_values"] = cache
        return
    return _original_prepare_cache(self, generation_config, model_kwargs, *args, **kwargs)


def _prefill(self, input_ids, generation_config, model_kwargs, *args, **kwargs):
    """``generate()``'s prefill. Chunked (``prefill_chunk_size``) into a ``HeteroCache``, its chunks read the host
    tier as the prefill so far would (``chunk_attention``'s ``turn_tokens``): a last chunk of at most
    ``sparse_chunk_tokens`` is still part of a prompt, attended exactly as the one-shot prefill attends it, not as a
    short turn."""
    cache = model_kwargs.get("past_key_values")
    if not isinstance(cache, HeteroCache) or getattr(generation_config, "prefill_chunk_size", None) is None:
        return _original_prefill(self, input_ids, generation_config, model_kwargs, *args, **kwargs)
    shared = cache._shared
    shared.prefill_start = cache.get_seq_length()
    try:
        return _original_prefill(self, input_ids, generation_config, model_kwargs, *args, **kwargs)
    finally:
        shared.prefill_start = None


def register() -> None:
    """Register the "hetero" attention and mask with transformers and the cache hook of ``generate()`` (idempotent;
    done when this module is imported)."""
    with _registered:
        AttentionInterface.register(ATTN_NAME, hetero_attention)
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
        GenerationMixin._prepare_cache_for_generation = _prepare_cache_for_generation
        GenerationMixin._prepare_generation_config = _prepare_generation_config
        GenerationMixin._prefill = _prefill


def wrap(model, config: Optional[HeteroConfig] = None, progress_tokens: int = DEFAULT_PROGRESS_TOKENS):
    """Make a loaded transformers causal LM decode with hetero; returns the same model.

    ``model.generate(...)`` then builds a ``HeteroCache`` (unless you pass ``past_key_values``); greedy, sampling,
    streaming, multi-turn, chunked prefill and prompt-lookup decoding work, batches may be left-padded. Raises
    ``UnsupportedModelError`` naming the feature for models hetero cannot serve exactly (sliding-window layers,
    soft-capping, encoder-decoder, MLA, cross-attention). ``unwrap(model)`` undoes it.
    """
    if config is not None and not isinstance(config, HeteroConfig):
        raise ConfigError(f"config must be a hetero.HeteroConfig (or None for the defaults), got {type(config).__name__}")
    reasons = unsupported_features(model.config)
    if reasons:
        raise UnsupportedModelError(f"hetero cannot wrap this {type(model).__name__}: " + "; ".join(reasons))
    register()
    if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
        model._hetero_previous_attn = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    model.hetero_config = config or HeteroConfig()
    model.hetero_progress_tokens = progress_tokens
    return model


def unwrap(model):
    """Undo ``wrap``: the attention implementation the model had before (sdpa if unknown); returns the model."""
    model.set_attn_implementation(getattr(model, "_hetero_previous_attn", None) or "sdpa")
    for name in ("hetero_config", "hetero_progress_tokens", "_hetero_previous_attn"):
        if hasattr(model, name):
            delattr(model, name)
    return model


register()
