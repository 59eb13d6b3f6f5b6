import pytest
import torch
from conftest import DEVICES, skip_unless_runs

from fastad.ops import dispatch, quantile, quantile_reference, select_rank, select_rank_reference
from fastad.ops.select import _quantile, _sorted_quantile

QS = [0.0, 1e-7, 0.123456789, 0.3, 0.5, 0.9995, 0.9999, 1.0]
SIZES = [1, 2, 7, 2047, 2049, 65537, 1_000_003]  # around the 2048 bins and the 4096/65536 blocks


def test_triton_kernels_run_in_ci():
    # Without a GPU the Triton kernels must really execute (interpreted), not fall back silently.
    assert dispatch.HAS_TRITON
    if not torch.cuda.is_available():
        assert dispatch.TRITON_INTERPRET, dispatch._interpreter_problem() or "TRITON_INTERPRET=1 is not set"
        assert dispatch.implementation(torch.zeros(1), triton=True) == "triton"


@pytest.mark.parametrize("n", [5, 12345, 1_000_001, 2**24 + 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sort_fallback_is_torch_quantile(n, dtype, monkeypatch):
    # the reference's fallback for a torch that refuses large inputs reproduces torch.quantile bit for bit
    if n > 2**24 and torch.__version__ < (2, 14):
        pytest.skip("this torch's quantile refuses more than 2**24 elements: nothing to compare with")
    x = torch.randn(n, dtype=dtype)
    for q in QS if n < 2**24 else (0.9999, 0.3):  # a full sort per q
        assert torch.equal(_sorted_quantile(x, q), torch.quantile(x, q)), q
    want = quantile_reference(x, 0.9999)

    def refuse(*args, **kwargs):
        raise RuntimeError("quantile() input tensor is too large")

    monkeypatch.setattr(torch, "quantile", refuse)
    assert torch.equal(quantile_reference(x, 0.9999), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_quantile_exact(path, device, n, dtype):
    skip_unless_runs(path, device)
    x = torch.randn(n, device=device).to(dtype)
    for q in QS:
        got = quantile(x, q)
        want = quantile_reference(x, q)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert got.device == x.device
        assert torch.equal(got, want), (q, got.item(), want.item())
    rank = (n * 2) // 3
    assert torch.equal(select_rank(x, rank), select_rank_reference(x, rank))


def _awkward():
    return {
        "duplicates": torch.randint(-3, 4, (10001,)).float(),
        "sparse": torch.cat([torch.zeros(5000), torch.tensor([1e-30, 1e18, -1e18, -0.0, 3.0, -1e-38])]),
        "far_next": torch.tensor([1.0] * 9 + [1e15]),  # next value outside the last histogram
        "negative": -torch.rand(33333),
        "constant": torch.full((4099,), 2.5),
        "shape_3d": torch.randn(3, 50, 77),
        "non_contiguous": torch.randn(64, 100).t(),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(_awkward()))
def test_quantile_awkward_data(path, device, name):
    skip_unless_runs(path, device)
    x = _awkward()[name].to(device)
    for q in QS:
        assert torch.equal(quantile(x, q), quantile_reference(x, q)), q
        # the squared mode used by ADCLoss
        assert torch.equal(_quantile(x.contiguous().view(-1), q, square=True), quantile_reference(x * x, q)), q
    for rank in {0, x.numel() // 2, x.numel() - 1}:
        assert torch.equal(select_rank(x, rank), select_rank_reference(x, rank))


def _quantile_before_2_14(x, q, **kwargs):
    """torch.quantile as torch <= 2.13 computes it (ATen's quantile_impl): the rank q * (n - 1) in the
    input dtype, weight = rank - floor(rank) in that dtype, then lerp; refuses more than 2**24."""
    s = torch.sort(x.flatten()).values
    if s.numel() > 2**24:
        raise RuntimeError("quantile() input tensor is too large")
    rank = torch.tensor(q, dtype=s.dtype, device=s.device) * (s.numel() - 1)
    lo, hi = rank.long(), rank.ceil().long()
    return torch.lerp(s[lo], s[hi], rank - lo)


@pytest.mark.parametrize("device", DEVICES)
def test_quantile_follows_the_installed_torch(path, device, monkeypatch):
    # torch 2.11 (the GPU image) forms the rank in float32, torch 2.14 in float64: the probe must
    # notice which one is installed and the Triton path must then equal that torch bit for bit.
    from fastad.ops import select

    skip_unless_runs(path, device)
    assert select._torch_ranks_in_float64() == (torch.__version__ >= (2, 14))
    monkeypatch.setattr(torch, "quantile", _quantile_before_2_14)
    select._torch_ranks_in_float64.cache_clear()
    try:
        assert not select._torch_ranks_in_float64()
        for n in (7, 2047, 65537):
            x = torch.randn(n, device=device)
            for q in QS:
                assert torch.equal(quantile(x, q), _quantile_before_2_14(x, q)), (n, q)
        x = torch.rand(2**24 + 3, device=device)  # beyond the old limit: the float64 rank (the sort's)
        assert torch.equal(quantile(x, 0.9999), select._sorted_quantile(x, 0.9999))
    finally:
        select._torch_ranks_in_float64.cache_clear()


@pytest.mark.parametrize("n", [20_000_000, 100_000_000])
def test_beyond_the_old_torch_quantile_limit(path, n):
    # torch.quantile raised above 2**24 elements before torch 2.14; select has no such limit.
    skip_unless_runs(path, DEVICES[-1])
    x = torch.rand(n, device=DEVICES[-1])
    assert torch.equal(quantile(x, 0.9999), quantile_reference(x, 0.9999))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(path, device):
    skip_unless_runs(path, device)
    x = torch.randn(100, device=device)
    with pytest.raises(ValueError, match="empty"):
        quantile(torch.empty(0, device=device), 0.5)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[57] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            quantile(y, 0.5)
        with pytest.raises(ValueError, match="NaN or inf"):
            select_rank(y, 3)
    with pytest.raises(TypeError, match="floating"):
        quantile(torch.arange(10, device=device), 0.5)
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantile([1.0, 2.0], 0.5)
    for q in (-0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="q must be"):
            quantile(x, q)
    with pytest.raises(ValueError, match="rank=100"):
        select_rank(x, 100)
    with pytest.raises(ValueError, match="rank=-1"):
        select_rank(x, -1)
    with pytest.raises(TypeError, match="rank must be an int"):
        select_rank(x, 2.0)


def test_inside_torch_compile(path):
    x = torch.rand(1000)
    got = torch.compile(lambda t: quantile(t * 1.0, 0.9) + select_rank(t, 10), backend="aot_eager")(x)
    assert torch.equal(got, quantile_reference(x, 0.9) + select_rank_reference(x, 10))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, dim", [((1, 1), 1), ((5, 2049), 1), ((2049, 3), 0), ((3, 7, 5), -2), ((2, 3, 4), 2),
                                        ((1, 70_001), -1), ((37,), 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_along_a_dim_is_torch_along_that_dim(path, device, shape, dim, dtype):
    # every row at once in one set of launches: each row must get its own answer (rows differ in
    # scale and ties, so a state shared across rows or a row offset off by one shows up)
    skip_unless_runs(path, device)
    gen = torch.Generator().manual_seed(sum(shape) + abs(dim))
    x = torch.randn(shape, generator=gen) * torch.rand(shape, generator=gen).exp()
    x = x.round(decimals=1).to(device=device, dtype=dtype)  # ties inside each row
    n = shape[dim]
    for q in QS:
        got = quantile(x, q, dim=dim)
        want = quantile_reference(x, q, dim=dim)
        assert want.shape == tuple(s for i, s in enumerate(shape) if i != dim % len(shape))
        assert got.shape == want.shape and got.device == x.device
        assert torch.equal(got, want), q
        assert torch.equal(want, torch.quantile(x.to(got.dtype), q, dim=dim)), q
    for rank in {0, n // 3, n - 1}:
        got = select_rank(x, rank, dim=dim)
        assert torch.equal(got, select_rank_reference(x, rank, dim=dim)), rank
        assert torch.equal(got, torch.kthvalue(x.to(got.dtype).cpu(), rank + 1, dim=dim).values.to(device)), rank


@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_nan_marks_only_the_bad_rows_and_reads_nothing(path, device, monkeypatch):
    from test_sync_free import _HostReads

    skip_unless_runs(path, device)
    x = torch.randn(6, 3001, device=device)
    x[1, 5], x[3, 3000], x[4, 0] = float("nan"), float("inf"), -float("inf")
    good = torch.tensor([True, False, True, False, False, True], device=device)
    reads = _HostReads(monkeypatch)
    got_q = quantile(x, 0.9, dim=1, nonfinite="nan")
    got_r = select_rank(x, 17, dim=1, nonfinite="nan")
    got_all = quantile(x, 0.5, nonfinite="nan")
    reads.active = False
    assert reads.count == 0
    assert torch.isnan(got_q[~good]).all() and torch.isnan(got_r[~good]).all() and torch.isnan(got_all)
    assert torch.equal(got_q[good], quantile_reference(x[good], 0.9, dim=1))
    assert torch.equal(got_r[good], select_rank_reference(x[good], 17, dim=1))
    # the default still raises, for any bad row
    with pytest.raises(ValueError, match="x contains NaN or inf values"):
        quantile(x, 0.9, dim=1)
    with pytest.raises(ValueError, match="x contains NaN or inf values"):
        select_rank(x, 0)
    with pytest.raises(ValueError, match="x contains NaN or inf values"):
        select_rank(x[4:5], 0, dim=1)  # -inf alone


def test_dim_and_nonfinite_are_validated():
    x = torch.randn(4, 5)
    for bad in (2, -3, 1.0, True, "0"):
        with pytest.raises(ValueError, match="dim must be None or an int in"):
            quantile(x, 0.5, dim=bad)
        with pytest.raises(ValueError, match="dim must be None or an int in"):
            select_rank(x, 0, dim=bad)
    with pytest.raises(ValueError, match=r"rank=5 must be in \[0, 4\)"):
        select_rank(x, 5, dim=0)
    for bad in ("ignore", None, "NaN"):
        with pytest.raises(ValueError, match="nonfinite must be one of"):
            quantile(x, 0.5, nonfinite=bad)
        with pytest.raises(ValueError, match="nonfinite must be one of"):
            select_rank(x, 0, nonfinite=bad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("passes", ["atomic", "ballot"])
def test_both_radix_schedules_are_exact(path, device, passes, monkeypatch):
    # the schedule follows the installed Triton's tl.histogram (11-bit digits with shared-memory
    # atomics, 8-bit with warp ballots): both must give the same bits, whichever Triton runs CI
    from fastad.ops import select

    skip_unless_runs(path, device)
    if path != "triton":
        pytest.skip("the schedules are the Triton path's")
    monkeypatch.setattr(select, "_schedule", lambda: passes)
    cases = dict(_awkward(), randn=torch.randn(65537), nan=torch.tensor([1.0, float("nan"), 2.0]),
                 inf=torch.tensor([3.0, -float("inf"), 1.0]))
    for name, x in cases.items():
        x = x.to(device)
        if not torch.isfinite(x).all():
            with pytest.raises(ValueError, match="NaN or inf"):
                quantile(x, 0.5)
            assert torch.isnan(quantile(x, 0.5, nonfinite="nan"))
            continue
        for q in (0.0, 0.3, 0.9999, 1.0):
            assert torch.equal(quantile(x, q), quantile_reference(x, q)), (name, q)
            assert torch.equal(_quantile(x.contiguous().view(-1), q, square=True), quantile_reference(x * x, q)), (name, q)
        rows = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)
        assert torch.equal(quantile(rows, 0.7, dim=1), quantile_reference(rows, 0.7, dim=1)), name
        rank = x.numel() // 3
        assert torch.equal(select_rank(x, rank), select_rank_reference(x, rank)), name


def test_radix_schedule_follows_the_triton_histogram_lowering(monkeypatch):
    # Triton < 3.8 (the GPU image's 3.6) lowers tl.histogram to warp ballots: 8-bit digits there
    from fastad.ops import select

    assert [sum(bits for _, bits in p) for p in select._SCHEDULES.values()] == [32, 32]
    for passes in select._SCHEDULES.values():  # digits tile the 32-bit key, most significant first
        assert [shift for shift, _ in passes] == [32 - sum(b for _, b in passes[: i + 1]) for i in range(len(passes))]
    for version, want in [("3.6.0", "ballot"), ("3.7.1", "ballot"), ("3.8.0", "atomic"), ("3.10.0", "atomic"),
                          ("4.0.0+git1234", "atomic")]:
        monkeypatch.setattr(select.triton, "__version__", version)
        select._schedule.cache_clear()
        assert select._schedule() == want, version
    select._schedule.cache_clear()
