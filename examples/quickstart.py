"""The README's Python API example: a Llama-3-8B layer, a 16K prompt, one decode step with its details."""
import hetero  # first: it sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP

import torch

B, Hq, Hkv, D = 1, 32, 8, 128                          # Llama-3-8B layer geometry
config = hetero.HeteroConfig(window=1024, sinks=4, budget=0.02, retriever="exact", kv_dtype="bf16")
layer = hetero.LayerCache(config)                       # one layer's tiered KV cache

prompt_k = torch.randn(B, Hkv, 16384, D)                # post-RoPE keys   [B, Hkv, T, D]
prompt_v = torch.randn(B, Hkv, 16384, D)                # values           [B, Hkv, T, D]
layer.append(prompt_k, prompt_v)                        # sinks + window stay fast, the rest goes to host

attn = hetero.HeteroAttention(config)
layer.append(torch.randn(B, Hkv, D), torch.randn(B, Hkv, D))  # the new token's k, v  [B, Hkv, D]
q = torch.randn(B, Hq, D)                               # decode query     [B, Hq, D]
result = attn.run(q, layer, return_details=True)        # out [B, Hq, D] in q's dtype
print(result.out.shape, {k: round(v, 2) for k, v in result.timings_ms.items()}, layer.memory())
