// pybind11 module hetero._native: the bindings, nothing else.
//
// Tensors cross the boundary as raw data pointers plus sizes: hetero/native.py and its callers own every check
// (dtype, contiguity, shapes, index ranges against the pool's geometry) and every allocation; a binding refuses
// only sizes that would make a kernel misbehave. The GIL is released while a kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/cpu_features.h"
#include "common/finite.h"
#include "common/merge.h"
#include "ivf/ivf_scan.h"
#include "runner/append.h"
#include "runner/isa.h"
#include "runner/runner.h"
#include "runner/step.h"

namespace py = pybind11;

namespace hetero {
namespace {

constexpr int64_t kMaxGroup = 64;

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

py::dict info() {
  py::dict d;
  d["isa_detected"] = isa_name(detected_isa());
  d["isa"] = isa_name(active_isa());
  d["ivf_scan"] = active_ivf_kernels().name;
  return d;
}

py::list field_names(bool layer) {
  py::list out;
#define HETERO_NAME_FIELD(name) out.append(#name);
  if (layer) {
    HETERO_LAYER_FIELDS(HETERO_NAME_FIELD)
  } else {
    HETERO_WORK_FIELDS(HETERO_NAME_FIELD)
  }
#undef HETERO_NAME_FIELD
  return out;
}

void sparse_attention(Runner& r, uintptr_t q, uintptr_t k_pool, uintptr_t v_pool, int64_t head_stride,
                      int64_t row_stride, int64_t batch_stride, uintptr_t block_table, int64_t max_blocks,
                      int64_t block_tokens, uintptr_t indices, uintptr_t counts, uintptr_t log_weight, uintptr_t out,
                      uintptr_t lse, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t K, double scale, int dtype,
                      int64_t prefetch) {
  if (B <= 0 || Hkv <= 0 || Hq % Hkv != 0 || D <= 0 || Hq / Hkv > kMaxGroup || block_tokens <= 0 || K < 0 ||
      dtype < 0 || dtype > 2)
    throw std::invalid_argument("sparse_attention: invalid sizes (need B, Hkv, D >= 1, Hq = G * Hkv, G <= 64, K >= 0)");
  SparseArgs a{ptr<const float>(q), ptr<const void>(k_pool), ptr<const void>(v_pool), head_stride, row_stride,
               batch_stride, ptr<const int32_t>(block_table), max_blocks, block_tokens, ptr<const int32_t>(indices),
               ptr<const int64_t>(counts), ptr<const float>(log_weight), B, Hq, Hkv, D, K, static_cast<float>(scale),
               static_cast<DType>(dtype), prefetch};
  py::gil_scoped_release release;
  r.sparse_attention(a, ptr<float>(out), ptr<float>(lse));
}

void ivf_search(Runner& r, uintptr_t q, int64_t D, uintptr_t centroids, uintptr_t nprobe, uintptr_t step,
                int64_t items, int64_t G, int64_t Dp, int64_t bits, uintptr_t codes, uintptr_t ids,
                uintptr_t list_start, uintptr_t list_count, uintptr_t nlists, int64_t probe_stride, uintptr_t probe,
                uintptr_t k, uintptr_t n_tokens, uintptr_t top, int64_t kmax, uintptr_t union_ids,
                uintptr_t union_count, uintptr_t scanned, uintptr_t k_ref, double scale, uintptr_t missed_lse,
                uintptr_t qe, int64_t Ge, uintptr_t mean_norm, uintptr_t tail_ksum, uintptr_t vmean,
                int per_query_counts, uintptr_t est_out, uintptr_t est_lse) {
  if (items < 0 || G < 1 || D < 1 || Dp < D || Dp > kMaxCodeDims || Dp % (bits == 4 ? 32 : 16) != 0 ||
      probe_stride < 1 || kmax < 0 || (bits != 4 && bits != 8))
    throw std::invalid_argument("ivf_search: invalid sizes (need G >= 1, bits 4 or 8, Dp >= D a multiple of 16 "
                                "(32 for 4 bits) and <= 512, probe_stride >= 1)");
  if (est_out && (Ge < 1 || !qe || !mean_norm || !tail_ksum || !vmean || !est_lse || (per_query_counts && Ge != G)))
    throw std::invalid_argument("ivf_search: an estimate needs Ge >= 1 queries, its list statistics and outputs "
                                "(per-query counts need Ge == G)");
  IvfSearchArgs a{ptr<const float>(q), D, ptr<const uint64_t>(centroids), ptr<const int64_t>(nprobe),
                  ptr<const uint64_t>(step), items, G, Dp, bits, ptr<const uint64_t>(codes), ptr<const uint64_t>(ids),
                  ptr<const uint64_t>(list_start), ptr<const uint64_t>(list_count), ptr<const int64_t>(nlists),
                  probe_stride, ptr<uint8_t>(probe), ptr<const int64_t>(k), ptr<const int64_t>(n_tokens),
                  ptr<int32_t>(top), kmax, ptr<int32_t>(union_ids), ptr<int64_t>(union_count), ptr<int64_t>(scanned),
                  ptr<const int64_t>(k_ref), static_cast<float>(scale), ptr<float>(missed_lse), ptr<const float>(qe),
                  Ge, ptr<const uint64_t>(mean_norm), ptr<const uint64_t>(tail_ksum), ptr<const uint64_t>(vmean),
                  per_query_counts, ptr<float>(est_out), ptr<float>(est_lse)};
  py::gil_scoped_release release;
  r.ivf_search(a);
}

void ivf_assign(Runner& r, uintptr_t keys, int64_t H, int64_t n, int64_t key_stride, int64_t D,
                uintptr_t centroids_t, int64_t L, uintptr_t out) {
  if (H < 0 || n < 0 || D < 1 || L < 1 || key_stride < n * D)
    throw std::invalid_argument("ivf_assign: need H, n >= 0, D, L >= 1, key_stride >= n * D");
  py::gil_scoped_release release;
  r.ivf_assign(ptr<const float>(keys), H, n, key_stride, D, ptr<const uint16_t>(centroids_t), L, ptr<int64_t>(out));
}

// One sequence's ivf-group index for the tail flush (ivf/ivf_lists.h), from SeqIndex's array addresses.
void ivf_tail_flush(Runner& r, int64_t H, int64_t D, int64_t L, int64_t t, int64_t tail_cap, int64_t bits, int64_t Dp,
                    uintptr_t codes, int64_t codes_head, uintptr_t ids, int64_t ids_head, uintptr_t start,
                    uintptr_t count, uintptr_t cap, uintptr_t centroids_t, uintptr_t mean_norm, uintptr_t ksum,
                    uintptr_t vsum, uintptr_t vmean, uintptr_t tail_keys, uintptr_t tail_values, uintptr_t assign) {
  if (H < 0 || D < 1 || D > Dp || Dp > kMaxCodeDims || L < 1 || t < 0 || t > tail_cap || (bits != 4 && bits != 8) ||
      Dp % (bits == 4 ? 32 : 16) != 0)
    throw std::invalid_argument("ivf_tail_flush: invalid sizes (need L >= 1, 0 <= t <= tail_cap, bits 4 or 8, "
                                "1 <= D <= Dp <= 512, Dp a multiple of 16 (32 for 4 bits))");
  const IvfTailArgs a{H, D, L, t, tail_cap, bits, Dp, ptr<uint8_t>(codes), codes_head, ptr<int32_t>(ids), ids_head,
                      ptr<int64_t>(start), ptr<int64_t>(count), ptr<const int64_t>(cap), ptr<uint16_t>(centroids_t),
                      ptr<float>(mean_norm), ptr<float>(ksum), ptr<float>(vsum), ptr<uint16_t>(vmean),
                      ptr<const float>(tail_keys), ptr<const float>(tail_values), ptr<const int64_t>(assign)};
  py::gil_scoped_release release;
  r.ivf_tail_flush(a);
}

void check_step_geometry(const int64_t* L, const int64_t* W, const char* who) {
  if (L[HKV] < 1 || W[HQ] % L[HKV] != 0 || W[HQ] / L[HKV] > kMaxGroup || L[LayerField::D] < 1 ||
      L[LayerField::D] > kMaxCodeDims)
    throw std::invalid_argument(std::string(who) + ": invalid geometry (Hq = G * Hkv, G <= 64, 1 <= D <= 512)");
}

void check_append_geometry(const int64_t* L, int dtype, const char* who) {
  if (L[WINDOW] < 0 || L[LayerField::D] > kMaxCodeDims || dtype < 0 || dtype > 2)
    throw std::invalid_argument(std::string(who) +
                                ": needs a bounded window, D <= 512 and a float32/bf16/fp16 input");
}

int64_t decode_step(Runner& r, uintptr_t layer, uintptr_t work, uintptr_t q, uintptr_t out) {
  const int64_t* L = ptr<const int64_t>(layer);
  const int64_t* W = ptr<const int64_t>(work);
  check_step_geometry(L, W, "decode_step");
  py::gil_scoped_release release;
  return r.decode_step(L, W, ptr<const void>(q), ptr<void>(out));
}

py::tuple decode_token(Runner& r, uintptr_t layer, uintptr_t work, uintptr_t k, uintptr_t v, int64_t stride_b,
                       int64_t stride_h, int dtype, int index_native, uintptr_t flags, uintptr_t q, uintptr_t out) {
  const int64_t* L = ptr<const int64_t>(layer);
  const int64_t* W = ptr<const int64_t>(work);
  check_step_geometry(L, W, "decode_token");
  check_append_geometry(L, dtype, "decode_token");
  const DecodeToken t{ptr<const void>(k), ptr<const void>(v), stride_b, stride_h, dtype, index_native,
                      ptr<int64_t>(flags)};
  TokenStep done;
  {
    py::gil_scoped_release release;
    done = r.decode_token(L, W, t, ptr<const void>(q), ptr<void>(out));
  }
  return py::make_tuple(done.append, done.step);
}

int append_decode_binding(uintptr_t layer, uintptr_t k, uintptr_t v, int64_t stride_b, int64_t stride_h, int dtype,
                          int index_native, uintptr_t flags) {
  const int64_t* L = ptr<const int64_t>(layer);
  check_append_geometry(L, dtype, "append_decode");
  return append_decode(L, ptr<const void>(k), ptr<const void>(v), stride_b, stride_h, dtype, index_native,
                       ptr<int64_t>(flags));
}

}  // namespace
}  // namespace hetero

