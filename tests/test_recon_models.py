"""Dinomaly and MiniMaxAD: blocks, losses against the references, optimiser, inference, checkpoints."""
import copy
import inspect
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastad.data import SyntheticDataset
from fastad.models import Dinomaly, MiniMaxAD, create_model, load_checkpoint
from fastad.models.components.maps import cosine_distance_map, top_ratio_mean
from fastad.models.dinomaly import DecoderBlock, LinearAttention, NoisyBottleneck
from fastad.models.minimaxad import Bottleneck, Decoder
from fastad.models.components.unireplknet import GRN, DilatedReparamBlock, UniRepLKNetBlock, UniRepLKNetEncoder
from fastad.models.components.vit_encoder import ViTEncoder
from fastad.ops import (
    adc_loss_reference,
    gaussian_blur_small,
    hard_mining_cosine_loss_reference,
    linear_attention_reference,
)
from fastad.optim import StableAdamW, warm_cosine
from conftest import ROOT, assert_close_to_oracle, shared

TINY_VIT = {"depth": 4, "embed_dim": 48, "num_heads": 2}


@pytest.fixture
def no_triton(monkeypatch):
    """Model-level tests take the ops' PyTorch path (the kernels are tested against it elsewhere)."""
    from fastad.ops import dispatch

    monkeypatch.setitem(dispatch.settings, "triton", False)


def tiny_dinomaly(**kw):
    args = dict(encoder="dinov2reg_vit_small_14", weights="random", encoder_layers=(0, 1, 2, 3), groups=((0, 1), (2, 3)),
                decoder_depth=4, encoder_kwargs=TINY_VIT, train_batch_size=4, iterations=6, warmup_iters=2, map_size=56, p_ramp=4)
    return Dinomaly(**{**args, **kw})


def tiny_minimaxad(**kw):
    return MiniMaxAD(**{**dict(encoder="efficientnet_lite0", train_batch_size=4, iterations=6), **kw})


# -- optimiser and schedule ----------------------------------------------------------------------------
@pytest.mark.parametrize("amsgrad", [False, True])
def test_stable_adamw_equals_adamw_when_the_update_is_not_clipped(amsgrad):
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(7, 5))
    p2 = torch.nn.Parameter(p1.detach().clone())
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, amsgrad=amsgrad)
    a, b = StableAdamW([p1], clip_threshold=1e9, **kw), torch.optim.AdamW([p2], **kw)
    for step in range(5):
        g = torch.randn(7, 5) * (10 if step == 3 else 1)  # a spike: AMSGrad's max then differs from v
        p1.grad, p2.grad = g.clone(), g.clone()
        a.step()
        b.step()
        torch.testing.assert_close(p1, p2, rtol=1e-6, atol=1e-7)


def test_stable_adamw_clips_by_the_rms_of_the_normalised_update():
    # first step: denom = |g| + eps, so RMS(g / denom) ~ 1; clip_threshold 0.25 divides the step by 4
    p = torch.nn.Parameter(torch.zeros(4))
    opt = StableAdamW([p], lr=0.1, eps=1e-12, weight_decay=0.5, amsgrad=True, clip_threshold=0.25)
    p.grad = torch.tensor([1.0, -2.0, 3.0, -4.0])
    opt.step()
    torch.testing.assert_close(p.detach(), -0.1 / 4 * torch.sign(p.grad), rtol=1e-6, atol=1e-9)
    q = torch.nn.Parameter(torch.ones(3))  # weight decay uses the unclipped lr, before the step
    opt = StableAdamW([q], lr=0.1, weight_decay=0.5, clip_threshold=1e-3)
    q.grad = torch.zeros(3)
    opt.step()
    torch.testing.assert_close(q.detach(), torch.full((3,), 1 - 0.1 * 0.5))


def test_stable_adamw_rejects_bad_settings():
    p = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match="betas"):
        StableAdamW(p, betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="clip_threshold"):
        StableAdamW(p, clip_threshold=0)


def test_warm_cosine_matches_the_authors_schedule():
    base, final, total, warm = 2e-3, 2e-4, 50, 10
    # WarmCosineScheduler: np.linspace warm-up, then the cosine over the remaining iterations
    iters = np.arange(total - warm)
    want = np.concatenate([np.linspace(0, base, warm), final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))])
    f = warm_cosine(base, final, total, warm)
    got = np.array([base * f(i) for i in range(total)])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert base * f(total) == pytest.approx(final) and base * f(10 * total) == pytest.approx(final)
    with pytest.raises(ValueError):
        warm_cosine(base, final, 10, 10)


# -- blocks ------------------------------------------------------------------------------------------------
def test_gaussian_blur_small_is_the_authors_5x5_kernel_with_zero_padding():
    x = torch.rand(3, 20, 17, dtype=torch.float64)
    # Dinomaly's get_gaussian_kernel: 2-D Gaussian over an xy grid centred at (k-1)/2, normalised
    xy = torch.stack(torch.meshgrid(torch.arange(5.0), torch.arange(5.0), indexing="xy"), -1).double()
    k = torch.exp(-((xy - 2.0) ** 2).sum(-1) / (2 * 16.0)) / (2 * math.pi * 16.0)
    k = k / k.sum()
    want = F.conv2d(x.unsqueeze(1), k.view(1, 1, 5, 5), padding=2).squeeze(1)
    torch.testing.assert_close(gaussian_blur_small(x), want)
    ones = gaussian_blur_small(torch.ones(1, 9, 9))
    assert ones[0, 4, 4] == pytest.approx(1.0) and ones[0, 0, 0] < 0.6  # borders darken
    assert gaussian_blur_small(x.half()).dtype == torch.float16
    with pytest.raises(ValueError, match="odd kernel_size"):
        gaussian_blur_small(x, kernel_size=4)


def test_top_ratio_mean_and_cosine_distance_map():
    maps = torch.arange(200.0).view(2, 10, 10)
    torch.testing.assert_close(top_ratio_mean(maps, 0.05), torch.tensor([97.0, 197.0]))  # mean of the top 5
    torch.testing.assert_close(top_ratio_mean(maps, 0.001), torch.tensor([99.0, 199.0]))  # at least one pixel
    with pytest.raises(ValueError, match="ratio"):
        top_ratio_mean(maps, 0)
    a, b = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    got = cosine_distance_map([a, a], [b, a], (8, 8))
    want = F.interpolate((1 - F.cosine_similarity(a, b, dim=1)).unsqueeze(1), size=(8, 8), mode="bilinear", align_corners=True)
    torch.testing.assert_close(got, want.squeeze(1) / 2, rtol=1e-5, atol=1e-6)


def test_grn_and_unireplknet_block_shapes():
    x = torch.randn(2, 5, 6, 8)  # NHWC
    g = GRN(8)
    with torch.no_grad():
        g.gamma.fill_(0.5)
        g.beta.fill_(0.1)
    n = x.pow(2).sum((1, 2), keepdim=True).sqrt()
    torch.testing.assert_close(g(x), (0.5 * n / (n.mean(-1, keepdim=True) + 1e-6) + 1) * x + 0.1)
    for k in (3, 13):
        blk = UniRepLKNetBlock(16, k)
        y = blk(torch.randn(2, 16, 9, 11))
        assert y.shape == (2, 16, 9, 11)
    with pytest.raises(ValueError, match="kernels"):
        UniRepLKNetBlock(16, 1)


def test_dilated_reparam_block_equals_its_merged_kernel():
    # the sum of the branches is one 13x13 depthwise conv whose kernel holds each dilated kernel
    # spread out and centred: checks every branch's padding and dilation
    torch.manual_seed(0)
    blk = DilatedReparamBlock(6, 13).eval()
    for m in blk.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 2), m.bias.data.uniform_(-1, 1)
    x = torch.randn(2, 6, 15, 14, dtype=torch.float64)
    blk = blk.double()

    def fused(conv, bn):
        s = bn.weight / (bn.running_var + bn.eps).sqrt()
        return conv.weight * s.view(-1, 1, 1, 1), bn.bias - bn.running_mean * s

    kernel, bias = fused(blk.lk_origin, blk.origin_bn)
    for k, r in blk.branches:
        w, b = fused(getattr(blk, f"dil_conv_k{k}_{r}"), getattr(blk, f"dil_bn_k{k}_{r}"))
        span = r * (k - 1) + 1
        spread = torch.zeros(6, 1, span, span, dtype=torch.float64)
        spread[:, :, ::r, ::r] = w
        pad = (13 - span) // 2
        kernel = kernel + F.pad(spread, [pad] * 4)
        bias = bias + b
    with torch.no_grad():
        torch.testing.assert_close(blk(x), F.conv2d(x, kernel, bias, padding=6, groups=6))


