"""A bank of feature vectors with exact (or IVF) k-nearest-neighbour search.

Backends:
- ``torch``: exact. A GEMM in low precision finds candidates, and only they are re-scored exactly.
  With ``y = b - mean(bank)``, ``score = q.y - (y.mean + |y|^2 / 2) = (|q - mean|^2 - |q - b|^2) / 2``,
  so per query the rows with the largest score are the nearest. It is one GEMM of ``[q, 1, 1]``
  and ``[y, -hi, -lo]`` (the per-row constant split into a high and a low part) in bfloat16 (CPUs
  with AVX512-BF16/AMX: ~3x a float32 GEMM) or float32, with a rigorous bound ``e`` on its error
  (bfloat16 rounding of both operands and of the output, float32 accumulation; it holds for any
  GEMM at least that precise: float32, TF32). A row scoring more than ``2 e`` below the k-th best
  cannot be among the k nearest; the rest (3.3 rows per query on PatchCore's MVTec bottle bank)
  get their squared distance in float64 from the float32 rows (:func:`knn_rescore`), and the k
  smallest win, the lower index on float64 ties. The result is the float64 answer rounded to
  float32, whatever GEMM found the candidates. CPU or CUDA, in chunks of at most 4096 queries. With
  ``max_bytes`` (or a bank kept in host memory and queried with CUDA tensors) the bank is also
  walked in blocks of at most ``max_bytes / 2`` bytes, copied to the queries' device one at a
  time: banks larger than the device memory are searched.
- ``faiss``: ``IndexFlatL2`` (exact) or, with ``ivf_nlist``, ``IndexIVFFlat`` (approximate) on the
  CPU; moved to the GPU when the queries are CUDA tensors and faiss was built with GPU support
  (the ``gpu`` extra).
Both return **squared** L2 distances, as FAISS does and as PatchCore's official code uses them.

With ``group`` the bank is sharded across processes: each rank ``add``s its rows, every rank
searches the same queries in its shard, and the per-shard top-k (with global ids: the shards'
concatenation in rank order) are all-gathered and merged on (distance, id). Torch backend: the
neighbours and distances of one process searching the whole bank (merged on the float64
distances); FAISS: the same within FAISS's own variation with the batch size (its BLAS blocking).
"""
from __future__ import annotations

import torch

from .. import distributed
from ._checks import check_same_device, check_tensor
from ._triton import tl, triton
from .dispatch import HAS_TRITON, bucket, implementation

__all__ = ["FeatureBank", "knn_rescore", "knn_rescore_reference"]

_CHUNK_ELEMENTS = 1 << 24  # queries x bank block size of the torch backend
_QUERY_ROWS = 4096  # queries per GEMM at most: 4096 beat 1024 and 10k+ rows (2-core CPU, 1,638 x 1,024 bank)
_GEMMS = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_U = 2.0 ** -8  # unit roundoff of bfloat16, the coarsest GEMM the candidate bound allows for
_PAIR_ELEMENTS = 1 << 22  # pairs x dim per chunk of the PyTorch re-scoring
_TOP_EXTRA = 15  # the Triton re-scoring takes the k + 15 best scores (rounded up to a power of two) per query
_TOP_MAX = 256  # ... at most: a larger k takes the PyTorch re-scoring


def operand_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff of the operands of a GEMM in ``dtype`` as torch runs it: bfloat16 2^-8; float32 by
    ``torch.get_float32_matmul_precision()``: 'highest' 2^-24, 'high' 2^-11 (TF32, or bfloat16 x3 which
    is finer), 'medium' 2^-8 (bfloat16); float64 2^-24 (float32 rows, exact products)."""
    if dtype == torch.float32:
        return {"highest": 2.0 ** -24, "high": 2.0 ** -11}.get(torch.get_float32_matmul_precision(), _U)
    return 2.0 ** -24 if dtype == torch.float64 else _U


def _cpu_has_bf16_dot() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# True where the CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX, from /proc/cpuinfo): there
# oneDNN's bfloat16 GEMM is ~3x its float32 GEMM; elsewhere it is emulated and slower
CPU_HAS_BF16_DOT = _cpu_has_bf16_dot()


def knn_rescore_reference(score: torch.Tensor, slack: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                          k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle of :func:`knn_rescore` in PyTorch (candidates in float64, their distances in pair chunks)."""
    return _candidates_reference(score, slack, x, y, k)


