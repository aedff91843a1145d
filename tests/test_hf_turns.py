"""HeteroCache as a whole transformers Cache: several tokens into a warm cache (multi-turn chat, chunked prefill,
prompt lookup), crop, native registration, and every silent mistake refused or warned."""
import copy
import json
import warnings

import numpy as np
import pytest
import torch

import hetero
from hetero import HeteroConfig, HeteroError, LayerCache
from hetero.tools.workloads import smollm2

transformers = pytest.importorskip("transformers")
import hetero.hf  # noqa: E402  (registers "hetero")
from hetero.hf import HeteroCache  # noqa: E402

COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
EXACT = HeteroConfig(window=8, sinks=2, retriever="all")
needs_model = pytest.mark.skipif(not smollm2.available(), reason=f"SmolLM2 not installed ({smollm2.INSTALL_HINT})")


def _pair(config=EXACT):
    from transformers import LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(**COMMON)
    ref = transformers.LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    model = transformers.LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    model.load_state_dict(ref.state_dict())
    return ref, hetero.wrap(model, config)


def _chat(model, cache, turns, new_tokens=10):
    ids, seqs = None, []
    for t in turns:
        ids = t if ids is None else torch.cat([ids, t], dim=1)
        ids = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, past_key_values=cache)
        seqs.append(ids)
    return seqs


def _record_chunks(monkeypatch):
    """Sizes of the multi-token chunks layer 0 is handed (what a prefill processes)."""
    sizes, update = [], hetero.hf.HeteroCacheLayer.update

    def spy(self, k, v, *a, **kw):
        if self.layer.layer_idx == 0 and k.shape[2] > 1:
            sizes.append(k.shape[2])
        return update(self, k, v, *a, **kw)

    monkeypatch.setattr(hetero.hf.HeteroCacheLayer, "update", spy)
    return sizes


def test_multi_turn_chat_reuses_the_cache_and_matches_dynamic_cache(monkeypatch):
    from transformers import DynamicCache

    ref, model = _pair()
    gen = torch.Generator().manual_seed(1)
    turns = [torch.randint(3, 160, (1, n), generator=gen) for n in (40, 17, 23)]
    want = _chat(ref, DynamicCache(config=ref.config), turns)
    sizes = _record_chunks(monkeypatch)
    cache = HeteroCache(model.hetero_config, config=model.config)
    got = _chat(model, cache, turns)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    # each turn's prefill is its new tokens only (and the last token the previous turn generated, never fed back)
    assert sizes == [40, 17 + 1, 23 + 1]
    assert cache.get_seq_length() == got[-1].shape[1] - 1
    cache.close()


def test_chunked_prefill_matches_one_shot_and_bounds_the_fast_tier():
    ref, model = _pair(HeteroConfig(window=16, sinks=2, retriever="all"))
    ids = torch.randint(3, 160, (1, 300), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True)
    one = model.generate(ids, **kw)
    cache = HeteroCache(model.hetero_config, config=model.config)
    chunked = model.generate(ids, prefill_chunk_size=64, past_key_values=cache, **kw)
    dense = ref.generate(ids, **kw)
    assert torch.equal(one.sequences, chunked.sequences) and torch.equal(one.sequences, dense.sequences)
    assert max(float((a - b).abs().max()) for a, b in zip(one.logits, chunked.logits)) <= 1e-4
    per_token = 2 * 2 * 16 * 4  # K and V, 2 KV heads, head_dim 16, float32
    assert cache.memory()["fast_peak_layer_bytes"] <= (64 + 16 + 2) * per_token  # chunk + window + sinks


def test_prompt_lookup_and_assisted_decoding_roll_the_cache_back_exactly():
    ref, model = _pair()
    ids = torch.randint(3, 30, (1, 60), generator=torch.Generator().manual_seed(3))  # repetitive: drafts get taken
    kw = dict(max_new_tokens=40, do_sample=False)
    assert torch.equal(ref.generate(ids, prompt_lookup_num_tokens=5, **kw), model.generate(ids, **kw))
    assert torch.equal(model.generate(ids, prompt_lookup_num_tokens=5, **kw), model.generate(ids, **kw))


def test_use_cache_false_is_respected_and_output_attentions_refused():
    ref, model = _pair()
    ids = torch.randint(3, 160, (1, 30), generator=torch.Generator().manual_seed(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(got, ref.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False))
    with pytest.raises(HeteroError, match="output_attentions"):
        model.generate(ids, max_new_tokens=2, do_sample=False, output_attentions=True, return_dict_in_generate=True)


def test_a_hetero_cache_under_another_attention_raises_before_a_wrong_step():
    ref, _ = _pair()
    ids = torch.randint(3, 160, (1, 30), generator=torch.Generator().manual_seed(5))
    cache = HeteroCache(EXACT, config=ref.config)  # ref was never wrapped: sdpa attention
    with pytest.raises(HeteroError, match="attention implementation is not 'hetero'"):
        ref.generate(ids, max_new_tokens=4, do_sample=False, past_key_values=cache)
    # nothing of it was stored, and the cache serves the wrapped model next (it was refused for good)
    _, model = _pair()
    want = ref.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False, past_key_values=cache), want)


