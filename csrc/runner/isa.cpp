#include "runner/isa.h"

#include <atomic>
#include <stdexcept>

#include "common/cpu_features.h"
#include "runner/runner.h"

namespace hetero {
namespace {

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

}  // namespace

Isa detected_isa() { return global().detected; }
Isa active_isa() { return static_cast<Isa>(global().active.load()); }
ItemFn active_item_fn() { return item_fn(active_isa()); }
IvfKernels active_ivf_kernels() { return ivf_kernels(active_isa()); }

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

}  // namespace hetero
