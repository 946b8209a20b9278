// Fused window + landmark attention forward on tensor cores (WMMA m16n16k16, sm_80+).
//
// One CTA = 4 warps = one (batch, q head, 64-query tile). It walks only the key tiles of the
// window band (pattern.h window_band) and then the landmark keys outside the band, gathered by
// index, with one online softmax over their union; every tile is staged in shared memory. Rows
// whose position is a landmark are skipped here and computed by landmark_rows_kernel over every
// key (they see the whole sequence), which overwrites them.
#include <mma.h>

#include <stdexcept>
#include <string>

#include "common/pattern.h"
#include "cuda/attention_cuda.h"
#include "cuda/cuda_utils.cuh"

namespace hk {
namespace cuda {
namespace {

using namespace nvcuda;

constexpr int BM = 64;       // query rows per CTA (16 per warp)
constexpr int BN = 64;       // keys per tile
constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;

// Shared-memory layout; every sub-array offset and fragment row offset is 32-byte aligned, as
// WMMA load/store requires. Leading dimensions are padded against bank conflicts.
template <int D>
struct FwdSmem {
  static constexpr int LD_T = D + 8;    // Q, K, V tiles (16-bit elements)
  static constexpr int LD_S = BN + 4;   // scores (fp32)
  static constexpr int LD_P = BN + 8;   // probabilities (16-bit)
  static constexpr int LD_O = D + 4;    // output accumulator (fp32)
  static constexpr size_t q_off = 0;
  static constexpr size_t k_off = q_off + size_t(BM) * LD_T * 2;
  static constexpr size_t v_off = k_off + size_t(BN) * LD_T * 2;
  static constexpr size_t s_off = v_off + size_t(BN) * LD_T * 2;
  static constexpr size_t p_off = s_off + size_t(BM) * LD_S * 4;
  static constexpr size_t o_off = p_off + size_t(BM) * LD_P * 2;
  static constexpr size_t m_off = o_off + size_t(BM) * LD_O * 4;
  static constexpr size_t l_off = m_off + BM * 4;
  static constexpr size_t idx_off = l_off + BM * 4;
  static constexpr size_t bytes = idx_off + BN * 8;
};

__device__ __forceinline__ PatternView pattern_for_batch(const AttnParams& p, int64_t b) {
  PatternView v;
  v.Nq = p.Nq;
  v.Nk = p.Nk;
  v.left = p.window_left;
  v.right = p.window_right;
  v.causal = p.causal;
  v.lm_flags = p.landmark_flags ? p.landmark_flags + b * p.landmark_flags_batch_stride : nullptr;
  v.padding = p.key_padding ? p.key_padding + b * p.Nk : nullptr;
  return v;
}

// Copy `rows` rows of D 16-bit elements (16-byte chunks) into a padded shared tile; rows whose
// source index is negative are zero-filled.
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* dst, const T* base, int64_t row_stride,
                                          const int64_t* src_rows, int rows) {
  constexpr int CH = D / 8;
  for (int c = threadIdx.x; c < rows * CH; c += THREADS) {
    const int row = c / CH, col = (c % CH) * 8;
    const int64_t src = src_rows[row];
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (src >= 0) val = *reinterpret_cast<const uint4*>(base + src * row_stride + col);
    *reinterpret_cast<uint4*>(dst + row * FwdSmem<D>::LD_T + col) = val;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(THREADS) fused_fwd_kernel(const AttnParams p) {
  using S = FwdSmem<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem + S::q_off);
  T* sK = reinterpret_cast<T*>(smem + S::k_off);
  T* sV = reinterpret_cast<T*>(smem + S::v_off);
  float* sS = reinterpret_cast<float*>(smem + S::s_off);
  T* sP = reinterpret_cast<T*>(smem + S::p_off);
  float* sO = reinterpret_cast<float*>(smem + S::o_off);
  float* sM = reinterpret_cast<float*>(smem + S::m_off);
  float* sL = reinterpret_cast<float*>(smem + S::l_off);
  int64_t* sIdx = reinterpret_cast<int64_t*>(smem + S::idx_off);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t bh = blockIdx.y, b = bh / p.Hq, h = bh % p.Hq, hk = h / (p.Hq / p.Hk);
  const int64_t i0 = int64_t(blockIdx.x) * BM;
  const int64_t offset = p.Nk - p.Nq;
  const int64_t r0 = i0 + offset, r1 = min(i0 + BM, p.Nq) + offset;
  const T* Q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* K = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* V = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  const PatternView pat = pattern_for_batch(p, b);
  const int32_t* lms = p.landmarks ? p.landmarks + b * p.landmarks_batch_stride : nullptr;
  const float scale_log2 = p.scale * kLog2e;
  const float NEG_INF = -INFINITY;

  if (tid < BM) {
    sIdx[tid] = (i0 + tid < p.Nq) ? i0 + tid : -1;
    sM[tid] = NEG_INF;
    sL[tid] = 0.f;
  }
  for (int c = tid; c < BM * S::LD_O; c += THREADS) sO[c] = 0.f;
  __syncthreads();
  load_tile<T, D>(sQ, Q, p.q_stride[2], sIdx, BM);

  const KeyRange band = window_band(r0, r1, p.Nk, p.window_left, p.window_right, p.causal);
  const int64_t n_band = band.hi > band.lo ? (band.hi - band.lo + BN - 1) / BN : 0;
  const int64_t n_lm = lms ? (p.num_landmarks + BN - 1) / BN : 0;

  for (int64_t t = 0; t < n_band + n_lm; ++t) {
    __syncthreads();  // the previous tile is fully consumed (and sIdx may be rewritten)
    if (tid < BN) {
      int64_t j = -1;
      if (t < n_band) {
        j = band.lo + t * BN + tid;
        if (j >= band.hi) j = -1;
      } else {
        const int64_t g = (t - n_band) * BN + tid;
        if (g < p.num_landmarks) {
          const int64_t pos = lms[g];
          const bool in_band = pos >= band.lo && pos < band.hi;
          if (!in_band && !(p.causal && pos >= r1)) j = pos;
        }
      }
      sIdx[tid] = j;
    }
    __syncthreads();
    load_tile<T, D>(sK, K, p.k_stride[2], sIdx, BN);
    load_tile<T, D>(sV, V, p.v_stride[2], sIdx, BN);
    __syncthreads();

    // S = Q K^T for this warp's 16 rows.
    {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bk;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
#pragma unroll
      for (int n = 0; n < BN / 16; ++n) {
        wmma::fill_fragment(acc, 0.f);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          wmma::load_matrix_sync(a, sQ + warp * 16 * S::LD_T + kk * 16, S::LD_T);
          wmma::load_matrix_sync(bk, sK + n * 16 * S::LD_T + kk * 16, S::LD_T);
          wmma::mma_sync(acc, a, bk, acc);
        }
        wmma::store_matrix_sync(sS + warp * 16 * S::LD_S + n * 16, acc, S::LD_S, wmma::mem_row_major);
      }
    }
    __syncwarp();

    // Online softmax on the warp's rows; lanes own key columns lane and lane + 32.
    for (int rr = 0; rr < 16; ++rr) {
      const int row = warp * 16 + rr;
      const int64_t i = i0 + row, r = i + offset;
      const bool row_ok = i < p.Nq && !pat.is_landmark(r);
      float x[2];
      bool vis[2];
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int col = lane + 32 * c;
        const int64_t j = sIdx[col];
        vis[c] = row_ok && j >= 0 &&
                 visible(r, j, p.window_left, p.window_right, p.causal, pat.is_landmark(j), false,
                         pat.key_real(j));
        x[c] = vis[c] ? sS[row * S::LD_S + col] * scale_log2 : NEG_INF;
      }
      const float m_old = sM[row];
      const float m_new = fmaxf(m_old, warp_max(fmaxf(x[0], x[1])));
      const float m_use = m_new == NEG_INF ? 0.f : m_new;
      const float p0 = vis[0] ? exp2f(x[0] - m_use) : 0.f;
      const float p1 = vis[1] ? exp2f(x[1] - m_use) : 0.f;
      const float alpha = exp2f(m_old - m_use);  // 0 while nothing was seen
      const float psum = warp_sum(p0 + p1);
      sP[row * S::LD_P + lane] = from_float<T>(p0);
      sP[row * S::LD_P + lane + 32] = from_float<T>(p1);
      for (int d = lane; d < D; d += 32) sO[row * S::LD_O + d] *= alpha;
      if (lane == 0) {
        sM[row] = m_new;
        sL[row] = sL[row] * alpha + psum;
      }
    }
    __syncwarp();

    // O += P V for the warp's rows.
    {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vb;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
#pragma unroll
      for (int n = 0; n < D / 16; ++n) {
        float* o_tile = sO + warp * 16 * S::LD_O + n * 16;
        wmma::load_matrix_sync(acc, o_tile, S::LD_O, wmma::mem_row_major);
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          wmma::load_matrix_sync(pa, sP + warp * 16 * S::LD_P + kk * 16, S::LD_P);
          wmma::load_matrix_sync(vb, sV + kk * 16 * S::LD_T + n * 16, S::LD_T);
          wmma::mma_sync(acc, pa, vb, acc);
        }
        wmma::store_matrix_sync(o_tile, acc, S::LD_O, wmma::mem_row_major);
      }
    }
    __syncwarp();
  }
  __syncthreads();

