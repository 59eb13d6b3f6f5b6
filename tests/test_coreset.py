import math
import os

import pytest
import torch
from conftest import DEVICES

from fastad.ops import dispatch
from fastad.ops import greedy_coreset, greedy_coreset_reference
from fastad.ops.coreset import project_features, selection_values, starting_points

PRECISIONS = ["float32", "float16"]


def _kernel_and_reference(x, k, device, projection_dim=128, seed=0, precision="float32"):
    v = selection_values(project_features(x.to(device), projection_dim, seed), precision)
    s = starting_points(x.shape[0], 10, seed)
    kernel_input = v.float() if v.is_cuda else v  # the CUDA kernel reads the same values as float32
    return torch.ops.fastad.kcenter_greedy(kernel_input, s.to(device), k), greedy_coreset_reference(v, s, k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(
    "n,d,k",
    [(1, 1, 1), (2, 3, 2), (7, 5, 7), (64, 2, 17), (65, 3, 65), (1000, 37, 100), (2049, 130, 257), (4097, 1536, 40)],
)
def test_kernel_matches_reference(device, precision, n, d, k):
    x = torch.randn(n, d) * torch.rand(1, d) * 3  # anisotropic scales
    got, want = _kernel_and_reference(x, k, device, precision=precision)
    assert torch.equal(got.cpu(), want.cpu())
    assert len(set(got.tolist())) == k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_clustered_data_exercises_pruning(device, precision):
    # low intrinsic dimension: the triangle-inequality pruning skips most points late in the run
    centers = torch.randn(40, 64) * 10
    x = centers[torch.randint(0, 40, (6000,))] + 0.3 * torch.randn(6000, 64)
    got, want = _kernel_and_reference(x, 1500, device, precision=precision)
    assert torch.equal(got.cpu(), want.cpu())


def _clustered_with_duplicates_and_ties():
    # rows ordered by cluster (as patch embeddings of one image are): tight blocks of 64 points;
    # exact duplicates; and integer lattice points, whose distances tie exactly in float64
    g = torch.Generator().manual_seed(7)
    centers = torch.randn(30, 48, generator=g) * 20
    labels = torch.sort(torch.randint(0, 30, (5000,), generator=g)).values
    x = centers[labels] + 0.2 * torch.randn(5000, 48, generator=g)
    x[1000:1300] = x[999]  # a run of duplicates (spans several blocks)
    x[3000:3500] = torch.randint(-2, 3, (500, 48), generator=g).float() * 8.0  # ties
    x[4000:4100] = x[3000:3100]  # duplicates of lattice points, in another block
    return x


@pytest.mark.parametrize("precision", PRECISIONS)
def test_block_pruning_skips_and_selects_the_reference_indices(precision):
    x = _clustered_with_duplicates_and_ties()
    for projection_dim in (None, 16):  # None: integer lattice values survive exactly (exact ties)
        v = selection_values(project_features(x, projection_dim), precision)
        s = starting_points(5000)
        want = greedy_coreset_reference(v, s, 2500)
        got, skipped = torch.ops.fastad.kcenter_greedy_stats(v, s, 2500)
        assert torch.equal(got, want) and torch.equal(torch.ops.fastad.kcenter_greedy(v, s, 2500), want)
        assert len(set(got.tolist())) == 2500
        # the tests really skip: most points are left unread in the second half of the run
        assert skipped.dtype == torch.long and skipped.shape == (2500, 5)
        total = skipped[:, :2].sum(1)
        assert total[1250:].float().mean() > 0.5 * 5000, total[1250:].float().mean()
        assert total.max() <= 5000 and skipped.min() >= 0
        # rows sorted by cluster: whole blocks are skipped, so the block test stays on at every step
        assert skipped[1250:, 0].float().mean() > 0.5 * 5000 and (skipped[:, 2] > 0).all()


def test_per_step_op_with_the_point_test_selects_the_reference_indices():
    # the distributed loop's kernel (kcenter_init / kcenter_step) with the point test on at every step:
    # it skips points and still selects the reference's indices
    v = selection_values(project_features(_clustered_with_duplicates_and_ties(), 16))
    s = starting_points(5000)
    want = greedy_coreset_reference(v, s, 600)
    dist = torch.ops.fastad.kcenter_init(v, v[s])
    assign = torch.full((5000,), -1, dtype=torch.int32)
    centers = torch.empty(600, v.shape[1])
    best, pruned = int(torch.argmax(dist)), []
    for t in range(600):
        centers[t] = v[best]
        assert best == want[t], t
        value, best, skipped = torch.ops.fastad.kcenter_step(v, dist, assign, centers, t, best, t > 0).tolist()
        best = int(best)
        pruned.append(skipped)
    assert sum(pruned[300:]) / 300 > 0.5 * 5000


@pytest.mark.parametrize("scale", [1.0, 1e-22, 1e19])  # normal; float32 squares underflow; they overflow
def test_float32_screen_keeps_every_float64_decision(scale):
    # A step first rejects candidates on a float32 distance and its error bound, then decides on the
    # float64 distance. Here every current distance is the kernel's own float64 distance to the new
    # centre times (1 + delta), |delta| from 1e-12 to 1e-4 (and 0): a screen without its full margin
    # (or one that took a float32 overflow for "far") would keep some distance that must fall.
    g = torch.Generator().manual_seed(3)
    n, d = 4099, 131
    v = (torch.randn(n, d, generator=g) * scale).contiguous()
    centers = v[:1].clone()

    def step(dist):
        assign = torch.full((n,), -1, dtype=torch.int32)
        torch.ops.fastad.kcenter_step(v, dist, assign, centers, 0, 0, False)
        return dist, assign

    new, _ = step(torch.full((n,), math.inf, dtype=torch.float64))  # every distance falls from inf
    assert new[0] == -1 and torch.isfinite(new).all() and (new[1:] > 0).all()
    delta = torch.logspace(-12, -4, n, dtype=torch.float64) * torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    delta[::7] = 0.0  # equal: stays
    start = new * (1 + delta)
    start[0] = 1.0
    dist, assign = step(start.clone())
    want = torch.minimum(start, new)
    want[0] = -1.0
    assert torch.equal(dist, want)
    fell = new < start
    fell[0] = True
    assert fell[1:].sum() > n // 3 and torch.equal(assign == 0, fell)


def test_float16_rows_without_f16c_select_the_same_indices():
    # float16 rows take an F16C copy where the CPU has it; FASTAD_NO_F16C=1 forces the portable path
    # (rows widened into a buffer), which must select the same indices (d = 37: a tail of 5 elements)
    import subprocess
    import sys

    code = (
        "import torch, fastad\n"
        "from fastad.ops.coreset import project_features, selection_values, starting_points\n"
        "from fastad.ops import greedy_coreset_reference\n"
        "g = torch.Generator().manual_seed(5)\n"
        "c = torch.randn(20, 37, generator=g) * 10\n"
        "x = c[torch.randint(0, 20, (3000,), generator=g)] + 0.3 * torch.randn(3000, 37, generator=g)\n"
        "v = selection_values(project_features(x, None), 'float16')\n"
        "s = starting_points(3000)\n"
        "got = torch.ops.fastad.kcenter_greedy(v, s, 700)\n"
        "assert torch.equal(got, greedy_coreset_reference(v, s, 700))\n"
        "print('ok', int(got.sum()))\n"
    )
    outs = []
    for no_f16c in (False, True):
        env = {k: val for k, val in os.environ.items() if k != "FASTAD_NO_F16C"}
        if no_f16c:
            env["FASTAD_NO_F16C"] = "1"
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(r.stdout.split())
    assert outs[0] == outs[1] and outs[0][0] == "ok"


def test_block_test_is_switched_off_where_it_does_not_pay():
    # random rows: no block can be skipped, so its centroid is read only on the probe steps (every 64th),
    # and the selection is still the reference's
    g = torch.Generator().manual_seed(0)
    v = selection_values(project_features(torch.randn(6000, 64, generator=g)))
    s = starting_points(6000)
    got, stats = torch.ops.fastad.kcenter_greedy_stats(v, s, 300)
    assert torch.equal(got, greedy_coreset_reference(v, s, 300))
    tested = (stats[:, 2] > 0).nonzero().flatten().tolist()
    assert tested == [0, 64, 128, 192, 256] and stats[:, 0].sum() == 0
    assert (stats[tested, 2] == (6000 + 63) // 64 - 1).all()  # every block but the new center's


def test_selection_values():
    x = torch.randn(300, 16) * 1e-3
    h = selection_values(x, "float16")
    assert h.dtype == torch.float16 and 2**14 <= float(h.float().abs().max()) <= 2**15
    scale = 2.0 ** (14 - math.floor(math.log2(float(x.abs().max()))))
    assert 2**14 <= float(x.abs().max()) * scale < 2**15
    assert torch.equal(h, (x * scale).half())  # a power-of-two scale, then float16 rounding
    assert (h.float() / scale - x).abs().max() <= x.abs().max() * 2**-11  # float16 rounding only
    assert torch.equal(selection_values(x, "float32"), x)
    assert torch.equal(selection_values(torch.zeros(4, 3), "float16"), torch.zeros(4, 3, dtype=torch.float16))
    big = torch.full((2, 2), 1e30)
    assert torch.isfinite(selection_values(big, "float16").float()).all()  # no overflow to inf
    with pytest.raises(ValueError, match="precision must be one of"):
        selection_values(x, "bfloat16")
    with pytest.raises(ValueError, match="precision must be one of"):
        greedy_coreset(x, 3, precision="float64")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_public_op_selects_on_the_rounded_values(precision):
    x = torch.randn(900, 300)
    got = greedy_coreset(x, 90, seed=2, precision=precision)
    want = greedy_coreset_reference(selection_values(project_features(x, 128, 2), precision), starting_points(900, 10, 2), 90)
    assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_duplicates_give_distinct_indices(device):
    x = torch.randn(5, 8).repeat(6, 1)
    got, want = _kernel_and_reference(x, 30, device)
    assert torch.equal(got.cpu(), want.cpu())
    assert sorted(got.tolist()) == list(range(30))
    # the first 5 picks cover the 5 distinct vectors
    assert len({tuple(x[i].tolist()) for i in got[:5].tolist()}) == 5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_public_op_all_dtypes(dtype):
    x = torch.randn(777, 200).to(dtype)
    got = greedy_coreset(x, ratio=0.1, seed=3)
    want = greedy_coreset_reference(selection_values(project_features(x, 128, 3)), starting_points(777, 10, 3), 77)
    assert got.dtype == torch.long and torch.equal(got, want)


def test_reference_selects_like_patchcore_inspection():
    # the oracle itself against the amazon sampler's formulation (run in float64)
    from baselines import patchcore_inspection_coreset

    x = torch.randn(1500, 300)
    p = project_features(x)
    s = starting_points(1500)
    assert torch.equal(greedy_coreset_reference(p, s, 150), patchcore_inspection_coreset(p.double(), s, 150))


def test_selection_is_farthest_point():
    # every pick is the point farthest from the picks before it, where the mean distance to the
    # random starting points is the initial distance
    x = torch.randn(300, 6).double()
    idx = greedy_coreset(x, 20, projection_dim=None, precision="float32")  # the exact values
    start = torch.cdist(x, x[starting_points(300)]).mean(1)
    for t in range(20):
        d = torch.minimum(start, torch.cdist(x, x[idx[:t]]).min(1).values) if t else start.clone()
        d[idx[:t]] = -1
        assert int(d.argmax()) == int(idx[t])


def test_projection_is_seeded_and_like_linear_init():
    x = torch.randn(10, 1024)
    a, b = project_features(x, 128, 5), project_features(x, 128, 5)
    assert torch.equal(a, b) and a.shape == (10, 128)
    w = torch.linalg.lstsq(x, a).solution  # recover the matrix
    assert w.abs().max() <= 1 / 1024**0.5 + 1e-4


def test_fake_kernel_and_schema():
    p = project_features(torch.randn(50, 16))
    torch.library.opcheck(torch.ops.fastad.kcenter_greedy.default, (p, starting_points(50), 5))
    torch.library.opcheck(torch.ops.fastad.kcenter_greedy.default, (selection_values(p), starting_points(50), 5))
    # the stats op's last column is wall time, so opcheck's eager-vs-AOT output comparison is replaced by
    # the same comparison on the deterministic outputs
    stats = torch.ops.fastad.kcenter_greedy_stats.default
    args = (selection_values(p), starting_points(50), 5)
    torch.library.opcheck(stats, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    f = torch.compile(lambda *a: stats(*a), backend="aot_eager", fullgraph=True)
    (i0, s0), (i1, s1) = stats(*args), f(*args)
    assert torch.equal(i0, i1) and torch.equal(s0[:, :4], s1[:, :4]) and s1.shape == (5, 5) and (s1[:, 4] > 0).all()


def test_compiles():
    f = torch.compile(lambda p, s: torch.ops.fastad.kcenter_greedy(p, s, 4) + 0, backend="aot_eager", fullgraph=True)
    p = project_features(torch.randn(40, 16))
    s = starting_points(40)
    assert torch.equal(f(p, s), greedy_coreset_reference(p, s, 4))


@pytest.mark.parametrize(
    "call,err,match",
    [
        (lambda: greedy_coreset(torch.randn(10, 4), 11), ValueError, "k=11 must be between 1 and"),
        (lambda: greedy_coreset(torch.randn(10, 4), 0), ValueError, "k=0"),
        (lambda: greedy_coreset(torch.randn(10, 4)), ValueError, "exactly one of k"),
        (lambda: greedy_coreset(torch.randn(10, 4), 3, ratio=0.1), ValueError, "exactly one of k"),
        (lambda: greedy_coreset(torch.randn(10, 4), ratio=1.5), ValueError, r"ratio must be a number in \(0, 1\]"),
        (lambda: greedy_coreset(torch.randn(10, 4), ratio=0.01), ValueError, "selects no point"),
        (lambda: greedy_coreset(torch.randn(10, 4), 2.5), TypeError, "k must be an int"),
        (lambda: greedy_coreset(torch.empty(0, 4), 1), ValueError, "empty"),
        (lambda: greedy_coreset(torch.tensor([[1.0, float("nan")]] * 3), 1), ValueError, "NaN or inf"),
        (lambda: greedy_coreset(torch.tensor([[1.0, float("inf")]] * 3), 1), ValueError, "NaN or inf"),
        (lambda: greedy_coreset(torch.ones(10, 4, dtype=torch.int64), 1), TypeError, "floating tensor"),
        (lambda: greedy_coreset(torch.randn(10), 1), ValueError, "2 dimensions"),
        (lambda: greedy_coreset([[1.0]], 1), TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_kernel_rejects_bad_arguments():
    p = torch.randn(5, 3)
    with pytest.raises(RuntimeError, match="k=6 must be in"):
        torch.ops.fastad.kcenter_greedy(p, torch.tensor([0]), 6)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.fastad.kcenter_greedy(p, torch.tensor([9]), 2)
    with pytest.raises(RuntimeError, match="float32 or float16"):
        torch.ops.fastad.kcenter_greedy(p.double(), torch.tensor([0]), 2)


def test_fallback_warns_once_and_matches(monkeypatch):
    monkeypatch.setattr(dispatch, "HAS_EXTENSION", False)
    monkeypatch.setattr(dispatch, "_warned", set())
    x = torch.randn(200, 10)
    with pytest.warns(RuntimeWarning, match="PyTorch reference"):
        a = greedy_coreset(x, 20)
    monkeypatch.setattr(dispatch, "HAS_EXTENSION", True)
    assert torch.equal(a, greedy_coreset(x, 20))