@pytest.mark.parametrize("kind", ["packed", "prefix"])
def test_a_4d_mask_that_is_not_causal_is_refused_and_leaves_the_cache_empty(kind):
    """Packed documents (the last row looks like left padding) and a bidirectional prefix were served as causal."""
    _, model = _pair()
    n = 12
    ids = torch.randint(3, 160, (1, n), generator=torch.Generator().manual_seed(8))
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    if kind == "packed":
        allowed[5:, :5] = False
    else:
        allowed[:5, :5] = True
    mask = torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
    cache = HeteroCache(EXACT, config=model.config)
    with pytest.raises(HeteroError, match="not causal"):
        model(ids, attention_mask=mask, past_key_values=cache)
    assert cache.get_seq_length() == 0 and not cache.layers[0].layer.initialized
    causal = torch.zeros(n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), torch.finfo(torch.float32).min)
    model(ids, attention_mask=causal[None, None], past_key_values=cache)  # the causal 4-D mask is served
    assert cache.get_seq_length() == n


def test_a_decode_step_without_a_mask_over_a_left_padded_cache_is_refused_and_with_it_is_exact():
    """With no mask the model attends the padding; the cache never stored it, so the step cannot be served: it was
    answered (0.24 off SDPA's) where a chunk was refused. Refused, the cache is as it was; with the mask, exact."""
    ref, model = _pair()
    ids = torch.randint(3, 160, (2, 20), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :12] = 0  # row 1 left-padded
    cache, dense = HeteroCache(EXACT, config=model.config), transformers.DynamicCache(config=ref.config)
    nxt = torch.tensor([[5], [7]])
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache)
        ref(ids, attention_mask=mask, past_key_values=dense)
        for chunk, why in ((nxt, "left-padded sequences .* no attention_mask"), (torch.cat([nxt] * 3, 1),
                                                                                  "attends sequence 1's left padding")):
            with pytest.raises(HeteroError, match=why):  # (a chunk's own causal mask, which attends the padding)
                model(chunk, past_key_values=cache)
            assert cache.get_seq_length() == 20
        full = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        got = model(nxt, attention_mask=full, past_key_values=cache).logits
        want = ref(nxt, attention_mask=full, past_key_values=dense).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("head", [0, 1])
def test_a_decode_steps_4d_mask_with_a_hole_in_any_head_is_refused(head):
    """The decode check read head 0 of a per-head mask only: a hole in head 1 was attended."""
    _, model = _pair()
    ids = torch.randint(3, 160, (1, 20), generator=torch.Generator().manual_seed(4))
    cache = HeteroCache(EXACT, config=model.config)
    heads = model.config.num_attention_heads
    with torch.no_grad():
        model(ids, past_key_values=cache)
        mask = torch.ones(1, heads, 1, 21, dtype=torch.bool)
        mask[0, head, 0, 5] = False
        with pytest.raises(HeteroError, match="in some head"):
            model(ids[:, :1], attention_mask=mask, past_key_values=cache, position_ids=torch.tensor([[20]]))
    assert cache.get_seq_length() == 20


def test_a_cache_refuses_another_models_keys_and_dense_layers_the_model_lacks():
    from transformers import LlamaConfig

    _, model = _pair()
    ids = torch.randint(3, 160, (1, 20), generator=torch.Generator().manual_seed(5))
    cache = HeteroCache(EXACT, config=model.config)
    model.generate(ids, max_new_tokens=2, do_sample=False, past_key_values=cache)
    held = cache.get_seq_length()
    other = hetero.wrap(transformers.LlamaForCausalLM._from_config(
        LlamaConfig(**dict(COMMON, head_dim=32)), attn_implementation="sdpa").eval(), EXACT)
    for new in (1, 4):  # a decode step, a chunk
        with pytest.raises(HeteroError, match="holds 2 x 16 .another model's."):
            other(ids[:, :new], past_key_values=cache)
        assert cache.get_seq_length() == held
    with pytest.raises(HeteroError, match=r"dense_layers names layers \[5\] of a model with 2 layers"):
        HeteroCache(EXACT.with_(dense_layers=(1, 5)), config=model.config)


