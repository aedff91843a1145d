// Enumerations shared by every kernel family.
#pragma once

namespace hetero {

// Storage dtype of K/V rows (and of query and output buffers at the step's boundary).
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };
// Vector ISA levels, lowest first; a level includes the ones below it.
enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3 };

}  // namespace hetero
