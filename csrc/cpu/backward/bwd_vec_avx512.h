// The AVX-512 vector trait of the CPU backward (bwd_kernel_impl.h), shared by the avx512 and amx
// builds. Included inside each build's namespace (no include guard on purpose), from translation
// units compiled with AVX-512 flags only.
struct Vec {
  static constexpr int W = 16;
  static constexpr int MR = 6;     // 6 x 4 accumulators = 24 of the 32 zmm registers
  static constexpr int NVMAX = 4;
  using R = __m512;
  using Simd = VecAvx512;  // cpu/simd_common.h: tanh, add for the score modifiers
  static inline R zero() { return _mm512_setzero_ps(); }
  static inline R load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static inline R set1(float x) { return _mm512_set1_ps(x); }
  static inline R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static inline R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static inline R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static inline R maskz(unsigned bits, R v) {
    return _mm512_maskz_mov_ps(static_cast<__mmask16>(bits), v);
  }
    static inline R exp(R x) { return exp_full(x); }  // cpu/simd/exp2.h
};
