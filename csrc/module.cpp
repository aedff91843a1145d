// pybind11 module hetero._native: sparse decode attention over selected host rows.
//
// Tensors cross the boundary as raw data pointers plus sizes: the Python wrapper (hetero/native.py and its callers) own
// every check (dtype, contiguity, shapes, index ranges) and the output allocation. The GIL is released while
// a kernel runs. Work runs on a Runner: its own thread pool and scratch, one call at a time; separate Runners
// (the window side and the host side of a decode step) run concurrently.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "finite.h"
#include "ivf_scan.h"
#include "merge.h"
#include "random_read.h"
#include "sparse_attention.h"
#include "thread_pool.h"

namespace py = pybind11;

namespace hetero {
namespace {

using ItemFn = void (*)(const SparseArgs&, int64_t, int64_t, int64_t, int64_t, float*, float*, float*);

struct Global {
  Isa detected = detect_isa();
  bool vnni = cpu_has_avx512_vnni();
  std::atomic<int> active{static_cast<int>(detect_isa())};
};

Global& global() {
  static Global g;
  return g;
}

ItemFn item_fn(Isa isa) {
  switch (isa) {
    case Isa::Avx512Bf16: return sparse_item_avx512_bf16;
    case Isa::Avx512: return sparse_item_avx512;
    case Isa::Avx2: return sparse_item_avx2;
    default: return sparse_item_scalar;
  }
}

// VNNI rides on the highest level (every CPU with AVX512_BF16 so far has it; checked anyway), so forcing
// "avx512" exercises the BW emulation on a VNNI machine.
IvfKernels ivf_kernels(Isa isa) {
  switch (isa) {
    case Isa::Avx512Bf16:
      if (global().vnni)
        return {ivf_scores_avx512_vnni, ivf_scores4_avx512_vnni, ivf_select_ge_avx512, ivf_centroid_scores_avx512,
                attend_logits_avx512, "avx512_vnni"};
      [[fallthrough]];
    case Isa::Avx512:
      return {ivf_scores_avx512, ivf_scores4_avx512, ivf_select_ge_avx512, ivf_centroid_scores_avx512,
              attend_logits_avx512, "avx512"};
    case Isa::Avx2:
      return {ivf_scores_avx2, ivf_scores4_avx2, ivf_select_ge_scalar, ivf_centroid_scores_avx2, attend_logits_avx2,
              "avx2"};
    default:
      return {ivf_scores_scalar, ivf_scores4_scalar, ivf_select_ge_scalar, ivf_centroid_scores_scalar,
              attend_logits_scalar, "scalar"};
  }
}

void set_isa(const std::string& name) {
  Isa isa;
  if (!parse_isa(name.c_str(), &isa))
    throw std::invalid_argument("unknown ISA '" + name + "'; allowed: scalar, avx2, avx512, avx512_bf16");
  Global& g = global();
  if (static_cast<int>(isa) > static_cast<int>(g.detected))
    throw std::invalid_argument(std::string("ISA '") + name + "' is above what this CPU supports (" +
                                isa_name(g.detected) + ")");
  g.active.store(static_cast<int>(isa));
}

py::dict info() {
  Global& g = global();
  py::dict d;
  d["isa_detected"] = isa_name(g.detected);
  const Isa active = static_cast<Isa>(g.active.load());
  d["isa"] = isa_name(active);
  d["ivf_scan"] = ivf_kernels(active).name;
  return d;
}

class Runner {
 public:
  explicit Runner(int threads) : pool_(std::make_unique<ThreadPool>(threads < 1 ? 1 : threads)) {}

  void set_threads(int threads) {
    if (threads < 1) throw std::invalid_argument("threads must be >= 1");
    std::lock_guard<std::mutex> lock(mu_);
    pool_->resize(threads);
  }

  int threads() const { return pool_->threads(); }

  // Tracing: while on, each call records, per thread of the pool, when it took its first item and finished its
  // last (seconds on the steady clock, the clock of Python's time.perf_counter on Linux); take_trace() returns and
  // clears them as (worker, start, end), worker 0 being the calling thread.
  void set_trace(bool on) {
    std::lock_guard<std::mutex> lock(mu_);
    trace_on_ = on;
    if (!on) trace_.clear();
  }

