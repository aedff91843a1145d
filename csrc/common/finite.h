// Finiteness check of a strided tensor in one pass (input validation on the decode path: one call instead of
// torch's isfinite + all + item, each of which costs 50-150 us when the step's other work has left the caches cold).
#pragma once
#include <cstdint>

namespace hetero {

// True when every element of the tensor (dtype: 0 float32, 1 bfloat16, 2 float16; ndim <= 8 dims of sizes
// `shape` and element strides `strides`) has a magnitude whose bits (sign cleared) are at most `max_abs_bits`: the
// bits of the largest magnitude allowed in that dtype. NaN and inf have larger magnitude bits than any finite value,
// so they always fail; an IEEE float's magnitude orders as its bits do, so no float arithmetic is needed.
bool all_within(const void* data, int dtype, int ndim, const int64_t* shape, const int64_t* strides,
                uint32_t max_abs_bits);

// all_within the dtype's largest finite value: no NaN or +-inf.
bool all_finite(const void* data, int dtype, int ndim, const int64_t* shape, const int64_t* strides);

}  // namespace hetero
