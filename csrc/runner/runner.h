// A Runner: one thread pool with its own scratch, running the host kernels one call at a time (a mutex orders
// concurrent callers). Separate Runners run concurrently. Pointers come from Python, which owns every check; the
// Runner only computes.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "common/thread_pool.h"
#include "ivf/ivf_scan.h"
#include "ivf/ivf_lists.h"
#include "sparse/sparse_attention.h"

namespace hetero {

// One decode token per sequence for Runner::decode_token (runner/append.h append_decode's arguments).
struct DecodeToken {
  const void* k;
  const void* v;
  int64_t stride_b, stride_h;
  int dtype;
  int index_native;
  int64_t* flags;
};

// What Runner::decode_token did: the append's code (runner/append.h) and the step's (decode_step's, or
// kStepNotRun when the append did not finish the token: a refusal, or index adds left to Python).
struct TokenStep {
  int append;
  int64_t step;
};

using ItemFn = void (*)(const SparseArgs&, int64_t, int64_t, int64_t, int64_t, float*, float*, float*);

// A sparse attention call cut into pool items: the rows of each (sequence, KV head) in `chunks` chunks of at most
// `chunk_len` rows (one item each), fused by log-sum-exp in chunk order when there are several. The cut depends on
// the call's row capacity alone (a.K), never on the thread count or the rows in use, so a result is the same bit for
// bit whatever the pool's size and whichever path computes it.
struct SparseSplit {
  int64_t heads = 0, chunks = 1, chunk_len = 0, items = 0;
  float* part_out = nullptr;  // [items, G, D] chunk partials (chunks > 1)
  float* part_lse = nullptr;  // [items, G]
};

// The kernels of the active ISA level (set_isa may lower it; every Runner follows).
ItemFn active_item_fn();
IvfKernels active_ivf_kernels();

class Runner {
 public:
  explicit Runner(int threads);

  void set_threads(int threads);
  int threads() const { return pool_->threads(); }
  // The pool's workers poll for poll_us from now, the sleeping ones woken: ahead of a step this thread is about to
  // make (thread_pool.h).
  void wake(int poll_us) { pool_->wake(poll_us); }

  // Tracing: while on, each pool run records per thread when it took its first item and finished its last (seconds
  // on the steady clock, Python's time.perf_counter on Linux), a decode step per thread and phase; take_trace()
  // returns and clears them as (worker, start, end, phase), worker 0 being the calling thread.
  void set_trace(bool on);
  struct TraceRecord {
    int worker;
    double start, end;
    int phase;  // a decode step's phase (step.h: 0 window, 1 search, 2 host rows), or -1 for any other call
  };
  std::vector<TraceRecord> take_trace();

  // Attention of each (sequence, KV head) group over its rows (SparseArgs): out [B, Hq, D], lse [B, Hq] float32.
  // Items with many rows and too few items for the pool are split in chunks merged by log-sum-exp.
  void sparse_attention(const SparseArgs& a, float* out, float* lse);

  // Grouped IVF search, one item per (sequence, KV head).
  void ivf_search(const IvfSearchArgs& a);

  // An ivf-group index's list keeping (ivf/ivf_lists.h). ivf_assign: out [H, n] int64, the nearest list of each of
  // keys [H, n, D] float32 (heads key_stride floats apart) by centroids_t [H, D, L] float16, in pool items of
  // kAssignChunk keys. ivf_tail_flush: one item per head; it refuses (ValueError, nothing changed) when a list lacks
  // room for the keys assigned to it.
  void ivf_assign(const float* keys, int64_t H, int64_t n, int64_t key_stride, int64_t D, const uint16_t* centroids_t,
                  int64_t L, int64_t* out);
  void ivf_tail_flush(const IvfTailArgs& a);

  // One decode step of one layer (runner/step.h): the window part, the host part (a given selection, or the
  // ivf-group search and its estimate), and their log-sum-exp fusion written to out in the query's format.
  // Returns 0, or kStepQueryNotFinite / a workspace size (runner/step.h) with nothing computed.
  int64_t decode_step(const int64_t* layer, const int64_t* work, const void* q, void* out);

  // A decode token and the step over it, in one call: the query staged and checked (a NaN or inf refuses both:
  // {kAppendOk, kStepQueryNotFinite}, nothing changed), the token appended (append_decode), then decode_step.
  TokenStep decode_token(const int64_t* layer, const int64_t* work, const DecodeToken& token, const void* q,
                         void* out);

  // Ceiling probe: read n random runs (offsets in bytes from base) across the pool; returns a checksum.
  double random_read(const char* base, const int64_t* offsets, int64_t n, int64_t run_bytes, int prefetch,
                     bool to_l2);

 private:
  template <class Fn>
  void traced_run(int64_t items, Fn fn);
  void sparse_locked(const SparseArgs& a, float* out, float* lse);
  // sparse_locked in parts: the split (part buffers grown in `parts`, per-worker scratch grown for it), one item, and
  // the merge of the chunk partials.
  SparseSplit split_sparse(const SparseArgs& a, std::vector<float>& parts);
  void sparse_item(const SparseArgs& a, const SparseSplit& s, ItemFn fn, int64_t item, int worker, float* out,
                   float* lse);
  static void merge_chunks(const SparseArgs& a, const SparseSplit& s, float* out, float* lse);
  int64_t step_locked(const int64_t* layer, const int64_t* work, void* out);  // decode_step after the query

  std::mutex mu_;
  bool trace_on_ = false;
  std::vector<TraceRecord> trace_;
  std::unique_ptr<ThreadPool> pool_;
  std::vector<std::vector<float>> scratch_;  // per worker: sparse work items
  std::vector<float> parts_, win_parts_;     // chunk partials of split items (out, then lse): host rows, window
  // A decode step's items in one pool run (step_locked): the generation of the step whose search of item i is done
  // (the host rows of item i wait for it), and each worker's busy seconds per phase (window, search, host rows).
  std::unique_ptr<std::atomic<int64_t>[]> searched_;
  int64_t searched_cap_ = 0, step_generation_ = 0;
  struct alignas(64) StepWorker {  // a line of its own per worker
    double busy[3], first[3], last[3];  // per phase: busy seconds, first item's start, last item's end
  };
  std::vector<StepWorker> step_workers_;
  std::vector<IvfScratch> ivf_scratch_;      // per worker
  std::vector<std::vector<uint8_t>> touched_;  // per worker: the lists a tail flush added to
  std::vector<int64_t> counts_, nprobe_, ntokens_;  // per item, of a decode step
  std::vector<float> row_;
};
}  // namespace hetero
