// AVX-512 paths (F + BW + VL, and with AVX512_BF16 dot products for bf16 keys). Only called when the CPU
// reports these features (cpu_features.cpp).
// Standard headers first, under the default target: their inline functions must not be compiled for
// this ISA (the linker could keep that copy for every caller).
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")
#include "common/x86_intrinsics.h"  // <immintrin.h>, minus GCC 12's false positives in it
#endif
#include "sparse/sparse_attention.h"
#include "sparse/sparse_kernel.inc"

#if defined(__x86_64__) || defined(_M_X64)
namespace {

struct Avx512V {
  using R = __m512;
  static constexpr int W = 16;
  static constexpr bool kBf16Pairs = false;  // value_tile_bf16_pairs (sparse_kernel.inc) not used
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(float x) { return _mm512_set1_ps(x); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, R x) { _mm512_storeu_ps(p, x); }
  static R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R max(R a, R b) { return _mm512_max_ps(a, b); }
  static float hmax(R x) { return _mm512_reduce_max_ps(x); }
  static R fmadd(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  // Horizontal sums of four vectors at once (transpose-add): out[i] = sum of lanes of the i-th.
  static void reduce4(R a, R b, R c, R d, float* out) {
    const R x = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // a02 b02 a13 b13 / lane
    const R y = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    const R z = _mm512_add_ps(_mm512_shuffle_ps(x, y, 0x44), _mm512_shuffle_ps(x, y, 0xEE));  // a b c d / lane
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(z), _mm512_extractf32x8_ps(z, 1));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }
  // Same polynomial as the AVX2 path; x < -87.3 -> 0.
  static R exp(R x) {
    const R lo = _mm512_set1_ps(-87.3f);
    const __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(88.3f));
    const R n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    R r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    R p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mul_ps(static_cast<__mmask16>(~tiny), p, _mm512_castsi512_ps(e));
  }
  template <DType DT> static R load_elem(const typename Elem<DT>::T* p) {
    if constexpr (DT == DType::F32) {
      return _mm512_loadu_ps(p);
    } else if constexpr (DT == DType::BF16) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    } else {
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
  }
  // The first n (< 16) elements, the rest zero.
  template <DType DT> static R load_elem_partial(const typename Elem<DT>::T* p, int64_t n) {
    const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
    if constexpr (DT == DType::F32) {
      return _mm512_maskz_loadu_ps(mask, p);
    } else if constexpr (DT == DType::BF16) {
      const __m256i raw = _mm256_maskz_loadu_epi16(mask, p);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    } else {
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p));
    }
  }
  template <DType DT>
  static void dots4(const float* q, int64_t G, int64_t D, const typename Elem<DT>::T* const* krows, int nr,
                    float* out, float* tmp);
};

// Sums each of 16 vectors: lanes 4g..4g+3 of the result hold the sums of x[4g] .. x[4g+3]. A transpose-and-add
// tree: pairs within 128-bit lanes, then quadruples, then across the four 128-bit lanes.
inline __m512 sum16(const __m512* x) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(x[2 * i], x[2 * i + 1]), _mm512_unpackhi_ps(x[2 * i], x[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44), _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
  const __m512 v01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
  const __m512 v23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(v01, v23, 0x88), _mm512_shuffle_f32x4(v01, v23, 0xDD));
}

// NQ (<= 4) queries x four rows per block: the 4 NQ dot products accumulate in registers, each query vector is
// loaded once per four rows (the row-at-a-time form reloads it per row), and one sum16 tree reduces them (zeros in
// the places of absent queries). Measured per selected row from L1 (G = 4, D = 128, one thread): see
// docs/performance.md.
template <DType DT, int NQ>
inline void dots_block(const float* qg, int64_t D, const typename Elem<DT>::T* const* krows, float* out) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    __m512 k[4];
    for (int r = 0; r < 4; ++r) k[r] = Avx512V::load_elem<DT>(krows[r] + d);
    for (int g = 0; g < NQ; ++g) {
      const __m512 qv = _mm512_loadu_ps(qg + g * D + d);
      for (int r = 0; r < 4; ++r) acc[4 * g + r] = _mm512_fmadd_ps(qv, k[r], acc[4 * g + r]);
    }
  }
  if (d < D) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (D - d)) - 1);
    __m512 k[4];
    for (int r = 0; r < 4; ++r) k[r] = Avx512V::load_elem_partial<DT>(krows[r] + d, D - d);
    for (int g = 0; g < NQ; ++g) {
      const __m512 qv = _mm512_maskz_loadu_ps(mask, qg + g * D + d);
      for (int r = 0; r < 4; ++r) acc[4 * g + r] = _mm512_fmadd_ps(qv, k[r], acc[4 * g + r]);
    }
  }
  const __m512 sums = sum16(acc);
  for (int g = 0; g < NQ; ++g) _mm_storeu_ps(out + g * kTileStride, _mm512_extractf32x4_ps(sums, g));
}

