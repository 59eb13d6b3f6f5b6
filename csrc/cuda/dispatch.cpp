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
int kcenter_step_blocks(long long n);
cudaError_t kcenter_init_launch(const float* x, long long n, int d, const float* sv, int s, double* dist,
                                cudaStream_t stream);
cudaError_t kcenter_step_launch(const float* x, long long n, int d, const float* center, long long owned, double* dist,
                                double* part_v, long long* part_i, double* out, cudaStream_t stream);
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

// Per-step entry points (distributed selection): the same checks and returns as the CPU ops in
// csrc/coreset_cpu.cpp; no triangle pruning on the GPU (assign and prune are accepted and unused).
at::Tensor kcenter_init_cuda(const at::Tensor& features, const at::Tensor& start_vectors) {
  TORCH_CHECK(features.dim() == 2 && features.scalar_type() == at::kFloat && features.is_contiguous(),
              "fastad::kcenter_init: features must be a contiguous float32 (N, d) tensor");
  const int64_t n = features.size(0), d = features.size(1);
  TORCH_CHECK(start_vectors.dim() == 2 && start_vectors.scalar_type() == at::kFloat && start_vectors.size(0) > 0 &&
                  start_vectors.size(1) == d,
              "fastad::kcenter_init: start_vectors must be a float32 (S, d) tensor with S >= 1 and d=", d);
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor sv = start_vectors.to(features.device()).contiguous();
  at::Tensor dist = at::empty({n}, features.options().dtype(at::kDouble));
  if (n > 0)
    check(cuda::kcenter_init_launch(features.data_ptr<float>(), n, static_cast<int>(d), sv.data_ptr<float>(),
                                    static_cast<int>(sv.size(0)), dist.data_ptr<double>(),
                                    c10::cuda::getCurrentCUDAStream().stream()),
          "kcenter_init");
  return dist;
}

at::Tensor kcenter_step_cuda(const at::Tensor& features, at::Tensor dist, at::Tensor assign, const at::Tensor& centers,
                             int64_t t, int64_t owned, bool prune) {
  (void)assign;
  (void)prune;
  TORCH_CHECK(features.dim() == 2 && features.scalar_type() == at::kFloat && features.is_contiguous(),
              "fastad::kcenter_step: features must be a contiguous float32 (N, d) tensor");
  const int64_t n = features.size(0), d = features.size(1);
  TORCH_CHECK(d <= kMaxSharedDim, "fastad::kcenter_step: CUDA kernel supports d <= ", kMaxSharedDim, ", got ", d);
  TORCH_CHECK(dist.dim() == 1 && dist.size(0) == n && dist.scalar_type() == at::kDouble && dist.is_contiguous() &&
                  dist.device() == features.device(),
              "fastad::kcenter_step: dist must be a contiguous float64 (N,) tensor on the features' device");
  TORCH_CHECK(centers.dim() == 2 && centers.size(1) == d && centers.scalar_type() == at::kFloat &&
                  centers.is_contiguous() && t >= 0 && t < centers.size(0) && centers.device() == features.device(),
              "fastad::kcenter_step: centers must be a contiguous float32 (K, d) tensor with row t=", t,
              " on the features' device");
  TORCH_CHECK(owned >= -1 && owned < n, "fastad::kcenter_step: owned=", owned, " must be -1 or a row < ", n);
  const c10::cuda::CUDAGuard guard(features.device());
  auto opts = features.options();
  const int blocks = cuda::kcenter_step_blocks(n);
  at::Tensor part_v = at::empty({blocks}, opts.dtype(at::kDouble));
  at::Tensor part_i = at::empty({blocks}, opts.dtype(at::kLong));
  at::Tensor out = at::empty({3}, opts.dtype(at::kDouble));
  check(cuda::kcenter_step_launch(features.data_ptr<float>(), n, static_cast<int>(d), centers.data_ptr<float>() + t * d,
                                  owned, dist.data_ptr<double>(), part_v.data_ptr<double>(),
                                  reinterpret_cast<long long*>(part_i.data_ptr<int64_t>()), out.data_ptr<double>(),
                                  c10::cuda::getCurrentCUDAStream().stream()),
        "kcenter_step");
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
  m.impl("kcenter_init", &fastad::kcenter_init_cuda);
  m.impl("kcenter_step", &fastad::kcenter_step_cuda);
  m.impl("nearest_reference", &fastad::nearest_reference_cuda);
}
