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

// float -> bfloat16 bits, round to nearest even (finite inputs; the index's statistics are finite).
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t bits;
  __builtin_memcpy(&bits, &f, 4);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

}  // namespace
