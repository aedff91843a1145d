"""The fast tier on a GPU: Triton kernels against float64, the pinned host tier, overlapped steps bit-identical to
sequential ones, evictions under concurrent steps, a wrapped Llama in exact mode, and a decode step without a host
sync. Every test here needs CUDA (marker ``cuda``; skipped with the reason elsewhere, run by
benchmarks/gpu_check.py)."""
import copy
import random
import threading

import pytest
import torch

from hetero import HeteroAttention, HeteroConfig, LayerCache, PartialAttention, merge
from hetero.reference import window_attention as ref_window
from hetero.worker import Worker

from helpers import oracle, rel_err

pytestmark = pytest.mark.cuda
DEV = "cuda"
# vs float64 over the same stored values: fp32 dots are IEEE; bf16/fp16 tiles use tensor cores with the query
# rounded to the KV dtype (its relative error, ~2^-8 / 2^-11, bounds the output's)
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
LENGTHS = [0, 1, 63, 64, 65, 113, 4097]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("hkv,g,d", [(2, 1, 64), (1, 3, 128), (8, 4, 128), (2, 8, 80), (3, 7, 256)], ids=str)
def test_triton_window_kernel_on_the_gpu_matches_float64(dtype, hkv, g, d):
    from hetero.gpu.triton_window import window_decode

    gen = torch.Generator().manual_seed(hkv * 100 + g)
    slots = max(LENGTHS) + 5
    k = torch.randn(len(LENGTHS), hkv, slots, d, generator=gen).to(dtype)
    v = torch.randn(len(LENGTHS), hkv, slots, d, generator=gen).to(dtype)
    k[:, :, max(LENGTHS):] = float("nan")  # beyond every length: must never reach the output
    q = 2 * torch.randn(len(LENGTHS), hkv * g, d, generator=gen)
    lengths = torch.tensor(LENGTHS)
    want = ref_window(q.double(), k.double(), v.double(), lengths, compute_dtype=torch.float64)
    for splits in (0, 1, 5):
        got = window_decode(q.to(DEV), k.to(DEV), v.to(DEV), lengths.to(DEV), d ** -0.5, splits=splits)
        out, lse = got.out.cpu(), got.lse.cpu()
        assert torch.equal(torch.isneginf(lse), torch.isneginf(want.lse))
        assert torch.isfinite(out).all()
        assert rel_err(out, want.out) <= TOL[dtype], splits
        fin = torch.isfinite(want.lse)
        assert torch.allclose(lse.double()[fin], want.lse[fin], atol=10 * TOL[dtype])


def test_triton_merge_on_the_gpu_matches_the_reference_with_edge_cases():
    from hetero.merge import merge_reference

    gen = torch.Generator().manual_seed(2)
    parts = [PartialAttention(torch.randn(3, 5, 128, generator=gen), 30 * torch.randn(3, 5, generator=gen))
             for _ in range(3)]
    special = torch.full((3, 5), float("-inf"))
    special[0, :4] = torch.tensor([float("inf"), 1e4, -1e4, 0.0])
    parts.append(PartialAttention(torch.randn(3, 5, 128, generator=gen), special))
    parts.append(PartialAttention.empty(3, 5, 128))
    want = merge_reference(parts, torch.float64)
    got = merge([PartialAttention(p.out.to(DEV), p.lse.to(DEV)) for p in parts])
    assert got.out.device.type == "cuda"
    out, lse = got.out.cpu(), got.lse.cpu()
    assert not torch.isnan(out).any() and torch.allclose(out.double(), want.out, atol=1e-6)
    assert torch.equal(torch.isinf(lse), torch.isinf(want.lse))
    fin = torch.isfinite(want.lse)
    assert torch.allclose(lse.double()[fin], want.lse[fin], rtol=1e-6)


def _layer(retriever="all", tokens=700, batch=2, window=64, indexer=None, dtype=torch.bfloat16, device=DEV):
    options = {"min_train": 64} if retriever == "ivf-group" else {}
    cfg = HeteroConfig(window=window, sinks=4, budget=64, retriever=retriever, retriever_options=options)
    layer = LayerCache(cfg, indexer=indexer)
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(batch, 2, tokens, 64, generator=gen).to(dtype)
    v = torch.randn(batch, 2, tokens, 64, generator=gen).to(dtype)
    layer.append(k.to(device), v.to(device), [tokens - 91 * b for b in range(batch)])
    layer.wait_indexed()
    return cfg, layer


