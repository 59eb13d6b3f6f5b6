// Nearest-reference matching, one warp per query: lanes split the channels,
// float64 accumulation, a warp all-reduce per bank item. The windowed form
// visits only the p x p neighbourhood of the query's position in each of the K
// reference images, so its cost is O(N K p^2 C) and nothing N x M is stored.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace fastad {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr double kNormEps = 1e-12;

__device__ __forceinline__ double warp_sum(double v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Squared distance (metric 0) or cosine similarity (metric 1), identical in every lane.
__device__ __forceinline__ double score(const float* __restrict__ q, const float* __restrict__ b, int c, int metric,
                                        double qn, double bn, int lane) {
  double acc = 0.0;
  if (metric == 0) {
    for (int t = lane; t < c; t += 32) {
      const double diff = static_cast<double>(q[t]) - static_cast<double>(b[t]);
      acc += diff * diff;
    }
    return warp_sum(acc);
  }
  for (int t = lane; t < c; t += 32) acc += static_cast<double>(q[t]) * static_cast<double>(b[t]);
  return warp_sum(acc) / (fmax(qn, kNormEps) * fmax(bn, kNormEps));
}

__global__ void __launch_bounds__(kThreads)
    nearest_kernel(const float* __restrict__ x, const float* __restrict__ bank, long long nq, long long m, int c,
                   int metric, int window, int H, int W, int K, const double* __restrict__ xnorm,
                   const double* __restrict__ bnorm, double* __restrict__ out_v, long long* __restrict__ out_i) {
  const long long q = (static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (q >= nq) return;  // uniform across the warp
  const float* xq = x + q * c;
  const double qn = metric == 1 ? xnorm[q] : 0.0;
  const bool l2 = metric == 0;
  double best = l2 ? INFINITY : -INFINITY;
  long long arg = -1;
  auto visit = [&](long long j) {
    const double v = score(xq, bank + j * c, c, metric, qn, metric == 1 ? bnorm[j] : 0.0, lane);
    if (l2 ? v < best : v > best) {  // ascending j: lowest index wins ties
      best = v;
      arg = j;
    }
  };
  if (window == 0) {
    for (long long j = 0; j < m; ++j) visit(j);
  } else {
    const int r = window / 2, h = static_cast<int>((q / W) % H), w = static_cast<int>(q % W);
    const int h0 = max(0, h - r), h1 = min(H - 1, h + r), w0 = max(0, w - r), w1 = min(W - 1, w + r);
    for (int k = 0; k < K; ++k)
      for (int hh = h0; hh <= h1; ++hh)
        for (int ww = w0; ww <= w1; ++ww) visit((static_cast<long long>(k) * H + hh) * W + ww);
  }
  if (lane == 0) {
    out_v[q] = l2 ? sqrt(best) : best;
    out_i[q] = arg;
  }
}

}  // namespace

cudaError_t nearest_reference_launch(const float* x, const float* bank, long long nq, long long m, int c, int metric,
                                     int window, int H, int W, int K, const double* xnorm, const double* bnorm,
                                     double* out_v, long long* out_i, cudaStream_t stream) {
  const long long threads = nq * 32;
  const unsigned blocks = static_cast<unsigned>((threads + kThreads - 1) / kThreads);
  nearest_kernel<<<blocks, kThreads, 0, stream>>>(x, bank, nq, m, c, metric, window, H, W, K, xnorm, bnorm, out_v,
                                                  out_i);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastad
