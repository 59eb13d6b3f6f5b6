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

// Mean distance of points [begin, end) to the S start vectors sv (S x d).
FASTAD_CLONES
void init_range(const float* x, int64_t d, const float* sv, int64_t s, double* dist, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    double acc = 0.0;
    for (int64_t j = 0; j < s; ++j) acc += std::sqrt(squared_l2(x + i * d, sv + j * d, d));
    dist[i] = acc / static_cast<double>(s);
  }
}

// Distances of the first t centers (rows of cv, t x d) to the new center c.
FASTAD_CLONES
void center_range(const float* cv, int64_t d, const float* c, double* out, int64_t begin, int64_t end) {
  for (int64_t a = begin; a < end; ++a) out[a] = std::sqrt(squared_l2(cv + a * d, c, d));
}

// Updates points [begin, end) against center c (the t-th); returns their argmax.
FASTAD_CLONES
Best update_range(const float* x, int64_t d, const float* xc, int32_t t, double* dist, int32_t* assign,
                  const double* center_dist, int64_t begin, int64_t end, int64_t* pruned) {
  Best best;
  int64_t skipped = 0;
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

Best parallel_argmax_update(const float* x, int64_t n, int64_t d, const float* xc, int32_t t, double* dist,
                            int32_t* assign, const double* center_dist, int64_t* pruned) {
  const int64_t chunks = (n + kGrain - 1) / kGrain;
  std::vector<Best> partial(chunks);
  std::vector<int64_t> skipped(chunks, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t ch = b; ch < e; ++ch) {
      const int64_t lo = ch * kGrain, hi = std::min(n, lo + kGrain);
      partial[ch] = update_range(x, d, xc, t, dist, assign, center_dist, lo, hi, &skipped[ch]);
    }
  });
  Best best;
  for (int64_t ch = 0; ch < chunks; ++ch) {
    best.merge(partial[ch]);
    *pruned += skipped[ch];
  }
  return best;
}


// One selection step over the points of x: center number t (the row t of cv, t x d rows before it)
// is marked selected if it is point `owned` (-1: another shard's), the distances are lowered, and
// the new argmax is returned. `use_prune` enables the triangle test. Shared by the one-call loop
// below and the per-step op of distributed selections.
Best select_step(const float* x, int64_t n, int64_t d, const float* cv, int64_t t, int64_t owned, double* dist,
                 int32_t* assign, std::vector<double>& center_dist, bool use_prune, int64_t* pruned) {
  const float* xc = cv + t * d;
  if (owned >= 0) {
    dist[owned] = -1.0;
    assign[owned] = static_cast<int32_t>(t);
  }
  if (use_prune) {
    if (static_cast<int64_t>(center_dist.size()) < t) center_dist.resize(t);
    at::parallel_for(0, t, kGrain, [&](int64_t b, int64_t e) { center_range(cv, d, xc, center_dist.data(), b, e); });
  }
  return parallel_argmax_update(x, n, d, xc, static_cast<int32_t>(t), dist, assign,
                                use_prune ? center_dist.data() : nullptr, pruned);
}

Best init_distances(const float* x, int64_t n, int64_t d, const float* sv, int64_t s, double* dist) {
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) { init_range(x, d, sv, s, dist, b, e); });
  Best best;
  for (int64_t i = 0; i < n; ++i) best.take(dist[i], i);
  return best;
}

// Pruning is probed every kProbe steps and kept while it skips >= 25% of the points (the
// distributed loop in fastad/ops/coreset.py applies the same rule per shard).
constexpr int64_t kProbe = 64;

void check_features(const at::Tensor& features, const char* op) {
  TORCH_CHECK(features.dim() == 2 && features.scalar_type() == at::kFloat && features.is_contiguous(),
              "fastad::", op, ": features must be a contiguous float32 (N, d) tensor");
}

}  // namespace

