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

// Squared distance, accumulated in float64 in the order of the dimensions, between a point whose
// t-th value is p[t * ps] and a center whose t-th value is c[t * cs]. Every kernel below uses it, so
// the one-launch loop and the per-step kernels give the same bits.
__device__ __forceinline__ double sq_dist(const float* p, long long ps, const float* c, long long cs, int d) {
  double sq = 0.0;
  for (int t = 0; t < d; ++t) {
    const double diff = static_cast<double>(p[t * ps]) - static_cast<double>(c[t * cs]);
    sq += diff * diff;
  }
  return sq;
}

// Point i's distance after center c (its values c[t], shared memory): -1 once selected, else the
// smaller of its distance so far and its distance to c (a point at 0, a covered duplicate, stays).
__device__ __forceinline__ double lower_distance(double* dist, long long i, bool selected, const float* p, long long ps,
                                                 const float* c, int d) {
  double md = dist[i];
  if (selected) {
    md = -1.0;
    dist[i] = md;
  } else if (md > 0.0) {
    const double dv = sqrt(sq_dist(p, ps, c, 1, d));
    if (dv < md) {
      md = dv;
      dist[i] = md;
    }
  }
  return md;
}

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
    for (int j = 0; j < s; ++j) acc += sqrt(sq_dist(xt + i, n, xt + starts[j], n, d));
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
    for (long long i = first; i < n; i += stride) keep_max(v, vi, lower_distance(dist, i, i == c, xt + i, n, center, d), i);
    block_argmax<kThreads>(v, vi, bv, bi);
    if (threadIdx.x == 0) {
      part_v[wr + blockIdx.x] = bv;
      part_i[wr + blockIdx.x] = bi;
    }
    grid.sync();
  }
}

// Per-step kernels of distributed selections over row shards (fastad/ops/coreset.py): the same
// float64 arithmetic as kcenter_kernel, on row-major (n, d) features, one launch per step; the host
// exchanges each step's best point between processes.
__global__ void __launch_bounds__(kThreads)
    kcenter_init_kernel(const float* __restrict__ x, long long n, int d, const float* __restrict__ sv, int s,
                        double* __restrict__ dist) {
  const long long stride = static_cast<long long>(gridDim.x) * kThreads;
  for (long long i = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    double acc = 0.0;
    for (int j = 0; j < s; ++j) acc += sqrt(sq_dist(x + i * d, 1, sv + static_cast<long long>(j) * d, 1, d));
    dist[i] = acc / s;
  }
}

__global__ void __launch_bounds__(kThreads)
    kcenter_step_kernel(const float* __restrict__ x, long long n, int d, const float* __restrict__ center,
                        long long owned, double* __restrict__ dist, double* part_v, long long* part_i) {
  extern __shared__ float c[];
  for (int t = threadIdx.x; t < d; t += kThreads) c[t] = center[t];
  __syncthreads();
  double v = 0.0, bv = 0.0;
  long long vi = -1, bi = -1;
  const long long stride = static_cast<long long>(gridDim.x) * kThreads;
  for (long long i = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride)
    keep_max(v, vi, lower_distance(dist, i, i == owned, x + i * d, 1, c, d), i);
  block_argmax<kThreads>(v, vi, bv, bi);
  if (threadIdx.x == 0) {
    part_v[blockIdx.x] = bv;
    part_i[blockIdx.x] = bi;
  }
}

// One block: the best of the per-block partials -> out (best distance, its row or -1, 0).
__global__ void __launch_bounds__(kThreads)
    kcenter_reduce_kernel(const double* part_v, const long long* part_i, int blocks, double* out) {
  double v = 0.0, bv = 0.0;
  long long vi = -1, bi = -1;
  for (int b = threadIdx.x; b < blocks; b += kThreads) keep_max(v, vi, part_v[b], part_i[b]);
  block_argmax<kThreads>(v, vi, bv, bi);
  if (threadIdx.x == 0) {
    out[0] = bi >= 0 ? bv : -INFINITY;
    out[1] = static_cast<double>(bi);
    out[2] = 0.0;
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

// Blocks of the per-step kernels (the caller sizes the partials: blocks).
int kcenter_step_blocks(long long n) {
  const long long needed = (n + kThreads - 1) / kThreads;
  return static_cast<int>(needed < 1 ? 1 : (needed > 1024 ? 1024 : needed));
}

cudaError_t kcenter_init_launch(const float* x, long long n, int d, const float* sv, int s, double* dist,
                                cudaStream_t stream) {
  kcenter_init_kernel<<<kcenter_step_blocks(n), kThreads, 0, stream>>>(x, n, d, sv, s, dist);
  return cudaGetLastError();
}

cudaError_t kcenter_step_launch(const float* x, long long n, int d, const float* center, long long owned, double* dist,
                                double* part_v, long long* part_i, double* out, cudaStream_t stream) {
  const int blocks = kcenter_step_blocks(n);
  kcenter_step_kernel<<<blocks, kThreads, d * sizeof(float), stream>>>(x, n, d, center, owned, dist, part_v, part_i);
  kcenter_reduce_kernel<<<1, kThreads, 0, stream>>>(part_v, part_i, blocks, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastad
