// Nearest-reference matching on the CPU without an N x M distance matrix.
//
// Global search: a float32 GEMM over (query block x bank block) gives approximate
// scores with a rigorous rounding bound; only the bank items whose bound overlaps
// the running best are re-scored exactly in float64. The running bound only
// tightens, so an item skipped earlier can never be the exact optimum. Result:
// BLAS speed with exactly the float64 answer (lowest index on ties).
//
// Windowed search (FOD's "nearest features"): each query only sees the p x p
// neighbourhood of its position in every reference image, scored exactly in float64.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "simd_distance.h"

namespace fastad {
namespace {

constexpr int64_t kQueryBlock = 256;
constexpr int64_t kBankBlock = 2048;
constexpr double kUnitRoundoff = 5.960464477539063e-08;  // 2^-24, float32

enum Metric : int64_t { kL2 = 0, kCosine = 1 };

std::vector<double> row_norms(const float* x, int64_t n, int64_t c) {
  std::vector<double> out(n);
  at::parallel_for(0, n, 1024, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) out[i] = std::sqrt(dot(x + i * c, x + i * c, c));
  });
  return out;
}

// Exact score: squared distance (smaller is better) or cosine (larger is better).
inline double exact_score(const float* q, const float* b, int64_t c, int64_t metric, double qn, double bn) {
  if (metric == kL2) return squared_l2(q, b, c);
  return dot(q, b, c) / (safe_norm(qn) * safe_norm(bn));
}

struct Running {
  double bound;  // best guaranteed score among the approximations seen so far
  double value;  // best exact score
  int64_t index;
};

std::tuple<at::Tensor, at::Tensor> global_search(const at::Tensor& x, const at::Tensor& bank, int64_t metric) {
  const int64_t n = x.size(0), m = bank.size(0), c = x.size(1);
  const float* xp = x.data_ptr<float>();
  const float* bp = bank.data_ptr<float>();
  const std::vector<double> xn = row_norms(xp, n, c), bn = row_norms(bp, m, c);
  const bool l2 = metric == kL2;
  // |fl(a.b) - a.b| <= gamma_c |a||b| for any summation order; 4x safety margin.
  const double gamma = 4.0 * static_cast<double>(c + 8) * kUnitRoundoff;

  // Approximations are computed on float32 copies: unit rows for cosine.
  at::Tensor xa = l2 ? x : x / x.norm(2, 1, true).clamp_min(kNormEps);
  at::Tensor ba = l2 ? bank : bank / bank.norm(2, 1, true).clamp_min(kNormEps);
  at::Tensor bsq = l2 ? (bank * bank).sum(1) : at::Tensor();

  at::Tensor values = at::empty({n}, x.options().dtype(at::kDouble));
  at::Tensor indices = at::empty({n}, x.options().dtype(at::kLong));
  double* vp = values.data_ptr<double>();
  int64_t* ip = indices.data_ptr<int64_t>();
  const double inf = std::numeric_limits<double>::infinity();

  for (int64_t q0 = 0; q0 < n; q0 += kQueryBlock) {
    const int64_t qn = std::min(kQueryBlock, n - q0);
    at::Tensor xq = xa.narrow(0, q0, qn);
    at::Tensor xsq = l2 ? (xq * xq).sum(1, true) : at::Tensor();
    std::vector<Running> run(qn, Running{l2 ? inf : -inf, l2 ? inf : -inf, -1});
    for (int64_t b0 = 0; b0 < m; b0 += kBankBlock) {
      const int64_t bm = std::min(kBankBlock, m - b0);
      at::Tensor bb = ba.narrow(0, b0, bm);
      // approx[i, j] = |x|^2 + |b|^2 - 2 x.b (l2) or x^.b^ (cosine), float32
      at::Tensor approx = l2 ? at::addmm(bsq.narrow(0, b0, bm).unsqueeze(0), xq, bb.t(), 1.0, -2.0).add_(xsq)
                             : at::mm(xq, bb.t());
      approx = approx.contiguous();
      const float* ap = approx.data_ptr<float>();
      at::parallel_for(0, qn, 8, [&](int64_t rb, int64_t re) {
        for (int64_t r = rb; r < re; ++r) {
          const int64_t qi = q0 + r;
          const float* row = ap + r * bm;
          const float* q = xp + qi * c;
          Running& st = run[r];
          if (l2) {
            for (int64_t j = 0; j < bm; ++j) {
              const double s = xn[qi] + bn[b0 + j];
              const double upper = static_cast<double>(row[j]) + gamma * s * s;
              if (upper < st.bound) st.bound = upper;
            }
            for (int64_t j = 0; j < bm; ++j) {
              const double s = xn[qi] + bn[b0 + j];
              if (static_cast<double>(row[j]) - gamma * s * s > st.bound) continue;
              const double v = squared_l2(q, bp + (b0 + j) * c, c);
              if (v < st.value) {
                st.value = v;
                st.index = b0 + j;
              }
            }
          } else {
            for (int64_t j = 0; j < bm; ++j) {
              const double lower = static_cast<double>(row[j]) - gamma;
              if (lower > st.bound) st.bound = lower;
            }
            for (int64_t j = 0; j < bm; ++j) {
              if (static_cast<double>(row[j]) + gamma < st.bound) continue;
              const double v = exact_score(q, bp + (b0 + j) * c, c, metric, xn[qi], bn[b0 + j]);
              if (v > st.value) {
                st.value = v;
                st.index = b0 + j;
              }
            }
          }
        }
      });
    }
    for (int64_t r = 0; r < qn; ++r) {
      vp[q0 + r] = l2 ? std::sqrt(run[r].value) : run[r].value;
      ip[q0 + r] = run[r].index;
    }
  }
  return {values, indices};
}

