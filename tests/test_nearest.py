import pytest
import torch
from conftest import DEVICES, skip_unless_runs

from fastad.ops import dispatch, nearest_reference, nearest_reference_reference


@pytest.fixture(params=["extension", "gemm"])
def search(request, monkeypatch):
    """Runs a global-search test through the extension (C++ / CUDA kernel) and through the GEMM path
    (a GEMM's candidates re-scored in float64 by Triton: the fixed rule's choice on CUDA)."""
    if request.param == "gemm":
        monkeypatch.setitem(dispatch.settings, "extension", False)
    return request.param


def _runs(search, device="cpu"):
    if search == "gemm":  # Triton on CPU tensors needs the interpreter
        skip_unless_runs("triton", device)


def _check(x, bank, device, **kw):
    v, i, r = nearest_reference(x.to(device), bank.to(device), **kw)
    v2, i2, r2 = nearest_reference_reference(x, bank, **kw)
    assert torch.equal(i.cpu(), i2)
    assert v.dtype == x.dtype and r.dtype == x.dtype and v.shape == x.shape[:-1] and r.shape == x.shape
    tol = 1e-5 if x.dtype in (torch.float32, torch.float64) else 1e-2
    torch.testing.assert_close(v.cpu().double(), v2, rtol=tol, atol=tol)
    torch.testing.assert_close(r.cpu(), r2, rtol=0, atol=0)
    return i


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("shape,m", [((1, 1), 1), ((37, 5), 2049), ((300, 1030), 700), ((2, 3, 17), 31), ((513, 64), 4100)])
def test_global_matches_reference(device, metric, shape, m, search):
    _runs(search, device)
    x = torch.randn(*shape)
    bank = torch.randn(m, shape[-1])
    _check(x, bank, device, metric=metric)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("b,k,h,w,c,window", [(1, 1, 1, 1, 1, 1), (2, 3, 5, 7, 9, 3), (1, 2, 6, 4, 33, 5), (3, 1, 4, 4, 8, 9), (2, 4, 9, 11, 16, 7)])
def test_window_matches_reference(device, metric, b, k, h, w, c, window):
    x = torch.randn(b, h, w, c)
    bank = torch.randn(k, h, w, c)
    idx = _check(x, bank, device, metric=metric, window=window)
    # every match lies inside the window of its own position
    pos = idx.cpu() % (h * w)  # the query grid below is built on the CPU
    qh = torch.arange(h).view(1, h, 1).expand(b, h, w)
    qw = torch.arange(w).view(1, 1, w).expand(b, h, w)
    assert ((pos // w - qh).abs() <= window // 2).all() and ((pos % w - qw).abs() <= window // 2).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    x = torch.randn(100, 24).to(dtype)
    bank = torch.randn(300, 24).to(dtype)
    for metric in ("l2", "cosine"):
        _check(x, bank, "cpu", metric=metric)


def test_window_equal_to_whole_grid_is_global_per_position():
    x = torch.randn(2, 3, 3, 8)
    bank = torch.randn(4, 3, 3, 8)
    _, i, _ = nearest_reference(x, bank, window=5)
    _, j, _ = nearest_reference(x.reshape(-1, 8), bank.reshape(-1, 8))
    assert torch.equal(i.reshape(-1), j)


def test_ties_pick_lowest_index_and_zero_vectors(search):
    _runs(search)
    bank = torch.randn(10, 6)
    bank = torch.cat([bank, bank])  # every entry twice
    x = bank[[3, 12, 7]] + 1e-3
    _, i, r = nearest_reference(x, bank)
    assert i.tolist() == [3, 2, 7]
    torch.testing.assert_close(r, torch.full_like(r, 1e-3), rtol=0, atol=1e-6)
    z = torch.zeros(2, 6)
    v, i, _ = nearest_reference(z, bank, metric="cosine")
    assert i.tolist() == [0, 0] and v.abs().max() == 0


def test_cosine_is_scale_invariant_and_l2_is_not(search):
    _runs(search)
    x = torch.randn(50, 12)
    bank = torch.randn(80, 12)
    scaled = bank * torch.rand(80, 1) * 10
    assert torch.equal(nearest_reference(x, bank, metric="cosine")[1], nearest_reference(x, scaled, metric="cosine")[1])
    ref = torch.cdist(x, bank).argmin(1)
    assert torch.equal(nearest_reference(x, bank)[1], ref)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("copies", [3, 40])  # 40: more candidates than the re-scoring's first round takes
def test_gemm_path_is_exact_where_float32_cannot_tell(metric, copies, search):
    _runs(search)
    # bank rows closer to each other than float32 resolves (cosines within ~1e-9 of 1, distances
    # within 1e-6 relative): the GEMM's scores tie or misorder, the float64 re-scoring decides
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 96, generator=g)
    base = x[[0, 1, 0, 2, 3, 4, 1]].repeat(copies, 1)
    bank = base + 1e-4 * torch.randn(base.shape, generator=g) * base.abs().mean()
    bank[::7] *= 1 + torch.rand(bank[::7].shape[0], 1, generator=g)  # scaled copies: equal cosines
    bank = torch.cat([bank, bank[:9]])  # exact duplicates: the lower index wins
    v, i, r = nearest_reference(x, bank, metric=metric)
    ev, ei, er = nearest_reference_reference(x, bank, metric=metric)
    assert torch.equal(i, ei) and torch.equal(r, er)
    torch.testing.assert_close(v.double(), ev, rtol=2.0**-23, atol=0)


@pytest.mark.parametrize("precision", ["highest", "high", "medium"])
def test_gemm_path_bound_follows_the_matmul_precision(precision, search, monkeypatch):
    _runs(search)
    # TF32 / bfloat16 float32 GEMMs (set by the user for speed) widen the candidate bound: same answer
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: precision)
    g = torch.Generator().manual_seed(8)
    x, bank = torch.randn(200, 64, generator=g), torch.randn(900, 64, generator=g)
    for metric in ("l2", "cosine"):
        _, i, r = nearest_reference(x, bank, metric=metric)
        _, ei, er = nearest_reference_reference(x, bank, metric=metric)
        assert torch.equal(i, ei) and torch.equal(r, er), (precision, metric)