  T* O = static_cast<T*>(p.o) + b * p.o_stride[0] + h * p.o_stride[1];
  float* LSE = p.lse + (b * p.Hq + h) * p.Nq;
  for (int rr = 0; rr < 16; ++rr) {
    const int row = warp * 16 + rr;
    const int64_t i = i0 + row;
    if (i >= p.Nq) break;
    const float l = sL[row];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    for (int d = lane; d < D; d += 32) O[i * p.o_stride[2] + d] = from_float<T>(sO[row * S::LD_O + d] * inv);
    if (lane == 0) LSE[i] = l > 0.f ? (sM[row] + log2f(l)) * kLn2 : NEG_INF;
  }
}

// Landmark query rows: each sees every key (causally clipped). One CTA per (landmark, b, h);
// each warp streams a quarter of the keys with its own online softmax, merged at the end.
template <typename T, int D>
__global__ void __launch_bounds__(THREADS) landmark_rows_kernel(const AttnParams p) {
  constexpr int EPL = D / 32;  // elements per lane
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.y, b = bh / p.Hq, h = bh % p.Hq, hk = h / (p.Hq / p.Hk);
  const int64_t offset = p.Nk - p.Nq;
  const int64_t r = p.landmarks[b * p.landmarks_batch_stride + blockIdx.x];
  const int64_t i = r - offset;
  if (i < 0 || i >= p.Nq) return;
  const T* Q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i * p.q_stride[2];
  const T* K = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* V = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  const PatternView pat = pattern_for_batch(p, b);
  const float scale_log2 = p.scale * kLog2e;

  float qv[EPL], acc[EPL];
#pragma unroll
  for (int e = 0; e < EPL; ++e) {
    qv[e] = to_float(Q[lane * EPL + e]) * scale_log2;
    acc[e] = 0.f;
  }
  float m = -INFINITY, l = 0.f;
  const KeyRange range = landmark_row_range(r, p.Nk, p.causal);
  for (int64_t j = range.lo + warp; j < range.hi; j += WARPS) {
    if (!pat.key_real(j)) continue;  // warp-uniform
    float s = 0.f;
#pragma unroll
    for (int e = 0; e < EPL; ++e) s += qv[e] * to_float(K[j * p.k_stride[2] + lane * EPL + e]);
    s = warp_sum(s);
    const float m_new = fmaxf(m, s);
    const float alpha = exp2f(m - m_new), pj = exp2f(s - m_new);
    l = l * alpha + pj;
#pragma unroll
    for (int e = 0; e < EPL; ++e) acc[e] = acc[e] * alpha + pj * to_float(V[j * p.v_stride[2] + lane * EPL + e]);
    m = m_new;
  }

  __shared__ float s_m[WARPS], s_l[WARPS], s_o[WARPS][D];
  if (lane == 0) {
    s_m[warp] = m;
    s_l[warp] = l;
  }
#pragma unroll
  for (int e = 0; e < EPL; ++e) s_o[warp][lane * EPL + e] = acc[e];
  __syncthreads();
  if (warp != 0) return;
  float M = -INFINITY;
  for (int w = 0; w < WARPS; ++w) M = fmaxf(M, s_m[w]);
  float L = 0.f, wgt[WARPS];
  for (int w = 0; w < WARPS; ++w) {
    wgt[w] = s_m[w] == -INFINITY ? 0.f : exp2f(s_m[w] - M);
    L += s_l[w] * wgt[w];
  }
  const float inv = L > 0.f ? 1.f / L : 0.f;
  T* O = static_cast<T*>(p.o) + b * p.o_stride[0] + h * p.o_stride[1] + i * p.o_stride[2];
  for (int d = lane; d < D; d += 32) {
    float o = 0.f;
    for (int w = 0; w < WARPS; ++w) o += s_o[w][d] * wgt[w];
    O[d] = from_float<T>(o * inv);
  }
  if (lane == 0) p.lse[(b * p.Hq + h) * p.Nq + i] = L > 0.f ? (M + log2f(L)) * kLn2 : -INFINITY;
}

