import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, assert_close_to_oracle, skip_unless_runs

from fastad.ops import (
    linear_attention,
    linear_attention_reference,
    local_window_attention,
    local_window_attention_reference,
    neighbour_masked_attention,
    neighbour_masked_attention_reference,
)

MASKED = {
    "neighbour": (neighbour_masked_attention, neighbour_masked_attention_reference),
    "local": (local_window_attention, local_window_attention_reference),
}
# (grid, window): rows that span block boundaries, non-square grids, windows larger than the grid,
# a single cell, and (4, 4) x 7 where the neighbour mask leaves no key at all
GRIDS = [((5, 7), 3), ((9, 6), 5), ((3, 11), 11), ((4, 4), 7), ((4, 4), 5), ((1, 1), 1), ((2, 19), 1)]


def _qkv(shape, dtype, device, scale=1.0):
    return [(scale * torch.randn(shape, device=device)).to(dtype).requires_grad_() for _ in range(3)]


def _compare(fn, ref, q, k, v, *args):
    """Output and q/k/v gradients of the op against the float64 reference (the oracle), with the
    tolerance set by the same reference computed in the inputs' dtype (conftest.assert_close_to_oracle)."""
    out = fn(q, k, v, *args)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = ref(q64, k64, v64, *args)
    want_grads = torch.autograd.grad(want, (q64, k64, v64), g.double())
    qb, kb, vb = (t.detach().clone().requires_grad_() for t in (q, k, v))
    base = ref(qb, kb, vb, *args)
    base_grads = torch.autograd.grad(base, (qb, kb, vb), g)
    assert out.dtype == q.dtype and out.shape == q.shape
    scale = max(t.abs().max().item() for t in (want, *want_grads))  # gradients that cancel to 0 are judged at this scale
    for name, got, exp, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (want, *want_grads), (base, *base_grads)):
        assert got.dtype == q.dtype and torch.isfinite(got).all()
        assert_close_to_oracle(got, exp, b, scale=scale, what=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(MASKED))
@pytest.mark.parametrize("grid,window", GRIDS)
@pytest.mark.parametrize("head_dim", [8, 20])
def test_masked_attention_matches_reference(path, device, kind, grid, window, head_dim):
    skip_unless_runs(path, device)
    fn, ref = MASKED[kind]
    q, k, v = _qkv((2, 3, grid[0] * grid[1], head_dim), torch.float32, device)
    _compare(fn, ref, q, k, v, grid, window)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(MASKED))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_masked_attention_half(path, device, kind, dtype):
    skip_unless_runs(path, device)
    fn, ref = MASKED[kind]
    q, k, v = _qkv((2, 2, 6 * 5, 32), dtype, device)
    _compare(fn, ref, q, k, v, (6, 5), 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(MASKED))
def test_masked_attention_large(path, device, kind):
    skip_unless_runs(path, device)
    fn, ref = MASKED[kind]
    q, k, v = _qkv((1, 2, 16 * 16, 64), torch.float32, device)  # UniAD-sized heads, 256 tokens
    _compare(fn, ref, q, k, v, (16, 16), 5)


