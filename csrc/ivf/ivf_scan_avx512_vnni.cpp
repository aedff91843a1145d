// AVX-512 VNNI code scoring for the grouped IVF search: vpdpbusd (u8 x s8, four products per int32 lane).
// Only called when the CPU reports AVX-512 F/BW/VL/DQ and VNNI.
#include <cstdint>

#include "ivf/ivf_scan.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")
#include "common/x86_intrinsics.h"  // <immintrin.h>, minus GCC 12's false positives in it

namespace {
inline __m512i dot_u8s8(__m512i acc, __m512i u8, __m512i s8) { return _mm512_dpbusd_epi32(acc, u8, s8); }
}  // namespace

#define IVF_SCORE_NAME ivf_scores_avx512_vnni
#define IVF_SCORE4_NAME ivf_scores4_avx512_vnni
#include "ivf/ivf_scan_avx512.inc"
#else
namespace hetero {
HETERO_IVF_SCORE_FN(ivf_scores_avx512_vnni) { ivf_scores_scalar(codes, n, Dp, qi, qscale, G, out, out_stride); }
HETERO_IVF_SCORE_FN(ivf_scores4_avx512_vnni) { ivf_scores4_scalar(codes, n, Dp, qi, qscale, G, out, out_stride); }
}  // namespace hetero
#endif
