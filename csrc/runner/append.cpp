#include "runner/append.h"

#include <algorithm>
#include <cmath>

#include "common/half.h"
#include "ivf/ivf_scan.h"
#include "runner/step.h"

namespace hetero {
namespace {

// Every element finite, at most `limit` in magnitude (the index's range), and still finite once stored as
// store_dtype (a float32 1e5 is inf in float16).
bool finite_row(const void* p, int64_t off, int64_t D, int dtype, int store_dtype, double limit) {
  for (int64_t d = 0; d < D; ++d) {
    const float x = load_as_float(p, off + d, dtype);
    if (!std::isfinite(x) || std::fabs(x) > limit) return false;
    if (store_dtype == 2 && dtype != 2 && !std::isfinite(half_bits_to_float(float_to_half_bits(x)))) return false;
    if (store_dtype == 1 && dtype == 0 && !std::isfinite(bf16_bits_to_float(float_to_bf16_bits(x)))) return false;
  }
  return true;
}

// Copy D elements between dtypes (the same dtype copies bits).
void copy_row(const void* src, int64_t src_off, int src_dtype, void* dst, int64_t dst_off, int dst_dtype, int64_t D) {
  if (src_dtype == dst_dtype) {
    const int64_t size = src_dtype == 0 ? 4 : 2;
    __builtin_memcpy(static_cast<char*>(dst) + dst_off * size, static_cast<const char*>(src) + src_off * size, D * size);
    return;
  }
  for (int64_t d = 0; d < D; ++d) store_from_float(dst, dst_off + d, dst_dtype, load_as_float(src, src_off + d, src_dtype));
}

// The ivf-group tail append of one token of sequence b (all KV heads), its K/V rows read from the host tier:
// codes and id into the tail list's segment, the tail's key/value sums and mean value, its float keys and values
// (what the tail's assignment to lists reads later), the tail's count. As IVFGroupRetriever's numpy path, the same
// float32 operations.
void ivf_tail_append(const int64_t* L, int64_t b, int64_t pos, const void* hk, const void* hv, int64_t host_row,
                     float* key, float* value) {
  const int64_t Hkv = L[HKV], D = L[LayerField::D], dtype = L[KV_DTYPE];
  const int64_t bits = L[IVF_BITS], Dp = L[IVF_DP];
  for (int64_t h = 0; h < Hkv; ++h) {
    const int64_t item = b * Hkv + h, lists = field_ptr<const int64_t>(L, IVF_NLISTS)[item], tail = lists - 1;
    const int64_t off = h * L[HOST_STRIDE_H] + host_row * L[HOST_STRIDE_N];
    for (int64_t d = 0; d < D; ++d) {
      key[d] = load_as_float(hk, off + d, static_cast<int>(dtype));
      value[d] = load_as_float(hv, off + d, static_cast<int>(dtype));
    }
    int64_t* count = reinterpret_cast<int64_t*>(field_ptr<const uint64_t>(L, IVF_COUNT)[item]);
    const int64_t* start = reinterpret_cast<const int64_t*>(field_ptr<const uint64_t>(L, IVF_START)[item]);
    const int64_t t = count[tail], row = start[tail] + t;
    ivf_encode_key(key, D, reinterpret_cast<const float*>(field_ptr<const uint64_t>(L, IVF_VMIN)[item]),
                   reinterpret_cast<const float*>(field_ptr<const uint64_t>(L, IVF_INV_STEP)[item]), bits, Dp,
                   reinterpret_cast<uint8_t*>(field_ptr<const uint64_t>(L, IVF_CODES)[item]), row);
    reinterpret_cast<int32_t*>(field_ptr<const uint64_t>(L, IVF_IDS)[item])[row] = static_cast<int32_t>(pos);
    float* ksum = reinterpret_cast<float*>(field_ptr<const uint64_t>(L, IVF_TAIL_KSUM)[item]);
    float* vsum = reinterpret_cast<float*>(field_ptr<const uint64_t>(L, IVF_TAIL_VSUM)[item]);
    uint16_t* vmean = reinterpret_cast<uint16_t*>(field_ptr<const uint64_t>(L, IVF_TAIL_VMEAN)[item]);
    float* tk = reinterpret_cast<float*>(field_ptr<const uint64_t>(L, IVF_TAIL_KEYS)[item]) + t * D;
    float* tv = reinterpret_cast<float*>(field_ptr<const uint64_t>(L, IVF_TAIL_VALUES)[item]) + t * D;
    for (int64_t d = 0; d < D; ++d) {
      ksum[d] += key[d];
      vsum[d] += value[d];
      vmean[d] = float_to_bf16_bits(vsum[d] / static_cast<float>(t + 1));
      tk[d] = key[d];
      tv[d] = value[d];
    }
    count[tail] = t + 1;
  }
}

// Whether the index takes sequence b's next token natively (else Python adds it).
bool native_add(const int64_t* L, int64_t b, int64_t pos) {
  const int64_t kind = L[INDEX_KIND];
  if (kind == 0) return false;
  const int64_t* ntotal = field_ptr<const int64_t>(L, INDEX_NTOTAL);
  const int64_t* limit = field_ptr<const int64_t>(L, INDEX_LIMIT);
  if (ntotal[b] != pos || ntotal[b] + 1 > limit[b]) return false;  // out of step, training or retraining due
  if (kind == 1) return true;
  const int64_t Hkv = L[HKV], cap = L[IVF_TAIL_CAP];
  if (cap < 1) return false;
  const bool phase = (pos + 1 + cap - L[IVF_FLUSH_PHASE]) % cap == 0;  // the layer's flush point (SeqIndex.flush_due)
  for (int64_t h = 0; h < Hkv; ++h) {
    const int64_t item = b * Hkv + h, lists = field_ptr<const int64_t>(L, IVF_NLISTS)[item];
    if (lists == 0) return true;  // not trained yet: counted only (searches scan the host tier)
    const int64_t* count = reinterpret_cast<const int64_t*>(field_ptr<const uint64_t>(L, IVF_COUNT)[item]);
    if (phase || count[lists - 1] + 1 >= cap) return false;  // the tail fills or is due: Python assigns it to lists
  }
  return true;
}

// Every cache line append_decode will touch, asked for at once: between decode steps the model's other work evicts
// them, and touching them one after the other costs a full memory latency each (tens of microseconds a step).
void prefetch_targets(const int64_t* L, const void* k, const void* v, int64_t stride_b, int64_t stride_h,
                      int in_dtype) {
  const int64_t B = L[LayerField::B], Hkv = L[HKV], D = L[LayerField::D], S = L[SINKS], W = L[WINDOW];
  const int64_t elem = L[KV_DTYPE] == 0 ? 4 : 2, in_elem = in_dtype == 0 ? 4 : 2, row = D * elem;
  const auto lines = [](const void* p, int64_t bytes) {
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(static_cast<const char*>(p) + off, 1, 3);
  };
  const int64_t* total = field_ptr<const int64_t>(L, FAST_TOTAL);
  const int64_t* host_len = field_ptr<const int64_t>(L, HOST_LENGTHS);
  const int32_t* table = field_ptr<const int32_t>(L, HOST_TABLE);
  const int64_t bt = L[HOST_BLOCK_TOKENS];
  for (int64_t b = 0; b < B; ++b) {
    const int64_t t = total[b];
    const int64_t slot = t < S ? t : (W > 0 ? S + (t - S) % W : -1);
    const int64_t pos = host_len[b];
    const bool to_host = t >= S && t - S >= W && pos < field_ptr<const int64_t>(L, HOST_CAPACITY)[b];
    const int64_t hrow = to_host ? static_cast<int64_t>(table[b * L[HOST_MAX_BLOCKS] + pos / bt]) * bt + pos % bt : 0;
    for (int64_t h = 0; h < Hkv; ++h) {
      lines(static_cast<const char*>(k) + (b * stride_b + h * stride_h) * in_elem, D * in_elem);
      lines(static_cast<const char*>(v) + (b * stride_b + h * stride_h) * in_elem, D * in_elem);
      if (slot >= 0) {
        const int64_t f = (b * L[FAST_STRIDE_B] + h * L[FAST_STRIDE_H] + slot * L[FAST_STRIDE_N]) * elem;
        lines(field_ptr<const char>(L, FAST_K) + f, row);
        lines(field_ptr<const char>(L, FAST_V) + f, row);
      }
      if (to_host) {
        const int64_t o = (h * L[HOST_STRIDE_H] + hrow * L[HOST_STRIDE_N]) * elem;
        lines(field_ptr<const char>(L, HOST_K) + o, row);
        lines(field_ptr<const char>(L, HOST_V) + o, row);
      }
      if (L[INDEX_KIND] != 2 || !to_host) continue;
      const int64_t item = b * Hkv + h, lists = field_ptr<const int64_t>(L, IVF_NLISTS)[item];
      if (lists == 0) continue;
      const int64_t* count = reinterpret_cast<const int64_t*>(field_ptr<const uint64_t>(L, IVF_COUNT)[item]);
      const int64_t* start = reinterpret_cast<const int64_t*>(field_ptr<const uint64_t>(L, IVF_START)[item]);
      const int64_t tl = count[lists - 1], r = start[lists - 1] + tl, bits = L[IVF_BITS], Dp = L[IVF_DP];
      const int64_t row_bytes = bits == 4 ? Dp / 2 : Dp;
      const char* arena = reinterpret_cast<const char*>(field_ptr<const uint64_t>(L, IVF_CODES)[item]);
      for (int64_t g = 0; g < row_bytes; g += 4) __builtin_prefetch(arena + code_offset(r, g, row_bytes), 1, 3);
      __builtin_prefetch(reinterpret_cast<const int32_t*>(field_ptr<const uint64_t>(L, IVF_IDS)[item]) + r, 1, 3);
      for (int f : {IVF_TAIL_KSUM, IVF_TAIL_VSUM, IVF_VMIN, IVF_INV_STEP})
        lines(reinterpret_cast<const char*>(field_ptr<const uint64_t>(L, f)[item]), D * 4);
      lines(reinterpret_cast<const char*>(field_ptr<const uint64_t>(L, IVF_TAIL_VMEAN)[item]), D * 2);
      for (int f : {IVF_TAIL_KEYS, IVF_TAIL_VALUES})
        lines(reinterpret_cast<const char*>(field_ptr<const uint64_t>(L, f)[item]) + tl * D * 4, D * 4);
    }
  }
}

}  // namespace

int append_decode(const int64_t* L, const void* k, const void* v, int64_t stride_b, int64_t stride_h, int in_dtype,
                  int index_native, int64_t* flags) {
  const int64_t B = L[LayerField::B], Hkv = L[HKV], D = L[LayerField::D], S = L[SINKS], W = L[WINDOW];
  const int dtype = static_cast<int>(L[KV_DTYPE]);
  const double limit = field_f64(L, VALUE_LIMIT) > 0 ? field_f64(L, VALUE_LIMIT) : HUGE_VAL;
  int64_t* total = field_ptr<int64_t>(L, FAST_TOTAL);
  int32_t* lengths = field_ptr<int32_t>(L, FAST_LENGTHS);
  int64_t* host_len = field_ptr<int64_t>(L, HOST_LENGTHS);
  const int64_t* capacity = field_ptr<const int64_t>(L, HOST_CAPACITY);
  void* fk = field_ptr<void>(L, FAST_K);
  void* fv = field_ptr<void>(L, FAST_V);
  void* hk = field_ptr<void>(L, HOST_K);
  void* hv = field_ptr<void>(L, HOST_V);

  prefetch_targets(L, k, v, stride_b, stride_h, in_dtype);
  int code = kAppendOk;
  for (int64_t b = 0; b < B; ++b) {
    bool ok = true;
    for (int64_t h = 0; h < Hkv && ok; ++h)
      ok = finite_row(k, b * stride_b + h * stride_h, D, in_dtype, dtype, limit) &&
           finite_row(v, b * stride_b + h * stride_h, D, in_dtype, dtype, limit);
    flags[b] = ok ? 0 : 1;
    if (!ok) code = kAppendNotFinite;
  }
  if (code != kAppendOk) return code;
  for (int64_t b = 0; b < B; ++b) {
    const bool to_host = total[b] >= S && total[b] - S >= W;
    flags[b] = to_host && host_len[b] >= capacity[b];
    if (flags[b]) code = kAppendNeedBlocks;
  }
  if (code != kAppendOk) return code;

  const int64_t bt = L[HOST_BLOCK_TOKENS], max_blocks = L[HOST_MAX_BLOCKS];
  const int32_t* table = field_ptr<const int32_t>(L, HOST_TABLE);
  float key[kMaxCodeDims], value[kMaxCodeDims];
  int python_adds = 0;
  for (int64_t b = 0; b < B; ++b) {
    flags[b] = -1;
    const int64_t t = total[b];
    int64_t slot = -1;  // fast slot the new token takes (-1: none, it goes to the host tier)
    bool evict = false;  // the token in `slot` leaves the window first
    if (t < S) {
      slot = t;
    } else if (W > 0) {
      slot = S + (t - S) % W;
      evict = t - S >= W;
    }
    if (slot < 0 || evict) {  // one token enters the host tier: the evicted one, or the new one (no window)
      const int64_t pos = host_len[b];
      const int64_t row = static_cast<int64_t>(table[b * max_blocks + pos / bt]) * bt + pos % bt;
      for (int64_t h = 0; h < Hkv; ++h) {
        const int64_t dst = h * L[HOST_STRIDE_H] + row * L[HOST_STRIDE_N];
        if (evict) {
          const int64_t src = b * L[FAST_STRIDE_B] + h * L[FAST_STRIDE_H] + slot * L[FAST_STRIDE_N];
          copy_row(fk, src, dtype, hk, dst, dtype, D);
          copy_row(fv, src, dtype, hv, dst, dtype, D);
        } else {
          copy_row(k, b * stride_b + h * stride_h, in_dtype, hk, dst, dtype, D);
          copy_row(v, b * stride_b + h * stride_h, in_dtype, hv, dst, dtype, D);
        }
      }
      host_len[b] = pos + 1;
      if (index_native && native_add(L, b, pos)) {
        if (L[INDEX_KIND] == 2 && field_ptr<const int64_t>(L, IVF_NLISTS)[b * Hkv] > 0)
          ivf_tail_append(L, b, pos, hk, hv, row, key, value);
        field_ptr<int64_t>(L, INDEX_NTOTAL)[b] += 1;
      } else {
        flags[b] = pos;
        ++python_adds;
      }
    }
    if (slot >= 0)
      for (int64_t h = 0; h < Hkv; ++h) {
        const int64_t dst = b * L[FAST_STRIDE_B] + h * L[FAST_STRIDE_H] + slot * L[FAST_STRIDE_N];
        copy_row(k, b * stride_b + h * stride_h, in_dtype, fk, dst, dtype, D);
        copy_row(v, b * stride_b + h * stride_h, in_dtype, fv, dst, dtype, D);
      }
    total[b] = t + 1;
    const int64_t valid = std::min<int64_t>(t + 1, S) + (W > 0 ? std::min<int64_t>(std::max<int64_t>(t + 1 - S, 0), W) : 0);
    lengths[b] = static_cast<int32_t>(valid);
  }
  return python_adds;
}

}  // namespace hetero
