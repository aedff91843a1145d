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
  // Four queries x two rows per block: 8 accumulators, 2 key vectors and a query vector fit the 16 ymm
  // registers, and each query vector is loaded once per two rows (the row-at-a-time form reloads it per row).
  // Rows r >= nr point at the zero row (attend_rows pads with it), so the second row of a pair always exists.
  template <DType DT>
  static void dots4(const float* q, int64_t G, int64_t D, const typename Elem<DT>::T* const* krows, int nr,
                    float* out, float* tmp) {
    if (G % 4 != 0 || nr < 2 || D % W != 0) {
      rowwise_dots4<Avx2V, DT>(q, G, D, krows, nr, out, tmp);
      return;
    }
    for (int64_t g0 = 0; g0 < G; g0 += 4) {
      const float* qg = q + g0 * D;
      for (int r0 = 0; r0 < nr; r0 += 2) {
        const typename Elem<DT>::T* k0 = krows[r0];
        const typename Elem<DT>::T* k1 = krows[r0 + 1];
        R acc[8];
        for (int i = 0; i < 8; ++i) acc[i] = zero();
        for (int64_t d = 0; d < D; d += W) {
          const R a = load_elem<DT>(k0 + d), b = load_elem<DT>(k1 + d);
          for (int g = 0; g < 4; ++g) {
            const R qv = _mm256_loadu_ps(qg + g * D + d);
            acc[2 * g] = _mm256_fmadd_ps(qv, a, acc[2 * g]);
            acc[2 * g + 1] = _mm256_fmadd_ps(qv, b, acc[2 * g + 1]);
          }
        }
        float s0[4], s1[4];
        reduce4(acc[0], acc[2], acc[4], acc[6], s0);
        reduce4(acc[1], acc[3], acc[5], acc[7], s1);
        for (int g = 0; g < 4; ++g) {
          out[(g0 + g) * kTileStride + r0] = s0[g];
          out[(g0 + g) * kTileStride + r0 + 1] = s1[g];
        }
      }
    }
  }
};

}  // namespace

namespace hetero {
void sparse_item_avx2(const SparseArgs& a, int64_t b, int64_t h, int64_t j0, int64_t j1, float* out_g,
                      float* lse_g, float* scratch) {
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
