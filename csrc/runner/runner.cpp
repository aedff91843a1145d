#include "runner/runner.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <exception>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>

#include "common/cpu_features.h"
#include "common/half.h"
#include "common/merge.h"
#include "runner/append.h"
#include "runner/isa.h"
#include "runner/step.h"
#include "sparse/random_read.h"

namespace hetero {
namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// The rows of one (sequence, KV head) are split into chunks of kChunkRows (at most kMaxChunks, merge_rows' part
// limit), fused by log-sum-exp in chunk order. The split depends on the rows alone, never on the thread count, so a
// result is the same bit for bit whatever the pool's size and whichever path (fused or not) computes it.
constexpr int64_t kChunkRows = 512;
constexpr int64_t kMaxChunks = 64;

}  // namespace

Runner::Runner(int threads) : pool_(std::make_unique<ThreadPool>(threads < 1 ? 1 : threads)) {}

void Runner::set_threads(int threads) {
  if (threads < 1) throw std::invalid_argument("threads must be >= 1");
  std::lock_guard<std::mutex> lock(mu_);
  pool_->resize(threads);
}

void Runner::set_trace(bool on) {
  std::lock_guard<std::mutex> lock(mu_);
  trace_on_ = on;
  if (!on) trace_.clear();
}

std::vector<Runner::TraceRecord> Runner::take_trace() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<TraceRecord> out;
  out.swap(trace_);
  return out;
}

// pool_->run, recording each thread's busy span when tracing (called with mu_ held).
template <class Fn>
void Runner::traced_run(int64_t items, Fn fn) {
  if (!trace_on_) {
    pool_->run(items, fn);
    return;
  }
  std::vector<TraceRecord> spans(pool_->threads(), TraceRecord{-1, 0.0, 0.0, -1});
  pool_->run(items, [&](int64_t item, int worker) {
    TraceRecord& r = spans[worker];  // each thread writes its own entry
    const double t = now();
    if (r.worker < 0) r = TraceRecord{worker, t, t, -1};
    fn(item, worker);
    r.end = now();
  });
  for (const TraceRecord& r : spans)
    if (r.worker >= 0) trace_.push_back(r);
}

void Runner::sparse_attention(const SparseArgs& a, float* out, float* lse) {
  std::lock_guard<std::mutex> lock(mu_);
  sparse_locked(a, out, lse);
}

SparseSplit Runner::split_sparse(const SparseArgs& a, std::vector<float>& parts) {
  SparseSplit s;
  const int64_t K = a.K, G = a.Hq / a.Hkv;
  s.heads = a.B * a.Hkv;
  s.chunks = std::min(kMaxChunks, std::max<int64_t>(1, (K + kChunkRows - 1) / kChunkRows));
  s.chunk_len = K > 0 ? std::max(kChunkRows, (K + s.chunks - 1) / s.chunks) : 0;
  s.items = s.heads * s.chunks;
  const int threads = pool_->threads();
  if (static_cast<int>(scratch_.size()) < threads) scratch_.resize(threads);
  const int64_t need = item_scratch_floats(a, std::max<int64_t>(s.chunk_len, 1));
  for (auto& buf : scratch_)
    if (static_cast<int64_t>(buf.size()) < need) buf.resize(need);
  if (s.chunks > 1) {
    if (static_cast<int64_t>(parts.size()) < s.items * G * (a.D + 1)) parts.resize(s.items * G * (a.D + 1));
    s.part_out = parts.data();
    s.part_lse = parts.data() + s.items * G * a.D;
  }
  return s;
}

void Runner::sparse_item(const SparseArgs& a, const SparseSplit& s, ItemFn fn, int64_t item, int worker, float* out,
                         float* lse) {
  const int64_t G = a.Hq / a.Hkv, D = a.D;
  const int64_t head = item / s.chunks, c = item % s.chunks;
  const int64_t b = head / a.Hkv, h = head % a.Hkv;
  const int64_t used = a.counts ? std::min(a.K, a.counts[head]) : a.K;
  const int64_t j0 = std::min(used, c * s.chunk_len), j1 = std::min(used, j0 + s.chunk_len);
  float* o = s.chunks > 1 ? s.part_out + item * G * D : out + (b * a.Hq + h * G) * D;
  float* l = s.chunks > 1 ? s.part_lse + item * G : lse + b * a.Hq + h * G;
  fn(a, b, h, j0, j1, o, l, scratch_[worker].data());
}

