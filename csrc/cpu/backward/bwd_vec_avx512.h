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
  // exp(x) = 2^n * e^r, |r| <= ln2/2, Cephes polynomial (~1 ulp); scalef gives exact 2^n scaling
  // and flushes to 0 for very negative x.
  static inline R exp(R x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    x = _mm512_min_ps(x, _mm512_set1_ps(88.7f));
    const R n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    R r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    R y = _mm512_set1_ps(1.9875691500E-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507E-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073E-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894E-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459E-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201E-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n);
  }
};
