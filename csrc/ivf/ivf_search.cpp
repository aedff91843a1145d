// Grouped IVF search, per item: pick the lists to probe, gather them, score them (ISA-specific IvfKernels), select each
// query's top k, union the sets through a bitmap over host positions (sorted output without a sort).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "ivf_scan.h"

namespace hetero {
namespace {

// Every stride-th score of s[0..n) (stride = n / 512, at least 1) into out; returns how many (m). Each sampled
// score stands for about n / m scores.
int64_t strided_sample(const float* s, int64_t n, std::vector<float>& out) {
  const int64_t stride = std::max<int64_t>(1, n / 512);
  out.clear();
  for (int64_t i = 0; i < n; i += stride) out.push_back(s[i]);
  return static_cast<int64_t>(out.size());
}

// An order-preserving integer key of a non-NaN float: a > b exactly when key(a) > key(b) (-0 below +0, which
// only matters for which of two equal scores counts as larger: neither, as both keys meet at the k-th).
inline uint32_t order_key(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  // branch-free (scores' signs are random): negatives flip every bit, others only the sign bit
  const uint32_t negative = static_cast<uint32_t>(static_cast<int32_t>(u) >> 31);
  return u ^ (negative | 0x80000000u);
}

// The smallest and largest of x[0..c), c >= 1, no NaN. Sixteen independent lanes (minss / maxss chains, no branch):
// a single running min / max compiled to a compare and branch per element, 3.0 against 0.46 ns per element at
// random signs (AMD Zen 4).
void min_max(const float* x, int64_t c, float& lo, float& hi) {
  constexpr int64_t kLanes = 16;
  float l[kLanes], h[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) l[j] = h[j] = x[0];
  int64_t i = 0;
  for (; i + kLanes <= c; i += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) {
      l[j] = x[i + j] < l[j] ? x[i + j] : l[j];
      h[j] = x[i + j] > h[j] ? x[i + j] : h[j];
    }
  for (; i < c; ++i) {
    l[0] = x[i] < l[0] ? x[i] : l[0];
    h[0] = x[i] > h[0] ? x[i] : h[0];
  }
  lo = l[0], hi = h[0];
  for (int64_t j = 1; j < kLanes; ++j) {
    lo = l[j] < lo ? l[j] : lo;
    hi = h[j] > hi ? h[j] : hi;
  }
}

// Below kSmallSelect scores nth_element on a copy is cheaper than the histogram's passes (the candidates behind a
// sample threshold are often fewer); from kSampleFrom the strided sample pays. A per-query selection at SmolLM2's
// 8K (1700 scores, k 48) took 4.9 instead of 7.0 us a binding call (300 scores: 3.4 us, most of it the call); 300 to
// 32000 scores no slower (AMD Zen 4).
constexpr int64_t kSmallSelect = 256;
constexpr int64_t kSampleFrom = 1024;

// The k-th largest (1 <= k <= c) of x[0..c). Past kSmallSelect scores, the keys' range is cut into at most 2048
// buckets; a counting pass finds the bucket that holds the k-th, and nth_element runs on that bucket's members alone
// (about c / 2048 of them for spread scores, all of them at worst): the selection of a 128K search, sample threshold
// included, in half the time of nth_element over all c (AMD Zen 4).
float kth_largest(const float* x, int64_t c, int64_t k, IvfScratch& w) {
  if (static_cast<int64_t>(w.bucket.size()) < c) w.bucket.resize(c);
  float* bucket = w.bucket.data();
  if (c <= kSmallSelect) {
    std::memcpy(bucket, x, c * sizeof(float));
    std::nth_element(bucket, bucket + (k - 1), bucket + c, std::greater<float>());
    return bucket[k - 1];
  }
  float fl, fh;
  min_max(x, c, fl, fh);
  // either zero may stand for both: -0 keys below +0
  const uint32_t lo = order_key(fl == 0.0f ? -0.0f : fl), hi = order_key(fh == 0.0f ? 0.0f : fh);
  int shift = 0;
  while (((hi - lo) >> shift) >= 2048) ++shift;
  const int64_t buckets = ((hi - lo) >> shift) + 1;
  w.histogram.assign(buckets, 0);
  int32_t* histogram = w.histogram.data();
  for (int64_t i = 0; i < c; ++i) ++histogram[(order_key(x[i]) - lo) >> shift];
  int64_t b = buckets - 1, above = 0;  // scores in buckets above b
  for (; above + histogram[b] < k; --b) above += histogram[b];
  int64_t members = 0;  // the bucket's members, gathered branch-free
  for (int64_t i = 0; i < c; ++i) {
    bucket[members] = x[i];
    members += ((order_key(x[i]) - lo) >> shift) == static_cast<uint32_t>(b);
  }
  std::nth_element(bucket, bucket + (k - above - 1), bucket + members, std::greater<float>());
  return bucket[k - above - 1];
}

// The positions of the k largest of x[0..c) given the k-th largest, ascending, into out: every score above kth and
// the first of those equal to it; pos maps an index of x to its position (nullptr: the index itself). Branch-free,
// as winners and losers interleave at random; when every score equal to kth wins (the rule, as ties are rare) the
// pass carries one count instead of three.
void keep_winners(const float* x, const int32_t* pos, int64_t c, int64_t k, float kth, int32_t* out) {
  int64_t above = 0, equal = 0;  // above the k-th: all of them win, the rest of the k tie at it
  for (int64_t i = 0; i < c; ++i) {
    above += x[i] > kth;
    equal += x[i] == kth;
  }
  int64_t taken = 0;
  if (above + equal == k) {
    for (int64_t i = 0; i < c && taken < k; ++i) {  // out holds k: stop at the last winner
      out[taken] = pos ? pos[i] : static_cast<int32_t>(i);
      taken += x[i] >= kth;
    }
    return;
  }
  int64_t ties = k - above;
  for (int64_t i = 0; i < c && taken < k; ++i) {
    const int64_t tie = (x[i] == kth) & (ties > 0);
    out[taken] = pos ? pos[i] : static_cast<int32_t>(i);
    taken += (x[i] > kth) | tie;
    ties -= tie;
  }
}

}  // namespace

// A threshold from a strided sample narrows the candidates to a little over k (if it admits fewer than k, it is
// lowered until it admits enough, at worst every position); the candidates' scores, copied contiguous, give the
// k-th score (kth_largest; a comparator through the positions cost 4x more); one pass over the candidates keeps
// the winners.
void ivf_top_positions(const float* s, int64_t n, int64_t k, IvfSelectFn select, IvfScratch& w, int32_t* out) {
  if (k <= 0) return;
  if (k >= n) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<int32_t>(i);
    return;
  }
  if (n < kSampleFrom) {  // a sample would be most of the scores: the k-th of all, then one pass over them
    const float kth = kth_largest(s, n, k, w);
    keep_winners(s, nullptr, n, k, kth, out);
    return;
  }
  const int64_t m = strided_sample(s, n, w.sample);
  // aim at ~1.25 k candidates: rank r in the sample of m corresponds to ~r * n / m in the full set
  int64_t r = std::min<int64_t>(m - 1, (k * m * 5) / (4 * n) + 2);
  if (static_cast<int64_t>(w.cand.size()) < n + 16) w.cand.resize(n + 16);
  int64_t c = 0;
  for (;;) {
    float threshold = -__builtin_inff();
    if (r < m - 1) threshold = kth_largest(w.sample.data(), m, r + 1, w);
    c = select(s, n, threshold, w.cand.data());
    if (c >= k) break;
    r = std::min<int64_t>(m - 1, 2 * r + 1);
  }
  if (static_cast<int64_t>(w.cand_scores.size()) < c) w.cand_scores.resize(c);
  const int32_t* cand = w.cand.data();
  float* cs = w.cand_scores.data();
  for (int64_t i = 0; i < c; ++i) cs[i] = s[cand[i]];
  keep_winners(cs, cand, c, k, kth_largest(cs, c, k, w), out);
}

