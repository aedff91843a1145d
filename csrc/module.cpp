// pybind11 module hetero.cpu._sparse_cpp: sparse decode attention over selected host rows.
//
// Tensors cross the boundary as raw data pointers plus sizes: the Python wrapper (cpu/cpp_sparse.py)
// owns every check (dtype, contiguity, shapes, index ranges) and the output allocation. The GIL is released
// while the kernel runs; one call runs at a time on the module's own thread pool.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "random_read.h"
#include "sparse_attention.h"
#include "thread_pool.h"

namespace py = pybind11;

namespace hetero {
namespace {

using ItemFn = void (*)(const SparseArgs&, int64_t, int64_t, int64_t, int64_t, float*, float*, float*);

struct State {
  std::mutex call_mu;
  Isa detected = detect_isa();
  Isa active = detected;
  std::unique_ptr<ThreadPool> pool = std::make_unique<ThreadPool>(1);
  std::vector<std::vector<float>> scratch;  // per worker
  std::vector<float> part_out, part_lse;   // chunk partials
};

State& state() {
  static State s;
  return s;
}

ItemFn item_fn(Isa isa) {
  switch (isa) {
    case Isa::Avx512Bf16: return sparse_item_avx512_bf16;
    case Isa::Avx512: return sparse_item_avx512;
    case Isa::Avx2: return sparse_item_avx2;
    default: return sparse_item_scalar;
  }
}

void set_isa(const std::string& name) {
  Isa isa;
  if (!parse_isa(name.c_str(), &isa)) throw std::invalid_argument("unknown ISA '" + name + "'; allowed: scalar, avx2, avx512, avx512_bf16");
  State& s = state();
  if (static_cast<int>(isa) > static_cast<int>(s.detected))
    throw std::invalid_argument(std::string("ISA '") + name + "' is above what this CPU supports (" + isa_name(s.detected) + ")");
  std::lock_guard<std::mutex> lock(s.call_mu);
  s.active = isa;
}

void set_threads(int threads) {
  if (threads < 1) throw std::invalid_argument("threads must be >= 1");
  State& s = state();
  std::lock_guard<std::mutex> lock(s.call_mu);
  s.pool->resize(threads);
}

py::dict info() {
  State& s = state();
  py::dict d;
  d["isa_detected"] = isa_name(s.detected);
  d["isa"] = isa_name(s.active);
  d["threads"] = s.pool->threads();
  return d;
}

void sparse_attention(uintptr_t q, uintptr_t k_pool, uintptr_t v_pool, int64_t head_stride, int64_t row_stride,
                      uintptr_t block_table,
                      int64_t max_blocks, int64_t block_tokens, uintptr_t indices, uintptr_t log_weight,
                      uintptr_t out, uintptr_t lse, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t K,
                      double scale, int dtype, int prefetch_rows) {
  if (B <= 0 || Hkv <= 0 || Hq % Hkv != 0 || D <= 0 || Hq / Hkv > 64 || block_tokens <= 0 || dtype < 0 || dtype > 2)
    throw std::invalid_argument("sparse_attention: invalid sizes (need B, Hkv, D >= 1, Hq = G * Hkv with G <= 64)");
  SparseArgs a{reinterpret_cast<const float*>(q), reinterpret_cast<const void*>(k_pool),
               reinterpret_cast<const void*>(v_pool), head_stride, row_stride,
               reinterpret_cast<const int32_t*>(block_table),
               max_blocks, block_tokens, reinterpret_cast<const int32_t*>(indices),
               reinterpret_cast<const float*>(log_weight), B, Hq, Hkv, D, K, static_cast<float>(scale),
               static_cast<DType>(dtype), prefetch_rows};
  float* out_p = reinterpret_cast<float*>(out);
  float* lse_p = reinterpret_cast<float*>(lse);
  const int64_t G = Hq / Hkv;

  py::gil_scoped_release release;
  State& s = state();
  std::lock_guard<std::mutex> lock(s.call_mu);
  const ItemFn fn = item_fn(s.active);
  const int threads = s.pool->threads();
  const int64_t heads = B * Hkv;
  // Split the k indices of a (sequence, KV head) into chunks only when there are too few heads to keep
  // every thread busy; chunk partials are merged by log-sum-exp below.
  int64_t chunks = std::max<int64_t>(1, std::min<int64_t>((2 * threads + heads - 1) / heads, K / 256));
  const int64_t chunk_len = chunks > 0 && K > 0 ? (K + chunks - 1) / chunks : 0;
  if (K == 0) chunks = 1;
  const int64_t items = heads * chunks;
  if (static_cast<int>(s.scratch.size()) < threads) s.scratch.resize(threads);
  const int64_t need = item_scratch_floats(a, std::max<int64_t>(chunk_len, 1));
  for (auto& buf : s.scratch)
    if (static_cast<int64_t>(buf.size()) < need) buf.resize(need);
  if (chunks > 1) {
    s.part_out.resize(items * G * D);
    s.part_lse.resize(items * G);
  }
  s.pool->run(items, [&](int64_t item, int worker) {
    const int64_t head = item / chunks, c = item % chunks;
    const int64_t b = head / Hkv, h = head % Hkv;
    const int64_t j0 = std::min(K, c * chunk_len), j1 = std::min(K, j0 + chunk_len);
    float* o = chunks > 1 ? s.part_out.data() + item * G * D : out_p + (b * Hq + h * G) * D;
    float* l = chunks > 1 ? s.part_lse.data() + item * G : lse_p + b * Hq + h * G;
    fn(a, b, h, j0, j1, o, l, s.scratch[worker].data());
  });
  if (chunks == 1) return;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t head = 0; head < heads; ++head) {
    const int64_t b = head / Hkv, h = head % Hkv;
    for (int64_t g = 0; g < G; ++g) {
      float m = neg_inf;
      for (int64_t c = 0; c < chunks; ++c) m = std::max(m, s.part_lse[(head * chunks + c) * G + g]);
      float* dst = out_p + (b * Hq + h * G + g) * D;
      std::fill(dst, dst + D, 0.0f);
      if (m == neg_inf) {
        lse_p[b * Hq + h * G + g] = neg_inf;
        continue;
      }
      double total = 0.0;
      for (int64_t c = 0; c < chunks; ++c) {
        const float w = std::exp(s.part_lse[(head * chunks + c) * G + g] - m);
        if (w == 0.0f) continue;
        total += w;
        const float* src = s.part_out.data() + ((head * chunks + c) * G + g) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] += w * src[d];
      }
      const float inv = static_cast<float>(1.0 / total);
      for (int64_t d = 0; d < D; ++d) dst[d] *= inv;
      lse_p[b * Hq + h * G + g] = m + static_cast<float>(std::log(total));
    }
  }
}

