// Greedy k-center coreset (PatchCore's approximate sampler) on the CPU.
//
// Same selection as fastad.ops.coreset.greedy_coreset_reference: the initial
// distance of a point is its mean distance to the start points, then k times:
// pick the argmax (lowest index on ties), mark it selected (-1), and lower every
// point's distance to its distance to the new center.
//
// Speed-ups that keep the result exact (the same indices as the reference on the
// same values):
// - blocks: the one-call loop keeps, per block of kBlock consecutive points, a
//   centroid m, a radius r = max d(i, m) and the largest remaining distance D.
//   By the triangle inequality d(i, c) >= d(m, c) - r, so when d(m, c) - r >= D no
//   point of the block can get closer to the new center c: the block is skipped
//   without reading its points or their distances, and its argmax is kept.
// - points: every point remembers the center it is closest to (a). As
//   d(i, c) >= d(a, c) - d(i, a), a point with d(a, c) >= 2 d(i, a) cannot get
//   closer to c and is skipped without reading its features.
// Either test is switched off where it stops paying (random high-dimensional data;
// blocks of real patch embeddings, whose 64 consecutive patches are too diverse)
// and probed again every kProbe steps.
// - screen: a point the tests leave is compared first on its float32 distance to the new
//   center (twice the elements per instruction), with a rigorous error bound (screen_error):
//   almost all are rejected there (98.6% on MVTec bottle's embeddings), and only the rest get
//   the float64 distance the reference computes.
// On real (low intrinsic dimension) features most points are skipped late in the run.
// The points a step must compute are then scattered: they are collected first and
// their rows prefetched ahead (a row read on demand costs a memory latency, not its
// bytes), and only the blocks where a distance fell recompute their maximum.
// Features may be float32 or float16 (the selection's rounded projection: half
// the bytes per step); the distances kept are float64 either way.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "simd_distance.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTAD_F16C 1
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
constexpr int64_t kBlock = 64;              // points per block of the block test
constexpr int64_t kBlocksPerTask = kGrain / kBlock;

// float16 rows are widened to float32 block by block (exact), then share the float32 code.
void half_to_float_scalar(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = widen(src[i]);
}

#ifdef FASTAD_F16C
__attribute__((target("avx,f16c"))) void half_to_float_f16c(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  half_to_float_scalar(src + i, dst + i, n - i);
}
#endif

using HalfToFloat = void (*)(const uint16_t*, float*, int64_t);

HalfToFloat half_to_float() {
#ifdef FASTAD_F16C
  static const HalfToFloat fn = __builtin_cpu_supports("f16c") ? half_to_float_f16c : half_to_float_scalar;
  return fn;
#else
  return half_to_float_scalar;
#endif
}

// Rows [lo, hi) as float32: the rows themselves, or their float16 values widened into buf.
inline const float* rows_f32(const float* x, int64_t d, int64_t lo, int64_t hi, std::vector<float>&) { return x + lo * d; }
inline const float* rows_f32(const uint16_t* x, int64_t d, int64_t lo, int64_t hi, std::vector<float>& buf) {
  buf.resize((hi - lo) * d);
  half_to_float()(x + lo * d, buf.data(), (hi - lo) * d);
  return buf.data();
}

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

constexpr int64_t kCenterGrain = 256;  // earlier centers per task (thousands of them late in a run)

// center_dist[0, t): the distances of the first t centers (rows of cv) to the new one, c (the point test).
void center_distances(const float* cv, int64_t d, int64_t t, const float* c, std::vector<double>& center_dist) {
  if (static_cast<int64_t>(center_dist.size()) < t) center_dist.resize(std::max<int64_t>(t, 2 * center_dist.size()));
  at::parallel_for(0, t, kCenterGrain, [&](int64_t b, int64_t e) { center_range(cv, d, c, center_dist.data(), b, e); });
}

// Rows of one point as float32: the row itself, or its float16 values widened into buf (d floats).
FASTAD_INLINE const float* row_f32(const float* x, int64_t d, int64_t i, float*) { return x + i * d; }
FASTAD_INLINE const float* row_f32(const uint16_t* x, int64_t d, int64_t i, float* buf) {
  half_to_float()(x + i * d, buf, d);
  return buf;
}

