import pytest
import torch
from conftest import DEVICES

from fastad.ops import nearest_reference, nearest_reference_reference


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
def test_global_matches_reference(device, metric, shape, m):
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


def test_ties_pick_lowest_index_and_zero_vectors():
    bank = torch.randn(10, 6)
    bank = torch.cat([bank, bank])  # every entry twice
    x = bank[[3, 12, 7]] + 1e-3
    _, i, r = nearest_reference(x, bank)
    assert i.tolist() == [3, 2, 7]
    torch.testing.assert_close(r, torch.full_like(r, 1e-3), rtol=0, atol=1e-6)
    z = torch.zeros(2, 6)
    v, i, _ = nearest_reference(z, bank, metric="cosine")
    assert i.tolist() == [0, 0] and v.abs().max() == 0


def test_cosine_is_scale_invariant_and_l2_is_not():
    x = torch.randn(50, 12)
    bank = torch.randn(80, 12)
    scaled = bank * torch.rand(80, 1) * 10
    assert torch.equal(nearest_reference(x, bank, metric="cosine")[1], nearest_reference(x, scaled, metric="cosine")[1])
    ref = torch.cdist(x, bank).argmin(1)
    assert torch.equal(nearest_reference(x, bank)[1], ref)


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
