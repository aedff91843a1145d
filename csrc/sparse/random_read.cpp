// Ceiling probe: the fastest this machine reads random runs of memory, with nothing but loads and
// software prefetch. The sparse kernel is measured against it (besides streaming bandwidth) to tell how
// much of a gap is the kernel and how much is the memory system's random-access limit.
#include "sparse/random_read.h"

#include <algorithm>
#include <cstdint>

namespace hetero {

float read_runs(const char* base, const int64_t* offsets, int64_t n, int64_t run_bytes, int prefetch, bool to_l2) {
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    if (prefetch > 0 && i + prefetch < n) {
      const char* p = base + offsets[i + prefetch];
      if (to_l2) {
        for (int64_t off = 0; off < run_bytes; off += 64) __builtin_prefetch(p + off, 0, 1);
      } else {
        for (int64_t off = 0; off < run_bytes; off += 64) __builtin_prefetch(p + off, 0, 3);
      }
    }
    const char* p = base + offsets[i];
    for (int64_t off = 0; off < run_bytes; off += 64) acc += *reinterpret_cast<const float*>(p + off);
  }
  return acc;
}

}  // namespace hetero
