#pragma once
#include <cstdint>

namespace hetero {
// Touch every 64-byte line of n runs of run_bytes at base + offsets[i]; prefetch runs `prefetch` ahead, into
// L1 (prefetcht0) or, with to_l2, into L2 (prefetcht2).
float read_runs(const char* base, const int64_t* offsets, int64_t n, int64_t run_bytes, int prefetch, bool to_l2);
}  // namespace hetero
