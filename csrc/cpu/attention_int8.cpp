// PLACEHOLDER: replaced by the real kernel; do not ship.
#include <stdexcept>
#include "cpu/attention_cpu.h"
namespace hk { namespace cpu {
void attention_forward_int8(const AttnInt8Params&) { throw std::runtime_error("attention_forward_int8: not built yet"); }
}}
