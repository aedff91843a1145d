// Grouped IVF search over 8-bit or 4-bit key codes: shared declarations.
//
// One work item is (sequence, KV head): its index keeps every host key as a row of Dp uint8 codes, or Dp / 2
// bytes of packed 4-bit codes (Dp = head_dim rounded up to 16, or 32, zero padded) in per-list segments of a code
// arena, with the key's host position in a parallel id arena. The arena is stored in blocks of kCodeBlock = 16 rows,
// transposed by 4-byte groups (code_offset below): one 64-byte load holds the same four bytes of 16 rows, so a
// vpdpbusd against a broadcast group of the query scores 16 rows at once with no horizontal sums. Lists start on a
// block boundary. The G queries of the KV head's GQA group are pre-scaled and quantized first
// (quantize_queries): q[g, d] * step[d] ~= qscale[g] * qi[g, d] with qi int8 in [-127, 127], so q . key ~= bias[g] + qscale[g] *
// (qi[g] . codes) (the bias does not change a query's ranking and is not needed). The integer dot product is
// exact at every ISA level (|sum| < 2^24, so its float conversion is exact too): all levels return identical
// scores. Every probed list is read once and scored against all G queries.
#pragma once
#include <cstdint>

#include "common/half.h"
#include "sparse/sparse_attention.h"

namespace hetero {

constexpr int64_t kCodeBlock = 16;

// Byte offset of byte j of arena row i (row_bytes per row, a multiple of 4): blocks of 16 rows, in each block the
// 4-byte group j / 4 of all 16 rows is 64 contiguous bytes (row i % 16 at 4 * (i % 16)).
inline int64_t code_offset(int64_t i, int64_t j, int64_t row_bytes) {
  return (i / kCodeBlock) * kCodeBlock * row_bytes + (j / 4) * 64 + (i % kCodeBlock) * 4 + j % 4;
}

// out[g * out_stride + i] = float(sum_d qi[g * Dp + d] * code(i, d)) * qscale[g] for g < G, i < n (integer sum,
// then one float32 multiply); codes: the first block of n rows in the blocked layout (code_offset). Dp % 16 == 0.
// The 4-bit form (score4): a row is Dp / 2 bytes, byte j holding the code of dimension j in its low nibble and
// of dimension j + Dp / 2 in its high nibble; the same sum over the unpacked codes. Dp % 32 == 0.
using IvfScoreFn = void (*)(const uint8_t* codes, int64_t n, int64_t Dp, const int8_t* qi, const float* qscale,
                            int64_t G, float* out, int64_t out_stride);

#define HETERO_IVF_SCORE_FN(name)                                                                        \
  void name(const uint8_t* codes, int64_t n, int64_t Dp, const int8_t* qi, const float* qscale, int64_t G, \
            float* out, int64_t out_stride)
HETERO_IVF_SCORE_FN(ivf_scores_scalar);
HETERO_IVF_SCORE_FN(ivf_scores_avx2);
HETERO_IVF_SCORE_FN(ivf_scores_avx512);       // AVX-512 BW: vpmaddwd on widened halves
HETERO_IVF_SCORE_FN(ivf_scores_avx512_vnni);  // AVX-512 VNNI: vpdpbusd
HETERO_IVF_SCORE_FN(ivf_scores4_scalar);
HETERO_IVF_SCORE_FN(ivf_scores4_avx2);
HETERO_IVF_SCORE_FN(ivf_scores4_avx512);
HETERO_IVF_SCORE_FN(ivf_scores4_avx512_vnni);

// Positions i < n with s[i] >= threshold, ascending, written to out (room for n + 16); returns how many.
// select_ge_from: the same from position i on, appending after the c already written (branch-free: ~1 % pass).
inline int64_t select_ge_from(const float* s, int64_t i, int64_t n, float threshold, int32_t* out, int64_t c) {
  for (; i < n; ++i) {
    out[c] = static_cast<int32_t>(i);
    c += s[i] >= threshold;
  }
  return c;
}
using IvfSelectFn = int64_t (*)(const float* s, int64_t n, float threshold, int32_t* out);
int64_t ivf_select_ge_scalar(const float* s, int64_t n, float threshold, int32_t* out);
int64_t ivf_select_ge_avx512(const float* s, int64_t n, float threshold, int32_t* out);  // compress

// out[g * L + l] = sum_d q[g * D + d] * centroids_t[d * L + l]: every query against every list's centroid, the
// centroids stored as float16 (unit directions: half the bytes of float32 for an 11-bit mantissa, which ranks lists
// and estimates their mass alike), each converted exactly to float32 before the float32 products. row: scratch of
// L floats (the ISA files keep no containers of their own).
#define HETERO_IVF_CENTROID_FN(name)                                                                          \
  void name(const float* q, int64_t G, int64_t D, const uint16_t* centroids_t, int64_t L, float* row, float* out)
using IvfCentroidFn = void (*)(const float* q, int64_t G, int64_t D, const uint16_t* centroids_t, int64_t L,
                               float* row, float* out);
HETERO_IVF_CENTROID_FN(ivf_centroid_scores_scalar);
HETERO_IVF_CENTROID_FN(ivf_centroid_scores_avx2);
HETERO_IVF_CENTROID_FN(ivf_centroid_scores_avx512);

// Plain loops, inlined into each ISA's wrapper above and vectorized there for that ISA (over lists; d outer, so
// the centroid rows stream once and the G output rows stay in L1). to_float(src, n, dst): one row of halves to
// floats (row: scratch of L floats).
template <class ToFloat>
__attribute__((always_inline)) inline void centroid_scores_loops(const float* q, int64_t G, int64_t D,
                                                                 const uint16_t* centroids_t, int64_t L, float* row,
                                                                 float* out, ToFloat to_float) {
  for (int64_t j = 0; j < G * L; ++j) out[j] = 0.0f;
  for (int64_t d = 0; d < D; ++d) {
    to_float(centroids_t + d * L, L, row);
    for (int64_t g = 0; g < G; ++g) {
      const float qd = q[g * D + d];
      float* __restrict o = out + g * L;
      for (int64_t l = 0; l < L; ++l) o[l] += qd * row[l];
    }
  }
}

struct IvfKernels {
  IvfScoreFn score;
  IvfScoreFn score4;
  IvfSelectFn select;
  IvfCentroidFn centroids;
  AttendLogitsFn estimate;  // attention over the lists' estimated logits (the unselected tokens)
  const char* name;  // the scoring kernel ("avx512_vnni", "avx512", "avx2", "scalar"), for `hetero env`
};

}  // namespace hetero

