// AVX2 + FMA + F16C path. Only called when the CPU reports these features (cpu_features.cpp).
// Standard headers first, under the default target: their inline functions must not be compiled for
// this ISA (the linker could keep that copy for every caller).
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,fma,f16c")
#include "common/x86_intrinsics.h"  // <immintrin.h>, minus GCC 12's false positives in it
#endif
#include "sparse/sparse_attention.h"
#include "sparse/sparse_kernel.inc"

#if defined(__x86_64__) || defined(_M_X64)
namespace {

struct Avx2V {
  using R = __m256;
  static constexpr int W = 8;
  static constexpr bool kBf16Pairs = true;
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(float x) { return _mm256_set1_ps(x); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, R x) { _mm256_storeu_ps(p, x); }
  static R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R max(R a, R b) { return _mm256_max_ps(a, b); }
  static float hmax(R x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
  static R fmadd(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  // Horizontal sums of four vectors at once (transpose-add): out[i] = sum of lanes of the i-th.
  static void reduce4(R a, R b, R c, R d, float* out) {
    const R ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);
    const R abcd = _mm256_hadd_ps(ab, cd);  // per 128-bit half: a, b, c, d partial sums
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
  }
  // exp(x) = 2^n * P(r), r = x - n ln2, |r| <= ln2/2; degree-6 Taylor (rel. error ~1e-7); x < -87.3 -> 0.
  static R exp(R x) {
    const R lo = _mm256_set1_ps(-87.3f);
    const R tiny = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.3f));
    const R n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    R r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    R p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
  }
  template <DType DT> static R load_elem(const typename Elem<DT>::T* p) {
    if constexpr (DT == DType::F32) {
      return _mm256_loadu_ps(p);
    } else if constexpr (DT == DType::BF16) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
    } else {
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    }
  }
  // 16 bf16 elements from one load as two float vectors, without widening shuffles: the even elements (each 32-bit
  // word shifted up: element 2i is its low half) and the odd ones (its high half, the low half masked off).
  static void load_bf16_pair(const uint16_t* p, R& even, R& odd) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  // dst[0:16] += the 16 values held as (even, odd) elements (load_bf16_pair's order).
  static void add_pair(float* dst, R even, R odd) {
    const R lo = _mm256_unpacklo_ps(even, odd);  // elements 0-3 | 8-11
    const R hi = _mm256_unpackhi_ps(even, odd);  // elements 4-7 | 12-15
    store(dst, add(load(dst), _mm256_permute2f128_ps(lo, hi, 0x20)));
    store(dst + W, add(load(dst + W), _mm256_permute2f128_ps(lo, hi, 0x31)));
  }
  // NQ (<= 4) queries x two rows per block: 2 NQ accumulators, 2 key vectors and a query vector fit the 16 ymm
  // registers, and each query vector is loaded once per two rows (the row-at-a-time form reloads it per row). Rows
  // r >= nr point at the zero row (attend_rows pads with it), so the second row of a pair always exists.
  template <DType DT, int NQ>
  static void dots_block(const float* qg, int64_t D, const typename Elem<DT>::T* const* krows, int nr, float* out) {
    for (int r0 = 0; r0 < nr; r0 += 2) {
      const typename Elem<DT>::T* k0 = krows[r0];
      const typename Elem<DT>::T* k1 = krows[r0 + 1];
      R acc[8];
      for (int i = 0; i < 8; ++i) acc[i] = zero();
      for (int64_t d = 0; d < D; d += W) {
        const R a = load_elem<DT>(k0 + d), b = load_elem<DT>(k1 + d);
        for (int g = 0; g < NQ; ++g) {
          const R qv = _mm256_loadu_ps(qg + g * D + d);
          acc[2 * g] = _mm256_fmadd_ps(qv, a, acc[2 * g]);
          acc[2 * g + 1] = _mm256_fmadd_ps(qv, b, acc[2 * g + 1]);
        }
      }
      store_pair_sums<NQ>(acc, r0, out);
    }
  }
  // The dots of a block's two rows: s0 / s1 from acc[2g] / acc[2g + 1] of each query g < NQ, into the score tile.
  template <int NQ>
  static void store_pair_sums(const R* acc, int r0, float* out) {
    float s0[4], s1[4];
    reduce4(acc[0], NQ > 1 ? acc[2] : zero(), NQ > 2 ? acc[4] : zero(), NQ > 3 ? acc[6] : zero(), s0);
    reduce4(acc[1], NQ > 1 ? acc[3] : zero(), NQ > 2 ? acc[5] : zero(), NQ > 3 ? acc[7] : zero(), s1);
    for (int g = 0; g < NQ; ++g) {
      out[g * kTileStride + r0] = s0[g];
      out[g * kTileStride + r0 + 1] = s1[g];
    }
  }
  // Any G in blocks of four queries, the last block holding the remaining 1-3 (for_query_blocks).
  template <DType DT>
  static void dots4(const float* q, int64_t G, int64_t D, const typename Elem<DT>::T* const* krows, int nr,
                    float* out, float* tmp) {
    if (nr < 2 || D % W != 0) {
      rowwise_dots4<Avx2V, DT>(q, G, D, krows, nr, out, tmp);
      return;
    }
    for_query_blocks(G, [&](auto nq, int64_t g0) {
      dots_block<DT, decltype(nq)::size>(q + g0 * D, D, krows, nr, out + g0 * kTileStride);
    });
  }
};

