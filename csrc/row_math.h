// Elementwise work of the "cpu" backend on one row segment z[0, len) of a logits tile, and bfloat16 rounding.
//
// float: exp and tanh as polynomials (<= 1.5 ulp) that the compiler vectorises; double: libm. NaN in gives NaN out.
// The float entry points are compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time (GCC ifunc);
// everything they call is forced inline (SPPO_INLINE), else GCC may emit one out-of-line baseline copy for all
// three clones (it did for fold_row: the forward's log-sum-exp ran in SSE2, 10% of a bf16 fwd+bwd).
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__)
#define SPPO_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define SPPO_INLINE __attribute__((always_inline)) inline
#else
#define SPPO_CLONES
#define SPPO_INLINE inline
#endif

namespace sppo {
namespace {  // one translation unit includes this: internal linkage, so GCC can clone the entry points

// exp(xc) = 2^k exp(r) with k = round(xc / ln 2) given, r = xc - k ln 2 (|r| <= ln 2 / 2): the Cephes expf
// polynomial for exp(r), scaled by 2^k through the exponent bits.
SPPO_INLINE float exp_reduced(float xc, float k) {
  const float r = (xc - k * 0.693359375f) + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * __builtin_bit_cast(float, (static_cast<int32_t>(k) + 127) << 23);
}

SPPO_INLINE float exp_approx(float x) {
  // exp(x) for any x: k = round(x / ln 2), clamped to float32's range (0 below, inf above).
  const float lo = -87.33654f, hi = 88.0f;
  const float xc = std::min(std::max(x, lo), hi);
  const float k = std::floor(xc * 1.44269504088896341f + 0.5f);
  const float y = exp_reduced(xc, k);
  const float clipped = x < lo ? 0.0f : (x > hi ? std::numeric_limits<float>::infinity() : y);
  return x != x ? x : clipped;
}

// exp(x) for x <= 0 (the softmax terms exp(z - max) and exp(z - lse)): the Cephes polynomial of exp_approx with
// the rounding of x / ln 2 by the 1.5 * 2^23 trick and no upper clamp; below -87.3 it returns ~1.2e-38 (not 0).
// NaN in gives NaN out.
SPPO_INLINE float exp_nonpositive(float x) {
  const float xc = x < -87.33654f ? -87.33654f : x;  // keeps NaN
  const float shifter = 12582912.0f;                 // 1.5 * 2^23: adding it rounds to an integer
  const float k = (xc * 1.44269504088896341f + shifter) - shifter;
  return exp_reduced(xc, k);
}
inline double exp_nonpositive(double x) { return std::exp(x); }

SPPO_INLINE float tanh_approx(float x) {
  // |x| < 0.625: odd polynomial (Cephes tanhf); else (1 - e) / (1 + e) with e = exp(-2|x|).
  const float a = std::fabs(x);
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float e = exp_nonpositive(-2.0f * a);
  const float t = a < 0.625f ? a + a * z * p : (1.0f - e) / (1.0f + e);
  return x != x ? x : std::copysign(t, x);
}

inline double exp_approx(double x) { return std::exp(x); }
inline double tanh_approx(double x) { return std::tanh(x); }

// Round to the nearest bfloat16 (ties to even); NaN stays NaN.
SPPO_INLINE uint16_t bf16_bits(float x) {
  const uint32_t u = __builtin_bit_cast(uint32_t, x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return x != x ? uint16_t(0x7fc0) : static_cast<uint16_t>(rounded);
}
SPPO_INLINE float bf16_value(uint16_t bits) { return __builtin_bit_cast(float, uint32_t(bits) << 16); }

// Raw a (+ bias) -> logits z = softcap(a) / temperature, in place.
template <typename T>
SPPO_INLINE void transform_row(T* z, const T* bias, int64_t len, T softcap, T temperature) {
  if (bias != nullptr) {
    for (int64_t j = 0; j < len; ++j) z[j] += bias[j];
  }
  if (softcap > 0) {
    const T inv_cap = T(1) / softcap, scale = softcap / temperature;
    for (int64_t j = 0; j < len; ++j) z[j] = scale * tanh_approx(z[j] * inv_cap);
  } else if (temperature != T(1)) {
    const T inv_temp = T(1) / temperature;
    for (int64_t j = 0; j < len; ++j) z[j] *= inv_temp;
  }
}

// max(x[0, n)) (-inf for n = 0; NaN entries are skipped). Kept in one 64-byte vector of lane maxima, each step
// `x > acc ? x : acc`, which is one MAXPS: GCC vectorises this, and not std::max in an `omp simd` max reduction
// (that ran as a scalar chain, 4 cycles per entry).
template <typename T>
SPPO_INLINE T max_of(const T* x, int64_t n) {
  constexpr int64_t lanes = 64 / sizeof(T);
  T acc[lanes];
  std::fill(acc, acc + lanes, -std::numeric_limits<T>::infinity());
  int64_t j = 0;
  for (; j + lanes <= n; j += lanes) {
    for (int64_t l = 0; l < lanes; ++l) acc[l] = x[j + l] > acc[l] ? x[j + l] : acc[l];
  }
  for (; j < n; ++j) acc[0] = x[j] > acc[0] ? x[j] : acc[0];
  T best = acc[0];
  for (int64_t l = 1; l < lanes; ++l) best = acc[l] > best ? acc[l] : best;
  return best;
}

// Online log-sum-exp: fold z[0, len) into the row's running max m and sum s = sum exp(z - m), in blocks of 256 that
// stay in L1 between their max and their sum (one pass over the tile in memory).
template <typename T>
SPPO_INLINE void fold_row(const T* z, int64_t len, T& m, T& s) {
  constexpr int64_t block = 256;
  for (int64_t j0 = 0; j0 < len; j0 += block) {
    const T* x = z + j0;
    const int64_t n = std::min(block, len - j0);
    const T new_max = std::max(m, max_of(x, n));
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) sum += exp_nonpositive(x[j] - new_max);
    s = s * exp_approx(m - new_max) + sum;
    m = new_max;
  }
}

// Logits z -> da = g (onehot(y) - exp(z - lse)) dz/da, in place. y: the target's column in the segment, or -1.
template <typename T>
SPPO_INLINE void grad_row(T* z, int64_t len, int64_t y, T lse, T g, T softcap, T temperature) {
  const T zy = y >= 0 ? z[y] : T(0);
  const T scale = g / temperature;
  if (softcap > 0) {
    const T k = temperature / softcap;  // tanh(a / c) = z tau / c
    for (int64_t j = 0; j < len; ++j) {
      const T t = z[j] * k;
      z[j] = -scale * exp_nonpositive(z[j] - lse) * (T(1) - t * t);
    }
    if (y >= 0) z[y] += scale * (T(1) - zy * k * zy * k);
  } else {
    for (int64_t j = 0; j < len; ++j) z[j] = -scale * exp_nonpositive(z[j] - lse);
    if (y >= 0) z[y] += scale;
  }
}

// da[0, len) -> hi + lo, both bfloat16: hi = bf16(da), lo = bf16(da - hi) (da to ~16 significant bits); lo may be
// null (hi only: da rounded once).
SPPO_INLINE void split_row(const float* da, int64_t len, uint16_t* hi, uint16_t* lo) {
  for (int64_t j = 0; j < len; ++j) {
    const uint16_t h = bf16_bits(da[j]);
    hi[j] = h;
    if (lo != nullptr) lo[j] = bf16_bits(da[j] - bf16_value(h));
  }
}

// float entry points, cloned per instruction set; double goes straight to the templates.
SPPO_CLONES void transform(float* z, const float* bias, int64_t len, float softcap, float temperature) {
  transform_row(z, bias, len, softcap, temperature);
}
SPPO_CLONES void fold(const float* z, int64_t len, float& m, float& s) { fold_row(z, len, m, s); }
SPPO_CLONES void grad(float* z, int64_t len, int64_t y, float lse, float g, float softcap, float temperature) {
  grad_row(z, len, y, lse, g, softcap, temperature);
}
SPPO_CLONES void split(const float* da, int64_t len, uint16_t* hi, uint16_t* lo) { split_row(da, len, hi, lo); }

inline void transform(double* z, const double* b, int64_t len, double c, double t) { transform_row(z, b, len, c, t); }
inline void fold(const double* z, int64_t len, double& m, double& s) { fold_row(z, len, m, s); }
inline void grad(double* z, int64_t len, int64_t y, double lse, double g, double c, double t) {
  grad_row(z, len, y, lse, g, c, t);
}

}  // namespace
}  // namespace sppo