// features: (N, d) float32 contiguous; starts: (S,) int64; returns (k,) int64.
at::Tensor kcenter_greedy_cpu(const at::Tensor& features, const at::Tensor& starts, int64_t k) {
  check_features(features, "kcenter_greedy");
  TORCH_CHECK(starts.dim() == 1 && starts.scalar_type() == at::kLong && starts.numel() > 0,
              "fastad::kcenter_greedy: starts must be a non-empty int64 vector");
  const int64_t n = features.size(0), d = features.size(1), s = starts.numel();
  TORCH_CHECK(k >= 1 && k <= n, "fastad::kcenter_greedy: k=", k, " must be in [1, N=", n, "]");
  const at::Tensor st = starts.contiguous();
  const int64_t* sp = st.data_ptr<int64_t>();
  for (int64_t j = 0; j < s; ++j)
    TORCH_CHECK(sp[j] >= 0 && sp[j] < n, "fastad::kcenter_greedy: start index ", sp[j], " out of range");

  const float* x = features.data_ptr<float>();
  std::vector<float> sv(s * d), cv(k * d);  // start vectors; selected centers, in order
  for (int64_t j = 0; j < s; ++j) std::copy(x + sp[j] * d, x + (sp[j] + 1) * d, sv.begin() + j * d);
  std::vector<double> dist(n), center_dist;
  std::vector<int32_t> assign(n, -1);
  at::Tensor out = at::empty({k}, features.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();

  Best best = init_distances(x, n, d, sv.data(), s, dist.data());
  bool prune = false;
  for (int64_t t = 0; t < k; ++t) {
    const int64_t c = best.index;
    op[t] = c;
    std::copy(x + c * d, x + (c + 1) * d, cv.begin() + t * d);
    const bool use = prune || (t % kProbe == 0 && t > 0);
    int64_t pruned = 0;
    best = select_step(x, n, d, cv.data(), t, c, dist.data(), assign.data(), center_dist, use, &pruned);
    if (use) prune = pruned * 4 >= n;
  }
  return out;
}

// Per-step entry points (distributed selection over row shards; see fastad/ops/coreset.py).
// features (n, d) float32 (n may be 0), start_vectors (S, d) float32 -> (n,) float64 initial distances.
at::Tensor kcenter_init_cpu(const at::Tensor& features, const at::Tensor& start_vectors) {
  check_features(features, "kcenter_init");
  const int64_t n = features.size(0), d = features.size(1);
  TORCH_CHECK(start_vectors.dim() == 2 && start_vectors.scalar_type() == at::kFloat && start_vectors.size(0) > 0 &&
                  start_vectors.size(1) == d,
              "fastad::kcenter_init: start_vectors must be a float32 (S, d) tensor with S >= 1 and d=", d);
  const at::Tensor sv = start_vectors.contiguous();
  at::Tensor dist = at::empty({n}, features.options().dtype(at::kDouble));
  init_distances(features.data_ptr<float>(), n, d, sv.data_ptr<float>(), sv.size(0), dist.data_ptr<double>());
  return dist;
}

// One step: centers (>= t+1, d) float32 holds the selected centers in order, row t the new one;
// owned: its row in this shard or -1. Updates dist (n,) float64 and assign (n,) int32 (the
// center each point is closest to, -1 at first) in place and returns float64 (3,):
// (best distance, its row or -1 for an empty shard, points skipped by the triangle test).
at::Tensor kcenter_step_cpu(const at::Tensor& features, at::Tensor dist, at::Tensor assign, const at::Tensor& centers,
                            int64_t t, int64_t owned, bool prune) {
  check_features(features, "kcenter_step");
  const int64_t n = features.size(0), d = features.size(1);
  TORCH_CHECK(dist.dim() == 1 && dist.size(0) == n && dist.scalar_type() == at::kDouble && dist.is_contiguous(),
              "fastad::kcenter_step: dist must be a contiguous float64 (N,) tensor");
  TORCH_CHECK(assign.dim() == 1 && assign.size(0) == n && assign.scalar_type() == at::kInt && assign.is_contiguous(),
              "fastad::kcenter_step: assign must be a contiguous int32 (N,) tensor");
  TORCH_CHECK(centers.dim() == 2 && centers.size(1) == d && centers.scalar_type() == at::kFloat &&
                  centers.is_contiguous() && t >= 0 && t < centers.size(0),
              "fastad::kcenter_step: centers must be a contiguous float32 (K, d) tensor with row t=", t);
  TORCH_CHECK(owned >= -1 && owned < n, "fastad::kcenter_step: owned=", owned, " must be -1 or a row < ", n);
  std::vector<double> center_dist;
  int64_t pruned = 0;
  const Best best = select_step(features.data_ptr<float>(), n, d, centers.data_ptr<float>(), t, owned,
                                dist.data_ptr<double>(), assign.data_ptr<int32_t>(), center_dist, prune, &pruned);
  at::Tensor out = at::empty({3}, features.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  o[0] = best.value;
  o[1] = static_cast<double>(best.index);
  o[2] = static_cast<double>(pruned);
  return out;
}

}  // namespace fastad