def _pair_values(x, y, qi, bi, metric, norms):
    """float64 l2: |x[qi] - y[bi]|^2; cosine: x[qi].y[bi] / (norms[0][qi] norms[1][bi]); in pair chunks."""
    d = torch.empty(qi.shape[0], dtype=torch.float64, device=x.device)
    step = max(1, _PAIR_ELEMENTS // max(1, x.shape[1]))
    for p in range(0, qi.shape[0], step):
        a, b = x[qi[p : p + step]].double(), y[bi[p : p + step]].double()
        if metric == "l2":
            d[p : p + step] = (a - b).pow(2).sum(1)
        else:
            d[p : p + step] = (a * b).sum(1) / (norms[0][qi[p : p + step]] * norms[1][bi[p : p + step]])
    return d


def _candidates_reference(score, slack, x, y, k, metric="l2", norms=None):
    """The candidates of :func:`knn_rescore` (columns scoring >= k-th best - slack) re-scored exactly by
    ``metric``: l2 (squared distance, smallest first) or cosine (``norms``: (Q,) and (M,) float64 row
    norms clamped at eps; largest first); (Q, k) float64 values and int64 columns, lower column on ties."""
    s = score.double()
    threshold = s.topk(k, 1).values[:, -1] - slack
    qi, bi = (s >= threshold.unsqueeze(1)).nonzero(as_tuple=True)
    d = _pair_values(x, y, qi, bi, metric, norms)
    key = d if metric == "l2" else -d
    for by in ("distance", "query"):  # nonzero lists pairs by (query, column): now by (query, value, column)
        order = torch.sort(key if by == "distance" else qi, stable=True).indices
        qi, bi, d, key = qi[order], bi[order], d[order], key[order]
    counts = torch.bincount(qi, minlength=score.shape[0])  # >= k each: the k best scores pass
    pos = (torch.cumsum(counts, 0) - counts).unsqueeze(1) + torch.arange(k, device=qi.device)
    return d[pos], bi[pos]


def _top_config(k: int) -> dict:
    """Launch configuration of the Triton re-scoring for ``k`` neighbours: BLOCK_K candidates per query
    (k + 15 rounded up to a power of two), BLOCK_C channels per step (1024 float64 values a tile)."""
    block_k = bucket(k + _TOP_EXTRA)
    return dict(BLOCK_K=block_k, BLOCK_C=max(4, 1024 // block_k), num_warps=4, num_stages=2)


def _candidates_top(score, slack, x, y, k, metric="l2", norms=None):
    """:func:`_candidates_reference` with no nonzero and no data-sized host work: the ``BLOCK_K`` best
    scores of each query (``torch.topk``) re-scored in float64 by one Triton launch, those outside the
    bound masked. A query with more candidates than that (its BLOCK_K-th best score is still inside the
    bound: near-duplicates, or a loose bound) is re-done by the reference: one host read per call says
    whether any is. x, y float32 contiguous; score's columns = y's rows."""
    q, m = score.shape
    cfg = _top_config(k)
    c = min(m, cfg["BLOCK_K"])
    top, cols = score.topk(c, dim=1)  # descending scores
    top = top.double()
    inside = top >= (top[:, k - 1] - slack).unsqueeze(1)
    more = inside[:, -1] & (c < m)
    cols, order = torch.sort(cols, dim=1)  # by column: the stable sort below keeps the lower column first
    inside = inside.gather(1, order)
    values = torch.empty(q, c, dtype=torch.float64, device=x.device)
    xn, yn = norms if metric == "cosine" else (values, values)  # (unused pointers for l2)
    _pair_kernel[(q,)](x, y, cols, xn, yn, values, x.shape[1], c, COSINE=metric == "cosine", **cfg)
    key = torch.where(inside, values if metric == "l2" else -values, torch.inf)
    best = torch.sort(key, dim=1, stable=True).indices[:, :k]
    values, cols = values.gather(1, best), cols.gather(1, best)
    if bool(more.any()):  # the one host read
        rows = more.nonzero().reshape(-1)
        norm_rows = None if norms is None else (norms[0][rows], norms[1])
        values[rows], cols[rows] = _candidates_reference(score[rows], slack[rows], x[rows], y, k, metric, norm_rows)
    return values, cols


if HAS_TRITON:

    @triton.jit(do_not_specialize=["C", "K"])
    def _pair_kernel(x_ptr, y_ptr, col_ptr, xn_ptr, yn_ptr, out_ptr, C, K,
                     COSINE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
        """Query row r (one program) against its K candidate rows col[r, :]: float64 |x - y|^2, or the
        float64 dot over the norms (COSINE), from float32 rows."""
        r = tl.program_id(0).to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        km = ks < K
        cols = tl.load(col_ptr + r * K + ks, mask=km, other=0)
        acc = tl.zeros([BLOCK_K], dtype=tl.float64)
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)
            cm = cs < C
            xv = tl.load(x_ptr + r * C + cs, mask=cm, other=0.0).to(tl.float64)
            yv = tl.load(y_ptr + cols[:, None] * C + cs[None, :], mask=km[:, None] & cm[None, :], other=0.0).to(tl.float64)
            if COSINE:
                acc += tl.sum(xv[None, :] * yv, axis=1)
            else:
                d = xv[None, :] - yv
                acc += tl.sum(d * d, axis=1)
        if COSINE:
            acc = acc / (tl.load(xn_ptr + r) * tl.load(yn_ptr + cols, mask=km, other=1.0))
        tl.store(out_ptr + r * K + ks, acc, mask=km)


def knn_rescore(score: torch.Tensor, slack: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest rows of ``y`` for each row of ``x``, among the candidates an approximate score names.

    The candidates of query r are the columns j with ``score[r, j] >= (k-th largest of score[r]) -
    slack[r]``; each gets its squared L2 distance ``|x[r] - y[j]|^2`` in float64 from the float32
    rows, and the k smallest (distance, then the lower column) are returned. When ``score`` is
    ``-|x[r] - y[j]|^2 / 2`` plus a per-row constant, up to an error of at most ``slack[r] / 2``,
    the result is the exact k nearest neighbours (:class:`FeatureBank`'s use).

    Args:
        score: (Q, M) float32/bfloat16/float64, finite; larger = nearer.
        slack: (Q,) float64, finite, >= 0.
        x: (Q, C) and y: (M, C) floating, finite (used as float32), all on one device.
        k: 1 <= k <= M.
    Returns:
        (Q, k) float64 squared distances, ascending, and (Q, k) int64 columns of ``y``. The C++
        kernel on the CPU; on CUDA the k + 15 best scores per query (``torch.topk``) re-scored by a
        Triton kernel, with the reference for any query that has more candidates (one host read per
        call); :func:`knn_rescore_reference` elsewhere. The same columns, and values up to the order
        of a float64 sum.
    """
    check_tensor("score", score, ndim=2)
    check_tensor("slack", slack, ndim=1)
    check_tensor("x", x, ndim=2)
    check_tensor("y", y, ndim=2)
    if score.dtype not in (torch.float32, torch.bfloat16, torch.float64) or slack.dtype != torch.float64:
        raise TypeError(f"score must be float32/bfloat16/float64 and slack float64, got {score.dtype} and {slack.dtype}")
    q, m = score.shape
    if slack.shape[0] != q or x.shape[0] != q or y.shape[0] != m or x.shape[1] != y.shape[1]:
        raise ValueError(f"need score (Q, M), slack (Q,), x (Q, C), y (M, C); got score {tuple(score.shape)}, "
                         f"slack {tuple(slack.shape)}, x {tuple(x.shape)}, y {tuple(y.shape)}")
    if bool((slack < 0).any()):
        raise ValueError("slack must be >= 0")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= m:
        raise ValueError(f"k must be an int in [1, {m}] (rows of y), got {k!r}")
    check_same_device(score=score, slack=slack, x=x, y=y)
    return _knn_rescore(score, slack, x.float(), y.float(), k)


def _knn_rescore(score, slack, x, y, k):
    """knn_rescore of checked inputs (x, y float32): the C++ kernel on the CPU, the top-k candidates and a
    Triton re-scoring on CUDA (no nonzero), else the reference."""
    name = implementation(x, extension=x.device.type == "cpu", triton=k + _TOP_EXTRA <= _TOP_MAX)
    if name == "extension":
        return torch.ops.fastad.knn_rescore(score.contiguous(), slack.contiguous(), x.contiguous(), y.contiguous(), k)
    if name == "triton":
        return _candidates_top(score, slack, x.contiguous(), y.contiguous(), k)
    return knn_rescore_reference(score, slack, x, y, k)


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
        gemm: torch only: the GEMM that finds the candidates, ``'bfloat16'``, ``'float32'`` or
            ``'auto'`` (bfloat16 on CPUs with AVX512-BF16/AMX, else float32; float32 on CUDA until
            bfloat16 there is validated on a GPU). The results do not depend on it.
        group: torch.distributed process group over which the bank is sharded (None: this
            process alone); ``len`` and ``features`` are then this rank's shard, and ``search``
            is a collective that every rank calls with the same queries.
    """

    def __init__(self, dim: int, backend: str = "torch", device=None, ivf_nlist: int | None = None, nprobe: int = 8,
                 max_bytes: int | None = None, gemm: str = "auto", group=None):
        self.group = group
        if gemm != "auto" and gemm not in _GEMMS:
            raise ValueError(f"gemm must be 'auto', 'bfloat16' or 'float32', got {gemm!r}")
        self.gemm = gemm
        self._prepared: dict = {}  # "stats" and (dtype, block rows) -> the bank's GEMM operands, until add()
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
        self._prepared.clear()
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
        v, i = self._search_torch(queries, k)
        return v.float(), i

    def _search_sharded(self, queries, k):
        first, total = distributed.offset(len(self), self.group)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= total:
            raise ValueError(f"k must be an int in [1, {total}] (bank size over all ranks), got {k!r}")
        q = queries.shape[0]
        v = torch.full((q, k), float("inf"), dtype=torch.float64, device=queries.device)
        i = torch.full((q, k), -1, dtype=torch.long, device=queries.device)
        if len(self):
            kk = min(k, len(self))
            lv, li = self._search_faiss(queries, kk) if self.backend == "faiss" else self._search_torch(queries, kk)
            v[:, :kk], i[:, :kk] = lv.double(), li + first
        device = distributed.collective_device(self.group)
        parts_v = [torch.empty(q, k, dtype=torch.float64, device=device) for _ in range(distributed.world_size(self.group))]
        parts_i = [torch.empty(q, k, dtype=torch.long, device=device) for _ in parts_v]
        torch.distributed.all_gather(parts_v, v.to(device), group=self.group)
        torch.distributed.all_gather(parts_i, i.to(device), group=self.group)
        v, i = torch.cat(parts_v, 1), torch.cat(parts_i, 1)
        # merge on (distance, global id): order by id, then a stable sort by distance
        by_id = torch.sort(torch.where(i < 0, torch.iinfo(torch.long).max, i), dim=1, stable=True).indices
        v, i = v.gather(1, by_id), i.gather(1, by_id)
        order = torch.sort(v, dim=1, stable=True).indices[:, :k]
        return v.gather(1, order).float().to(queries.device), i.gather(1, order).to(queries.device)

    def _budget(self, device: torch.device) -> int | None:
        if self.max_bytes is not None:
            return self.max_bytes
        if device.type == "cuda" and self._features.device != device:  # a host bank streamed to the GPU
            return torch.cuda.mem_get_info(device)[0] // 2
        return None

    def _gemm_dtype(self, device: torch.device) -> torch.dtype:
        if self.gemm != "auto":
            return _GEMMS[self.gemm]
        return torch.bfloat16 if device.type == "cpu" and CPU_HAS_BF16_DOT else torch.float32

    def _stats(self):
        """(mean (float64 holding the float32-rounded bank mean), max |y|, max |y.mean + |y|^2 / 2|)
        with y = row - mean, over the whole bank; cached until the next ``add``."""
        if "stats" not in self._prepared:
            bank = self._features
            mean = bank.sum(0, dtype=torch.float64).div_(len(bank)).float().double()  # no float64 copy of the bank
            y_max = k_max = 0.0
            for start in range(0, len(bank), _QUERY_ROWS):
                y = bank[start : start + _QUERY_ROWS].double() - mean
                sq = y.pow(2).sum(1)
                y_max = max(y_max, float(sq.max()) ** 0.5)
                k_max = max(k_max, float((y @ mean + sq * 0.5).abs().max()))
            self._prepared["stats"] = (mean, y_max, k_max)
        return self._prepared["stats"]

    def _blocks(self, dtype, block, mean):
        """Per bank block ``(start, rows (float32), [y, -hi, -lo] (dtype))`` on the bank's device, with
        y = rows - mean and hi + lo = y.mean + |y|^2 / 2 split into two numbers of ``dtype``. Kept
        until the next ``add`` when the whole bank is one block; else built block by block per use (a
        host bank streamed to a GPU: at most one block's operands exist at a time)."""
        key = (dtype, block)
        if key in self._prepared:
            return self._prepared[key]
        bank = self._features

        def build():
            for start in range(0, len(bank), block):
                rows = bank[start : start + block]
                y = rows.double() - mean  # exact: a difference of float32 values
                const = y @ mean + y.pow(2).sum(1).mul_(0.5)
                hi = const.to(dtype)
                lo = (const - hi.double()).to(dtype)
                yield start, rows, torch.cat([y.to(dtype), -hi.unsqueeze(1), -lo.unsqueeze(1)], 1)

        if block < len(bank):
            return build()
        self._prepared[key] = list(build())
        return self._prepared[key]

    def _search_torch(self, queries, k):
        """(Q, k) float64 squared distances (the float32 rows' exact ones) and int64 indices."""
        bank = self._features
        n, dim = len(self), self.dim
        device = queries.device if bank.device.type == "cpu" else bank.device
        q = queries.detach().float().to(device)
        budget = self._budget(device)
        # bank rows per block (all when uncapped), then query rows so that a score block fits too
        block = n if budget is None else max(1, min(n, budget // (2 * 8 * (dim + 2))))
        elements = _CHUNK_ELEMENTS if budget is None else max(1, min(_CHUNK_ELEMENTS, budget // (2 * 8)))
        rows = max(1, min(_QUERY_ROWS, elements // block))
        dtype = self._gemm_dtype(device)
        mean, y_max, k_max = self._stats()
        # score = q.y - (y.mean + |y|^2 / 2) = (|q - mean|^2 - |q - b|^2) / 2, one GEMM of x = [q, 1, 1]
        # and [y, -hi, -lo]. |computed - exact| <= c (|q| |y| + |hi + lo|): the rounding of both
        # operands to the GEMM's precision u (bfloat16, TF32 or float32: operand_roundoff) and of the
        # output, float32 accumulation of dim + 2 terms, the hi/lo split (5% covers the second-order
        # terms); tiny: products flushed to zero
        u = operand_roundoff(dtype)
        gamma = (dim + 2) * 2.0 ** -24
        c = 1.05 * (3 * u + 8 * u * u + 3 * gamma)
        tiny = (dim + 4) * 2.0 ** -125
        values, indices = [], []
        for qs in range(0, q.shape[0], rows):
            qc = q[qs : qs + rows]
            # >= |q| and >= |rounded q|: float32 norm (accumulation error ~dim 2^-24), widened
            q_norm = torch.linalg.vector_norm(qc, dim=1).double() * (1 + 8 * _U)
            # products near the float32/bfloat16 range (|q| |y| >= 2^100): this chunk in float64
            chunk_dtype = dtype if float(q_norm.max()) * y_max + k_max < 2.0 ** 100 else torch.float64
            x = torch.empty(qc.shape[0], dim + 2, dtype=chunk_dtype, device=device)
            x[:, :dim] = qc
            x[:, dim:] = 1
            e = c * (q_norm * y_max + k_max) + tiny
            found_d, found_i = [], []
            for start, b_rows, ops in self._blocks(chunk_dtype, block, mean):
                ops = ops.to(device, non_blocking=True)
                d, i = _knn_rescore(x @ ops.t(), 2 * e, qc, b_rows.to(device), min(k, ops.shape[0]))
                found_d.append(d)
                found_i.append(i + start)
            d, i = torch.cat(found_d, 1), torch.cat(found_i, 1)
            if len(found_d) > 1:  # blocks hold ascending indices, each sorted: a stable sort keeps ties in order
                order = torch.sort(d, dim=1, stable=True).indices[:, :k]
                d, i = d.gather(1, order), i.gather(1, order)
            values.append(d)
            indices.append(i)
        return torch.cat(values).to(queries.device), torch.cat(indices).to(queries.device)

    def _search_faiss(self, queries, k):
        index = self._index
        if queries.is_cuda and hasattr(self._faiss, "StandardGpuResources"):
            if self._gpu_index is None:
                self._gpu_res = self._faiss.StandardGpuResources()
                self._gpu_index = self._faiss.index_cpu_to_gpu(self._gpu_res, queries.device.index or 0, index)
            index = self._gpu_index
        d, i = index.search(queries.detach().float().cpu().numpy(), k)
        return torch.from_numpy(d).to(queries.device), torch.from_numpy(i).long().to(queries.device)

