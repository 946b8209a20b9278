// Entry points of the CUDA attention kernels (csrc/cuda/*.cu). Torch-free: raw pointers, shapes,
// strides and the caller's stream. Errors (bad parameters, failed launches) throw
// std::invalid_argument / std::runtime_error naming the kernel; pybind11 maps them to Python.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common/attn_params.h"

namespace hk {
namespace cuda {

// Fused window + landmark forward, fp16/bf16, D = Dv in {64, 128}, tensor cores (WMMA on
// sm_80+). q/k/v/o rows must be 16-byte aligned (contiguous last dim, strides multiple of 8).
void attention_forward(const AttnParams& p, cudaStream_t stream);

// INT8 QK^T (dp4a, int32 accumulate) + fp16/bf16 PV, split over the key sequence with an LSE
// merge. Meant for decode (few queries, long pre-quantized K cache) but correct for any Nq.
// Workspace: partial_o (num_splits, B*Hq, Nq, Dv) and partial_ml (num_splits, B*Hq, Nq, 2), fp32.
struct Int8SplitParams {
  AttnInt8Params attn;
  int num_splits = 1;
  float* partial_o = nullptr;
  float* partial_ml = nullptr;
};
void attention_forward_int8(const Int8SplitParams& p, cudaStream_t stream);
// Query rows per CTA of the INT8 kernel for Nq queries (1, 4 or 16); the grid has
// ceil(Nq / rows) * B * Hq * num_splits CTAs, which the caller's num_splits choice should know.
int int8_rows_per_cta(int64_t nq);

}  // namespace cuda
}  // namespace hk