template <typename T, int D>
void launch(const AttnParams& p, cudaStream_t stream) {
  const size_t smem = FwdSmem<D>::bytes;
  auto kernel = fused_fwd_kernel<T, D>;
  HK_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
                "fused_fwd_kernel (shared memory opt-in)");
  const dim3 grid(unsigned((p.Nq + BM - 1) / BM), unsigned(p.B * p.Hq));
  kernel<<<grid, THREADS, smem, stream>>>(p);
  HK_CHECK_LAUNCH("fused_fwd_kernel");
  if (p.landmarks != nullptr && p.num_landmarks > 0) {
    const dim3 lgrid(unsigned(p.num_landmarks), unsigned(p.B * p.Hq));
    landmark_rows_kernel<T, D><<<lgrid, THREADS, 0, stream>>>(p);
    HK_CHECK_LAUNCH("landmark_rows_kernel");
  }
}

void check_aligned(const void* ptr, const int64_t* stride, const char* name) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0)
    throw std::invalid_argument(std::string("attention_forward (cuda): ") + name + " must be 16-byte aligned");
  for (int d = 0; d < 3; ++d)
    if (stride[d] % 8 != 0)
      throw std::invalid_argument(std::string("attention_forward (cuda): ") + name +
                                  " strides must be multiples of 8 elements");
}

}  // namespace

