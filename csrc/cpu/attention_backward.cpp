// PLACEHOLDER: replaced by the real kernel; do not ship.
#include <stdexcept>
#include "cpu/attention_cpu.h"
namespace hk { namespace cpu {
void attention_backward(const AttnBwdParams&) { throw std::runtime_error("attention_backward: not built yet"); }
}}
