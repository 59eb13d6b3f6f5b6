// Schema of the fastad ops and their CPU kernels. CUDA kernels register in
// csrc/cuda/dispatch.cpp; fake (meta) kernels for torch.compile in fastad/ops/_fake.py.
#include <torch/extension.h>

#include <tuple>

namespace fastad {
at::Tensor kcenter_greedy_cpu(const at::Tensor& features, const at::Tensor& starts, int64_t k);
std::tuple<at::Tensor, at::Tensor> kcenter_greedy_stats_cpu(const at::Tensor& features, const at::Tensor& starts,
                                                            int64_t k);
at::Tensor kcenter_init_cpu(const at::Tensor& features, const at::Tensor& start_vectors);
at::Tensor kcenter_step_cpu(const at::Tensor& features, at::Tensor dist, at::Tensor assign, const at::Tensor& centers,
                            int64_t t, int64_t owned, bool prune);
std::tuple<at::Tensor, at::Tensor> nearest_reference_cpu(const at::Tensor& x, const at::Tensor& bank,
                                                         int64_t metric, int64_t window);
std::tuple<at::Tensor, at::Tensor> knn_rescore_cpu(const at::Tensor& score, const at::Tensor& slack, const at::Tensor& x,
                                                   const at::Tensor& y, int64_t k);
}  // namespace fastad

TORCH_LIBRARY(fastad, m) {
  m.def("kcenter_greedy(Tensor features, Tensor starts, int k) -> Tensor");
  // the same selection, and per step the points whose features it did not read (benchmarks; CPU)
  m.def("kcenter_greedy_stats(Tensor features, Tensor starts, int k) -> (Tensor, Tensor)");
  // per-step entry points of the same selection, for selections over row shards (fastad.distributed)
  m.def("kcenter_init(Tensor features, Tensor start_vectors) -> Tensor");
  m.def("kcenter_step(Tensor features, Tensor(a!) dist, Tensor(b!) assign, Tensor centers, int t, int owned, "
        "bool prune) -> Tensor");
  m.def("nearest_reference(Tensor x, Tensor bank, int metric, int window) -> (Tensor, Tensor)");
  // FeatureBank's exact k nearest among the candidates of an approximate score (CPU)
  m.def("knn_rescore(Tensor score, Tensor slack, Tensor x, Tensor y, int k) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastad, CPU, m) {
  m.impl("kcenter_greedy", &fastad::kcenter_greedy_cpu);
  m.impl("kcenter_greedy_stats", &fastad::kcenter_greedy_stats_cpu);
  m.impl("kcenter_init", &fastad::kcenter_init_cpu);
  m.impl("kcenter_step", &fastad::kcenter_step_cpu);
  m.impl("nearest_reference", &fastad::nearest_reference_cpu);
  m.impl("knn_rescore", &fastad::knn_rescore_cpu);
}

// Importing fastad._C runs the registrations above; the module itself is empty.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.attr("cuda_compiled") =
#ifdef FASTAD_WITH_CUDA
      true;
#else
      false;
#endif
}
