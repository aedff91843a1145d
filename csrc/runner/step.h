// The descriptors of a layer's decode step: what the Python side (hetero/native.py) hands the kernels, as arrays of
// int64 fields (pointers, sizes, strides in elements; floats as the bits of a float64). One X-macro list per
// descriptor names the fields; the module exports the names, so Python fills the arrays by name and the two sides
// cannot disagree on a position.
//
// LAYER: the layer's storage, set when it is (re)allocated: the fast tier (when it lives in host memory), the paged
//   host tier and, for indexes the step searches or appends to natively (ivf-group), the per-item pointers of
//   that index (item = b * Hkv + h).
// WORK: one step of one layer, owned by the step plan: the query and output formats, the part each side computes,
//   the selection (given, or searched here) and the workspaces every phase writes.
#pragma once
#include <cstdint>
#include <cstring>

#define HETERO_LAYER_FIELDS(X)                                                                                      \
  X(B) X(HKV) X(D) X(KV_DTYPE)                                                                                      \
  /* fast tier: [B, Hkv, slots, D]; FAST_K = 0 when it is not in host memory; WINDOW < 0: unbounded (dense) */      \
  X(SINKS) X(WINDOW) X(FAST_SLOTS) X(FAST_K) X(FAST_V) X(FAST_STRIDE_B) X(FAST_STRIDE_H) X(FAST_STRIDE_N)            \
  X(FAST_LENGTHS) /* int32 [B] valid slots */ X(FAST_TOTAL) /* int64 [B] logical tokens */                          \
  /* host tier: pools [Hkv, R, D] (K and V rows of a token side by side), block table int32 [B, HOST_MAX_BLOCKS] */ \
  X(HOST_K) X(HOST_V) X(HOST_STRIDE_H) X(HOST_STRIDE_N) X(HOST_TABLE) X(HOST_MAX_BLOCKS) X(HOST_BLOCK_TOKENS)        \
  X(HOST_LENGTHS) /* int64 [B] */ X(HOST_CAPACITY) /* int64 [B] tokens the sequence's blocks hold */                \
  /* index: 0 = added from Python, 1 = counts only (exhaustive retrievers), 2 = ivf-group tail append */            \
  X(INDEX_KIND) X(INDEX_NTOTAL) /* int64 [B] */ X(INDEX_LIMIT) /* int64 [B] largest ntotal a native add reaches */  \
  X(VALUE_LIMIT) /* float64 bits: the largest |key| or |value| stored (attention's, or the index's) */              \
  /* ivf-group, uint64 [items] pointers each */                                                                     \
  X(IVF_CODES) X(IVF_IDS) X(IVF_START) X(IVF_COUNT) X(IVF_CENTROIDS) X(IVF_MEAN_NORM) X(IVF_VMEAN)                  \
  X(IVF_TAIL_KSUM) X(IVF_TAIL_VSUM) X(IVF_TAIL_VMEAN) X(IVF_VMIN) X(IVF_INV_STEP) X(IVF_STEP) X(IVF_TAIL_KEYS)     \
  X(IVF_TAIL_VALUES)                                                                                                \
  X(IVF_NLISTS) /* int64 [items] lists with the tail, 0: not trained */ X(IVF_MAX_LISTS) X(IVF_TAIL_CAP)            \
  X(IVF_FLUSH_PHASE) /* the tail also flushes when an add ends at p with (p - phase) % TAIL_CAP == 0 */             \
  X(IVF_BITS) X(IVF_DP) X(IVF_PROBE_FACTOR) /* float64 bits */ X(IVF_ESTIMATE)

#define HETERO_WORK_FIELDS(X)                                                                                       \
  X(HQ) X(SCALE) /* float64 bits */ X(Q_DTYPE) X(Q_STRIDE_B) X(Q_STRIDE_H) X(OUT_DTYPE) X(OUT_STRIDE_B)             \
  X(OUT_STRIDE_H) X(Q32) /* float32 [B, Hq, D] */                                                                   \
  X(WINDOW_ON) /* attend the fast tier here and write the merged output */                                           \
  X(HOST_MODE) /* 0 no host part, 1 the given selection, 2 ivf-group search */                                       \
  X(SEL_INDICES) X(SEL_K) X(SEL_COUNTS) X(SEL_LOG_WEIGHT) X(SEL_EST_OUT) X(SEL_EST_LSE)                             \
  /* keys per query of each item: BUDGET_KIND 0 a count, 1 a fraction of the host tier (BUDGET_VALUE, float64     \
     bits), 2 given in IVF_K; times BUDGET_SCALE, not below the floor (FLOOR_KIND / FLOOR_VALUE) when scaled,    \
     then split over the G query heads when BUDGET_SPLIT > 1 (hetero/config.py budget_for, hetero/plan.py)  */    \
  X(BUDGET_KIND) X(BUDGET_VALUE) X(BUDGET_SCALE) X(FLOOR_KIND) X(FLOOR_VALUE) X(BUDGET_SPLIT)                      \
  X(IVF_K) /* int64 [items] keys per query */ X(IVF_KMAX) X(IVF_PROBE) X(IVF_PROBE_STRIDE) X(IVF_TOP) X(IVF_UNION)  \
  X(IVF_UNION_COUNT) X(IVF_SCANNED) X(IVF_EST_OUT) X(IVF_EST_LSE)                                                   \
  X(WIN_OUT) X(WIN_LSE) X(HOST_OUT) X(HOST_LSE) X(LSE_OUT) X(FAST_PREFETCH) X(HOST_PREFETCH)                          \
  X(TIMES) /* float64 [2 * kPhases] start / end per phase, or 0 */

namespace hetero {

#define HETERO_ENUM_FIELD(name) name,
enum LayerField : int { HETERO_LAYER_FIELDS(HETERO_ENUM_FIELD) kLayerFields };
enum WorkField : int { HETERO_WORK_FIELDS(HETERO_ENUM_FIELD) kWorkFields };
#undef HETERO_ENUM_FIELD

// Phases a step records when WORK.TIMES is set: window, search, host attention, merge, and (decode_token) the
// token's append; decode_step leaves the append's zero. The first three run as one pool run (their items
// interleave on the threads): the run's wall time is laid out as consecutive spans, each phase's share of the
// threads' busy time (a search made in Python keeps the span its caller wrote there).
constexpr int kPhases = 5;
constexpr int kPhaseAppend = 4;

// The largest |q|, |k| or |v| the steps take (hetero.validation.VALUE_LIMIT): scores scale * q.k over head_dim
// < 2^16 with scale <= 1e3 (hetero.validation.MAX_SCALE) stay below 6.6e37, inside float32, and so do the value
// sums; beyond it a finite input could give an inf score and a silently wrong part.
constexpr double kValueLimit = 1e15;

// decode_step's results besides success (0): nothing was computed, nothing changed.
constexpr int64_t kStepQueryNotFinite = -1;  // NaN, inf, or beyond kValueLimit
// > 0: the workspace is too small; the value is the keys per query the step needs room for (IVF_KMAX), or, when
// the probe rows are too short, kStepNeedProbe.
constexpr int64_t kStepNeedProbe = int64_t{1} << 40;
// Runner::decode_token: the step did not run (the append refused, or left index adds to Python).
constexpr int64_t kStepNotRun = -2;

template <class T>
inline T* field_ptr(const int64_t* d, int f) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(d[f]));
}

inline double field_f64(const int64_t* d, int f) {
  double x;
  std::memcpy(&x, d + f, sizeof x);
  return x;
}

}  // namespace hetero
