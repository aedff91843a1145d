// IEEE half precision for portable code paths. Internal linkage: every translation unit (whatever ISA it is compiled
// for) keeps its own copy, so the linker never hands one unit's vector code to another.
#pragma once
#include <cstdint>

namespace {

// IEEE half (bits) -> float, exact (normals, subnormals, infinities, NaN).
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalize
      int e = -1;
      uint32_t m = man;
      do { ++e; m <<= 1; } while ((m & 0x400u) == 0);
      bits = sign | ((127 - 15 - e) << 23) | ((m & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

// float -> IEEE half bits, round to nearest even (as torch's conversion): overflow to inf, subnormals, NaN kept NaN.
inline uint16_t float_to_half_bits(float f) {
  uint32_t x;
  __builtin_memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0u);  // inf, NaN
  if (x >= 0x477ff000u) return sign | 0x7c00u;                                      // >= 65520 rounds to inf
  if (x < 0x38800000u) {                                                            // below 2^-14: subnormal or 0
    if (x < 0x33000000u) return sign;                                               // below 2^-25 (a tie at it: 0)
    const int shift = 126 - static_cast<int>(x >> 23);                              // 14 .. 24
    const uint32_t m = (x & 0x7fffffu) | 0x800000u;
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    r += rem > half || (rem == half && (r & 1u));
    return sign | static_cast<uint16_t>(r);
  }
  uint32_t h = (x >> 13) - (112u << 10);  // rebias the exponent, keep 10 mantissa bits
  const uint32_t rem = x & 0x1fffu;
  h += rem > 0x1000u || (rem == 0x1000u && (h & 1u));  // a carry into the exponent is the right rounding
  return sign | static_cast<uint16_t>(h);
}

// bfloat16 bits -> float, exact.
inline float bf16_bits_to_float(uint16_t x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

// float -> bfloat16 bits, round to nearest even (as torch's conversion); NaN stays NaN.
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t bits;
  __builtin_memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// Element i of a buffer of storage dtype `dtype` (0 float32, 1 bfloat16, 2 float16) as float, and the reverse.
inline float load_as_float(const void* p, int64_t i, int dtype) {
  if (dtype == 0) return static_cast<const float*>(p)[i];
  const uint16_t x = static_cast<const uint16_t*>(p)[i];
  return dtype == 1 ? bf16_bits_to_float(x) : half_bits_to_float(x);
}

inline void store_from_float(void* p, int64_t i, int dtype, float x) {
  if (dtype == 0)
    static_cast<float*>(p)[i] = x;
  else
    static_cast<uint16_t*>(p)[i] = dtype == 1 ? float_to_bf16_bits(x) : float_to_half_bits(x);
}

}  // namespace
