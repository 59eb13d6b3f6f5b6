"""Paper-comparable runs (issue 17): recipes chosen by the CLI, MiniMaxAD's official init, FOD's
torch 1.13 optimiser semantics, the authors' checkpoint layouts, FeatureNorm† aligned references and
test-set checkpoint selection."""
import inspect
import json
import math

import pytest
import torch
from torch import nn

from conftest import TINY_DINOMALY, write_defect_images
from fastad import cli, runs
from fastad.data import ImageTransform, WithReferences, mvtec
from fastad.models import MODELS, create_model
from fastad.ops import dispatch
from fastad.recipes import RECIPES, recipe_for



@pytest.fixture(autouse=True)
def _torch_paths(monkeypatch):
    monkeypatch.setitem(dispatch.settings, "triton", False)  # the Triton kernels are tested on their own


# -- recipes --------------------------------------------------------------------------------------------------
class Built(Exception):
    """Raised by the patched model builder: the CLI got as far as building the model."""


def _cli_model_args(monkeypatch, argv, command="run"):
    """The keyword arguments ``fastad <command> argv`` builds its model with."""
    seen = {}

    def build(name, kwargs):
        seen.update(kwargs)
        raise Built

    monkeypatch.setattr(runs, "_build", build)
    with pytest.raises(Built):
        cli.main([command, "--debug", *argv])
    return seen


@pytest.mark.parametrize("row", RECIPES, ids=lambda r: f"{r['model']}-{'+'.join(r['data'])}-{r['setting']}")
def test_every_recipe_row_is_what_the_cli_builds(monkeypatch, row):
    params = inspect.signature(MODELS[row["model"]].__init__).parameters
    assert set(row["args"]) <= set(params), "a recipe argument the model does not take"
    runs._check_types(row["model"], row["args"])  # values of the arguments' types
    for kind in row["data"]:
        assert recipe_for(row["model"], kind, row["setting"]) is row
        if row["setting"] == "pretrain":  # fastad pretrain's rows
            got = _cli_model_args(monkeypatch, ["--data", f"{kind}:/data/{kind}", "--out", "/tmp/never.safetensors"],
                                  command="pretrain")
        else:
            got = _cli_model_args(monkeypatch, ["--model", row["model"], "--data", f"{kind}:/data/{kind}",
                                                "--setting", row["setting"]])
        assert got == row["args"]


def test_set_wins_over_the_recipe_and_no_recipe_runs_defaults(monkeypatch):
    base = ["--model", "dinomaly", "--data", "mvtec:/data/mvtec", "--setting", "separate"]
    assert _cli_model_args(monkeypatch, base) == {"iterations": 5000, "optimizer_eps": 1e-8}
    assert _cli_model_args(monkeypatch, [*base, "--set", "iterations=20"]) == {"iterations": 20, "optimizer_eps": 1e-8}
    assert _cli_model_args(monkeypatch, [*base, "--no-recipe"]) == {}
    unified = _cli_model_args(monkeypatch, ["--model", "dinomaly", "--data", "realiad:/r", "--setting", "unified"])
    assert unified == {"iterations": 50000, "optimizer_eps": 1e-10, "dropout": 0.4}
    assert recipe_for("dinomaly", "mtd", "separate") is None


def test_dinomaly_optimizer_eps_reaches_the_optimizer():
    torch.manual_seed(0)
    m = create_model("dinomaly", **TINY_DINOMALY, optimizer_eps=1e-8)
    opt, _ = m.make_optimizer()
    assert opt.param_groups[0]["eps"] == 1e-8
    assert create_model("dinomaly", **TINY_DINOMALY).make_optimizer()[0].param_groups[0]["eps"] == 1e-10


def test_results_state_recipe_protocol_and_selection(tmp_path):
    out = tmp_path / "o"
    assert cli.main(["run", "--out", str(out), "--overlays", "0", "--protocol", "official", "--set", "image_size=64",
                     "--set", "crop_fraction=1.0"]) == 0
    text = (out / "results.md").read_text()
    assert "- protocol: official" in text and "== 255" in text and "patchcore-inspection" in text
    assert "- recipe: none for this model" in text and "the last iteration" in text
    row = json.loads((out / "results.json").read_text())[0]
    assert row["protocol"].startswith("official") and row["selection"] == "last" and row["set_args"]["image_size"] == 64
    assert cli.main(["run", "--model", "padim", "--protocol", "official"]) == 2  # no authors' code: a clear error


