"""The loops a user would otherwise run, written the way the reference code bases write them.
Used as benchmark baselines and, in float64, as an independent check of fastad's oracles."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _batchwise_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # patchcore-inspection sampler.py: sqrt(clamp(|a|^2 + |b|^2 - 2ab, 0))
    aa = (a.unsqueeze(1) @ a.unsqueeze(2)).reshape(-1, 1)
    bb = (b.unsqueeze(1) @ b.unsqueeze(2)).reshape(1, -1)
    return (-2 * a @ b.T + aa + bb).clamp(0, None).sqrt()


def patchcore_inspection_coreset(projected: torch.Tensor, starts: torch.Tensor, k: int) -> torch.Tensor:
    """ApproximateGreedyCoresetSampler's loop on already projected features."""
    anchor = _batchwise_distances(projected, projected[starts.to(projected.device)]).mean(-1).reshape(-1, 1)
    out = []
    for _ in range(k):
        i = int(torch.argmax(anchor).item())
        out.append(i)
        d = _batchwise_distances(projected, projected[i : i + 1])
        anchor = torch.min(torch.cat([anchor, d], dim=-1), dim=1).values.reshape(-1, 1)
    return torch.tensor(out, device=projected.device)


def patchcore_inspection_sampler(features: torch.Tensor, ratio: float, seed: int = 0) -> torch.Tensor:
    """Full approximate sampler: Linear(D -> 128, bias=False) projection, 10 starts, the loop (float32)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        mapper = torch.nn.Linear(features.shape[1], 128, bias=False).to(features.device)
        projected = mapper(features)
        starts = torch.randperm(len(features), device="cpu")[:10]
        return patchcore_inspection_coreset(projected, starts, int(len(features) * ratio))


def _jl_min_dim(n: int, eps: float) -> int:
    return int(4 * math.log(n) / (eps**2 / 2 - eps**3 / 3))


def anomalib_style_sampler(features: torch.Tensor, ratio: float, seed: int = 0) -> torch.Tensor:
    """A re-implementation in anomalib's style, not the installed package (that is
    :func:`anomalib_installed_sampler`): sparse random projection (eps=0.9, density 1/sqrt(D)), a
    single random start, ``F.pairwise_distance`` + ``torch.minimum`` + argmax per step."""
    torch.manual_seed(seed)
    n, d = features.shape
    comps = _jl_min_dim(n, 0.9)
    density = 1 / math.sqrt(d)
    signs = torch.randint(0, 2, (comps, d), device=features.device).float() * 2 - 1
    keep = (torch.rand(comps, d, device=features.device) < density).float()
    weight = signs * keep * math.sqrt(1 / density) / math.sqrt(comps)
    with torch.no_grad():
        feats = features @ weight.T
        k = int(n * ratio)
        selected: list[int] = []
        min_d = None
        idx = int(torch.randint(high=n, size=(1,)).item())
        for _ in range(k):
            dist = F.pairwise_distance(feats, feats[idx : idx + 1], p=2).reshape(-1, 1)
            min_d = dist if min_d is None else torch.minimum(min_d, dist)
            idx = int(torch.argmax(min_d).item())
            if idx in selected:
                raise ValueError("new index already selected")
            min_d[idx] = 0
            selected.append(idx)
    return torch.tensor(selected)


def anomalib_installed_sampler(features: torch.Tensor, ratio: float, seed: int = 0) -> torch.Tensor:
    """The installed anomalib's own ``KCenterGreedy`` (global RNG seeded with ``seed``); raises
    ImportError without anomalib."""
    from anomalib.models.components import KCenterGreedy

    torch.manual_seed(seed)
    return torch.tensor(KCenterGreedy(features, sampling_ratio=ratio).select_coreset_idxs())


def best_seconds(fn, device: str = "cpu", reps: int = 5) -> float:
    """The shortest of ``reps`` timed calls of ``fn`` after one warm-up call, each to completion on
    ``device`` (CUDA kernels run asynchronously: synchronised)."""
    import time

    def sync():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def memory_bandwidth(mode: str = "read", device: str = "cpu", mib: int = 512, reps: int = 5) -> float:
    """Bytes per second this machine moves in this run, best of ``reps``: ``'read'`` sums a ``mib`` MiB
    float32 tensor (the traffic of a loop that only reads, the coreset's), ``'copy'`` copies one of half
    that size (read + write, both counted). The floor of a memory-bound kernel is its bytes over this."""
    if mode not in ("read", "copy"):
        raise ValueError(f"mode must be 'read' or 'copy', got {mode!r}")
    n = (mib << 20) // 4 // (1 if mode == "read" else 2)
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src) if mode == "copy" else None
    run = (lambda: src.sum()) if mode == "read" else (lambda: dst.copy_(src))
    return n * 4 * (1 if mode == "read" else 2) / best_seconds(run, device, reps)
