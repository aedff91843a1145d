// Grouped IVF search over 8-bit key codes: shared declarations.
//
// One work item is (sequence, KV head): its index keeps every host key as a row of Dp uint8 codes
// (Dp = head_dim rounded up to 16, zero padded) in per-list segments of a code arena, with the key's host
// position in a parallel id arena. The G queries of the KV head's GQA group arrive pre-scaled (qs [G, Dp]
// float32, qs[g, d] = q[g, d] * step[d], so q . key = bias[g] + qs[g] . codes; the bias does not change
// a query's ranking and is not needed). Every probed list is read once and scored against all G queries.
#pragma once
#include <cstdint>

namespace hetero {

// out[g * out_stride + i] = sum_d qs[g * Dp + d] * codes[i * Dp + d] for g < G, i < n. Dp % 16 == 0.
using IvfScoreFn = void (*)(const uint8_t* codes, int64_t n, int64_t Dp, const float* qs, int64_t G, float* out,
                            int64_t out_stride);

void ivf_scores_scalar(const uint8_t* codes, int64_t n, int64_t Dp, const float* qs, int64_t G, float* out,
                       int64_t out_stride);
void ivf_scores_avx2(const uint8_t* codes, int64_t n, int64_t Dp, const float* qs, int64_t G, float* out,
                     int64_t out_stride);
void ivf_scores_avx512(const uint8_t* codes, int64_t n, int64_t Dp, const float* qs, int64_t G, float* out,
                       int64_t out_stride);

}  // namespace hetero

#include <vector>

namespace hetero {

// Pointers come from the Python wrapper (retrieval/ivf_group.py), which owns every check.
struct IvfSearchArgs {
  const float* qs;             // [items, G, Dp] float32, pre-scaled queries
  int64_t items, G, Dp;
  const uint64_t* codes;       // [items] -> uint8 code arena [cap, Dp]
  const uint64_t* ids;         // [items] -> int32 id arena [cap] (host positions)
  const uint64_t* list_start;  // [items] -> int64 [nlist]: first arena row of each list
  const uint64_t* list_count;  // [items] -> int64 [nlist]: rows in each list
  int64_t nlist;               // lists per item (padded lists have count 0)
  const uint8_t* probe;        // [items, nlist]: nonzero = scan this list
  const int64_t* k;            // [items] keys per query
  const int64_t* n_tokens;     // [items] every id is < n_tokens
  int32_t* top;                // [items, G, kmax] each query's best ids (unordered, -1 padded) or nullptr
  int64_t kmax;
  int32_t* union_ids;          // [items, G * kmax] union of the G top sets, ascending, -1 padded
  int64_t* union_count;        // [items]
  int64_t* scanned;            // [items] code rows scored (per row, all G queries)
  // Optional (nullptr = skip): per query, an estimate of log sum exp(scale * qs . codes) over the scanned rows
  // outside its top k_ref[item] (from a strided sample of the scores); the caller adds scale * (q . vmin).
  const int64_t* k_ref;        // [items]
  float scale;
  float* missed_lse;           // [items, G]
};

struct IvfScratch {
  std::vector<float> scores;   // [G, n_scan]
  std::vector<int32_t> ids;    // [n_scan]
  std::vector<int32_t> cand;   // candidate positions of one query
  std::vector<float> sample;
  std::vector<uint64_t> bitmap;
  std::vector<int32_t> best;   // one query's top positions
};

// Search one item: score every probed list's rows against the G queries, take each query's top k by score
// (exact top-k over the scanned rows), write the per-query sets and their sorted union.
void ivf_search_item(const IvfSearchArgs& a, int64_t item, IvfScoreFn score, IvfScratch& s);

}  // namespace hetero
