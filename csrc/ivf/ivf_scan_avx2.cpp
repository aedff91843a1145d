// AVX2 code scoring for the grouped IVF search over the blocked arena (ivf_scan.h). Only called when the CPU
// reports AVX2.
#include <cmath>
#include <cstdint>

#include "ivf/ivf_scan.h"
#include "common/query_blocks.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma,f16c")
#include "common/x86_intrinsics.h"  // <immintrin.h>, minus GCC 12's false positives in it

namespace {

// Exact u8 x s8 dot products of 4-byte groups without VNNI: the even and odd bytes of each 16-bit lane as int16
// (codes unsigned, query signed), one vpmaddwd each. A query group (4 int8) becomes its even and odd bytes as two
// int16 per int32, broadcast.
inline __m256i dot_groups(__m256i acc, __m256i even_u, __m256i odd_u, const int8_t* q4) {
  const auto pair = [](int8_t a, int8_t b) {
    return static_cast<int32_t>(static_cast<uint16_t>(static_cast<int16_t>(a)) |
                                (static_cast<uint32_t>(static_cast<uint16_t>(static_cast<int16_t>(b))) << 16));
  };
  return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(even_u, _mm256_set1_epi32(pair(q4[0], q4[2]))),
                                                _mm256_madd_epi16(odd_u, _mm256_set1_epi32(pair(q4[1], q4[3])))));
}

// The 4 int8 query values of one group in every 32-bit lane.
inline __m256i broadcast4(const int8_t* q4) {
  int32_t bits;
  __builtin_memcpy(&bits, q4, 4);
  return _mm256_set1_epi32(bits);
}

// A 32-byte half of one 4-byte group across 8 rows: even / odd bytes widened to int16 lanes.
inline void split_bytes(__m256i x, __m256i* even_u, __m256i* odd_u) {
  *even_u = _mm256_and_si256(x, _mm256_set1_epi16(0x00FF));
  *odd_u = _mm256_srli_epi16(x, 8);
}

// Blocks of 16 rows over the blocked arena (ivf_scan.h), 8 rows per 256-bit vector (the two halves of each
// 64-byte group), NQ (<= 4) queries; FOUR: packed 4-bit rows, split into nibbles first.
template <int NQ, bool FOUR>
inline void block_scores(const uint8_t* block, int nr, int64_t Dp, const int8_t* qi, const float* qscale, float* out,
                         int64_t out_stride) {
  const int64_t groups = (FOUR ? Dp / 2 : Dp) / 4;
  const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int half = 0; half < 2 && 8 * half < nr; ++half) {
    __m256i acc[NQ];
    for (int g = 0; g < NQ; ++g) acc[g] = _mm256_setzero_si256();
    if constexpr (FOUR) {
      // Nibbles are at most 15, so one vpmaddubsw lane (two products) is at most 2 * 15 * 128 = 3840 in magnitude:
      // the int16 sums of kRun groups' two nibble halves stay below 32767 (exact, like the VNNI path) and are
      // widened to int32 once per run.
      constexpr int64_t kRun = 4;
      for (int64_t c0 = 0; c0 < groups; c0 += kRun) {
        const int64_t c1 = c0 + kRun < groups ? c0 + kRun : groups;
        __m256i part[NQ];
        for (int g = 0; g < NQ; ++g) part[g] = _mm256_setzero_si256();
        for (int64_t c = c0; c < c1; ++c) {
          const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + c * 64 + 32 * half));
          const __m256i lo = _mm256_and_si256(x, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), nibble);
          for (int g = 0; g < NQ; ++g)
            part[g] = _mm256_add_epi16(part[g], _mm256_add_epi16(
                _mm256_maddubs_epi16(lo, broadcast4(qi + g * Dp + 4 * c)),
                _mm256_maddubs_epi16(hi, broadcast4(qi + g * Dp + 4 * (groups + c)))));
        }
        for (int g = 0; g < NQ; ++g) acc[g] = _mm256_add_epi32(acc[g], _mm256_madd_epi16(part[g], ones));
      }
    } else {
      for (int64_t c = 0; c < groups; ++c) {
        __m256i ev, od;
        split_bytes(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + c * 64 + 32 * half)), &ev, &od);
        for (int g = 0; g < NQ; ++g) acc[g] = dot_groups(acc[g], ev, od, qi + g * Dp + 4 * c);
      }
    }
    const int rows = nr - 8 * half < 8 ? nr - 8 * half : 8;
    for (int g = 0; g < NQ; ++g) {
      alignas(32) float s[8];
      _mm256_store_ps(s, _mm256_mul_ps(_mm256_cvtepi32_ps(acc[g]), _mm256_set1_ps(qscale[g])));
      for (int r = 0; r < rows; ++r) out[g * out_stride + 8 * half + r] = s[r];
    }
  }
}

