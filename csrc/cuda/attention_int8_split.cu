// INT8 QK^T (dp4a, int32 accumulation) + PV in fp32 from fp16/bf16 V, split over the key
// sequence ("split-K", flash-decoding style) with a log-sum-exp merge.
//
// Built for decode: a few query rows against a long, pre-quantized INT8 K cache (per-block
// scales) that is never re-quantized between steps; the bytes read per step are those of the
// INT8 K and the 16-bit V, once. Correct for any Nq (query rows are processed ROWS per CTA).
//
// Grid (B*Hq, num_splits, ceil(Nq/ROWS)), 4 warps; ROWS = 1, 4 or 16 (int8_rows_per_cta), a
// template parameter so decode does not pay registers for 16 rows. Each lane owns one key of a
// 32-key group: it loads that key's INT8 row once (16-byte loads when D % 16 == 0) and dots it
// with every query row (dp4a); the warp then runs the online softmax per row and accumulates
// P V with lanes over contiguous value elements.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/pattern.h"
#include "cuda/attention_cuda.h"
#include "cuda/cuda_utils.cuh"

namespace hk {
namespace cuda {
namespace {

constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;
constexpr int MAX_WORDS = 64;  // D <= 256 (int8, 4 per word)

// Query rows per CTA (a template parameter, so decode with Nq = 1 keeps 1 row of registers).
int rows_for(int64_t nq) { return nq <= 1 ? 1 : nq <= 4 ? 4 : 16; }

template <typename T, int DV, int ROWS>
__global__ void __launch_bounds__(THREADS) int8_split_kernel(const Int8SplitParams sp, const bool k_vec16) {
  constexpr int EPL = DV / 32;  // value elements per lane, contiguous (lane * EPL ...)
  const AttnInt8Params& ip = sp.attn;
  const AttnParams& p = ip.fwd;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x, split = blockIdx.y, b = bh / p.Hq, h = bh % p.Hq;
  const int64_t hk = h / (p.Hq / p.Hk);
  const int64_t i0 = int64_t(blockIdx.z) * ROWS;
  const int nrows = p.Nq - i0 < ROWS ? int(p.Nq - i0) : ROWS;
  const int words = int(p.D / 4);
  const int64_t offset = p.Nk - p.Nq;
  const int64_t n_qblocks = (p.Nq + ip.q_block - 1) / ip.q_block;
  const int64_t n_kblocks = (p.Nk + ip.k_block - 1) / ip.k_block;

  __shared__ int32_t s_q[ROWS][MAX_WORDS];
  __shared__ float s_qscale[ROWS];
  const int32_t* q8 = reinterpret_cast<const int32_t*>(ip.q8 + ((b * p.Hq + h) * p.Nq + i0) * p.D);
  for (int c = threadIdx.x; c < ROWS * words; c += THREADS)  // rows past Nq: zeros
    s_q[c / words][c % words] = c / words < nrows ? q8[c] : 0;
  if (threadIdx.x < ROWS)
    s_qscale[threadIdx.x] =
        int(threadIdx.x) < nrows
            ? ip.q_scale[(b * p.Hq + h) * n_qblocks + (i0 + threadIdx.x) / ip.q_block] * p.scale * kLog2e
            : 0.f;
  __syncthreads();

  PatternView pat;
  pat.Nq = p.Nq;
  pat.Nk = p.Nk;
  pat.left = p.window_left;
  pat.right = p.window_right;
  pat.causal = p.causal;
  pat.lm_flags = p.landmark_flags ? p.landmark_flags + b * p.landmark_flags_batch_stride : nullptr;
  pat.padding = p.key_padding ? p.key_padding + b * p.Nk : nullptr;

  const int8_t* K8 = ip.k8 + (b * p.Hk + hk) * p.Nk * p.D;
  const float* kscale = ip.k_scale + (b * p.Hk + hk) * n_kblocks;
  const T* V = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];

  const int64_t chunk = ((p.Nk + sp.num_splits - 1) / sp.num_splits + 31) / 32 * 32;
  const int64_t k_lo = split * chunk, k_hi = k_lo + chunk < p.Nk ? k_lo + chunk : p.Nk;

  float m[ROWS], l[ROWS], acc[ROWS][EPL];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int e = 0; e < EPL; ++e) acc[r][e] = 0.f;
  }

  // The loop bound is warp-uniform, so every shuffle / vote below runs with the full warp.
  for (int64_t base = k_lo + warp * 32; base < k_hi; base += WARPS * 32) {
    const int64_t j = base + lane;
    const bool in_split = j < k_hi;
    const bool key_ok = in_split && pat.key_real(j);
    const bool key_lm = in_split && pat.is_landmark(j);
    bool vis[ROWS];
    bool any = false;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int64_t row_pos = i0 + r + offset;
      vis[r] = r < nrows && visible(row_pos, j, p.window_left, p.window_right, p.causal, key_lm,
                                    pat.is_landmark(row_pos), key_ok);
      any |= vis[r];
    }
    if (!__any_sync(0xffffffffu, any)) continue;  // the whole group is outside the pattern

