"""ADPretrain and FeatureNorm: losses by hand and against the authors' formulas, the projector against
a hand-written attention, residuals against a brute-force cosine search, labels, PaDiM† per level,
pretraining (skipped batches, exact resume, checkpoints), FeatureNorm's three scorers on loaded
pretrained projectors."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset

from fastad.data import SyntheticDataset
from fastad.models import ADPretrain, FeatureNorm, PaDiM, create_model, load_checkpoint
from fastad.models.adpretrain import angle_loss, augment_view, nearest_labels, norm_loss, patch_labels
from fastad.models.components.residual import FeatureProjector, feature_norm
from fastad.models.components.residual import heads_for as _heads
from fastad.ops import gaussian_blur


@pytest.fixture(autouse=True)
def no_triton(monkeypatch):
    from fastad.ops import dispatch

    monkeypatch.setitem(dispatch.settings, "triton", False)


def tiny(**kw):
    return ADPretrain(**{**dict(weights="random", num_references=16, iterations=4, train_batch_size=4), **kw})


def tiny_fn(**kw):
    return FeatureNorm(**{**dict(weights="random", num_references=16), **kw})


def labelled(size=64):
    """Normal training images plus a test split with anomalies (half of it), one class."""
    return ConcatDataset([SyntheticDataset("train", 6, size=size), SyntheticDataset("test", 8, size=size, seed=1)])


def softplus_exp(d):
    return math.log1p(math.exp(d)) * math.exp(d)  # -logsigmoid(-d) * exp(d)


def test_norm_loss_by_hand():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 1.0], [6.0, 8.0]], dtype=torch.float64, requires_grad=True)
    abnormal = torch.tensor([False, False, True, True])
    a = [math.sqrt(5 + 1) - 1, 0.0, math.sqrt(1 + 1) - 1, math.sqrt(10 + 1) - 1]  # sqrt(||x|| + 1) - 1
    torch.testing.assert_close(feature_norm(x.detach()), torch.tensor(a, dtype=torch.float64))
    r = min(0.9 * a[2], 0.4)
    want = softplus_exp(a[0] - r) + softplus_exp(0.99 * r - a[1]) + softplus_exp(r + 0.75 - a[2])
    loss = norm_loss(x, abnormal)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    # exp weights detached: d/dA of softplus(d) exp(d) is sigmoid(d) exp(d), not (sigmoid + softplus) exp
    loss.backward()
    d = a[0] - r
    dadx = x.detach()[0] / (2 * 5.0 * math.sqrt(5 + 1))
    torch.testing.assert_close(x.grad[0], dadx * (1 / (1 + math.exp(-d))) * math.exp(d))
    # no anomaly: radius 0.4; abnormal above the margin: no abnormal term
    y = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    want = softplus_exp(a[0] - 0.4) + softplus_exp(0.99 * 0.4)
    assert norm_loss(y, torch.tensor([False, False])).item() == pytest.approx(want, rel=1e-12)
    shell = torch.tensor([[1.398**2 - 1, 0.0]], dtype=torch.float64)  # A = 0.398, between r_min and r
    assert norm_loss(shell, torch.tensor([False])).item() == 0  # nothing to do


def authors_angle(f1, f2, masks, center, tau):
    """The loss as the authors' code writes it (exp, sums, -log of the ratio), float64."""
    f1, f2 = F.normalize(f1 - center, dim=-1), F.normalize(f2 - center, dim=-1)
    feats, m = torch.cat([f1, f2]), torch.cat([masks, masks])
    pos = torch.exp((f1 * f2).sum(-1) / tau).repeat(2)
    nor, ano = feats[~m], feats[m]
    part1 = -torch.log(pos[~m] / torch.exp(nor @ ano.t() / tau).sum(-1))
    part2 = -torch.log(pos[m] / torch.exp(ano @ nor.t() / tau).sum(-1))
    return torch.cat([part1, part2]).mean()