def test_select_on_test_is_labelled_and_picks_the_best(tmp_path, monkeypatch):
    out = tmp_path / "o"
    argv = ["run", "--model", "fod", "--set", "weights=random", "--set", "image_size=64", "--set", "depth=1",
            "--set", "iterations=4", "--set", "train_batch_size=2", "--select-on-test", "2", "--out", str(out), "--overlays", "0"]
    seen = []
    real = runs._select_on_test.__globals__["_fmt"]
    monkeypatch.setattr(runs, "_fmt", lambda v: seen.append(v) or real(v))
    assert cli.main(argv) == 0
    row = json.loads((out / "results.json").read_text())[0]
    assert row["selection"].startswith("TEST-SET SELECTION")
    aurocs = seen[:2]  # the two evaluations, in order
    assert math.isclose(row["image_auroc"], max(aurocs), abs_tol=0)
    assert f"iteration {2 if aurocs[0] >= aurocs[1] else 4} of 4" in row["selection"]
    assert "**TEST-SET SELECTION**" in (out / "results.md").read_text()
    with pytest.raises(SystemExit):
        cli.main(["run", "--select-on-test"])
    assert cli.main(["run", "--select-on-test", "2"]) == 2  # PatchCore is not trained: a one-line error


# -- MiniMaxAD's official init --------------------------------------------------------------------------------
def test_minimaxad_official_init_distribution():
    torch.manual_seed(0)
    m = create_model("minimaxad", weights="random")
    convs = [(n, mod) for part in (m.bottleneck, m.decoder) for n, mod in part.named_modules() if isinstance(mod, nn.Conv2d)]
    assert len(convs) > 50  # depthwise, SE, dilated branches and the bottleneck's convs
    for name, conv in convs:
        w = conv.weight.detach().double()
        fan_out = w.shape[0] * w[0, 0].numel()
        want = math.sqrt(2.0 / fan_out)  # kaiming_normal(fan_out, relu)
        n = w.numel()
        if n >= 2000:  # the sample std of n normals: relative standard error 1 / sqrt(2n); 6 of them
            assert abs(w.std().item() / want - 1) < 6 / math.sqrt(2 * n), name
    for part in (m.bottleneck, m.decoder):
        for name, mod in part.named_modules():
            if isinstance(mod, (nn.Linear, nn.ConvTranspose2d)):  # PyTorch's default: uniform, bound 1/sqrt(fan_in)
                fan_in = nn.init._calculate_fan_in_and_fan_out(mod.weight)[0]
                assert mod.weight.abs().max().item() <= 1 / math.sqrt(fan_in) + 1e-7, name
                assert mod.weight.abs().max().item() > 0.9 / math.sqrt(fan_in), name  # not truncated normal 0.02
            if isinstance(mod, nn.BatchNorm2d):
                assert bool((mod.weight == 1).all()) and bool((mod.bias == 0).all())
    old = create_model("minimaxad", weights="random", init="trunc_normal")
    w = old.decoder.stages[0][0].pwconv1[1].weight
    assert abs(w.std().item() / 0.02 - 1) < 6 / math.sqrt(2 * w.numel())  # trunc_normal(std 0.02), cut at +-2 (100 std)
    with pytest.raises(ValueError, match="init must be"):
        create_model("minimaxad", weights="random", init="xavier")


# -- FOD under torch 1.13 -------------------------------------------------------------------------------------
def _fod(semantics):
    torch.manual_seed(0)
    return create_model("fod", weights="random", image_size=64, depth=1, train_batch_size=2, adam_semantics=semantics)


