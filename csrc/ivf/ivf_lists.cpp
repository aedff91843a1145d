#include "ivf/ivf_lists.h"

#include <cmath>
#include <cstring>

#include "common/half.h"

namespace hetero {

void ivf_nearest_lists(const float* keys, int64_t n, int64_t D, const uint16_t* centroids_t, int64_t L,
                       IvfCentroidFn centroids, float* scores, float* row, int64_t* out) {
  centroids(keys, n, D, centroids_t, L, row, scores);
  for (int64_t j = 0; j < n; ++j) {
    const float* s = scores + j * L;
    int64_t best = 0;
    for (int64_t l = 1; l < L; ++l)
      if (s[l] > s[best]) best = l;
    out[j] = best;
  }
}

bool ivf_tail_fits(const IvfTailArgs& a) {
  const int64_t lists = a.L + 1;
  std::vector<int64_t> add(static_cast<size_t>(lists));
  for (int64_t h = 0; h < a.H; ++h) {
    const int64_t* start = a.start + h * lists;
    const int64_t* count = a.count + h * lists;
    const int64_t* cap = a.cap + h * lists;
    if (count[a.L] != a.t || start[a.L] < 0 || start[a.L] + a.t > a.ids_head) return false;
    std::fill(add.begin(), add.end(), 0);
    for (int64_t j = 0; j < a.t; ++j) {
      const int64_t l = a.assign[h * a.t + j];
      if (l < 0 || l >= a.L) return false;
      if (count[l] + ++add[l] > cap[l] || start[l] < 0 || start[l] + cap[l] > a.ids_head) return false;
    }
  }
  return true;
}

void ivf_tail_flush_head(const IvfTailArgs& a, int64_t h, std::vector<uint8_t>& touched) {
  const int64_t lists = a.L + 1, D = a.D, row_bytes = a.bits == 4 ? a.Dp / 2 : a.Dp;
  int64_t* start = a.start + h * lists;
  int64_t* count = a.count + h * lists;
  uint8_t* arena = a.codes + h * a.codes_head;
  int32_t* id = a.ids + h * a.ids_head;
  float* ksum = a.ksum + h * lists * D;
  float* vsum = a.vsum + h * lists * D;
  uint16_t* vmean = a.vmean + h * lists * D;
  touched.assign(static_cast<size_t>(lists), 0);
  const int64_t first = start[a.L];
  for (int64_t j = 0; j < a.t; ++j) {
    const int64_t l = a.assign[h * a.t + j], src = first + j, dst = start[l] + count[l];
    for (int64_t g = 0; g < row_bytes; g += 4)  // a row's 4-byte groups, 64 bytes apart in its block
      std::memcpy(arena + code_offset(dst, g, row_bytes), arena + code_offset(src, g, row_bytes), 4);
    id[dst] = id[src];
    count[l] += 1;
    const float* key = a.tail_keys + (h * a.tail_cap + j) * D;
    const float* value = a.tail_values + (h * a.tail_cap + j) * D;
    for (int64_t d = 0; d < D; ++d) {
      ksum[l * D + d] += key[d];
      vsum[l * D + d] += value[d];
    }
    touched[l] = 1;
  }
  for (int64_t l = 0; l < a.L; ++l) {
    if (!touched[l]) continue;
    const float inv = 1.0f / static_cast<float>(count[l]);
    const float* ks = ksum + l * D;
    double squares = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      vmean[l * D + d] = float_to_bf16_bits(vsum[l * D + d] * inv);
      squares += static_cast<double>(ks[d]) * static_cast<double>(ks[d]);
    }
    const float norm = static_cast<float>(std::sqrt(squares));
    a.mean_norm[h * a.L + l] = norm * inv;
    if (norm > 0.0f)
      for (int64_t d = 0; d < D; ++d) a.centroids_t[(h * D + d) * a.L + l] = float_to_half_bits(ks[d] / norm);
  }
  count[a.L] = 0;
  for (int64_t d = 0; d < D; ++d) {
    ksum[a.L * D + d] = 0.0f;
    vsum[a.L * D + d] = 0.0f;
    vmean[a.L * D + d] = 0;
  }
}

}  // namespace hetero