#include <vector>

namespace hetero {

// Pointers come from the Python wrapper (retrieval/ivf_group.py), which owns every check.
struct IvfSearchArgs {
  const float* q;              // [items, G, D] float32 queries (list probing)
  int64_t D;
  const uint64_t* centroids;   // [items] -> float16 [D, nlists - 1] (centroids_t; the last list, the tail, has none)
  const int64_t* nprobe;       // [items] lists each query probes by q . centroid (the group scans the union)
  const uint64_t* step;        // [items] -> float32 [D]: each dimension's code step (the queries are quantized here)
  int64_t items, G, Dp;
  int64_t bits;                // 8: a code row is Dp bytes; 4: Dp / 2 bytes, two codes per byte (score4)
  const uint64_t* codes;       // [items] -> uint8 code arena [cap, Dp * bits / 8]
  const uint64_t* ids;         // [items] -> int32 id arena [cap] (host positions)
  const uint64_t* list_start;  // [items] -> int64 [nlists[item]]: first arena row of each list
  const uint64_t* list_count;  // [items] -> int64 [nlists[item]]: rows in each list
  const int64_t* nlists;       // [items] lists of each item (padded lists have count 0), the tail list last
  int64_t probe_stride;        // >= every nlists[item]
  uint8_t* probe;              // [items, probe_stride] out: 1 = scanned (a query's nprobe best non-empty lists; the tail if k > 0)
  const int64_t* k;            // [items] keys per query
  const int64_t* n_tokens;     // [items] every id is < n_tokens
  int32_t* top;                // [items, G, kmax] each query's best ids (unordered, -1 padded) or nullptr
  int64_t kmax;
  int32_t* union_ids;          // [items, G * kmax] union of the G top sets, ascending, -1 padded
  int64_t* union_count;        // [items]
  int64_t* scanned;            // [items] code rows scored (per row, all G queries)
  // Optional (nullptr = skip): per query, an estimate of log sum exp(scale * score) over the scanned rows
  // outside its top k_ref[item] (from a strided sample of the scores); the caller adds scale * (q . vmin).
  const int64_t* k_ref;        // [items]
  float scale;                 // the softmax scale (missed_lse and the estimate)
  float* missed_lse;           // [items, G]
  // Optional (est_out = nullptr: skip): attention over the host tokens the search did not select, estimated per
  // list from its mean key and mean value (every unselected member counted at the list's mean). Query g of the
  // item attends the union (per_query_counts = 0) or its own top set (1); for list l with c_l members of which
  // n_l are not attended: logit = scale * qe_g . mean_key_l + log(n_l), value = vmean_l (lists with n_l = 0 drop
  // out). Lists l < nlist - 1 take qe_g . mean_key_l = (qe_g . centroid_l) * mean_norm[l] (centroids_t
  // holds each list's unit mean direction); the tail list's mean key is tail_ksum / c_tail.
  const float* qe;             // [items, Ge, D] float32: the queries estimated for (q itself unless the sum rule)
  int64_t Ge;
  const uint64_t* mean_norm;   // [items] -> float32 [nlists - 1]: |mean key| of each list
  const uint64_t* tail_ksum;   // [items] -> float32 [D]: sum of the tail list's keys
  const uint64_t* vmean;       // [items] -> bfloat16 [nlists, D]: mean value of each list (the tail's last)
  int per_query_counts;
  float* est_out;              // [items, Ge, D]
  float* est_lse;              // [items, Ge]
};

// Encode n keys of each of H items (keys [H, n, D] float32) into their arenas (codes[h] / ids[h]: item h's code and
// id arenas; codes in the blocked layout) at rows first_row[h] .. + n - 1, with host positions first_id ..:
// code = clamp(rint((key - vmin) * inv_step), 0, 2^bits - 1) per dimension (vmin, inv_step [H, D]; retrieval/ivf_group.py's _SeqIndex.encode, the
// same float32 operations), 4-bit codes packed as score4 reads them, zero from D to Dp.
// With values ([H, n, D] float32, or nullptr: skipped), the tail list's statistics of item h follow (the estimate's):
// tail_ksum[h] / tail_vsum[h] (float32 [D]) += the keys / values, one key at a time, and tail_vmean[h] (bfloat16
// [D]) = tail_vsum[h] / tail_count, rounded to nearest even.
void ivf_encode_rows(const float* keys, int64_t H, int64_t n, int64_t D, const float* vmin, const float* inv_step,
                     int64_t bits, int64_t Dp, const uint64_t* codes, const uint64_t* ids, const int64_t* first_row,
                     int32_t first_id, const float* values, const uint64_t* tail_ksum, const uint64_t* tail_vsum,
                     const uint64_t* tail_vmean, int64_t tail_count);

// Largest padded head dim the code kernels take (a key's codes are built on the stack).
constexpr int64_t kMaxCodeDims = 512;

// One key into arena row `row`: code = clamp(rint((key - vmin) * inv_step), 0, 2^bits - 1) per dimension, as
// ivf_encode_rows (which calls it per key).
void ivf_encode_key(const float* key, int64_t D, const float* vmin, const float* inv_step, int64_t bits, int64_t Dp,
                    uint8_t* arena, int64_t row);

// The G queries of one item in code space (QueryCodes.quantize in retrieval/ivf_group.py, the same float32
// operations, so the same bits): x = q * step, qscale = max |x| / 127 (1 for a zero query), qi = rint(x / qscale)
// clamped to [-127, 127], zero from D to Dp. For every query, NaN and inf included, qscale is finite and > 0 (a
// NaN element is left out of max |x|; an infinite one gives qscale FLT_MAX), so no score the search ranks is NaN.
void quantize_queries(const float* q, const float* step, int64_t G, int64_t D, int64_t Dp, int8_t* qi, float* qscale);

struct IvfScratch {
  std::vector<int8_t> qi;      // [G, Dp] the item's quantized queries
  std::vector<float> qscale;   // [G]
  std::vector<float> scores;   // [G, n_scan]
  std::vector<float> cscores;  // [G, nlist - 1] centroid scores
  std::vector<float> crow;     // [nlist - 1] one centroid row as float32
  std::vector<float> ranked;   // [nlist - 1] one query's centroid scores as ranked (empty lists -inf, NaN lowest)
  std::vector<int32_t> lists;
  std::vector<int32_t> ids;    // [n_scan]
  std::vector<int32_t> cand;   // candidate positions of one query
  std::vector<float> cand_scores;
  std::vector<int32_t> histogram;  // kth_largest's bucket counts
  std::vector<float> bucket;       // kth_largest's bucket members
  std::vector<float> sample;
  std::vector<uint64_t> bitmap;
  std::vector<int32_t> best;   // one query's top positions
  // the estimate (IvfSearchArgs::est_out)
  std::vector<int32_t> pos_list;  // [n_scan] list of each scanned row
  std::vector<int32_t> attended;  // [Ge or 1, nlist] attended rows per list
  std::vector<float> escores;     // [Ge, nlist - 1] centroid scores of qe (when it is not q)
  std::vector<float> logits;      // [Ge, nlist]
  std::vector<int64_t> rows;      // [nlist]
  std::vector<float> log_n;       // log(i), i < size
};

// Positions (into s[0..n)) of the k largest scores (k <= n, no NaN), ascending in out[0..k); ties at the k-th
// score go to the lower positions. Exact (the search's top-k and the probe's list choice).
void ivf_top_positions(const float* s, int64_t n, int64_t k, IvfSelectFn select, IvfScratch& w, int32_t* out);

// Search one item: score every probed list's rows against the G queries, take each query's top k by score
// (exact top-k over the scanned rows), write the per-query sets and their sorted union.
void ivf_search_item(const IvfSearchArgs& a, int64_t item, IvfKernels kernels, IvfScratch& s);

}  // namespace hetero
