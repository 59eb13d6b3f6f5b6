// Greedy k-center coreset as one persistent cooperative kernel: per iteration
// every block scores its points against the new center (float64 accumulation,
// features stored d x N so that loads coalesce), updates the min distances and
// writes a block argmax; after one grid-wide barrier every block reduces the
// partials itself, so the whole loop costs k barriers and no kernel launches.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "warp_argbest.cuh"

namespace cg = cooperative_groups;

namespace fastad {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    kcenter_kernel(const float* __restrict__ xt, long long n, int d, const long long* __restrict__ starts, int s,
                   long long k, double* __restrict__ dist, double* part_v, long long* part_i,
                   long long* __restrict__ out) {
  cg::grid_group grid = cg::this_grid();
  extern __shared__ float center[];
  const int blocks = gridDim.x;
  const long long stride = static_cast<long long>(blocks) * kThreads;
  const long long first = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;

  double v = 0.0, bv = 0.0;
  long long vi = -1, bi = -1;
  for (long long i = first; i < n; i += stride) {
    double acc = 0.0;
    for (int j = 0; j < s; ++j) {
      double sq = 0.0;
      for (int t = 0; t < d; ++t) {
        const double diff = static_cast<double>(xt[t * n + i]) - static_cast<double>(xt[t * n + starts[j]]);
        sq += diff * diff;
      }
      acc += sqrt(sq);
    }
    const double md = acc / s;
    dist[i] = md;
    keep_max(v, vi, md, i);
  }
  block_argmax<kThreads>(v, vi, bv, bi);
  if (threadIdx.x == 0) {
    part_v[blockIdx.x] = bv;
    part_i[blockIdx.x] = bi;
  }
  grid.sync();

  for (long long it = 0; it < k; ++it) {
    const int rd = static_cast<int>(it & 1) * blocks, wr = blocks - rd;
    v = 0.0;
    vi = -1;
    for (int b = threadIdx.x; b < blocks; b += kThreads) keep_max(v, vi, part_v[rd + b], part_i[rd + b]);
    block_argmax<kThreads>(v, vi, bv, bi);
    const long long c = bi;
    if (blockIdx.x == 0 && threadIdx.x == 0) out[it] = c;
    for (int t = threadIdx.x; t < d; t += kThreads) center[t] = xt[t * n + c];
    __syncthreads();

    v = 0.0;
    vi = -1;
    for (long long i = first; i < n; i += stride) {
      double md = dist[i];
      if (i == c) {
        md = -1.0;  // selected: never picked again
        dist[i] = md;
      } else if (md > 0.0) {
        double sq = 0.0;
        for (int t = 0; t < d; ++t) {
          const double diff = static_cast<double>(xt[t * n + i]) - static_cast<double>(center[t]);
          sq += diff * diff;
        }
        const double dv = sqrt(sq);
        if (dv < md) {
          md = dv;
          dist[i] = md;
        }
      }
      keep_max(v, vi, md, i);
    }
    block_argmax<kThreads>(v, vi, bv, bi);
    if (threadIdx.x == 0) {
      part_v[wr + blockIdx.x] = bv;
      part_i[wr + blockIdx.x] = bi;
    }
    grid.sync();
  }
}

}  // namespace

// Number of co-resident blocks the launch will use (the caller sizes the partials: 2 x blocks).
cudaError_t kcenter_grid_size(long long n, int d, int device, int* blocks) {
  int coop = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device);
  if (err != cudaSuccess) return err;
  if (!coop) return cudaErrorNotSupported;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kcenter_kernel, kThreads, d * sizeof(float));
  if (err != cudaSuccess) return err;
  const long long needed = (n + kThreads - 1) / kThreads;
  long long g = static_cast<long long>(per_sm) * sms;
  *blocks = static_cast<int>(needed < g ? needed : g);
  if (*blocks < 1) *blocks = 1;
  return cudaSuccess;
}

cudaError_t kcenter_greedy_launch(const float* xt, long long n, int d, const long long* starts, int s, long long k,
                                  double* dist, double* part_v, long long* part_i, long long* out, int blocks,
                                  cudaStream_t stream) {
  void* args[] = {&xt, &n, &d, &starts, &s, &k, &dist, &part_v, &part_i, &out};
  return cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kcenter_kernel), dim3(blocks), dim3(kThreads), args,
                                     d * sizeof(float), stream);
}

}  // namespace cuda
}  // namespace fastad
