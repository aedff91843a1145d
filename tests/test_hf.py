"""HuggingFace integration: exact mode reproduces the model's own SDPA + DynamicCache decoding."""
import copy

import pytest
import torch

import hetero
from hetero.errors import UnsupportedError
from hetero.hf import UnsupportedModelError, unsupported_features
from hetero.tools.workloads import smollm2

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)


MOE = dict(num_experts_per_tok=2, moe_intermediate_size=64)
# architecture -> (config class, model class, what the tiny config sets beyond COMMON): the features around the
# attention that these tests exercise (qk-norm, partial rotary, no-RoPE layers, attention multipliers, MoE)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=None, partial_rotary_factor=0.5, pad_token_id=0,
                                                   bos_token_id=1, eos_token_id=2)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=16)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(rotary_pct=0.5)),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(partial_rotary_factor=0.25)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(attention_multiplier=0.3, embedding_multiplier=2.0,
                                                             residual_multiplier=0.5, logits_scaling=2.0)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(use_qk_norm=True)),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(sliding_window=None)),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(no_rope_layer_interval=2, pad_token_id=0, bos_token_id=1,
                                                            eos_token_id=2)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2,
                                                             sliding_window=None)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(MOE, num_experts=4,
                                                                 shared_expert_intermediate_size=64)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(MOE, num_experts=4, head_dim=16)),
}


def _configs():
    return {arch: (getattr(transformers, cfg)(**COMMON, **extra), cls) for arch, (cfg, cls, extra) in ARCHS.items()}


def _pair(arch, config=None):
    cfg, cls_name = _configs()[arch]
    cls = getattr(transformers, cls_name)
    torch.manual_seed(0)
    ref = cls._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    model = cls._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    model.load_state_dict(ref.state_dict())
    return ref, hetero.wrap(model, config or hetero.HeteroConfig(window=8, sinks=2, retriever="all"))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_exact_mode_greedy_tokens_and_logits_match_sdpa(arch):
    """Every architecture hetero accepts: exact mode decodes what the model's own SDPA + DynamicCache decode."""
    from hetero.hf import SUPPORTED_MODEL_TYPES

    assert set(SUPPORTED_MODEL_TYPES) == set(ARCHS)  # an architecture is accepted once it is tested here
    ref, model = _pair(arch)
    ids = torch.randint(3, 160, (1, 50), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=64, do_sample=False, return_dict_in_generate=True, output_logits=True)
    a, b = ref.generate(ids, **kw), model.generate(ids, **kw)
    assert torch.equal(a.sequences, b.sequences)
    worst = max(float((x - y).abs().max()) for x, y in zip(a.logits, b.logits))
    assert worst <= 1e-4, worst


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_left_padded_batch_matches_each_sequence_alone(arch):
    _, model = _pair(arch)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 160, (n,), generator=gen) for n in (30, 17, 41)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=24, do_sample=False, pad_token_id=0)
        assert torch.equal(batch[i, width:], alone[0, len(p):]), i


def test_sampling_and_streaming_work_unchanged():
    from transformers import TextStreamer

    _, model = _pair("llama")
    ids = torch.randint(3, 160, (1, 20))

    class Tok:  # minimal tokenizer for TextStreamer
        def decode(self, tokens, **kw):
            return " ".join(map(str, tokens))

    chunks = []

    class Collect(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            chunks.append(text)

    torch.manual_seed(3)
    out = model.generate(ids, max_new_tokens=12, do_sample=True, top_k=20, streamer=Collect(Tok()))
    assert out.shape == (1, 32) and "".join(chunks).strip()


def test_cache_reports_logical_length_and_tier_bytes():
    _, model = _pair("llama", hetero.HeteroConfig(window=8, sinks=2, retriever="exact", budget=4))
    ids = torch.randint(3, 160, (1, 60))
    cache = hetero.hf.HeteroCache(model.hetero_config, 2)
    model.generate(ids, max_new_tokens=5, do_sample=False, past_key_values=cache)
    assert cache.get_seq_length() == 64  # 60 prompt + 4 decoded tokens fed back
    mem = cache.memory()
    per_token = 2 * 16 * 4 * 2  # Hkv * D * fp32 * (k, v)
    assert mem["fast_bytes"] == 2 * 10 * per_token  # 2 layers x (sinks + window)
    assert mem["host_bytes"] == 2 * (64 - 10) * per_token


def test_unsupported_models_are_refused_with_the_feature_named():
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    cases = [
        (Gemma2Config(**COMMON, head_dim=16), "soft-capping"),
        (MistralConfig(**COMMON, sliding_window=64), "sliding-window"),
        (Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=32, max_window_layers=0), "sliding-window"),
        (LlamaConfig(**COMMON, add_cross_attention=True), "cross-attention"),
    ]
    for cfg, needle in cases:
        assert any(needle in r for r in unsupported_features(cfg)), (cfg.model_type, unsupported_features(cfg))
    nothing_slides = [MistralConfig(**COMMON, sliding_window=512),  # a window as long as the model's positions
                      Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=32, max_window_layers=2)]
    for cfg in nothing_slides:
        assert unsupported_features(cfg) == [], unsupported_features(cfg)
    lm_head_cap = Gemma2Config(**COMMON, head_dim=16, attn_logit_softcapping=None, final_logit_softcapping=30.0)
    assert not any("soft-capping" in r for r in unsupported_features(lm_head_cap))  # on the logits, not attention
    t5 = transformers.T5Config(d_model=32, num_layers=1, num_heads=2, d_kv=16, d_ff=64, vocab_size=100)
    assert any("encoder-decoder" in r for r in unsupported_features(t5))
    model = transformers.MistralForCausalLM._from_config(MistralConfig(**COMMON, sliding_window=64))
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        hetero.wrap(model)