// x: (B, H, W, C), bank: (K, H, W, C); index = flat row of bank.view(K*H*W, C).
std::tuple<at::Tensor, at::Tensor> window_search(const at::Tensor& x, const at::Tensor& bank, int64_t metric,
                                                 int64_t window) {
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3), K = bank.size(0);
  const int64_t r = window / 2;
  const float* xp = x.data_ptr<float>();
  const float* bp = bank.data_ptr<float>();
  const bool l2 = metric == kL2;
  std::vector<double> bn, xn;
  if (!l2) {
    bn = row_norms(bp, K * H * W, C);
    xn = row_norms(xp, B * H * W, C);
  }
  at::Tensor values = at::empty({B * H * W}, x.options().dtype(at::kDouble));
  at::Tensor indices = at::empty({B * H * W}, x.options().dtype(at::kLong));
  double* vp = values.data_ptr<double>();
  int64_t* ip = indices.data_ptr<int64_t>();
  at::parallel_for(0, B * H * W, 16, [&](int64_t qb, int64_t qe) {
    for (int64_t qi = qb; qi < qe; ++qi) {
      const int64_t h = (qi / W) % H, w = qi % W;
      const float* q = xp + qi * C;
      double best = l2 ? std::numeric_limits<double>::infinity() : -std::numeric_limits<double>::infinity();
      int64_t arg = -1;
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t hh = std::max<int64_t>(0, h - r); hh <= std::min(H - 1, h + r); ++hh) {
          for (int64_t ww = std::max<int64_t>(0, w - r); ww <= std::min(W - 1, w + r); ++ww) {
            const int64_t j = (k * H + hh) * W + ww;
            const double v = exact_score(q, bp + j * C, C, metric, l2 ? 0.0 : xn[qi], l2 ? 0.0 : bn[j]);
            if (l2 ? v < best : v > best) {
              best = v;
              arg = j;
            }
          }
        }
      }
      vp[qi] = l2 ? std::sqrt(best) : best;
      ip[qi] = arg;
    }
  });
  return {values, indices};
}

}  // namespace

// Global: x (N, C), bank (M, C). Windowed (window > 0): x (B, H, W, C), bank (K, H, W, C).
// float32 contiguous inputs; returns (float64 values, int64 indices) of length N.
std::tuple<at::Tensor, at::Tensor> nearest_reference_cpu(const at::Tensor& x, const at::Tensor& bank,
                                                         int64_t metric, int64_t window) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && bank.scalar_type() == at::kFloat && x.is_contiguous() &&
                  bank.is_contiguous(),
              "fastad::nearest_reference: inputs must be contiguous float32");
  TORCH_CHECK(metric == kL2 || metric == kCosine, "fastad::nearest_reference: metric must be 0 (l2) or 1 (cosine)");
  TORCH_CHECK(x.numel() > 0 && bank.numel() > 0, "fastad::nearest_reference: empty input");
  if (window > 0) {
    TORCH_CHECK(x.dim() == 4 && bank.dim() == 4 && x.size(1) == bank.size(1) && x.size(2) == bank.size(2) &&
                    x.size(3) == bank.size(3),
                "fastad::nearest_reference: windowed search needs x (B,H,W,C) and bank (K,H,W,C)");
    TORCH_CHECK(window % 2 == 1, "fastad::nearest_reference: window must be odd");
    return window_search(x, bank, metric, window);
  }
  TORCH_CHECK(x.dim() == 2 && bank.dim() == 2 && x.size(1) == bank.size(1),
              "fastad::nearest_reference: global search needs x (N,C) and bank (M,C)");
  return global_search(x, bank, metric);
}

