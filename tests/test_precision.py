"""precision='bf16' / 'fp16': the encoders and trainable networks run under autocast, everything a
user reads (scores, maps, losses) and everything kept (weights, optimizer states) stays float32; the
setting travels in the config and the checkpoint; fp16 trains with a loss scale kept on the device."""
import math

import pytest
import torch
from torch import nn

from conftest import TINY_DINOMALY
from fastad.models import create_model, load_checkpoint
from fastad.models.base import _device_type

@pytest.fixture(autouse=True)
def _torch_paths(monkeypatch):
    # the ops' PyTorch paths: their Triton kernels in bf16/fp16 are tested on their own, and through
    # the interpreter they would take minutes here
    from fastad.ops import dispatch

    monkeypatch.setitem(dispatch.settings, "triton", False)


# tiny configurations of every model (random or offline weights), with the data each fit takes
CASES = {
    "patchcore": {},
    "padim": {},
    "dinomaly": dict(TINY_DINOMALY, iterations=2, warmup_iters=1, train_batch_size=4),
    "minimaxad": dict(encoder="efficientnet_lite0", iterations=2, image_size=64, train_batch_size=4),
    "fod": dict(image_size=64, iterations=1),
    "rlr": dict(weights="random", image_size=64, depth=1, iterations=2, train_batch_size=2),
    "featurenorm": dict(image_size=64),
}


def _images(model, n=4):
    return torch.randn(n, 3, *model.image_size, generator=torch.Generator().manual_seed(0))


def _fit(model, x):
    if hasattr(model, "iterations"):
        return model.fit(x, iterations=model.iterations, progress=False)
    return model.fit(x, progress=False)


def _inner_dtypes(model):
    """What the autocast modules see, recorded by hooks: per module call the autocast dtype in force
    (None: off), and the output dtypes of the linear / conv layers they run as registered modules (the
    CPU backbone runs a batch-norm-folded copy of its network, whose layers are not registered)."""
    seen = {"context": [], "layers": []}

    def context(module, args):
        device = _device_type(module, args)
        seen["context"].append(torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)

    for name in model.autocast_modules:
        module = getattr(model, name)
        for m in module if isinstance(module, nn.ModuleList) else [module]:
            m.register_forward_pre_hook(context)  # after fastad's own: inside its autocast
            for layer in m.modules():
                if isinstance(layer, (nn.Linear, nn.Conv2d)):
                    layer.register_forward_hook(lambda mod, a, out: seen["layers"].append(out.dtype))
    return seen


@pytest.mark.parametrize("name", sorted(CASES))
def test_bf16_runs_the_networks_in_bf16_and_returns_float32(name):
    torch.manual_seed(0)
    model = create_model(name, precision="bf16", **CASES[name])
    assert model.precision == "bf16" and model.config["precision"] == "bf16"
    x = _images(model)
    _fit(model, x)
    for p in model.parameters():
        assert p.dtype == torch.float32  # master weights
    for state in getattr(model.optimizer, "state", {}).values() if getattr(model, "optimizer", None) else []:
        for v in state.values():
            assert not isinstance(v, torch.Tensor) or v.dtype in (torch.float32, torch.float64)
    if getattr(model, "loss_history", None):
        assert all(torch.isfinite(torch.tensor(model.loss_history)))
    seen = _inner_dtypes(model)
    scores, maps = model(x)
    assert scores.dtype == maps.dtype == torch.float32 and torch.isfinite(maps).all()
    assert seen["context"] and set(seen["context"]) == {torch.bfloat16}  # every call under bf16 autocast
    assert set(seen["layers"]) <= {torch.bfloat16}  # and every linear / conv that ran there
    if name in ("dinomaly", "minimaxad"):
        assert seen["layers"]  # (the decoders' layers are registered modules)


def test_fp32_is_the_default_and_stays_out_of_the_config():
    model = create_model("patchcore")
    assert model.precision == "fp32" and "precision" not in model.config
    seen = _inner_dtypes(model)
    model.fit(torch.randn(2, 3, 224, 224), progress=False)
    model(torch.randn(1, 3, 224, 224))
    assert set(seen["context"]) == {None}
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"):
        create_model("patchcore", precision="int8")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_checkpoints_reload_with_their_precision_in_eval_mode(tmp_path, precision):
    torch.manual_seed(0)
    model = create_model("dinomaly", precision=precision, **CASES["dinomaly"])
    x = _images(model)
    _fit(model, x)
    model.save(tmp_path / "m.safetensors")
    again = load_checkpoint(tmp_path / "m.safetensors")
    assert again.precision == precision and not again.training  # dropout off: scores as saved
    a, b = model(x), again(x)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)


TRAINED = ["dinomaly", "fod", "minimaxad", "rlr"]


def _finite_float32(model):
    for p in model.parameters():
        assert p.dtype == torch.float32 and torch.isfinite(p).all()
    for state in model.optimizer.state.values():
        for v in state.values():
            assert not isinstance(v, torch.Tensor) or v.dtype in (torch.float32, torch.float64)


