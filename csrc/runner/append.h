// A decode step's new token in every sequence of a layer, in one call: the fast tier's ring slot, the token it
// pushes out of the window copied into the paged host tier, and that token's key appended to the index where the
// index takes it natively (runner/step.h LAYER.INDEX_KIND).
#pragma once
#include <cstdint>

namespace hetero {

// Return codes of append_decode. Every failure is detected before anything changes.
constexpr int kAppendOk = 0;
constexpr int kAppendNotFinite = -1;   // flags[b] = 1 where sequence b's key or value holds NaN or inf
constexpr int kAppendNeedBlocks = -2;  // flags[b] = 1 where sequence b's host blocks are full: reserve, call again

// k, v: [B, Hkv, D] of dtype in_dtype (0 float32, 1 bfloat16, 2 float16), elements of a row contiguous, rows at
// b * stride_b + h * stride_h. index_native = 0 sends every index add to Python (the layer has adds queued).
// On success returns how many sequences still need an index add from Python (>= 0): flags[b] is the host position
// to add, or -1.
int append_decode(const int64_t* layer, const void* k, const void* v, int64_t stride_b, int64_t stride_h,
                  int in_dtype, int index_native, int64_t* flags);

}  // namespace hetero