namespace {

// log sum exp(scale * s_i) over the positions outside the k_ref largest of s[0..n), estimated from a strided
// sample (every stride-th score stands for stride scores). -inf when nothing is outside.
float missed_lse_estimate(const float* s, int64_t n, int64_t k_ref, float scale, IvfScratch& w) {
  const float neg_inf = -__builtin_inff();
  if (k_ref >= n) return neg_inf;
  const int64_t m = strided_sample(s, n, w.sample);
  const int64_t r = (k_ref * m + n - 1) / n;  // sample rank of the k_ref-th score
  if (r >= m) return neg_inf;
  // sample[r] becomes the largest score outside the top r, the shift that keeps the exponentials in range
  std::nth_element(w.sample.begin(), w.sample.begin() + r, w.sample.end(), std::greater<float>());
  const float top = w.sample[r];
  double sum = 0.0;
  for (int64_t j = r; j < m; ++j) sum += std::exp(static_cast<double>(scale) * (w.sample[j] - top));
  return static_cast<float>(scale * top + std::log(sum * static_cast<double>(n) / m));
}

// probe[0 .. L] for one item: each query's nprobe best non-empty lists by q . centroid (ties to the lower list), and
// the tail list L when the item has a budget. Empty lists (emptied by a crop, or left empty by training) are never
// chosen: a probe spent on one scans nothing, and a query whose best lists were all empty (keys of a later topic,
// cropped away) scanned no row and lost the host tier's mass. The centroid scores stay in w.cscores (the estimate
// reuses them).
void probe_lists(const IvfSearchArgs& a, int64_t item, IvfKernels kernels, IvfScratch& w) {
  const int64_t G = a.G, lists = a.nlists[item], L = lists - 1, p = std::min(a.nprobe[item], L);
  const int64_t* count = reinterpret_cast<const int64_t*>(a.list_count[item]);
  uint8_t* probe = a.probe + item * a.probe_stride;
  std::fill(probe, probe + lists, uint8_t{0});
  if (a.k[item] <= 0 || p <= 0) {
    probe[L] = a.k[item] > 0;
    return;
  }
  probe[L] = 1;
  if (p < L || a.est_out) {
    if (static_cast<int64_t>(w.cscores.size()) < G * L) w.cscores.resize(G * L);
    if (static_cast<int64_t>(w.crow.size()) < L) w.crow.resize(L);
    kernels.centroids(a.q + item * G * a.D, G, a.D, reinterpret_cast<const uint16_t*>(a.centroids[item]), L,
                      w.crow.data(), w.cscores.data());
  }
  int64_t live = 0;
  for (int64_t l = 0; l < L; ++l) live += count[l] > 0;
  if (p >= live) {
    for (int64_t l = 0; l < L; ++l) probe[l] = count[l] > 0;
    return;
  }
  w.lists.resize(p);
  if (static_cast<int64_t>(w.ranked.size()) < L) w.ranked.resize(L);
  // Empty lists rank below every list that holds keys (live > p, so none is among the p best). A query beyond
  // float32 (the sum rule's sum of huge queries) scores inf - inf = NaN against some centroids: the selection's order
  // keys assume no NaN (a NaN key indexed past kth_largest's histogram), so NaN ranks with the lowest.
  const float lowest = -std::numeric_limits<float>::max();
  for (int64_t g = 0; g < G; ++g) {
    const float* cs = w.cscores.data() + g * L;
    for (int64_t l = 0; l < L; ++l)
      w.ranked[l] = count[l] <= 0 ? -__builtin_inff() : cs[l] == cs[l] ? std::max(cs[l], lowest) : lowest;
    ivf_top_positions(w.ranked.data(), L, p, kernels.select, w, w.lists.data());
    for (int64_t j = 0; j < p; ++j) probe[w.lists[j]] = 1;
  }
}

// The estimate of one item (IvfSearchArgs::est_out): logits of every list with unattended members, then attention
// over the lists' mean values. attended: [Ge or 1, nlist] rows attended per list (one row shared by the group
// unless per_query_counts).
void estimate_item(const IvfSearchArgs& a, int64_t item, IvfKernels kernels, IvfScratch& s) {
  const int64_t Ge = a.Ge, lists = a.nlists[item], L = lists - 1, D = a.D;
  const int64_t* count = reinterpret_cast<const int64_t*>(a.list_count[item]);
  const float* mean_norm = reinterpret_cast<const float*>(a.mean_norm[item]);
  const float* tail_ksum = reinterpret_cast<const float*>(a.tail_ksum[item]);
  const float* qe = a.qe + item * Ge * D;
  const float* cs = s.cscores.data();
  if (a.qe != a.q) {  // other queries than the search's (the sum rule searches with their sum)
    if (static_cast<int64_t>(s.escores.size()) < Ge * L) s.escores.resize(Ge * L);
    if (static_cast<int64_t>(s.crow.size()) < L) s.crow.resize(L);
    kernels.centroids(qe, Ge, D, reinterpret_cast<const uint16_t*>(a.centroids[item]), L, s.crow.data(),
                      s.escores.data());
    cs = s.escores.data();
  }
  int64_t most = 0;
  for (int64_t l = 0; l <= L; ++l) most = std::max(most, count[l]);
  if (static_cast<int64_t>(s.log_n.size()) <= most) {
    const int64_t old = static_cast<int64_t>(s.log_n.size());
    s.log_n.resize(most + 1);
    for (int64_t i = old; i <= most; ++i) s.log_n[i] = std::log(static_cast<float>(i));
  }
  const float neg_inf = -__builtin_inff();
  s.logits.resize(Ge * lists);
  s.rows.resize(lists);
  for (int64_t g = 0; g < Ge; ++g) {
    const int32_t* att = s.attended.data() + (a.per_query_counts ? g * lists : 0);
    float* x = s.logits.data() + g * lists;
    const float* cg = cs + g * L;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t rest = count[l] - att[l];
      x[l] = rest > 0 ? a.scale * cg[l] * mean_norm[l] + s.log_n[rest] : neg_inf;
    }
    const int64_t rest = count[L] - att[L];
    float dot = 0.0f;
    if (rest > 0)
      for (int64_t d = 0; d < D; ++d) dot += qe[g * D + d] * tail_ksum[d];
    x[L] = rest > 0 ? a.scale * dot / static_cast<float>(count[L]) + s.log_n[rest] : neg_inf;
  }
  kernels.estimate(s.logits.data(), Ge, lists, lists, reinterpret_cast<const uint16_t*>(a.vmean[item]), D,
                   s.rows.data(), a.est_out + item * Ge * D, a.est_lse + item * Ge);
}

