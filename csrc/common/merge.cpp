#include "common/merge.h"

#include <cmath>
#include <limits>

namespace hetero {

float merge_row(int P, const float* const* outs, const float* lses, int64_t D, float* out) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  constexpr int kMaxParts = 64;
  float w[kMaxParts];
  float m = -inf;
  int pos_inf = 0;
  for (int p = 0; p < P; ++p) {
    const float l = lses[p];
    if (std::isnan(l)) {
      for (int64_t d = 0; d < D; ++d) out[d] = std::numeric_limits<float>::quiet_NaN();
      return std::numeric_limits<float>::quiet_NaN();
    }
    pos_inf += l == inf;
    m = l > m ? l : m;
  }
  float total = 0.0f;
  for (int p = 0; p < P; ++p) {
    const float l = lses[p];
    // +inf parts share all the weight; otherwise shift by the finite max (-inf parts weigh exp(-inf) = 0)
    w[p] = pos_inf ? (l == inf ? 1.0f : 0.0f) : (l == -inf ? 0.0f : std::exp(l - m));
    total += w[p];
  }
  for (int64_t d = 0; d < D; ++d) out[d] = 0.0f;
  if (total <= 0.0f) return -inf;
  const float inv = 1.0f / total;
  for (int p = 0; p < P; ++p) {
    if (w[p] <= 0.0f) continue;  // a part with zero weight contributes nothing, even garbage
    const float wp = w[p] * inv;
    const float* o = outs[p];
    for (int64_t d = 0; d < D; ++d) out[d] += wp * o[d];
  }
  return pos_inf ? inf : m + std::log(total);
}

void merge_rows(int P, const float* const* outs, const float* const* lses, int64_t rows, int64_t D, float* out,
                float* lse) {
  constexpr int kMaxParts = 64;
  const float* o[kMaxParts];
  float l[kMaxParts];
  for (int64_t r = 0; r < rows; ++r) {
    for (int p = 0; p < P; ++p) {
      o[p] = outs[p] + r * D;
      l[p] = lses[p][r];
    }
    lse[r] = merge_row(P, o, l, D, out + r * D);
  }
}

}  // namespace hetero
