"""PatchCore's pieces (official amazon-science code, spec section 6), shared by PatchCore and
FeatureNorm's PatchCore scorer: locally aware patch embeddings and the memory bank that scores them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ... import distributed
from ...faults import memory_stage
from ...ops import FeatureBank, greedy_coreset

__all__ = ["MemoryBank", "PatchEmbedding", "pool_matrix"]


def pool_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``adaptive_avg_pool1d`` from ``n_in`` to ``n_out`` as an (n_out, n_in) float64 matrix: output i
    averages inputs [floor(i * n_in / n_out), ceil((i + 1) * n_in / n_out)) (PyTorch's bins)."""
    i = torch.arange(n_out, dtype=torch.int64)
    start, end = (i * n_in) // n_out, ((i + 1) * n_in + n_out - 1) // n_out
    j = torch.arange(n_in, dtype=torch.int64)
    inside = (j >= start[:, None]) & (j < end[:, None])
    return inside.double() / (end - start).double()[:, None]


_ROWS_PER_BLOCK = 64  # output rows per convolution block of PatchEmbedding (a few input channels each)


class PatchEmbedding(nn.Module):
    """Levels of (B, C_l, h_l, w_l) features -> (B, h*w, target_embed_dim) float32 patch features on
    the first level's (h, w) grid: per level a ``patch_size`` x ``patch_size`` neighbourhood (unfold,
    zero padding), the coarser levels bilinearly resized slot by slot, each level's C*p*p patch
    ``adaptive_avg_pool1d``-ed to ``pretrain_embed_dim``, the levels stacked and pooled to
    ``target_embed_dim``. Forward returns (embeddings, (h, w)).

    Every step is a fixed linear map, so they are computed as one: per level, the two poolings
    compose into a (target, C_l * p * p) matrix W_l, and unfold followed by W_l is a p x p convolution
    with W_l as its weight; the bilinear resize commutes with a map over channels, so a coarse level
    is convolved on its own grid and the result resized. W_l is banded (an output averages adjacent
    entries of the C_l * p * p vector, and each level feeds only its share of the outputs), so it
    is applied in blocks of output rows, each a convolution over the few input channels it reads:
    the same sums without the zeros (about 12x fewer flops than the dense W_l for EfficientNet-Lite0).
    The official unfold / resize / pool pipeline (:meth:`reference`) gives the same values up to
    float32 rounding, moving C_l * p * p-channel copies of every level through memory on the way.
    """

    def __init__(self, patch_size: int = 3, pretrain_embed_dim: int = 1024, target_embed_dim: int = 1024):
        super().__init__()
        self.patch_size, self.pretrain_embed_dim, self.target_embed_dim = patch_size, pretrain_embed_dim, target_embed_dim
        self._weights: dict[tuple, list[list[tuple]]] = {}  # (channels, dtype, device) -> blocks per level

    def weights(self, channels: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> list[list[tuple]]:
        """Per level the blocks ``(r0, r1, c0, c1, weight)`` of the composed poolings: output rows
        [r0, r1) read only input channels [c0, c1), through the (r1 - r0, c1 - c0, p, p) convolution
        ``weight`` (the float64 product rounded once to ``dtype``); rows a level does not reach and
        columns of zeros are left out. Cached per (channels, dtype, device)."""
        key = (tuple(channels), dtype, device)
        if key not in self._weights:
            p, pre, target = self.patch_size, self.pretrain_embed_dim, self.target_embed_dim
            final = pool_matrix(len(channels) * pre, target)  # (target, levels * pre)
            levels = []
            for lvl, c in enumerate(channels):
                w = final[:, lvl * pre : (lvl + 1) * pre] @ pool_matrix(c * p * p, pre)  # (target, c * p * p)
                blocks = []
                for r0 in range(0, target, _ROWS_PER_BLOCK):
                    r1 = min(target, r0 + _ROWS_PER_BLOCK)
                    rows, cols = torch.nonzero(w[r0:r1], as_tuple=True)
                    if rows.numel() == 0:
                        continue
                    r0, r1 = r0 + int(rows.min()), r0 + int(rows.max()) + 1
                    c0, c1 = int(cols.min()) // (p * p), int(cols.max()) // (p * p) + 1
                    weight = w[r0:r1].reshape(r1 - r0, c, p, p)[:, c0:c1].to(device, dtype).contiguous()
                    blocks.append((r0, r1, c0, c1, weight))
                levels.append(blocks)
            self._weights[key] = levels
        return self._weights[key]

    def forward(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        b = feats[0].shape[0]
        h, w = feats[0].shape[-2:]
        levels = self.weights(tuple(f.shape[1] for f in feats), feats[0].dtype, feats[0].device)
        # (B, h, w, target) storage, written through a (B, target, h, w) view: no final transpose copy
        out = feats[0].new_zeros(b, h, w, self.target_embed_dim).permute(0, 3, 1, 2)
        for f, blocks in zip(feats, levels):
            y = torch.cat([F.conv2d(f[:, c0:c1], weight, padding=self.patch_size // 2) for _, _, c0, c1, weight in blocks], 1)
            if y.shape[-2:] != (h, w):
                y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
            start = 0
            for r0, r1, *_ in blocks:
                out[:, r0:r1] += y[:, start : start + r1 - r0]
                start += r1 - r0
        return out.permute(0, 2, 3, 1).reshape(b, h * w, self.target_embed_dim), (h, w)

    def reference(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        """The official pipeline step by step (unfold, resize, adaptive pools): the oracle of ``forward``."""
        b = feats[0].shape[0]
        h, w = feats[0].shape[-2:]
        p = self.patch_size
        pooled = []
        for f in feats:
            c, fh, fw = f.shape[1:]
            u = F.unfold(f, p, padding=p // 2).view(b, c * p * p, fh, fw)
            if (fh, fw) != (h, w):
                u = F.interpolate(u, size=(h, w), mode="bilinear", align_corners=False)
            u = u.permute(0, 2, 3, 1).reshape(b * h * w, 1, c * p * p)
            pooled.append(F.adaptive_avg_pool1d(u, self.pretrain_embed_dim))
        stacked = torch.cat(pooled, 1).reshape(b * h * w, 1, -1)
        out = F.adaptive_avg_pool1d(stacked, self.target_embed_dim).reshape(b, h * w, self.target_embed_dim)
        return out, (h, w)


class MemoryBank(nn.Module):
    """A coreset of normal patch features and its nearest-neighbour scoring.

    Args:
        dim: feature size.
        backend: :class:`fastad.ops.FeatureBank` backend ('torch' or 'faiss').
        max_bytes: device memory the kNN search may use (None: no cap). A bank larger than this
            stays in host memory when the module moves to a GPU and is searched in blocks
            streamed to the device (the same neighbours and distances: the search is exact).
        sharded: in a distributed :meth:`fill`, keep only this rank's coreset rows (memory per
            process divided by the number of processes); scoring is then a collective (every
            rank's queries searched in every shard) and the bank cannot be saved to one file.
    Buffer ``memory_bank`` (M, dim) float32 is saved with the model.
    """

    def __init__(self, dim: int, backend: str = "torch", max_bytes: int | None = None, sharded: bool = False):
        super().__init__()
        self.dim, self.backend, self.max_bytes, self.sharded = dim, backend, max_bytes, sharded
        self.register_buffer("memory_bank", torch.empty(0, dim))
        self._index: tuple | None = None  # (key of the bank it was built from, FeatureBank)
        self.group = None  # the process group a sharded bank is spread over

    def _on_host(self, bank: torch.Tensor) -> bool:
        return self.max_bytes is not None and bank.numel() * bank.element_size() > self.max_bytes

    def buffer_device(self, name: str, value: torch.Tensor) -> torch.device | None:
        """Where a loaded buffer goes (AnomalyModel.load_state_dict): a bank over the cap on the host."""
        return torch.device("cpu") if name == "memory_bank" and self._on_host(value) else None

    def _apply(self, fn, recurse=True):
        # .to(device) / .cuda(): a bank over the cap stays on the host (copying it could not fit)
        bank = self._buffers["memory_bank"]
        if not self._on_host(bank):
            return super()._apply(fn, recurse)
        del self._buffers["memory_bank"]
        try:
            return super()._apply(fn, recurse)
        finally:
            self._buffers["memory_bank"] = bank

    @torch.no_grad()
    def fill(self, features: torch.Tensor, coreset_ratio: float = 0.1, projection_dim: int = 128, seed: int = 0,
             group=None, precision: str = "float32") -> None:
        """(N, dim) normal features -> the bank: their greedy coreset of ``coreset_ratio`` (1.0 keeps
        all) with a ``projection_dim`` random projection, ``seed`` and selection ``precision``. With ``group`` ``features``
        is this rank's contiguous shard; every rank gets the whole bank (the rows in selection order;
        with ``sharded``, only its own rows)."""
        self.group = group if self.sharded and distributed.active(group) else None
        if distributed.active(group):
            features = self._select_across(features, coreset_ratio, projection_dim, seed, group, self.sharded, precision)
        elif len(features) == 0:
            raise ValueError("the memory bank got no training features")
        elif coreset_ratio < 1.0:
            with memory_stage("the coreset selection", "lower coreset_ratio or projection_dim (--set), or fit on the CPU"):
                features = features[greedy_coreset(features, ratio=coreset_ratio, projection_dim=projection_dim, seed=seed,
                                                   precision=precision)]
        home = torch.device("cpu") if self._on_host(features) else self._buffers["memory_bank"].device  # the module's device
        self.memory_bank = features.to(home).contiguous()

    @staticmethod
    def _select_across(features, coreset_ratio, projection_dim, seed, group, keep_own: bool,
                       precision: str = "float32") -> torch.Tensor:
        """The coreset rows of features sharded over ``group``, on every rank, in selection order
        (``keep_own``: only the rows this rank holds, in selection order)."""
        first, total = distributed.offset(len(features), group)
        if total == 0:
            raise ValueError("the memory bank got no training features")
        if coreset_ratio < 1.0:
            with memory_stage("the coreset selection", "lower coreset_ratio or projection_dim (--set), or fit on the CPU"):
                chosen = greedy_coreset(features, ratio=coreset_ratio, projection_dim=projection_dim, seed=seed,
                                        precision=precision, group=group).to(features.device)
        else:
            chosen = torch.arange(total, device=features.device)
        mine = torch.nonzero((chosen >= first) & (chosen < first + len(features))).flatten()
        if keep_own:
            return features[chosen[mine] - first]
        device = distributed.collective_device(group)
        rows = distributed.gather_rows(features[chosen[mine] - first].to(device), group)
        where = distributed.gather_rows(mine.to(device), group)
        bank = torch.empty(len(chosen), features.shape[1], dtype=features.dtype, device=device)
        bank[where] = rows  # rows copied, not summed: the bank is bit-identical to one process's
        return bank.to(features.device)

    def _search_index(self) -> FeatureBank:
        bank = self.memory_bank
        if len(bank) == 0 and self.group is None:
            raise RuntimeError("not fitted (the memory bank is empty): call fit() or load a checkpoint first")
        key = (id(bank), bank._version, bank.device)  # rebuilt when the buffer is replaced, loaded into or moved
        if self._index is None or self._index[0] != key:
            index = FeatureBank(self.dim, self.backend, device=bank.device, max_bytes=self.max_bytes, group=self.group)
            if len(bank):
                index.add(bank)
            self._index = (key, index)
        return self._index[1]

    @torch.no_grad()
    def score(self, emb: torch.Tensor, num_neighbors: int = 1, reweight: bool = False,
              reweight_neighbors: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, dim) patch features -> (image scores (B,), patch scores (B, L)): mean squared L2
        distance to the ``num_neighbors`` nearest entries (official: 1); image score = max patch
        score, with ``reweight`` anomalib's re-weighting by the ``reweight_neighbors`` bank
        neighbours of the worst patch's nearest entry (Euclidean distances in the softmax)."""
        b, n, d = emb.shape
        index = self._search_index()
        queries = emb.reshape(-1, d)
        if self.group is not None:  # a sharded bank: every rank's queries are searched in every shard
            if reweight:
                raise ValueError("re-weighting needs the whole bank on every process; use bank='replicated'")
            first, _ = distributed.offset(len(queries), self.group)
            device = distributed.collective_device(self.group)
            queries = distributed.gather_rows(queries.to(device), self.group).to(emb.device)
        with memory_stage("the kNN search", "cap its memory with --set bank_memory=BYTES (the bank is searched in blocks) "
                          "or lower --batch-size"):
            dist, idx = index.search(queries, num_neighbors)
        if self.group is not None:
            dist, idx = dist[first : first + b * n], idx[first : first + b * n]
        patch = dist.mean(1).reshape(b, n)
        best, arg = patch.max(1)
        if not reweight:
            return best, patch
        rows = torch.arange(b, device=emb.device)
        worst = emb[rows, arg]  # most anomalous test patch per image
        bank = self.memory_bank
        anchor = bank[idx[:, 0].reshape(b, n)[rows, arg].to(bank.device)].to(emb.device)  # its nearest bank entry
        k = min(reweight_neighbors, len(bank))
        _, support = index.search(anchor, k)
        d = torch.linalg.vector_norm(worst.unsqueeze(1) - bank[support.to(bank.device)].to(emb.device), dim=-1)
        return (1.0 - torch.softmax(d, 1)[:, 0]) * best, patch
