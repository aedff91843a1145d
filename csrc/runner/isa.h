// The ISA level every Runner dispatches to: detected once, lowered by set_isa (HETERO_CPU_ISA, tests).
#pragma once
#include <string>

#include "common/types.h"
#include "ivf/ivf_scan.h"

namespace hetero {

Isa detected_isa();
Isa active_isa();
// Force a level at or below the detected one; throws std::invalid_argument naming the allowed ones.
void set_isa(const std::string& name);

}  // namespace hetero