@pytest.mark.parametrize("prompt", [40, 100])
def test_a_sliding_window_the_context_outgrows_is_named_when_its_mask_is_refused(prompt):
    """wrap() lets in a sliding window no shorter than the model's positions; a context past them (transformers
    allows it) slides the mask, which is refused: the refusal names the window rather than packed documents."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = hetero.wrap(MistralForCausalLM(MistralConfig(
        vocab_size=160, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=32, sliding_window=48)).eval(), EXACT)
    ids = torch.randint(3, 160, (1, prompt), generator=torch.Generator().manual_seed(6))
    with pytest.raises(HeteroError, match="sliding_window=48 now leaves tokens out"):
        model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)


def test_generate_refuses_a_hetero_config_the_given_cache_was_not_built_with_and_serves_other_caches_beams():
    import pickle

    ref, model = _pair()
    ids = torch.randint(3, 160, (1, 20), generator=torch.Generator().manual_seed(7))
    cache = HeteroCache(EXACT, config=model.config)
    with pytest.raises(HeteroError, match="HeteroCache built with another one"):
        model.generate(ids, max_new_tokens=2, do_sample=False, past_key_values=cache,
                       hetero_config=EXACT.with_(retriever="lsh"))
    assert cache.get_seq_length() == 0
    model.generate(ids, max_new_tokens=2, do_sample=False, past_key_values=cache, hetero_config=EXACT.with_())
    for call in (lambda: pickle.dumps(cache), lambda: cache.offload(0), lambda: cache.prefetch(0)):
        with pytest.raises(HeteroError):
            call()
    # beam search over a cache of transformers' own: hetero's attention computes SDPA there, the beams reorder it
    beams = dict(max_new_tokens=4, do_sample=False, num_beams=2)
    got = model.generate(ids, past_key_values=transformers.DynamicCache(config=model.config), **beams)
    assert torch.equal(got, ref.generate(ids, past_key_values=transformers.DynamicCache(config=ref.config), **beams))


@pytest.mark.parametrize("first_inside", [True, False])
def test_turns_inside_and_outside_inference_mode_share_a_cache(first_inside):
    """Storage made under ``torch.inference_mode()`` could not be written outside it: turn 2 failed."""
    ref, model = _pair()
    gen = torch.Generator().manual_seed(9)
    turns = [torch.randint(3, 160, (1, 20), generator=gen), torch.randint(3, 160, (1, 7), generator=gen)]
    cache = HeteroCache(EXACT, config=model.config)
    inside = [torch.inference_mode(), torch.no_grad()]
    ids = None
    for t, ctx in zip(turns, inside if first_inside else inside[::-1]):
        ids = t if ids is None else torch.cat([ids, t], dim=1)
        with ctx:
            ids = model.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=cache)
    with torch.no_grad():
        want = ref.generate(torch.cat([ref.generate(turns[0], max_new_tokens=6, do_sample=False), turns[1]], 1),
                            max_new_tokens=6, do_sample=False)
    assert torch.equal(ids, want)


def test_switching_back_to_sdpa_after_wrap_decodes_dense_and_unwrap_restores():
    ref, model = _pair()
    ids = torch.randint(3, 160, (1, 30), generator=torch.Generator().manual_seed(6))
    want = ref.generate(ids, max_new_tokens=10, do_sample=False)
    model.set_attn_implementation("sdpa")
    assert torch.equal(model.generate(ids, max_new_tokens=10, do_sample=False), want)  # a DynamicCache, not ours
    hetero.unwrap(hetero.wrap(model, EXACT))
    assert model.config._attn_implementation == "sdpa" and not hasattr(model, "hetero_config")


def test_hetero_attention_by_name_at_load_decodes_on_a_hetero_cache(monkeypatch):
    from transformers import GenerationConfig, LlamaConfig

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(LlamaConfig(**COMMON), attn_implementation="hetero").eval()
    seen = []
    monkeypatch.setattr(HeteroCache, "__init__", _spy_init(seen))
    ids = torch.randint(3, 160, (1, 40), generator=torch.Generator().manual_seed(7))
    out = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                         hetero_config=HeteroConfig(window=4, sinks=1, retriever="exact", budget=3))
    assert isinstance(out.past_key_values, HeteroCache) and seen[-1].window == 4
    model.generation_config.hetero_config = HeteroConfig(window=6, sinks=1, retriever="all")
    model.generate(ids, max_new_tokens=2, do_sample=False)
    assert seen[-1].window == 6
    model.generate(ids, max_new_tokens=2, do_sample=False, generation_config=GenerationConfig(
        hetero_config=HeteroConfig(window=5, sinks=1, retriever="all"), max_new_tokens=2, do_sample=False))
    assert seen[-1].window == 5
    ref = transformers.LlamaForCausalLM._from_config(LlamaConfig(**COMMON), attn_implementation="sdpa").eval()
    with pytest.raises(hetero.ConfigError, match="hetero.wrap"):  # an unwrapped model would ignore it
        ref.generate(ids, max_new_tokens=2, do_sample=False, hetero_config=HeteroConfig())
    with pytest.raises(hetero.ConfigError, match="HeteroConfig"):
        model.generate(ids, max_new_tokens=2, do_sample=False, hetero_config={"window": 4})


def test_a_model_chosen_by_name_is_checked_as_wrap_checks_it():
    """attn_implementation="hetero" skips wrap(): the model's config is checked at its first forward instead (a
    soft-capped model decoded without its cap, and a sliding window ignored until the mask showed it, before)."""
    from transformers import Gemma2Config, MistralConfig

    ids = torch.randint(3, 160, (1, 40), generator=torch.Generator().manual_seed(7))
    for cfg, cls, needle in ((Gemma2Config(**COMMON, head_dim=16), "Gemma2ForCausalLM", "soft-capping"),
                             (MistralConfig(**COMMON, sliding_window=16), "MistralForCausalLM", "sliding-window")):
        model = getattr(transformers, cls)._from_config(cfg, attn_implementation="hetero").eval()
        cache = HeteroCache(EXACT, config=model.config)
        with pytest.raises(hetero.hf.UnsupportedModelError, match=needle):
            model(ids, past_key_values=cache)
        assert cache.get_seq_length() == 0 and not cache.layers[0].layer.initialized  # nothing went in
        cache.close()
    _, model = _pair()  # a softcap argument the config check could not see is refused too, the step dropped
    cache = HeteroCache(EXACT, config=model.config)
    model(ids, past_key_values=cache)
    held = [lay.layer.seq_lengths() for lay in cache.layers]
    keys, values = cache.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), 1)
    with pytest.raises(hetero.hf.UnsupportedModelError, match="softcap"):
        hetero.hf.hetero_attention(model.model.layers[1].self_attn, torch.randn(1, 4, 1, 16), keys, values, None,
                                   softcap=30.0)
    assert [lay.layer.seq_lengths() for lay in cache.layers] == held
    assert model(ids[:, :1], past_key_values=cache).logits.isfinite().all()  # the cache serves the next call
    cache.close()


def test_a_cache_built_for_another_layer_count_is_refused_whole():
    _, model = _pair()
    ids = torch.randint(3, 160, (1, 20), generator=torch.Generator().manual_seed(8))
    for layers in (1, 3):  # fewer layers than the model, and more
        cache = HeteroCache(EXACT, num_layers=layers)
        with pytest.raises(hetero.ConfigError, match=f"{layers} layers and the model 2"):
            model(ids, past_key_values=cache)
        assert cache.get_seq_length() == 0
        cache.close()


@pytest.mark.parametrize("prompt", [641, 650, 656, 657])
def test_a_chunked_prefill_whose_last_chunk_is_short_reads_the_host_tier_as_one_shot(prompt):
    """A last chunk of at most sparse_chunk_tokens is still the prompt's: attended exactly as the one-shot prefill
    attends it, not sparsely as a short turn (the first token's logits moved by 1.6-3.2 against one-shot)."""
    config = HeteroConfig(window=16, sinks=2, retriever="exact", budget=0.05)
    _, model = _pair(config)
    ids = torch.randint(3, 160, (1, prompt), generator=torch.Generator().manual_seed(9))
    kw = dict(max_new_tokens=1, do_sample=False, return_dict_in_generate=True, output_logits=True)
    one = model.generate(ids, **kw).logits[0]
    chunked = model.generate(ids, prefill_chunk_size=64, **kw).logits[0]
    assert float((one - chunked).abs().max()) <= 1e-4
    # a short turn into a warm cache is still read through the retriever
    cache = HeteroCache(config, config=model.config)
    model.generate(ids, max_new_tokens=1, do_sample=False, past_key_values=cache)
    seen = []
    search = type(cache.layers[0].layer.retriever).search

    def spy(self, *a, **k):
        seen.append(1)
        return search(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(cache.layers[0].layer.retriever), "search", spy)
        turn = torch.cat([ids, torch.randint(3, 160, (1, 9), generator=torch.Generator().manual_seed(10))], dim=1)
        model.generate(turn, max_new_tokens=1, do_sample=False, past_key_values=cache, prefill_chunk_size=64)
    assert seen, "a 9-token turn should attend the host tier through the retriever"
    cache.close()


def _spy_init(seen):
    init = HeteroCache.__init__

    def spy(self, hetero_config=None, *args, **kwargs):
        init(self, hetero_config, *args, **kwargs)
        seen.append(self.config)

    return spy


def test_hetero_cache_is_a_class_with_an_hf_style_constructor():
    from transformers import LlamaConfig
    from transformers.cache_utils import Cache

    cfg = LlamaConfig(**COMMON)
    with HeteroCache(config=cfg) as cache:
        assert isinstance(cache, HeteroCache) and isinstance(cache, Cache) and len(cache.layers) == 2
        assert cache.config == HeteroConfig()
    assert len(HeteroCache(EXACT, 3).layers) == 3 and len(HeteroCache(cfg).layers) == 2
    with pytest.raises(HeteroError, match="layer count"):
        HeteroCache(EXACT)
    with pytest.raises(HeteroError, match="HeteroConfig"):
        HeteroCache({"window": 4}, 2)


def test_progress_threshold_is_reachable_from_wrap(capsys):
    _, model = _pair()
    hetero.wrap(model, EXACT, progress_tokens=32)
    ids = torch.randint(3, 160, (1, 40), generator=torch.Generator().manual_seed(8))
    model.generate(ids, max_new_tokens=2, do_sample=False)
    assert "hetero prefill: 40 tokens" in capsys.readouterr().err


@pytest.mark.parametrize("retriever, extra", [("all", 40), ("ivf-group", 40), ("ivf-group", 150), ("exact", 40),
                                             ("lsh", 40), ("ivf", 150)])
def test_crop_returns_tiers_and_index_to_the_state_after_n_tokens(retriever, extra):
    """Append 300 tokens in one chunk and ``extra`` one by one, crop back to 310: the tiers hold exactly the first
    310 tokens of each sequence, the index as many host tokens, and the next step agrees with a cache that never
    saw the dropped ones (with 150, ivf-group's dropped keys had left its tail list for their lists)."""
    opts = {"min_train": 64} if retriever in ("ivf-group", "ivf") else {}
    cfg = HeteroConfig(window=16, sinks=2, retriever=retriever, budget=0.3, retriever_options=opts)
    gen = torch.Generator().manual_seed(9)
    k, v = torch.randn(2, 2, 300 + extra, 16, generator=gen), torch.randn(2, 2, 300 + extra, 16, generator=gen)
    a, b = LayerCache(cfg), LayerCache(cfg)
    a.append(k[:, :, :300], v[:, :, :300])
    b.append(k[:, :, :300], v[:, :, :300])
    for t in range(300, 300 + extra):
        a.append(k[:, :, t], v[:, :, t])
    for t in range(300, 310):
        b.append(k[:, :, t], v[:, :, t])
    a.crop([310, 310])
    a.wait_indexed()
    b.wait_indexed()
    for seq in range(2):
        ka, va = a.tokens(seq)
        assert torch.equal(ka, k[seq, :, :310]) and torch.equal(va, v[seq, :, :310])
    assert a.host_lengths() == b.host_lengths() == a.retriever.ntotal
    if retriever == "ivf-group":
        for x, y in zip(a.retriever._seqs, b.retriever._seqs):
            np.testing.assert_array_equal(x.count, y.count)
    q = torch.randn(2, 8, 16, generator=gen)
    attn = hetero.HeteroAttention(cfg)
    ra, rb = attn.run(q, a, return_details=True), attn.run(q, b, return_details=True)
    assert torch.equal(ra.selection.indices, rb.selection.indices)
    if retriever in ("all", "exact", "lsh", "ivf"):  # an index of counts, or one that removes its newest ids
        assert torch.equal(ra.out, rb.out)
    else:  # ivf-group's lists are the same; the sums of the lists that lost members are recomputed (rounding)
        torch.testing.assert_close(ra.out, rb.out, rtol=1e-5, atol=1e-6)


def _assert_decode_alike(cfg, a, b, gen, steps: int) -> None:
    """The same decode steps (1 sequence, 8 query / 2 KV heads, head_dim 32) on two layers give equal outputs."""
    attn = hetero.HeteroAttention(cfg)
    plan = attn.plan([a, b], 8)
    for _ in range(steps):
        q, kt, vt = torch.randn(1, 8, 32, generator=gen), torch.randn(1, 2, 32, generator=gen), torch.randn(
            1, 2, 32, generator=gen)
        assert torch.equal(attn.decode(q, kt, vt, a, plan), attn.decode(q, kt, vt, b, plan))


@pytest.mark.parametrize("retriever", ["ivf", "ivf-sq8", "ivf-group"])
@pytest.mark.parametrize("case", ["first_build", "retrain"])
def test_a_crop_below_the_last_index_build_returns_the_index_built_before(retriever, case):
    """Draft tokens that brought the host tier to a build (the first one, or a retrain at 4x the last) and were then
    rejected: the crop must not keep an index trained on them. ``first_build``: 56 host keys (min_train 64), a draft
    chunk brings 66 and builds, the crop goes back to 56: searched exactly again. ``retrain``: built on 100, 296
    decode tokens one by one, 12 drafts pass the 400 limit and retrain, the crop goes back to 396: the index built
    on 100 with the 296 added as decode steps add them. Every later step (through the retrain at 401) is bit for
    bit that of a cache that never saw the drafts."""
    cfg = HeteroConfig(window=4, sinks=0, budget=0.1, retriever=retriever, retriever_options={"min_train": 64})
    gen = torch.Generator().manual_seed(4)
    prompt, singles = (60, 0) if case == "first_build" else (104, 296)
    k, v = torch.randn(1, 2, prompt + singles + 12, 32, generator=gen), torch.randn(1, 2, prompt + singles + 12, 32,
                                                                                   generator=gen)
    a, b = LayerCache(cfg), LayerCache(cfg)
    for layer in (a, b):
        layer.append(k[:, :, :prompt], v[:, :, :prompt])
        for t in range(prompt, prompt + singles):
            layer.append(k[:, :, t], v[:, :, t])
    end = prompt + singles
    a.append(k[:, :, end:end + 12], v[:, :, end:end + 12])
    a.wait_indexed()
    assert a.retriever.trained_on[0] > b.retriever.trained_on[0]  # the drafts built (or rebuilt) a's index
    a.crop([end])
    assert a.retriever.builds == b.retriever.builds and a.retriever.ntotal == b.retriever.ntotal
    _assert_decode_alike(cfg, a, b, gen, steps=8)
    assert a.retriever.builds == b.retriever.builds


@pytest.mark.parametrize("retriever", ["ivf", "ivf-group"])
def test_a_crop_back_past_a_retrain_limit_rebuilds_where_decode_steps_would_have(retriever):
    """Built on 100 host keys, a 350-token chunk passes the retrain limit (400) and rebuilds on 450; cropped to 420
    host keys, the index is that of a cache that decoded them one by one: rebuilt on 401, not on 420."""
    cfg = HeteroConfig(window=4, sinks=0, budget=0.1, retriever=retriever, retriever_options={"min_train": 64})
    gen = torch.Generator().manual_seed(5)
    k, v = torch.randn(1, 2, 460, 32, generator=gen), torch.randn(1, 2, 460, 32, generator=gen)
    a, b = LayerCache(cfg), LayerCache(cfg)
    for layer in (a, b):
        layer.append(k[:, :, :104], v[:, :, :104])
    a.append(k[:, :, 104:454], v[:, :, 104:454])
    for t in range(104, 424):
        b.append(k[:, :, t], v[:, :, t])
    a.crop([424])
    assert a.retriever.builds == b.retriever.builds == [[100, 401]]
    _assert_decode_alike(cfg, a, b, gen, steps=4)


@needs_model
def test_smollm2_three_turn_chat_exact_and_turn_two_prefills_only_the_new_tokens(monkeypatch):
    from transformers import DynamicCache

    model, tok = smollm2.load()
    ref, _ = smollm2.load()
    hetero.wrap(model, HeteroConfig(window=64, sinks=4, retriever="all"))
    first = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                    add_generation_prompt=True, return_tensors="pt")
    first = getattr(first, "input_ids", first)
    turns = [first] + [tok(f"<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
                           return_tensors="pt", add_special_tokens=False).input_ids
                       for text in ("And of Italy?", "Which of the two is larger?")]
    with torch.no_grad():
        want = _chat(ref, DynamicCache(config=ref.config), turns, new_tokens=12)
        sizes = _record_chunks(monkeypatch)
        got = _chat(model, HeteroCache(model.hetero_config, config=model.config), turns, new_tokens=12)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    # turns 2 and 3 prefill only their own tokens and the previous turn's last one (never fed back)
    assert sizes == [turns[0].shape[1]] + [t.shape[1] + 1 for t in turns[1:]]


