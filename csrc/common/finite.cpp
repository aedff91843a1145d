#include "common/finite.h"

namespace hetero {
namespace {

template <class T>
bool run_within(const T* p, int64_t n, int64_t stride, T abs_mask, T max_abs) {
  T bad = 0;
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) bad |= static_cast<T>((p[i] & abs_mask) > max_abs);
  } else {
    for (int64_t i = 0; i < n; ++i) bad |= static_cast<T>((p[i * stride] & abs_mask) > max_abs);
  }
  return bad == 0;
}

template <class T>
bool within_nd(const T* p, int ndim, const int64_t* shape, const int64_t* strides, T abs_mask, T max_abs) {
  if (ndim == 0) return run_within(p, 1, 1, abs_mask, max_abs);
  for (int d = 0; d < ndim; ++d)
    if (shape[d] == 0) return true;
  int64_t index[8] = {0};
  const int last = ndim - 1;
  for (;;) {  // odometer over every dimension but the last
    int64_t offset = 0;
    for (int d = 0; d < last; ++d) offset += index[d] * strides[d];
    if (!run_within(p + offset, shape[last], strides[last], abs_mask, max_abs)) return false;
    int d = last - 1;
    for (; d >= 0; --d) {
      if (++index[d] < shape[d]) break;
      index[d] = 0;
    }
    if (d < 0) return true;
  }
}

// The largest finite magnitude's bits: float32, bfloat16, float16.
constexpr uint32_t kMaxFinite[3] = {0x7f7fffffu, 0x7f7fu, 0x7bffu};

}  // namespace

bool all_within(const void* data, int dtype, int ndim, const int64_t* shape, const int64_t* strides,
                uint32_t max_abs_bits) {
  if (max_abs_bits > kMaxFinite[dtype]) max_abs_bits = kMaxFinite[dtype];
  if (dtype == 0)
    return within_nd(static_cast<const uint32_t*>(data), ndim, shape, strides, uint32_t{0x7fffffffu}, max_abs_bits);
  return within_nd(static_cast<const uint16_t*>(data), ndim, shape, strides, uint16_t{0x7fffu},
                   static_cast<uint16_t>(max_abs_bits));
}

bool all_finite(const void* data, int dtype, int ndim, const int64_t* shape, const int64_t* strides) {
  return all_within(data, dtype, ndim, shape, strides, kMaxFinite[dtype]);
}

}  // namespace hetero
