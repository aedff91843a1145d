// The GQA group's queries in blocks of at most four, each block size a compile-time constant, so that kernels
// written for NQ = 1..4 queries (accumulators in registers) cover any group size. Internal linkage: each ISA's
// translation unit inlines its own copy.
#pragma once
#include <cstdint>

namespace {

template <int N> struct QueryBlock { static constexpr int size = N; };

// f(QueryBlock<4>{}, g) for g = 0, 4, ... while four remain, then one call with the remaining 1-3.
template <class F>
inline void for_query_blocks(int64_t G, F&& f) {
  int64_t g = 0;
  for (; g + 4 <= G; g += 4) f(QueryBlock<4>{}, g);
  switch (G - g) {
    case 3: f(QueryBlock<3>{}, g); break;
    case 2: f(QueryBlock<2>{}, g); break;
    case 1: f(QueryBlock<1>{}, g); break;
    default: break;
  }
}

}  // namespace
