"""Sync-free training steps: StableAdamW's multi-tensor update against the authors' per-parameter
loop, the device-side skip of a bad update (found_inf), host reads counted per training step, and
the NaN/inf guard still naming the exact first bad iteration when it is read every N iterations."""
import copy

import pytest
import torch

from conftest import TINY_DINOMALY
from fastad.data import folder
from fastad.data.cache import cached
from fastad.models import create_model
from fastad.optim import StableAdamW, adam
from test_cache import _defect_folder

SHAPES = [(5, 7), (13,), (1,), (3, 4, 2), (1000,)]  # one element, odd sizes, one larger than a block


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_() for s in SHAPES]


def _grads(it, g):
    scale = 30.0 if it % 4 == 1 else 0.05  # spikes: the clipping acts, AMSGrad's max differs from v
    return [torch.randn(s, generator=g) * scale for s in SHAPES]


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_multi_tensor_update_equals_the_per_parameter_loop(amsgrad, weight_decay):
    kw = dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-10, weight_decay=weight_decay, amsgrad=amsgrad, clip_threshold=0.5)
    a, b = _params(), _params()
    loop, multi = StableAdamW(a, foreach=False, **kw), StableAdamW(b, foreach=True, **kw)
    g = torch.Generator().manual_seed(1)
    steps = 12
    for it in range(steps):
        for x, y, grad in zip(a, b, _grads(it, g)):
            x.grad, y.grad = grad.clone(), grad.clone()
        loop.step()
        multi.step()
    # the same float32 operations in the same order; only the RMS's reduction order may differ
    # (torch's multi-tensor norm vs Tensor.norm), a few float32 roundings of the clipping factor per
    # step: each step's update (at most lr in size) differs by ~1e-6 of itself, summed over the steps
    for x, y in zip(a, b):
        torch.testing.assert_close(y.detach(), x.detach(), rtol=1e-6, atol=steps * kw["lr"] * 1e-6)
    for sa, sb in zip(loop.state.values(), multi.state.values()):
        assert float(sa["step"]) == float(sb["step"]) == steps
        torch.testing.assert_close(sb["exp_avg"], sa["exp_avg"], rtol=1e-6, atol=1e-7)


def test_found_inf_skips_exactly_and_zero_changes_nothing():
    kw = dict(lr=1e-2, eps=1e-10, weight_decay=1e-2, amsgrad=True, clip_threshold=0.5)
    a, b = _params(), _params()
    oa, ob = StableAdamW(a, **kw), StableAdamW(b, **kw)
    g = torch.Generator().manual_seed(2)
    for it in range(5):
        grads = _grads(it, g)
        for x, y, grad in zip(a, b, grads):
            x.grad, y.grad = grad.clone(), grad.clone()
        oa.step()
        ob.found_inf = torch.zeros(())  # told "all finite": bit-identical to no flag
        ob.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    before, state = [x.detach().clone() for x in b], copy.deepcopy(ob.state_dict())
    for x in b:
        x.grad = torch.full_like(x, float("nan"))
    ob.found_inf = torch.ones(())
    ob.step()
    assert all(torch.equal(x, y) for x, y in zip(b, before))
    after = ob.state_dict()["state"]
    for k, entry in state["state"].items():
        for name, v in entry.items():
            assert torch.equal(after[k][name], v), (k, name)


def test_a_skipped_first_step_leaves_everything_as_it_was():
    """found_inf on the very first step (a loss-scale overflow at iteration 0): the step count stays
    0, whose bias corrections would be 0/0; parameters and states must stay exactly as they were."""
    params = _params()
    before = [p.detach().clone() for p in params]
    opt = StableAdamW(params, lr=1e-2, amsgrad=True)
    for p in params:
        p.grad = torch.full_like(p, float("inf"))
    opt.found_inf = torch.ones(())
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    for state in opt.state.values():
        assert float(state["step"]) == 0 and all(not v.any() for k, v in state.items() if k != "step")
    del opt.found_inf
    for p in params:  # and the next clean step is the first step
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(float(s["step"]) == 1 for s in opt.state.values()) and all(torch.isfinite(p).all() for p in params)


def test_adam_is_fused_only_on_cuda():
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert not adam(p, lr=1e-3).defaults.get("fused") and isinstance(adam(p, decoupled=True), torch.optim.AdamW)