void Runner::merge_chunks(const SparseArgs& a, const SparseSplit& s, float* out, float* lse) {
  if (s.chunks == 1) return;
  const int64_t G = a.Hq / a.Hkv, D = a.D;
  const float* outs[kMaxChunks];
  const float* lses[kMaxChunks];
  for (int64_t head = 0; head < s.heads; ++head) {
    const int64_t b = head / a.Hkv, h = head % a.Hkv;
    for (int64_t c = 0; c < s.chunks; ++c) {
      outs[c] = s.part_out + (head * s.chunks + c) * G * D;
      lses[c] = s.part_lse + (head * s.chunks + c) * G;
    }
    merge_rows(static_cast<int>(s.chunks), outs, lses, G, D, out + (b * a.Hq + h * G) * D, lse + b * a.Hq + h * G);
  }
}

void Runner::sparse_locked(const SparseArgs& a, float* out, float* lse) {
  const ItemFn fn = active_item_fn();
  const SparseSplit s = split_sparse(a, parts_);
  traced_run(s.items, [&](int64_t item, int worker) { sparse_item(a, s, fn, item, worker, out, lse); });
  merge_chunks(a, s, out, lse);
}

void Runner::ivf_search(const IvfSearchArgs& a) {
  std::lock_guard<std::mutex> lock(mu_);
  const IvfKernels fn = active_ivf_kernels();
  if (static_cast<int>(ivf_scratch_.size()) < pool_->threads()) ivf_scratch_.resize(pool_->threads());
  traced_run(a.items, [&](int64_t item, int worker) { ivf_search_item(a, item, fn, ivf_scratch_[worker]); });
}

void Runner::ivf_assign(const float* keys, int64_t H, int64_t n, int64_t key_stride, int64_t D,
                        const uint16_t* centroids_t, int64_t L, int64_t* out) {
  std::lock_guard<std::mutex> lock(mu_);
  const IvfCentroidFn fn = active_ivf_kernels().centroids;
  if (static_cast<int>(ivf_scratch_.size()) < pool_->threads()) ivf_scratch_.resize(pool_->threads());
  const int64_t chunks = (n + kAssignChunk - 1) / kAssignChunk;
  traced_run(H * chunks, [&](int64_t item, int worker) {
    const int64_t h = item / chunks, j = item % chunks * kAssignChunk, m = std::min(kAssignChunk, n - j);
    IvfScratch& s = ivf_scratch_[worker];
    s.cscores.resize(static_cast<size_t>(kAssignChunk * L));
    s.crow.resize(static_cast<size_t>(L));
    ivf_nearest_lists(keys + h * key_stride + j * D, m, D, centroids_t + h * D * L, L, fn, s.cscores.data(),
                      s.crow.data(), out + h * n + j);
  });
}

void Runner::ivf_tail_flush(const IvfTailArgs& a) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!ivf_tail_fits(a))
    throw std::invalid_argument("ivf_tail_flush: a list lacks room for the tail keys assigned to it (relocate it "
                                "first), an assignment is out of range, or the tail does not hold t keys");
  if (static_cast<int>(touched_.size()) < pool_->threads()) touched_.resize(pool_->threads());
  traced_run(a.H, [&](int64_t h, int worker) { ivf_tail_flush_head(a, h, touched_[worker]); });
}

double Runner::random_read(const char* base, const int64_t* offsets, int64_t n, int64_t run_bytes, int prefetch,
                           bool to_l2) {
  std::lock_guard<std::mutex> lock(mu_);
  const int threads = pool_->threads();
  std::vector<double> sums(threads, 0.0);
  const int64_t per = (n + threads - 1) / threads;
  pool_->run(threads, [&](int64_t t, int) {
    const int64_t lo = std::min(n, t * per), hi = std::min(n, lo + per);
    sums[t] = read_runs(base, offsets + lo, hi - lo, run_bytes, prefetch, to_l2);
  });
  double total = 0.0;
  for (double x : sums) total += x;
  return total;
}