void attention_forward(const AttnParams& p, cudaStream_t stream) {
  if (p.dtype != DType::F16 && p.dtype != DType::BF16)
    throw std::invalid_argument("attention_forward (cuda): dtype must be fp16 or bf16");
  if (p.D != p.Dv || (p.D != 64 && p.D != 128))
    throw std::invalid_argument("attention_forward (cuda): needs D == Dv in {64, 128}; got D=" +
                                std::to_string(p.D) + ", Dv=" + std::to_string(p.Dv));
  if (p.Hk <= 0 || p.Hq % p.Hk != 0)
    throw std::invalid_argument("attention_forward (cuda): Hq must be a multiple of Hk");
  if (!p.q || !p.k || !p.v || !p.o || !p.lse)
    throw std::invalid_argument("attention_forward (cuda): q, k, v, o and lse must be non-null");
  if (p.B * p.Hq > 65535) throw std::invalid_argument("attention_forward (cuda): B * Hq must be <= 65535");
  if (p.Nq == 0 || p.B == 0) return;
  check_aligned(p.q, p.q_stride, "q");
  check_aligned(p.k, p.k_stride, "k");
  check_aligned(p.v, p.v_stride, "v");
  check_aligned(p.o, p.o_stride, "o");
  const bool bf16 = p.dtype == DType::BF16;
  if (p.D == 64) {
    bf16 ? launch<__nv_bfloat16, 64>(p, stream) : launch<__half, 64>(p, stream);
  } else {
    bf16 ? launch<__nv_bfloat16, 128>(p, stream) : launch<__half, 128>(p, stream);
  }
}

}  // namespace cuda
}  // namespace hk
