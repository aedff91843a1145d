// Grouped IVF search, per item: pick the lists to probe, gather them, score them (ISA-specific IvfKernels), select each
// query's top k, union the sets through a bitmap over host positions (sorted output without a sort).
#include <algorithm>
#include <cmath>
#include <cstring>
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

// Positions (into s[0..n)) of the k largest scores, written to out[0..k). Exact: a threshold from a strided
// sample narrows the candidates to a little over k, nth_element finishes on those; if the sample's
// threshold admits fewer than k, it is lowered until it admits enough (at worst every position).
void top_positions(const float* s, int64_t n, int64_t k, IvfSelectFn select, IvfScratch& w, int32_t* out) {
  if (k <= 0) return;
  if (k >= n) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<int32_t>(i);
    return;
  }
  const int64_t m = strided_sample(s, n, w.sample);
  // aim at ~1.25 k candidates: rank r in the sample of m corresponds to ~r * n / m in the full set
  int64_t r = std::min<int64_t>(m - 1, (k * m * 5) / (4 * n) + 2);
  if (static_cast<int64_t>(w.cand.size()) < n + 16) w.cand.resize(n + 16);
  int64_t c = 0;
  for (;;) {
    float threshold = -__builtin_inff();
    if (r < m - 1) {
      std::nth_element(w.sample.begin(), w.sample.begin() + r, w.sample.end(), std::greater<float>());
      threshold = w.sample[r];
    }
    c = select(s, n, threshold, w.cand.data());
    if (c >= k) break;
    r = std::min<int64_t>(m - 1, 2 * r + 1);
  }
  std::nth_element(w.cand.begin(), w.cand.begin() + (k - 1), w.cand.begin() + c,
                   [s](int32_t x, int32_t y) { return s[x] > s[y] || (s[x] == s[y] && x < y); });
  std::memcpy(out, w.cand.data(), k * sizeof(int32_t));
}

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

// probe[0 .. L] for one item: each query's nprobe best lists by q . centroid (ties to the lower list), and the
// tail list L when the item has a budget.
void probe_lists(const IvfSearchArgs& a, int64_t item, IvfKernels kernels, IvfScratch& w) {
  const int64_t G = a.G, L = a.nlist - 1, p = std::min(a.nprobe[item], L);
  uint8_t* probe = a.probe + item * a.nlist;
  std::fill(probe, probe + a.nlist, uint8_t{0});
  if (a.k[item] <= 0 || p <= 0) {
    probe[L] = a.k[item] > 0;
    return;
  }
  probe[L] = 1;
  if (p == L) {
    std::fill(probe, probe + L, uint8_t{1});
    return;
  }
  if (static_cast<int64_t>(w.cscores.size()) < G * L) w.cscores.resize(G * L);
  kernels.centroids(a.q + item * G * a.D, G, a.D, reinterpret_cast<const float*>(a.centroids[item]), L,
                    w.cscores.data());
  w.lists.resize(p);
  for (int64_t g = 0; g < G; ++g) {
    top_positions(w.cscores.data() + g * L, L, p, kernels.select, w, w.lists.data());
    for (int64_t j = 0; j < p; ++j) probe[w.lists[j]] = 1;
  }
}

}  // namespace

void quantize_queries(const float* q, const float* step, int64_t G, int64_t D, int64_t Dp, int8_t* qi,
                      float* qscale) {
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = q + g * D;
    float amax = 0.0f;
    for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(qg[d] * step[d]));
    const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
    qscale[g] = scale;
    int8_t* out = qi + g * Dp;
    for (int64_t d = 0; d < D; ++d) {
      const float r = std::nearbyint((qg[d] * step[d]) / scale);  // round half to even, as numpy's rint
      out[d] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, r)));
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
  quantize_queries(a.q + item * G * a.D, a.step + item * a.D, G, a.D, Dp, s.qi.data(), s.qscale.data());
  const uint8_t* probe = a.probe + item * a.nlist;
  int32_t* top = a.top ? a.top + item * G * a.kmax : nullptr;
  int32_t* uni = a.union_ids + item * G * a.kmax;
  std::fill(uni, uni + G * a.kmax, -1);
  if (top) std::fill(top, top + G * a.kmax, -1);

  int64_t n = 0;
  for (int64_t l = 0; l < a.nlist; ++l)
    if (probe[l]) n += count[l];
  a.scanned[item] = n;
  const int64_t k = std::min(a.k[item], n);
  if (a.missed_lse) std::fill(a.missed_lse + item * G, a.missed_lse + (item + 1) * G, -__builtin_inff());
  if (k <= 0) {
    a.union_count[item] = 0;
    return;
  }
  if (static_cast<int64_t>(s.scores.size()) < G * n) s.scores.resize(G * n);
  if (static_cast<int64_t>(s.ids.size()) < n) s.ids.resize(n);
  int64_t pos = 0;
  int64_t next = 0;  // the next probed list after l, whose first rows are prefetched while l is scored
  for (int64_t l = 0; l < a.nlist; ++l) {
    if (!probe[l] || count[l] == 0) continue;
    for (next = std::max(next, l + 1); next < a.nlist && (!probe[next] || count[next] == 0);) ++next;
    if (next < a.nlist) {
      const uint8_t* head = codes + start[next] * row_bytes;
      const int64_t bytes = std::min<int64_t>(count[next] * row_bytes, 4096);
      for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(head + b, 0, 3);
    }
    score(codes + start[l] * row_bytes, count[l], Dp, s.qi.data(), s.qscale.data(), G, s.scores.data() + pos, n);
    std::memcpy(s.ids.data() + pos, ids + start[l], count[l] * sizeof(int32_t));
    pos += count[l];
  }

  const int64_t words = (a.n_tokens[item] + 63) / 64;
  if (static_cast<int64_t>(s.bitmap.size()) < words) s.bitmap.assign(words, 0);
  if (static_cast<int64_t>(s.best.size()) < k) s.best.resize(k);
  int32_t* best = s.best.data();
  for (int64_t g = 0; g < G; ++g) {
    if (a.missed_lse)
      a.missed_lse[item * G + g] = missed_lse_estimate(s.scores.data() + g * n, n, a.k_ref[item], a.scale, s);
    top_positions(s.scores.data() + g * n, n, k, kernels.select, s, best);
    for (int64_t j = 0; j < k; ++j) {
      const int32_t id = s.ids[best[j]];
      if (top) top[g * a.kmax + j] = id;
      s.bitmap[id >> 6] |= uint64_t{1} << (id & 63);
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
}

}  // namespace hetero
