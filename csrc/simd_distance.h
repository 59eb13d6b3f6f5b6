// Float64-accumulated distances between float32 rows. Both the kernels and the
// PyTorch references accumulate in float64, so the selected indices agree
// exactly on data without (float64-level) ties.
#pragma once
#include <cstdint>

namespace fastad {

// Always inlined: a caller compiled for AVX2 (target_clones) then vectorises these with AVX2 too; a
// call would run the baseline (SSE2) copy.
#if defined(__GNUC__) || defined(__clang__)
#define FASTAD_INLINE __attribute__((always_inline)) inline
#else
#define FASTAD_INLINE inline
#endif

// kLanes independent float64 partial sums: a single accumulator would chain every fused
// multiply-add on the previous one (latency-bound, ~4x slower); the lanes are added in a fixed order.
constexpr int kLanes = 16;

// Squared distance of two rows of any element types (float32 rows, float64 centroids), in float64.
template <typename A, typename B>
FASTAD_INLINE double squared_l2_of(const A* a, const B* b, int64_t d) {
  double acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      const double t = static_cast<double>(a[j + l]) - static_cast<double>(b[j + l]);
      acc[l] += t * t;
    }
  }
  double s = 0.0;
  for (; j < d; ++j) {
    const double t = static_cast<double>(a[j]) - static_cast<double>(b[j]);
    s += t * t;
  }
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

FASTAD_INLINE double squared_l2(const float* a, const float* b, int64_t d) { return squared_l2_of(a, b, d); }

FASTAD_INLINE double dot(const float* a, const float* b, int64_t d) {
  double acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) acc[l] += static_cast<double>(a[j + l]) * static_cast<double>(b[j + l]);
  }
  double s = 0.0;
  for (; j < d; ++j) s += static_cast<double>(a[j]) * static_cast<double>(b[j]);
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// F.normalize's convention: a zero vector is divided by eps, so its cosine is 0.
constexpr double kNormEps = 1e-12;

inline double safe_norm(double n) { return n > kNormEps ? n : kNormEps; }

}  // namespace fastad