// A candidate's squared distance to the new center (xf) in float32, for the screen: float32 rows are
// read in place; float16 rows are widened into buf first, or, in the F16C copy (kF16C), converted as
// they are read (the same float32 values, so the same sum).
template <bool kF16C>
FASTAD_INLINE float screen_distance(const float* xf, const float* x, int64_t d, int64_t i, float*) {
  return squared_l2_f32(xf, x + i * d, d);
}
#ifdef FASTAD_F16C
__attribute__((target("avx,f16c"), always_inline)) inline Vec8f load8_half(const uint16_t* p) {
  return reinterpret_cast<Vec8f>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#endif
template <bool kF16C>
FASTAD_INLINE float screen_distance(const float* xf, const uint16_t* x, int64_t d, int64_t i, float* buf) {
#ifdef FASTAD_F16C
  if constexpr (kF16C) return squared_l2_f32(xf, x + i * d, d, load8_half);
#endif
  return squared_l2_f32(xf, row_f32(x, d, i, buf), d);
}

// Rows this many candidates ahead are prefetched where the candidates are scattered (the tests skip
// most points): without it every row costs a memory latency instead of its bytes. Where they are
// dense (at most an eighth of a task's points skipped) the hardware's stream prefetcher does better
// alone (10-20% faster steps on MTD, where nothing is skipped). The rows go to the L2 (locality 1):
// 16 rows of 8 lines each are more misses in flight than the L1 takes (13-16% faster scattered
// steps on bottle than into the L1; 16 rows ahead vs 8 is within the noise).
constexpr int64_t kPrefetchRows = 16;

template <typename T>
FASTAD_INLINE void prefetch_row(const T* x, int64_t d, int64_t i) {
  const char* p = reinterpret_cast<const char*>(x + i * d);
  const int64_t bytes = d * static_cast<int64_t>(sizeof(T));
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 1);
}

// The point test over points [lo, hi): appends to cand the points whose distance to the new center
// must be computed (branch-free: the outcome is data-dependent). center_dist null: no point test.
FASTAD_INLINE void collect_candidates(int64_t lo, int64_t hi, const double* dist, const int32_t* assign,
                                      const double* center_dist, int32_t* cand, int64_t& ncand, int64_t& examined,
                                      int64_t& point_skipped) {
  if (center_dist == nullptr) {
    for (int64_t i = lo; i < hi; ++i) {
      const bool live = dist[i] > 0.0;  // selected points hold -1, covered duplicates 0
      cand[ncand] = static_cast<int32_t>(i);
      ncand += live;
      examined += live;
    }
    return;
  }
  for (int64_t i = lo; i < hi; ++i) {
    const double md = dist[i];
    const int32_t c = assign[i];
    const bool live = md > 0.0;
    const bool skip = (c >= 0) & (center_dist[c < 0 ? 0 : c] >= 2.0 * md * kPruneSlack);
    cand[ncand] = static_cast<int32_t>(i);
    ncand += live & !skip;
    examined += live;
    point_skipped += live & skip;
  }
}

// Lowers the distance of the points cand[0, ncand), taken from `span` consecutive points, to their
// distance to the new center (xf: its float32 row, xc: the same values in float64), rows prefetched
// ahead where they are scattered; calls fell(i) for each point whose distance fell. Most candidates
// do not get closer: a float32 distance with a rigorous error bound (screen_error) rejects them, and
// only the rest get the float64 distance the reference computes, so the outcome is the reference's.
// A float32 overflow (inf) is never a rejection.
template <bool kF16C = false, typename T, typename Fell>
FASTAD_INLINE void update_candidates(const T* x, int64_t d, const float* xf, const double* xc, int32_t t,
                                     const int32_t* cand, int64_t ncand, int64_t span, double* dist, int32_t* assign,
                                     float* buf, Fell&& fell) {
  const double screen = 1.0 + 2.0 * screen_error(d), tiny = screen_tiny(d);
  const int64_t ahead = 8 * ncand < 7 * span ? kPrefetchRows : 0;
  for (int64_t j = 0; j < std::min(ncand, ahead); ++j) prefetch_row(x, d, cand[j]);
  for (int64_t j = 0; j < ncand; ++j) {
    if (ahead > 0 && j + ahead < ncand) prefetch_row(x, d, cand[j + ahead]);
    const int64_t i = cand[j];
    const double md = dist[i];
    const float s32 = screen_distance<kF16C>(xf, x, d, i, buf);
    if (s32 <= std::numeric_limits<float>::max() && static_cast<double>(s32) > md * md * screen + tiny) continue;
    const double v = std::sqrt(squared_l2_of(xc, row_f32(x, d, i, buf), d));
    if (v < md) {
      dist[i] = v;
      assign[i] = t;
      fell(i);
    }
  }
}

