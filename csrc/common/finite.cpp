#include "common/finite.h"

namespace hetero {
namespace {

// An element is NaN or +-inf when all its exponent bits are set.
template <class T>
bool run_finite(const T* p, int64_t n, int64_t stride, T exponent) {
  T bad = 0;
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) bad |= static_cast<T>((p[i] & exponent) == exponent);
  } else {
    for (int64_t i = 0; i < n; ++i) bad |= static_cast<T>((p[i * stride] & exponent) == exponent);
  }
  return bad == 0;
}

template <class T>
bool finite_nd(const T* p, int ndim, const int64_t* shape, const int64_t* strides, T exponent) {
  if (ndim == 0) return run_finite(p, 1, 1, exponent);
  for (int d = 0; d < ndim; ++d)
    if (shape[d] == 0) return true;
  int64_t index[8] = {0};
  const int last = ndim - 1;
  for (;;) {  // odometer over every dimension but the last
    int64_t offset = 0;
    for (int d = 0; d < last; ++d) offset += index[d] * strides[d];
    if (!run_finite(p + offset, shape[last], strides[last], exponent)) return false;
    int d = last - 1;
    for (; d >= 0; --d) {
      if (++index[d] < shape[d]) break;
      index[d] = 0;
    }
    if (d < 0) return true;
  }
}

}  // namespace

bool all_finite(const void* data, int dtype, int ndim, const int64_t* shape, const int64_t* strides) {
  if (dtype == 0)
    return finite_nd(static_cast<const uint32_t*>(data), ndim, shape, strides, uint32_t{0x7f800000u});
  return finite_nd(static_cast<const uint16_t*>(data), ndim, shape, strides,
                   static_cast<uint16_t>(dtype == 1 ? 0x7f80u : 0x7c00u));
}

}  // namespace hetero