@needs_model
def test_smollm2_chunked_prefill_of_8k_matches_one_shot():
    from hetero.tools.workloads.real import corpus_text

    model, tok = smollm2.load()
    hetero.wrap(model, HeteroConfig(window=256, sinks=4, retriever="all"))
    ids = tok(corpus_text(), return_tensors="pt").input_ids[:, :8192]
    kw = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        one = model.generate(ids, **kw)
        cache = HeteroCache(model.hetero_config, config=model.config)
        chunked = model.generate(ids, prefill_chunk_size=1024, past_key_values=cache, **kw)
    assert torch.equal(one.sequences, chunked.sequences)
    assert max(float((a - b).abs().max()) for a, b in zip(one.logits, chunked.logits)) <= 1e-4
    per_token = 2 * 3 * 64 * 4
    assert cache.memory()["fast_peak_layer_bytes"] <= (1024 + 256 + 4) * per_token
    cache.close()


@needs_model
def test_smollm2_prompt_lookup_exact_matches_plain_hf():
    from hetero.tools.workloads.real import corpus_text

    model, tok = smollm2.load()
    ref, _ = smollm2.load()
    hetero.wrap(model, HeteroConfig(window=64, sinks=4, retriever="all"))
    ids = tok(corpus_text(), return_tensors="pt").input_ids[:, 2000:2600]
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=48, do_sample=False)
        got = model.generate(ids, max_new_tokens=48, do_sample=False, prompt_lookup_num_tokens=8)
    assert torch.equal(want, got)