namespace {

// Exact value of a score element: bfloat16 widened by its bits (inlined; c10's conversion is a call).
template <typename S>
struct Score {
  using V = S;
  static FASTAD_INLINE V at(const S* p, int64_t j) { return p[j]; }
};
template <>
struct Score<c10::BFloat16> {
  using V = float;
  static FASTAD_INLINE float at(const c10::BFloat16* p, int64_t j) {
    uint16_t h;
    std::memcpy(&h, p + j, 2);
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

// One query row of knn_rescore: the candidates are the columns whose approximate score is at least the
// k-th largest minus the slack; each is re-scored exactly, and the k smallest (distance, column) kept.
// False (the row left unwritten) when fewer than k columns qualify: a NaN score or slack.
template <typename S>
FASTAD_CLONES bool rescore_row(const S* score, double slack, const float* xq, const float* y, int64_t m, int64_t c,
                               int64_t k, double* out_d, int64_t* out_i, std::vector<double>& top,
                               std::vector<std::pair<double, int64_t>>& cand) {
  using V = typename Score<S>::V;
  constexpr V kLow = -std::numeric_limits<V>::infinity();
  double kth;
  if (k == 1) {  // the row maximum, in 8 independent lanes (vectorised: a > b ? a : b is maxps)
    V lane[8] = {kLow, kLow, kLow, kLow, kLow, kLow, kLow, kLow};
    int64_t j = 0;
    for (; j + 8 <= m; j += 8) {
      for (int l = 0; l < 8; ++l) {
        const V v = Score<S>::at(score, j + l);
        lane[l] = v > lane[l] ? v : lane[l];
      }
    }
    for (; j < m; ++j) lane[0] = std::max(lane[0], Score<S>::at(score, j));
    kth = *std::max_element(lane, lane + 8);
  } else {
    top.assign(k, -std::numeric_limits<double>::infinity());  // the k largest scores, ascending
    for (int64_t j = 0; j < m; ++j) {
      const double v = Score<S>::at(score, j);
      if (v > top[0]) {
        int64_t t = 1;
        for (; t < k && top[t] < v; ++t) top[t - 1] = top[t];
        top[t - 1] = v;
      }
    }
    kth = top[0];
  }
  const double threshold = kth - slack;
  V coarse = static_cast<V>(threshold);  // rounded down: a V >= coarse test passes every candidate
  if (static_cast<double>(coarse) > threshold) coarse = std::nextafter(coarse, kLow);
  cand.clear();
  for (int64_t j = 0; j < m; ++j) {
    const V v = Score<S>::at(score, j);
    if (v >= coarse && static_cast<double>(v) >= threshold) cand.emplace_back(squared_l2(xq, y + j * c, c), j);
  }
  if (static_cast<int64_t>(cand.size()) < k) return false;
  std::partial_sort(cand.begin(), cand.begin() + k, cand.end());  // (distance, column): lower column on ties
  for (int64_t t = 0; t < k; ++t) {
    out_d[t] = cand[t].first;
    out_i[t] = cand[t].second;
  }
  return true;
}

}  // namespace

// score (Q, M) float32/bfloat16/float64 (larger = nearer), slack (Q,) float64, x (Q, C) and y (M, C) float32,
// all contiguous -> (Q, k) float64 exact squared distances and (Q, k) int64 columns, ascending.
std::tuple<at::Tensor, at::Tensor> knn_rescore_cpu(const at::Tensor& score, const at::Tensor& slack, const at::Tensor& x,
                                                   const at::Tensor& y, int64_t k) {
  TORCH_CHECK(score.dim() == 2 && score.is_contiguous() &&
                  (score.scalar_type() == at::kFloat || score.scalar_type() == at::kBFloat16 ||
                   score.scalar_type() == at::kDouble),
              "fastad::knn_rescore: score must be a contiguous (Q, M) float32, bfloat16 or float64 tensor");
  const int64_t q = score.size(0), m = score.size(1);
  TORCH_CHECK(x.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat && x.is_contiguous() && y.is_contiguous() &&
                  x.dim() == 2 && y.dim() == 2 && x.size(0) == q && y.size(0) == m && x.size(1) == y.size(1),
              "fastad::knn_rescore: x (Q, C) and y (M, C) must be contiguous float32 matching score (Q, M)");
  TORCH_CHECK(slack.scalar_type() == at::kDouble && slack.dim() == 1 && slack.size(0) == q && slack.is_contiguous(),
              "fastad::knn_rescore: slack must be a contiguous (Q,) float64 tensor");
  TORCH_CHECK(k >= 1 && k <= m, "fastad::knn_rescore: k must be in [1, M]");
  const int64_t c = x.size(1);
  at::Tensor dist = at::empty({q, k}, x.options().dtype(at::kDouble));
  at::Tensor index = at::empty({q, k}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  const double* sp = slack.data_ptr<double>();
  double* dp = dist.data_ptr<double>();
  int64_t* ip = index.data_ptr<int64_t>();
  std::atomic<bool> ok{true};
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, score.scalar_type(), "knn_rescore", [&] {
    const scalar_t* scp = score.data_ptr<scalar_t>();
    at::parallel_for(0, q, 16, [&](int64_t r0, int64_t r1) {
      std::vector<double> top;
      std::vector<std::pair<double, int64_t>> cand;
      for (int64_t r = r0; r < r1; ++r) {
        if (!rescore_row(scp + r * m, sp[r], xp + r * c, yp, m, c, k, dp + r * k, ip + r * k, top, cand)) ok = false;
      }
    });
  });
  TORCH_CHECK(ok.load(), "fastad::knn_rescore: fewer than k candidates in a row: score and slack must be finite, "
              "slack >= 0");
  return {dist, index};
}

}  // namespace fastad
