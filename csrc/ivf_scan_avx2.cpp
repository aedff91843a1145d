// AVX2 + FMA code scoring for the grouped IVF search. Only called when the CPU reports these features.
#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma")
#include <immintrin.h>
#endif
#include "ivf_scan.h"

#if defined(__x86_64__) || defined(_M_X64)
namespace {

inline __m256 codes8(const uint8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

inline float hsum(__m256 x) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// NQ queries x one code row; two accumulators per query hide the FMA latency.
template <int NQ>
inline void row_scores(const uint8_t* row, int64_t Dp, const float* qs, float* out, int64_t out_stride) {
  __m256 acc[NQ][2];
  for (int g = 0; g < NQ; ++g) acc[g][0] = acc[g][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < Dp; d += 16) {
    const __m256 c0 = codes8(row + d), c1 = codes8(row + d + 8);
    for (int g = 0; g < NQ; ++g) {
      acc[g][0] = _mm256_fmadd_ps(_mm256_loadu_ps(qs + g * Dp + d), c0, acc[g][0]);
      acc[g][1] = _mm256_fmadd_ps(_mm256_loadu_ps(qs + g * Dp + d + 8), c1, acc[g][1]);
    }
  }
  for (int g = 0; g < NQ; ++g) out[g * out_stride] = hsum(_mm256_add_ps(acc[g][0], acc[g][1]));
}

}  // namespace

namespace hetero {
void ivf_scores_avx2(const uint8_t* codes, int64_t n, int64_t Dp, const float* qs, int64_t G, float* out,
                     int64_t out_stride) {
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* row = codes + i * Dp;
    int64_t g = 0;
    for (; g + 4 <= G; g += 4) row_scores<4>(row, Dp, qs + g * Dp, out + g * out_stride + i, out_stride);
    switch (G - g) {
      case 3: row_scores<3>(row, Dp, qs + g * Dp, out + g * out_stride + i, out_stride); break;
      case 2: row_scores<2>(row, Dp, qs + g * Dp, out + g * out_stride + i, out_stride); break;
      case 1: row_scores<1>(row, Dp, qs + g * Dp, out + g * out_stride + i, out_stride); break;
      default: break;
    }
  }
}
}  // namespace hetero
#else
namespace hetero {
void ivf_scores_avx2(const uint8_t* codes, int64_t n, int64_t Dp, const float* qs, int64_t G, float* out,
                     int64_t out_stride) {
  ivf_scores_scalar(codes, n, Dp, qs, G, out, out_stride);
}
}  // namespace hetero
#endif