class _HostReads:
    """Counts the tensor-to-host reads (item, float, int, bool, tolist, numpy, cpu) made while active."""

    NAMES = ("item", "__float__", "__int__", "__bool__", "tolist", "numpy", "cpu")

    def __init__(self, monkeypatch):
        self.count, self.active = 0, True
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)

            def counted(t, *a, _original=original, **k):
                if self.active:
                    self.count += 1
                return _original(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)


def _tiny(**kw):
    torch.manual_seed(0)
    return create_model("dinomaly", **{**TINY_DINOMALY, "iterations": 8, "warmup_iters": 1, "train_batch_size": 4, **kw})


@pytest.mark.parametrize("check_every, precision", [(3, "fp32"), (3, "fp16")])  # fp16: with the loss scale
def test_a_training_step_reads_the_host_only_every_check_every_iterations(tmp_path, monkeypatch, check_every, precision):
    train = cached(folder(_defect_folder(tmp_path / "d"), "train", _tiny().transform()), tmp_path / "cache")
    model = _tiny(precision=precision)
    reads = _HostReads(monkeypatch)
    per_iteration = []
    step = model.training_step

    def counted_step(batch, it):
        start = reads.count
        out = step(batch, it)
        per_iteration.append(reads.count - start)
        return out

    model.training_step = counted_step
    reads.count = 0
    model.fit(train, progress=False, check_every=check_every)
    reads.active = False
    assert per_iteration == [0] * 8  # gather, loss (its attention and select too), update, optimizer step: no host read
    # outside the steps: per epoch (one batch of 4 of the 6 images) the seeded permutation's index
    # list, made on the host (no device involved), and per check one device-to-host transfer of
    # the pending losses and guard records plus the list of that host copy
    epochs, checks = 8, len({i for i in range(1, 9) if i % check_every == 0} | {8})  # and at the end
    assert reads.count == epochs + 2 * checks
    assert len(model.loss_history) == 8
    assert (model._scaler is not None) == (precision == "fp16")


@pytest.fixture(scope="module")
def five_good(tmp_path_factory):
    """(cached training set, a model after its 5 good iterations)."""
    root = tmp_path_factory.mktemp("guard")
    train = cached(folder(_defect_folder(root / "d"), "train", _tiny().transform()), root / "cache")
    good = _tiny()
    good.fit(train, iterations=5, progress=False)
    return train, good


# read every iteration; a few iterations after the bad one; only at the end of training
@pytest.mark.parametrize("check_every, where", [(1, "loss"), (3, "grad"), (50, "loss")])
def test_the_guard_names_the_exact_first_bad_iteration(five_good, where, check_every):
    from test_faults import _nan_after

    train, good = five_good
    model = _nan_after(_tiny(), 5, where)
    what = "the loss became nan" if where == "loss" else "the gradient norm became nan"
    with pytest.raises(FloatingPointError, match=f"Dinomaly: {what} at iteration 5; no checkpoint was written"):
        model.fit(train, progress=False, check_every=check_every)
    # stopped before the bad update: the weights are those after the 5 good iterations
    assert model.iteration == 5 and model.loss_history == good.loss_history
    for (k, a), b in zip(model.state_dict().items(), good.state_dict().values()):
        assert torch.equal(a, b), k


def test_check_every_is_validated():
    with pytest.raises(ValueError, match="check_every must be a positive int"):
        _tiny().fit(torch.zeros(4, 3, 56, 56), check_every=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])  # fp16: the loss scale's unscale and update too
@pytest.mark.parametrize("name", ["dinomaly", "minimaxad"])  # StableAdamW's multi-tensor update; fused AdamW
def test_the_guarded_update_makes_no_host_sync_on_cuda(name, precision):
    model = (_tiny(precision=precision) if name == "dinomaly" else
             create_model("minimaxad", encoder="efficientnet_lite0", iterations=4, precision=precision)).cuda()
    model.on_nan = "stop"
    model._ensure_optimizer()
    assert model._skips_on_device()
    images = torch.randn(4, 3, *model.image_size, device="cuda")
    model.training_loss(images, 0)  # the first call folds the backbone's batch norms (a one-time check)
    for _ in range(2):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:  # the loss (attention, hard-mining select) and the guarded update
            model.update(model.training_loss(images, model.iteration))
        finally:
            torch.cuda.set_sync_debug_mode(0)
        model.iteration += 1
    assert len(model._pending) == 2 and model.last_grad_norm > 0