template <bool FOUR>
void scores_blocked(const uint8_t* codes, int64_t n, int64_t Dp, const int8_t* qi, const float* qscale, int64_t G,
                    float* out, int64_t out_stride) {
  const int64_t block_bytes = 16 * (FOUR ? Dp / 2 : Dp);
  for (int64_t i = 0; i < n; i += 16) {
    const int nr = static_cast<int>(n - i < 16 ? n - i : 16);
    for_query_blocks(G, [&](auto nq, int64_t g) {
      block_scores<decltype(nq)::size, FOUR>(codes + (i / 16) * block_bytes, nr, Dp, qi + g * Dp, qscale + g,
                                             out + g * out_stride + i, out_stride);
    });
  }
}

}  // namespace

namespace hetero {
namespace {
// NQ (<= 4) queries against the 16 lists l .. l + 16, all D dimensions accumulated in registers (as the AVX-512
// tile, ivf_scan_avx512.cpp); the line two tiles ahead is prefetched when `prefetch`.
template <int NQ>
inline void centroid_tile16(const float* q, int64_t D, const uint16_t* c, int64_t L, int64_t l, bool prefetch,
                            float* out) {
  __m256 acc[NQ][2];
#pragma GCC unroll 4
  for (int g = 0; g < NQ; ++g) acc[g][0] = acc[g][1] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const uint16_t* p = c + d * L + l;
    if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(p + 32), _MM_HINT_T0);
    const __m256 x0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256 x1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
#pragma GCC unroll 4
    for (int g = 0; g < NQ; ++g) {
      const __m256 qd = _mm256_set1_ps(q[g * D + d]);
      acc[g][0] = _mm256_fmadd_ps(qd, x0, acc[g][0]);
      acc[g][1] = _mm256_fmadd_ps(qd, x1, acc[g][1]);
    }
  }
#pragma GCC unroll 4
  for (int g = 0; g < NQ; ++g) {
    _mm256_storeu_ps(out + g * L + l, acc[g][0]);
    _mm256_storeu_ps(out + g * L + l + 8, acc[g][1]);
  }
}
}  // namespace

HETERO_IVF_CENTROID_FN(ivf_centroid_scores_avx2) {
  (void)row;
  int64_t l = 0;
  for (; l + 16 <= L; l += 16)
    for_query_blocks(G, [&](auto nq, int64_t g) {
      centroid_tile16<decltype(nq)::size>(q + g * D, D, centroids_t, L, l, l + 48 <= L, out + g * L);
    });
  for (int64_t g = 0; g < G; ++g)  // the last L % 16 lists
    for (int64_t m = l; m < L; ++m) {
      float s = 0.0f;
      for (int64_t d = 0; d < D; ++d) s = std::fma(q[g * D + d], half_bits_to_float(centroids_t[d * L + m]), s);
      out[g * L + m] = s;
    }
}

HETERO_IVF_SCORE_FN(ivf_scores_avx2) { scores_blocked<false>(codes, n, Dp, qi, qscale, G, out, out_stride); }
HETERO_IVF_SCORE_FN(ivf_scores4_avx2) { scores_blocked<true>(codes, n, Dp, qi, qscale, G, out, out_stride); }
}  // namespace hetero
#else
namespace hetero {
HETERO_IVF_CENTROID_FN(ivf_centroid_scores_avx2) {
  ivf_centroid_scores_scalar(q, G, D, centroids_t, L, row, out);
}
HETERO_IVF_SCORE_FN(ivf_scores_avx2) { ivf_scores_scalar(codes, n, Dp, qi, qscale, G, out, out_stride); }
HETERO_IVF_SCORE_FN(ivf_scores4_avx2) { ivf_scores4_scalar(codes, n, Dp, qi, qscale, G, out, out_stride); }
}  // namespace hetero
#endif
