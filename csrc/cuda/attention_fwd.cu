// Fused window + landmark attention forward on tensor cores (WMMA m16n16k16, sm_80+).
//
// One CTA = 4 warps = one (batch, q head, 64-query tile); grid (B*Hq, ceil(Nq/64)). It walks only the key tiles of the
// window band (pattern.h window_band) and then the landmark keys outside the band, gathered by
// index, with one online softmax over their union; K and V tiles arrive by cp.async, the next
// tile's K/V loading while the current one is computed (see fused_fwd_kernel). Rows
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
  static constexpr size_t bytes = idx_off + 2 * BN * 8;  // key indices of two tiles
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

// Source key of row `row` of key tile t: the window band first (n_band tiles of BN contiguous
// keys), then the landmarks outside the band (gathered, BN per tile); -1 = empty slot.
struct TileKeys {
  KeyRange band;
  int64_t n_band, r1, num_landmarks;
  const int32_t* lms;  // this batch row's landmarks, or nullptr
  bool causal;
  __device__ __forceinline__ int64_t key(int64_t t, int row) const {
    if (t < n_band) {
      const int64_t j = band.lo + t * BN + row;
      return j < band.hi ? j : -1;
    }
    const int64_t g = (t - n_band) * BN + row;
    if (g >= num_landmarks) return -1;
    const int64_t pos = lms[g];
    const bool in_band = pos >= band.lo && pos < band.hi;       // already visited in the band
    return (in_band || (causal && pos >= r1)) ? -1 : pos;        // pos >= r1: no row sees it
  }
};

// Issue cp.async copies of key tile t (BN rows of D 16-bit elements) into a padded shared tile;
// empty slots are zero-filled. With `idx` non-null the row's key index is stored there too.
template <typename T, int D>
__device__ __forceinline__ void load_key_tile_async(T* dst, const T* base, int64_t row_stride,
                                                    const TileKeys& tk, int64_t t, int64_t* idx) {
  constexpr int CH = D / 8;  // 16-byte chunks per row
  for (int c = threadIdx.x; c < BN * CH; c += THREADS) {
    const int row = c / CH, col = (c % CH) * 8;
    const int64_t j = tk.key(t, row);
    if (idx != nullptr && col == 0) idx[row] = j;
    cp_async_16(dst + row * FwdSmem<D>::LD_T + col, j >= 0 ? base + j * row_stride + col : base, j >= 0);
  }
}