// bf16 rows with the queries in load_bf16_pair's order: each 16-element slice of q_g stored as its 8 even elements,
// then its 8 odd ones (qp [G, D], D % 16 == 0), so that a key slice is used as loaded. NQ (<= 4) queries x two rows
// per block as Avx2V::dots_block (2 NQ accumulators, 4 key and 2 query vectors: at most 14 of the 16 registers);
// rows r >= nr point at the zero row (attend_rows pads with it), so the block never falls back to the row-at-a-time
// form.
template <int NQ>
void dots_block_bf16_pairs(const float* qg, int64_t D, const uint16_t* const* krows, int nr, float* out) {
  for (int r0 = 0; r0 < nr; r0 += 2) {
    const uint16_t* k0 = krows[r0];
    const uint16_t* k1 = krows[r0 + 1];
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      __m256 a0, a1, b0, b1;
      Avx2V::load_bf16_pair(k0 + d, a0, a1);
      Avx2V::load_bf16_pair(k1 + d, b0, b1);
      for (int g = 0; g < NQ; ++g) {
        const __m256 q0 = _mm256_loadu_ps(qg + g * D + d), q1 = _mm256_loadu_ps(qg + g * D + d + 8);
        acc[2 * g] = _mm256_fmadd_ps(q1, a1, _mm256_fmadd_ps(q0, a0, acc[2 * g]));
        acc[2 * g + 1] = _mm256_fmadd_ps(q1, b1, _mm256_fmadd_ps(q0, b0, acc[2 * g + 1]));
      }
    }
    Avx2V::store_pair_sums<NQ>(acc, r0, out);
  }
}

void dots4_bf16_pairs(const float* qp, int64_t G, int64_t D, const uint16_t* const* krows, int nr, float* out) {
  for_query_blocks(G, [&](auto nq, int64_t g0) {
    dots_block_bf16_pairs<decltype(nq)::size>(qp + g0 * D, D, krows, nr, out + g0 * kTileStride);
  });
}

// A bf16 work item through dots4_bf16_pairs (D % 16 == 0; any other goes through dispatch_item).
// The permuted queries live in the item scratch's extra region (G * (D + 32) floats, sparse_attention.h).
void bf16_pairs_item(const SparseArgs& a, int64_t b, int64_t h, int64_t j0, int64_t j1, float* out_g, float* lse_g,
                     float* scratch) {
  const int64_t G = a.Hq / a.Hkv, n = j1 - j0, D = a.D;
  ItemScratch s(scratch, G, n, D);
  float* qp = s.extra;
  const float* q = a.q + (b * a.Hq + h * G) * D;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; d += 16)
      for (int64_t i = 0; i < 8; ++i) {
        qp[g * D + d + i] = q[g * D + d + 2 * i];
        qp[g * D + d + 8 + i] = q[g * D + d + 2 * i + 1];
      }
  resolve_rows(a, item_indices(a, b, h), item_table(a, b), j0, j1, s.rows);
  attend_rows<Avx2V, DType::BF16>(a, b, h, j0, n, s.rows, s, out_g, lse_g,
                                  [&](const uint16_t* const* krows, int nr, float* out) {
                                    dots4_bf16_pairs(qp, G, D, krows, nr, out);
                                  });
}

}  // namespace

namespace hetero {
void sparse_item_avx2(const SparseArgs& a, int64_t b, int64_t h, int64_t j0, int64_t j1, float* out_g,
                      float* lse_g, float* scratch) {
  if (a.dtype == DType::BF16 && a.D % 16 == 0) {
    bf16_pairs_item(a, b, h, j0, j1, out_g, lse_g, scratch);
    return;
  }
  dispatch_item<Avx2V>(a, b, h, j0, j1, out_g, lse_g, scratch);
}
void attend_logits_avx2(float* logits, int64_t G, int64_t R, int64_t stride, const uint16_t* vrows,
                        int64_t D, int64_t* rows, float* out, float* lse) {
  attend_logits_impl<Avx2V>(logits, G, R, stride, vrows, D, rows, out, lse);
}
}  // namespace hetero
#else
namespace hetero {
void sparse_item_avx2(const SparseArgs& a, int64_t b, int64_t h, int64_t j0, int64_t j1, float* out_g,
                      float* lse_g, float* scratch) {
  sparse_item_scalar(a, b, h, j0, j1, out_g, lse_g, scratch);
}
void attend_logits_avx2(float* logits, int64_t G, int64_t R, int64_t stride, const uint16_t* vrows,
                        int64_t D, int64_t* rows, float* out, float* lse) {
  attend_logits_scalar(logits, G, R, stride, vrows, D, rows, out, lse);
}
}  // namespace hetero
#endif
