"""Greedy k-center coreset subsampling, as PatchCore's ApproximateGreedyCoresetSampler.

Selection (amazon-science/patchcore-inspection ``sampler.py``, see spec section 6.2):
1. project the features with a random ``Linear(D -> projection_dim, bias=False)`` matrix drawn like
   PyTorch's default init, uniform(+-1/sqrt(D)) (used only for selection);
2. the initial distance of every point is its mean Euclidean distance to ``num_starts`` random points;
3. ``k`` times: select the argmax of the distances (lowest index on ties), then lower every
   distance to the distance to the newly selected point.

Distances are accumulated in float64 in the reference and in the kernels, so both select the same
indices. A selected point is never selected again, even when the data has duplicates.

``precision="float16"`` selects on the projection scaled by a power of two (exact) and
rounded to float16 (:func:`selection_values`): the CPU kernel then reads half the bytes per step, and
the reference, given the same rounded values, selects the same indices. The rounding (relative
2**-11) only decides between points whose distances differ by less than that; the projection is
itself random. ``precision="float32"`` (the default) selects on the float32 projection, as PatchCore's
code does. On the 2-core development CPU float16 selects 1.1-1.4x faster (it reads half the row bytes
but widens every row it reads, so where nothing is pruned it is bound by that arithmetic, not by
memory; bench/RESULTS.md); the CUDA kernel reads the same values as float32.
The CPU kernel also skips blocks of 64 points that the triangle inequality shows cannot get closer to
the new center, and single points by their nearest center (see csrc/coreset_cpu.cpp); the result is
the same either way.

With ``group`` (a torch.distributed process group) every rank passes its contiguous shard of the rows
and all select the same points as one process on the concatenation: the projection is computed in
float64 and rounded to float32 (so a row's projection does not depend on the rows beside it; with
float16 the power-of-two scale comes from the largest value over all ranks), and at
every step each rank offers its best point (distance, global index, projected row); all take the
largest, ties to the lowest global index (one all_gather of W x (d + 2) float64 per step), and
lower their own distances with the same kernel arithmetic as the one-process loop.
"""
from __future__ import annotations

import math

import torch

from .. import distributed
from ._checks import check_tensor
from .dispatch import implementation

__all__ = ["greedy_coreset", "greedy_coreset_reference", "project_features", "selection_values", "starting_points",
           "coreset_size"]

PRECISIONS = ("float16", "float32")


def coreset_size(n: int, k: int | None = None, ratio: float | None = None) -> int:
    """Number of points to keep: ``k`` itself or ``int(n * ratio)`` (PatchCore's rule); validates both."""
    if (k is None) == (ratio is None):
        raise ValueError("give exactly one of k (number of points) or ratio (fraction of points)")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")
        k = int(n * float(ratio))
        if k < 1:
            raise ValueError(f"ratio={ratio} of N={n} points selects no point; expected int(N * ratio) >= 1")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of points N={n}")
    return k