namespace {

// Keys per query head of a host tier of n tokens (hetero/config.py HeteroConfig.budget_for and the G split of
// hetero/plan.py flat_budgets, the same arithmetic).
int64_t budget_keys(const int64_t* W, int64_t n) {
  const auto keys = [n](int64_t kind, double value) { return kind == 1 ? std::ceil(value * n - 1e-9) : value; };
  const double scale = field_f64(W, BUDGET_SCALE);
  double k = keys(W[BUDGET_KIND], field_f64(W, BUDGET_VALUE)) * scale;
  if (scale != 1.0) k = std::max(k, keys(W[FLOOR_KIND], field_f64(W, FLOOR_VALUE)));
  int64_t kk = std::max<int64_t>(0, std::min<int64_t>(static_cast<int64_t>(std::ceil(k - 1e-9)), n));
  const int64_t split = W[BUDGET_SPLIT];
  if (split > 1 && kk < n) kk = (kk + split - 1) / split;
  return kk;
}

}  // namespace

// The query as float32 [B, Hq, D] in WORK.Q32, the layout every kernel reads; false when it holds a NaN, an inf or
// a value beyond kValueLimit.
static bool stage_query(const int64_t* L, const int64_t* W, const void* q) {
  const int64_t B = L[LayerField::B], D = L[LayerField::D], Hq = W[HQ];
  float* q32 = field_ptr<float>(W, Q32);
  const int q_dtype = static_cast<int>(W[Q_DTYPE]);
  bool finite = true;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t src = b * W[Q_STRIDE_B] + h * W[Q_STRIDE_H];
      float* dst = q32 + (b * Hq + h) * D;
      for (int64_t d = 0; d < D; ++d) {
        dst[d] = load_as_float(q, src + d, q_dtype);
        finite &= std::fabs(dst[d]) <= static_cast<float>(kValueLimit);  // false for NaN and inf too
      }
    }
  return finite;
}

int64_t Runner::decode_step(const int64_t* L, const int64_t* W, const void* q, void* out) {
  std::lock_guard<std::mutex> lock(mu_);
  if (double* times = field_ptr<double>(W, TIMES)) times[2 * kPhaseAppend] = times[2 * kPhaseAppend + 1] = 0;
  if (!stage_query(L, W, q)) return kStepQueryNotFinite;
  return step_locked(L, W, out);
}

TokenStep Runner::decode_token(const int64_t* L, const int64_t* W, const DecodeToken& t, const void* q, void* out) {
  std::lock_guard<std::mutex> lock(mu_);
  // the query first: a refused step leaves the new token out of the tiers too
  if (!stage_query(L, W, q)) return {kAppendOk, kStepQueryNotFinite};
  double* times = field_ptr<double>(W, TIMES);
  if (times) times[2 * kPhaseAppend] = now();
  const int appended = append_decode(L, t.k, t.v, t.stride_b, t.stride_h, t.dtype, t.index_native, t.flags);
  if (times) times[2 * kPhaseAppend + 1] = now();
  if (appended != kAppendOk) return {appended, kStepNotRun};
  return {kAppendOk, step_locked(L, W, out)};
}

