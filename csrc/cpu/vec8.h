// Eight float32 lanes: AVX2 + FMA where the build targets them (the default x86-64 baseline of
// setup.py), a plain array elsewhere. Used by the dense CRF, whose per-pixel and per-vertex rows
// are padded to a multiple of 8 labels so every inner loop is whole vectors.
// Host-only, torch-free.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FCNFAST_VEC8_AVX2 1
#endif

namespace fcnfast {
namespace simd {

#ifdef FCNFAST_VEC8_AVX2

struct Vec8 {
  __m256 v;
  static Vec8 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec8 broadcast(float x) { return {_mm256_set1_ps(x)}; }
  static Vec8 zero() { return {_mm256_setzero_ps()}; }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  friend Vec8 operator+(Vec8 a, Vec8 b) { return {_mm256_add_ps(a.v, b.v)}; }
  friend Vec8 operator-(Vec8 a, Vec8 b) { return {_mm256_sub_ps(a.v, b.v)}; }
  friend Vec8 operator*(Vec8 a, Vec8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
  // a * b + c with one rounding
  friend Vec8 fmadd(Vec8 a, Vec8 b, Vec8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  friend Vec8 max(Vec8 a, Vec8 b) { return {_mm256_max_ps(a.v, b.v)}; }
  float hmax() const {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  // fixed pairwise order: the same bits whatever thread computes it
  float hsum() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

// exp(x) for x <= 0 up to ~2 ulp (Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6
// polynomial for exp(r), 2^n through the exponent bits); exactly 0 below -87.3 (and for -inf),
// where the float result would be denormal. std::exp per lane costs ~10x more and dominated the
// mean-field update.
inline Vec8 exp_nonpositive(Vec8 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 underflow = _mm256_cmp_ps(x.v, lo, _CMP_LT_OQ);  // also true for -inf, not NaN
  __m256 a = _mm256_max_ps(x.v, lo);
  a = _mm256_min_ps(a, _mm256_set1_ps(0.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(a, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), a);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return {_mm256_andnot_ps(underflow, y)};
}

#else  // portable fallback: the same operations lane by lane

struct Vec8 {
  float v[8];
  static Vec8 load(const float* p) {
    Vec8 r;
    std::memcpy(r.v, p, sizeof(r.v));
    return r;
  }
  static Vec8 broadcast(float x) {
    Vec8 r;
    for (float& l : r.v) l = x;
    return r;
  }
  static Vec8 zero() { return broadcast(0.0f); }
  void store(float* p) const { std::memcpy(p, v, sizeof(v)); }
  template <class F>
  static Vec8 zip(Vec8 a, Vec8 b, F f) {
    Vec8 r;
    for (int k = 0; k < 8; ++k) r.v[k] = f(a.v[k], b.v[k]);
    return r;
  }
  friend Vec8 operator+(Vec8 a, Vec8 b) {
    return zip(a, b, [](float x, float y) { return x + y; });
  }
  friend Vec8 operator-(Vec8 a, Vec8 b) {
    return zip(a, b, [](float x, float y) { return x - y; });
  }
  friend Vec8 operator*(Vec8 a, Vec8 b) {
    return zip(a, b, [](float x, float y) { return x * y; });
  }
  friend Vec8 fmadd(Vec8 a, Vec8 b, Vec8 c) {
    Vec8 r;
    for (int k = 0; k < 8; ++k) r.v[k] = std::fma(a.v[k], b.v[k], c.v[k]);
    return r;
  }
  friend Vec8 max(Vec8 a, Vec8 b) {
    return zip(a, b, [](float x, float y) { return x > y ? x : y; });
  }
  float hmax() const {
    float m = v[0];
    for (int k = 1; k < 8; ++k) m = v[k] > m ? v[k] : m;
    return m;
  }
  float hsum() const { return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7])); }
};

inline Vec8 exp_nonpositive(Vec8 x) {
  Vec8 r;
  for (int k = 0; k < 8; ++k) r.v[k] = x.v[k] < -87.3f ? 0.0f : std::exp(std::fmin(x.v[k], 0.0f));
  return r;
}

#endif

}  // namespace simd
}  // namespace fcnfast
