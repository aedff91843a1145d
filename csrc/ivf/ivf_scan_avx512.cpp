// AVX-512 (F/BW/VL/DQ, no VNNI) code scoring for the grouped IVF search: the u8 x s8 dot product of VNNI
// emulated exactly with two vpmaddwd on the even and odd bytes widened to int16.
#include <cstdint>

#include "ivf/ivf_scan.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#include "common/x86_intrinsics.h"  // <immintrin.h>, minus GCC 12's false positives in it

namespace {
inline __m512i dot_u8s8(__m512i acc, __m512i u8, __m512i s8) {
  const __m512i even_u = _mm512_and_si512(u8, _mm512_set1_epi16(0x00FF));
  const __m512i odd_u = _mm512_srli_epi16(u8, 8);
  const __m512i even_s = _mm512_srai_epi16(_mm512_slli_epi16(s8, 8), 8);
  const __m512i odd_s = _mm512_srai_epi16(s8, 8);
  return _mm512_add_epi32(acc, _mm512_add_epi32(_mm512_madd_epi16(even_u, even_s), _mm512_madd_epi16(odd_u, odd_s)));
}
}  // namespace

#define IVF_SCORE_NAME ivf_scores_avx512
#define IVF_SCORE4_NAME ivf_scores4_avx512
#include "ivf/ivf_scan_avx512.inc"

namespace hetero {
namespace {
// NQ (<= 4) queries against 16 * T lists (l .. l + 16 T, the last vector masked by `last`), all D dimensions
// accumulated in registers: each centroid line is read once per query block and no partial sum goes through memory
// (a dimension-outer loop loads and stores G x L partial scores per dimension: 5x slower at L = 1024, G = 4, from
// L2). PF > 0: the lines PF tiles ahead are prefetched, since the rows of [D, L] are read across, 2 KB apart.
template <int NQ, int T, int PF>
inline void centroid_tile(const float* q, int64_t D, const uint16_t* c, int64_t L, int64_t l, __mmask16 last,
                          float* out) {
  __m512 acc[NQ][T];
#pragma GCC unroll 4
  for (int g = 0; g < NQ; ++g)
#pragma GCC unroll 2
    for (int t = 0; t < T; ++t) acc[g][t] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const uint16_t* p = c + d * L + l;
    if (PF) {
#pragma GCC unroll 4
      for (int t = 0; t < T; t += 2) _mm_prefetch(reinterpret_cast<const char*>(p + PF * 16 * T + 16 * t), _MM_HINT_T0);
    }
    __m512 x[T];
#pragma GCC unroll 2
    for (int t = 0; t < T; ++t)
      x[t] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(t == T - 1 ? last : __mmask16(0xFFFF), p + 16 * t));
#pragma GCC unroll 4
    for (int g = 0; g < NQ; ++g) {
      const __m512 qd = _mm512_set1_ps(q[g * D + d]);
#pragma GCC unroll 2
      for (int t = 0; t < T; ++t) acc[g][t] = _mm512_fmadd_ps(qd, x[t], acc[g][t]);
    }
  }
#pragma GCC unroll 4
  for (int g = 0; g < NQ; ++g)
#pragma GCC unroll 2
    for (int t = 0; t < T; ++t)
      _mm512_mask_storeu_ps(out + g * L + l + 16 * t, t == T - 1 ? last : __mmask16(0xFFFF), acc[g][t]);
}

template <int NQ>
inline void centroid_block(const float* q, int64_t D, const uint16_t* c, int64_t L, float* out) {
  int64_t l = 0;
  constexpr int ahead = 2;  // tiles prefetched ahead: 2x faster than none on cold centroids, more is no better
  for (; l + 32 * (ahead + 1) <= L; l += 32) centroid_tile<NQ, 2, ahead>(q, D, c, L, l, 0xFFFF, out);
  for (; l + 32 <= L; l += 32) centroid_tile<NQ, 2, 0>(q, D, c, L, l, 0xFFFF, out);
  for (; l < L; l += 16)
    centroid_tile<NQ, 1, 0>(q, D, c, L, l, L - l >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (L - l)) - 1), out);
}
}  // namespace

HETERO_IVF_CENTROID_FN(ivf_centroid_scores_avx512) {
  (void)row;
  for_query_blocks(G, [&](auto nq, int64_t g) {
    centroid_block<decltype(nq)::size>(q + g * D, D, centroids_t, L, out + g * L);
  });
}

int64_t ivf_select_ge_avx512(const float* s, int64_t n, float threshold, int32_t* out) {
  const __m512 t = _mm512_set1_ps(threshold);
  const __m512i step = _mm512_set1_epi32(16);
  __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t c = 0, i = 0;
  for (; i + 16 <= n; i += 16) {  // compress into a register, store all 16 lanes (out has 16 spare)
    const __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + i), t, _CMP_GE_OQ);
    _mm512_storeu_si512(out + c, _mm512_maskz_compress_epi32(m, idx));
    c += __builtin_popcount(m);
    idx = _mm512_add_epi32(idx, step);
  }
  return select_ge_from(s, i, n, threshold, out, c);
}
}  // namespace hetero
#else
namespace hetero {
HETERO_IVF_CENTROID_FN(ivf_centroid_scores_avx512) {
  ivf_centroid_scores_scalar(q, G, D, centroids_t, L, row, out);
}
HETERO_IVF_SCORE_FN(ivf_scores_avx512) { ivf_scores_scalar(codes, n, Dp, qi, qscale, G, out, out_stride); }
HETERO_IVF_SCORE_FN(ivf_scores4_avx512) { ivf_scores4_scalar(codes, n, Dp, qi, qscale, G, out, out_stride); }
int64_t ivf_select_ge_avx512(const float* s, int64_t n, float threshold, int32_t* out) {
  return ivf_select_ge_scalar(s, n, threshold, out);
}
}  // namespace hetero
#endif