// Updates points [begin, end) (at most kGrain) against center xc (the t-th); returns their argmax.
FASTAD_CLONES
Best update_range(const float* x, int64_t d, const float* xf, const double* xc, int32_t t, double* dist,
                  int32_t* assign, const double* center_dist, int64_t begin, int64_t end, int64_t* pruned) {
  int32_t cand[kGrain];
  int64_t ncand = 0, examined = 0, skipped = 0;
  collect_candidates(begin, end, dist, assign, center_dist, cand, ncand, examined, skipped);
  update_candidates(x, d, xf, xc, t, cand, ncand, end - begin, dist, assign, nullptr, [](int64_t) {});
  Best best;
  for (int64_t i = begin; i < end; ++i) best.take(dist[i], i);
  *pruned += skipped;
  return best;
}

Best parallel_argmax_update(const float* x, int64_t n, int64_t d, const float* xf, const double* xc, int32_t t,
                            double* dist, int32_t* assign, const double* center_dist, int64_t* pruned) {
  const int64_t chunks = (n + kGrain - 1) / kGrain;
  std::vector<Best> partial(chunks);
  std::vector<int64_t> skipped(chunks, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t ch = b; ch < e; ++ch) {
      const int64_t lo = ch * kGrain, hi = std::min(n, lo + kGrain);
      partial[ch] = update_range(x, d, xf, xc, t, dist, assign, center_dist, lo, hi, &skipped[ch]);
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
// the new argmax is returned. `use_prune` enables the point test. The per-step op of distributed
// selections; the one-call loop below runs the same update per block (blocks_body).
Best select_step(const float* x, int64_t n, int64_t d, const float* cv, int64_t t, int64_t owned, double* dist,
                 int32_t* assign, std::vector<double>& center_dist, bool use_prune, int64_t* pruned) {
  const float* xc = cv + t * d;
  if (owned >= 0) {
    dist[owned] = -1.0;
    assign[owned] = static_cast<int32_t>(t);
  }
  if (use_prune) center_distances(cv, d, t, xc, center_dist);
  std::vector<double> xcd(xc, xc + d);
  return parallel_argmax_update(x, n, d, xc, xcd.data(), static_cast<int32_t>(t), dist, assign,
                                use_prune ? center_dist.data() : nullptr, pruned);
}

Best init_distances(const float* x, int64_t n, int64_t d, const float* sv, int64_t s, double* dist) {
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) { init_range(x, d, sv, s, dist, b, e); });
  Best best;
  for (int64_t i = 0; i < n; ++i) best.take(dist[i], i);
  return best;
}

// The point test is probed every kProbe steps and kept while it skips >= 25% of the points it
// examines (the distributed loop in fastad/ops/coreset.py applies the same rule per shard); the
// block test is kept while it skips >= 5% of the points (a failed test costs one centroid distance
// per 64 points).
constexpr int64_t kProbe = 64;

void check_features(const at::Tensor& features, const char* op) {
  TORCH_CHECK(features.dim() == 2 && features.scalar_type() == at::kFloat && features.is_contiguous(),
              "fastad::", op, ": features must be a contiguous float32 (N, d) tensor");
}

// ---------------------------------------------------------------------------------------------
// The one-call loop (kcenter_greedy), over float32 or float16 rows, with the block and point tests.

