"""``ivf-group``: an IVF index over 4-bit (or 8-bit) key codes whose probed lists are read once per GQA group.

faiss's IVF scans a list once per query; the G query heads of a KV head share their keys, so here every
list probed by any of them is read once and scored against all G (hetero's C++ kernel, ``csrc/ivf_*``), and
each query head keeps its exact top-k over every row scanned for the group. Per (sequence, KV head):

* Coarse quantizer: spherical k-means (faiss ``Kmeans``, 10 iterations, <= 32 training points per list),
  ``nlist`` = the power of two nearest ``6 sqrt(N)`` within [16, 1024], keys assigned by inner product with the
  trained centroids (kept as float16; fixed until a rebuild, so a key's list does not depend on how the tokens
  were cut into adds), in one native call over the runner's threads (``Runner.ivf_assign``).
* Codes: per-dimension min/max of the keys it was built on, ``code_bits`` (8 or 4) per dimension, uniform
  levels (``Dp`` = ``D`` rounded up to 16, or 32 for 4 bits; a key is ``Dp * code_bits / 8`` bytes plus a 4-byte
  host position; 4-bit codes pack dimension ``j`` and ``j + Dp / 2`` into byte ``j``). A query is pre-scaled and
  quantized to int8 (``QueryCodes``) so that ``q . key`` ~= a per-query constant + ``qscale * (qi . codes)``; the
  constant does not change a query's ranking, and the integer dot product (``vpdpbusd`` with AVX-512 VNNI) keeps
  the scan near the memory rate. Keys added later outside the range are clamped to it. 4-bit codes halve the
  bytes a search reads for a little accuracy (docs/performance.md, "Retrievers on real attention"). The arena
  stores rows in blocks of 16, transposed by 4-byte groups (``block_rows``), so one vector instruction scores
  16 rows against a broadcast query group with no horizontal sums.
* Recent keys: a decode step's evicted keys go to a tail list that every search scans, and are assigned to
  their lists (one batched centroid search) every ``TAIL_TOKENS`` (64) tokens; assigning each token on its
  own read all centroids (2 MB at 1024 lists x 8 heads x D 128) every step. The flush is two native calls (the
  assignment, then the rows and list statistics, ``Runner.ivf_tail_flush``): ~2 ms at 1024 lists x 8 heads on
  two threads with warm caches, inline in the decode step that has it. Each layer flushes at its own phase
  (``codes.flush_phase``), so a model's layers do not all flush on the same token.
* Lists live in segments of one code arena with spare room (1/16 + 1 rows per list rounded up to a block of
  16); a list that fills up moves to the end of the rows in use with twice the room, so a decode step's add is
  O(1). The arena reserves address space for 4x the rows it holds, backed by memory where rows are handed out
  (as the host tier's pool), so it is rarely copied. ``memory_bytes`` counts the rows handed out, the centroids
  and the list statistics: 1.34x ``bytes_per_token`` at 128K tokens per head and head_dim 128, 4-bit (the rows
  alone 1.13x), 3.32x at 8K (1.52x; lists of ~16 keys padded to blocks of 16, and 2 x 512 lists x D floats of
  statistics).
* Probing: each query head ranks the non-empty lists by ``q . centroid`` and takes ``nprobe = ceil(nlist *
  min(1, probe_factor * sqrt(k / N)))``, the same rule as the faiss IVF retrievers; the group scans the union.
  Lists a crop emptied are skipped (they keep their centroids), so a query whose best lists held only cropped
  keys still scans its nprobe best lists that hold any (``nlist`` in the rule still counts the empty ones: after a
  deep crop a query scans a larger share of the lists that hold keys).
* Training, retraining and probing follow ``retrieval/ivf_rules.py`` (shared with the faiss IVF retrievers):
  built on the first add that brings ``min_train`` keys (exact scan before that, whose estimate of the rows it
  leaves out is exact), rebuilt from the host tier when it holds ``retrain_factor`` times the keys it was built on.
* Group rules: ``union`` (of the per-head top-k sets), ``per-head`` (the same rows, each head attends only
  its own top-k), ``sum`` (one search with the group's summed query).
* List statistics: each list keeps the sum of its members' keys and values; ``centroids_t`` holds each list's unit
  mean direction (float16; what probing ranks by; the trained centroids only assign new keys), and the mean
  key's norm and the mean value (bfloat16) sit beside it.
* Estimate of the rest (``estimate=True``, the default): the host tokens a search does not select still carry
  attention mass, and dropping them renormalizes the softmax over the selected ones. The search returns, with its
  Selection, attention over the unselected tokens estimated per list: each list's ``n`` unselected members count
  as ``n`` copies of its mean key and mean value (logit ``scale * q . mean_key + log n``), the lists' means fused
  exactly like real rows (RetroInfer's estimation zone, at list granularity). It reads one bfloat16 mean-value
  row per list (the centroid scores it reuses from probing). On real attention (SmolLM2, all layers, 1-5 %
  budgets) it cut the output error 2.3-3.4x; a Jensen correction from the lists' key variance made it worse there
  (docs/performance.md).

Without the C++ extension the same search runs in PyTorch (``search_torch``: the reference, much slower),
with a one-time warning. The C++ decode step (hetero/native.py) searches the index itself and appends a decode
step's key to the tail list itself (``IVFGroupRetriever.native_tables``).

Files: ``codes.py`` (code layout, query codes, bf16 helpers), ``index.py`` (one sequence's arena and statistics),
``retriever.py`` (the retriever), ``reference.py`` (the PyTorch reference of the C++ search and estimate).
"""
from .codes import BLOCK, TAIL_TOKENS, QueryCodes, bf16_bits, bf16_values, block_rows, code_layout
from .index import SeqIndex
from .reference import estimate_torch, search_torch
from .retriever import IVFGroupRetriever

__all__ = ["BLOCK", "IVFGroupRetriever", "QueryCodes", "SeqIndex", "TAIL_TOKENS", "bf16_bits", "bf16_values",
           "block_rows", "code_layout", "estimate_torch", "search_torch"]
