"""The public op API as a contract: the signature of every op in :mod:`fastad.ops` and the schema of
every ``torch.ops.fastad.*`` op, with what each accepts and promises, for fastad ``VERSION``.

``tests/test_op_contract.py`` fails when a signature here and the code differ, when ``VERSION`` is
not ``fastad.__version__``, or when the table's :func:`fingerprint` is not the one ``RELEASED``
records for that version: a changed signature needs a new version (and a new ``RELEASED`` entry). ``python -m fastad.ops.contract`` prints the table.

Common to every op unless its row says otherwise: CPU and CUDA tensors (all inputs on one device);
bad dtype/shape/device, empty input or NaN/inf raise TypeError/ValueError naming the argument;
runs under ``torch.compile`` (data-dependent host loops run eagerly inside compiled code through
``torch.compiler.disable``; the ``torch.ops.fastad`` ops have fake kernels and trace as one node);
``group=`` (a torch.distributed process group, default None = this process alone) makes the op a
collective over row shards with the one-process result.
"""
from __future__ import annotations

VERSION = "0.4.0"

# name -> (signature as inspect.signature prints it, what it takes and gives)
OPS: dict[str, tuple[str, str]] = {
    "greedy_coreset": (
        "(features: 'torch.Tensor', k: 'int | None' = None, *, ratio: 'float | None' = None, projection_dim: 'int | None' = 128, seed: 'int' = 0, num_starts: 'int' = 10, precision: 'str' = 'float32', group=None) -> 'torch.Tensor'",
        "features (N, D) float16/bfloat16/float32/float64 -> (k,) int64 distinct indices in selection order; "
        "precision 'float32' (default, 0.1.0's selection) or 'float16' (selection on the power-of-two-scaled "
        "projection rounded to float16). "
        "Deterministic: a function of (features, k, seed, precision), the same on CPU, CUDA and any number of ranks.",
    ),
    "greedy_coreset_reference": (
        "(projected: 'torch.Tensor', starts: 'torch.Tensor', k: 'int') -> 'torch.Tensor'",
        "Oracle: projected (N, d) floating, starts (S,) int64 -> (k,) int64. Deterministic.",
    ),
    "FeatureBank": (
        "(dim: 'int', backend: 'str' = 'torch', device=None, ivf_nlist: 'int | None' = None, nprobe: 'int' = 8, max_bytes: 'int | None' = None, gemm: 'str' = 'auto', group=None)",
        "add((n, dim) floating); search((Q, dim) floating, k) -> (Q, k) float32 squared L2 ascending, (Q, k) int64, "
        "ties to the lower index (torch backend: the float64 distances of the float32 rows rounded to float32, "
        "the same for every gemm; faiss: its own order). Deterministic for the torch backend.",
    ),
    "knn_rescore": (
        "(score: 'torch.Tensor', slack: 'torch.Tensor', x: 'torch.Tensor', y: 'torch.Tensor', k: 'int') -> 'tuple[torch.Tensor, torch.Tensor]'",
        "score (Q, M) float32/bfloat16/float64 (larger = nearer), slack (Q,) float64 >= 0, x (Q, C), y (M, C) -> "
        "(Q, k) float64 exact squared distances ascending, (Q, k) int64 columns (lower on ties), among the columns "
        "scoring >= k-th best - slack. Deterministic.",
    ),
    "knn_rescore_reference": (
        "(score: 'torch.Tensor', slack: 'torch.Tensor', x: 'torch.Tensor', y: 'torch.Tensor', k: 'int') -> 'tuple[torch.Tensor, torch.Tensor]'",
        "Oracle of knn_rescore, same shapes.",
    ),
    "FeatureBank.add": ("(self, features: 'torch.Tensor') -> 'None'", "Appends (n, dim) floating, finite features."),
    "FeatureBank.search": (
        "(self, queries: 'torch.Tensor', k: 'int' = 1) -> 'tuple[torch.Tensor, torch.Tensor]'",
        "(Q, dim) -> (Q, k) float32 squared distances, (Q, k) int64 indices, on the queries' device.",
    ),
    "nearest_reference": (
        "(x: 'torch.Tensor', bank: 'torch.Tensor', *, metric: 'str' = 'l2', window: 'int | None' = None, group=None)",
        "x (..., C) or windowed (B, H, W, C); bank (M, C) or (K, H, W, C); 16/32/64-bit floats -> values x.shape[:-1] "
        "(x's dtype), int64 indices (lowest on ties), residual x.shape. Deterministic.",
    ),
    "nearest_reference_reference": (
        "(x, bank, *, metric: 'str' = 'l2', window: 'int | None' = None)",
        "Oracle of nearest_reference, same shapes.",
    ),
    "quantile": (
        "(x: 'torch.Tensor', q: 'float', *, dim: 'int | None' = None, nonfinite: 'str' = 'raise', group=None) -> 'torch.Tensor'",
        "Any-shape floating x, q in [0, 1] -> 0-d float32 (float64 for float64 input), bit-identical to "
        "torch.quantile of all elements, for any size; dim=d: one quantile per slice along d, x.shape without d. "
        "No host read on the way (the answer stays on x's device); nonfinite 'raise' (NaN/inf -> ValueError, "
        "one host read) or 'nan' (NaN where a slice holds NaN/inf, no host read). group= takes no dim. "
        "Deterministic.",
    ),
    "quantile_reference": (
        "(x: 'torch.Tensor', q: 'float', *, dim: 'int | None' = None) -> 'torch.Tensor'",
        "Oracle: torch.quantile of all elements (or along dim).",
    ),
    "select_rank": (
        "(x: 'torch.Tensor', rank: 'int', *, dim: 'int | None' = None, nonfinite: 'str' = 'raise', group=None) -> 'torch.Tensor'",
        "Any-shape floating x, 0 <= rank < numel -> 0-d, the rank-th smallest (float32, or float64); dim=d: "
        "per slice along d (0 <= rank < x.shape[d]). nonfinite and host reads as quantile. Deterministic.",
    ),
    "select_rank_reference": (
        "(x: 'torch.Tensor', rank: 'int', *, dim: 'int | None' = None) -> 'torch.Tensor'",
        "Oracle: sort and index (along dim).",
    ),
    "neighbour_masked_attention": (
        "(q, k, v, grid, window, scale=None, *, nonfinite: 'str' = 'raise')",
        "q, k, v (B, heads, N = H*W, d) one floating dtype -> (B, heads, N, d), queries never see their own "
        "window; differentiable in q, k, v. nonfinite 'raise' (NaN/inf -> ValueError, one host read) or "
        "'nan' (no scan, no host read: NaN/inf reach the output). Deterministic forward; backward sums in a "
        "fixed order.",
    ),
    "neighbour_masked_attention_reference": ("(q, k, v, grid, window, scale=None)", "Oracle, same shapes."),
    "local_window_attention": (
        "(q, k, v, grid, window, scale=None, *, nonfinite: 'str' = 'raise')",
        "As neighbour_masked_attention, but queries see only their own window.",
    ),
    "local_window_attention_reference": ("(q, k, v, grid, window, scale=None)", "Oracle, same shapes."),
    "linear_attention": (
        "(q, k, v, eps: 'float' = 0.0, *, nonfinite: 'str' = 'raise')",
        "q, k, v (B, heads, N, d) one floating dtype -> (B, heads, N, d), Dinomaly's elu+1 linear attention; "
        "differentiable in q, k, v; nonfinite as neighbour_masked_attention.",
    ),
    "linear_attention_reference": ("(q, k, v, eps: 'float' = 0.0)", "Oracle, same shapes."),
    "window_mask": (
        "(grid: 'tuple[int, int]', window: 'int', device=None) -> 'torch.Tensor'",
        "(N, N) bool, True where key n is inside query m's window (N = H*W).",
    ),
    "hard_mining_cosine_loss": (
        "(enc_feats, dec_feats, p: 'float', factor: 'float' = 0.1, *, nonfinite: 'str' = 'raise', group=None) -> 'torch.Tensor'",
        "(B, C, H, W) features or sequences of them, any floating dtype -> 0-d float32 (float64 stays), "
        "differentiable in dec_feats; nonfinite 'nan' (a NaN loss for NaN/inf features, no host read in forward "
        "or backward without group) or 'raise'. Deterministic.",
    ),
    "hard_mining_cosine_loss_reference": (
        "(enc_feats, dec_feats, p: 'float', factor: 'float' = 0.1) -> 'torch.Tensor'",
        "Oracle, same shapes.",
    ),
    "adc_loss": (
        "(maps: 'torch.Tensor', p_hard: 'float' = 0.9999, p_lim: 'float' = 0.9995, *, nonfinite: 'str' = 'raise', group=None) -> 'torch.Tensor'",
        "Any-shape floating map -> 0-d loss (float32 for 16-bit input), differentiable; nonfinite as "
        "hard_mining_cosine_loss. Deterministic.",
    ),
    "adc_loss_reference": (
        "(maps: 'torch.Tensor', p_hard: 'float' = 0.9999, p_lim: 'float' = 0.9995) -> 'torch.Tensor'",
        "Oracle, same shapes.",
    ),
    "gaussian_blur": (
        "(maps: 'torch.Tensor', sigma: 'float' = 4.0, truncate: 'float' = 4.0) -> 'torch.Tensor'",
        "(..., H, W) floating -> same shape and dtype (scipy's reflect-mode Gaussian). Deterministic.",
    ),
    "gaussian_blur_small": (
        "(maps: 'torch.Tensor', kernel_size: 'int' = 5, sigma: 'float' = 4.0) -> 'torch.Tensor'",
        "(..., H, W) floating -> same shape and dtype (zero padding, Dinomaly's). Deterministic.",
    ),
}