def project_features(features: torch.Tensor, projection_dim: int | None = 128, seed: int = 0) -> torch.Tensor:
    """Random projection used for selection.

    Args:
        features: (N, D) floating tensor.
        projection_dim: output dimension; ``None`` or ``>= D`` keeps the features as they are.
        seed: seed of the projection matrix (drawn on the CPU, so identical on every device).
    Returns:
        (N, projection_dim) float32 contiguous tensor on ``features.device``: the float64 product
        rounded to float32, so that a row's projection does not depend on the other rows (a
        float32 GEMM's rounding may depend on the matrix shape; distributed selections project
        their shards separately).
    """
    n, d = features.shape
    if projection_dim is None or projection_dim >= d:
        return features.float().contiguous()
    if projection_dim < 1:
        raise ValueError(f"projection_dim must be >= 1 or None, got {projection_dim}")
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(d)
    weight = torch.empty(projection_dim, d).uniform_(-bound, bound, generator=gen).to(features.device, torch.float64)
    out = torch.empty(n, projection_dim, dtype=torch.float32, device=features.device)
    rows = max(1, (1 << 24) // d)  # float64 copies of at most 128 MiB at a time
    for start in range(0, n, rows):
        out[start : start + rows] = features[start : start + rows].double() @ weight.t()
    return out


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def selection_values(projected: torch.Tensor, precision: str = "float32", amax: float | None = None) -> torch.Tensor:
    """The values the selection runs on.

    Args:
        projected: (N, d) float32, finite (from :func:`project_features`).
        precision: ``"float16"``: scaled by 2**e so that the largest magnitude lies in [2**14, 2**15)
            (exact; the selection does not depend on a common scale), then rounded to float16;
            ``"float32"``: ``projected`` itself.
        amax: the largest magnitude to scale by (default: that of ``projected``; a distributed
            selection passes the maximum over all shards).
    Returns:
        (N, d) float16 or float32 contiguous tensor on ``projected.device``.
    """
    _check_precision(precision)
    if precision == "float32":
        return projected.contiguous()
    if amax is None:
        amax = float(projected.abs().max()) if projected.numel() else 0.0
    exponent = 15 - math.frexp(amax)[1] if amax > 0 else 0  # frexp: amax = m * 2**e, m in [0.5, 1)
    return (projected * 2.0**exponent).half().contiguous()


def starting_points(n: int, num_starts: int = 10, seed: int = 0) -> torch.Tensor:
    """``min(num_starts, n)`` distinct random indices (int64, CPU), like ``np.random.choice(n, s, replace=False)``."""
    if num_starts < 1:
        raise ValueError(f"num_starts must be >= 1, got {num_starts}")
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randperm(n, generator=gen)[: min(num_starts, n)]


def greedy_coreset_reference(projected: torch.Tensor, starts: torch.Tensor, k: int) -> torch.Tensor:
    """Pure-PyTorch oracle of the selection loop (float64).

    Args:
        projected: (N, d) floating tensor, already projected.
        starts: (S,) int64 starting indices.
        k: number of points to select, 1 <= k <= N.
    Returns:
        (k,) int64 indices in selection order, on ``projected.device``.
    """
    x = projected.double()
    dist = _init_reference(x, x[starts.to(x.device)])
    out = torch.empty(k, dtype=torch.long, device=x.device)
    c = int(torch.argmax(dist))
    for t in range(k):
        out[t] = c
        _, c = _step_reference(x, dist, x[c], c)
    return out


def greedy_coreset(
    features: torch.Tensor,
    k: int | None = None,
    *,
    ratio: float | None = None,
    projection_dim: int | None = 128,
    seed: int = 0,
    num_starts: int = 10,
    precision: str = "float32",
    group=None,
) -> torch.Tensor:
    """Indices of a greedy k-center coreset of ``features``.

    Args:
        features: (N, D) float16/bfloat16/float32/float64 tensor on CPU or CUDA, finite.
        k: number of points to keep, 1 <= k <= N. Give ``k`` or ``ratio``, not both.
        ratio: fraction of points to keep, in (0, 1]; ``k = int(N * ratio)`` (PatchCore default 0.1).
        projection_dim: dimension of the random projection used for selection (None: no projection).
        seed: seed for the projection and the starting points.
        num_starts: random starting points whose mean distance initialises the search (PatchCore: 10).
        precision: ``"float32"`` (default) or ``"float16"``: the values the selection runs on
            (:func:`selection_values`); every device and the reference select the same indices on them.
        group: a torch.distributed process group (None: this process alone).
            In a group of several processes ``features`` is this rank's contiguous shard (n_r, D)
            of the rows (n_r may be 0), ``k``/``ratio`` refer to all N = sum n_r rows, and every
            rank returns the same global indices (into the concatenation in rank order).
    Returns:
        (k,) int64 tensor of distinct indices into ``features``, in selection order, on ``features.device``.
    Raises:
        TypeError/ValueError: wrong dtype or rank, empty input, NaN/inf, bad k or ratio.
    """
    _check_precision(precision)
    if distributed.active(group):
        return _distributed_coreset(features, k, ratio, projection_dim, seed, num_starts, precision, group)
    check_tensor("features", features, ndim=2, finite=False)
    n = features.shape[0]
    k = coreset_size(n, k, ratio)
    projected = project_features(features, projection_dim, seed)
    # NaN/inf never project to finite values, and the projection is 12x smaller than 1536-d input
    if not bool(torch.isfinite(projected).all()):
        raise ValueError(
            "features contain NaN or inf values (or values so large that the projection overflows float32); "
            "expected finite values"
        )
    return select_greedy(selection_values(projected, precision), starting_points(n, num_starts, seed), k)


def select_greedy(values: torch.Tensor, starts: torch.Tensor, k: int) -> torch.Tensor:
    """Steps 2-3 of the selection on given values: (N, d) float16/float32 finite ``values``, (S,) int64
    ``starts`` (the initial distance is the mean distance to those rows) -> (k,) int64 indices, k <= N,
    on the extension where it runs (else :func:`greedy_coreset_reference`). The starts themselves are
    not marked as selected."""
    if implementation(values, extension=True) == "extension":
        if values.is_cuda:  # the CUDA kernel reads float32: the same (rounded) values
            values = values.float()
        return torch.ops.fastad.kcenter_greedy(values, starts.to(values.device), k)
    return greedy_coreset_reference(values, starts, k)


_PROBE = 64  # as csrc/coreset_cpu.cpp: the triangle test is probed every 64 steps, kept while it skips >= 25%


def _init_reference(x: torch.Tensor, start_vectors: torch.Tensor) -> torch.Tensor:
    """The reference's initial distances: mean distance of every row of ``x`` to the start vectors
    (float64); also the distributed loop's, on a shard."""
    x, sv = x.double(), start_vectors.double()
    if x.shape[0] == 0:
        return torch.empty(0, dtype=torch.float64, device=x.device)
    return torch.stack([(x - v).pow(2).sum(1).sqrt() for v in sv], 1).mean(1)


def _step_reference(x: torch.Tensor, dist: torch.Tensor, center: torch.Tensor, owned: int) -> tuple[float, int]:
    """The reference's step: lower ``dist`` (in place) to the distances to a new center, mark row
    ``owned`` (-1: none here) selected; returns (best distance, its row or -1 for no row)."""
    if x.shape[0] == 0:
        return -math.inf, -1
    d = (x.double() - center.double()).pow(2).sum(1).sqrt()
    dist.copy_(torch.where(dist > 0, torch.minimum(dist, d), dist))
    if owned >= 0:
        dist[owned] = -1.0
    i = int(torch.argmax(dist))
    return float(dist[i]), i


def _distributed_coreset(features, k, ratio, projection_dim, seed, num_starts, precision, group) -> torch.Tensor:
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or not features.is_floating_point():
        raise TypeError(f"features must be a floating (n, D) tensor shard, got "
                        f"{tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__}")
    first, n = distributed.offset(features.shape[0], group)
    if n == 0:
        raise ValueError("features are empty on every rank; expected at least one row")
    k = coreset_size(n, k, ratio)
    x = project_features(features, projection_dim, seed)
    device = x.device
    bad = torch.tensor([float((~torch.isfinite(x)).sum())], device=device)
    torch.distributed.all_reduce(bad, group=group)
    if bad.item():
        raise ValueError("features contain NaN or inf values (or values so large that the projection overflows "
                         "float32); expected finite values")
    if precision == "float16":  # one power-of-two scale for every rank: the largest value over all of them
        amax = torch.tensor([float(x.abs().max()) if x.numel() else 0.0], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(amax, op=torch.distributed.ReduceOp.MAX, group=group)
        x = selection_values(x, precision, float(amax)).float()  # the per-step kernels read float32
    rows, d = x.shape
    starts = starting_points(n, num_starts, seed).tolist()
    start_vectors = torch.zeros(len(starts), d, device=device)
    for j, s in enumerate(starts):
        if first <= s < first + rows:
            start_vectors[j] = x[s - first]
    torch.distributed.all_reduce(start_vectors, group=group)  # each row is owned by exactly one rank
    kernel = implementation(x, extension=True) == "extension"
    if kernel:
        dist = torch.ops.fastad.kcenter_init(x, start_vectors)
    else:
        dist = _init_reference(x, start_vectors)
    assign = torch.full((rows,), -1, dtype=torch.int32, device=device)
    centers = torch.empty(k, d, device=device)
    out = torch.empty(k, dtype=torch.long)
    value, best = (float(dist.max()), int(torch.argmax(dist))) if rows else (-math.inf, -1)
    zeros = torch.zeros(d, device=device)
    prune = False
    for t in range(k):
        _, c, centers[t] = distributed.all_max_index(value, first + best if best >= 0 else -1,
                                                     x[best] if best >= 0 else zeros, group)
        out[t] = c
        owned = c - first if first <= c < first + rows else -1
        if kernel:
            use = prune or (t % _PROBE == 0 and t > 0)
            res = torch.ops.fastad.kcenter_step(x, dist, assign, centers, t, owned, use).tolist()
            value, best = res[0], int(res[1])
            if use:
                prune = res[2] * 4 >= rows
        else:
            value, best = _step_reference(x, dist, centers[t], owned)
    return out.to(features.device)
