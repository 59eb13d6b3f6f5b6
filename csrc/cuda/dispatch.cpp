// CUDA implementations of the fastad ops: argument checks, allocation and the
// current stream are handled here (host C++), the kernels live in the .cu files.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <tuple>

namespace fastad {
namespace cuda {
cudaError_t kcenter_grid_size(long long n, int d, int device, int* blocks);
cudaError_t kcenter_greedy_launch(const float* xt, long long n, int d, const long long* starts, int s, long long k,
                                  double* dist, double* part_v, long long* part_i, long long* out, int blocks,
                                  cudaStream_t stream);
cudaError_t nearest_reference_launch(const float* x, const float* bank, long long nq, long long m, int c, int metric,
                                     int window, int H, int W, int K, const double* xnorm, const double* bnorm,
                                     double* out_v, long long* out_i, cudaStream_t stream);
}  // namespace cuda

namespace {

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fastad::", what, ": CUDA error: ", cudaGetErrorString(err));
}

constexpr int64_t kMaxSharedDim = 11776;  // float32 center + reduction scratch within 48 KiB of shared memory

at::Tensor kcenter_greedy_cuda(const at::Tensor& features, const at::Tensor& starts, int64_t k) {
  TORCH_CHECK(features.dim() == 2 && features.scalar_type() == at::kFloat,
              "fastad::kcenter_greedy: features must be a float32 (N, d) tensor");
  TORCH_CHECK(starts.dim() == 1 && starts.scalar_type() == at::kLong && starts.numel() > 0,
              "fastad::kcenter_greedy: starts must be a non-empty int64 vector");
  const int64_t n = features.size(0), d = features.size(1);
  TORCH_CHECK(k >= 1 && k <= n, "fastad::kcenter_greedy: k=", k, " must be in [1, N=", n, "]");
  TORCH_CHECK(d <= kMaxSharedDim, "fastad::kcenter_greedy: CUDA kernel supports d <= ", kMaxSharedDim, ", got ", d);
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor xt = features.t().contiguous();  // d x N: coalesced loads per dimension
  const at::Tensor st = starts.to(features.device()).contiguous();
  int blocks = 0;
  check(cuda::kcenter_grid_size(n, static_cast<int>(d), features.get_device(), &blocks), "kcenter_greedy");
  auto opts = features.options();
  at::Tensor dist = at::empty({n}, opts.dtype(at::kDouble));
  at::Tensor part_v = at::empty({2 * blocks}, opts.dtype(at::kDouble));
  at::Tensor part_i = at::empty({2 * blocks}, opts.dtype(at::kLong));
  at::Tensor out = at::empty({k}, opts.dtype(at::kLong));
  check(cuda::kcenter_greedy_launch(xt.data_ptr<float>(), n, static_cast<int>(d),
                                    reinterpret_cast<const long long*>(st.data_ptr<int64_t>()),
                                    static_cast<int>(st.numel()), k, dist.data_ptr<double>(),
                                    part_v.data_ptr<double>(), reinterpret_cast<long long*>(part_i.data_ptr<int64_t>()),
                                    reinterpret_cast<long long*>(out.data_ptr<int64_t>()), blocks,
                                    c10::cuda::getCurrentCUDAStream().stream()),
        "kcenter_greedy");
  return out;
}

std::tuple<at::Tensor, at::Tensor> nearest_reference_cuda(const at::Tensor& x, const at::Tensor& bank,
                                                          int64_t metric, int64_t window) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && bank.scalar_type() == at::kFloat,
              "fastad::nearest_reference: inputs must be float32");
  TORCH_CHECK(metric == 0 || metric == 1, "fastad::nearest_reference: metric must be 0 (l2) or 1 (cosine)");
  TORCH_CHECK(x.numel() > 0 && bank.numel() > 0, "fastad::nearest_reference: empty input");
  int H = 0, W = 0, K = 0;
  if (window > 0) {
    TORCH_CHECK(x.dim() == 4 && bank.dim() == 4 && x.size(1) == bank.size(1) && x.size(2) == bank.size(2) &&
                    x.size(3) == bank.size(3) && window % 2 == 1,
                "fastad::nearest_reference: windowed search needs x (B,H,W,C), bank (K,H,W,C), odd window");
    H = static_cast<int>(x.size(1));
    W = static_cast<int>(x.size(2));
    K = static_cast<int>(bank.size(0));
  } else {
    TORCH_CHECK(x.dim() == 2 && bank.dim() == 2 && x.size(1) == bank.size(1),
                "fastad::nearest_reference: global search needs x (N,C) and bank (M,C)");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t c = x.size(-1);
  const at::Tensor xf = x.reshape({-1, c}).contiguous(), bf = bank.reshape({-1, c}).contiguous();
  at::Tensor xn, bn;
  if (metric == 1) {
    xn = xf.to(at::kDouble).norm(2, 1).contiguous();
    bn = bf.to(at::kDouble).norm(2, 1).contiguous();
  }
  const int64_t nq = xf.size(0);
  at::Tensor values = at::empty({nq}, x.options().dtype(at::kDouble));
  at::Tensor indices = at::empty({nq}, x.options().dtype(at::kLong));
  check(cuda::nearest_reference_launch(xf.data_ptr<float>(), bf.data_ptr<float>(), nq, bf.size(0),
                                       static_cast<int>(c), static_cast<int>(metric), static_cast<int>(window), H, W,
                                       K, metric == 1 ? xn.data_ptr<double>() : nullptr,
                                       metric == 1 ? bn.data_ptr<double>() : nullptr, values.data_ptr<double>(),
                                       reinterpret_cast<long long*>(indices.data_ptr<int64_t>()),
                                       c10::cuda::getCurrentCUDAStream().stream()),
        "nearest_reference");
  return {values, indices};
}

}  // namespace
}  // namespace fastad

TORCH_LIBRARY_IMPL(fastad, CUDA, m) {
  m.impl("kcenter_greedy", &fastad::kcenter_greedy_cuda);
  m.impl("nearest_reference", &fastad::nearest_reference_cuda);
}
