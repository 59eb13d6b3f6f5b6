import pytest
import torch
from conftest import DEVICES, assert_close_to_oracle, skip_unless_runs

from fastad.ops import adc_loss, adc_loss_reference, hard_mining_cosine_loss, hard_mining_cosine_loss_reference

# ----------------------------------------------------------------------------------------------------
# MiniMaxAD ADCLoss

P_PAIRS = [(0.9999, 0.9995), (0.5, 0.9), (0.99, 0.3)]


def _adc_both(maps, p_hard, p_lim):
    x = maps.clone().requires_grad_()
    y = maps.clone().requires_grad_()
    got, want = adc_loss(x, p_hard, p_lim), adc_loss_reference(y, p_hard, p_lim)
    got.backward()
    want.backward()
    return got, want, x.grad, y.grad


def _branch(maps, p_hard, p_lim):
    """Which threshold the spec picks: 'hard' (quantile of S) or 'lim' (quantile of S**2)."""
    s = maps.double()
    tau = torch.quantile(s.flatten(), p_hard) - s.std() ** 2
    return "hard" if int((s**2 >= tau).sum()) >= s.numel() * (1 - p_lim) else "lim"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1, 2), (2, 17, 19), (3, 33, 65), (16, 64, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("p_hard,p_lim", P_PAIRS)
def test_adc_matches_reference(path, device, shape, dtype, p_hard, p_lim):
    skip_unless_runs(path, device)
    maps = (torch.rand(shape, device=device) * 3).to(dtype)
    got, want, g_got, g_want = _adc_both(maps, p_hard, p_lim)
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    assert got.dtype == want.dtype and got.device == maps.device
    torch.testing.assert_close(got, want, rtol=rtol, atol=0)
    assert g_got.dtype == dtype and g_got.shape == maps.shape
    torch.testing.assert_close(g_got, g_want, rtol=rtol, atol=0)


def test_adc_both_branches_are_covered():
    torch.manual_seed(0)
    seen = {_branch(torch.rand(3, 33, 65) * 3, ph, pl) for ph, pl in P_PAIRS}
    seen |= {_branch(torch.rand(16, 64, 64) * 3, ph, pl) for ph, pl in P_PAIRS}
    assert seen == {"hard", "lim"}


@pytest.mark.parametrize("device", DEVICES)
def test_adc_hand_checked(path, device):
    skip_unless_runs(path, device)
    # S = 0..3: std^2 = 5/3, quantile(S, .5) = 1.5, tau < 0 keeps all 4 >= 4 * (1 - .5): mean(S^2) = 3.5
    s = torch.tensor([[0.0, 1.0], [2.0, 3.0]], device=device, requires_grad=True)
    loss = adc_loss(s, 0.5, 0.5)
    loss.backward()
    assert loss.item() == pytest.approx(3.5)
    torch.testing.assert_close(s.grad, 2 * s.detach() / 4)
    # S = .1..4: tau = .25 - 1/60 keeps no point (< 4 * .25), so tau = quantile(S^2, .75) - 1/60
    # = .09 + .25 * .07 - 1/60 = .0908: only .4^2 stays
    s = torch.tensor([0.1, 0.2, 0.3, 0.4], device=device, requires_grad=True)
    loss = adc_loss(s, 0.5, 0.75)
    loss.backward()
    assert loss.item() == pytest.approx(0.16)
    torch.testing.assert_close(s.grad, torch.tensor([0.0, 0.0, 0.0, 0.8], device=device))


def test_adc_gradcheck():
    maps = (torch.rand(2, 5, 7, dtype=torch.float64) * 3).requires_grad_()
    for p_hard, p_lim in P_PAIRS:
        assert torch.autograd.gradcheck(lambda m: adc_loss_reference(m, p_hard, p_lim), (maps,))
        assert torch.autograd.gradcheck(lambda m: adc_loss(m, p_hard, p_lim), (maps,))


def test_adc_twenty_million(path):
    device = DEVICES[-1]
    skip_unless_runs(path, device)
    maps = torch.rand(20, 1000, 1000, device=device) * 3  # 20M points, beyond the old 2**24 limit
    got, want, g_got, g_want = _adc_both(maps, 0.9999, 0.9995)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(g_got, g_want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_adc_bad_input(path, device):
    skip_unless_runs(path, device)
    maps = torch.rand(2, 8, 8, device=device)
    for p in (0.0, 1.0, 1.5, -0.2, float("nan")):
        with pytest.raises(ValueError, match="p_hard must be"):
            adc_loss(maps, p_hard=p)
        with pytest.raises(ValueError, match="p_lim must be"):
            adc_loss(maps, p_lim=p)
    with pytest.raises(ValueError, match="empty"):
        adc_loss(torch.empty(0, 4, device=device))
    with pytest.raises(ValueError, match="at least 2 elements"):
        adc_loss(torch.ones(1, 1, 1, device=device))
    for bad in (float("nan"), float("inf")):
        m = maps.clone()
        m[1, 3, 5] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            adc_loss(m)
    with pytest.raises(TypeError, match="floating"):
        adc_loss(torch.ones(2, 8, 8, dtype=torch.int32, device=device))


# ----------------------------------------------------------------------------------------------------
# Dinomaly hard-mining global cosine loss


def _features(shape, device, dtype=torch.float32):
    a = torch.randn(shape, device=device, dtype=dtype)
    b = a + 0.7 * torch.randn(shape, device=device, dtype=dtype)
    return a, b


def _hm_grad(fn, a, b, p, factor=0.1):
    b = b.clone().requires_grad_()
    loss = fn(a, b, p, factor)
    loss.backward()
    return loss, b.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "shape,p",
    [(s, p) for s in [(2, 5, 3, 7), (3, 70, 9, 11), (4, 33, 1, 65)] for p in (0.0, 0.5, 0.9)] + [((1, 3, 1, 1), 0.0)],
)
def test_hm_cosine_matches_reference(path, device, shape, p):
    skip_unless_runs(path, device)
    a, b = _features(shape, device)
    got, g_got = _hm_grad(hard_mining_cosine_loss, a, b, p)
    # the fused loss sums in float32 per point and float64 per sample: compare with the float64 oracle,
    # within twice the error of the authors' float32 computation (conftest.assert_close_to_oracle)
    want, g_want = _hm_grad(hard_mining_cosine_loss_reference, a.double(), b.double(), p)
    want32, g_want32 = _hm_grad(hard_mining_cosine_loss_reference, a, b, p)
    assert got.dtype == torch.float32
    assert_close_to_oracle(got, want, want32, what="loss")
    assert g_got.dtype == b.dtype and g_got.shape == b.shape
    assert_close_to_oracle(g_got, g_want, g_want32, what="gradient")


@pytest.mark.parametrize("device", DEVICES)
def test_hm_cosine_float64_exact_path(path, device):
    skip_unless_runs(path, device)
    a, b = _features((3, 20, 6, 5), device, torch.float64)
    got, g_got = _hm_grad(hard_mining_cosine_loss, a, b, 0.8)
    want, g_want = _hm_grad(hard_mining_cosine_loss_reference, a, b, 0.8)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hm_cosine_half(path, device, dtype):
    skip_unless_runs(path, device)
    a, b = _features((2, 40, 7, 9), device, dtype)
    got, g_got = _hm_grad(hard_mining_cosine_loss, a, b, 0.9)
    # the same 16-bit values, computed in float64 (oracle) and by the reference in float32 (the
    # kernel's compute precision; its gradient rounded to the 16-bit dtype as the kernel's is)
    want, g_want = _hm_grad(hard_mining_cosine_loss_reference, a.double(), b.double(), 0.9)
    base, g_base = _hm_grad(hard_mining_cosine_loss_reference, a.float(), b.float(), 0.9)
    assert g_got.dtype == dtype
    assert_close_to_oracle(got.float(), want, base, what="loss")
    assert_close_to_oracle(g_got, g_want, g_base.to(dtype), what="gradient")


@pytest.mark.parametrize("device", DEVICES)
def test_hm_cosine_token_layout_and_groups(path, device):
    skip_unless_runs(path, device)
    # Dinomaly's groups come from (B, tokens, C) tensors viewed as (B, C, H, W): channels-last strides
    tokens_a, tokens_b = _features((2, 6 * 5, 24), device)
    a = tokens_a.permute(0, 2, 1).reshape(2, 24, 6, 5)
    b = tokens_b.permute(0, 2, 1).reshape(2, 24, 6, 5)
    a2, b2 = _features((2, 24, 6, 5), device)
    bs = [b.clone().requires_grad_(), b2.clone().requires_grad_()]
    loss = hard_mining_cosine_loss([a, a2], bs, 0.7)
    loss.backward()
    ref = [x.contiguous().double().requires_grad_() for x in (b, b2)]
    want = hard_mining_cosine_loss_reference([a.contiguous().double(), a2.double()], ref, 0.7)
    want.backward()
    base_b = [x.detach().contiguous().clone().requires_grad_() for x in (b, b2)]
    base = hard_mining_cosine_loss_reference([a.contiguous(), a2], base_b, 0.7)
    base.backward()
    assert_close_to_oracle(loss, want, base, what="loss")
    for g, r, bb in zip(bs, ref, base_b):
        assert_close_to_oracle(g.grad, r.grad, bb.grad, what="gradient")


@pytest.mark.parametrize("device", DEVICES)
def test_hm_cosine_mining_semantics(path, device):
    skip_unless_runs(path, device)
    a, b = _features((2, 8, 5, 10), device, torch.float64)
    # p = 0: the comparison is strict, nothing is down-weighted: the plain global cosine gradient
    _, g = _hm_grad(hard_mining_cosine_loss, a, b, 0.0, factor=0.0)
    bb = b.clone().requires_grad_()
    (1 - torch.cosine_similarity(a.reshape(2, -1), bb.reshape(2, -1))).mean().backward()
    torch.testing.assert_close(g, bb.grad)
    # factor = 0: only the k = int(100 * 0.3) = 30 hardest points keep a gradient
    _, g = _hm_grad(hard_mining_cosine_loss, a, b, 0.7, factor=0.0)
    kept = g.abs().sum(1) > 0
    assert int(kept.sum()) == 30
    dist = 1 - torch.cosine_similarity(a, b)
    assert dist[kept].min() > dist[~kept].max()
    # the encoder side gets no gradient
    ea = a.clone().requires_grad_()
    hard_mining_cosine_loss(ea, b.clone().requires_grad_(), 0.5).backward()
    assert ea.grad is None


def test_hm_cosine_gradcheck_and_no_leftover_hook():
    a, b = _features((2, 4, 3, 3), "cpu", torch.float64)
    b.requires_grad_()
    # mining deliberately alters the gradient; with factor = 1 it is the loss's true gradient
    assert torch.autograd.gradcheck(lambda x: hard_mining_cosine_loss_reference(a, x, 0.6, 1.0), (b,))
    assert torch.autograd.gradcheck(lambda x: hard_mining_cosine_loss(a, x, 0.6, 1.0), (b,))
    assert not b._backward_hooks  # the reference hooks a view, never the caller's tensor


@pytest.mark.parametrize("device", DEVICES)
def test_hm_cosine_bad_input(path, device):
    skip_unless_runs(path, device)
    a, b = _features((2, 4, 3, 3), device)
    for p in (-0.1, 1.0, 2.0, float("nan")):
        with pytest.raises(ValueError, match="p must be"):
            hard_mining_cosine_loss(a, b, p)
    with pytest.raises(ValueError, match="keeps no hard point"):
        hard_mining_cosine_loss(a, b, 0.99)  # int(18 * 0.01) = 0
    with pytest.raises(ValueError, match="factor must be"):
        hard_mining_cosine_loss(a, b, 0.5, factor=-1.0)
    with pytest.raises(ValueError, match="one shape"):
        hard_mining_cosine_loss(a, b[:, :3], 0.5)
    with pytest.raises(ValueError, match="one shape"):
        hard_mining_cosine_loss(a[0], b[0], 0.5)
    with pytest.raises(ValueError, match="as many encoder as decoder"):
        hard_mining_cosine_loss([a, a], [b], 0.5)
    with pytest.raises(TypeError, match="both be tensors or both sequences"):
        hard_mining_cosine_loss(a, [b], 0.5)
    with pytest.raises(ValueError, match="empty"):
        hard_mining_cosine_loss(a[:0], b[:0], 0.5)
    for bad in (float("nan"), float("inf")):
        c = b.clone()
        c[1, 2, 0, 1] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            hard_mining_cosine_loss(a, c, 0.5)
    with pytest.raises(TypeError, match="floating"):
        hard_mining_cosine_loss(a.int(), b.int(), 0.5)


def test_losses_inside_torch_compile(path):
    # the losses run eagerly inside compiled code (a graph break), with the same values and gradients
    maps = (torch.rand(2, 16, 16) * 3).requires_grad_()
    step = torch.compile(lambda m: adc_loss(m.square().sqrt()) * 2, backend="aot_eager")
    loss = step(maps)
    loss.backward()
    ref = maps.detach().clone().requires_grad_()
    (adc_loss_reference(ref) * 2).backward()
    torch.testing.assert_close(loss, adc_loss_reference(maps.detach()) * 2)
    torch.testing.assert_close(maps.grad, ref.grad)
    a, b = _features((2, 8, 5, 5), "cpu")
    b.requires_grad_()
    hm = torch.compile(lambda x, y: hard_mining_cosine_loss(x, y * 1.0, 0.5), backend="aot_eager")(a, b)
    torch.testing.assert_close(hm, hard_mining_cosine_loss_reference(a, b, 0.5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_losses_without_host_reads(path, device, monkeypatch):
    # nonfinite='nan' (how the models train): forward and backward read nothing on the host, give the
    # default's loss and gradient bit for bit on finite input, and a NaN loss (no raise) otherwise
    from test_sync_free import _HostReads

    skip_unless_runs(path, device)
    g = torch.Generator().manual_seed(3)
    maps = (torch.rand(3, 17, 19, generator=g) * 2).to(device)
    a, b = (t.to(device) for t in _features((2, 6, 5, 7), "cpu"))
    losses = {"adc": lambda x, **k: adc_loss(x, 0.99, 0.9, **k), "hm": lambda x, **k: hard_mining_cosine_loss(a, x, 0.5, **k)}
    for name, fn in losses.items():
        x0 = maps if name == "adc" else b
        x = x0.clone().requires_grad_()
        want = fn(x)
        want.backward()
        y = x0.clone().requires_grad_()
        reads = _HostReads(monkeypatch)
        got = fn(y, nonfinite="nan")
        got.backward()
        reads.active = False
        assert reads.count == 0, name
        assert torch.equal(got, want) and torch.equal(y.grad, x.grad), name
        bad = x0.clone()
        bad.view(-1)[7] = float("nan")
        assert torch.isnan(fn(bad, nonfinite="nan")), name
        with pytest.raises(ValueError, match="NaN or inf"):
            fn(bad)