    int32_t dots[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) dots[r] = 0;
    if (any) {
      if (k_vec16) {  // D % 16 == 0: 16-byte loads of this lane's key row
        const int4* krow = reinterpret_cast<const int4*>(K8 + j * p.D);
        for (int c = 0; c < words / 4; ++c) {
          const int4 kw = krow[c];
#pragma unroll
          for (int r = 0; r < ROWS; ++r) {
            dots[r] = __dp4a(kw.x, s_q[r][4 * c + 0], dots[r]);
            dots[r] = __dp4a(kw.y, s_q[r][4 * c + 1], dots[r]);
            dots[r] = __dp4a(kw.z, s_q[r][4 * c + 2], dots[r]);
            dots[r] = __dp4a(kw.w, s_q[r][4 * c + 3], dots[r]);
          }
        }
      } else {
        const int32_t* krow = reinterpret_cast<const int32_t*>(K8 + j * p.D);
        for (int w = 0; w < words; ++w) {
          const int32_t kw = krow[w];
#pragma unroll
          for (int r = 0; r < ROWS; ++r) dots[r] = __dp4a(kw, s_q[r][w], dots[r]);
        }
      }
    }
    const float ks = any ? kscale[j / ip.k_block] : 0.f;

    float pr[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const float s = vis[r] ? float(dots[r]) * s_qscale[r] * ks : -INFINITY;
      const float m_new = fmaxf(m[r], warp_max(s));
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      pr[r] = vis[r] ? exp2f(s - m_use) : 0.f;
      const float alpha = exp2f(m[r] - m_use);
      l[r] = l[r] * alpha + warp_sum(pr[r]);
#pragma unroll
      for (int e = 0; e < EPL; ++e) acc[r][e] *= alpha;
      m[r] = m_new;
    }
    const int n_keys = k_hi - base < 32 ? int(k_hi - base) : 32;
    constexpr int V_UNROLL = ROWS == 1 ? 8 : 4;  // V rows in flight per lane (registers allowing)
#pragma unroll V_UNROLL
    for (int kk = 0; kk < n_keys; ++kk) {
      float v[EPL];
      load_to_float<T, EPL>(V + (base + kk) * p.v_stride[2] + lane * EPL, v);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const float pk = __shfl_sync(0xffffffffu, pr[r], kk);
#pragma unroll
        for (int e = 0; e < EPL; ++e) acc[r][e] += pk * v[e];
      }
    }
  }

  // Merge the 4 warps, then write this split's partial result (unnormalized, relative to M).
  __shared__ float s_m[WARPS][ROWS], s_l[WARPS][ROWS];
  __shared__ float s_o[WARPS][ROWS][DV];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    if (lane == 0) {
      s_m[warp][r] = m[r];
      s_l[warp][r] = l[r];
    }
#pragma unroll
    for (int e = 0; e < EPL; ++e) s_o[warp][r][lane * EPL + e] = acc[r][e];
  }
  __syncthreads();
  for (int r = warp; r < nrows; r += WARPS) {
    float M = -INFINITY;
    for (int w = 0; w < WARPS; ++w) M = fmaxf(M, s_m[w][r]);
    float L = 0.f, wgt[WARPS];
    for (int w = 0; w < WARPS; ++w) {
      wgt[w] = s_m[w][r] == -INFINITY ? 0.f : exp2f(s_m[w][r] - M);
      L += s_l[w][r] * wgt[w];
    }
    const int64_t out_row = (split * p.B * p.Hq + bh) * p.Nq + i0 + r;
    for (int d = lane; d < DV; d += 32) {
      float o = 0.f;
      for (int w = 0; w < WARPS; ++w) o += s_o[w][r][d] * wgt[w];
      sp.partial_o[out_row * DV + d] = o;
    }
    if (lane == 0) {
      sp.partial_ml[out_row * 2] = M;
      sp.partial_ml[out_row * 2 + 1] = L;
    }
  }
}

// One CTA per (b*h, query row): combine the splits by their log-sum-exp.
template <typename T, int DV>
__global__ void merge_splits_kernel(const Int8SplitParams sp) {
  const AttnParams& p = sp.attn.fwd;
  const int64_t row = blockIdx.x;  // (b*Hq + h) * Nq + i
  const int64_t bh = row / p.Nq, i = row % p.Nq, b = bh / p.Hq, h = bh % p.Hq;
  const int64_t stride = p.B * p.Hq * p.Nq;
  float M = -INFINITY;
  for (int s = 0; s < sp.num_splits; ++s) M = fmaxf(M, sp.partial_ml[(s * stride + row) * 2]);
  float L = 0.f;
  for (int s = 0; s < sp.num_splits; ++s) {
    const float ms = sp.partial_ml[(s * stride + row) * 2];
    if (ms != -INFINITY) L += sp.partial_ml[(s * stride + row) * 2 + 1] * exp2f(ms - M);
  }
  const float inv = L > 0.f ? 1.f / L : 0.f;
  T* O = static_cast<T*>(p.o) + b * p.o_stride[0] + h * p.o_stride[1] + i * p.o_stride[2];
  for (int d = threadIdx.x; d < DV; d += blockDim.x) {
    float o = 0.f;
    for (int s = 0; s < sp.num_splits; ++s) {
      const float ms = sp.partial_ml[(s * stride + row) * 2];
      if (ms != -INFINITY) o += sp.partial_o[(s * stride + row) * DV + d] * exp2f(ms - M);
    }
    O[d] = from_float<T>(o * inv);
  }
  if (threadIdx.x == 0) p.lse[row] = L > 0.f ? (M + log2f(L)) * kLn2 : -INFINITY;
}

