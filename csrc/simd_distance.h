// Float64-accumulated distances between float32 rows. Both the kernels and the
// PyTorch references accumulate in float64, so the selected indices agree
// exactly on data without (float64-level) ties.
#pragma once
#include <c10/util/Half.h>

#include <cstdint>

namespace fastad {

// Always inlined: a caller compiled for AVX2 (target_clones) then vectorises these with AVX2 too; a
// call would run the baseline (SSE2) copy.
#if defined(__GNUC__) || defined(__clang__)
#define FASTAD_INLINE __attribute__((always_inline)) inline
#else
#define FASTAD_INLINE inline
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
// The loops that call them: x86-64-v3 (AVX2, FMA, F16C) is dispatched on the CPU's features;
// "arch=haswell" would be chosen only on Intel Haswell-family models, so AMD and newer Intel CPUs
// ran the SSE2 copy.
#define FASTAD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FASTAD_CLONES
#endif

// kLanes = 16 independent float64 partial sums, as four 4-wide vectors (lane l of vector q sums the
// elements j + 4q + l): a single accumulator would chain every fused multiply-add on the previous one
// (latency-bound, ~4x slower), and vector types keep the sums in registers (an array of 16 was spilled
// to the stack). The lanes are added pairwise in a fixed order (q0+q2, q1+q3, then the halves), so
// every caller and every build gets the same float64 value.
constexpr int kLanes = 16;
#if defined(__GNUC__) && !defined(__clang__)
// 32-byte vectors in the baseline (SSE2) build: always inlined, so no call ABI is involved.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
typedef double Vec4d __attribute__((vector_size(32)));
typedef float Vec4f __attribute__((vector_size(16)));

FASTAD_INLINE Vec4d load4(const double* p) {
  Vec4d v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
FASTAD_INLINE Vec4d load4(const float* p) {
  Vec4f v;
  __builtin_memcpy(&v, p, sizeof(v));
  return __builtin_convertvector(v, Vec4d);
}

FASTAD_INLINE double sum_lanes(Vec4d q0, Vec4d q1, Vec4d q2, Vec4d q3) {
  const Vec4d h = (q0 + q2) + (q1 + q3);
  return (h[0] + h[2]) + (h[1] + h[3]);
}

// Squared distance of two rows of any element types (float32 rows, float64 centroids), in float64.
template <typename A, typename B>
FASTAD_INLINE double squared_l2_of(const A* a, const B* b, int64_t d) {
  Vec4d q0 = {}, q1 = {}, q2 = {}, q3 = {};
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
    const Vec4d t0 = load4(a + j) - load4(b + j), t1 = load4(a + j + 4) - load4(b + j + 4);
    const Vec4d t2 = load4(a + j + 8) - load4(b + j + 8), t3 = load4(a + j + 12) - load4(b + j + 12);
    q0 += t0 * t0;
    q1 += t1 * t1;
    q2 += t2 * t2;
    q3 += t3 * t3;
  }
  double s = sum_lanes(q0, q1, q2, q3);
  for (; j < d; ++j) {
    const double t = static_cast<double>(a[j]) - static_cast<double>(b[j]);
    s += t * t;
  }
  return s;
}

FASTAD_INLINE double squared_l2(const float* a, const float* b, int64_t d) { return squared_l2_of(a, b, d); }

FASTAD_INLINE float widen(float v) { return v; }
FASTAD_INLINE float widen(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }  // float16 bits

// The same squared distance in float32 (16 lanes as two 8-wide vectors, then a fixed tree): twice
// the elements per instruction of the float64 form, for screening only. Its relative error is below
// screen_error(d), see there.
typedef float Vec8f __attribute__((vector_size(32)));

FASTAD_INLINE Vec8f load8(const float* p) {
  Vec8f v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

// b's elements are read 8 at a time by load_b(b + j), one at a time by widen(b[j]) (the tail).
template <typename B, typename LoadB>
FASTAD_INLINE float squared_l2_f32(const float* a, const B* b, int64_t d, LoadB&& load_b) {
  Vec8f q0 = {}, q1 = {};
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
    const Vec8f t0 = load8(a + j) - load_b(b + j), t1 = load8(a + j + 8) - load_b(b + j + 8);
    q0 += t0 * t0;
    q1 += t1 * t1;
  }
  const Vec8f h = q0 + q1;
  float s = ((h[0] + h[4]) + (h[2] + h[6])) + ((h[1] + h[5]) + (h[3] + h[7]));
  for (; j < d; ++j) {
    const float t = a[j] - widen(b[j]);
    s += t * t;
  }
  return s;
}

FASTAD_INLINE float squared_l2_f32(const float* a, const float* b, int64_t d) {
  return squared_l2_f32(a, b, d, [](const float* p) { return load8(p); });
}

// A bound on squared_l2_f32's relative error (all its terms are >= 0). Each term fl(fl(a - b)^2) is
// within 3 roundings (u = 2^-24 each) of (a - b)^2 (with a fused multiply-add, within 2), and
// reaches the sum through at most d/16 + 4 + 15 additions (lane, tree, tail), so the error is below
// gamma(d/16 + 22) = (d/16 + 22) u / (1 - ...). Twice that, + 2u: (d/16 + 24) 2^-23. Underflow adds
// at most 2^-150 absolute per operation: screen_tiny(d).
inline double screen_error(int64_t d) { return (static_cast<double>(d) / 16.0 + 24.0) * 0x1p-23; }
inline double screen_tiny(int64_t d) { return static_cast<double>(d + 64) * 0x1p-149; }

FASTAD_INLINE double dot(const float* a, const float* b, int64_t d) {
  Vec4d q0 = {}, q1 = {}, q2 = {}, q3 = {};
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
    q0 += load4(a + j) * load4(b + j);
    q1 += load4(a + j + 4) * load4(b + j + 4);
    q2 += load4(a + j + 8) * load4(b + j + 8);
    q3 += load4(a + j + 12) * load4(b + j + 12);
  }
  double s = sum_lanes(q0, q1, q2, q3);
  for (; j < d; ++j) s += static_cast<double>(a[j]) * static_cast<double>(b[j]);
  return s;
}

// F.normalize's convention: a zero vector is divided by eps, so its cosine is 0.
constexpr double kNormEps = 1e-12;

inline double safe_norm(double n) { return n > kNormEps ? n : kNormEps; }

}  // namespace fastad
