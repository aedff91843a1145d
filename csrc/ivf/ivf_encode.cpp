// Encoding keys into an item's code arena (ivf_scan.h): the decode step's tail append in one call.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common/half.h"
#include "ivf/ivf_scan.h"

namespace hetero {

void ivf_encode_key(const float* key, int64_t D, const float* vmin, const float* inv_step, int64_t bits, int64_t Dp,
                    uint8_t* arena, int64_t row) {
  const float levels = bits == 4 ? 15.0f : 255.0f;
  const int64_t row_bytes = bits == 4 ? Dp / 2 : Dp;
  uint8_t code[kMaxCodeDims];
  for (int64_t d = 0; d < D; ++d) {
    const float x = std::nearbyint((key[d] - vmin[d]) * inv_step[d]);  // half to even, as np.rint
    code[d] = static_cast<uint8_t>(std::min(levels, std::max(0.0f, x)));
  }
  std::fill(code + D, code + Dp, uint8_t{0});
  for (int64_t b = 0; b < row_bytes; ++b)  // the blocked layout (code_offset)
    arena[code_offset(row, b, row_bytes)] = bits == 4 ? static_cast<uint8_t>(code[b] | (code[Dp / 2 + b] << 4)) : code[b];
}

void ivf_encode_rows(const float* keys, int64_t H, int64_t n, int64_t D, const float* vmin, const float* inv_step,
                     int64_t bits, int64_t Dp, const uint64_t* codes, const uint64_t* ids, const int64_t* first_row,
                     int32_t first_id, const float* values, const uint64_t* tail_ksum, const uint64_t* tail_vsum,
                     const uint64_t* tail_vmean, int64_t tail_count) {
  for (int64_t h = 0; h < H; ++h) {
    uint8_t* arena = reinterpret_cast<uint8_t*>(codes[h]);
    int32_t* id = reinterpret_cast<int32_t*>(ids[h]);
    for (int64_t j = 0; j < n; ++j) {
      ivf_encode_key(keys + (h * n + j) * D, D, vmin + h * D, inv_step + h * D, bits, Dp, arena, first_row[h] + j);
      id[first_row[h] + j] = first_id + static_cast<int32_t>(j);
    }
    if (!values) continue;
    float* ksum = reinterpret_cast<float*>(tail_ksum[h]);
    float* vsum = reinterpret_cast<float*>(tail_vsum[h]);
    uint16_t* vmean = reinterpret_cast<uint16_t*>(tail_vmean[h]);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t d = 0; d < D; ++d) {
        ksum[d] += keys[(h * n + j) * D + d];
        vsum[d] += values[(h * n + j) * D + d];
      }
    for (int64_t d = 0; d < D; ++d) vmean[d] = float_to_bf16_bits(vsum[d] / static_cast<float>(tail_count));
  }
}

}  // namespace hetero