// The next probed list is read into L2 while the current one is scored (lists are ~8 KB runs scattered over the
// arena, so the hardware prefetchers see each start late), its ids with its codes (the copy of the ids read them
// from DRAM otherwise), and a share of its lines after each kScanChunk rows of the current list: issued in one burst
// the prefetches stalled on full miss queues. With cold caches (a 1 GB read between steps) the search of a 128K step
// took 1.10 instead of 1.40-1.49 ms (AMD Zen 5). Two lists ahead in one burst overflowed the misses in flight (AMD
// Zen 4); spread, two or three lists ahead were no faster than one (AMD Zen 5).
constexpr int64_t kScanChunk = 16;  // rows: one code block

struct NextListPrefetch {
  const char* codes = nullptr;
  const char* ids = nullptr;
  int64_t code_lines = 0, lines = 0, issued = 0;

  void reset(const uint8_t* c, int64_t code_bytes, const int32_t* i, int64_t count) {
    codes = reinterpret_cast<const char*>(c);
    ids = reinterpret_cast<const char*>(i);
    code_lines = (code_bytes + 63) / 64;
    lines = code_lines + (count * static_cast<int64_t>(sizeof(int32_t)) + 63) / 64;
    issued = 0;
  }
  void issue_until(int64_t upto) {  // lines [issued, upto) of the codes, then of the ids
    for (upto = std::min(upto, lines); issued < upto; ++issued)
      __builtin_prefetch(issued < code_lines ? codes + issued * 64 : ids + (issued - code_lines) * 64, 0, 2);
  }
};

}  // namespace

