// Part of the CPU attention backward (see bwd_kernel_impl.h, which includes this file inside
// the per-ISA namespace): small helpers, dtype conversion and the register-tiled GEMM kernels.

constexpr int64_t kRows = 64;  // query rows per block
constexpr int64_t kKeys = 64;  // keys per tile (one bit each in a uint64_t row mask)

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ------------------------------------------------------------------------- dtype conversion
// (scalar bf16 / fp16 conversions: cpu/simd/simd_common.h)

// Short row copies: explicit vector loops, because GCC inlines memcpy / memset of unknown size
// here as `rep movsq` / `rep stosq`, which are slow for rows of a few hundred bytes.
static inline void copy_f32(float* dst, const float* src, int64_t n) {
  int64_t d = 0;
  for (; d + Vec::W <= n; d += Vec::W) Vec::store(dst + d, Vec::load(src + d));
  for (; d < n; ++d) dst[d] = src[d];
}

static inline void zero_f32(float* dst, int64_t n) {
  int64_t d = 0;
  for (; d + Vec::W <= n; d += Vec::W) Vec::store(dst + d, Vec::zero());
  for (; d < n; ++d) dst[d] = 0.f;
}

// Reads n elements of a `dtype` tensor starting at element offset `off` as fp32.
static inline void load_row(const void* base, DType dtype, int64_t off, int64_t n, float* dst) {
  if (dtype == DType::F32) {
    copy_f32(dst, static_cast<const float*>(base) + off, n);
  } else if (dtype == DType::BF16) {
    const uint16_t* s = static_cast<const uint16_t*>(base) + off;
    for (int64_t d = 0; d < n; ++d) dst[d] = bf16_to_f32(s[d]);
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(base) + off;
    for (int64_t d = 0; d < n; ++d) dst[d] = f16_to_f32(s[d]);
  }
}

// dst[d] = src[d] rounded to bf16 / fp16 (`dtype`; nearest even, NaN stays NaN), d < n. The
// scalar conversions are cpu/simd_common.h's (included by every backward translation unit).
// `stream`: bf16 from a 64-byte aligned dst goes out with non-temporal stores (a large output,
// written once; run() fences before its threads finish).
static inline void store_row_lp(const float* src, DType dtype, int64_t n, uint16_t* dst,
                                bool stream = false) {
  int64_t d = 0;
#if defined(__AVX512BF16__)
  if (dtype == DType::BF16 && stream && (reinterpret_cast<uintptr_t>(dst) & 63) == 0)
    d = stream_bf16_row(dst, src, n);
  if (dtype == DType::BF16)
    for (; d + 16 <= n; d += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + d)));
#endif
#if defined(__AVX512F__)
  if (dtype == DType::F16)
    for (; d + 16 <= n; d += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d),
                          _mm512_cvtps_ph(_mm512_loadu_ps(src + d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(__F16C__)
  if (dtype == DType::F16)
    for (; d + 8 <= n; d += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + d),
                       _mm256_cvtps_ph(_mm256_loadu_ps(src + d), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; d < n; ++d) dst[d] = dtype == DType::BF16 ? f32_to_bf16(src[d]) : f32_to_f16(src[d]);
}

// Rounded gradients of at least 8 MiB (dQ's) leave with non-temporal stores (store_row_lp).
static inline bool stream_grads(const AttnBwdParams& p) {
  return p.grad_dtype != DType::F32 && p.fwd.B * p.fwd.Hq * p.fwd.Nq * p.fwd.D * 2 >= (int64_t(8) << 20);
}

// ------------------------------------------------------------------------- GEMM micro-kernels
// C (M x N, row-major, ldc) (+)= A (M x T, element (r, t) at A[r*ars + t*ats]) * B (T x N, ldb).
// N is a multiple of Vec::W. The strided A lets one kernel serve Q K^T, P^T dO, dS^T Q and dS K.
using MicroFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t,
                         int64_t);

template <bool ACC, int MR, int NV>
static void micro(const float* A, int64_t ars, int64_t ats, const float* B, int64_t ldb, float* C,
                  int64_t ldc, int64_t T) {
  typename Vec::R acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v)
      acc[r][v] = ACC ? Vec::load(C + r * ldc + v * Vec::W) : Vec::zero();
  for (int64_t t = 0; t < T; ++t) {
    typename Vec::R b[NV];
    for (int v = 0; v < NV; ++v) b[v] = Vec::load(B + t * ldb + v * Vec::W);
    const float* a = A + t * ats;
    for (int r = 0; r < MR; ++r) {
      typename Vec::R ar = Vec::set1(a[r * ars]);
      for (int v = 0; v < NV; ++v) acc[r][v] = Vec::fma(ar, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) Vec::store(C + r * ldc + v * Vec::W, acc[r][v]);
}

template <bool ACC, int MR, int NV>
static MicroFn pick_nv(int nv) {
  if constexpr (NV == 0) {
    return nullptr;
  } else {
    return nv == NV ? &micro<ACC, MR, NV> : pick_nv<ACC, MR, NV - 1>(nv);
  }
}

template <bool ACC, int MR>
static MicroFn pick(int mr, int nv) {
  if constexpr (MR == 0) {
    return nullptr;
  } else {
    return mr == MR ? pick_nv<ACC, MR, Vec::NVMAX>(nv) : pick<ACC, MR - 1>(mr, nv);
  }
}

template <bool ACC>
static void gemm(int64_t M, int64_t N, int64_t T, const float* A, int64_t ars, int64_t ats,
                 const float* B, int64_t ldb, float* C, int64_t ldc) {
  constexpr int64_t CW = int64_t(Vec::NVMAX) * Vec::W;
  for (int64_t c0 = 0; c0 < N; c0 += CW) {
    const int nv = static_cast<int>(imin(Vec::NVMAX, (N - c0) / Vec::W));
    const MicroFn full = pick<ACC, Vec::MR>(Vec::MR, nv);
    for (int64_t r0 = 0; r0 < M; r0 += Vec::MR) {
      const int mr = static_cast<int>(imin(Vec::MR, M - r0));
      MicroFn fn = mr == Vec::MR ? full : pick<ACC, Vec::MR>(mr, nv);
      fn(A + r0 * ars, ars, ats, B + c0, ldb, C + r0 * ldc + c0, ldc, T);
    }
  }
}
