// The K smoothing mean of the INT8 definition on the CPU (hybrid_kernels.quant.smoothing_mean).
#include "cpu/int8/key_mean.h"

#include <omp.h>

#include <algorithm>
#include <vector>

#include "cpu/attention_cpu.h"
#include "cpu/int8/int8_support.h"

namespace hk {
namespace cpu {

void key_mean(const void* k, DType dtype, int64_t B, int64_t H, int64_t N, int64_t D,
              const int64_t* stride, const uint8_t* real, float* out, int num_threads) {
  constexpr int64_t kChunk = 256;
  // 16-bit rows widen with the int8 kernel set's vector widening (baseline fp16 conversion is a
  // library call per element).
  const int8::Kernels* kern = dtype == DType::F32 ? nullptr : int8::select_kernels(selected_isa());
  const size_t elem = dtype == DType::F32 ? 4 : 2;
  const int64_t items = B * H;
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(num_threads, items)));
#pragma omp parallel num_threads(threads) if (threads > 1 && items * N * D >= (int64_t(1) << 16))
  {
    std::vector<float> row(D), part(D), total(D);
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t b = it / H, h = it % H;
      const char* base = static_cast<const char*>(k) + (b * stride[0] + h * stride[1]) * elem;
      const uint8_t* rb = real ? real + b * N : nullptr;
      std::fill(total.begin(), total.end(), 0.f);
      int64_t count = 0;
      for (int64_t c0 = 0; c0 < N; c0 += kChunk) {
        std::fill(part.begin(), part.end(), 0.f);
        for (int64_t j = c0; j < std::min(N, c0 + kChunk); ++j) {
          if (rb && !rb[j]) continue;
          ++count;
          const char* src = base + j * stride[2] * elem;
          if (kern)
            kern->widen(reinterpret_cast<const uint16_t*>(src), dtype == DType::BF16, D, row.data());
          else
            int8::to_float(src, dtype, D, row.data());
          for (int64_t d = 0; d < D; ++d) part[d] += row[d];
        }
        for (int64_t d = 0; d < D; ++d) total[d] += part[d];
      }
      // Without a mask every key counts (N); with one, the real keys, at least 1.
      const float n = float(real ? std::max<int64_t>(count, 1) : N);
      for (int64_t d = 0; d < D; ++d) out[it * D + d] = total[d] / n;
    }
  }
}

}  // namespace cpu
}  // namespace hk
