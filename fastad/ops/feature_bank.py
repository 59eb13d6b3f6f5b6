"""A bank of feature vectors with exact (or IVF) k-nearest-neighbour search.

Backends:
- ``torch``: exact, chunked ``|q|^2 + |b|^2 - 2 q.b`` plus ``topk``; CPU or CUDA, never an
  (all queries x all bank) matrix. With ``max_bytes`` (or a bank kept in host memory and queried
  with CUDA tensors) the bank is also walked in blocks of at most ``max_bytes / 2`` bytes, copied to
  the queries' device one at a time and merged on (distance, index): banks larger than the device
  memory are searched.
- ``faiss``: ``IndexFlatL2`` (exact) or, with ``ivf_nlist``, ``IndexIVFFlat`` (approximate) on the
  CPU; moved to the GPU when the queries are CUDA tensors and faiss was built with GPU support
  (the ``gpu`` extra).
Both return **squared** L2 distances, as FAISS does and as PatchCore's official code uses them.

With ``group`` the bank is sharded across processes: each rank ``add``s its rows, every rank
searches the same queries in its shard, and the per-shard top-k (with global ids: the shards'
concatenation in rank order) are all-gathered and merged on (distance, id). Torch backend: the
neighbours and distances of one process searching the whole bank (distances within float32 GEMM
rounding, which may depend on the block shape); FAISS: the same within FAISS's own variation with
the batch size (its BLAS blocking).
"""
from __future__ import annotations

import torch

from .. import distributed
from ._checks import check_tensor

__all__ = ["FeatureBank"]

_CHUNK_ELEMENTS = 1 << 24  # queries x bank block size of the torch backend