// Pipeline (cp.async groups, committed in this order): [Q, K0] [V0] | per tile t: [K(t+1)] after
// S = Q K(t)^T, [V(t+1)] after O += P V(t). So K(t+1) loads during the softmax and P V of tile
// t, and V(t+1) during Q K(t+1)^T and its softmax; shared memory holds one K and one V tile.
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
  int64_t* sIdx = reinterpret_cast<int64_t*>(smem + S::idx_off);  // [2][BN], by tile parity

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t bh = blockIdx.x, b = bh / p.Hq, h = bh % p.Hq, hk = h / (p.Hq / p.Hk);
  const int64_t i0 = int64_t(blockIdx.y) * BM;
  const int64_t offset = p.Nk - p.Nq;
  const int64_t r0 = i0 + offset, r1 = min(i0 + BM, p.Nq) + offset;
  const T* Q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* K = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* V = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  const PatternView pat = pattern_for_batch(p, b);
  const float scale_log2 = p.scale * kLog2e;
  const float NEG_INF = -INFINITY;

  TileKeys tk;
  tk.band = window_band(r0, r1, p.Nk, p.window_left, p.window_right, p.causal);
  tk.n_band = tk.band.hi > tk.band.lo ? (tk.band.hi - tk.band.lo + BN - 1) / BN : 0;
  tk.r1 = r1;
  tk.lms = p.landmarks ? p.landmarks + b * p.landmarks_batch_stride : nullptr;
  tk.num_landmarks = tk.lms ? p.num_landmarks : 0;
  tk.causal = p.causal;
  const int64_t n_tiles = tk.n_band + (tk.num_landmarks + BN - 1) / BN;

  if (tid < BM) {
    sM[tid] = NEG_INF;
    sL[tid] = 0.f;
  }
  for (int c = tid; c < BM * S::LD_O; c += THREADS) sO[c] = 0.f;
  for (int c = tid; c < BM * (D / 8); c += THREADS) {  // Q rows past Nq: zeros
    const int row = c / (D / 8), col = (c % (D / 8)) * 8;
    const bool ok = i0 + row < p.Nq;
    cp_async_16(sQ + row * S::LD_T + col, ok ? Q + (i0 + row) * p.q_stride[2] + col : Q, ok);
  }
  if (n_tiles > 0) load_key_tile_async<T, D>(sK, K, p.k_stride[2], tk, 0, sIdx);
  cp_async_commit();
  if (n_tiles > 0) load_key_tile_async<T, D>(sV, V, p.v_stride[2], tk, 0, nullptr);
  cp_async_commit();

  for (int64_t t = 0; t < n_tiles; ++t) {
    const int64_t* idx = sIdx + (t & 1) * BN;
    cp_async_wait<1>();  // Q and K(t) have landed; V(t) may be in flight
    __syncthreads();

    // S = Q K^T for this warp's 16 rows.
    {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bk;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[BN / 16];
#pragma unroll
      for (int n = 0; n < BN / 16; ++n) wmma::fill_fragment(acc[n], 0.f);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        wmma::load_matrix_sync(a, sQ + warp * 16 * S::LD_T + kk * 16, S::LD_T);
#pragma unroll
        for (int n = 0; n < BN / 16; ++n) {
          wmma::load_matrix_sync(bk, sK + n * 16 * S::LD_T + kk * 16, S::LD_T);
          wmma::mma_sync(acc[n], a, bk, acc[n]);
        }
      }
#pragma unroll
      for (int n = 0; n < BN / 16; ++n)
        wmma::store_matrix_sync(sS + warp * 16 * S::LD_S + n * 16, acc[n], S::LD_S, wmma::mem_row_major);
    }
    __syncthreads();  // every warp is done with K(t): prefetch K(t+1) into the same buffer
    if (t + 1 < n_tiles) load_key_tile_async<T, D>(sK, K, p.k_stride[2], tk, t + 1, sIdx + ((t + 1) & 1) * BN);
    cp_async_commit();

    // Online softmax on the warp's rows; lanes own key columns lane and lane + 32. Lane 0 writes
    // sM/sL of a row that every lane read at the top of the iteration: __syncwarp orders them.
    int64_t kj[2];
    bool k_lm[2], k_ok[2];  // per key column: landmark flag, and "slot used and not padding"
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      kj[c] = idx[lane + 32 * c];
      k_lm[c] = kj[c] >= 0 && pat.is_landmark(kj[c]);
      k_ok[c] = kj[c] >= 0 && pat.key_real(kj[c]);
    }
    for (int rr = 0; rr < 16; ++rr) {
      const int row = warp * 16 + rr;
      const int64_t i = i0 + row, r = i + offset;
      const bool row_ok = i < p.Nq && !pat.is_landmark(r);
      float x[2];
      bool vis[2];
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        vis[c] = row_ok && visible(r, kj[c], p.window_left, p.window_right, p.causal, k_lm[c], false, k_ok[c]);
        x[c] = vis[c] ? sS[row * S::LD_S + lane + 32 * c] * scale_log2 : NEG_INF;
      }
      const float m_old = sM[row], l_old = sL[row];
      const float m_new = fmaxf(m_old, warp_max(fmaxf(x[0], x[1])));
      const float m_use = m_new == NEG_INF ? 0.f : m_new;
      const float p0 = vis[0] ? exp2f(x[0] - m_use) : 0.f;
      const float p1 = vis[1] ? exp2f(x[1] - m_use) : 0.f;
      const float alpha = exp2f(m_old - m_use);  // 0 while nothing was seen; warp-uniform
      const float psum = warp_sum(p0 + p1);
      sP[row * S::LD_P + lane] = from_float<T>(p0);
      sP[row * S::LD_P + lane + 32] = from_float<T>(p1);
      if (alpha != 1.f)
        for (int d = lane; d < D; d += 32) sO[row * S::LD_O + d] *= alpha;
      __syncwarp();
      if (lane == 0) {
        sM[row] = m_new;
        sL[row] = l_old * alpha + psum;
      }
    }
    cp_async_wait<1>();  // V(t) has landed; K(t+1) may be in flight
    __syncthreads();

    // O += P V for the warp's rows.
    {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pa[BN / 16];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vb;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) wmma::load_matrix_sync(pa[kk], sP + warp * 16 * S::LD_P + kk * 16, S::LD_P);
#pragma unroll
      for (int n = 0; n < D / 16; ++n) {
        float* o_tile = sO + warp * 16 * S::LD_O + n * 16;
        wmma::load_matrix_sync(acc, o_tile, S::LD_O, wmma::mem_row_major);
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          wmma::load_matrix_sync(vb, sV + kk * 16 * S::LD_T + n * 16, S::LD_T);
          wmma::mma_sync(acc, pa[kk], vb, acc);
        }
        wmma::store_matrix_sync(o_tile, acc, S::LD_O, wmma::mem_row_major);
      }
    }
    __syncthreads();  // every warp is done with V(t): prefetch V(t+1) into the same buffer
    if (t + 1 < n_tiles) load_key_tile_async<T, D>(sV, V, p.v_stride[2], tk, t + 1, nullptr);
    cp_async_commit();
  }
  cp_async_wait<0>();
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