def _images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("iterations,steps13", [(1, (2, 1)), (2, (4, 3))])
def test_fod_torch113_steps(iterations, steps13):
    """Under torch 1.13 the one Adam is stepped once per level with zero-filled gradients: level 0's
    parameters also take a momentum-only step when level 1 steps (from the first iteration on), level
    1's when level 0 steps (from the second on, once they have a gradient tensor)."""
    steps = {}
    for semantics in ("torch2", "torch1.13"):
        model = _fod(semantics)
        model.fit(_images(), iterations=iterations)
        steps[semantics] = tuple(int(model.optimizer.state[next(level.parameters())]["step"]) for level in model.levels)
    assert steps["torch2"] == (iterations, iterations)
    assert steps["torch1.13"] == steps13


def test_fod_torch113_differs_only_where_torch113_does():
    """After one iteration level 1 took one real step in both semantics (equal weights); level 0 took a
    second, momentum-only step under torch 1.13 (different weights)."""
    a, b = _fod("torch2"), _fod("torch1.13")
    a.fit(_images(), iterations=1)
    b.fit(_images(), iterations=1)
    for p, q in zip(a.levels[1].parameters(), b.levels[1].parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert any(not torch.equal(p, q) for p, q in zip(a.levels[0].parameters(), b.levels[0].parameters()))
    with pytest.raises(ValueError, match="adam_semantics"):
        _fod("torch1.12")


# -- the authors' checkpoint layouts --------------------------------------------------------------------------
def _theirs_from(model_state: dict, pairs: list[tuple[str, str]]) -> dict:
    """An authors'-layout state dict: each (their key, our key) pair takes a fresh random tensor of our key's shape."""
    g = torch.Generator().manual_seed(3)
    return {theirs: torch.randn(model_state[ours].shape, generator=g).to(model_state[ours].dtype) for theirs, ours in pairs}


def test_minimaxad_authors_checkpoint(tmp_path):
    """{'bn': BN_layer.state_dict(), 'decoder': de_unireplknet.state_dict()}, their module names."""
    torch.manual_seed(0)
    m = create_model("minimaxad", weights="random")
    ours = {k: v for k, v in m.state_dict().items() if k.startswith(("bottleneck.", "decoder."))}
    theirs_bn = {"level0.0": "conv1", "level0.1": "bn1", "level0.3": "conv2", "level0.4": "bn2", "level1.0": "conv3",
                 "level1.1": "bn3", "fuse": "conv4", "blocks": "stages.3"}

    def rename(k):
        part, rest = k.split(".", 1)
        if part == "bottleneck":
            for a, b in theirs_bn.items():
                if rest.startswith(a + "."):
                    return "bn." + b + rest[len(a):]
        if rest.startswith("ups."):
            return "decoder.upsample_layers." + rest[4:]
        i, tail = rest[len("stages."):].split(".", 1)  # the authors index the decoder stages 2, 1, 0 in run order
        return f"decoder.stages.{2 - int(i)}.{tail}"

    pairs = [(rename(k), k) for k in ours]
    theirs = _theirs_from(ours, pairs)
    split = {p: {k[len(p) + 1:]: v for k, v in theirs.items() if k.startswith(p + ".")} for p in ("bn", "decoder")}
    path = tmp_path / "MVTecAD_fr.pth"
    torch.save(split, path)
    loaded = create_model("minimaxad", weights="random", authors_checkpoint=str(path))
    state = loaded.state_dict()
    for t, o in pairs:
        assert torch.equal(state[o], theirs[t]), (t, o)
    assert torch.equal(state["bottleneck.fuse.weight"], split["bn"]["conv4.weight"])
    assert torch.equal(state["decoder.stages.0.0.gamma"], split["decoder"]["stages.2.0.gamma"])
    before = [p.clone() for p in loaded.trainable_parameters()]
    loaded.fit(torch.randn(2, 3, 64, 64), iterations=2)  # the authors' trained weights are used as they are
    assert all(torch.equal(a, b) for a, b in zip(before, loaded.trainable_parameters()))
    # a key of another layout, a missing key, a truncated file: refused with the keys named
    bad = {"bn": {**split["bn"], "conv5.weight": torch.zeros(1)}, "decoder": split["decoder"]}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="unexpected keys .*conv5"):
        create_model("minimaxad", weights="random", authors_checkpoint=str(tmp_path / "bad.pth"))
    torch.save({"bn": split["bn"], "decoder": {k: v for k, v in split["decoder"].items() if "stages.0.1" not in k}},
               tmp_path / "short.pth")
    with pytest.raises(ValueError, match="missing keys"):
        create_model("minimaxad", weights="random", authors_checkpoint=str(tmp_path / "short.pth"))
    (tmp_path / "cut.pth").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        create_model("minimaxad", weights="random", authors_checkpoint=str(tmp_path / "cut.pth"))


