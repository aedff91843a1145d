// Log-sum-exp fusion of two partial attentions (hetero/merge.py's arithmetic for P = 2, float32), one call per
// decode step instead of a dozen numpy operations (each one costs 20-50 us when the step's other work has
// evicted numpy's code and data from the caches).
#include "merge.h"

#include <cmath>

namespace hetero {

void merge2_f32(const float* out_a, const float* lse_a, const float* out_b, const float* lse_b, int64_t rows,
                int64_t D, float* out, float* lse) {
  const float inf = __builtin_inff();
  for (int64_t r = 0; r < rows; ++r) {
    const float la = lse_a[r], lb = lse_b[r];
    const float m = la > lb ? la : lb;
    const bool pa = la == inf, pb = lb == inf, has_pos_inf = pa || pb;
    const float m_safe = std::isfinite(m) ? m : 0.0f;
    float wa = std::exp(la - m_safe), wb = std::exp(lb - m_safe);
    if (has_pos_inf) {  // +inf parts share all the weight
      wa = pa ? 1.0f : 0.0f;
      wb = pb ? 1.0f : 0.0f;
    }
    const float total = wa + wb;
    const bool nonempty = total > 0.0f;
    const float denom = nonempty ? total : 1.0f;
    const float* a = out_a + r * D;
    const float* b = out_b + r * D;
    float* o = out + r * D;
    for (int64_t d = 0; d < D; ++d) {  // a part with zero weight contributes nothing, even garbage
      const float ca = wa > 0.0f ? wa * a[d] : 0.0f;
      const float cb = wb > 0.0f ? wb * b[d] : 0.0f;
      o[d] = nonempty ? (ca + cb) / denom : 0.0f;
    }
    lse[r] = has_pos_inf ? m : (nonempty ? m_safe + std::log(denom) : -inf);
  }
}

}  // namespace hetero
