import pytest
import torch

from conftest import skip_unless_runs

from fastad.ops import FeatureBank, dispatch, knn_rescore, knn_rescore_reference
from fastad.ops import feature_bank

GEMMS = ["bfloat16", "float32"]


@pytest.fixture(params=["extension", "triton"])
def rescore(request, monkeypatch):
    """Runs a test through the C++ re-scoring (the CPU's) and through the top-k + Triton re-scoring
    (CUDA's; here under the interpreter)."""
    if request.param == "triton":
        skip_unless_runs("triton", "cpu")
        monkeypatch.setitem(dispatch.settings, "extension", False)
    return request.param


def _brute(q, b, k):
    """The float64 k nearest (distance, then lower index) by explicit differences."""
    d = torch.cdist(q.double(), b.double(), compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    v, i = torch.sort(d, dim=1, stable=True)
    return v[:, :k], i[:, :k]


def _assert_exact(d, i, q, b, k):
    """Indices equal the float64 search's, and each distance is that float64 value rounded to float32:
    within half a float32 ulp plus the float64 error of a dim-term sum (both sums' orders may differ)."""
    wd, wi = _brute(q, b, k)
    assert torch.equal(i, wi) and d.dtype == torch.float32
    slack = wd * (2.0**-24 + 2 * q.shape[1] * 2.0**-53)
    assert bool(((d.double() - wd).abs() <= slack).all())


@pytest.mark.parametrize("n,q,k", [(1, 1, 1), (100, 7, 3), (3000, 513, 9)])
def test_torch_backend_exact(n, q, k, rescore):
    bank = FeatureBank(32)
    data = torch.randn(n, 32)
    bank.add(data[: n // 2 + 1])
    bank.add(data[n // 2 + 1 :]) if n > 1 else None
    queries = torch.randn(q, 32)
    d, i = bank.search(queries, k)
    _assert_exact(d, i, queries, data, k)


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("n,q,k,dim", [(1, 1, 1, 1), (37, 5, 37, 3), (1000, 300, 1, 130), (2500, 64, 9, 1024)])
def test_exact_with_either_gemm_on_offset_clustered_data(gemm, n, q, k, dim, rescore):
    # PatchCore-like: non-negative features far from the origin (the bound grows with |q| |y|), in
    # tight clusters, queries near bank rows
    g = torch.Generator().manual_seed(n + dim)
    centres = 10 + 5 * torch.rand(max(1, n // 50), dim, generator=g)
    data = centres[torch.randint(len(centres), (n,), generator=g)] + 0.05 * torch.rand(n, dim, generator=g)
    queries = data[torch.randint(n, (q,), generator=g)] + 0.01 * torch.randn(q, dim, generator=g)
    bank = FeatureBank(dim, gemm=gemm)
    bank.add(data)
    d, i = bank.search(queries, k)
    _assert_exact(d, i, queries, data, k)


def test_the_result_does_not_depend_on_the_gemm_or_the_blocks():
    g = torch.Generator().manual_seed(3)
    data, queries = torch.rand(3000, 64, generator=g) + 2, torch.rand(700, 64, generator=g) + 2
    results = []
    for gemm in GEMMS:
        for cap in (None, 64 * 1024):  # one block, or ~30 bank blocks and query chunks
            bank = FeatureBank(64, gemm=gemm, max_bytes=cap)
            bank.add(data)
            results.append(bank.search(queries, 4))
    for d, i in results[1:]:
        assert torch.equal(d, results[0][0]) and torch.equal(i, results[0][1])


@pytest.mark.parametrize("gemm", GEMMS)
def test_duplicates_and_exact_ties_go_to_the_lower_index(gemm, rescore):
    # small integers: every distance is exact in every precision, and many tie
    g = torch.Generator().manual_seed(5)
    rows = torch.randint(0, 4, (40, 16), generator=g).float()
    data = torch.cat([rows, rows, rows[:7]])  # each of the first 7 rows three times
    queries = torch.cat([rows[:10], torch.randint(0, 4, (50, 16), generator=g).float()])
    bank = FeatureBank(16, gemm=gemm)
    bank.add(data)
    d, i = bank.search(queries, 6)
    _assert_exact(d, i, queries, data, 6)
    assert torch.equal(i[:7, :3], torch.tensor([[r, r + 40, r + 80] for r in range(7)]))


@pytest.mark.parametrize("scale", [1e-30, 1e25])
def test_extreme_scales_stay_exact(scale, rescore):
    # tiny values (bfloat16 products flushed to zero) and huge ones (|q| |y| beyond the bfloat16/float32
    # GEMM's range: that chunk runs in float64)
    g = torch.Generator().manual_seed(7)
    data, queries = torch.randn(200, 24, generator=g) * scale, torch.randn(30, 24, generator=g) * scale
    bank = FeatureBank(24, gemm="bfloat16")
    bank.add(data)
    d, i = bank.search(queries, 3)
    wd, wi = _brute(queries, data, 3)
    assert torch.equal(i, wi)
    torch.testing.assert_close(d.double(), wd.float().double(), rtol=2.0**-23, atol=0)


def test_auto_gemm_follows_the_cpu():
    bank = FeatureBank(4)
    want = torch.bfloat16 if feature_bank.CPU_HAS_BF16_DOT else torch.float32
    assert bank._gemm_dtype(torch.device("cpu")) == want
    assert bank._gemm_dtype(torch.device("cuda")) == torch.float32
    assert FeatureBank(4, gemm="float32")._gemm_dtype(torch.device("cpu")) == torch.float32


def _rescore_case(q, m, c, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(q, c, generator=g), torch.randn(m, c, generator=g)
    exact = -(torch.cdist(x.double(), y.double(), compute_mode="donot_use_mm_for_euclid_dist").pow(2)) / 2
    score = exact.to(dtype)
    # the slack covers the score's rounding (bfloat16: 2^-8 relative) with room
    slack = exact.abs().amax(1) * (2.0**-6 if dtype == torch.bfloat16 else 2.0**-20)
    return score, slack, x, y, k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("q,m,c,k", [(1, 1, 1, 1), (3, 9, 5, 9), (17, 1023, 33, 1), (64, 300, 130, 7)])
def test_knn_rescore_matches_its_reference_and_the_exact_search(dtype, q, m, c, k, rescore):
    score, slack, x, y, k = _rescore_case(q, m, c, k, dtype, q * m)
    d, i = knn_rescore(score, slack, x, y, k)
    rd, ri = knn_rescore_reference(score, slack, x, y, k)
    wd, wi = _brute(x, y, k)
    assert torch.equal(i, ri) and torch.equal(i, wi) and d.dtype == torch.float64
    bound = wd * 2 * c * 2.0**-53  # two float64 sums of c terms in different orders
    assert bool(((d - rd).abs() <= bound).all()) and bool(((d - wd).abs() <= bound).all())


def test_knn_rescore_takes_only_the_candidates_the_slack_allows(rescore):
    # with no slack only the best-scoring column is a candidate, even when the score ranks wrongly
    x, y = torch.zeros(1, 2), torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    wrong = torch.tensor([[0.0, 1.0, 0.0]])  # names column 1, the true nearest is column 0
    d, i = knn_rescore(wrong, torch.zeros(1, dtype=torch.float64), x, y, 1)
    assert i.tolist() == [[1]] and d.tolist() == [[4.0]]
    d, i = knn_rescore(wrong, torch.ones(1, dtype=torch.float64), x, y, 1)
    assert i.tolist() == [[0]] and d.tolist() == [[1.0]]


@pytest.mark.parametrize("k", [1, 20, 241, 300])  # 241 and up: k + 15 > 256, the reference re-scoring
def test_knn_rescore_with_more_candidates_than_the_first_round(k, rescore):
    # 400 rows in 8 tight groups: every query has ~50 rows within the slack (more than k + 15)
    g = torch.Generator().manual_seed(9)
    y = torch.randn(8, 12, generator=g).repeat(50, 1) + 1e-3 * torch.randn(400, 12, generator=g)
    x = y[:30] + 1e-3 * torch.randn(30, 12, generator=g)
    exact = -(torch.cdist(x.double(), y.double(), compute_mode="donot_use_mm_for_euclid_dist").pow(2)) / 2
    score, slack = exact.float(), torch.full((30,), 0.01, dtype=torch.float64)
    d, i = knn_rescore(score, slack, x, y, k)
    rd, ri = knn_rescore_reference(score, slack, x, y, k)
    assert torch.equal(i, ri) and bool(((d - rd).abs() <= rd * 2 * 12 * 2.0**-53).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("k", [1, 9, 250])
def test_cuda_search_is_the_float64_search(k):
    # on CUDA: the float32 GEMM's candidates, the top-k + Triton re-scoring (the reference past k = 241)
    g = torch.Generator().manual_seed(11)
    centres = 10 + 5 * torch.rand(40, 256, generator=g)
    data = centres[torch.randint(40, (5000,), generator=g)] + 0.05 * torch.rand(5000, 256, generator=g)
    queries = data[torch.randint(5000, (700,), generator=g)] + 0.01 * torch.randn(700, 256, generator=g)
    bank = FeatureBank(256, device="cuda")
    bank.add(data.cuda())
    d, i = bank.search(queries.cuda(), k)
    _assert_exact(d.cpu(), i.cpu(), queries, data, k)


def test_knn_rescore_errors():
    s, sl, x, y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.float64), torch.zeros(2, 4), torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 3\]"):
        knn_rescore(s, sl, x, y, 4)
    with pytest.raises(TypeError, match="slack float64"):
        knn_rescore(s, sl.float(), x, y, 1)
    with pytest.raises(ValueError, match="need score"):
        knn_rescore(s, sl, x, y[:, :3], 1)
    with pytest.raises(ValueError, match=">= 0"):
        knn_rescore(s, -torch.ones(2, dtype=torch.float64), x, y, 1)
    with pytest.raises(ValueError, match="NaN"):
        knn_rescore(torch.full((2, 3), float("nan")), sl, x, y, 1)


@pytest.mark.skipif(not dispatch.HAS_EXTENSION, reason="fastad._C not built")
def test_knn_rescore_kernel_refuses_a_nan_row_instead_of_reading_past_it():
    # the public op checks for NaN first; the raw kernel must not crash on it either
    score = torch.zeros(3, 4)
    score[1] = float("nan")
    with pytest.raises(RuntimeError, match="fewer than k candidates"):
        torch.ops.fastad.knn_rescore(score, torch.zeros(3, dtype=torch.float64), torch.zeros(3, 2), torch.zeros(4, 2), 2)


@pytest.mark.skipif(not dispatch.HAS_EXTENSION, reason="fastad._C not built")
def test_knn_rescore_opcheck():
    score, slack, x, y, k = _rescore_case(5, 40, 8, 3, torch.bfloat16, 1)
    torch.library.opcheck(torch.ops.fastad.knn_rescore.default, (score, slack, x, y, k))


def test_faiss_flat_equals_torch():
    pytest.importorskip("faiss")
    data, queries = torch.randn(2000, 48), torch.randn(300, 48)
    t, f = FeatureBank(48), FeatureBank(48, backend="faiss")
    t.add(data)
    f.add(data)
    (td, ti), (fd, fi) = t.search(queries, 5), f.search(queries, 5)
    assert torch.equal(ti, fi)
    torch.testing.assert_close(td, fd, rtol=1e-4, atol=1e-4)


def test_faiss_ivf_finds_exact_nearest_when_probing_all_lists():
    pytest.importorskip("faiss")
    data = torch.randn(4000, 16)
    f = FeatureBank(16, backend="faiss", ivf_nlist=16, nprobe=16)
    f.add(data)
    queries = data[:50] + 0.01 * torch.randn(50, 16)
    _, i = f.search(queries, 1)
    assert torch.equal(i[:, 0], torch.arange(50))


def test_errors():
    bank = FeatureBank(4)
    with pytest.raises(ValueError, match="empty"):
        bank.search(torch.randn(2, 4))
    bank.add(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 3\]"):
        bank.search(torch.randn(2, 4), 4)
    with pytest.raises(ValueError, match=r"\(Q, 4\)"):
        bank.search(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        bank.add(torch.randn(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        bank.add(torch.tensor([[float("nan")] * 4]))
    with pytest.raises(ValueError, match="backend"):
        FeatureBank(4, backend="annoy")
