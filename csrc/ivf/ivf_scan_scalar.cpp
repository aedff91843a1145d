// Portable code scoring for the grouped IVF search (no vector ISA assumed), over the blocked arena (ivf_scan.h).
#include "ivf/ivf_scan.h"

namespace hetero {
HETERO_IVF_SCORE_FN(ivf_scores_scalar) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t g = 0; g < G; ++g) {
      const int8_t* q = qi + g * Dp;
      int32_t s = 0;
      for (int64_t d = 0; d < Dp; ++d)
        s += static_cast<int32_t>(q[d]) * static_cast<int32_t>(codes[code_offset(i, d, Dp)]);
      out[g * out_stride + i] = static_cast<float>(s) * qscale[g];
    }
  }
}

HETERO_IVF_SCORE_FN(ivf_scores4_scalar) {
  const int64_t half = Dp / 2;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t g = 0; g < G; ++g) {
      const int8_t* q = qi + g * Dp;
      int32_t s = 0;
      for (int64_t j = 0; j < half; ++j) {
        const uint8_t b = codes[code_offset(i, j, half)];
        s += static_cast<int32_t>(q[j]) * (b & 0x0F) + static_cast<int32_t>(q[half + j]) * (b >> 4);
      }
      out[g * out_stride + i] = static_cast<float>(s) * qscale[g];
    }
  }
}

HETERO_IVF_CENTROID_FN(ivf_centroid_scores_scalar) {
  centroid_scores_loops(q, G, D, centroids_t, L, row, out, [](const uint16_t* src, int64_t n, float* dst) {
    for (int64_t i = 0; i < n; ++i) dst[i] = half_bits_to_float(src[i]);
  });
}

int64_t ivf_select_ge_scalar(const float* s, int64_t n, float threshold, int32_t* out) {
  return select_ge_from(s, 0, n, threshold, out, 0);
}
}  // namespace hetero
