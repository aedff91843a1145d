// Exact fusion of two partial attentions by log-sum-exp (the contract of hetero/merge.py).
#pragma once
#include <cstdint>

namespace hetero {

// out [rows, D], lse [rows] from parts a and b of the same shapes, float32, natural-log LSE. Empty parts
// (lse -inf) are neutral whatever their out holds; all empty gives (0, -inf); +inf parts share all the weight.
void merge2_f32(const float* out_a, const float* lse_a, const float* out_b, const float* lse_b, int64_t rows,
                int64_t D, float* out, float* lse);

}  // namespace hetero