void quantize_queries(const float* q, const float* step, int64_t G, int64_t D, int64_t Dp, int8_t* qi,
                      float* qscale) {
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = q + g * D;
    int8_t* out = qi + g * Dp;
    float amax = 0.0f;
    for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(qg[d] * step[d]));
    if (std::isfinite(amax)) {
      const float step127 = amax / 127.0f;  // 0 for a zero query, and for one whose largest |x| is below 127 x the
      const float scale = step127 > 0.0f ? step127 : 1.0f;  // smallest subnormal: both quantize to zeros
      qscale[g] = scale;
      for (int64_t d = 0; d < D; ++d) {
        const float r = std::nearbyint((qg[d] * step[d]) / scale);  // round half to even, as numpy's rint
        out[d] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, r)));
      }
    } else {  // q * step beyond float32 (a query near its range): the same in double, so no score is inf * 0
      double big = 0.0;
      for (int64_t d = 0; d < D; ++d) big = std::max(big, std::fabs(static_cast<double>(qg[d]) * step[d]));
      const double scale = big / 127.0;
      qscale[g] = static_cast<float>(std::min(scale, static_cast<double>(std::numeric_limits<float>::max())));
      for (int64_t d = 0; d < D; ++d) {
        const double r = std::nearbyint(static_cast<double>(qg[d]) * step[d] / scale);
        out[d] = static_cast<int8_t>(std::min(127.0, std::max(-127.0, r)));
      }
    }
    std::fill(out + D, out + Dp, int8_t{0});
  }
}

