#pragma once
#include <cstdint>

namespace hetero {
// Touch every 64-byte line of n runs of run_bytes at base + offsets[i]; prefetch runs `prefetch` ahead.
float read_runs(const char* base, const int64_t* offsets, int64_t n, int64_t run_bytes, int prefetch);
}  // namespace hetero