@needs_model
@pytest.mark.slow
def test_chat_benchmark_rows_agree_with_dense_in_exact_mode(capsys):
    import json

    from hetero.tools.bench import chat

    assert chat.main(["--context", "600", "--chunk", "256", "--new-tokens", "3"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    exact = [r for r in rows if r["cache"] == "hetero-exact"]
    assert len(rows) == 9 and all(r["logits_max_diff"] <= 1e-4 for r in exact if r["row"] == "prefill")
    assert all(r["tokens_agree"] == r["tokens_compared"] for r in exact if r["row"] == "turn2")


def _prompt(n=30, batch=1, seed=1):
    return torch.randint(3, 160, (batch, n), generator=torch.Generator().manual_seed(seed))


def _held(cache):
    return [(lay.processed, lay.layer.tokens(0)[0].shape[1] if lay.layer.initialized else 0) for lay in cache.layers]


@pytest.mark.parametrize("when", ["prefill", "decode"])
def test_a_failure_in_a_later_layer_rolls_the_earlier_layers_back(when):
    """Layer 1 refuses its keys after layer 0 stored them: layer 0 forgets them, and the cache then serves the same
    call exactly (it had mixed layers holding different positions)."""
    ref, model = _pair()
    x = _prompt()
    cache = HeteroCache(EXACT, config=model.config)
    if when == "decode":
        model.generate(x, past_key_values=cache, max_new_tokens=1, do_sample=False)
        x = torch.cat([x, ref.generate(x, max_new_tokens=1, do_sample=False)[:, -1:]], dim=1)
    before = _held(cache)
    w = model.model.layers[1].self_attn.k_proj.weight
    saved = w.data.clone()
    with torch.no_grad():
        w[0, 0] = float("nan")
    with pytest.raises(hetero.InvalidValueError):
        model(x if when == "prefill" else x[:, -1:], past_key_values=cache, use_cache=True)
    assert _held(cache) == before
    with torch.no_grad():
        w.copy_(saved)
    got = model.generate(x, past_key_values=cache, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, ref.generate(x, max_new_tokens=4, do_sample=False))


def test_layers_left_out_of_step_outside_hetero_are_refused_with_the_fix():
    ref, model = _pair()
    cache = HeteroCache(EXACT, config=model.config)
    model.generate(_prompt(), past_key_values=cache, max_new_tokens=2, do_sample=False)
    cache.layers[1].crop(-1)  # as a failure after layer 0's step, outside hetero's attention, leaves them
    with pytest.raises(hetero.UnsupportedError, match=r"crop\(30\)"):
        model(_prompt(1, seed=2), past_key_values=cache, use_cache=True)
    cache.crop(30)
    model(_prompt(1, seed=2), past_key_values=cache, use_cache=True)


def test_a_forward_stopped_between_update_and_attention_is_repaired_by_the_crop_it_names(monkeypatch):
    """Layer 1's attention never ran after its update (an error in between): the crop the refusal names must be
    enough; the stale update made the next call fail once more."""
    ref, model = _pair()
    stop = {"at": None}

    def attention(module, *args, **kwargs):
        if stop["at"] == module.layer_idx:
            stop["at"] = None
            raise RuntimeError("stopped between the cache update and the attention")
        return hetero.hf.hetero_attention(module, *args, **kwargs)

    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, "hetero", attention)
    x = _prompt()
    cache = HeteroCache(EXACT, config=model.config)
    model(x, past_key_values=cache, use_cache=True)
    nxt = _prompt(3, seed=2)
    stop["at"] = 1
    with pytest.raises(RuntimeError, match="stopped"):
        model(nxt, past_key_values=cache, use_cache=True)
    with pytest.raises(hetero.UnsupportedError, match=r"crop\(30\)"):
        model(nxt, past_key_values=cache, use_cache=True)
    cache.crop(30)
    x = torch.cat([x, nxt], dim=1)
    got = model.generate(x, past_key_values=cache, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, ref.generate(x, max_new_tokens=4, do_sample=False))


def test_refused_output_attentions_leaves_the_cache_usable():
    ref, model = _pair()
    x = _prompt()
    cache = HeteroCache(EXACT, config=model.config)
    with pytest.raises(hetero.UnsupportedError, match="output_attentions"):
        model.generate(x, past_key_values=cache, max_new_tokens=2, do_sample=False, output_attentions=True,
                       return_dict_in_generate=True)
    assert cache.get_seq_length() == 0
    got = model.generate(x, past_key_values=cache, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, ref.generate(x, max_new_tokens=3, do_sample=False))


def test_beam_search_is_refused_before_the_prompt_goes_in():
    _, model = _pair()
    cache = HeteroCache(EXACT, config=model.config)
    for kwargs in ({}, {"past_key_values": cache}):
        with pytest.raises(hetero.UnsupportedError, match="beam search"):
            model.generate(_prompt(), num_beams=3, max_new_tokens=2, do_sample=False, **kwargs)
    assert cache.get_seq_length() == 0 and not cache.layers[0].layer.initialized


def test_another_batch_size_into_a_warm_cache_is_a_shape_error():
    _, model = _pair()
    cache = HeteroCache(EXACT, config=model.config)
    model.generate(_prompt(), past_key_values=cache, max_new_tokens=2, do_sample=False)
    before = _held(cache)
    with pytest.raises(hetero.ShapeError, match="2 sequences"):
        model(_prompt(5, batch=2), past_key_values=cache, use_cache=True)
    assert _held(cache) == before


def test_crop_into_the_left_padding_is_refused_and_copying_is_typed():
    _, model = _pair()
    ids = torch.cat([torch.zeros(1, 20, dtype=torch.long), _prompt(20, seed=3)], dim=1)
    ids = torch.cat([_prompt(40, seed=4), ids])
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    cache = HeteroCache(EXACT, config=model.config)
    model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    before = _held(cache)
    with pytest.raises(hetero.UnsupportedError, match="left padding"):
        cache.crop(-30)
    assert _held(cache) == before
    with pytest.raises(hetero.InvalidValueError, match="holds 40"):  # more than it holds: not a padding matter
        cache.crop(-45)
    assert _held(cache) == before
    cache.crop(-15)
    assert cache.get_seq_length() == 25
    with pytest.raises(hetero.UnsupportedError, match="copied"):
        copy.deepcopy(cache)


@pytest.mark.parametrize("chunk", [1, 2, 7, 16, 39, 41])
def test_chunked_prefill_of_a_batch_whose_padding_is_longer_than_a_chunk_matches_dense(chunk):
    ref, model = _pair()
    gen = torch.Generator().manual_seed(2)
    x, mask = torch.zeros(2, 60, dtype=torch.long), torch.zeros(2, 60, dtype=torch.long)
    x[0], mask[0] = torch.randint(3, 160, (60,), generator=gen), 1
    x[1, 40:], mask[1, 40:] = torch.randint(3, 160, (20,), generator=gen), 1  # 40 tokens of left padding
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    cache = HeteroCache(EXACT, config=model.config)
    assert torch.equal(model.generate(x, prefill_chunk_size=chunk, past_key_values=cache, **kw), ref.generate(x, **kw))
    assert [lay.pad for lay in cache.layers] == [[0, 40]] * 2


def test_a_failure_in_the_second_chunk_of_a_long_padded_prefill_rolls_back_and_the_retry_matches_dense():
    """A chunk that was padding for one sequence grows its pad; rolled back, the pad goes back with the tokens, so
    the same chunk is taken again."""
    ref, model = _pair()
    gen = torch.Generator().manual_seed(2)
    x, mask = torch.zeros(2, 60, dtype=torch.long), torch.zeros(2, 60, dtype=torch.long)
    x[0], mask[0] = torch.randint(3, 160, (60,), generator=gen), 1
    x[1, 40:], mask[1, 40:] = torch.randint(3, 160, (20,), generator=gen), 1
    cache = HeteroCache(EXACT, config=model.config)
    model(x[:, :16], attention_mask=mask[:, :16], past_key_values=cache, use_cache=True)
    before = [(lay.processed, list(lay.pad)) for lay in cache.layers]
    w = model.model.layers[1].self_attn.k_proj.weight
    saved = w.data.clone()
    with torch.no_grad():
        w[0, 0] = float("nan")
    with pytest.raises(hetero.InvalidValueError):
        model(x[:, 16:32], attention_mask=mask[:, :32], past_key_values=cache, use_cache=True)
    assert [(lay.processed, list(lay.pad)) for lay in cache.layers] == before
    with torch.no_grad():
        w.copy_(saved)
    for c0 in (16, 32, 48):
        out = model(x[:, c0:c0 + 16], attention_mask=mask[:, :c0 + 16], past_key_values=cache, use_cache=True)
    want = ref(x, attention_mask=mask).logits[:, -1]
    assert torch.allclose(out.logits[:, -1], want, atol=1e-4)


def test_a_shallow_copy_is_refused_as_a_copy_and_a_batch_repeated_once_is_left_as_it_is():
    _, model = _pair()
    cache = HeteroCache(EXACT, config=model.config)
    model(_prompt(12, seed=5), past_key_values=cache, use_cache=True)
    with pytest.raises(hetero.UnsupportedError, match="cannot be copied"):
        copy.copy(cache)
    cache.batch_repeat_interleave(1)
    assert cache.get_seq_length() == 12
    with pytest.raises(hetero.UnsupportedError, match="3 copies"):
        cache.batch_repeat_interleave(3)
    assert cache.get_seq_length() == 12


def test_a_query_gone_nan_in_a_layer_is_refused_naming_the_layer_and_the_step():
    _, model = _pair()
    cache = HeteroCache(EXACT, config=model.config)
    ids = _prompt(20, seed=6)
    model(ids, past_key_values=cache, use_cache=True)
    w = model.model.layers[1].self_attn.q_proj.weight
    saved = w.data.clone()
    with torch.no_grad():
        w[0, 0] = float("nan")
    try:
        with pytest.raises(hetero.InvalidValueError, match=r"^layer 1, decode step: q contains NaN"):
            model(ids[:, :1], past_key_values=cache, use_cache=True)
        with pytest.raises(hetero.InvalidValueError, match=r"^layer 1, 3-token chunk: "):
            model(ids[:, :3], past_key_values=cache, use_cache=True)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert cache.get_seq_length() == 20


def test_a_hetero_config_saved_with_the_generation_config_is_the_one_generate_uses(tmp_path, monkeypatch):
    """``generation_config.hetero_config`` survives ``save_pretrained`` / ``from_pretrained`` (transformers wrote
    null for it before); a loaded one builds the cache generate() uses, and a malformed one is refused by name. (A
    generation config derived from the model's config, ``_from_model_config``, drops every key transformers does
    not know when loaded: transformers' rule, for hetero's key as for any other.)"""
    from transformers import GenerationConfig

    config = HeteroConfig(window=8, sinks=2, budget=5, retriever="exact", dense_layers=(1,),
                          retriever_options={})
    for other in (config, HeteroConfig(budget=1.0, kv_dtype="bf16", dense_layers=(3, 1), overlap=False, scale=0.125,
                                       budget_floor=0.01, retriever="ivf", retriever_options={"nlist": 64}),
                  HeteroConfig(budget=2 ** 53)):
        assert HeteroConfig.from_dict(json.loads(json.dumps(other.to_dict()))) == other
    _, model = _pair()
    saved = GenerationConfig(max_new_tokens=2, do_sample=False)
    saved.hetero_config = config
    saved.save_pretrained(tmp_path)
    loaded = GenerationConfig.from_pretrained(tmp_path)
    assert loaded.hetero_config == config.to_dict()
    built = []
    original = HeteroCache.__init__

    def spy(self, hetero_config=None, *args, **kwargs):
        built.append(hetero_config)
        original(self, hetero_config, *args, **kwargs)

    monkeypatch.setattr(HeteroCache, "__init__", spy)
    ids = torch.randint(3, 160, (1, 20), generator=torch.Generator().manual_seed(10))
    model.generate(ids, generation_config=loaded)
    assert built == [config]
    loaded.hetero_config = dict(config.to_dict(), windw=8)
    with pytest.raises(HeteroError, match=r"unknown HeteroConfig field\(s\) \['windw'\]"):
        model.generate(ids, generation_config=loaded, max_new_tokens=2, do_sample=False)
    loaded.hetero_config = "exact"
    with pytest.raises(HeteroError, match="must be a hetero.HeteroConfig"):
        model.generate(ids, generation_config=loaded, max_new_tokens=2, do_sample=False)