template <typename T, int DV, int ROWS>
void launch_rows(const Int8SplitParams& sp, bool k_vec16, cudaStream_t stream) {
  const AttnParams& p = sp.attn.fwd;
  const dim3 grid(unsigned(p.B * p.Hq), unsigned(sp.num_splits), unsigned((p.Nq + ROWS - 1) / ROWS));
  int8_split_kernel<T, DV, ROWS><<<grid, THREADS, 0, stream>>>(sp, k_vec16);
  HK_CHECK_LAUNCH("int8_split_kernel");
}

template <typename T, int DV>
void launch(const Int8SplitParams& sp, cudaStream_t stream) {
  const AttnParams& p = sp.attn.fwd;
  const bool k_vec16 = p.D % 16 == 0 && reinterpret_cast<uintptr_t>(sp.attn.k8) % 16 == 0;
  switch (rows_for(p.Nq)) {
    case 1: launch_rows<T, DV, 1>(sp, k_vec16, stream); break;
    case 4: launch_rows<T, DV, 4>(sp, k_vec16, stream); break;
    default: launch_rows<T, DV, 16>(sp, k_vec16, stream); break;
  }
  merge_splits_kernel<T, DV><<<unsigned(p.B * p.Hq * p.Nq), 128, 0, stream>>>(sp);
  HK_CHECK_LAUNCH("merge_splits_kernel");
}

}  // namespace

int int8_rows_per_cta(int64_t nq) { return rows_for(nq); }

void attention_forward_int8(const Int8SplitParams& sp, cudaStream_t stream) {
  const AttnInt8Params& ip = sp.attn;
  const AttnParams& p = ip.fwd;
  const std::string who = "attention_forward_int8 (cuda): ";
  if (p.dtype != DType::F16 && p.dtype != DType::BF16) throw std::invalid_argument(who + "V dtype must be fp16 or bf16");
  if (p.D <= 0 || p.D % 4 != 0 || p.D > 4 * MAX_WORDS)
    throw std::invalid_argument(who + "D must be a multiple of 4 in [4, 256]; got " + std::to_string(p.D));
  if (p.Dv != 64 && p.Dv != 128) throw std::invalid_argument(who + "Dv must be 64 or 128; got " + std::to_string(p.Dv));
  if (p.Hk <= 0 || p.Hq % p.Hk != 0) throw std::invalid_argument(who + "Hq must be a multiple of Hk");
  if (!ip.q8 || !ip.k8 || !ip.q_scale || !ip.k_scale || !p.v || !p.o || !p.lse)
    throw std::invalid_argument(who + "q8, k8, q_scale, k_scale, v, o and lse must be non-null");
  if (!sp.partial_o || !sp.partial_ml || sp.num_splits < 1)
    throw std::invalid_argument(who + "workspace (partial_o, partial_ml, num_splits >= 1) is required");
  if (ip.q_block < 1 || ip.k_block < 1) throw std::invalid_argument(who + "q_block and k_block must be >= 1");
  if (reinterpret_cast<uintptr_t>(ip.k8) % 4 != 0 || reinterpret_cast<uintptr_t>(ip.q8) % 4 != 0)
    throw std::invalid_argument(who + "q8 and k8 must be 4-byte aligned");
  if (sp.num_splits > 65535) throw std::invalid_argument(who + "num_splits must be <= 65535");
  if ((p.Nq + rows_for(p.Nq) - 1) / rows_for(p.Nq) > 65535)
    throw std::invalid_argument(who + "Nq too large for the grid (Nq / 16 must be <= 65535)");
  if (p.B * p.Hq * p.Nq > 0x7fffffffLL) throw std::invalid_argument(who + "B * Hq * Nq must be < 2^31");
  if (reinterpret_cast<uintptr_t>(p.v) % 16 != 0 || p.v_stride[0] % 8 || p.v_stride[1] % 8 || p.v_stride[2] % 8)
    throw std::invalid_argument(who + "v must be 16-byte aligned with strides that are multiples of 8 elements");
  if (p.Nq == 0 || p.B == 0 || p.Hq == 0) return;  // nothing to write
  const bool bf16 = p.dtype == DType::BF16;
  if (p.Dv == 64) {
    bf16 ? launch<__nv_bfloat16, 64>(sp, stream) : launch<__half, 64>(sp, stream);
  } else {
    bf16 ? launch<__nv_bfloat16, 128>(sp, stream) : launch<__half, 128>(sp, stream);
  }
}

}  // namespace cuda
}  // namespace hk