  py::list take_trace() {
    std::lock_guard<std::mutex> lock(mu_);
    py::list out;
    for (const TraceRecord& r : trace_) out.append(py::make_tuple(r.worker, r.start, r.end));
    trace_.clear();
    return out;
  }

  void sparse_attention(uintptr_t q, uintptr_t k_pool, uintptr_t v_pool, int64_t head_stride, int64_t row_stride,
                        uintptr_t block_table, int64_t max_blocks, int64_t block_tokens, uintptr_t indices,
                        uintptr_t log_weight, uintptr_t out, uintptr_t lse, int64_t B, int64_t Hq, int64_t Hkv,
                        int64_t D, int64_t K, double scale, int dtype, int prefetch_rows) {
    if (B <= 0 || Hkv <= 0 || Hq % Hkv != 0 || D <= 0 || Hq / Hkv > 64 || block_tokens <= 0 || dtype < 0 ||
        dtype > 2)
      throw std::invalid_argument("sparse_attention: invalid sizes (need B, Hkv, D >= 1, Hq = G * Hkv, G <= 64)");
    SparseArgs a{reinterpret_cast<const float*>(q), reinterpret_cast<const void*>(k_pool),
                 reinterpret_cast<const void*>(v_pool), head_stride, row_stride,
                 reinterpret_cast<const int32_t*>(block_table), max_blocks, block_tokens,
                 reinterpret_cast<const int32_t*>(indices), reinterpret_cast<const float*>(log_weight), B, Hq, Hkv,
                 D, K, static_cast<float>(scale), static_cast<DType>(dtype), prefetch_rows};
    float* out_p = reinterpret_cast<float*>(out);
    float* lse_p = reinterpret_cast<float*>(lse);
    const int64_t G = Hq / Hkv;

    py::gil_scoped_release release;
    std::lock_guard<std::mutex> lock(mu_);
    const ItemFn fn = item_fn(static_cast<Isa>(global().active.load()));
    const int threads = pool_->threads();
    const int64_t heads = B * Hkv;
    // Split a (sequence, KV head)'s indices into chunks only when there are too few heads to keep every
    // thread busy; chunk partials are merged by log-sum-exp below.
    int64_t chunks = std::max<int64_t>(1, std::min<int64_t>((2 * threads + heads - 1) / heads, K / 256));
    if (K == 0) chunks = 1;
    const int64_t chunk_len = K > 0 ? (K + chunks - 1) / chunks : 0;
    const int64_t items = heads * chunks;
    if (static_cast<int>(scratch_.size()) < threads) scratch_.resize(threads);
    const int64_t need = item_scratch_floats(a, std::max<int64_t>(chunk_len, 1));
    for (auto& buf : scratch_)
      if (static_cast<int64_t>(buf.size()) < need) buf.resize(need);
    if (chunks > 1) {
      part_out_.resize(items * G * D);
      part_lse_.resize(items * G);
    }
    traced_run(items, [&](int64_t item, int worker) {
      const int64_t head = item / chunks, c = item % chunks;
      const int64_t b = head / Hkv, h = head % Hkv;
      const int64_t j0 = std::min(K, c * chunk_len), j1 = std::min(K, j0 + chunk_len);
      float* o = chunks > 1 ? part_out_.data() + item * G * D : out_p + (b * Hq + h * G) * D;
      float* l = chunks > 1 ? part_lse_.data() + item * G : lse_p + b * Hq + h * G;
      fn(a, b, h, j0, j1, o, l, scratch_[worker].data());
    });
    if (chunks > 1) merge_chunks(heads, chunks, Hkv, Hq, G, D, out_p, lse_p);
  }