class FeatureBank:
    """Stores (N, dim) features and answers k-nearest-neighbour queries.

    Args:
        dim: feature dimension.
        backend: ``'torch'`` or ``'faiss'``.
        device: device of the stored features (torch backend); faiss keeps them on the CPU.
        ivf_nlist: faiss only: number of IVF lists (approximate search for very large banks);
            trained on the first ``add``.
        nprobe: faiss IVF lists visited per query.
        max_bytes: torch only: device memory a search may use for bank blocks and distances
            (None: no cap, except half the free device memory when the bank is on the host and
            the queries on a GPU).
        group: torch.distributed process group over which the bank is sharded (None: this
            process alone); ``len`` and ``features`` are then this rank's shard, and ``search``
            is a collective that every rank calls with the same queries.
    """

    def __init__(self, dim: int, backend: str = "torch", device=None, ivf_nlist: int | None = None, nprobe: int = 8,
                 max_bytes: int | None = None, group=None):
        self.group = group
        if backend not in ("torch", "faiss"):
            raise ValueError(f"backend must be 'torch' or 'faiss', got {backend!r}")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0):
            raise ValueError(f"max_bytes must be a positive int (bytes) or None, got {max_bytes!r}")
        self.max_bytes = max_bytes
        if ivf_nlist is not None and backend != "faiss":
            raise ValueError("ivf_nlist needs backend='faiss'")
        self.dim, self.backend = int(dim), backend
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._features = torch.empty(0, self.dim, device=self.device)
        self._index = None
        if backend == "faiss":
            import faiss  # imported lazily: optional for torch-only users

            self._faiss = faiss
            if ivf_nlist is None:
                self._index = faiss.IndexFlatL2(self.dim)
            else:
                self._quantizer = faiss.IndexFlatL2(self.dim)
                self._index = faiss.IndexIVFFlat(self._quantizer, self.dim, int(ivf_nlist))
                self._index.nprobe = int(nprobe)
            self._gpu_index = None

    def __len__(self) -> int:
        return self._features.shape[0]

    @property
    def features(self) -> torch.Tensor:
        """(N, dim) float32 tensor of everything added so far."""
        return self._features

    def add(self, features: torch.Tensor) -> None:
        """Append (n, dim) floating, finite features."""
        check_tensor("features", features, ndim=2)
        if features.shape[1] != self.dim:
            raise ValueError(f"features must be (n, {self.dim}), got {tuple(features.shape)}")
        f = features.detach().float().to(self.device)
        self._features = torch.cat([self._features, f]) if len(self) else f.contiguous()
        if self.backend == "faiss":
            arr = f.cpu().numpy()
            if not self._index.is_trained:
                if arr.shape[0] < self._index.nlist:
                    raise ValueError(f"IVF needs at least nlist={self._index.nlist} vectors to train, got {arr.shape[0]}")
                self._index.train(arr)
            self._index.add(arr)
            self._gpu_index = None

    def search(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """k nearest bank entries of every query.

        Args:
            queries: (Q, dim) floating, finite.
            k: 1 <= k <= len(bank).
        Returns:
            (Q, k) float32 squared L2 distances (ascending) and (Q, k) int64 bank indices, on
            ``queries.device``.
        """
        check_tensor("queries", queries, ndim=2)
        if queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}), got {tuple(queries.shape)}")
        if distributed.active(self.group):
            return self._search_sharded(queries, k)
        if len(self) == 0:
            raise ValueError("the feature bank is empty: call add() first")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(self):
            raise ValueError(f"k must be an int in [1, {len(self)}] (bank size), got {k!r}")
        if self.backend == "faiss":
            return self._search_faiss(queries, k)
        return self._search_torch(queries, k)

    def _search_sharded(self, queries, k):
        first, total = distributed.offset(len(self), self.group)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= total:
            raise ValueError(f"k must be an int in [1, {total}] (bank size over all ranks), got {k!r}")
        q = queries.shape[0]
        v = torch.full((q, k), float("inf"), device=queries.device)
        i = torch.full((q, k), -1, dtype=torch.long, device=queries.device)
        if len(self):
            kk = min(k, len(self))
            lv, li = self._search_faiss(queries, kk) if self.backend == "faiss" else self._search_torch(queries, kk)
            v[:, :kk], i[:, :kk] = lv, li + first
        device = distributed.collective_device(self.group)
        parts_v = [torch.empty(q, k, device=device) for _ in range(distributed.world_size(self.group))]
        parts_i = [torch.empty(q, k, dtype=torch.long, device=device) for _ in parts_v]
        torch.distributed.all_gather(parts_v, v.to(device), group=self.group)
        torch.distributed.all_gather(parts_i, i.to(device), group=self.group)
        v, i = torch.cat(parts_v, 1), torch.cat(parts_i, 1)
        # merge on (distance, global id): order by id, then a stable sort by distance
        by_id = torch.sort(torch.where(i < 0, torch.iinfo(torch.long).max, i), dim=1, stable=True).indices
        v, i = v.gather(1, by_id), i.gather(1, by_id)
        order = torch.sort(v, dim=1, stable=True).indices[:, :k]
        return v.gather(1, order).to(queries.device), i.gather(1, order).to(queries.device)

    def _budget(self, device: torch.device) -> int | None:
        if self.max_bytes is not None:
            return self.max_bytes
        if device.type == "cuda" and self._features.device != device:  # a host bank streamed to the GPU
            return torch.cuda.mem_get_info(device)[0] // 2
        return None

    def _search_torch(self, queries, k):
        bank = self._features
        n = len(self)
        device = queries.device if bank.device.type == "cpu" else bank.device
        q = queries.detach().float().to(device)
        budget = self._budget(device)
        # bank rows per block (all when uncapped), then query rows so that a distance block fits too
        block = n if budget is None else max(1, min(n, budget // (2 * 4 * self.dim)))
        elements = _CHUNK_ELEMENTS if budget is None else max(1, min(_CHUNK_ELEMENTS, budget // (2 * 4)))
        rows = max(1, elements // block)
        def bank_blocks():
            for start in range(0, n, block):
                b = bank[start : start + block].to(device, non_blocking=True)
                yield start, b, b.pow(2).sum(1).unsqueeze(0)

        resident = list(bank_blocks()) if block == n else None  # else copied per query chunk: it may not fit
        dists, idxs = [], []
        for qs in range(0, q.shape[0], rows):
            qc = q[qs : qs + rows]
            q_sq = qc.pow(2).sum(1, keepdim=True)
            best_v = best_i = None
            for start, b, b_sq in resident or bank_blocks():
                d = torch.addmm(b_sq, qc, b.t(), beta=1.0, alpha=-2.0).add_(q_sq)
                v, i = torch.topk(d.clamp_min_(0.0), min(k, len(b)), dim=1, largest=False, sorted=True)
                if best_v is None:
                    best_v, best_i = v, i + start
                    continue
                # merge on (distance, index): earlier blocks hold the lower indices, the sort is stable
                v, i = torch.cat([best_v, v], 1), torch.cat([best_i, i + start], 1)
                order = torch.sort(v, dim=1, stable=True).indices[:, :k]
                best_v, best_i = v.gather(1, order), i.gather(1, order)
            dists.append(best_v)
            idxs.append(best_i)
        return torch.cat(dists).to(queries.device), torch.cat(idxs).to(queries.device)

    def _search_faiss(self, queries, k):
        index = self._index
        if queries.is_cuda and hasattr(self._faiss, "StandardGpuResources"):
            if self._gpu_index is None:
                self._gpu_res = self._faiss.StandardGpuResources()
                self._gpu_index = self._faiss.index_cpu_to_gpu(self._gpu_res, queries.device.index or 0, index)
            index = self._gpu_index
        d, i = index.search(queries.detach().float().cpu().numpy(), k)
        return torch.from_numpy(d).to(queries.device), torch.from_numpy(i).long().to(queries.device)