def test_dinomaly_authors_checkpoint(tmp_path):
    """ViTill.state_dict(): encoder.*, bottleneck.0.{fc1,fc2}, decoder.<i>.{..., mlp.fc1, mlp.fc2}."""
    torch.manual_seed(0)
    m = create_model("dinomaly", **TINY_DINOMALY)
    ours = {k: v for k, v in m.state_dict().items() if k.startswith(("bottleneck.", "decoder."))}

    def rename(k):
        if k.startswith("bottleneck."):
            return "bottleneck.0." + k[len("bottleneck."):]
        return k.replace(".mlp.0.", ".mlp.fc1.").replace(".mlp.2.", ".mlp.fc2.")

    pairs = [(rename(k), k) for k in ours]
    theirs = _theirs_from(ours, pairs)
    theirs["encoder.blocks.0.norm1.weight"] = torch.ones(768)  # the authors' encoder: skipped
    torch.save(theirs, tmp_path / "model.pth")
    loaded = create_model("dinomaly", **TINY_DINOMALY, authors_checkpoint=str(tmp_path / "model.pth"))
    state = loaded.state_dict()
    for t, o in pairs:
        assert torch.equal(state[o], theirs[t]), (t, o)
    assert torch.equal(state["decoder.3.mlp.2.weight"], theirs["decoder.3.mlp.fc2.weight"])


