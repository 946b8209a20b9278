// Small device helpers shared by the CUDA kernels.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#define HK_CUDA_CHECK(expr, kernel_name)                                                       \
  do {                                                                                         \
    cudaError_t hk_err_ = (expr);                                                              \
    if (hk_err_ != cudaSuccess)                                                                \
      throw std::runtime_error(std::string("hybrid_kernels CUDA kernel ") + (kernel_name) +    \
                               ": " + cudaGetErrorString(hk_err_));                            \
  } while (0)

// After a launch: configuration errors show up here, asynchronous faults at the next sync.
#define HK_CHECK_LAUNCH(kernel_name) HK_CUDA_CHECK(cudaGetLastError(), kernel_name)

namespace hk {
namespace cuda {

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// N consecutive 16-bit elements (N in {2, 4, 8}) to fp32 with one vector load; `src` must be
// aligned to 2 * N bytes.
template <typename T, int N>
__device__ __forceinline__ void load_to_float(const T* src, float (&out)[N]) {
  static_assert(N == 2 || N == 4 || N == 8, "load_to_float: N must be 2, 4 or 8");
  using Vec = typename std::conditional<N == 2, uint32_t, typename std::conditional<N == 4, uint2, uint4>::type>::type;
  const Vec w = *reinterpret_cast<const Vec*>(src);
  const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = to_float(e[k]);
}

// cp.async (sm_80+): 16-byte global -> shared copies that bypass registers. `pred` false
// zero-fills the destination without reading `src` (which must still be a valid address).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool pred) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const int src_size = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_size)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Wait until at most N of this thread's committed groups are still in flight (groups complete
// in commit order). Other threads' copies are visible only after a following __syncthreads().
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Everything a kernel needs to evaluate the pattern for one (batch) row.
struct PatternView {
  int64_t Nq, Nk, left, right;
  bool causal;
  const uint8_t* lm_flags;   // (Nk) for this batch row, or nullptr
  const uint8_t* padding;    // (Nk) for this batch row, or nullptr
  __device__ __forceinline__ bool key_real(int64_t j) const { return padding == nullptr || padding[j] != 0; }
  __device__ __forceinline__ bool is_landmark(int64_t pos) const {
    return lm_flags != nullptr && pos >= 0 && pos < Nk && lm_flags[pos] != 0;
  }
};

}  // namespace cuda
}  // namespace hk