@pytest.mark.parametrize("device", DEVICES)
# (grid, window, tile widths): every width the cost model may pick on some device, including widths
# that leave slots of a tile empty (16 // 3 = 5 rows of 3), a grid wider than a tile (40 > 16) and
# the whole row
@pytest.mark.parametrize("grid,window,widths", [((5, 7), 3, [1, 3, 7]), ((3, 40), 5, [2, 5, 16]), ((9, 6), 11, [4, 6])])
def test_local_window_kernels_for_any_tile_width(device, monkeypatch, grid, window, widths):
    """The local kernels walk 2-D tiles of TW columns and the flattened band of their windows; each
    width gives the reference's forward and gradients (the host picks the width per shape)."""
    from fastad.ops import dispatch, grid_attention

    skip_unless_runs("triton", device)
    monkeypatch.setitem(dispatch.settings, "triton", True)
    block_m = grid_attention._config(torch.float32, 8, grid[1], device == "cuda")["BLOCK_M"]
    for tw in widths:
        th = block_m // tw
        tiles = -(-grid[0] // th) * -(-grid[1] // tw)
        monkeypatch.setattr(grid_attention, "_tiling", lambda *a, tw=tw, tiles=tiles: (tw, tiles))
        q, k, v = _qkv((2, 3, grid[0] * grid[1], 8), torch.float32, device)
        _compare(local_window_attention, local_window_attention_reference, q, k, v, grid, window)


def test_local_window_tiles_compute_fewer_pairs():
    """The 2-D tiles chosen for the benchmarked RLR / Dinomaly shapes (CUDA tiles) compute no more
    (query, key) pairs than whole-row blocks, and at 64x64 window 11 at most 3x the pairs inside the
    windows (whole rows: about 6x)."""
    from fastad.ops import window_mask
    from fastad.ops.grid_attention import _config, _pairs, _tiling

    for side, d, window in [(16, 64, 5), (28, 64, 7), (32, 32, 7), (64, 16, 11)]:
        for dtype in (torch.bfloat16, torch.float32):
            cfg = _config(dtype, d, side, cuda=True)
            bm, bn, r = cfg["BLOCK_M"], cfg["BLOCK_N"], window // 2
            pairs = functools.partial(_pairs, side, side, r, bm, bn)
            tw, tiles = _tiling(side, side, r, True, bm, bn)
            assert tiles == -(-side // (bm // tw)) * -(-side // tw)
            assert pairs(tw) <= pairs(min(side, bm)), (side, dtype)
            if side == 64:
                assert pairs(tw) <= 3 * int(window_mask((side, side), window).sum()), dtype


@pytest.mark.parametrize("device", DEVICES)
def test_masked_attention_semantics(path, device):
    skip_unless_runs(path, device)
    q, k, v = (torch.randn(1, 2, 12, 16, device=device) for _ in range(3))
    # a window covering the grid: local attention is full attention
    torch.testing.assert_close(local_window_attention(q, k, v, (3, 4), 7), F.scaled_dot_product_attention(q, k, v))
    # window 1 masks only the query's own cell
    own = ~torch.eye(12, dtype=torch.bool, device=device)
    torch.testing.assert_close(
        neighbour_masked_attention(q, k, v, (3, 4), 1), F.scaled_dot_product_attention(q, k, v, attn_mask=own)
    )
    # a custom scale
    torch.testing.assert_close(
        local_window_attention(q, k, v, (3, 4), 7, scale=0.3), F.scaled_dot_product_attention(q, k, v, scale=0.3)
    )
    # rows with no key left are 0 (the centre of a 3 x 3 grid under a 3 x 3 mask), the others are not
    out = neighbour_masked_attention(q[:, :, :9], k[:, :, :9], v[:, :, :9], (3, 3), 3)
    assert torch.equal(out[:, :, 4], torch.zeros_like(out[:, :, 4]))
    assert (out[:, :, [0, 1, 2, 3, 5, 6, 7, 8]].abs().sum(-1) > 0).all()


def test_masked_attention_gradcheck(path):
    for kind, (fn, ref) in MASKED.items():
        q, k, v = (torch.randn(1, 2, 12, 5, dtype=torch.float64, requires_grad=True) for _ in range(3))
        for f in (fn, ref):  # float64 runs the op's PyTorch path on either path
            assert torch.autograd.gradcheck(lambda a, b, c: f(a, b, c, (4, 3), 3), (q, k, v)), (kind, f)


@pytest.mark.parametrize("device", DEVICES)
# (1, 1, 300, 16) and (1, 2, 130, 32): the sequence split into chunks (their partial sums added)
@pytest.mark.parametrize("shape", [(2, 3, 37, 16), (1, 2, 5, 20), (2, 12, 70, 64), (1, 1, 1, 8), (1, 1, 300, 16), (1, 2, 130, 32)])
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_linear_attention_matches_reference(path, device, shape, eps):
    skip_unless_runs(path, device)
    q, k, v = _qkv(shape, torch.float32, device)
    _compare(linear_attention, linear_attention_reference, q, k, v, eps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_attention_half(path, device, dtype):
    skip_unless_runs(path, device)
    q, k, v = _qkv((2, 2, 33, 32), dtype, device)
    _compare(linear_attention, linear_attention_reference, q, k, v)


def test_linear_attention_gradcheck(path):
    q, k, v = (torch.randn(1, 2, 7, 5, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for f in (linear_attention, linear_attention_reference):
        assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_and_opcheck(path, device):
    skip_unless_runs(path, device)
    q, k, v = _qkv((1, 2, 20, 16), torch.float32, device)
    cases = [
        lambda a, b, c: neighbour_masked_attention(a, b, c, (4, 5), 3),
        lambda a, b, c: local_window_attention(a, b, c, (4, 5), 3),
        linear_attention,
    ]
    for fn in cases:
        eager = torch.autograd.grad(fn(q, k, v).square().sum(), (q, k, v))
        compiled = torch.compile(lambda a, b, c: fn(a, b, c).square().sum(), backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(torch.autograd.grad(compiled(q, k, v), (q, k, v)), eager)
    if path == "torch":
        return  # the custom ops wrap the kernels only
    args = (q.detach(), k.detach(), v.detach())
    torch.library.opcheck(torch.ops.fastad.grid_attention.default, (*args, 4, 5, 1, False, 0.25))
    torch.library.opcheck(torch.ops.fastad.linear_attention.default, (*args, 0.0))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(path, device):
    skip_unless_runs(path, device)
    q, k, v = (torch.randn(1, 2, 12, 8, device=device) for _ in range(3))
    for fn in (neighbour_masked_attention, local_window_attention):
        for window in (2, 0, -3, 1.0, True):
            with pytest.raises(ValueError, match="window must be a positive odd int"):
                fn(q, k, v, (3, 4), window)
        with pytest.raises(ValueError, match="has 15 cells but q, k, v have N=12"):
            fn(q, k, v, (3, 5), 3)
        for grid in ((12,), (3, 0), (3.0, 4), "3x4"):
            with pytest.raises(ValueError, match="grid must be"):
                fn(q, k, v, grid, 3)
        with pytest.raises(ValueError, match="scale must be"):
            fn(q, k, v, (3, 4), 3, scale=float("nan"))
    for fn, extra in ((neighbour_masked_attention, ((3, 4), 3)), (linear_attention, ())):
        with pytest.raises(ValueError, match="of one shape"):
            fn(q, k[:, :, :6], v, *extra)
        with pytest.raises(ValueError, match="4 dimensions"):
            fn(q[0], k[0], v[0], *extra)
        with pytest.raises(TypeError, match="one dtype"):
            fn(q, k.half(), v, *extra)
        with pytest.raises(ValueError, match="empty"):
            fn(q[:0], k[:0], v[:0], *extra)
        bad = q.clone()
        bad[0, 1, 5, 2] = float("nan")
        with pytest.raises(ValueError, match="NaN or inf"):
            fn(bad, k, v, *extra)
    with pytest.raises(ValueError, match="eps must be"):
        linear_attention(q, k, v, eps=-1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_nan_skips_the_scan(path, device, monkeypatch):
    # nonfinite='nan' (how the models train): the same output and gradients as the default on finite
    # input, no host read in forward or backward, and NaN/inf reach the output instead of raising
    from test_sync_free import _HostReads

    skip_unless_runs(path, device)
    torch.manual_seed(0)
    x = [torch.randn(1, 2, 12, 8, device=device) for _ in range(3)]
    ops = {"linear": lambda *t, **kw: linear_attention(*t, **kw),
           **{name: lambda *t, _f=fn, **kw: _f(*t, (3, 4), 3, **kw) for name, (fn, _) in MASKED.items()}}
    for name, op in ops.items():
        a = [t.clone().requires_grad_() for t in x]
        want = op(*a)
        want.sum().backward()
        b = [t.clone().requires_grad_() for t in x]
        reads = _HostReads(monkeypatch)
        got = op(*b, nonfinite="nan")
        got.sum().backward()
        reads.active = False
        assert reads.count == 0, name
        assert torch.equal(got, want), name
        for ga, gb in zip(a, b):
            assert torch.equal(ga.grad, gb.grad), name
        bad = x[1].clone()
        bad[0, 1, 5, 2] = float("nan")
        assert torch.isnan(op(x[0], bad, x[2], nonfinite="nan")[0, 1]).any(), name
        with pytest.raises(ValueError, match="nonfinite must be one of"):
            op(*x, nonfinite="skip")


# ----------------------------------------------------------------------------------------------------
# the FlexAttention path (a candidate of the measuring dispatcher on CUDA)


@pytest.mark.parametrize("kind", list(MASKED))
@pytest.mark.parametrize("grid,window", GRIDS + [((16, 16), 5), ((28, 28), 7)])
def test_flex_mask_is_the_window_rule(kind, grid, window):
    # the mask_mod and block mask on the CPU, through FlexAttention's eager (dense, forward-only) path:
    # the same attention as the dense reference, empty rows (no key left) 0
    from fastad.ops.grid_attention import flex_grid_attention

    fn, ref = MASKED[kind]
    g = torch.Generator().manual_seed(sum(grid) + window)
    q, k, v = (torch.randn(2, 3, grid[0] * grid[1], 16, generator=g) for _ in range(3))
    got = flex_grid_attention(q, k, v, *grid, window, 0.25, kind == "local", compiled=False)
    want = ref(q.double(), k.double(), v.double(), grid, window, 0.25)
    assert_close_to_oracle(got, want, ref(q, k, v, grid, window, 0.25), what=f"flex {kind} {grid} w{window}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (FlexAttention has no CPU backward)")
@pytest.mark.parametrize("kind", list(MASKED))
# (4, 4) x 7: the neighbour mask leaves no key (0 out, 0 gradients); each case compiles FlexAttention
@pytest.mark.parametrize("grid,window,dtype", [((4, 4), 7, torch.float32), ((28, 28), 7, torch.bfloat16)])
def test_flex_path_forward_and_backward_on_cuda(kind, grid, window, dtype):
    from fastad.ops import dispatch

    fn, ref = MASKED[kind]
    q, k, v = _qkv((2, 3, grid[0] * grid[1], 32), dtype, "cuda")
    with dispatch.kernels(triton=False, flex=True):
        _compare(fn, ref, q, k, v, grid, window)