def test_tiered_cache_on_the_gpu_pins_its_host_tier_and_holds_what_a_cpu_cache_holds():
    _, on_gpu = _layer(device=DEV)
    _, on_cpu = _layer(device="cpu")
    assert on_gpu.fast.k.device.type == "cuda" and on_gpu.host.kv_pool.is_pinned()
    gen = torch.Generator().manual_seed(3)
    for _ in range(70):  # decode tokens push window tokens into the host tier through the eviction stage
        k, v = torch.randn(2, 2, 64, generator=gen).bfloat16(), torch.randn(2, 2, 64, generator=gen).bfloat16()
        on_gpu.append(k.to(DEV), v.to(DEV))
        on_cpu.append(k, v)
    assert on_gpu.host_lengths() == on_cpu.host_lengths() and on_gpu.seq_lengths() == on_cpu.seq_lengths()
    for seq in range(2):
        for a, b in zip(on_gpu.tokens(seq), on_cpu.tokens(seq)):
            assert torch.equal(a.cpu(), b)
    on_gpu.crop([500, 300])
    on_cpu.crop([500, 300])
    for seq in range(2):
        for a, b in zip(on_gpu.tokens(seq), on_cpu.tokens(seq)):
            assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("retriever", ["all", "ivf-group", "ivf"])
def test_overlapped_gpu_steps_are_bit_identical_to_sequential_ones(retriever):
    cfg, layer = _layer(retriever)
    side, alone = HeteroAttention(cfg.with_(overlap=True)), HeteroAttention(cfg.with_(overlap=False))
    gen = torch.Generator().manual_seed(4)
    for _ in range(20):
        q = torch.randn(2, 8, 64, generator=gen).bfloat16().to(DEV)
        a, b = side.run(q, layer), alone.run(q, layer)
        assert torch.equal(a, b)
        if retriever == "all":
            assert rel_err(a.float().cpu(), oracle(q.float().cpu(), layer)) <= TOL[torch.bfloat16]
    side.close()
    alone.close()


def test_evictions_under_concurrent_steps_are_never_lost_or_duplicated():
    """Two layers decoded from two threads, a background indexer with random delays: every host token is indexed
    once, and the exact retriever's output equals the float64 oracle at every step."""
    indexer = Worker("cuda-test-indexer")
    layers = [_layer("all", indexer=indexer)[1] for _ in range(2)]
    attn = HeteroAttention(layers[0].config)
    errors = []

    def decode(layer, seed):
        gen, rnd = torch.Generator().manual_seed(seed), random.Random(seed)
        try:
            for _ in range(60):
                k, v = torch.randn(2, 2, 64, generator=gen).bfloat16(), torch.randn(2, 2, 64, generator=gen).bfloat16()
                if rnd.random() < 0.3:
                    indexer.submit(lambda: threading.Event().wait(rnd.random() * 0.003))
                layer.append(k.to(DEV), v.to(DEV))
                q = torch.randn(2, 8, 64, generator=gen).bfloat16().to(DEV)
                out = attn.run(q, layer)
                assert rel_err(out.float().cpu(), oracle(q.float().cpu(), layer)) <= TOL[torch.bfloat16]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=decode, args=(layer, i)) for i, layer in enumerate(layers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for layer in layers:
        layer.wait_indexed()
        assert layer.retriever.ntotal == layer.host_lengths()
    attn.close()
    indexer.close()


def test_wrapped_tiny_llama_on_the_gpu_in_exact_mode_decodes_the_tokens_of_sdpa():
    transformers = pytest.importorskip("transformers")
    import hetero

    cfg = transformers.LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval().to(DEV)
    model = transformers.LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    model.load_state_dict({k: v.cpu() for k, v in ref.state_dict().items()})
    model = hetero.wrap(model.to(DEV), hetero.HeteroConfig(window=8, sinks=2, retriever="all"))
    ids = torch.randint(3, 160, (1, 50), generator=torch.Generator().manual_seed(1)).to(DEV)
    kw = dict(max_new_tokens=40, do_sample=False)
    assert torch.equal(ref.generate(ids, **kw), model.generate(ids, **kw))


@pytest.mark.parametrize("retriever", ["ivf-group", "all"])
def test_a_gpu_decode_step_makes_no_host_sync(retriever):
    """After warm-up, append + plan + run of three layers under torch.cuda.set_sync_debug_mode("error"): any
    .item(), int(t), .cpu() or blocking copy of a device tensor inside the step raises. (Waiting on the query copy's
    event, the one host wait of the step, is not such a sync.)"""
    layers = [_layer(retriever)[1] for _ in range(3)]
    attn = HeteroAttention(layers[0].config)
    gen = torch.Generator().manual_seed(5)
    new = [[(torch.randn(2, 2, 64, generator=gen).bfloat16().to(DEV), torch.randn(2, 2, 64, generator=gen)
             .bfloat16().to(DEV), torch.randn(2, 8, 64, generator=gen).bfloat16().to(DEV)) for _ in layers]
           for _ in range(12)]

    def step(tokens):
        for layer, (k, v, _) in zip(layers, tokens):
            layer.append(k, v)
        plan = attn.plan(layers, 8, torch.bfloat16)
        return [attn.run(q, layer, plan, out=attn.output(plan, layer)) for layer, (_, _, q) in zip(layers, tokens)]

    for tokens in new[:4]:
        step(tokens)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for tokens in new[4:]:
            step(tokens)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    attn.close()