@pytest.mark.parametrize("name", ["dinomaly", "minimaxad", "rlr"])
def test_the_training_losses_read_nothing_on_the_host(path, name, monkeypatch):
    # forward and backward of each trained model's loss, on the Triton (interpreted here) and the
    # PyTorch paths: the attention ops and the hard-mining select run with nonfinite='nan', so a NaN
    # reaches the loss (and the guard) instead of a host read per op
    from test_model_contract import TINY

    torch.manual_seed(0)
    model = create_model(name, **TINY[name]).train()
    images = torch.rand(2, 3, *model.image_size)
    model.training_loss(images, 0).backward()  # first call: MiniMaxAD folds its backbone once
    reads = _HostReads(monkeypatch)
    loss = model.training_loss(images, 1)
    loss.backward()
    reads.active = False
    assert reads.count == 0
    assert torch.isfinite(loss)


# inference: engine.predict checks the images on the host copy (or gathers finite cached pixels) and
# runs each forward in a checked_inputs block, so these models' forwards read nothing on the host
# (PatchCore's and FeatureNorm's kNN validate their features: a read each, left as they are)
SYNC_FREE_FORWARD = ["padim", "dinomaly", "minimaxad", "rlr", "fod"]


@pytest.mark.parametrize("name", SYNC_FREE_FORWARD)
def test_predict_forwards_read_nothing_on_the_host(tmp_path, monkeypatch, name):
    from fastad.engine import predict
    from test_model_contract import TINY

    torch.manual_seed(0)
    model = create_model(name, **{**TINY[name], "crop_fraction": 1.0})
    root = _defect_folder(tmp_path / "d", size=64)
    model.fit(folder(root, "train", model.transform()), progress=False)
    model.eval()
    test = folder(root, "test", model.transform())
    reads, per_forward = _HostReads(monkeypatch), []
    forward = model.forward

    def counted(*a, **k):
        start = reads.count
        out = forward(*a, **k)
        per_forward.append(reads.count - start)
        return out

    model.forward = counted
    plain = predict(model, test, batch_size=2)  # collated, checked on the host
    fast = predict(model, cached(test, tmp_path / "cache"), batch_size=2)  # gathered from the cache
    reads.active = False
    assert per_forward == [0] * 6  # 3 + 3 batches of the 6 test images
    for a, b in zip(plain, fast):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert plain[1].shape == (6, *model.image_size) and not plain[0].is_cuda


def test_predict_still_rejects_a_nan_image_and_checked_inputs_skips_only_the_scan(tmp_path):
    from fastad.engine import predict

    torch.manual_seed(0)
    model = create_model("padim", image_size=64, crop_fraction=1.0)
    root = _defect_folder(tmp_path / "d", size=64)
    model.fit(folder(root, "train", model.transform()), progress=False)
    test = folder(root, "test", model.transform())

    class WithNaN(torch.utils.data.Dataset):
        def __len__(self):
            return len(test)

        def __getitem__(self, i):
            item = dict(test[i])
            if i == 4:
                item["image"] = item["image"].clone()
                item["image"][1, 7, 3] = float("nan")
            return item

    with pytest.raises(ValueError, match="PaDiM got images with NaN or inf values; expected finite values"):
        predict(model, WithNaN(), batch_size=2)
    bad = WithNaN()[4]["image"][None]
    with pytest.raises(ValueError, match="NaN or inf"):
        model(bad)
    with model.checked_inputs():  # the caller vouches for the values: no scan, the other checks stay
        assert torch.isnan(model(bad).maps).any()
        with pytest.raises(ValueError, match=r"expects images of shape \(B, 3, H, W\)"):
            model(bad[0])
    with pytest.raises(ValueError, match="NaN or inf"):  # the block restored the check
        model(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("use_cache", [False, True])
def test_predict_makes_no_host_sync_on_cuda_until_the_end(tmp_path, monkeypatch, use_cache):
    from fastad.engine import predict

    torch.manual_seed(0)
    model = create_model("padim", image_size=64, crop_fraction=1.0).cuda()
    root = _defect_folder(tmp_path / "d", size=64)
    model.fit(folder(root, "train", model.transform()), progress=False)
    test = folder(root, "test", model.transform())
    if use_cache:
        test = cached(test, tmp_path / "cache")
    want = predict(model, test, batch_size=2)  # the first calls may set things up (dispatcher, cuBLAS)
    synchronize = torch.cuda.synchronize

    def final(*a):  # the one wait, after the last batch
        torch.cuda.set_sync_debug_mode(0)
        synchronize(*a)

    monkeypatch.setattr(torch.cuda, "synchronize", final)
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = predict(model, test, batch_size=2)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for a, b in zip(want, got):
        assert torch.equal(a, b)