// Any G in blocks of four queries, the last block holding the remaining 1-3 (for_query_blocks).
template <DType DT>
void Avx512V::dots4(const float* q, int64_t G, int64_t D, const typename Elem<DT>::T* const* krows, int nr,
                    float* out, float* tmp) {
  if (nr < 2) {
    rowwise_dots4<Avx512V, DT>(q, G, D, krows, nr, out, tmp);
    return;
  }
  for_query_blocks(G, [&](auto nq, int64_t g0) {
    dots_block<DT, decltype(nq)::size>(q + g0 * D, D, krows, out + g0 * kTileStride);
  });
}

// bf16 keys with AVX512_BF16: dpbf16 consumes 32 key elements per instruction unwidened, but multiplies bf16 by
// bf16. A float32 query would need three bf16 parts (q = q0 + q1 + q2) to keep float32 accuracy (two keep only
// ~16 bits: 5e-6 relative, measured), costing more than widening the keys. So only a query whose values are
// already bf16 (a bf16 model's q, checked per item) takes dpbf16, in the same blocks of up to 4 queries x 4 rows
// as the widening path (dots_block_bf16); any other goes to the widening path (sparse_item_avx512_bf16). Per
// selected row from L1 (G = 4, D = 128, one thread, Emerald Rapids): blocked dpbf16 27.5-29.9 ns, widening + FMA
// 26.8-27.0 ns (dpbf16 issues at one per cycle: 16 of them cost what 32 FMAs on two ports do); row-at-a-time
// dpbf16 37-39 ns.

// qs: [G, Dp] bf16 bits of q (Dp = D rounded up to 32, zero padded). Returns false, at the first element that is
// not exactly a bf16 value, when q is not all bf16 values (a float32 query: stops within a few elements, so the
// check costs such queries little; splitting them into three bf16 parts anyway cost 4.7 % of a bf16 item on Zen 4).
bool bf16_queries(const float* q, int64_t G, int64_t D, int64_t Dp, uint16_t* qs) {
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t d = 0; d < Dp; ++d) {
      uint32_t bits = 0;
      if (d < D) __builtin_memcpy(&bits, q + g * D + d, 4);
      if (bits & 0xffffu) return false;
      qs[g * Dp + d] = static_cast<uint16_t>(bits >> 16);
    }
  }
  return true;
}

// Dots of NQ (<= 4) queries with one bf16 row: each 32-element slice of the row is loaded once and fed to one
// dpbf16 per query; the NQ accumulators are reduced together.
template <int NQ>
inline void dot_bf16_rows(const uint16_t* q, int64_t Dp, const uint16_t* row, int64_t D, float* out) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t d = 0; d < D; d += 32) {
    const __m512i k = d + 32 <= D ? _mm512_loadu_si512(row + d)
                                  : _mm512_maskz_loadu_epi16(static_cast<__mmask32>((1ull << (D - d)) - 1), row + d);
    for (int g = 0; g < NQ; ++g)
      acc[g] = _mm512_dpbf16_ps(acc[g], (__m512bh)_mm512_loadu_si512(q + g * Dp + d), (__m512bh)k);
  }
  float s[4];
  Avx512V::reduce4(acc[0], acc[1], acc[2], acc[3], s);
  for (int g = 0; g < NQ; ++g) out[g] = s[g];
}

