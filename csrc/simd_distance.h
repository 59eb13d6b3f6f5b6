// Float64-accumulated distances between float32 rows. Both the kernels and the
// PyTorch references accumulate in float64, so the selected indices agree
// exactly on data without (float64-level) ties.
#pragma once
#include <cstdint>

namespace fastad {

inline double squared_l2(const float* a, const float* b, int64_t d) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < d; ++j) {
    const double t = static_cast<double>(a[j]) - static_cast<double>(b[j]);
    s += t * t;
  }
  return s;
}

inline double dot(const float* a, const float* b, int64_t d) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < d; ++j) s += static_cast<double>(a[j]) * static_cast<double>(b[j]);
  return s;
}

// F.normalize's convention: a zero vector is divided by eps, so its cosine is 0.
constexpr double kNormEps = 1e-12;

inline double safe_norm(double n) { return n > kNormEps ? n : kNormEps; }

}  // namespace fastad