def test_angle_loss_by_hand_and_against_the_authors_formula():
    # two positions, 2-d: the normal anchors' only negatives are the abnormal features of both views
    f1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    f2 = torch.tensor([[1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    m = torch.tensor([False, True])
    tau = 0.5
    c45 = math.cos(math.pi / 4)
    # normal anchors: f1[0] (pos cos 45), f2[0] (pos cos 45); negatives: f1[1], f2[1] (both (0, 1))
    l_n1 = -(c45 / tau) + math.log(2 * math.exp(0 / tau))
    l_n2 = -(c45 / tau) + math.log(2 * math.exp(c45 / tau))
    # abnormal anchors f1[1], f2[1] (pos cos 0 = 1), negatives f1[0], f2[0]
    l_a = -(1 / tau) + math.log(math.exp(0 / tau) + math.exp(c45 / tau))
    want = (l_n1 + l_n2 + 2 * l_a) / 4
    assert angle_loss(f1, f2, m, None, tau).item() == pytest.approx(want, rel=1e-12)
    torch.manual_seed(0)
    a, b = torch.randn(50, 7, dtype=torch.float64), torch.randn(50, 7, dtype=torch.float64)
    m = torch.rand(50) < 0.2
    c = torch.randn(7, dtype=torch.float64)
    torch.testing.assert_close(angle_loss(a, b, m, c, 0.15), authors_angle(a, b, m, c, 0.15))
    a.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: angle_loss(x, b, m, c, 0.15), (a,))
    assert angle_loss(a, b, torch.zeros(50, dtype=torch.bool)).item() == 0  # no negatives: the code's 0
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        angle_loss(a, b[:3], m)


def test_labels():
    cells = torch.zeros(2, 2, 196)
    cells[0, 0, :32] = 1  # 32 of 196 pixels: not abnormal
    cells[0, 1, :33] = 1  # 33: abnormal
    cells[1, 1] = 1
    mask = cells.view(2, 2, 14, 14).permute(0, 2, 1, 3).reshape(1, 28, 28)
    assert patch_labels(mask, (2, 2)).tolist() == [[[False, True], [False, True]]]
    torch.testing.assert_close(nearest_labels(mask, (7, 7)), F.interpolate(mask[:, None], size=(7, 7), mode="nearest")[:, 0] > 0.5)


def test_projector_against_a_hand_written_attention():
    assert (_heads(24, 16), _heads(40, 16), _heads(1024, 16)) == (12, 10, 16)
    torch.manual_seed(0)
    proj = FeatureProjector(24, heads=16, references=10).double()
    x = torch.randn(2, 24, 3, 5, dtype=torch.float64)
    layer = proj.layers[0]
    assert layer.se.fc1.out_features == 8  # make_divisible(96 / 16 = 6, 8)
    ref = proj.embed_reference.weight[:, :, 0] @ proj.reference[0].t() + proj.embed_reference.bias[:, None]  # (C, N_r)
    t = x.flatten(2).transpose(1, 2)  # (B, L, C)
    w, bias = layer.attention.in_proj_weight, layer.attention.in_proj_bias
    q, k, v = t @ w[:24].t() + bias[:24], ref.t() @ w[24:48].t() + bias[24:48], ref.t() @ w[48:].t() + bias[48:]
    heads, dh = 12, 2
    q, k, v = q.view(2, 15, heads, dh).transpose(1, 2), k.view(10, heads, dh).transpose(0, 1), v.view(10, heads, dh).transpose(0, 1)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), -1) @ v
    a = layer.attention.out_proj(att.transpose(1, 2).reshape(2, 15, 24))
    x1 = t - a
    hidden = layer.fc1(x1)
    gate = torch.sigmoid(layer.se.fc2(torch.relu(layer.se.fc1(hidden.mean(1, keepdim=True)))))
    want = x1 + layer.fc2(F.gelu(hidden * gate))
    torch.testing.assert_close(proj(x), want.transpose(1, 2).reshape(2, 24, 3, 5))


def test_residuals_are_the_cosine_nearest_subtraction():
    torch.manual_seed(0)
    m = tiny()
    refs, x = torch.randn(3, 3, 64, 64), torch.randn(2, 3, 64, 64)
    banks = m.reference_banks(refs)
    for f, bank, r in zip(m.backbone(x), banks, m.residuals(x, banks)):
        t = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).double()
        sim = F.normalize(t, dim=1) @ F.normalize(bank.double(), dim=1).t()
        want = (t - bank.double()[sim.argmax(1)]).float()
        torch.testing.assert_close(r.permute(0, 2, 3, 1).reshape(-1, f.shape[1]), want, rtol=1e-5, atol=1e-5)


def test_augment_view_is_seeded_and_changes_the_image():
    x = torch.randn(2, 3, 32, 32)
    a = augment_view(x, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, augment_view(x, torch.Generator().manual_seed(5)))
    assert a.shape == x.shape and not torch.allclose(a, x)


