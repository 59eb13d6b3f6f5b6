// Greedy k-center coreset (PatchCore's approximate sampler) on the CPU.
//
// Same selection as fastad.ops.coreset.greedy_coreset_reference: the initial
// distance of a point is its mean distance to the start points, then k times:
// pick the argmax (lowest index on ties), mark it selected (-1), and lower every
// point's distance to its distance to the new center.
//
// Speed-up that keeps the result exact: every point remembers the center it is
// closest to (a). By the triangle inequality d(i, c) >= d(a, c) - d(i, a), so a
// point with d(a, c) >= 2 d(i, a) cannot get closer to the new center c and is
// skipped without reading its features. On real (low intrinsic dimension)
// features most points are skipped late in the run; where pruning stops paying
// (random high-dimensional data) it is switched off and probed again later.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "simd_distance.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTAD_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define FASTAD_CLONES
#endif

namespace fastad {
namespace {

struct Best {
  double value = -std::numeric_limits<double>::infinity();
  int64_t index = -1;
  void take(double v, int64_t i) {  // strict '>' over ascending i: lowest index wins ties
    if (v > value) {
      value = v;
      index = i;
    }
  }
  void merge(const Best& o) {
    if (o.value > value || (o.value == value && o.index >= 0 && (index < 0 || o.index < index))) {
      value = o.value;
      index = o.index;
    }
  }
};

constexpr int64_t kGrain = 2048;
constexpr double kPruneSlack = 1.0 + 1e-9;  // margin for rounding in the triangle test

FASTAD_CLONES
void init_range(const float* x, int64_t d, const int64_t* starts, int64_t s, double* dist,
                int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    double acc = 0.0;
    for (int64_t j = 0; j < s; ++j) acc += std::sqrt(squared_l2(x + i * d, x + starts[j] * d, d));
    dist[i] = acc / static_cast<double>(s);
  }
}

FASTAD_CLONES
void center_range(const float* x, int64_t d, const int64_t* centers, int64_t c, double* out,
                  int64_t begin, int64_t end) {
  for (int64_t a = begin; a < end; ++a) out[a] = std::sqrt(squared_l2(x + centers[a] * d, x + c * d, d));
}

// Updates points [begin, end) against center c (the t-th); returns their argmax.
FASTAD_CLONES
Best update_range(const float* x, int64_t d, int64_t c, int32_t t, double* dist, int32_t* assign,
                  const double* center_dist, int64_t begin, int64_t end, int64_t* pruned) {
  Best best;
  int64_t skipped = 0;
  const float* xc = x + c * d;
  for (int64_t i = begin; i < end; ++i) {
    double md = dist[i];
    if (md > 0.0) {  // selected points hold -1, covered duplicates 0: neither can decrease
      const int32_t a = assign[i];
      if (center_dist != nullptr && a >= 0 && center_dist[a] >= 2.0 * md * kPruneSlack) {
        ++skipped;
      } else {
        const double v = std::sqrt(squared_l2(x + i * d, xc, d));
        if (v < md) {
          md = v;
          dist[i] = v;
          assign[i] = t;
        }
      }
    }
    best.take(md, i);
  }
  *pruned += skipped;
  return best;
}

Best parallel_argmax_update(const float* x, int64_t n, int64_t d, int64_t c, int32_t t, double* dist,
                            int32_t* assign, const double* center_dist, int64_t* pruned) {
  const int64_t chunks = (n + kGrain - 1) / kGrain;
  std::vector<Best> partial(chunks);
  std::vector<int64_t> skipped(chunks, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t ch = b; ch < e; ++ch) {
      const int64_t lo = ch * kGrain, hi = std::min(n, lo + kGrain);
      partial[ch] = update_range(x, d, c, t, dist, assign, center_dist, lo, hi, &skipped[ch]);
    }
  });
  Best best;
  for (int64_t ch = 0; ch < chunks; ++ch) {
    best.merge(partial[ch]);
    *pruned += skipped[ch];
  }
  return best;
}

}  // namespace

// features: (N, d) float32 contiguous; starts: (S,) int64; returns (k,) int64.
at::Tensor kcenter_greedy_cpu(const at::Tensor& features, const at::Tensor& starts, int64_t k) {
  TORCH_CHECK(features.dim() == 2 && features.scalar_type() == at::kFloat && features.is_contiguous(),
              "fastad::kcenter_greedy: features must be a contiguous float32 (N, d) tensor");
  TORCH_CHECK(starts.dim() == 1 && starts.scalar_type() == at::kLong && starts.numel() > 0,
              "fastad::kcenter_greedy: starts must be a non-empty int64 vector");
  const int64_t n = features.size(0), d = features.size(1), s = starts.numel();
  TORCH_CHECK(k >= 1 && k <= n, "fastad::kcenter_greedy: k=", k, " must be in [1, N=", n, "]");
  const at::Tensor st = starts.contiguous();
  const int64_t* sp = st.data_ptr<int64_t>();
  for (int64_t j = 0; j < s; ++j)
    TORCH_CHECK(sp[j] >= 0 && sp[j] < n, "fastad::kcenter_greedy: start index ", sp[j], " out of range");

  const float* x = features.data_ptr<float>();
  std::vector<double> dist(n);
  std::vector<int32_t> assign(n, -1);
  std::vector<int64_t> centers;
  centers.reserve(k);
  std::vector<double> center_dist(k);
  at::Tensor out = at::empty({k}, features.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();

  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) { init_range(x, d, sp, s, dist.data(), b, e); });
  Best best;
  for (int64_t i = 0; i < n; ++i) best.take(dist[i], i);

  // Pruning is probed every kProbe iterations and kept while it skips >= 25% of the points.
  constexpr int64_t kProbe = 64;
  bool prune = false;
  for (int64_t t = 0; t < k; ++t) {
    const int64_t c = best.index;
    op[t] = c;
    dist[c] = -1.0;
    assign[c] = static_cast<int32_t>(t);
    const bool use = prune || (t % kProbe == 0 && t > 0);
    if (use) {
      at::parallel_for(0, t, kGrain, [&](int64_t b, int64_t e) {
        center_range(x, d, centers.data(), c, center_dist.data(), b, e);
      });
    }
    centers.push_back(c);
    int64_t pruned = 0;
    best = parallel_argmax_update(x, n, d, c, static_cast<int32_t>(t), dist.data(), assign.data(),
                                  use ? center_dist.data() : nullptr, &pruned);
    if (use) prune = pruned * 4 >= n;
  }
  return out;
}

}  // namespace fastad