@pytest.mark.parametrize("name", TRAINED)
def test_fp16_trains_with_a_loss_scale_and_float32_master_weights(name):
    torch.manual_seed(0)
    model = create_model(name, precision="fp16", **CASES[name])
    x = _images(model)
    model.fit(x, iterations=1, progress=False)  # (a CPU backbone checks its folded copy in float32 on first use)
    seen = _inner_dtypes(model)
    model.fit(x, iterations=3, progress=False)
    _finite_float32(model)
    assert model.loss_history and all(torch.isfinite(torch.tensor(model.loss_history)))
    assert set(seen["context"]) == {torch.float16} and set(seen["layers"]) <= {torch.float16}
    # torch.amp.GradScaler's rule: 2^16, halved at each overflow (which skips the update), no growth this soon
    scale = model._scaler.scale
    assert scale.dtype == torch.float32 and float(scale) == 2.0 ** (16 - len(model.overflow_iterations))
    assert model.skipped_iterations == []
    scores, maps = model(x)
    assert scores.dtype == maps.dtype == torch.float32 and torch.isfinite(maps).all()


# Dinomaly: StableAdamW, skipped on the device; its float16 decoder overflows at scales above about
# 2^11 here (2^10 with torch 2.11): 2^24 takes about 13 overflows, well inside the 30 iterations. FOD:
# torch Adam, the host path; its trained levels run in float32 (not autocast), which overflow at 2^127
@pytest.mark.parametrize("name, log_scale", [("dinomaly", 24), ("fod", 127)])
def test_a_loss_scale_overflow_skips_the_update_exactly(name, log_scale):
    """A scale too large overflows the backward pass: those updates leave weights and optimizer
    states exactly as they were, halve the scale, count as overflows (not NaN/inf iterations: no
    stop), and training goes on once the scale fits."""
    from fastad.optim import LossScaler

    torch.manual_seed(0)
    model = create_model(name, precision="fp16", **CASES[name])
    x = _images(model)
    model._scaler = LossScaler(init_scale=2.0 ** log_scale)
    before = [p.detach().clone() for p in model.trainable_parameters()]
    model.fit(x, iterations=1, progress=False)
    assert model.overflow_iterations == [0] and model.skipped_iterations == [] and model.iteration == 1
    assert float(model._scaler.scale) == 2.0 ** (log_scale - 1)
    for p, b in zip(model.trainable_parameters(), before):
        assert torch.equal(p, b)
    for state in model.optimizer.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and k != "step":
                assert not v.any(), k  # moments never touched
    model.fit(x, iterations=30, progress=False)
    n = len(model.overflow_iterations)
    over = model.overflow_iterations  # until the scale fits (FOD's, at float32's edge, may overflow again later)
    assert 1 < n < 30 and over[:2] == [0, 1] and over == sorted(set(over))
    assert float(model._scaler.scale) == 2.0 ** (log_scale - n) and model.skipped_iterations == []
    assert any(not torch.equal(p, b) for p, b in zip(model.trainable_parameters(), before))  # clean updates applied
    _finite_float32(model)


def test_fp16_training_resumes_exactly_with_its_loss_scale(tmp_path):
    from fastad.optim import LossScaler

    def run():
        torch.manual_seed(0)
        model = create_model("dinomaly", precision="fp16", **CASES["dinomaly"])
        model._scaler = LossScaler(init_scale=2.0 ** 17)  # one overflow, then clean updates
        return model

    x = _images(run())
    straight = run().fit(x, iterations=4, progress=False)
    first = run().fit(x, iterations=2, checkpoint=str(tmp_path / "c.safetensors"), progress=False)
    resumed = load_checkpoint(tmp_path / "c.safetensors").fit(x, iterations=4, progress=False)
    assert first.overflow_iterations == resumed.overflow_iterations[:len(first.overflow_iterations)]
    assert resumed.overflow_iterations == straight.overflow_iterations and straight.overflow_iterations
    assert torch.equal(resumed._scaler.scale, straight._scaler.scale)
    assert torch.equal(resumed._scaler.growth, straight._scaler.growth)
    assert resumed.loss_history == straight.loss_history
    for k, v in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


@pytest.mark.parametrize("on_nan", ["stop", "skip"])
def test_fp16_nan_loss_is_still_named_at_its_iteration(on_nan, monkeypatch):
    torch.manual_seed(0)
    model = create_model("dinomaly", precision="fp16", **CASES["dinomaly"])
    loss = type(model).training_loss
    monkeypatch.setattr(type(model), "training_loss",
                        lambda self, images, it: loss(self, images, it) * (math.nan if it == 1 else 1.0))
    x = _images(model)
    if on_nan == "stop":
        with pytest.raises(FloatingPointError, match="loss became nan at iteration 1"):
            model.fit(x, iterations=3, progress=False, on_nan=on_nan)
        assert model.iteration == 1
    else:
        model.fit(x, iterations=3, progress=False, on_nan=on_nan)
        assert model.skipped_iterations == [1] and 1 not in model.overflow_iterations
    _finite_float32(model)


