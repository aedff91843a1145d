// Keeping an ivf-group index's lists (retrieval/ivf_group/index.py SeqIndex, the same float32 operations as its
// numpy path): new keys' nearest lists, and the tail list's flush, its recent keys moved into the lists assigned to
// them with the lists' statistics. One sequence's index, all its H KV heads; every array C-contiguous, laid out as
// SeqIndex keeps it.
#pragma once
#include <cstdint>
#include <vector>

#include "ivf/ivf_scan.h"

namespace hetero {

struct IvfTailArgs {
  int64_t H, D, L;              // KV heads, head dim, lists with a centroid (list L is the tail)
  int64_t t, tail_cap;          // keys in the tail, rows of tail_keys per head
  int64_t bits, Dp;             // code bits (4 or 8) and padded dims: a code row is Dp * bits / 8 bytes
  uint8_t* codes;               // code arenas, blocked layout (code_offset), codes_head bytes apart
  int64_t codes_head;
  int32_t* ids;                 // id arenas, ids_head elements apart
  int64_t ids_head;
  int64_t* start;               // [H, L + 1] first arena row of each list
  int64_t* count;               // [H, L + 1] rows in each list
  const int64_t* cap;           // [H, L + 1] rows reserved for each list
  uint16_t* centroids_t;        // [H, D, L] float16 unit mean directions
  float* mean_norm;             // [H, L] |mean key|
  float* ksum;                  // [H, L + 1, D] sums of the members' keys
  float* vsum;                  // [H, L + 1, D] ... values
  uint16_t* vmean;              // [H, L + 1, D] bfloat16 mean values
  const float* tail_keys;       // [H, tail_cap, D] float32: the tail's keys, oldest first
  const float* tail_values;     // [H, tail_cap, D]
  const int64_t* assign;        // [H, t] each tail key's list (< L)
};

// Keys per item of a pooled assignment (Runner::ivf_assign): its scores are kAssignChunk x L floats.
constexpr int64_t kAssignChunk = 64;

// out[j] = the list l < L of the largest keys[j] . centroids_t[:, l] for j < n (keys [n, D] float32, centroids_t
// [D, L] float16, scored by `centroids`, the search's probing kernel), the first on a tie (numpy's argmax); the same
// for a key whatever the other keys of the call. scores: room for n * L floats, row: L floats.
void ivf_nearest_lists(const float* keys, int64_t n, int64_t D, const uint16_t* centroids_t, int64_t L,
                       IvfCentroidFn centroids, float* scores, float* row, int64_t* out);

// Whether the flush may run: for every head, the tail holds t keys inside the arena (ids_head rows), every
// assignment names a list < L, and every list has room in the arena for the keys assigned to it (count + new <= cap).
bool ivf_tail_fits(const IvfTailArgs& a);

// Head h's tail rows (codes and ids, already encoded when they entered the tail) appended to their assigned lists
// in host order; the lists' key and value sums grow one key at a time in that order; the lists that gained rows get
// their mean value (bfloat16 of vsum * (1 / count)), |mean key| (norm * (1 / count), the norm's squares summed in
// float64) and unit direction (float16 of ksum / norm, kept when the norm is 0); the tail ends empty (count and
// statistics 0). touched: scratch of L + 1 bytes.
void ivf_tail_flush_head(const IvfTailArgs& a, int64_t h, std::vector<uint8_t>& touched);

}  // namespace hetero