def test_a_mask_with_holes_is_refused_before_anything_is_stored():
    """A HeteroCache attends every stored token, so a mask that leaves out more than the first prompt's left padding
    (a hole in the prompt, right padding, a cached token masked in a later turn) is refused, not ignored."""
    _, model = _pair("llama")
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 160, (2, 40), generator=gen)
    hole = torch.ones(2, 40, dtype=torch.long)
    hole[1, 20] = 0
    right = torch.ones(2, 40, dtype=torch.long)
    right[0, 35:] = 0
    for mask, where in ((hole, "position 20 of sequence 1"), (right, "position 35 of sequence 0")):
        cache = hetero.hf.HeteroCache(model.hetero_config, config=model.config)
        with pytest.raises(UnsupportedError, match=f"attention mask leaves out {where} in some head"):
            model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=4, do_sample=False,
                           pad_token_id=0)
        assert cache.get_seq_length() == 0
    cache = hetero.hf.HeteroCache(model.hetero_config, config=model.config)
    first = model.generate(ids, past_key_values=cache, max_new_tokens=4, do_sample=False, pad_token_id=0)
    stored = cache.get_seq_length()
    turn2 = torch.cat([first, torch.randint(3, 160, (2, 5), generator=gen)], dim=1)
    mask = torch.ones_like(turn2)
    mask[0, 10] = 0  # a cached token
    with pytest.raises(UnsupportedError, match="attention mask leaves out position 10 of sequence 0"):
        model.generate(turn2, attention_mask=mask, past_key_values=cache, max_new_tokens=4, do_sample=False,
                       pad_token_id=0)
    assert cache.get_seq_length() == stored


def test_a_later_turn_whose_mask_attends_the_first_prompts_padding_is_told_to_pass_the_whole_mask():
    """The second turn of a left-padded batch given only its ids: transformers attends everything, the padding of
    the first prompt included, which the cache never stored."""
    _, model = _pair("llama")
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 160, (2, 30), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    cache = hetero.hf.HeteroCache(model.hetero_config, config=model.config)
    first = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=3, do_sample=False,
                           pad_token_id=0)
    stored = cache.get_seq_length()
    turn2 = torch.cat([first, torch.randint(3, 160, (2, 4), generator=gen)], dim=1)
    with pytest.raises(UnsupportedError, match="attends sequence 1's left padding .*first 6 positions.*whole "
                                               "conversation"):
        model.generate(turn2, past_key_values=cache, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert cache.get_seq_length() == stored

def test_plain_forward_with_dynamic_cache_still_exact():
    ref, model = _pair("llama")
    ids = torch.randint(3, 160, (2, 30))
    assert torch.allclose(ref(ids).logits, model(ids).logits, atol=1e-5)


@pytest.mark.skipif(not smollm2.available(), reason=f"SmolLM2 not installed ({smollm2.INSTALL_HINT})")
def test_smollm2_exact_mode_real_prompt_matches_dense_for_128_tokens():
    from hetero.tools.workloads.real import corpus_text

    model, tok = smollm2.load()
    ref, _ = smollm2.load()
    text = corpus_text()
    ids = tok(text, return_tensors="pt").input_ids[:, 6000:8100]  # a 2100-token passage of real prose
    hetero.wrap(model, hetero.HeteroConfig(window=128, sinks=4, retriever="all"))
    with torch.no_grad():
        dense = ref.generate(ids, max_new_tokens=128, do_sample=False)
        mine = model.generate(ids, max_new_tokens=128, do_sample=False)
    assert torch.equal(dense, mine)


def test_generate_does_not_leak_indexer_threads():
    import threading

    _, model = _pair("llama")
    ids = torch.randint(3, 160, (1, 20))
    model.generate(ids, max_new_tokens=2, do_sample=False)
    before = threading.active_count()
    for _ in range(5):
        model.generate(ids, max_new_tokens=2, do_sample=False)
    assert threading.active_count() <= before


@pytest.mark.skipif(hetero.native.load() is None, reason="C++ extension not built")
def test_decode_steps_take_the_one_native_call(monkeypatch):
    """The cache's runtime carries the model's softmax scale (a config equal to the layers' but another object): each
    decode token's append and step is still one native call, never the two-call general path."""
    from hetero.attention import HeteroAttention

    config = hetero.HeteroConfig(window=8, sinks=2, budget=8, retriever="ivf-group",
                                 retriever_options={"min_train": 16})
    _, model = _pair("llama", config)
    fallbacks, general = [], HeteroAttention._append_then_run
    monkeypatch.setattr(HeteroAttention, "_append_then_run",
                        lambda self, *args: fallbacks.append(1) or general(self, *args))
    ids = torch.randint(3, 160, (1, 60), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True)
    one = model.generate(ids, **kw)
    assert one.sequences.shape == (1, 68)
    # 7 decode steps x 2 layers; only the first step's layers may take the general path, which waits for the
    # prompt's index still being built in the background
    assert len(fallbacks) <= 2, len(fallbacks)
    # and it decodes what the general path (append, then the step) decodes, bit for bit
    monkeypatch.setattr(HeteroAttention, "decode", lambda self, q, k, v, layer, plan, out=None:
                        self._append_then_run(q, k, v, layer, plan, out))
    two = model.generate(ids, **kw)
    assert torch.equal(one.sequences, two.sequences)
    assert all(torch.equal(x, y) for x, y in zip(one.logits, two.logits))
