"""``hetero bench e2e``'s interleaved decodes: one step of each run per round changes no run's tokens, and each
run is attended by the implementation it names (hetero's attention only for the HeteroCache)."""
import pytest
import torch

import hetero
from hetero import HeteroConfig

transformers = pytest.importorskip("transformers")
import hetero.hf  # noqa: E402  (registers "hetero")
from hetero.tools.bench import e2e  # noqa: E402

EXACT = HeteroConfig(window=8, sinks=2, retriever="all")
PROMPT, STEPS, WARMUP = 40, 6, 2


def _model_and_prompt():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    prefill = transformers.DynamicCache(config=model.config)
    ids = torch.randint(0, 160, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids, past_key_values=prefill).logits
    kv = [(layer.keys, layer.values) for layer in prefill.layers]
    return model, kv, logits[:, -1].argmax(-1, keepdim=True)


def _runs(model, kv, first):
    return {"dense": e2e.Decoding(e2e._dynamic_cache(model, kv), first, "sdpa"),
            "static": e2e.Decoding(e2e._static_cache(model, kv, PROMPT + STEPS + WARMUP + 1), first, "sdpa"),
            "hetero": e2e.Decoding(e2e._hetero_cache(model, kv, EXACT), first, hetero.hf.ATTN_NAME)}


def test_interleaved_decodes_give_each_run_the_tokens_it_gives_alone(monkeypatch):
    model, kv, first = _model_and_prompt()
    hetero.wrap(model, EXACT)
    seen, forward = [], model.forward

    def spy(*args, **kwargs):  # the implementation each cache's step ran under
        seen.append((type(kwargs["past_key_values"]).__name__, model.config._attn_implementation))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    runs = _runs(model, kv, first)
    together = e2e._decode_interleaved(model, runs, STEPS, WARMUP)
    runs["hetero"].cache.close()
    assert sorted(set(seen)) == [("DynamicCache", "sdpa"), ("HeteroCache", "hetero"), ("StaticCache", "sdpa")]
    assert [s[0] for s in seen[:6]] == ["DynamicCache", "StaticCache", "HeteroCache",  # the order rotates
                                        "StaticCache", "HeteroCache", "DynamicCache"]
    for name, run in _runs(model, kv, first).items():
        alone = e2e._decode_interleaved(model, {name: run}, STEPS, WARMUP)[name]
        if name == "hetero":
            run.cache.close()
        assert together[name]["tokens"].shape == (1, STEPS + WARMUP)
        assert torch.equal(alone["tokens"], together[name]["tokens"]), name
        assert len(together[name]["step_ms"]) == STEPS
    # exact mode: hetero decodes what dense SDPA decodes
    assert torch.equal(together["hetero"]["tokens"], together["dense"]["tokens"])
    hetero.unwrap(model)


def test_a_row_reports_its_figures_and_leaves_the_model_as_it_came(monkeypatch):
    model, kv, first = _model_and_prompt()
    seen, forward = [], model.forward

    def spy(*args, **kwargs):  # the dense run: a DynamicCache holding the prompt (the floor's holds 16 tokens)
        cache = kwargs["past_key_values"]
        seen.append(type(cache).__name__ == "DynamicCache" and cache.get_seq_length() >= PROMPT)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    row = e2e._row("tiny", model, kv, first, EXACT, STEPS, WARMUP, torch.float32, "test", agree=True)
    rounds = STEPS + WARMUP  # static, floor and hetero interleaved, then the dense decode alone
    assert seen == [False] * 3 * rounds + [True] * rounds
    assert row["tokens_agree"] == row["tokens_compared"] == STEPS + WARMUP  # exact mode decodes what dense does
    assert row["context"] == PROMPT and row["batch"] == 1 and row["interleaved"]
    for key in ("tokens_per_s_dense", "tokens_per_s_static", "tokens_per_s_hetero", "floor_step_ms"):
        assert row[key] > 0, key
    best = max(row["tokens_per_s_dense"], row["tokens_per_s_static"])
    assert row["ratio"] == pytest.approx(row["tokens_per_s_hetero"] / best, rel=1e-2)
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(model, name) for name in ("hetero_config", "_hetero_previous_attn"))


def test_a_row_that_fails_leaves_the_model_unwrapped(monkeypatch):
    model, kv, first = _model_and_prompt()

    def no_room(*args):
        raise MemoryError("no room for the static cache")

    monkeypatch.setattr(e2e, "_static_cache", no_room)
    with pytest.raises(MemoryError):
        e2e._row("tiny", model, kv, first, EXACT, STEPS, WARMUP, torch.float32, "test")
    assert model.config._attn_implementation == "sdpa" and not hasattr(model, "hetero_config")