// Read n random runs (offsets in bytes from base) split across the pool; returns a checksum.
double random_read(uintptr_t base, uintptr_t offsets, int64_t n, int64_t run_bytes, int prefetch) {
  py::gil_scoped_release release;
  State& s = state();
  std::lock_guard<std::mutex> lock(s.call_mu);
  const int threads = s.pool->threads();
  std::vector<double> sums(threads, 0.0);
  const int64_t per = (n + threads - 1) / threads;
  s.pool->run(threads, [&](int64_t t, int) {
    const int64_t lo = std::min(n, t * per), hi = std::min(n, lo + per);
    sums[t] = read_runs(reinterpret_cast<const char*>(base), reinterpret_cast<const int64_t*>(offsets) + lo, hi - lo,
                        run_bytes, prefetch);
  });
  double total = 0.0;
  for (double x : sums) total += x;
  return total;
}

}  // namespace
}  // namespace hetero

PYBIND11_MODULE(_sparse_cpp, m) {
  m.doc() = "hetero C++ sparse decode attention (AVX-512 / AVX2 / scalar, chosen at run time)";
  m.def("sparse_attention", &hetero::sparse_attention,
        "Sparse attention over selected host rows; pointers to contiguous buffers (see cpu/cpp_sparse.py)");
  m.def("set_isa", &hetero::set_isa, "Force an ISA level at or below the detected one");
  m.def("set_threads", &hetero::set_threads, "Threads of the module's pool (>= 1)");
  m.def("info", &hetero::info, "Detected and active ISA, thread count");
  m.def("random_read", &hetero::random_read, "Ceiling probe: read random runs of memory (benchmarks only)");
}