def test_featurenorm_by_hand_without_projector():
    torch.manual_seed(0)
    m = tiny_fn(project=False)
    train, test = torch.randn(8, 3, 64, 64), torch.randn(3, 3, 64, 64)
    m.fit([train[:5], train[5:]])
    scores, maps = m(test)
    res = m.residuals(test, m.reference_banks(train))
    levels = [F.interpolate((torch.sqrt(r.norm(dim=1) + 1) - 1)[:, None], size=(64, 64), mode="bilinear", align_corners=True) for r in res]
    want = gaussian_blur(torch.cat(levels, 1).mean(1), 4.0)
    torch.testing.assert_close(maps, want)
    torch.testing.assert_close(scores, want.flatten(1).max(1).values)


def test_padim_per_level_is_one_full_gaussian_per_level():
    torch.manual_seed(0)
    m = PaDiM(weights="random", layers=(1, 2), per_level=True, sigma=0)
    x = torch.randn(6, 3, 64, 64)
    m.fit([x])
    assert len(m.gaussians) == 2 and m.channel_index.numel() == sum(m.backbone.channels)
    feats = m.backbone(x)
    q = torch.randn(2, 3, 64, 64)
    dist = []
    for g, f, fq in zip(m.gaussians, feats, m.backbone(q)):
        e = f[:, :, 3, 5].double().numpy()
        mu = e.mean(0)
        np.testing.assert_allclose(g.mean[3, 5].numpy(), mu, rtol=1e-4, atol=1e-5)
        cov = np.cov(e, rowvar=False) + 0.01 * np.eye(e.shape[1])
        d = fq[:, :, 3, 5].double().numpy() - mu
        want = np.sqrt(np.einsum("bi,ij,bj->b", d, np.linalg.inv(cov), d))
        np.testing.assert_allclose(g.distance(fq)[:, 3, 5].numpy(), want, rtol=2e-3)
        dist.append(F.interpolate(g.distance(fq)[:, None], size=(64, 64), mode="bilinear", align_corners=True))
    scores, maps = m(q)
    torch.testing.assert_close(maps, torch.cat(dist, 1).mean(1))