struct BlockArgs {
  int64_t n, d;
  int32_t t;             // number of the new center
  const float* xf;       // the new center (float32)
  const double* xc;      // the same values in float64
  int64_t center_block;  // block holding the new center: always updated (its point leaves the pool)
  double* dist;
  int32_t* assign;
  const double* center_dist;  // distances of the earlier centers to the new one, or null (no point test)
  bool block_test;            // test blocks against their centroid (off while it does not pay)
  const float* centroid;      // nb x d: block means rounded to float32 (any pivot bounds exactly)
  const double* radius;       // nb
  double* maxd;               // nb: largest positive distance in the block (0: none)
  Best* best;                 // nb: the block's argmax
};

struct BlockCounts {
  int64_t block_skipped = 0, point_skipped = 0, examined = 0, blocks_tested = 0;
};

// Updates the points of blocks [b0, b1) (at most kBlocksPerTask) in three passes: (1) the block
// test, and over the blocks that fail it the point test (branch-free: the outcome is data-dependent),
// collect the points whose distance must be computed; (2) those distances, rows prefetched ahead;
// (3) the largest distance and argmax of the blocks where a distance changed. buf: d floats (float16
// rows are widened into it).
template <bool kF16C, typename T>
FASTAD_INLINE void blocks_body(const T* x, const BlockArgs& a, int64_t b0, int64_t b1, float* buf, BlockCounts& cnt) {
  const int64_t d = a.d;
  int32_t cand[kBlocksPerTask * kBlock];
  bool changed[kBlocksPerTask] = {};
  int64_t ncand = 0, examined = 0, point_skipped = 0;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t lo = b * kBlock, hi = std::min(a.n, lo + kBlock);
    if (b != a.center_block) {
      if (a.maxd[b] <= 0.0) {  // every point selected or a covered duplicate
        cnt.block_skipped += hi - lo;
        continue;
      }
      if (a.block_test) {
        ++cnt.blocks_tested;
        const double dc = std::sqrt(squared_l2_of(a.centroid + b * d, a.xc, d));
        const double r = a.radius[b];
        if (dc - r >= a.maxd[b] * kPruneSlack + 1e-12 * (dc + r)) {  // no point can get closer to c
          cnt.block_skipped += hi - lo;
          continue;
        }
      }
    } else {
      changed[b - b0] = true;  // its new center's point left the pool
    }
    collect_candidates(lo, hi, a.dist, a.assign, a.center_dist, cand, ncand, examined, point_skipped);
  }
  cnt.examined += examined;
  cnt.point_skipped += point_skipped;
  update_candidates<kF16C>(x, d, a.xf, a.xc, a.t, cand, ncand, std::min(a.n, b1 * kBlock) - b0 * kBlock, a.dist,
                           a.assign, buf,
                           [&](int64_t i) { changed[i / kBlock - b0] = true; });
  for (int64_t b = b0; b < b1; ++b) {
    if (!changed[b - b0]) continue;  // no distance of the block changed: its maximum and argmax hold
    const int64_t lo = b * kBlock, hi = std::min(a.n, lo + kBlock);
    Best bb;
    double mx = 0.0;
    for (int64_t i = lo; i < hi; ++i) {
      const double md = a.dist[i];
      if (md > mx) mx = md;
      bb.take(md, i);
    }
    a.maxd[b] = mx;
    a.best[b] = bb;
  }
}

template <bool kF16C, typename T>
FASTAD_INLINE BlockCounts blocks_in_tasks(const T* x, const BlockArgs& a, int64_t b0, int64_t b1) {
  BlockCounts cnt;
  std::vector<float> buf(std::is_same_v<T, uint16_t> ? a.d : 0);
  for (int64_t b = b0; b < b1; b += kBlocksPerTask)
    blocks_body<kF16C>(x, a, b, std::min(b1, b + kBlocksPerTask), buf.data(), cnt);
  return cnt;
}

FASTAD_CLONES BlockCounts process_blocks(const float* x, const BlockArgs& a, int64_t b0, int64_t b1) {
  return blocks_in_tasks<false>(x, a, b0, b1);
}