  // Grouped IVF search (ivf_scan.h); one item per (sequence, KV head), items spread over the pool.
  void ivf_search(uintptr_t q, int64_t D, uintptr_t centroids, uintptr_t nprobe, uintptr_t step,
                  int64_t items, int64_t G, int64_t Dp, int64_t bits, uintptr_t codes, uintptr_t ids,
                  uintptr_t list_start, uintptr_t list_count, int64_t nlist, uintptr_t probe, uintptr_t k,
                  uintptr_t n_tokens, uintptr_t top, int64_t kmax, uintptr_t union_ids, uintptr_t union_count,
                  uintptr_t scanned, uintptr_t k_ref, double scale, uintptr_t missed_lse, uintptr_t qe, int64_t Ge,
                  uintptr_t mean_norm, uintptr_t tail_ksum, uintptr_t vmean, int per_query_counts, uintptr_t est_out,
                  uintptr_t est_lse) {
    if (items < 0 || G < 1 || D < 1 || Dp < D || Dp % (bits == 4 ? 32 : 16) != 0 || nlist < 1 || kmax < 0 ||
        (bits != 4 && bits != 8))
      throw std::invalid_argument("ivf_search: invalid sizes (need G >= 1, bits 4 or 8, Dp >= D a multiple of 16 "
                                  "(32 for 4 bits), nlist >= 1)");
    if (est_out && (Ge < 1 || !qe || !mean_norm || !tail_ksum || !vmean || !est_lse || (per_query_counts && Ge != G)))
      throw std::invalid_argument("ivf_search: an estimate needs Ge >= 1 queries, its list statistics and outputs "
                                  "(per-query counts need Ge == G)");
    IvfSearchArgs a{reinterpret_cast<const float*>(q), D, reinterpret_cast<const uint64_t*>(centroids),
                    reinterpret_cast<const int64_t*>(nprobe), reinterpret_cast<const float*>(step), items, G, Dp, bits, reinterpret_cast<const uint64_t*>(codes),
                    reinterpret_cast<const uint64_t*>(ids), reinterpret_cast<const uint64_t*>(list_start),
                    reinterpret_cast<const uint64_t*>(list_count), nlist, reinterpret_cast<uint8_t*>(probe),
                    reinterpret_cast<const int64_t*>(k), reinterpret_cast<const int64_t*>(n_tokens),
                    reinterpret_cast<int32_t*>(top), kmax, reinterpret_cast<int32_t*>(union_ids),
                    reinterpret_cast<int64_t*>(union_count), reinterpret_cast<int64_t*>(scanned),
                    reinterpret_cast<const int64_t*>(k_ref), static_cast<float>(scale),
                    reinterpret_cast<float*>(missed_lse), reinterpret_cast<const float*>(qe), Ge,
                    reinterpret_cast<const uint64_t*>(mean_norm), reinterpret_cast<const uint64_t*>(tail_ksum),
                    reinterpret_cast<const uint64_t*>(vmean), per_query_counts, reinterpret_cast<float*>(est_out),
                    reinterpret_cast<float*>(est_lse)};
    py::gil_scoped_release release;
    std::lock_guard<std::mutex> lock(mu_);
    const IvfKernels fn = ivf_kernels(static_cast<Isa>(global().active.load()));
    if (static_cast<int>(ivf_scratch_.size()) < pool_->threads()) ivf_scratch_.resize(pool_->threads());
    traced_run(items, [&](int64_t item, int worker) { ivf_search_item(a, item, fn, ivf_scratch_[worker]); });
  }

  // Read n random runs (offsets in bytes from base) across the pool; returns a checksum.
  double random_read(uintptr_t base, uintptr_t offsets, int64_t n, int64_t run_bytes, int prefetch, bool to_l2) {
    py::gil_scoped_release release;
    std::lock_guard<std::mutex> lock(mu_);
    const int threads = pool_->threads();
    std::vector<double> sums(threads, 0.0);
    const int64_t per = (n + threads - 1) / threads;
    pool_->run(threads, [&](int64_t t, int) {
      const int64_t lo = std::min(n, t * per), hi = std::min(n, lo + per);
      sums[t] = read_runs(reinterpret_cast<const char*>(base), reinterpret_cast<const int64_t*>(offsets) + lo,
                          hi - lo, run_bytes, prefetch, to_l2);
    });
    double total = 0.0;
    for (double x : sums) total += x;
    return total;
  }