def test_the_fixed_rule_takes_the_gemm_path_for_global_search_on_cuda():
    x = torch.randn(3, 4)
    assert dispatch._runnable(x, True, True, prefer="triton")[-1] == "reference"
    if dispatch.TRITON_INTERPRET and dispatch.HAS_EXTENSION:
        assert dispatch._runnable(x, True, True, prefer="triton") == ["triton", "extension", "reference"]
        assert dispatch._runnable(x, True, True) == ["extension", "triton", "reference"]


def test_schema_and_fake_kernel():
    x, bank = torch.randn(20, 8), torch.randn(30, 8)
    torch.library.opcheck(torch.ops.fastad.nearest_reference.default, (x, bank, 0, 0))
    torch.library.opcheck(torch.ops.fastad.nearest_reference.default, (torch.randn(1, 4, 5, 8), torch.randn(2, 4, 5, 8), 1, 3))


@pytest.mark.parametrize(
    "kw,err,match",
    [
        (dict(x=torch.randn(3, 4), bank=torch.randn(5, 3)), ValueError, "C=3"),
        (dict(x=torch.randn(3, 4), bank=torch.randn(5, 4), metric="l1"), ValueError, "metric must be"),
        (dict(x=torch.randn(3, 4), bank=torch.empty(0, 4)), ValueError, "bank is empty"),
        (dict(x=torch.empty(0, 4), bank=torch.randn(2, 4)), ValueError, "x is empty"),
        (dict(x=torch.full((3, 4), float("nan")), bank=torch.randn(5, 4)), ValueError, "NaN"),
        (dict(x=torch.randn(3, 4), bank=torch.randn(5, 4).double()), TypeError, "same dtype"),
        (dict(x=torch.randint(0, 3, (3, 4)), bank=torch.randn(5, 4)), TypeError, "floating"),
        (dict(x=torch.randn(1, 4, 4, 3), bank=torch.randn(2, 4, 4, 3), window=2), ValueError, "odd"),
        (dict(x=torch.randn(1, 4, 4, 3), bank=torch.randn(2, 4, 5, 3), window=3), ValueError, "same H, W, C"),
        (dict(x=torch.randn(4, 3), bank=torch.randn(2, 4, 4, 3), window=3), ValueError, "4 dimensions"),
    ],
)
def test_bad_input(kw, err, match):
    with pytest.raises(err, match=match):
        nearest_reference(**kw)


@pytest.mark.parametrize("scale", [1e-38, 1e-20, 1e30, 5e37])
def test_extreme_scales_stay_exact(scale, search):
    # tiny and huge features, the bank holding near-copies of the queries: at 5e37 in 256 dims |x| is
    # ~8e38, past float32's range, and so is x.b (the GEMM path: cosine scales each query by a power of
    # two to a norm near 1; l2 runs such chunks in float64, FeatureBank's rule)
    _runs(search)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 256, generator=g).clamp(-3, 3) * scale
    bank = torch.cat([torch.randn(50, 256, generator=g).clamp(-3, 3) * scale, x.flip(0) * 0.999])
    for metric in ("l2", "cosine"):
        _, i, r = nearest_reference(x, bank, metric=metric)
        _, ei, er = nearest_reference_reference(x, bank, metric=metric)
        assert torch.equal(i, ei) and torch.equal(r, er), (metric, scale)