// float16 rows: where the CPU has F16C (with AVX2 and FMA), a copy whose screen converts the halves
// as it reads them; elsewhere each row is widened into a buffer first (also with FASTAD_NO_F16C=1 in
// the environment: the tests run that path on any CPU).
#ifdef FASTAD_F16C
__attribute__((target("arch=x86-64-v3"))) BlockCounts process_half_blocks_f16c(const uint16_t* x, const BlockArgs& a,
                                                                                int64_t b0, int64_t b1) {
  return blocks_in_tasks<true>(x, a, b0, b1);
}
#endif

FASTAD_CLONES BlockCounts process_half_blocks(const uint16_t* x, const BlockArgs& a, int64_t b0, int64_t b1) {
  return blocks_in_tasks<false>(x, a, b0, b1);
}

BlockCounts process_blocks(const uint16_t* x, const BlockArgs& a, int64_t b0, int64_t b1) {
#ifdef FASTAD_F16C
  static const bool f16c = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c") && std::getenv("FASTAD_NO_F16C") == nullptr;
  if (f16c) return process_half_blocks_f16c(x, a, b0, b1);
#endif
  return process_half_blocks(x, a, b0, b1);
}

// stats (k, kStats) or null: per step, the points of the blocks the block test skipped and the points
// of the read blocks the point test skipped (neither had its features read), the blocks whose
// centroid was read, the earlier centers whose distance to the new one was computed (for the point
// test), and the step's wall time in nanoseconds (the only column that is not deterministic).
constexpr int64_t kStats = 5;
// T: float (float32 rows) or uint16_t (float16 bits).
template <typename T>
void greedy_loop(const T* x, int64_t n, int64_t d, const int64_t* sp, int64_t s, int64_t k, int64_t* op,
                 int64_t* stats) {
  const int64_t nb = (n + kBlock - 1) / kBlock;
  std::vector<float> sv(s * d), cv(k * d), one;  // start vectors; selected centers, in order (float32)
  for (int64_t j = 0; j < s; ++j) {
    const float* r = rows_f32(x, d, sp[j], sp[j] + 1, one);
    std::copy(r, r + d, sv.begin() + j * d);
  }
  std::vector<double> dist(n), radius(nb), maxd(nb), center_dist, xcd(d);
  std::vector<float> centroid(nb * d);
  std::vector<int32_t> assign(n, -1);
  std::vector<Best> best(nb);
  at::parallel_for(0, nb, kBlocksPerTask, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf;
    std::vector<double> sum(d);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
      const float* rows = rows_f32(x, d, lo, hi, buf);
      init_range(rows, d, sv.data(), s, dist.data() + lo, 0, hi - lo);
      std::fill(sum.begin(), sum.end(), 0.0);
      for (int64_t i = 0; i < hi - lo; ++i)
        for (int64_t j = 0; j < d; ++j) sum[j] += static_cast<double>(rows[i * d + j]);
      float* m = centroid.data() + b * d;
      for (int64_t j = 0; j < d; ++j) m[j] = static_cast<float>(sum[j] / static_cast<double>(hi - lo));
      double r = 0.0, mx = 0.0;
      Best bb;
      for (int64_t i = lo; i < hi; ++i) {
        r = std::max(r, std::sqrt(squared_l2_of(m, rows + (i - lo) * d, d)));
        if (dist[i] > mx) mx = dist[i];
        bb.take(dist[i], i);
      }
      radius[b] = r;
      maxd[b] = mx;
      best[b] = bb;
    }
  });
  Best all;
  for (int64_t b = 0; b < nb; ++b) all.merge(best[b]);
  bool prune = false, blocks_pay = true;
  for (int64_t t = 0; t < k; ++t) {
    const auto started = std::chrono::steady_clock::now();
    const int64_t c = all.index;
    op[t] = c;
    const float* r = rows_f32(x, d, c, c + 1, one);
    std::copy(r, r + d, cv.begin() + t * d);
    const float* xc = cv.data() + t * d;
    for (int64_t j = 0; j < d; ++j) xcd[j] = static_cast<double>(xc[j]);
    dist[c] = -1.0;
    assign[c] = static_cast<int32_t>(t);
    const bool use = prune || (t % kProbe == 0 && t > 0), use_blocks = blocks_pay || t % kProbe == 0;
    if (use) center_distances(cv.data(), d, t, xc, center_dist);
    const BlockArgs args{n, d, static_cast<int32_t>(t), xc, xcd.data(), c / kBlock, dist.data(), assign.data(),
                         use ? center_dist.data() : nullptr, use_blocks, centroid.data(), radius.data(), maxd.data(),
                         best.data()};
    std::atomic<int64_t> block_skipped{0}, point_skipped{0}, examined{0}, blocks_tested{0};
    at::parallel_for(0, nb, kBlocksPerTask, [&](int64_t b0, int64_t b1) {
      const BlockCounts cnt = process_blocks(x, args, b0, b1);
      block_skipped += cnt.block_skipped;
      point_skipped += cnt.point_skipped;
      examined += cnt.examined;
      blocks_tested += cnt.blocks_tested;
    });
    all = Best();
    for (int64_t b = 0; b < nb; ++b) all.merge(best[b]);
    if (use) prune = point_skipped.load() * 4 >= examined.load();
    if (use_blocks) blocks_pay = block_skipped.load() * 20 >= n;
    if (stats != nullptr) {
      int64_t* st = stats + kStats * t;
      st[0] = block_skipped.load();
      st[1] = point_skipped.load();
      st[2] = blocks_tested.load();
      st[3] = use ? t : 0;
      st[4] = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - started).count();
    }
  }
}

