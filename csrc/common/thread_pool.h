// A small persistent thread pool: run(n_items, fn) calls fn(item, worker) for every item across the calling
// thread and the pool's workers, and returns when all are done. Items are taken from an atomic counter (dynamic
// balance).
//
// Waking a sleeping worker costs tens of microseconds on a virtual machine (the idle vCPU has to be woken by the
// hypervisor: a 2-thread call of ~30 us of work took longer than the same call on one thread). So a worker that
// finishes a call keeps polling for the next one for `spin_us` (default 100 us, HETERO_POOL_SPIN_US), yielding the
// CPU between polls so that another runnable thread on its core is not starved, and only then sleeps on a
// condition variable. The layers of a decode step (each one pool run), following each other quickly,
// find the workers awake. The caller waits only for workers that joined the call before it ran out of items, by
// polling: they are inside their last item.
//
// A caller that knows a run() is coming (a decode step, after the Python that prepares it) calls wake(poll_us)
// first: sleeping workers start polling, and keep at it until then, while the caller is still busy, so the run finds
// them awake.
//
// An item that throws (on any thread) ends the call early: no further item is handed out, the items already running
// finish, and run() rethrows the first exception on the caller once no thread is inside the call. Without this an
// exception on a worker ends the process (std::terminate), and one on the caller unwinds run() while workers still
// call its fn.
#pragma once
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

namespace hetero {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

class ThreadPool {
 public:
  explicit ThreadPool(int threads) : spin_us_(default_spin_us()) { resize(threads); }
  ~ThreadPool() { stop(); }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int threads() const { return static_cast<int>(workers_.size()) + 1; }

  void resize(int threads) {
    if (threads < 1) threads = 1;
    if (threads == this->threads() && !workers_.empty()) return;
    stop();
    stopping_.store(false);
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { loop(i); });
  }

  // Have the workers poll for the next run() for poll_us from now (at least spin_us), waking those that sleep:
  // what run() would wait for, taken ahead of it. Cheap when no worker sleeps.
  void wake(int poll_us) {
    waker_cpu_.store(sched_getcpu(), std::memory_order_relaxed);
    const int64_t until = now_ns() + int64_t{1000} * std::max(poll_us, spin_us_);
    int64_t was = poll_until_ns_.load(std::memory_order_relaxed);
    while (was < until && !poll_until_ns_.compare_exchange_weak(was, until, std::memory_order_relaxed)) {
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (sleepers_ == 0) return;
      ++wakes_;
    }
    cv_.notify_all();
  }

  void run(int64_t n_items, const std::function<void(int64_t, int)>& fn) {
    if (n_items <= 0) return;
    if (workers_.empty() || n_items == 1) {
      for (int64_t i = 0; i < n_items; ++i) fn(i, 0);
      return;
    }
    bool wake;
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn;
      n_items_ = n_items;
      failure_ = nullptr;
      next_.store(0);
      open_ = true;
      generation_.fetch_add(1, std::memory_order_release);
      wake = sleepers_ > 0;
    }
    if (wake) cv_.notify_all();
    drain(0);
    {
      std::lock_guard<std::mutex> lock(mu_);
      open_ = false;  // every item is taken: a worker arriving from now on skips this call
    }
    // The workers still inside finish at most one item each: poll rather than sleep (a sleeping caller is as slow
    // to wake as a sleeping worker).
    while (joined_.load(std::memory_order_acquire) != 0) cpu_relax();
    fn_ = nullptr;
    if (failure_) std::rethrow_exception(std::exchange(failure_, nullptr));
  }

 private:
  static int default_spin_us() {
    const char* s = std::getenv("HETERO_POOL_SPIN_US");
    return s ? std::atoi(s) : 100;
  }

  void drain(int worker) {
    for (int64_t i = next_.fetch_add(1); i < n_items_; i = next_.fetch_add(1)) {
      try {
        (*fn_)(i, worker);
      } catch (...) {
        std::lock_guard<std::mutex> lock(failure_mu_);
        if (!failure_) failure_ = std::current_exception();
        next_.store(n_items_);  // hand out no further item
      }
    }
  }

  static int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }

  // Poll for a new generation for spin_us_ (or until a wake()'s deadline), then sleep until one comes (or a wake(),
  // or stop). After a wake() the same generation is seen again: the caller polls anew. A worker on the vCPU of the
  // last wake()'s caller sleeps at once: polling there, it only takes turns with the caller, who then drains the
  // run alone, and the scheduler, seeing it runnable, leaves it there (with polling on, the pool thread sat out 7-8
  // of a profile's 8 steps in 2 of 12 profiles; 2 vCPUs, AMD Zen 4). Woken by run() instead, it is placed anew.
  void await_generation(uint64_t seen) {
    const int64_t until = std::max(now_ns() + int64_t{1000} * spin_us_, poll_until_ns_.load(std::memory_order_relaxed));
    while (generation_.load(std::memory_order_acquire) == seen && !stopping_.load(std::memory_order_relaxed)) {
      if (now_ns() >= std::max(until, poll_until_ns_.load(std::memory_order_relaxed)) ||
          sched_getcpu() == waker_cpu_.load(std::memory_order_relaxed)) {
        std::unique_lock<std::mutex> lock(mu_);
        const uint64_t wakes = wakes_;
        ++sleepers_;
        cv_.wait(lock, [&] { return stopping_.load() || generation_.load() != seen || wakes_ != wakes; });
        --sleepers_;
        return;
      }
      sched_yield();
    }
  }

  void loop(int worker) {
    uint64_t seen = generation_.load();
    for (;;) {
      await_generation(seen);
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (stopping_.load()) return;
        seen = generation_.load();
        if (!open_) continue;
        joined_.fetch_add(1, std::memory_order_relaxed);
      }
      drain(worker);
      joined_.fetch_sub(1, std::memory_order_release);
    }
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_.store(true);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  const std::function<void(int64_t, int)>* fn_ = nullptr;
  std::atomic<int64_t> next_{0};
  std::mutex failure_mu_;
  std::exception_ptr failure_;  // the current call's first exception
  int64_t n_items_ = 0;
  std::atomic<int> joined_{0};  // workers inside the current call's drain
  int sleepers_ = 0;   // workers blocked on cv_
  uint64_t wakes_ = 0;  // wake() calls that found a sleeper (under mu_)
  std::atomic<int64_t> poll_until_ns_{0};  // the latest wake()'s polling deadline (steady clock)
  std::atomic<int> waker_cpu_{-1};         // the CPU the latest wake()'s caller ran on
  bool open_ = false;  // the current call still has items a worker may take
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stopping_{false};
  const int spin_us_;
};

}  // namespace hetero
