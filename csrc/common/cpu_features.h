// Run-time choice of the vector ISA for the host kernels.
#pragma once
#include "common/types.h"

namespace hetero {

// Highest level this CPU (and OS) supports.
Isa detect_isa();
const char* isa_name(Isa isa);
// AVX-512 VNNI (vpdpbusd), used by the IVF code scan at the highest level.
bool cpu_has_avx512_vnni();
// Parse "scalar" | "avx2" | "avx512" | "avx512_bf16"; returns false for an unknown name.
bool parse_isa(const char* name, Isa* out);

}  // namespace hetero
