// AVX2 code scoring for the grouped IVF search. Only called when the CPU reports AVX2.
#include <cstdint>
#include <vector>

#include "ivf_scan.h"
#include "query_blocks.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma")
#include <immintrin.h>

namespace {

inline int32_t hsum(__m256i x) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

// NQ queries (widened to int16 once per call) x one code row: u8 -> int16, vpmaddwd into int32 (exact).
template <int NQ>
inline void row_scores(const uint8_t* row, int64_t Dp, const int16_t* q16, const float* qscale, float* out,
                       int64_t out_stride) {
  __m256i acc[NQ];
  for (int g = 0; g < NQ; ++g) acc[g] = _mm256_setzero_si256();
  for (int64_t d = 0; d < Dp; d += 16) {
    const __m256i c = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + d)));
    for (int g = 0; g < NQ; ++g) {
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q16 + g * Dp + d));
      acc[g] = _mm256_add_epi32(acc[g], _mm256_madd_epi16(c, q));
    }
  }
  for (int g = 0; g < NQ; ++g) out[g * out_stride] = static_cast<float>(hsum(acc[g])) * qscale[g];
}

// Every row (row_at(i): its Dp 8-bit codes) against every query.
template <class RowAt>
void score_rows(int64_t n, int64_t Dp, const int8_t* qi, const float* qscale, int64_t G, float* out,
                int64_t out_stride, RowAt row_at) {
  thread_local std::vector<int16_t> q16;
  q16.resize(G * Dp);
  for (int64_t j = 0; j < G * Dp; ++j) q16[j] = qi[j];
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* row = row_at(i);
    for_query_blocks(G, [&](auto nq, int64_t g) {
      row_scores<decltype(nq)::size>(row, Dp, q16.data() + g * Dp, qscale + g, out + g * out_stride + i, out_stride);
    });
  }
}

}  // namespace

namespace hetero {
void ivf_centroid_scores_avx2(const float* q, int64_t G, int64_t D, const float* centroids_t, int64_t L,
                              float* out) {
  centroid_scores_loops(q, G, D, centroids_t, L, out);
}

HETERO_IVF_SCORE_FN(ivf_scores_avx2) {
  score_rows(n, Dp, qi, qscale, G, out, out_stride, [&](int64_t i) { return codes + i * Dp; });
}

HETERO_IVF_SCORE_FN(ivf_scores4_avx2) {
  thread_local std::vector<uint8_t> row;
  row.resize(Dp);
  score_rows(n, Dp, qi, qscale, G, out, out_stride, [&](int64_t i) {
    unpack_codes4(codes + i * (Dp / 2), Dp, row.data());
    return static_cast<const uint8_t*>(row.data());
  });
}
}  // namespace hetero
#else
namespace hetero {
void ivf_centroid_scores_avx2(const float* q, int64_t G, int64_t D, const float* centroids_t, int64_t L,
                              float* out) {
  ivf_centroid_scores_scalar(q, G, D, centroids_t, L, out);
}
HETERO_IVF_SCORE_FN(ivf_scores_avx2) { ivf_scores_scalar(codes, n, Dp, qi, qscale, G, out, out_stride); }
HETERO_IVF_SCORE_FN(ivf_scores4_avx2) { ivf_scores4_scalar(codes, n, Dp, qi, qscale, G, out, out_stride); }
}  // namespace hetero
#endif