def test_adpretrain_authors_projectors(tmp_path):
    """torch.save({'projectors': MultiScaleAttentionProjector.state_dict()}) loads into FeatureNorm."""
    torch.manual_seed(0)
    fn = create_model("featurenorm", weights="random", image_size=64, num_references=16)
    ours = {k: v for k, v in fn.state_dict().items() if k.startswith("projectors.")}
    names = {"reference": "x_ref", "embed_reference": "ref_proj.project", "layers.0.attention": "layers.0.cross_attn",
             "layers.0.se": "layers.0.mlp.se", "layers.0.fc1": "layers.0.mlp.fc1", "layers.0.fc2": "layers.0.mlp.fc2"}

    def rename(k):
        _, i, rest = k.split(".", 2)
        for a, b in names.items():
            if rest == a or rest.startswith(a + "."):
                return f"l{int(i) + 1}_proj.{b}{rest[len(a):]}"
        raise AssertionError(k)

    pairs = [(rename(k), k) for k in ours]
    theirs = _theirs_from(ours, pairs)
    assert "l1_proj.layers.0.cross_attn.in_proj_weight" in theirs and "l4_proj.layers.0.mlp.se.fc2.bias" in theirs
    torch.save({"projectors": theirs, "epoch": 9}, tmp_path / "checkpoints_pro_norm.pth")
    loaded = create_model("featurenorm", weights="random", image_size=64, num_references=16,
                          pretrained=str(tmp_path / "checkpoints_pro_norm.pth"))
    state = loaded.state_dict()
    for t, o in pairs:
        assert torch.equal(state[o], theirs[t]), (t, o)
    torch.save({"model": theirs}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no 'projectors' entry"):
        create_model("featurenorm", weights="random", image_size=64, num_references=16, pretrained=str(tmp_path / "other.pth"))


# -- FeatureNorm† aligned references --------------------------------------------------------------------------
def test_aligned_references_score_each_image_against_its_own_list(tmp_path):
    base = tmp_path / "mvtec" / "cls"
    write_defect_images(base / "train" / "good", base / "test" / "good", base / "test" / "crack",
                        base / "ground_truth" / "crack", n_train=3, n_test=3, mask_suffix="_mask")
    t = ImageTransform(64, 64)
    test = mvtec(tmp_path / "mvtec", "cls", "test", t)
    # the authors' JSON names paths of their machine; matched by class/split/defect/name
    listing = {f"/data/yxc/mvtec_anomaly_detection/cls/test/{s.path.split('/')[-2]}/{s.path.split('/')[-1]}":
               [f"/data/yxc/mvtec_anomaly_detection/cls/train/good/{(j + i) % 3:03d}.png" for j in range(2)]
               for i, s in enumerate(test.samples)}
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "cls.json").write_text(json.dumps(listing))
    torch.manual_seed(0)
    fn = create_model("featurenorm", weights="random", image_size=64, num_references=16, project=False,
                      aligned_references=str(tmp_path / "refs"))
    with pytest.warns(UserWarning, match="only 3 reference images"):
        fn.fit(mvtec(tmp_path / "mvtec", "cls", "train", t))
    ds = fn.prepare_test_set(test)
    assert isinstance(ds, WithReferences) and ds.labels.tolist() == test.labels.tolist()
    item = ds[4]
    assert item["references"].shape == (2, 3, 64, 64)
    scores, maps = fn(item["image"][None], references=item["references"][None])
    # the same as a FeatureNorm whose reference bank is those images
    fn.set_reference_images(item["references"])
    want_scores, want_maps = fn(item["image"][None])
    torch.testing.assert_close(scores, want_scores, rtol=0, atol=0)
    torch.testing.assert_close(maps, want_maps, rtol=0, atol=0)
    from fastad.engine import score

    metrics, (s_all, *_) = score(fn, test, batch_size=2)  # the engine passes each batch's references
    assert s_all.shape == (6,) and torch.isfinite(s_all).all()
    # every test image must be listed, with existing references
    del listing[next(iter(listing))]
    (tmp_path / "refs" / "cls.json").write_text(json.dumps(listing))
    with pytest.raises(ValueError, match="lists no references for 1 of 6"):
        fn.prepare_test_set(test)
    with pytest.raises(ValueError, match="scorer='featurenorm'"):
        create_model("featurenorm", weights="random", scorer="padim", aligned_references="x.json")


# -- ADPretrain's pretraining details ---------------------------------------------------------------------------
def test_views_normalised_with_clip_statistics():
    from fastad.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from fastad.models.adpretrain import CLIP_MEAN, CLIP_STD, augment_view

    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)).clamp(-2, 2)
    a = augment_view(images, torch.Generator().manual_seed(5))
    b = augment_view(images, torch.Generator().manual_seed(5), "clip")
    rgb = a * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    want = (rgb - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    # the same [0, 1] view normalised twice in float32: a few ulp of values up to ~4
    torch.testing.assert_close(b, want, rtol=0, atol=16 * torch.finfo(torch.float32).eps * 4)


def test_references_of_the_same_view():
    from fastad.models.adpretrain import _normal_pool, reference_key

    rows = [(0, "toy", "/r/toy/OK/S1/toy_0001_OK_C1_2023.jpg"), (0, "toy", "/r/toy/OK/S1/toy_0001_OK_C2_2023.jpg"),
            (1, "toy", "/r/toy/NG/S2/toy_0002_NG_C1_2023.jpg"), (0, "toy", "/r/toy/OK/S3/toy_0003_OK_C1_2023.jpg"),
            (0, "cup", "/r/cup/good/001.png")]
    assert reference_key("toy", rows[2][2], True) == "toy/C1"
    assert reference_key("toy", rows[2][2], False) == "toy"
    assert reference_key("cup", rows[4][2], True) == "cup"  # no view in the name: the class
    pool = _normal_pool(rows, same_view=True)
    assert {k: [i for i, _ in v] for k, v in pool.items()} == {"toy/C1": [0, 3], "toy/C2": [1], "cup": [4]}
    assert sorted(_normal_pool(rows)) == ["cup", "toy"]
    with pytest.raises(ValueError, match="view_normalisation"):
        create_model("adpretrain", weights="random", view_normalisation="openai")