void ivf_search_item(const IvfSearchArgs& a, int64_t item, IvfKernels kernels, IvfScratch& s) {
  const int64_t G = a.G, Dp = a.Dp, row_bytes = a.bits == 4 ? Dp / 2 : Dp;
  const IvfScoreFn score = a.bits == 4 ? kernels.score4 : kernels.score;
  const uint8_t* codes = reinterpret_cast<const uint8_t*>(a.codes[item]);
  const int32_t* ids = reinterpret_cast<const int32_t*>(a.ids[item]);
  const int64_t* start = reinterpret_cast<const int64_t*>(a.list_start[item]);
  const int64_t* count = reinterpret_cast<const int64_t*>(a.list_count[item]);
  probe_lists(a, item, kernels, s);
  s.qi.resize(G * Dp);
  s.qscale.resize(G);
  quantize_queries(a.q + item * G * a.D, reinterpret_cast<const float*>(a.step[item]), G, a.D, Dp, s.qi.data(),
                   s.qscale.data());
  const int64_t lists = a.nlists[item];
  const uint8_t* probe = a.probe + item * a.probe_stride;
  int32_t* top = a.top ? a.top + item * G * a.kmax : nullptr;
  int32_t* uni = a.union_ids + item * G * a.kmax;
  std::fill(uni, uni + G * a.kmax, -1);
  if (top) std::fill(top, top + G * a.kmax, -1);

  int64_t n = 0;
  for (int64_t l = 0; l < lists; ++l)
    if (probe[l]) n += count[l];
  a.scanned[item] = n;
  const int64_t k = std::min(a.k[item], n);
  if (a.missed_lse) std::fill(a.missed_lse + item * G, a.missed_lse + (item + 1) * G, -__builtin_inff());
  if (a.est_out) {  // empty until estimated (a k = 0 item has no host part at all)
    std::fill(a.est_out + item * a.Ge * a.D, a.est_out + (item + 1) * a.Ge * a.D, 0.0f);
    std::fill(a.est_lse + item * a.Ge, a.est_lse + (item + 1) * a.Ge, -__builtin_inff());
  }
  if (k <= 0) {
    a.union_count[item] = 0;
    return;
  }
  const bool est = a.est_out != nullptr;
  if (est) {
    if (static_cast<int64_t>(s.pos_list.size()) < n) s.pos_list.resize(n);
    s.attended.assign((a.per_query_counts ? a.Ge : 1) * lists, 0);
  }
  if (static_cast<int64_t>(s.scores.size()) < G * n) s.scores.resize(G * n);
  if (static_cast<int64_t>(s.ids.size()) < n) s.ids.resize(n);
  int64_t pos = 0;
  NextListPrefetch ahead;
  int64_t next = 0;
  for (int64_t l = 0; l < lists; ++l) {
    if (!probe[l] || count[l] == 0) continue;
    for (next = std::max(next, l + 1); next < lists && (!probe[next] || count[next] == 0);) ++next;
    if (next < lists)
      ahead.reset(codes + start[next] * row_bytes, count[next] * row_bytes, ids + start[next], count[next]);
    else
      ahead.reset(nullptr, 0, nullptr, 0);
    const int64_t chunks = (count[l] + kScanChunk - 1) / kScanChunk, per_chunk = (ahead.lines + chunks - 1) / chunks;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t r = c * kScanChunk;
      ahead.issue_until((c + 1) * per_chunk);
      score(codes + (start[l] + r) * row_bytes, std::min(kScanChunk, count[l] - r), Dp, s.qi.data(),
            s.qscale.data(), G, s.scores.data() + pos + r, n);
    }
    std::memcpy(s.ids.data() + pos, ids + start[l], count[l] * sizeof(int32_t));
    if (est) std::fill(s.pos_list.data() + pos, s.pos_list.data() + pos + count[l], static_cast<int32_t>(l));
    pos += count[l];
  }

  // The selection assumes no NaN (its order keys and histogram). No score is one: each is an exact integer sum
  // times qscale, which quantize_queries keeps finite and positive for every query (a pass that replaced NaN
  // scores cost 0.2-0.28 of a 1.3 ms 128K search: the scores had left L2 by then).
  const int64_t words = (a.n_tokens[item] + 63) / 64;
  if (static_cast<int64_t>(s.bitmap.size()) < words) s.bitmap.assign(words, 0);
  if (static_cast<int64_t>(s.best.size()) < k) s.best.resize(k);
  int32_t* best = s.best.data();
  for (int64_t g = 0; g < G; ++g) {
    if (a.missed_lse)
      a.missed_lse[item * G + g] = missed_lse_estimate(s.scores.data() + g * n, n, a.k_ref[item], a.scale, s);
    ivf_top_positions(s.scores.data() + g * n, n, k, kernels.select, s, best);
    for (int64_t j = 0; j < k; ++j) {
      const int32_t id = s.ids[best[j]];
      if (top) top[g * a.kmax + j] = id;
      const uint64_t bit = uint64_t{1} << (id & 63);
      if (est) {  // count the attended rows per list: each query's own, or the union's once
        if (a.per_query_counts)
          ++s.attended[g * lists + s.pos_list[best[j]]];
        else if (!(s.bitmap[id >> 6] & bit))
          ++s.attended[s.pos_list[best[j]]];
      }
      s.bitmap[id >> 6] |= bit;
    }
  }
  int64_t m = 0;
  for (int64_t w = 0; w < words; ++w) {
    uint64_t bits = s.bitmap[w];
    if (!bits) continue;
    s.bitmap[w] = 0;
    while (bits) {
      uni[m++] = static_cast<int32_t>(w * 64 + __builtin_ctzll(bits));
      bits &= bits - 1;
    }
  }
  a.union_count[item] = m;
  if (est) estimate_item(a, item, kernels, s);
}

}  // namespace hetero
