// PLACEHOLDER: replaced by the real kernel; do not ship.
#include <stdexcept>
#include "cpu/attention_cpu.h"
namespace hk { namespace cpu {
void attention_forward(const AttnParams&) { throw std::runtime_error("attention_forward: not built yet"); }
CpuFeatures detect_cpu_features() { return {}; }
std::string selected_isa() { return "scalar"; }
}}
