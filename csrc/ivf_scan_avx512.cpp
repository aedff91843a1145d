// AVX-512 code scoring for the grouped IVF search. Only called when the CPU reports AVX-512 F/BW/VL/DQ.
#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#include <immintrin.h>
#endif
#include "ivf_scan.h"

#if defined(__x86_64__) || defined(_M_X64)
namespace {

inline __m512 codes16(const uint8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// Two code rows x NQ queries per pass: each query slice is loaded once for both rows, and 2 * NQ independent
// accumulators keep both FMA ports busy (one row x 4 queries leaves 4 chains of Dp/16 dependent FMAs).
template <int NQ, int NR>
inline void rows_scores(const uint8_t* row, int64_t Dp, const float* qs, float* out, int64_t out_stride) {
  __m512 acc[NR][NQ];
  for (int r = 0; r < NR; ++r)
    for (int g = 0; g < NQ; ++g) acc[r][g] = _mm512_setzero_ps();
  for (int64_t d = 0; d < Dp; d += 16) {
    __m512 c[NR];
    for (int r = 0; r < NR; ++r) c[r] = codes16(row + r * Dp + d);
    for (int g = 0; g < NQ; ++g) {
      const __m512 q = _mm512_loadu_ps(qs + g * Dp + d);
      for (int r = 0; r < NR; ++r) acc[r][g] = _mm512_fmadd_ps(q, c[r], acc[r][g]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int g = 0; g < NQ; ++g) out[g * out_stride + r] = _mm512_reduce_add_ps(acc[r][g]);
}

template <int NQ>
inline void block_scores(const uint8_t* codes, int64_t n, int64_t Dp, const float* qs, float* out,
                         int64_t out_stride) {
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) rows_scores<NQ, 2>(codes + i * Dp, Dp, qs, out + i, out_stride);
  if (i < n) rows_scores<NQ, 1>(codes + i * Dp, Dp, qs, out + i, out_stride);
}

}  // namespace

namespace hetero {
void ivf_scores_avx512(const uint8_t* codes, int64_t n, int64_t Dp, const float* qs, int64_t G, float* out,
                       int64_t out_stride) {
  int64_t g = 0;
  for (; g + 4 <= G; g += 4) block_scores<4>(codes, n, Dp, qs + g * Dp, out + g * out_stride, out_stride);
  switch (G - g) {
    case 3: block_scores<3>(codes, n, Dp, qs + g * Dp, out + g * out_stride, out_stride); break;
    case 2: block_scores<2>(codes, n, Dp, qs + g * Dp, out + g * out_stride, out_stride); break;
    case 1: block_scores<1>(codes, n, Dp, qs + g * Dp, out + g * out_stride, out_stride); break;
    default: break;
  }
}
}  // namespace hetero
#else
namespace hetero {
void ivf_scores_avx512(const uint8_t* codes, int64_t n, int64_t Dp, const float* qs, int64_t G, float* out,
                       int64_t out_stride) {
  ivf_scores_scalar(codes, n, Dp, qs, G, out, out_stride);
}
}  // namespace hetero
#endif
