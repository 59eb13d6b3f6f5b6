"""Greedy k-center coreset subsampling, as PatchCore's ApproximateGreedyCoresetSampler.

Selection (amazon-science/patchcore-inspection ``sampler.py``, see spec section 6.2):
1. project the features with a random ``Linear(D -> projection_dim, bias=False)`` matrix drawn like
   PyTorch's default init, uniform(+-1/sqrt(D)) (used only for selection);
2. the initial distance of every point is its mean Euclidean distance to ``num_starts`` random points;
3. ``k`` times: select the argmax of the distances (lowest index on ties), then lower every
   distance to the distance to the newly selected point.

Distances are accumulated in float64 in the reference and in the kernels, so both select the same
indices. A selected point is never selected again, even when the data has duplicates.
"""
from __future__ import annotations

import math

import torch

from ._checks import check_tensor
from .dispatch import implementation

__all__ = ["greedy_coreset", "greedy_coreset_reference", "project_features", "starting_points", "coreset_size"]


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
        (N, projection_dim) float32 contiguous tensor on ``features.device``.
    """
    d = features.shape[1]
    x = features.float()
    if projection_dim is None or projection_dim >= d:
        return x.contiguous()
    if projection_dim < 1:
        raise ValueError(f"projection_dim must be >= 1 or None, got {projection_dim}")
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(d)
    weight = torch.empty(projection_dim, d).uniform_(-bound, bound, generator=gen).to(features.device)
    return (x @ weight.t()).contiguous()


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
    starts = starts.to(x.device)
    dist = torch.stack([(x - x[s]).pow(2).sum(1).sqrt() for s in starts.tolist()], 1).mean(1)
    out = torch.empty(k, dtype=torch.long, device=x.device)
    for t in range(k):
        c = int(torch.argmax(dist))
        out[t] = c
        d = (x - x[c]).pow(2).sum(1).sqrt()
        dist = torch.where(dist > 0, torch.minimum(dist, d), dist)
        dist[c] = -1.0
    return out


def greedy_coreset(
    features: torch.Tensor,
    k: int | None = None,
    *,
    ratio: float | None = None,
    projection_dim: int | None = 128,
    seed: int = 0,
    num_starts: int = 10,
) -> torch.Tensor:
    """Indices of a greedy k-center coreset of ``features``.

    Args:
        features: (N, D) float16/bfloat16/float32/float64 tensor on CPU or CUDA, finite.
        k: number of points to keep, 1 <= k <= N. Give ``k`` or ``ratio``, not both.
        ratio: fraction of points to keep, in (0, 1]; ``k = int(N * ratio)`` (PatchCore default 0.1).
        projection_dim: dimension of the random projection used for selection (None: no projection).
        seed: seed for the projection and the starting points.
        num_starts: random starting points whose mean distance initialises the search (PatchCore: 10).
    Returns:
        (k,) int64 tensor of distinct indices into ``features``, in selection order, on ``features.device``.
    Raises:
        TypeError/ValueError: wrong dtype or rank, empty input, NaN/inf, bad k or ratio.
    """
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
    starts = starting_points(n, num_starts, seed)
    if implementation(projected, extension=True) == "extension":
        return torch.ops.fastad.kcenter_greedy(projected, starts.to(projected.device), k)
    return greedy_coreset_reference(projected, starts, k)