def test_pretraining_skips_normal_batches_and_resumes_exactly(tmp_path):
    data = labelled()
    torch.manual_seed(0)
    m = tiny()
    m.fit(data, 0)  # centres only
    normal = {"image": torch.randn(2, 3, 64, 64), "mask": torch.zeros(2, 64, 64), "label": torch.tensor([0, 0]),
              "class_name": ["synthetic"] * 2, "path": ["a", "b"]}
    m._ensure_optimizer()
    before = [p.clone() for p in m.projectors.parameters()]
    assert m.training_step(normal, 0) is None
    assert all(torch.equal(a, b) for a, b in zip(before, m.projectors.parameters()))
    with pytest.raises(ValueError, match="'mask'"):
        m.training_step(torch.randn(2, 3, 64, 64), 0)

    torch.manual_seed(0)
    straight = tiny(iterations=5).fit(data)
    assert 0 < len(straight.loss_history) <= 5 and all(math.isfinite(v) for v in straight.loss_history)
    assert any(c.abs().sum() > 0 for c in straight.centers())
    torch.manual_seed(0)
    tiny(iterations=5).fit(data, 2, checkpoint=str(tmp_path / "a.safetensors"))
    resumed = load_checkpoint(tmp_path / "a.safetensors")
    resumed.fit(data)
    assert resumed.loss_history == straight.loss_history
    for (k, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_centers_are_the_mean_normal_residual():
    data = labelled()
    m = tiny(center_shots=2)
    m.fit(data, 0)
    gen = torch.Generator().manual_seed(m.seed)
    normal = [i for i in range(len(data)) if data[i]["label"] == 0]
    pick = torch.randperm(len(normal), generator=gen)[:2].tolist()
    banks = m.reference_banks(torch.stack([data[normal[j]]["image"] for j in pick]))
    res = m.residuals(torch.stack([data[i]["image"] for i in normal]), banks)
    for c, r in zip(m.centers(), res):
        torch.testing.assert_close(c, r.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scorer", ["featurenorm", "patchcore", "padim"])
def test_pretrained_projectors_feed_every_scorer(tmp_path, scorer):
    torch.manual_seed(0)
    path = tmp_path / "adp.safetensors"
    trained = tiny(iterations=2).fit(labelled(), checkpoint=str(path))
    m = tiny_fn(pretrained=str(path), scorer=scorer)
    for a, b in zip(m.projectors.state_dict().values(), trained.projectors.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(m.center_0, trained.center_0)
    train = torch.stack([SyntheticDataset("train", 10, size=64)[i]["image"] for i in range(10)])
    m.fit([train[:4], train[4:]])
    assert m.banks()[0].shape[0] == 8 * 16 * 16  # 8 shots of the stride-4 level
    test = SyntheticDataset("test", 4, size=64, seed=2)
    scores, maps = m(torch.stack([test[i]["image"] for i in range(4)]))
    assert scores.shape == (4,) and maps.shape == (4, 64, 64) and torch.isfinite(maps).all()
    if scorer != "patchcore":  # PatchCore's image score is its largest patch distance
        torch.testing.assert_close(scores, maps.flatten(1).max(1).values)
    if scorer == "patchcore":
        assert m.scored_levels == [1, 2, 3]  # the last three of four levels
    with pytest.raises(ValueError, match="layers"):
        tiny_fn(pretrained=str(path), layers=(2, 3))


def test_bad_input():
    with pytest.raises(ValueError, match="scorer"):
        tiny_fn(scorer="knn")
    with pytest.raises(RuntimeError, match="reference images"):
        tiny_fn()(torch.randn(1, 3, 64, 64))
    with pytest.raises(RuntimeError, match="not fitted"):
        tiny_fn(scorer="padim")(torch.randn(1, 3, 64, 64))
    with pytest.raises(RuntimeError, match="not fitted"):
        tiny()(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="no images"):
        tiny_fn(project=False).fit([])
    with pytest.raises(ValueError, match="normal images"):
        tiny().fit(_only_anomalous())
    with pytest.warns(UserWarning, match="untrained"):
        tiny_fn().fit([torch.randn(8, 3, 64, 64)])
    with pytest.warns(UserWarning, match="no anomalous images"):
        tiny(iterations=1).fit(SyntheticDataset("train", 4, size=64))


def _only_anomalous():
    ds = SyntheticDataset("test", 8, size=64, seed=1)
    return torch.utils.data.Subset(ds, [i for i in range(len(ds)) if ds.labels_list[i] == 1])


def test_registry_and_cli(tmp_path):
    import json

    from fastad.cli import main

    assert isinstance(create_model("featurenorm", weights="random", project=False), FeatureNorm)
    assert isinstance(create_model("adpretrain", weights="random"), ADPretrain)
    assert main(["run", "--model", "featurenorm", "--set", "project=false", "--out", str(tmp_path), "--overlays", "0"]) == 0
    row = json.loads((tmp_path / "results.json").read_text())[0]
    assert row["image_auroc"] > 0.9  # the synthetic defects are far from the 8 references
    ckpt = tmp_path / "adp.safetensors"
    small = ["--set", "num_references=16", "--set", "train_batch_size=8"]
    assert main(["pretrain", "--out", str(ckpt), "--set", "iterations=2", *small]) == 0
    assert load_checkpoint(ckpt).iteration == 2
    assert main(["pretrain", "--out", str(ckpt), "--set", "iterations=3", *small]) == 0  # resumes
    assert load_checkpoint(ckpt).iteration == 3
    assert main(["run", "--model", "featurenorm", "--set", f"pretrained={ckpt}", "--set", "scorer=padim", "--set",
                 "num_references=16", "--out", str(tmp_path / "padim"), "--overlays", "0"]) == 0
    row = json.loads((tmp_path / "padim" / "results.json").read_text())[0]
    assert row["model"] == "featurenorm" and 0 <= row["image_auroc"] <= 1


def test_dinov2_levels_are_patch_grids_without_prefix_tokens():
    m = FeatureNorm(backbone="vit_small_patch14_dinov2", layers=(1, 3), weights="random", num_references=8, project=False)
    assert m.channels == [384, 384] and m.reductions == [14, 14]
    x = torch.randn(2, 3, 42, 56)
    tokens = m.backbone.encoder(x)
    maps = m.backbone(x)
    for t, f in zip(tokens, maps):
        assert f.shape == (2, 384, 3, 4)
        torch.testing.assert_close(f.flatten(2).transpose(1, 2), t[:, m.backbone.encoder.num_prefix :])
    m.fit([x])
    scores, out = m(x)
    assert out.shape == (2, 42, 56) and torch.allclose(scores, torch.zeros(2), atol=1e-3)  # its own references