 private:
  void merge_chunks(int64_t heads, int64_t chunks, int64_t Hkv, int64_t Hq, int64_t G, int64_t D, float* out_p,
                    float* lse_p) {
    const float neg_inf = -std::numeric_limits<float>::infinity();
    for (int64_t head = 0; head < heads; ++head) {
      const int64_t b = head / Hkv, h = head % Hkv;
      for (int64_t g = 0; g < G; ++g) {
        float m = neg_inf;
        for (int64_t c = 0; c < chunks; ++c) m = std::max(m, part_lse_[(head * chunks + c) * G + g]);
        float* dst = out_p + (b * Hq + h * G + g) * D;
        std::fill(dst, dst + D, 0.0f);
        if (m == neg_inf) {
          lse_p[b * Hq + h * G + g] = neg_inf;
          continue;
        }
        double total = 0.0;
        for (int64_t c = 0; c < chunks; ++c) {
          const float w = std::exp(part_lse_[(head * chunks + c) * G + g] - m);
          if (w == 0.0f) continue;
          total += w;
          const float* src = part_out_.data() + ((head * chunks + c) * G + g) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] += w * src[d];
        }
        const float inv = static_cast<float>(1.0 / total);
        for (int64_t d = 0; d < D; ++d) dst[d] *= inv;
        lse_p[b * Hq + h * G + g] = m + static_cast<float>(std::log(total));
      }
    }
  }

  struct TraceRecord {
    int worker;
    double start, end;
  };

  static double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  }

  // pool_->run, recording each thread's busy span when tracing (called with mu_ held).
  template <class Fn>
  void traced_run(int64_t items, Fn fn) {
    if (!trace_on_) {
      pool_->run(items, fn);
      return;
    }
    std::vector<TraceRecord> spans(pool_->threads(), TraceRecord{-1, 0.0, 0.0});
    pool_->run(items, [&](int64_t item, int worker) {
      TraceRecord& r = spans[worker];  // each thread writes its own entry
      const double t = now();
      if (r.worker < 0) r = TraceRecord{worker, t, t};
      fn(item, worker);
      r.end = now();
    });
    for (const TraceRecord& r : spans)
      if (r.worker >= 0) trace_.push_back(r);
  }

  std::mutex mu_;
  bool trace_on_ = false;
  std::vector<TraceRecord> trace_;
  std::unique_ptr<ThreadPool> pool_;
  std::vector<std::vector<float>> scratch_;  // per worker
  std::vector<float> part_out_, part_lse_;   // chunk partials
  std::vector<IvfScratch> ivf_scratch_;      // per worker
};

}  // namespace
}  // namespace hetero

PYBIND11_MODULE(_native, m) {
  m.doc() = "hetero C++ sparse decode attention (AVX-512 / AVX2 / scalar, chosen at run time)";
  py::class_<hetero::Runner>(m, "Runner", "A thread pool with its own scratch; one call at a time per Runner")
      .def(py::init<int>(), py::arg("threads"))
      .def("sparse_attention", &hetero::Runner::sparse_attention,
           "Sparse attention over selected host rows; pointers to buffers checked by cpu/cpp_sparse.py")
      .def("ivf_search", &hetero::Runner::ivf_search,
           "Grouped IVF search over 8-bit or 4-bit codes; pointers to buffers checked by retrieval/ivf_group.py")
      .def("random_read", &hetero::Runner::random_read, "Ceiling probe: read random runs of memory (benchmarks)")
      .def("set_threads", &hetero::Runner::set_threads)
      .def("set_trace", &hetero::Runner::set_trace, "Record each pool thread's busy span per call (take_trace)")
      .def("take_trace", &hetero::Runner::take_trace, "The recorded spans as (worker, start, end), cleared")
      .def_property_readonly("threads", &hetero::Runner::threads);
  m.def(
      "ivf_scores",
      [](uintptr_t codes, int64_t n, int64_t Dp, int64_t bits, uintptr_t qi, uintptr_t qscale, int64_t G,
         uintptr_t out) {
        if (n < 0 || G < 1 || Dp % (bits == 4 ? 32 : 16) != 0 || (bits != 4 && bits != 8))
          throw std::invalid_argument("ivf_scores: need n >= 0, G >= 1, bits 4 or 8, Dp a multiple of 16 (32 for 4)");
        const hetero::IvfKernels k = hetero::ivf_kernels(static_cast<hetero::Isa>(hetero::global().active.load()));
        (bits == 4 ? k.score4 : k.score)(reinterpret_cast<const uint8_t*>(codes), n, Dp,
                                         reinterpret_cast<const int8_t*>(qi), reinterpret_cast<const float*>(qscale),
                                         G, reinterpret_cast<float*>(out), n);
      },
      "The active ISA's code scoring alone: out [G, n] float32 from codes [n, Dp * bits / 8] uint8, qi [G, Dp] "
      "int8, qscale [G] float32 (tests compare it with QueryCodes.scores)");
  m.def(
      "merge2",
      [](uintptr_t out_a, uintptr_t lse_a, uintptr_t out_b, uintptr_t lse_b, int64_t rows, int64_t D, uintptr_t out,
         uintptr_t lse) {
        if (rows < 0 || D < 0) throw std::invalid_argument("merge2: rows and D must be >= 0");
        hetero::merge2_f32(reinterpret_cast<const float*>(out_a), reinterpret_cast<const float*>(lse_a),
                           reinterpret_cast<const float*>(out_b), reinterpret_cast<const float*>(lse_b), rows, D,
                           reinterpret_cast<float*>(out), reinterpret_cast<float*>(lse));
      },
      "Fuse two float32 partial attentions (out [rows, D], lse [rows]); buffers checked by hetero/merge.py");
  m.def(
      "ivf_encode_rows",
      [](uintptr_t keys, int64_t H, int64_t n, int64_t D, uintptr_t vmin, uintptr_t inv_step, int64_t bits, int64_t Dp,
         uintptr_t codes, uintptr_t ids, uintptr_t first_row, int64_t first_id, uintptr_t values, uintptr_t tail_ksum,
         uintptr_t tail_vsum, uintptr_t tail_vmean, int64_t tail_count) {
        if (H < 0 || n < 0 || D < 1 || Dp < D || (bits != 4 && bits != 8) || Dp % (bits == 4 ? 32 : 16) != 0)
          throw std::invalid_argument("ivf_encode_rows: need bits 4 or 8, 1 <= D <= Dp, Dp a multiple of 16 (32)");
        if (values && (!tail_ksum || !tail_vsum || !tail_vmean || tail_count < n))
          throw std::invalid_argument("ivf_encode_rows: values need the tail statistics and tail_count >= n");
        hetero::ivf_encode_rows(reinterpret_cast<const float*>(keys), H, n, D, reinterpret_cast<const float*>(vmin),
                                reinterpret_cast<const float*>(inv_step), bits, Dp,
                                reinterpret_cast<const uint64_t*>(codes), reinterpret_cast<const uint64_t*>(ids),
                                reinterpret_cast<const int64_t*>(first_row), static_cast<int32_t>(first_id),
                                reinterpret_cast<const float*>(values), reinterpret_cast<const uint64_t*>(tail_ksum),
                                reinterpret_cast<const uint64_t*>(tail_vsum),
                                reinterpret_cast<const uint64_t*>(tail_vmean), tail_count);
      },
      "Encode keys into ivf-group code arenas at given rows (the decode step's tail append) and, with values, update "
      "the tail list's statistics; buffers checked by retrieval/ivf_group.py");
  m.def(
      "ivf_quantize_queries",
      [](uintptr_t q, uintptr_t step, int64_t G, int64_t D, int64_t Dp, uintptr_t qi, uintptr_t qscale) {
        if (G < 0 || D < 1 || Dp < D) throw std::invalid_argument("ivf_quantize_queries: need G >= 0, 1 <= D <= Dp");
        hetero::quantize_queries(reinterpret_cast<const float*>(q), reinterpret_cast<const float*>(step), G, D, Dp,
                                 reinterpret_cast<int8_t*>(qi), reinterpret_cast<float*>(qscale));
      },
      "The search's query quantization alone: q [G, D] float32, step [D] float32 -> qi [G, Dp] int8, qscale [G] "
      "float32 (tests compare it with QueryCodes.quantize)");
  m.def(
      "all_finite",
      [](uintptr_t data, int dtype, std::vector<int64_t> shape, std::vector<int64_t> strides) {
        if (dtype < 0 || dtype > 2 || shape.size() != strides.size() || shape.size() > 8)
          throw std::invalid_argument("all_finite: dtype 0 (float32), 1 (bfloat16) or 2 (float16), <= 8 dims");
        return hetero::all_finite(reinterpret_cast<const void*>(data), dtype, static_cast<int>(shape.size()),
                                  shape.data(), strides.data());
      },
      "True when a float32 / bfloat16 / float16 tensor (pointer, shape, element strides) holds no NaN or inf");
  m.def("set_isa", &hetero::set_isa, "Force an ISA level at or below the detected one (all Runners)");
  m.def("info", &hetero::info, "Detected and active ISA");
}
