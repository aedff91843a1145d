// <immintrin.h> for the per-ISA translation units: include this right after their `#pragma GCC target(...)`,
// never from a header shared with code built for the default target.
//
// Why not include <immintrin.h> directly: GCC 12's AVX-512 headers give the unused pass-through operand of the
// unmasked intrinsics (_mm512_max_ps, _mm512_cvtepi32_ps, _mm512_extractf32x4_ps, _mm512_cvtepu16_epi32, ...)
// from _mm512_undefined_ps() and friends, written as the deliberate self-initialization `__m512 __Y = __Y;`.
// Once inlined into our loops, -Wmaybe-uninitialized / -Wuninitialized report that `__Y` (about 300 times per
// build). It is a known false positive inside the compiler's own header (the value is never read: the mask is
// all ones), GCC bug 105593, fixed in GCC 13 whose header silences it itself. There is nothing to initialize on
// our side, so the two warnings are ignored for the text of this header only: the pragma's region is the
// header's lines, so a real uninitialized variable in hetero's own code is still reported.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#else
#include <immintrin.h>
#endif
#endif