def test_minimaxad_bottleneck_and_decoder_shapes():
    dims = (8, 16, 32)
    feats = [torch.randn(2, 8, 32, 32), torch.randn(2, 16, 16, 16), torch.randn(2, 32, 8, 8)]
    z = Bottleneck(dims)(feats)
    assert z.shape == (2, 64, 4, 4)
    out = Decoder(dims)(z)
    assert [tuple(o.shape) for o in out] == [(2, 8, 32, 32), (2, 16, 16, 16), (2, 32, 8, 8)]
    depths = [len(s) for s in Decoder(dims).stages]
    assert depths == [8, 2, 2]  # coarsest stage first, as it runs


def test_unireplknet_encoder_shapes_and_checkpoint_loading(tmp_path):
    enc = UniRepLKNetEncoder("random")
    out = enc(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape) for o in out] == [(1, 80, 16, 16), (1, 160, 8, 8), (1, 320, 4, 4)]
    assert sum(len(s) for s in enc.stages) == 12 and not any(p.requires_grad for p in enc.parameters())
    # an ImageNet checkpoint: no norm0..2, plus stage 3 and the classifier, under 'model'
    src = UniRepLKNetEncoder("random")
    state = {k: v.clone().normal_() if v.is_floating_point() else v for k, v in src.state_dict().items() if not k.startswith("norm")}
    state["stages.3.0.gamma"], state["head.weight"] = torch.zeros(640), torch.zeros(1000, 640)
    torch.save({"model": state}, tmp_path / "n.pth")
    loaded = UniRepLKNetEncoder(str(tmp_path / "n.pth"))
    for k, v in state.items():
        if k in loaded.state_dict():
            assert torch.equal(loaded.state_dict()[k], v), k
    assert torch.equal(loaded.norm0.weight, torch.ones(80))  # stays identity, as in the authors' code
    torch.save({"model": {"stages.0.0.gamma": torch.zeros(80)}}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a UniRepLKNet-N checkpoint"):
        UniRepLKNetEncoder(str(tmp_path / "bad.pth"))
    with pytest.raises(FileNotFoundError, match="weights=PATH"):
        UniRepLKNetEncoder(None)
    with pytest.raises(FileNotFoundError):
        UniRepLKNetEncoder(str(tmp_path / "missing.pth"))


def test_vit_encoder_matches_timm_at_native_size_and_dinov2_interpolation_elsewhere():
    torch.manual_seed(0)
    enc = ViTEncoder("dinov2reg_vit_small_14", layers=(0, 2), weights="random", **TINY_VIT)
    vit = enc.vit
    assert enc.num_prefix == 5 and vit.pos_embed.shape[1] == 37 * 37
    x = torch.randn(1, 3, 518, 518)
    with torch.no_grad():
        t = vit._pos_embed(vit.patch_embed(x))  # timm's own path, no resampling at 37 x 37
        want = [vit.blocks[0](t)]
        want.append(vit.blocks[2](vit.blocks[1](want[0])))
    got = enc(x)
    assert len(got) == 2
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # 392 px: DINOv2's bicubic resize with scale (28 + 0.1) / 37, no antialiasing
    x = torch.randn(2, 3, 392, 392)
    grid = vit.pos_embed.reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    pos = F.interpolate(grid, scale_factor=(28.1 / 37, 28.1 / 37), mode="bicubic", antialias=False)
    with torch.no_grad():
        p = vit.patch_embed(x).reshape(2, 784, -1) + pos.permute(0, 2, 3, 1).reshape(1, 784, -1)
        t = torch.cat([vit.cls_token.expand(2, -1, -1), vit.reg_token.expand(2, -1, -1), p], 1)
        want = vit.blocks[0](t)
    torch.testing.assert_close(enc(x)[0], want)
    with pytest.raises(ValueError, match="multiple of the patch"):
        enc(torch.randn(1, 3, 100, 100))
    with pytest.raises(ValueError, match="out of range"):
        ViTEncoder("dinov2reg_vit_small_14", layers=(4,), weights="random", **TINY_VIT)


def test_offline_hybrid_vit_encoder():
    enc = ViTEncoder("efficientnet_lite0", embed_dim=32, num_heads=2)
    assert enc.patch == 16 and enc.layers == (2, 3, 4, 5, 6, 7, 8, 9) and enc.num_prefix == 5
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.vit.patch_embed.backbone.model.training  # Lite0's BatchNorm stays frozen
    out = enc(torch.randn(2, 3, 96, 128))
    assert len(out) == 8 and out[0].shape == (2, 5 + 6 * 8, 32)


def test_dinomaly_blocks(no_triton):
    torch.manual_seed(0)
    x = torch.randn(2, 13, 24)
    bn = NoisyBottleneck(24, 96, 0.2)
    assert bn.eval()(x).shape == x.shape and not torch.equal(bn.train()(x), bn.train()(x))  # noisy in training
    att = LinearAttention(24, 4)
    q, k, v = att.qkv(x).reshape(2, 13, 3, 4, 6).permute(2, 0, 3, 1, 4)
    want = att.proj(linear_attention_reference(q, k, v).transpose(1, 2).reshape(2, 13, 24))
    torch.testing.assert_close(att(x), want)
    blk = DecoderBlock(24, 4)
    assert blk.norm1.eps == 1e-8 and blk(x).shape == x.shape
    with pytest.raises(ValueError, match="divisible"):
        LinearAttention(24, 5)


# -- whole models -----------------------------------------------------------------------------------------
def test_dinomaly_defaults_are_the_papers():
    d = {k: p.default for k, p in inspect.signature(Dinomaly).parameters.items()}
    assert d["encoder"] == "dinov2reg_vit_base_14" and d["dropout"] == 0.2 and d["decoder_depth"] == 8
    assert (d["iterations"], d["train_batch_size"], d["lr"], d["final_lr"], d["warmup_iters"]) == (10000, 16, 2e-3, 2e-4, 100)
    assert (d["weight_decay"], d["grad_clip"], d["p_final"], d["p_ramp"], d["factor"]) == (1e-4, 0.1, 0.9, 1000, 0.1)
    assert d["groups"] == ((0, 1, 2, 3), (4, 5, 6, 7)) and d["crop_fraction"] == 0.875
    assert (tiny_dinomaly().resize_size, tiny_dinomaly().image_size) == ((448, 448), (392, 392))  # 448 -> 392 for patch 14
    d = {k: p.default for k, p in inspect.signature(MiniMaxAD).parameters.items()}
    assert (d["encoder"], d["loss"], d["p_hard"], d["p_lim"], d["epochs"], d["lr"], d["weight_decay"], d["gamma"]) == (
        "unireplknet_n", "fr", 0.9999, 0.9995, 160, 5e-3, 1e-5, 0.995)


def test_dinomaly_groups_and_loss_against_the_reference(path):
    from conftest import skip_unless_runs

    skip_unless_runs(path, "cpu")
    torch.manual_seed(0)
    m = tiny_dinomaly().eval()  # eval: no dropout, so the pieces can be recomputed
    x = torch.randn(3, 3, 56, 56)
    enc, dec = m.features(x)
    layers = m.encoder(x)
    z = m.bottleneck(torch.stack(layers).mean(0))
    outs = []
    for blk in m.decoder:
        z = blk(z)
        outs.append(z)

    def grid(t):
        return t[:, 5:].transpose(1, 2).reshape(3, 48, 4, 4)

    # group 1: encoder layers 0, 1 vs the last two decoder blocks (reversed order)
    torch.testing.assert_close(enc[0], grid((layers[0] + layers[1]) / 2))
    torch.testing.assert_close(dec[0], grid((outs[3] + outs[2]) / 2))
    torch.testing.assert_close(dec[1], grid((outs[1] + outs[0]) / 2))
    assert [m.hard_mining_p(i) for i in (0, 2, 4, 100)] == [0.0, 0.45, 0.9, 0.9]
    loss = m.training_loss(x, 2)
    want = hard_mining_cosine_loss_reference([e.detach() for e in enc], [d.detach() for d in dec], 0.45, 0.1)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    # gradients of the decoder match the reference loss's
    params = list(m.trainable_parameters())
    g1 = torch.autograd.grad(loss, params)
    enc, dec = m.features(x)
    g2 = torch.autograd.grad(hard_mining_cosine_loss_reference(enc, dec, 0.45, 0.1), params)
    # oracle: the trainable part (bottleneck, decoder, loss) in float64 on the same encoder features;
    # the tolerance is twice the float32 reference's own error (conftest.assert_close_to_oracle)
    m64 = copy.deepcopy(m).double()
    layers64 = [t.double() for t in layers]
    z = m64.bottleneck(torch.stack(layers64).mean(0))
    outs64 = []
    for blk in m64.decoder:
        z = blk(z)
        outs64.append(z)
    enc64 = [grid((layers64[0] + layers64[1]) / 2), grid((layers64[2] + layers64[3]) / 2)]
    dec64 = [grid((outs64[3] + outs64[2]) / 2), grid((outs64[1] + outs64[0]) / 2)]
    g64 = torch.autograd.grad(hard_mining_cosine_loss_reference(enc64, dec64, 0.45, 0.1), list(m64.trainable_parameters()))
    for a, b, o in zip(g1, g2, g64):
        assert_close_to_oracle(a, o, b, what="decoder gradient")


@pytest.mark.parametrize("variant", ["fr", "fp"])
def test_minimaxad_losses_against_the_authors_formulas(path, variant):
    from conftest import skip_unless_runs

    skip_unless_runs(path, "cpu")
    torch.manual_seed(0)
    m = tiny_minimaxad(loss=variant)
    x = torch.randn(4, 3, 64, 64)
    loss = m.training_loss(x, 0)  # train-mode BatchNorm uses batch statistics: recomputing gives the same
    enc, dec = m.features(x)
    if variant == "fr":
        s = sum(F.interpolate((1 - F.cosine_similarity(a, b)).unsqueeze(1), size=64, mode="nearest") for a, b in zip(enc, dec))
        want = adc_loss_reference(s.squeeze(1))
    else:
        want = sum((1 - F.cosine_similarity(a.flatten(1), b.flatten(1))).mean() for a, b in zip(enc, dec))
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_inference_maps_and_scores_follow_the_spec(no_triton):
    torch.manual_seed(0)
    m = tiny_dinomaly(map_size=32).eval()
    x = torch.randn(2, 3, 56, 56)
    scores, maps = m(x)
    enc, dec = m.features(x)
    a = sum(F.interpolate((1 - F.cosine_similarity(e, d)).unsqueeze(1), size=56, mode="bilinear", align_corners=True)
            for e, d in zip(enc, dec)) / 2
    a = F.interpolate(a, size=32, mode="bilinear", align_corners=False).squeeze(1)
    a = gaussian_blur_small(a)
    # the contract: the smoothed map_size map is returned at the input size (bilinear)
    torch.testing.assert_close(maps, F.interpolate(a.unsqueeze(1), size=56, mode="bilinear", align_corners=False).squeeze(1))
    torch.testing.assert_close(scores, a.flatten(1).topk(int(32 * 32 * 0.01)).values.mean(1))
    mm = tiny_minimaxad().eval()
    s, mp = mm(torch.randn(2, 3, 64, 64))
    assert s.shape == (2,) and mp.shape == (2, 64, 64)


def _params(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("factory", [tiny_dinomaly, tiny_minimaxad], ids=["dinomaly", "minimaxad"])
def test_checkpoint_resume_is_exact(tmp_path, no_triton, factory):
    size = 56 if factory is tiny_dinomaly else 64
    data = SyntheticDataset("train", 10, size)  # 2 batches of 4 per epoch: resume crosses an epoch
    torch.manual_seed(1)
    straight = factory().fit(data, progress=False)
    torch.manual_seed(1)
    first = factory().fit(data, iterations=3, checkpoint=str(tmp_path / "c.safetensors"), progress=False)
    torch.manual_seed(123)  # a different RNG state and init: the checkpoint must restore both
    resumed = factory()
    resumed.load_checkpoint(tmp_path / "c.safetensors")
    assert resumed.iteration == 3 and resumed.loss_history == first.loss_history
    resumed.fit(data, progress=False)
    assert resumed.loss_history == straight.loss_history
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert straight.loss_history[-1] < straight.loss_history[0]
    # the registry rebuilds it from the file alone
    again = load_checkpoint(tmp_path / "c.safetensors")
    assert type(again) is type(first) and again.iteration == 3


def test_checkpoint_errors(tmp_path, no_triton):
    from safetensors.torch import save_file

    m = tiny_minimaxad()
    m.save(tmp_path / "m.safetensors")  # before training: model only
    with pytest.raises(ValueError, match="MiniMaxAD checkpoint"):
        tiny_dinomaly().load_checkpoint(tmp_path / "m.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a fastad checkpoint"):
        m.load_checkpoint(tmp_path / "other.safetensors")


def test_bad_input_and_settings(no_triton):
    with pytest.raises(ValueError, match="partition"):
        tiny_dinomaly(groups=((0, 1), (1, 2)))
    with pytest.raises(ValueError, match="'fr'"):
        tiny_minimaxad(loss="l2")
    with pytest.raises(ValueError, match="encoder must be"):
        MiniMaxAD(encoder="resnet18")
    with pytest.raises(ValueError, match="multiple of the patch"):
        tiny_dinomaly()(torch.randn(1, 3, 50, 50))
    with pytest.raises(ValueError, match="no training images"):
        tiny_minimaxad().fit([], iterations=1, progress=False)
    m = tiny_minimaxad()
    x = torch.randn(4, 3, 64, 64)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises((FloatingPointError, ValueError), match="nan|NaN|finite"):
        m.fit([x], iterations=1, progress=False)
    with pytest.raises(ValueError, match="iterations"):
        MiniMaxAD(encoder="efficientnet_lite0").fit(iter([x]), progress=False)


def test_registry_and_engine_on_synthetic_data(no_triton):
    from fastad.engine import evaluate

    assert type(create_model("minimaxad", encoder="efficientnet_lite0")).__name__ == "MiniMaxAD"
    res = evaluate("minimaxad", SyntheticDataset("train", 8, 64), SyntheticDataset("test", 8, 64),
                   encoder="efficientnet_lite0", iterations=3, train_batch_size=4)
    assert res["model_obj"].iteration == 3 and 0 <= res["image_auroc"] <= 1


@pytest.mark.data
def test_cli_runs_dinomaly_and_minimaxad_on_bottle(tmp_path):
    root = shared("mvtec")
    env_code = "import sys; from fastad.ops import dispatch; dispatch.settings['triton'] = False; from fastad.cli import main; sys.exit(main(sys.argv[1:]))"
    runs = {
        "minimaxad": ["--set", "encoder=efficientnet_lite0", "--set", "iterations=2", "--set", "train_batch_size=4"],
        "dinomaly": ["--set", "weights=random", "--set", 'encoder_layers=[0,1,2,3]', "--set", "groups=[[0,1],[2,3]]",
                     "--set", "decoder_depth=4", "--set", f"encoder_kwargs={json.dumps(TINY_VIT)}", "--set", "iterations=2",
                     "--set", "warmup_iters=1", "--set", "train_batch_size=4"],
    }
    for model, extra in runs.items():
        out = tmp_path / model
        cmd = [sys.executable, "-c", env_code, "run", "--model", model, "--data", f"mvtec:{root}", "--classes", "bottle",
               "--out", str(out), "--overlays", "1", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        res = json.loads((out / "results.json").read_text())[0]
        assert res["model"] == model and res["n_test"] == 83 and 0 <= res["pixel_auroc"] <= 1
        assert list((out / "overlays").glob("*.png"))
