// Portable path: no vector ISA assumed. Compiled with the project's default flags.
#include "sparse/sparse_attention.h"
#include "sparse/sparse_kernel.inc"

namespace {

struct ScalarV {
  using R = float;
  static constexpr int W = 1;
  static constexpr bool kBf16Pairs = false;  // value_tile_bf16_pairs (sparse_kernel.inc) not used
  static R zero() { return 0.0f; }
  static R set1(float x) { return x; }
  static R load(const float* p) { return *p; }
  static void store(float* p, R x) { *p = x; }
  static R sub(R a, R b) { return a - b; }
  static R add(R a, R b) { return a + b; }
  static R mul(R a, R b) { return a * b; }
  static R max(R a, R b) { return a > b ? a : b; }
  static float hmax(R x) { return x; }
  static R fmadd(R a, R b, R c) { return a * b + c; }
  static void reduce4(R a, R b, R c, R d, float* out) { out[0] = a; out[1] = b; out[2] = c; out[3] = d; }
  static R exp(R x) { return __builtin_expf(x); }  // exp(-inf) = 0
  template <DType DT> static R load_elem(const typename Elem<DT>::T* p) { return elem_to_float<DT>(*p); }
  template <DType DT>
  static void dots4(const float* q, int64_t G, int64_t D, const typename Elem<DT>::T* const* krows, int nr,
                    float* out, float* tmp) {
    rowwise_dots4<ScalarV, DT>(q, G, D, krows, nr, out, tmp);
  }
};

}  // namespace

namespace hetero {
void sparse_item_scalar(const SparseArgs& a, int64_t b, int64_t h, int64_t j0, int64_t j1, float* out_g,
                        float* lse_g, float* scratch) {
  dispatch_item<ScalarV>(a, b, h, j0, j1, out_g, lse_g, scratch);
}
void attend_logits_scalar(float* logits, int64_t G, int64_t R, int64_t stride, const uint16_t* vrows,
                          int64_t D, int64_t* rows, float* out, float* lse) {
  attend_logits_impl<ScalarV>(logits, G, R, stride, vrows, D, rows, out, lse);
}
}  // namespace hetero
