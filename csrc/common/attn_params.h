// Torch-free parameter blocks shared by the CPU and CUDA attention kernels.
//
// Tensors are passed as raw pointers plus element strides for the (batch, head, seq) dims; the
// last (feature) dim is always contiguous (stride 1). Stride 0 is allowed (expanded inputs).
//
// Visibility contract (see README): with i' = i + Nk - Nq, query i sees key j iff
//   key_padding[b][j] != 0 (or no mask), and
//   (i' - left <= j <= i' + right  ||  j is a landmark  ||  i' is a landmark), and
//   (!causal || j <= i').
// window_left/right < 0 means unlimited on that side. A query that sees no key outputs zeros and
// lse = -inf.
#pragma once
#include <cstdint>

namespace hk {

enum class DType : int32_t { F32 = 0, BF16 = 1, F16 = 2 };

struct AttnParams {
  // Shapes: q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), o (B, Hq, Nq, Dv).
  int64_t B = 0, Hq = 0, Hk = 0, Nq = 0, Nk = 0, D = 0, Dv = 0;
  // Element strides of the (batch, head, seq) dims.
  int64_t q_stride[3] = {0, 0, 0};
  int64_t k_stride[3] = {0, 0, 0};
  int64_t v_stride[3] = {0, 0, 0};
  int64_t o_stride[3] = {0, 0, 0};
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;           // written in `dtype`
  float* lse = nullptr;        // (B, Hq, Nq) contiguous fp32, natural log; -inf for empty rows
  DType dtype = DType::F32;    // dtype of q, k, v, o
  float scale = 1.0f;          // softmax scale applied to q.k
  int64_t window_left = -1;    // < 0: unlimited
  int64_t window_right = -1;   // < 0: unlimited
  bool causal = false;
  // Landmarks: sorted, unique key positions in [0, Nk); (B, G) with batch stride, or shared
  // across the batch with landmarks_batch_stride = 0. G = 0 / nullptr: none.
  const int32_t* landmarks = nullptr;
  int64_t num_landmarks = 0;
  int64_t landmarks_batch_stride = 0;
  // The same set as per-position flags (B, Nk) uint8, 1 = key position j is a landmark; shared
  // across the batch when landmark_flags_batch_stride = 0. nullptr iff no landmarks.
  const uint8_t* landmark_flags = nullptr;
  int64_t landmark_flags_batch_stride = 0;
  // Key padding (B, Nk) uint8 contiguous, 1 = real token; nullptr = no padding.
  const uint8_t* key_padding = nullptr;
  int num_threads = 0;         // <= 0: OpenMP default
  // Score modifiers, applied in this order to s = scale * q_i . k_j of every visible pair:
  //   s = softcap * tanh(s / softcap)        if softcap > 0
  //   s = s + bias[h, (j - r) + Nk - 1]      if bias != nullptr (r = i + Nk - Nq, h the q head)
  // The lse written is that of the modified scores. (The int8 kernels take neither.)
  float softcap = 0.f;         // <= 0: off
  const float* bias = nullptr; // (Hq, Nq + Nk - 1) fp32 contiguous; nullptr = none
};

// Backward: reads q, k, v, o, lse (from AttnParams) and dout; writes fp32 gradients.
struct AttnBwdParams {
  AttnParams fwd;              // o and lse are inputs here (from the forward)
  const void* dout = nullptr;  // (B, Hq, Nq, Dv) in fwd.dtype
  int64_t dout_stride[3] = {0, 0, 0};
  float* dq = nullptr;         // (B, Hq, Nq, D) contiguous fp32, fully written by the kernel
  float* dk = nullptr;         // (B, Hk, Nk, D) contiguous fp32, fully written by the kernel
  float* dv = nullptr;         // (B, Hk, Nk, Dv) contiguous fp32, fully written by the kernel
  // Gradients rounded to bf16 / fp16 (grad_dtype; F32: none), same shapes, contiguous: the kernel
  // writes each item's rounded results as soon as they are final, so callers need no separate
  // conversion pass. With them dq may be null (dQ rows go straight to dq_lp), and dk / dv may be
  // null together (the kernel then accumulates dK / dV in its own scratch).
  DType grad_dtype = DType::F32;
  uint16_t* dq_lp = nullptr;
  uint16_t* dk_lp = nullptr;
  uint16_t* dv_lp = nullptr;
  // Gradient of fwd.bias: dbias[h, o] = sum over batches and visible pairs (i, j) with
  // (j - r) + Nk - 1 = o of dS (before the softcap factor). (Hq, Nq + Nk - 1) fp32 contiguous,
  // fully written by the kernel when non-null (also without fwd.bias: the gradient at bias = 0).
  float* dbias = nullptr;
};

// INT8 forward (SageAttention-style): q/k quantized per block, by the caller (q8/k8 given) or by
// the kernel (q8 == k8 == nullptr, CPU: see k_mean below).
// S_ij = (sum_d q8[i,d] * k8[j,d]) * q_scale[i / q_block] * k_scale[j / k_block] * scale.
// With q8/k8 given, fwd.q / fwd.k are ignored; fwd.v / fwd.o use fwd.dtype (PV in bf16 on CPU).
struct AttnInt8Params {
  AttnParams fwd;
  const int8_t* q8 = nullptr;  // (B, Hq, Nq, D) contiguous
  const int8_t* k8 = nullptr;  // (B, Hk, Nk, D) contiguous
  const float* q_scale = nullptr;  // (B, Hq, ceil(Nq / q_block)) contiguous
  const float* k_scale = nullptr;  // (B, Hk, ceil(Nk / k_block)) contiguous
  int64_t q_block = 64;
  int64_t k_block = 64;
  // Fused quantization (CPU): with q8 == k8 == nullptr the kernel quantizes fwd.q / fwd.k (strides
  // fwd.q_stride / fwd.k_stride, fwd.dtype) itself, exactly as quant.quantize_qk does with blocks
  // q_block / k_block (q_scale / k_scale are then unused). K is smoothed by k_mean (B, Hk, D) fp32
  // contiguous, the mean of K over the real keys (nullptr: no smoothing); padded keys quantize to
  // zero; and the lse written is that of the exact scores (scale * q . k_mean added back).
  const float* k_mean = nullptr;
  // Set by the CPU decode route for itself (callers leave it null): per query row (B, Hq, Nq), the
  // smoothing shift scale * q . k_mean, which joins the scores before a softcap.
  const float* score_shift = nullptr;
};

}  // namespace hk