at::Tensor greedy_impl(const at::Tensor& features, const at::Tensor& starts, int64_t k, int64_t* stats) {
  TORCH_CHECK(features.dim() == 2 && features.is_contiguous() &&
                  (features.scalar_type() == at::kFloat || features.scalar_type() == at::kHalf),
              "fastad::kcenter_greedy: features must be a contiguous float32 or float16 (N, d) tensor");
  TORCH_CHECK(starts.dim() == 1 && starts.scalar_type() == at::kLong && starts.numel() > 0,
              "fastad::kcenter_greedy: starts must be a non-empty int64 vector");
  const int64_t n = features.size(0), d = features.size(1), s = starts.numel();
  TORCH_CHECK(k >= 1 && k <= n, "fastad::kcenter_greedy: k=", k, " must be in [1, N=", n, "]");
  TORCH_CHECK(n < std::numeric_limits<int32_t>::max(), "fastad::kcenter_greedy: N=", n, " must be < 2**31 - 1");
  const at::Tensor st = starts.contiguous();
  const int64_t* sp = st.data_ptr<int64_t>();
  for (int64_t j = 0; j < s; ++j)
    TORCH_CHECK(sp[j] >= 0 && sp[j] < n, "fastad::kcenter_greedy: start index ", sp[j], " out of range");
  at::Tensor out = at::empty({k}, features.options().dtype(at::kLong));
  if (features.scalar_type() == at::kFloat)
    greedy_loop(features.data_ptr<float>(), n, d, sp, s, k, out.data_ptr<int64_t>(), stats);
  else
    greedy_loop(reinterpret_cast<const uint16_t*>(features.data_ptr<at::Half>()), n, d, sp, s, k,
                out.data_ptr<int64_t>(), stats);
  return out;
}

}  // namespace

// features: (N, d) float32 or float16 contiguous; starts: (S,) int64; returns (k,) int64.
at::Tensor kcenter_greedy_cpu(const at::Tensor& features, const at::Tensor& starts, int64_t k) {
  return greedy_impl(features, starts, k, nullptr);
}

// The same selection, and per step its counters, (k, 5) int64 (see greedy_loop): points skipped by the
// block test, points skipped by the point test, blocks tested, earlier centers compared, nanoseconds.
std::tuple<at::Tensor, at::Tensor> kcenter_greedy_stats_cpu(const at::Tensor& features, const at::Tensor& starts,
                                                            int64_t k) {
  at::Tensor stats = at::zeros({std::max<int64_t>(k, 0), kStats}, features.options().dtype(at::kLong));
  at::Tensor idx = greedy_impl(features, starts, k, stats.data_ptr<int64_t>());
  return {idx, stats};
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
// (best distance, its row or -1 for an empty shard, points skipped by the point test).
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
