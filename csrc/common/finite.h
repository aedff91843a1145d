// Finiteness check of a strided tensor in one pass (input validation on the decode path: one call instead of
// torch's isfinite + all + item, each of which costs 50-150 us when the step's other work has left the caches cold).
#pragma once
#include <cstdint>

namespace hetero {

// True when no element of the tensor (dtype: 0 float32, 1 bfloat16, 2 float16; ndim <= 8 dims of sizes `shape`
// and element strides `strides`) is NaN or +-inf. Tested on the exponent bits, so no float arithmetic.
bool all_finite(const void* data, int dtype, int ndim, const int64_t* shape, const int64_t* strides);

}  // namespace hetero
