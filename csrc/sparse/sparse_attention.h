// Sparse decode attention over selected host-tier rows: shared declarations.
//
// Layout (see hetero/types.py HostView): k_pool, v_pool [Hkv, R, D] in the storage dtype, elements of a row
// contiguous, rows row_stride elements apart (2 * D for the host tier's fused K|V rows); host position i of
// sequence b is row block_table[b, i / block_tokens] * block_tokens + i % block_tokens. Without a block table the
// rows of sequence b start at b * batch_stride and position i is row i (the fast tier's [B, Hkv, L, D] layout).
// A work item is (sequence b, KV head h, selected-index range [j0, j1)); it attends the G = Hq / Hkv query
// heads of the group over those rows, reading each K and V row once, and writes a partial result
// (out [G, D] normalized, lse [G] natural log; empty -> out 0, lse -inf).
#pragma once
#include <cstdint>

#include "common/types.h"

namespace hetero {

struct SparseArgs {
  const float* q;            // [B, Hq, D] float32
  const void* k_pool;        // [Hkv, R, D] storage dtype (or [B, Hkv, L, D] with batch_stride)
  const void* v_pool;        // [Hkv, R, D]
  int64_t head_stride;       // elements between heads of a pool
  int64_t row_stride;        // elements between consecutive rows of a pool
  int64_t batch_stride;      // elements between sequences of a pool without a block table (0 with one)
  const int32_t* block_table;  // [B, max_blocks], or nullptr: position i of sequence b is row i of its rows
  int64_t max_blocks;
  int64_t block_tokens;
  const int32_t* indices;    // [B, Hkv, K], -1 = skip; nullptr: the positions 0 .. K - 1 themselves
  const int64_t* counts;     // [B, Hkv] entries of each item's K that are used (the rest is ignored), or nullptr
  const float* log_weight;   // [B, Hq, K] or nullptr
  int64_t B, Hq, Hkv, D, K;
  float scale;
  DType dtype;
  int64_t prefetch;          // the software prefetch policy, packed (PrefetchPolicy below)
};

// How the kernel asks for rows ahead of their use, chosen per CPU at run time (hetero/cpu/prefetch.py): `far` rows
// ahead into L2 (prefetcht2; 0 = none), `near` rows ahead into L1 (prefetcht0; 0 = none), `lines` cache lines of the
// start of each K and each V row (0 = the whole row; the hardware's adjacent-line and streamer prefetchers may fetch
// the rest). Packed into one int64 so descriptors and bindings carry it as one field: far | near << 16 | lines << 32.
// `spread` (bit 48): the V rows are asked for during the value pass instead of beside their K rows during the dots,
// so that a core whose arithmetic is slow beside its misses (AVX2) keeps requests leaving at an even rate.
struct PrefetchPolicy {
  int far, near, lines;
  bool spread;
  static PrefetchPolicy unpack(int64_t x) {
    return {static_cast<int>(x & 0xffff), static_cast<int>((x >> 16) & 0xffff), static_cast<int>((x >> 32) & 0xffff),
            ((x >> 48) & 1) != 0};
  }
};

// Rows per online-softmax tile of the kernel, and the float stride between the G score rows of a tile.
constexpr int64_t kRowTile = 32;
constexpr int64_t kTileStride = 48;

// Scratch floats a work item of n indices needs (ItemScratch in sparse_kernel.inc: row offsets 2n, one score tile,
// per-query state, a zero row, then the bf16 queries of AVX512_BF16, G * Dp uint16 with Dp <= D + 31).
inline int64_t item_scratch_floats(const SparseArgs& a, int64_t n) {
  const int64_t g = a.Hq / a.Hkv;
  return 2 * n + g * (kTileStride + 8) + g * (a.D + 32) + a.D + 128;
}

// One work item; out_g [G, D], lse_g [G]; scratch of item_scratch_floats(j1 - j0) floats.
void sparse_item_scalar(const SparseArgs& a, int64_t b, int64_t h, int64_t j0, int64_t j1, float* out_g,
                        float* lse_g, float* scratch);
void sparse_item_avx2(const SparseArgs& a, int64_t b, int64_t h, int64_t j0, int64_t j1, float* out_g,
                      float* lse_g, float* scratch);
void sparse_item_avx512(const SparseArgs& a, int64_t b, int64_t h, int64_t j0, int64_t j1, float* out_g,
                        float* lse_g, float* scratch);
void sparse_item_avx512_bf16(const SparseArgs& a, int64_t b, int64_t h, int64_t j0, int64_t j1, float* out_g,
                             float* lse_g, float* scratch);

// Attention over rows with given logits (sparse_kernel.inc, attend_logits_impl): logits [G, stride] float32
// (overwritten), values vrows [R, D] bfloat16 bits, rows: scratch of R int64; out [G, D], lse [G]. One per ISA.
using AttendLogitsFn = void (*)(float* logits, int64_t G, int64_t R, int64_t stride, const uint16_t* vrows,
                                int64_t D, int64_t* rows, float* out, float* lse);
void attend_logits_scalar(float* logits, int64_t G, int64_t R, int64_t stride, const uint16_t* vrows,
                          int64_t D, int64_t* rows, float* out, float* lse);
void attend_logits_avx2(float* logits, int64_t G, int64_t R, int64_t stride, const uint16_t* vrows,
                        int64_t D, int64_t* rows, float* out, float* lse);
void attend_logits_avx512(float* logits, int64_t G, int64_t R, int64_t stride, const uint16_t* vrows,
                          int64_t D, int64_t* rows, float* out, float* lse);

}  // namespace hetero