// Landmark query rows: each sees every key (causally clipped). One CTA per (b*h, landmark).
// Each warp takes 32 keys at a time, one key per lane (16-byte K loads, dot product against the
// query row in shared memory), runs one online-softmax step for the group, then accumulates P V
// with lanes over contiguous value elements; the 4 warps' states are merged at the end.
template <typename T, int D>
__global__ void __launch_bounds__(THREADS) landmark_rows_kernel(const AttnParams p) {
  constexpr int EPL = D / 32;  // value elements per lane (contiguous: lane * EPL ...)
  __shared__ float s_q[D];
  __shared__ float s_m[WARPS], s_l[WARPS], s_o[WARPS][D];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t bh = blockIdx.x, b = bh / p.Hq, h = bh % p.Hq, hk = h / (p.Hq / p.Hk);
  const int64_t offset = p.Nk - p.Nq;
  const int64_t r = p.landmarks[b * p.landmarks_batch_stride + blockIdx.y];
  const int64_t i = r - offset;
  if (i < 0 || i >= p.Nq) return;  // CTA-uniform: this landmark position is no query row
  const T* Q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1] + i * p.q_stride[2];
  const T* K = static_cast<const T*>(p.k) + b * p.k_stride[0] + hk * p.k_stride[1];
  const T* V = static_cast<const T*>(p.v) + b * p.v_stride[0] + hk * p.v_stride[1];
  const PatternView pat = pattern_for_batch(p, b);
  const float scale_log2 = p.scale * kLog2e;
  for (int d = threadIdx.x; d < D; d += THREADS) s_q[d] = to_float(Q[d]) * scale_log2;
  __syncthreads();

  float acc[EPL];
#pragma unroll
  for (int e = 0; e < EPL; ++e) acc[e] = 0.f;
  float m = -INFINITY, l = 0.f;
  const KeyRange range = landmark_row_range(r, p.Nk, p.causal);
  // The loop bound is warp-uniform, so every shuffle below runs with the full warp.
  for (int64_t base = range.lo + warp * 32; base < range.hi; base += WARPS * 32) {
    const int64_t j = base + lane;
    const bool ok = j < range.hi && pat.key_real(j);
    float s = -INFINITY;
    if (ok) {
      const uint4* krow = reinterpret_cast<const uint4*>(K + j * p.k_stride[2]);
      float dot = 0.f;
#pragma unroll
      for (int c = 0; c < D / 8; ++c) {
        const uint4 w = krow[c];
        const T* kv = reinterpret_cast<const T*>(&w);
#pragma unroll
        for (int e = 0; e < 8; ++e) dot += s_q[c * 8 + e] * to_float(kv[e]);
      }
      s = dot;
    }
    const float m_new = fmaxf(m, warp_max(s));
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    const float pj = ok ? exp2f(s - m_use) : 0.f;
    const float alpha = exp2f(m - m_use);
    l = l * alpha + warp_sum(pj);
    m = m_new;
#pragma unroll
    for (int e = 0; e < EPL; ++e) acc[e] *= alpha;
    const int n = range.hi - base < 32 ? int(range.hi - base) : 32;
#pragma unroll 4
    for (int kk = 0; kk < n; ++kk) {
      const float pk = __shfl_sync(0xffffffffu, pj, kk);
      const T* vrow = V + (base + kk) * p.v_stride[2] + lane * EPL;
      float vv[EPL];
      load_to_float<T, EPL>(vrow, vv);
#pragma unroll
      for (int e = 0; e < EPL; ++e) acc[e] += pk * vv[e];
    }
  }

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
  int dev = 0, major = 0, optin = 0;
  HK_CUDA_CHECK(cudaGetDevice(&dev), "fused_fwd_kernel (device query)");
  HK_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "fused_fwd_kernel (device query)");
  HK_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "fused_fwd_kernel (device query)");
  if (major < 8) throw std::invalid_argument("attention_forward (cuda): needs compute capability >= 8.0 (sm_80)");
  if (size_t(optin) < smem)
    throw std::invalid_argument("attention_forward (cuda): D=" + std::to_string(D) + " needs " + std::to_string(smem) +
                                " bytes of shared memory per block; this GPU allows " + std::to_string(optin));
  auto kernel = fused_fwd_kernel<T, D>;
  HK_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
                "fused_fwd_kernel (shared memory opt-in)");
  // (b, h) on x (up to 2^31 - 1): neighbouring CTAs share K/V tiles (GQA) in L2.
  const dim3 grid(unsigned(p.B * p.Hq), unsigned((p.Nq + BM - 1) / BM));
  kernel<<<grid, THREADS, smem, stream>>>(p);
  HK_CHECK_LAUNCH("fused_fwd_kernel");
  if (p.landmarks != nullptr && p.num_landmarks > 0) {
    const dim3 lgrid(unsigned(p.B * p.Hq), unsigned(p.num_landmarks));
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
  if (p.B * p.Hq > 0x7fffffffLL) throw std::invalid_argument("attention_forward (cuda): B * Hq must be < 2^31");
  if ((p.Nq + BM - 1) / BM > 65535) throw std::invalid_argument("attention_forward (cuda): Nq must be <= 65535 * 64");
  if (p.num_landmarks > 65535) throw std::invalid_argument("attention_forward (cuda): at most 65535 landmarks");
  if (p.Nq == 0 || p.B == 0 || p.Hq == 0) return;  // nothing to write
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
