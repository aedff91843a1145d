"""HuggingFace integration: exact mode reproduces the model's own SDPA + DynamicCache decoding."""
import copy

import pytest
import torch

import hetero
from hetero.hf import UnsupportedModelError, unsupported_features
from hetero.tools.workloads import smollm2

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)


def _configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    return {
        "llama": (LlamaConfig(**COMMON), "LlamaForCausalLM"),
        "mistral": (MistralConfig(**COMMON, sliding_window=None), "MistralForCausalLM"),
        "qwen2": (Qwen2Config(**COMMON), "Qwen2ForCausalLM"),
        "qwen3": (Qwen3Config(**COMMON, head_dim=16), "Qwen3ForCausalLM"),
    }


def _pair(arch, config=None):
    cfg, cls_name = _configs()[arch]
    cls = getattr(transformers, cls_name)
    torch.manual_seed(0)
    ref = cls._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    model = cls._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    model.load_state_dict(ref.state_dict())
    return ref, hetero.wrap(model, config or hetero.HeteroConfig(window=8, sinks=2, retriever="all"))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_exact_mode_greedy_tokens_and_logits_match_sdpa(arch):
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
    t5 = transformers.T5Config(d_model=32, num_layers=1, num_heads=2, d_kv=16, d_ff=64, vocab_size=100)
    assert any("encoder-decoder" in r for r in unsupported_features(t5))
    model = transformers.MistralForCausalLM._from_config(MistralConfig(**COMMON, sliding_window=64))
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        hetero.wrap(model)


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