def test_fp16_gradients_are_fp16_rounded_fp32_gradients():
    """The gradient of Dinomaly's trainable networks (bottleneck and 4 decoder blocks: about 20
    linear layers) for a smooth loss, under fp16 autocast with a loss scale of 2^10, against
    float32: each autocast linear rounds its inputs and weights to float16 (relative 2^-11 each) in
    the forward pass and its output gradient in the backward pass, so about 2^-10 per layer and pass;
    over 2 x 20 layers in quadrature sqrt(40) 2^-10 = 0.6%, and 4x that is the bound."""
    from fastad.optim import LossScaler

    grads = {}
    for precision in ("fp32", "fp16"):
        torch.manual_seed(0)
        model = create_model("dinomaly", precision=precision, **CASES["dinomaly"]).eval()  # no dropout
        x = _images(model)
        _, dec = model.features(x)
        loss = sum((d ** 2).mean() for d in dec)
        scaler = LossScaler(init_scale=2.0 ** 10)
        scaler.scaled(loss).backward()
        params = list(model.trainable_parameters())
        assert not scaler.unscale(params).any()
        grads[precision] = torch.cat([p.grad.reshape(-1) for p in params])
    a, b = grads["fp32"], grads["fp16"]
    assert b.dtype == torch.float32
    assert float((a - b).norm() / a.norm()) < 4 * 40 ** 0.5 * 2.0 ** -10


def test_bf16_features_are_bf16_rounded_fp32_features():
    """Dinomaly's encoder (ViT blocks: linear layers between float32 norms and residual adds) in bf16
    against float32: each autocast linear rounds its inputs and weights to bf16 (relative 2^-9 each)
    and accumulates in float32, so a layer's output carries about 2^-8 relative error; over the
    encoder's 4 blocks x 4 linears (16 layers) the errors add in quadrature, sqrt(16) 2^-8 = 1.6%, and
    4x that is the bound. The decoder and the map then see the same kind of error."""
    torch.manual_seed(0)
    fp32 = create_model("dinomaly", **CASES["dinomaly"]).eval()
    torch.manual_seed(0)
    bf16 = create_model("dinomaly", precision="bf16", **CASES["dinomaly"]).eval()
    x = _images(fp32)
    with torch.no_grad():
        a, b = fp32.encoder(x), bf16.encoder(x)
    bound = 4 * 16 ** 0.5 * 2.0 ** -8
    for u, v in zip(a, b):
        assert v.dtype == torch.float32
        assert float((u - v).norm() / u.norm()) < bound


def test_precision_on_the_command_line(tmp_path):
    import json

    from fastad.cli import main
    from test_cache import _defect_folder

    root = _defect_folder(tmp_path / "d")
    assert main(["run", "--data", f"folder:{root}", "--overlays", "0", "--precision", "bf16", "--out", str(tmp_path / "o"),
                 "--set", "coreset_ratio=0.5"]) == 0
    row = json.loads((tmp_path / "o" / "results.json").read_text())[0]
    assert row["set_args"]["precision"] == "bf16" and 0 <= row["image_auroc"] <= 1


@pytest.mark.parametrize("name, kw", [("minimaxad", {}), ("minimaxad", {"encoder": "unireplknet_n", "weights": "random"}),
                                      ("patchcore", {})])
def test_channels_last_convolutions_give_the_same_maps(name, kw, monkeypatch):
    """On CUDA the convolutional networks take channels-last inputs under bf16/fp16 (cuDNN's NHWC
    tensor-core kernels); forced here on the CPU. The networks must see NHWC inputs, hand back
    standard-layout maps, train, and score as the NCHW run does up to the convolutions' other
    summation order: each bf16 layer output may round either way (2^-8 relative), over the ~60
    convolution and norm layers in quadrature sqrt(60) 2^-8 = 3%, and 4x that is the bound."""
    import fastad.models.base as base

    case = {**CASES[name], **kw}
    runs = []
    for devices in (("cuda",), ("cuda", "cpu")):
        monkeypatch.setattr(base, "CHANNELS_LAST_DEVICES", devices)
        torch.manual_seed(0)
        model = create_model(name, precision="bf16", **case)
        x = _images(model)
        layouts = []
        for net in model.autocast_modules:
            getattr(model, net).register_forward_pre_hook(
                lambda m, a: layouts.append([t.is_contiguous(memory_format=torch.channels_last)
                                             for t in (a[0] if isinstance(a[0], (list, tuple)) else a[:1])]))
            getattr(model, net).register_forward_hook(
                lambda m, a, out: layouts.append([t.is_contiguous() for t in (out if isinstance(out, (list, tuple)) else [out])]))
        _fit(model, x)
        layouts.clear()
        runs.append((model(x), layouts))
    (plain, plain_layouts), (nhwc, layouts) = runs
    assert not all(all(flags) for flags in plain_layouts)  # (NCHW where not forced)
    assert layouts and all(all(flags) for flags in layouts)  # NHWC in, contiguous out, at every network
    bound = 4 * 60 ** 0.5 * 2.0 ** -8
    assert float((plain.maps - nhwc.maps).norm() / plain.maps.norm()) < bound  # measured: <= 8e-4
    assert torch.isfinite(nhwc.scores).all()
