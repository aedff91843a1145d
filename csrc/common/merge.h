// Exact fusion of partial attentions by log-sum-exp (the contract of hetero/merge.py), the one merge of the host
// side: the Python merge of CPU parts, the chunk partials of a split work item and the decode step's final fusion
// of window, host rows and estimate all call it.
#pragma once
#include <cstdint>

namespace hetero {

// Row of P parts: outs[p] points at D floats, lses[p] is the part's natural-log LSE. Writes out [D] and returns the
// merged LSE. Empty parts (-inf) are neutral whatever their out holds; all empty gives (0, -inf); +inf parts share
// all the weight equally; a NaN LSE makes the row NaN (a broken part must show, not vanish).
float merge_row(int P, const float* const* outs, const float* lses, int64_t D, float* out);

// rows x merge_row: part p's row r at outs[p] + r * D and lses[p][r]; out [rows, D], lse [rows].
void merge_rows(int P, const float* const* outs, const float* const* lses, int64_t rows, int64_t D, float* out,
                float* lse);

}  // namespace hetero