// NQ (<= 4) queries x four rows per block, as dots_block: each 32-element slice of a row is loaded once and fed
// to one dpbf16 per query, the 4 NQ accumulators reduced by one sum16 tree. Rows r >= nr point at the zero row
// (attend_rows pads with it).
template <int NQ>
inline void dots_block_bf16(const uint16_t* qg, int64_t Dp, int64_t D, const uint16_t* const* krows, float* out) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 32) {
    const __mmask32 mask = D - d >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1ull << (D - d)) - 1);
    __m512bh k[4];
    for (int r = 0; r < 4; ++r) k[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, krows[r] + d);
    for (int g = 0; g < NQ; ++g) {
      const __m512bh qv = (__m512bh)_mm512_loadu_si512(qg + g * Dp + d);
      for (int r = 0; r < 4; ++r) acc[4 * g + r] = _mm512_dpbf16_ps(acc[4 * g + r], qv, k[r]);
    }
  }
  const __m512 sums = sum16(acc);
  for (int g = 0; g < NQ; ++g) _mm_storeu_ps(out + g * kTileStride, _mm512_extractf32x4_ps(sums, g));
}

// Returns false (and does nothing) when q is not all bf16 values.
bool bf16_item(const SparseArgs& a, int64_t b, int64_t h, int64_t j0, int64_t j1, float* out_g, float* lse_g,
               float* scratch) {
  const int64_t G = a.Hq / a.Hkv, n = j1 - j0, D = a.D, Dp = (D + 31) / 32 * 32;
  ItemScratch s(scratch, G, n, D);
  uint16_t* qs = reinterpret_cast<uint16_t*>(s.extra);  // G * Dp uint16
  if (!bf16_queries(a.q + (b * a.Hq + h * G) * D, G, D, Dp, qs)) return false;
  resolve_rows(a, item_indices(a, b, h), item_table(a, b), j0, j1, s.rows);
  const auto dot_row = [&](const uint16_t* row, float* o) {
    for_query_blocks(G, [&](auto nq, int64_t g) {
      dot_bf16_rows<decltype(nq)::size>(qs + g * Dp, Dp, row, D, o + g);
    });
  };
  attend_rows<Avx512V, DType::BF16>(a, b, h, j0, n, s.rows, s, out_g, lse_g,
                                    [&](const uint16_t* const* krows, int nr, float* out) {
                                      if (nr < 2) {
                                        rows_to_tile(krows, nr, G, out, s.tmp, dot_row);
                                        return;
                                      }
                                      for_query_blocks(G, [&](auto nq, int64_t g0) {
                                        dots_block_bf16<decltype(nq)::size>(qs + g0 * Dp, Dp, D, krows,
                                                                            out + g0 * kTileStride);
                                      });
                                    });
  return true;
}

}  // namespace

namespace hetero {
void sparse_item_avx512(const SparseArgs& a, int64_t b, int64_t h, int64_t j0, int64_t j1, float* out_g,
                        float* lse_g, float* scratch) {
  dispatch_item<Avx512V>(a, b, h, j0, j1, out_g, lse_g, scratch);
}
void sparse_item_avx512_bf16(const SparseArgs& a, int64_t b, int64_t h, int64_t j0, int64_t j1, float* out_g,
                             float* lse_g, float* scratch) {
  if (a.dtype == DType::BF16 && bf16_item(a, b, h, j0, j1, out_g, lse_g, scratch)) return;
  dispatch_item<Avx512V>(a, b, h, j0, j1, out_g, lse_g, scratch);
}
void attend_logits_avx512(float* logits, int64_t G, int64_t R, int64_t stride, const uint16_t* vrows,
                          int64_t D, int64_t* rows, float* out, float* lse) {
  attend_logits_impl<Avx512V>(logits, G, R, stride, vrows, D, rows, out, lse);
}
}  // namespace hetero
#else
namespace hetero {
void sparse_item_avx512(const SparseArgs& a, int64_t b, int64_t h, int64_t j0, int64_t j1, float* out_g,
                        float* lse_g, float* scratch) {
  sparse_item_scalar(a, b, h, j0, j1, out_g, lse_g, scratch);
}
void sparse_item_avx512_bf16(const SparseArgs& a, int64_t b, int64_t h, int64_t j0, int64_t j1, float* out_g,
                             float* lse_g, float* scratch) {
  sparse_item_scalar(a, b, h, j0, j1, out_g, lse_g, scratch);
}
void attend_logits_avx512(float* logits, int64_t G, int64_t R, int64_t stride, const uint16_t* vrows,
                          int64_t D, int64_t* rows, float* out, float* lse) {
  attend_logits_scalar(logits, G, R, stride, vrows, D, rows, out, lse);
}
}  // namespace hetero
#endif
