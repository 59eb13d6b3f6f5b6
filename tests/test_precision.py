"""precision='bf16' / 'fp16': the encoders and trainable networks run under autocast, everything a
user reads (scores, maps, losses) and everything kept (weights, optimizer states) stays float32; the
setting travels in the config and the checkpoint; fp16 does not train (no loss scaling yet)."""
import pytest
import torch
from torch import nn

from conftest import TINY_DINOMALY
from fastad.models import create_model, load_checkpoint
from fastad.models.base import _device_type

# tiny configurations of every model (random or offline weights), with the data each fit takes
CASES = {
    "patchcore": {},
    "padim": {},
    "dinomaly": dict(TINY_DINOMALY, iterations=2, warmup_iters=1, train_batch_size=4),
    "minimaxad": dict(encoder="efficientnet_lite0", iterations=2, image_size=64, train_batch_size=4),
    "fod": dict(image_size=64, iterations=1),
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


def test_fp16_scores_but_does_not_train():
    torch.manual_seed(0)
    model = create_model("dinomaly", precision="fp16", **CASES["dinomaly"])
    with pytest.raises(ValueError, match="fp16.*needs loss scaling.*bf16"):
        model.fit(_images(model), progress=False)
    scores, maps = model(_images(model))  # inference in float16 is fine
    assert scores.dtype == maps.dtype == torch.float32 and torch.isfinite(maps).all()


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