int64_t Runner::step_locked(const int64_t* L, const int64_t* W, void* out) {
  const int64_t B = L[LayerField::B], Hkv = L[HKV], D = L[LayerField::D], Hq = W[HQ], G = Hq / Hkv;
  const int64_t items = B * Hkv, rows = B * Hq;
  const float scale = static_cast<float>(field_f64(W, SCALE));
  float* q32 = field_ptr<float>(W, Q32);
  double* times = field_ptr<double>(W, TIMES);
  const auto mark = [&](int phase, int end) {
    if (times) times[2 * phase + end] = now();
  };

  const int64_t mode = W[HOST_MODE];
  if (mode == 2) {  // the budget of every item, and room for it in the workspace
    const int64_t* host_len = field_ptr<const int64_t>(L, HOST_LENGTHS);
    int64_t* k = field_ptr<int64_t>(W, IVF_K);
    int64_t need = 0;
    if (W[BUDGET_KIND] != 2)
      for (int64_t i = 0; i < items; ++i) k[i] = budget_keys(W, host_len[i / Hkv]);
    for (int64_t i = 0; i < items; ++i) need = std::max(need, k[i]);
    if (need > W[IVF_KMAX]) return need;
    const int64_t* nlists = field_ptr<const int64_t>(L, IVF_NLISTS);
    for (int64_t i = 0; i < items; ++i)
      if (nlists[i] > W[IVF_PROBE_STRIDE]) return kStepNeedProbe;
  }

  // WINDOW_ON: this call attends the fast tier (in host memory) and writes the fused output; without it (the fast
  // tier on a GPU) it writes the host side's fusion to HOST_OUT. A tier of no slots (window = sinks = 0) has no part.
  const bool final_out = W[WINDOW_ON] != 0;
  const bool window = final_out && L[FAST_K] && L[FAST_SLOTS] > 0;
  float* win_out = field_ptr<float>(W, WIN_OUT);
  float* win_lse = field_ptr<float>(W, WIN_LSE);
  if (final_out && !window) {  // no fast-tier part: the window details report it empty (out 0, lse -inf), not stale
    std::fill(win_out, win_out + B * Hq * D, 0.0f);
    std::fill(win_lse, win_lse + B * Hq, -std::numeric_limits<float>::infinity());
  }
  const ItemFn item_fn = active_item_fn();
  SparseArgs wa{};
  SparseSplit wsplit;
  if (window) {
    const int32_t* lengths = field_ptr<int32_t>(L, FAST_LENGTHS);
    counts_.resize(items);
    int64_t longest = 0;
    for (int64_t i = 0; i < items; ++i) {
      counts_[i] = lengths[i / Hkv];
      longest = std::max(longest, counts_[i]);
    }
    wa = SparseArgs{q32, field_ptr<const void>(L, FAST_K), field_ptr<const void>(L, FAST_V), L[FAST_STRIDE_H],
                    L[FAST_STRIDE_N], L[FAST_STRIDE_B], nullptr, 0, 1, nullptr, counts_.data(), nullptr, B, Hq, Hkv, D,
                    longest, scale, static_cast<DType>(L[KV_DTYPE]), W[FAST_PREFETCH]};
    wsplit = split_sparse(wa, win_parts_);
  }

  float* host_out = field_ptr<float>(W, HOST_OUT);
  float* host_lse = field_ptr<float>(W, HOST_LSE);
  const float* est_out = nullptr;
  const float* est_lse = nullptr;
  IvfSearchArgs sa{};
  IvfKernels ivf_fn{};
  SparseArgs ha{};
  SparseSplit hsplit;
  if (mode == 2) {  // ivf-group: search, then the rows of each group's union
    const int64_t* k = field_ptr<const int64_t>(W, IVF_K);
    const int64_t* nlists = field_ptr<const int64_t>(L, IVF_NLISTS);
    const int64_t* host_len = field_ptr<const int64_t>(L, HOST_LENGTHS);
    const double pf = field_f64(L, IVF_PROBE_FACTOR);
    nprobe_.resize(items);
    ntokens_.resize(items);
    for (int64_t i = 0; i < items; ++i) {
      const int64_t n = host_len[i / Hkv], lists = nlists[i] - 1;
      ntokens_[i] = n;
      // the faiss IVF retrievers' rule: ceil(nlist * min(1, probe_factor * sqrt(k / N))) lists per query, all of
      // them when the budget covers the host tier (which then selects all of it, whatever probe_factor)
      nprobe_[i] = (k[i] <= 0 || n <= 0 || lists <= 0) ? 0
                   : k[i] >= n ? lists
                   : std::max<int64_t>(1, std::min<int64_t>(lists, static_cast<int64_t>(std::ceil(
                         lists * std::min(1.0, pf * std::sqrt(static_cast<double>(k[i]) / n))))));
    }
    const bool est = L[IVF_ESTIMATE] != 0;
    if (est) {
      est_out = field_ptr<const float>(W, IVF_EST_OUT);
      est_lse = field_ptr<const float>(W, IVF_EST_LSE);
    }
    const int64_t kmax = W[IVF_KMAX];
    sa = IvfSearchArgs{q32, D, field_ptr<const uint64_t>(L, IVF_CENTROIDS), nprobe_.data(),
                       field_ptr<const uint64_t>(L, IVF_STEP), items, G, L[IVF_DP], L[IVF_BITS],
                       field_ptr<const uint64_t>(L, IVF_CODES), field_ptr<const uint64_t>(L, IVF_IDS),
                       field_ptr<const uint64_t>(L, IVF_START), field_ptr<const uint64_t>(L, IVF_COUNT), nlists,
                       W[IVF_PROBE_STRIDE], field_ptr<uint8_t>(W, IVF_PROBE), k, ntokens_.data(),
                       field_ptr<int32_t>(W, IVF_TOP), kmax, field_ptr<int32_t>(W, IVF_UNION),
                       field_ptr<int64_t>(W, IVF_UNION_COUNT), field_ptr<int64_t>(W, IVF_SCANNED), nullptr, scale,
                       nullptr, q32, G, field_ptr<const uint64_t>(L, IVF_MEAN_NORM),
                       field_ptr<const uint64_t>(L, IVF_TAIL_KSUM), field_ptr<const uint64_t>(L, IVF_VMEAN), 0,
                       est ? field_ptr<float>(W, IVF_EST_OUT) : nullptr,
                       est ? field_ptr<float>(W, IVF_EST_LSE) : nullptr};
    ivf_fn = active_ivf_kernels();
    if (static_cast<int>(ivf_scratch_.size()) < pool_->threads()) ivf_scratch_.resize(pool_->threads());
    // the attention reads exactly the rows of each item's union (written ascending by its search, with its size)
    ha = SparseArgs{q32, field_ptr<const void>(L, HOST_K), field_ptr<const void>(L, HOST_V), L[HOST_STRIDE_H],
                    L[HOST_STRIDE_N], 0, field_ptr<const int32_t>(L, HOST_TABLE), L[HOST_MAX_BLOCKS],
                    L[HOST_BLOCK_TOKENS], field_ptr<const int32_t>(W, IVF_UNION),
                    field_ptr<const int64_t>(W, IVF_UNION_COUNT), nullptr, B, Hq, Hkv, D, G * kmax, scale,
                    static_cast<DType>(L[KV_DTYPE]), W[HOST_PREFETCH]};
  } else if (mode == 1) {  // a selection made in Python
    ha = SparseArgs{q32, field_ptr<const void>(L, HOST_K), field_ptr<const void>(L, HOST_V), L[HOST_STRIDE_H],
                    L[HOST_STRIDE_N], 0, field_ptr<const int32_t>(L, HOST_TABLE), L[HOST_MAX_BLOCKS],
                    L[HOST_BLOCK_TOKENS], field_ptr<const int32_t>(W, SEL_INDICES),
                    field_ptr<const int64_t>(W, SEL_COUNTS), field_ptr<const float>(W, SEL_LOG_WEIGHT), B, Hq, Hkv,
                    D, W[SEL_K], scale, static_cast<DType>(L[KV_DTYPE]), W[HOST_PREFETCH]};
    est_out = field_ptr<const float>(W, SEL_EST_OUT);
    est_lse = field_ptr<const float>(W, SEL_EST_LSE);
  }
  if (mode) hsplit = split_sparse(ha, parts_);

  // Every item of the step in one pool run, searches first, then the window's chunks, then the host rows' chunks
  // (a host item waits for its own search; items are taken in order, so the search it waits for is running or
  // done): one hand-off to the pool per step instead of three, and no thread idle at a phase's end while another
  // finishes its last item. SmolLM2's layer geometry, alternating builds step by step in one process (AMD Zen 4,
  // 2 threads): 4K 0.118-0.124 against 0.128 ms a step, 16K 0.249-0.254 against 0.269-0.275 ms. A 128K step is
  // bound by its reads: the same within the noise (2.75-2.99 against 2.69-3.04 ms).
  const int64_t n_search = mode == 2 ? items : 0, n_window = window ? wsplit.items : 0;
  const int64_t n_host = mode ? hsplit.items : 0;
  const int64_t generation = ++step_generation_;
  if (n_search > searched_cap_) {
    searched_.reset(new std::atomic<int64_t>[n_search]);
    for (int64_t i = 0; i < n_search; ++i) searched_[i].store(0, std::memory_order_relaxed);
    searched_cap_ = n_search;
  }
  const int threads = pool_->threads();
  const bool clock = times || trace_on_;
  if (clock) step_workers_.assign(threads, StepWorker{{0, 0, 0}, {0, 0, 0}, {0, 0, 0}});
  // An item that throws (a scratch vector that cannot grow) must not leave a host item waiting for its search: the
  // pool's own handling (thread_pool.h) stops handing out items, and a host item already waiting for a search not
  // handed out would wait forever. So the items catch here: every item still publishes its search and returns, the
  // rest of the run does nothing, and the first exception is rethrown once the run is over.
  std::atomic<bool> failing{false};
  std::exception_ptr failure;
  std::mutex failure_mu;
  const double region_start = clock ? now() : 0.0;
  pool_->run(n_search + n_window + n_host, [&](int64_t t, int worker) {
    int phase = -1;
    double t0 = 0.0;
    if (!failing.load(std::memory_order_relaxed)) {
      try {
        if (t < n_search) {
          phase = 1;
          t0 = clock ? now() : 0.0;
          ivf_search_item(sa, t, ivf_fn, ivf_scratch_[worker]);
        } else if (t < n_search + n_window) {
          phase = 0;
          t0 = clock ? now() : 0.0;
          sparse_item(wa, wsplit, item_fn, t - n_search, worker, win_out, win_lse);
        } else {
          const int64_t i = t - n_search - n_window;
          // the search is running on another thread: spin, yielding now and then in case that thread waits for
          // this core (more pool threads than cores)
          for (int spins = 1; n_search && searched_[i / hsplit.chunks].load(std::memory_order_acquire) != generation;
               ++spins)
            if (spins % 1024) cpu_relax(); else sched_yield();
          phase = 2;
          t0 = clock ? now() : 0.0;
          if (!failing.load(std::memory_order_acquire)) sparse_item(ha, hsplit, item_fn, i, worker, host_out, host_lse);
        }
      } catch (...) {
        std::lock_guard<std::mutex> lock(failure_mu);
        if (!failure) failure = std::current_exception();
        failing.store(true, std::memory_order_release);
      }
    }
    if (t < n_search) searched_[t].store(generation, std::memory_order_release);
    if (clock && phase >= 0) {
      StepWorker& w = step_workers_[worker];
      const double t1 = now();
      if (w.first[phase] == 0.0) w.first[phase] = t0;
      w.busy[phase] += t1 - t0;
      w.last[phase] = t1;
    }
  });
  const double region_end = clock ? now() : 0.0;
  if (failure) std::rethrow_exception(failure);
  if (trace_on_)
    for (int w = 0; w < threads; ++w)
      for (int p = 0; p < 3; ++p)
        if (step_workers_[w].first[p] > 0.0)
          trace_.push_back(TraceRecord{w, step_workers_[w].first[p], step_workers_[w].last[p], p});
  if (times) {  // the run's wall time, apportioned to window, search and host rows by their busy time
    double per_phase[3] = {0.0, 0.0, 0.0}, total = 0.0;
    for (int w = 0; w < threads; ++w)
      for (int p = 0; p < 3; ++p) per_phase[p] += step_workers_[w].busy[p];
    for (double x : per_phase) total += x;
    double at = region_start;
    for (int p = 0; p < 3; ++p) {
      if (p == 1 && !n_search) continue;  // a search made in Python keeps the span its caller wrote
      const double share = total > 0.0 ? (region_end - region_start) * per_phase[p] / total : 0.0;
      times[2 * p] = at;
      times[2 * p + 1] = at += share;
    }
    times[5] = region_end;  // the host rows end with the run (no rounding gap before the merge)
    times[6] = region_end;  // the merge: the split items' chunks, then the parts of each query row
  }
  if (window) merge_chunks(wa, wsplit, win_out, win_lse);
  if (mode) merge_chunks(ha, hsplit, host_out, host_lse);

  // Fusion by log-sum-exp: window, host rows, estimate of the rest. Without the window here (the fast tier on a
  // GPU) the host rows and the estimate are fused into HOST_OUT / HOST_LSE for the device to merge.
  float* lse_out = field_ptr<float>(W, LSE_OUT);
  const int out_dtype = static_cast<int>(W[OUT_DTYPE]);
  row_.resize(D);
  float* row = row_.data();
  for (int64_t r = 0; r < rows; ++r) {
    const float* outs[3];
    float lses[3];
    int P = 0;
    if (window) {
      outs[P] = win_out + r * D;
      lses[P++] = win_lse[r];
    }
    if (mode) {
      outs[P] = host_out + r * D;
      lses[P++] = host_lse[r];
    }
    if (est_out) {
      outs[P] = est_out + r * D;
      lses[P++] = est_lse[r];
    }
    const float l = merge_row(P, outs, lses, D, row);
    if (final_out) {
      const int64_t b = r / Hq, h = r % Hq, dst = b * W[OUT_STRIDE_B] + h * W[OUT_STRIDE_H];
      for (int64_t d = 0; d < D; ++d) store_from_float(out, dst + d, out_dtype, row[d]);
      if (lse_out) lse_out[r] = l;
    } else if (mode) {
      std::copy(row, row + D, host_out + r * D);
      host_lse[r] = l;
    }
  }
  mark(3, 1);
  return 0;
}

}  // namespace hetero
