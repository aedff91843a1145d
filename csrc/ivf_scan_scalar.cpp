// Portable code scoring for the grouped IVF search (no vector ISA assumed).
#include "ivf_scan.h"

namespace hetero {
void ivf_scores_scalar(const uint8_t* codes, int64_t n, int64_t Dp, const float* qs, int64_t G, float* out,
                       int64_t out_stride) {
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* row = codes + i * Dp;
    for (int64_t g = 0; g < G; ++g) {
      const float* q = qs + g * Dp;
      float s = 0.0f;
      for (int64_t d = 0; d < Dp; ++d) s += q[d] * static_cast<float>(row[d]);
      out[g * out_stride + i] = s;
    }
  }
}
}  // namespace hetero