# torch.ops.fastad schemas (C++/CUDA extension fastad._C and the Triton ops registered in Python)
SCHEMAS: dict[str, tuple[str, str]] = {
    "kcenter_greedy": (
        "fastad::kcenter_greedy(Tensor features, Tensor starts, int k) -> Tensor",
        "features (N, d) float32 contiguous (CPU also float16), starts (S,) int64 on its device -> (k,) int64. "
        "CPU, CUDA. Deterministic.",
    ),
    "kcenter_greedy_stats": (
        "fastad::kcenter_greedy_stats(Tensor features, Tensor starts, int k) -> (Tensor, Tensor)",
        "As kcenter_greedy, and (k, 5) int64 per-step counters: points skipped by the block triangle test, "
        "points skipped by the point test (neither read), blocks tested, earlier centres compared, and the "
        "step's wall time in ns. CPU. Deterministic but for the time column.",
    ),
    "kcenter_init": (
        "fastad::kcenter_init(Tensor features, Tensor start_vectors) -> Tensor",
        "features (n, d) float32, start_vectors (S, d) float32 -> (n,) float64 mean distances. CPU, CUDA.",
    ),
    "kcenter_step": (
        "fastad::kcenter_step(Tensor features, Tensor(a!) dist, Tensor(b!) assign, Tensor centers, int t, int owned, bool prune) -> Tensor",
        "One selection step on a row shard: lowers dist (n,) float64 and assign (n,) int64 in place, -> (3,) "
        "float64 (best distance, its row or -1, points skipped by the triangle test). CPU, CUDA.",
    ),
    "nearest_reference": (
        "fastad::nearest_reference(Tensor x, Tensor bank, int metric, int window) -> (Tensor, Tensor)",
        "x, bank as nearest_reference (metric 0 = l2, 1 = cosine; window 0 = global) -> (n,) float64 values, "
        "(n,) int64 indices. CPU, CUDA.",
    ),
    "knn_rescore": (
        "fastad::knn_rescore(Tensor score, Tensor slack, Tensor x, Tensor y, int k) -> (Tensor, Tensor)",
        "score (Q, M) float32/bfloat16/float64, slack (Q,) float64, x (Q, C), y (M, C) float32, all contiguous -> "
        "(Q, k) float64, (Q, k) int64, as knn_rescore. CPU.",
    ),
    "grid_attention": (
        "fastad::grid_attention(Tensor q, Tensor k, Tensor v, SymInt h, SymInt w, SymInt radius, bool only, float scale) -> (Tensor, Tensor)",
        "Triton (CUDA, or the CPU interpreter): -> output (B, heads, N, d), float32 log-sum-exp (B, heads, N).",
    ),
    "grid_attention_backward": (
        "fastad::grid_attention_backward(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, SymInt h, SymInt w, SymInt radius, bool only, float scale) -> (Tensor, Tensor, Tensor)",
        "Gradients dq, dk, dv of grid_attention.",
    ),
    "linear_attention": (
        "fastad::linear_attention(Tensor q, Tensor k, Tensor v, float eps) -> (Tensor, Tensor, Tensor)",
        "Triton: -> output, float32 KV (B, heads, d, d), float32 sum of phi(k) (B, heads, d).",
    ),
    "linear_attention_backward": (
        "fastad::linear_attention_backward(Tensor do, Tensor q, Tensor k, Tensor v, Tensor kv, Tensor ksum, float eps) -> (Tensor, Tensor, Tensor)",
        "Gradients dq, dk, dv of linear_attention.",
    ),
}


def fingerprint() -> str:
    """sha256 (16 hex digits) of every signature and schema above: the API's identity."""
    import hashlib

    text = "\n".join(f"{n} {sig}" for table in (OPS, SCHEMAS) for n, (sig, _) in sorted(table.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# fingerprint() of each released version: never edit an entry; a changed API adds a version here
RELEASED = {
    "0.1.0": "0bd807fd4f8449d4",
    "0.2.0": "256935837e0f7369",
    "0.3.0": "53b9ddb7bc97ed99",
    "0.4.0": "0f9ebdeda76d76da",
}


def table() -> str:
    """The contract as Markdown (two tables: Python ops, torch.ops schemas)."""
    lines = [f"fastad {VERSION} op contract", "", "| op | signature | contract |", "|---|---|---|"]
    lines += [f"| `{n}` | `{sig}` | {doc} |" for n, (sig, doc) in OPS.items()]
    lines += ["", "| torch.ops.fastad | schema | contract |", "|---|---|---|"]
    lines += [f"| `{n}` | `{sig}` | {doc} |" for n, (sig, doc) in SCHEMAS.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
