// Warp and block reductions of (value, index) pairs; ties go to the lowest index,
// which is what torch.argmax/argmin and the CPU kernels return.
#pragma once
#include <cuda_runtime.h>

namespace fastad {
namespace cuda {

// Keeps (v, i) if it is better than (ov, oi) for a maximum; -1 marks "no index".
__device__ __forceinline__ void keep_max(double& v, long long& i, double ov, long long oi) {
  if (oi >= 0 && (i < 0 || ov > v || (ov == v && oi < i))) {
    v = ov;
    i = oi;
  }
}

__device__ __forceinline__ void warp_argmax(double& v, long long& i) {
  for (int off = 16; off > 0; off >>= 1) {
    const double ov = __shfl_down_sync(0xffffffffu, v, off);
    const long long oi = __shfl_down_sync(0xffffffffu, i, off);
    keep_max(v, i, ov, oi);
  }
}

// Block-wide argmax; every thread gets the result. THREADS is a multiple of 32.
template <int THREADS>
__device__ void block_argmax(double v, long long i, double& out_v, long long& out_i) {
  __shared__ double sv[THREADS / 32];
  __shared__ long long si[THREADS / 32];
  __shared__ double rv;
  __shared__ long long ri;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  warp_argmax(v, i);
  if (lane == 0) {
    sv[warp] = v;
    si[warp] = i;
  }
  __syncthreads();
  if (warp == 0) {
    v = lane < THREADS / 32 ? sv[lane] : 0.0;
    i = lane < THREADS / 32 ? si[lane] : -1;
    warp_argmax(v, i);
    if (lane == 0) {
      rv = v;
      ri = i;
    }
  }
  __syncthreads();
  out_v = rv;
  out_i = ri;
}

}  // namespace cuda
}  // namespace fastad