PYBIND11_MODULE(_native, m) {
  using namespace hetero;
  m.doc() = "hetero's host kernels (AVX-512 / AVX2 / scalar, chosen at run time); checked and called by hetero.native";
  py::class_<Runner>(m, "Runner", "A thread pool with its own scratch; one call at a time per Runner")
      .def(py::init<int>(), py::arg("threads"))
      .def("sparse_attention", &sparse_attention,
           "Attention over selected rows (a paged host tier, or a contiguous [B, Hkv, L, D] tier without a table)")
      .def("ivf_search", &ivf_search, "Grouped IVF search over 8-bit or 4-bit codes (retrieval/ivf_group.py)")
      .def("ivf_assign", &ivf_assign,
           "Nearest lists: out [H, n] int64 of keys [H, n, D] float32 by centroids_t [H, D, L] float16 "
           "(ivf/ivf_lists.h)")
      .def("ivf_tail_flush", &ivf_tail_flush,
           "The ivf-group tail moved into the lists `assign` names, with the lists' statistics; ivf/ivf_lists.h")
      .def("decode_step", &decode_step,
           "One layer's decode step from its LAYER and WORK descriptors (runner/step.h): window, host part, fusion")
      .def("decode_token", &decode_token,
           "A decode token appended and the step over it in one call (Runner::decode_token): (append code, step code)")
      .def("random_read",
           [](Runner& r, uintptr_t base, uintptr_t offsets, int64_t n, int64_t run_bytes, int prefetch, bool to_l2) {
             py::gil_scoped_release release;
             return r.random_read(ptr<const char>(base), ptr<const int64_t>(offsets), n, run_bytes, prefetch, to_l2);
           },
           "Ceiling probe: read random runs of memory (benchmarks)")
      .def("set_threads", &Runner::set_threads)
      .def("wake", &Runner::wake, py::arg("poll_us"),
           "Have the pool's workers poll for poll_us from now, waking those that sleep: ahead of a step")
      .def("set_trace", &Runner::set_trace, "Record each pool thread's busy span per call (take_trace)")
      .def("take_trace",
           [](Runner& r) {
             py::list out;
             for (const Runner::TraceRecord& t : r.take_trace()) out.append(py::make_tuple(t.worker, t.start, t.end, t.phase));
             return out;
           },
           "The recorded spans as (worker, start, end, phase), cleared (phase: step.h's, -1 outside a decode step)")
      .def_property_readonly("threads", &Runner::threads);
  m.attr("LAYER_FIELDS") = field_names(true);
  m.attr("WORK_FIELDS") = field_names(false);
  m.attr("PHASES") = kPhases;
  m.attr("STEP_QUERY_NOT_FINITE") = kStepQueryNotFinite;
  m.attr("STEP_NEED_PROBE") = kStepNeedProbe;
  m.attr("STEP_NOT_RUN") = kStepNotRun;
  m.attr("APPEND_NOT_FINITE") = kAppendNotFinite;
  m.attr("APPEND_NEED_BLOCKS") = kAppendNeedBlocks;
  m.def("append_decode", &append_decode_binding,
        "One decode token per sequence into a layer's tiers (and its index where native); runner/append.h");
  m.def(
      "merge_parts",
      [](std::vector<uintptr_t> outs, std::vector<uintptr_t> lses, int64_t rows, int64_t D, uintptr_t out,
         uintptr_t lse) {
        if (outs.size() != lses.size() || outs.empty() || outs.size() > 64 || rows < 0 || D < 0)
          throw std::invalid_argument("merge_parts: 1 to 64 parts of out [rows, D] and lse [rows]");
        std::vector<const float*> o, l;
        for (size_t i = 0; i < outs.size(); ++i) {
          o.push_back(ptr<const float>(outs[i]));
          l.push_back(ptr<const float>(lses[i]));
        }
        merge_rows(static_cast<int>(o.size()), o.data(), l.data(), rows, D, ptr<float>(out), ptr<float>(lse));
      },
      "Fuse float32 partial attentions (out [rows, D], lse [rows] each) by log-sum-exp (hetero.merge)");
  m.def(
      "ivf_scores",
      [](uintptr_t codes, int64_t n, int64_t Dp, int64_t bits, uintptr_t qi, uintptr_t qscale, int64_t G,
         uintptr_t out) {
        if (n < 0 || G < 1 || Dp % (bits == 4 ? 32 : 16) != 0 || (bits != 4 && bits != 8))
          throw std::invalid_argument("ivf_scores: need n >= 0, G >= 1, bits 4 or 8, Dp a multiple of 16 (32 for 4)");
        const IvfKernels k = active_ivf_kernels();
        (bits == 4 ? k.score4 : k.score)(ptr<const uint8_t>(codes), n, Dp, ptr<const int8_t>(qi),
                                         ptr<const float>(qscale), G, ptr<float>(out), n);
      },
      "The active ISA's code scoring alone: out [G, n] float32 from codes [n, Dp * bits / 8] uint8, qi [G, Dp] "
      "int8, qscale [G] float32 (tests compare it with QueryCodes.scores)");
  m.def(
      "ivf_top_positions",
      [](uintptr_t scores, int64_t n, int64_t k, uintptr_t out) {
        if (n < 0 || k < 0 || k > n) throw std::invalid_argument("ivf_top_positions: need 0 <= k <= n");
        IvfScratch scratch;
        ivf_top_positions(ptr<const float>(scores), n, k, active_ivf_kernels().select, scratch, ptr<int32_t>(out));
      },
      "The search's exact top-k alone: out [k] int32, the ascending positions of the k largest of scores [n] "
      "float32, ties to the lower positions");
  m.def(
      "ivf_centroid_scores",
      [](uintptr_t q, int64_t G, int64_t D, uintptr_t centroids_t, int64_t L, uintptr_t out) {
        if (G < 0 || D < 0 || L < 0) throw std::invalid_argument("ivf_centroid_scores: need G, D, L >= 0");
        std::vector<float> row(static_cast<size_t>(L));
        active_ivf_kernels().centroids(ptr<const float>(q), G, D, ptr<const uint16_t>(centroids_t), L, row.data(),
                                       ptr<float>(out));
      },
      "The active ISA's list probing scores alone: out [G, L] float32 = q [G, D] float32 @ centroids_t [D, L] "
      "float16 (tests compare it with a float64 product)");
  m.def(
      "ivf_encode_rows",
      [](uintptr_t keys, int64_t H, int64_t n, int64_t D, uintptr_t vmin, uintptr_t inv_step, int64_t bits, int64_t Dp,
         uintptr_t codes, uintptr_t ids, uintptr_t first_row, int64_t first_id, uintptr_t values, uintptr_t tail_ksum,
         uintptr_t tail_vsum, uintptr_t tail_vmean, int64_t tail_count) {
        if (H < 0 || n < 0 || D < 1 || Dp < D || Dp > kMaxCodeDims || (bits != 4 && bits != 8) ||
            Dp % (bits == 4 ? 32 : 16) != 0)
          throw std::invalid_argument("ivf_encode_rows: need bits 4 or 8, 1 <= D <= Dp <= 512, Dp a multiple of 16 "
                                      "(32)");
        if (values && (!tail_ksum || !tail_vsum || !tail_vmean || tail_count < n))
          throw std::invalid_argument("ivf_encode_rows: values need the tail statistics and tail_count >= n");
        ivf_encode_rows(ptr<const float>(keys), H, n, D, ptr<const float>(vmin), ptr<const float>(inv_step), bits, Dp,
                        ptr<const uint64_t>(codes), ptr<const uint64_t>(ids), ptr<const int64_t>(first_row),
                        static_cast<int32_t>(first_id), ptr<const float>(values), ptr<const uint64_t>(tail_ksum),
                        ptr<const uint64_t>(tail_vsum), ptr<const uint64_t>(tail_vmean), tail_count);
      },
      "Encode keys into ivf-group code arenas at given rows and, with values, update the tail list's statistics");
  m.def(
      "ivf_quantize_queries",
      [](uintptr_t q, uintptr_t step, int64_t G, int64_t D, int64_t Dp, uintptr_t qi, uintptr_t qscale) {
        if (G < 0 || D < 1 || Dp < D) throw std::invalid_argument("ivf_quantize_queries: need G >= 0, 1 <= D <= Dp");
        quantize_queries(ptr<const float>(q), ptr<const float>(step), G, D, Dp, ptr<int8_t>(qi), ptr<float>(qscale));
      },
      "The search's query quantization alone: q [G, D] float32, step [D] float32 -> qi [G, Dp] int8, qscale [G] "
      "float32 (tests compare it with QueryCodes.quantize)");
  m.def(
      "all_finite",
      [](uintptr_t data, int dtype, std::vector<int64_t> shape, std::vector<int64_t> strides, uint32_t max_abs_bits) {
        if (dtype < 0 || dtype > 2 || shape.size() != strides.size() || shape.size() > 8)
          throw std::invalid_argument("all_finite: dtype 0 (float32), 1 (bfloat16) or 2 (float16), <= 8 dims");
        return all_within(ptr<const void>(data), dtype, static_cast<int>(shape.size()), shape.data(), strides.data(),
                          max_abs_bits);
      },
      py::arg("data"), py::arg("dtype"), py::arg("shape"), py::arg("strides"), py::arg("max_abs_bits") = 0xffffffffu,
      "True when a float32 / bfloat16 / float16 tensor (pointer, shape, element strides) holds no NaN or inf and no "
      "magnitude whose bits (in its dtype, sign cleared) exceed max_abs_bits (default: any finite value)");
  m.attr("VALUE_LIMIT") = kValueLimit;
  m.attr("ABI") = 2;  // hetero/native.py's ABI: raised with every change of a signature or descriptor field
  m.def("set_isa", &set_isa, "Force an ISA level at or below the detected one (all Runners)");
  m.def("info", &info, "Detected and active ISA");
}
