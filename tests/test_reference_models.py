"""RLR and FOD: shared token blocks, attention against nn.MultiheadAttention with the authors' dense
masks, FOD's prior / KL / entropy by hand, the two-phase gradient, training, scoring, checkpoints."""
import math

import pytest
import torch

from fastad.models import FOD, RLR, create_model, load_checkpoint
from fastad.models.components.tokens import reconstruction_loss, reconstruction_score, sincos_position_embedding
from fastad.models.fod import fod_phase_losses, gaussian_prior, prototype_memory, row_entropy, row_kl, symmetric_kl
from fastad.models.rlr import WindowAttention
from fastad.ops import window_mask


@pytest.fixture(autouse=True)
def no_triton(monkeypatch):
    """Model-level tests take the ops' PyTorch path (the kernels are tested against it elsewhere)."""
    from fastad.ops import dispatch

    monkeypatch.setitem(dispatch.settings, "triton", False)


def tiny_rlr(**kw):
    return RLR(**{**dict(weights="random", image_size=64, depth=2, iterations=3, train_batch_size=2), **kw})


def tiny_fod(**kw):
    return FOD(**{**dict(weights="random", image_size=64, depth=2, iterations=3, train_batch_size=2), **kw})


def test_sincos_embedding_by_hand():
    pe = sincos_position_embedding(8, (2, 3))
    # token (row 1, col 2) is index 5; half = 4, frequencies exp(-k ln(1e4) / 4) for k = 0, 2
    f = [1.0, math.exp(-2 * math.log(1e4) / 4)]
    want = [math.sin(2 * f[0]), math.cos(2 * f[0]), math.sin(2 * f[1]), math.cos(2 * f[1]),
            math.sin(1 * f[0]), math.cos(1 * f[0]), math.sin(1 * f[1]), math.cos(1 * f[1])]
    torch.testing.assert_close(pe[5], torch.tensor(want))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embedding(6, (2, 2))


def test_reconstruction_loss_and_score_by_hand():
    out = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    target = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    # token 0: mse (1 + 1) / 2 = 1, cos 0; token 1: mse 1 / 2, cos 1
    torch.testing.assert_close(reconstruction_score(out, target), torch.tensor([[2.0, 0.5]]))
    torch.testing.assert_close(reconstruction_loss(out, target), torch.tensor(0.75 + 0.5))


@pytest.mark.parametrize("only", [True, False])
def test_window_attention_equals_multihead_attention_with_the_dense_mask(only):
    torch.manual_seed(0)
    dim, heads, grid, window = 16, 4, (5, 7), 3
    att = WindowAttention(dim, heads, only).double()
    mha = torch.nn.MultiheadAttention(dim, heads, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([att.q.weight, att.k.weight, att.v.weight]))
        mha.in_proj_bias.copy_(torch.cat([att.q.bias, att.k.bias, att.v.bias]))
        mha.out_proj.weight.copy_(att.out.weight)
        mha.out_proj.bias.copy_(att.out.bias)
    x = torch.randn(2, 35, dim, dtype=torch.double)
    ref = torch.randn(1, 35, dim, dtype=torch.double)
    inside = window_mask(grid, window)
    mask = torch.zeros(35, 35, dtype=torch.double).masked_fill(~inside if only else inside, float("-inf"))
    value = ref if only else x
    want = mha(x, ref.expand(2, -1, -1), value.expand(2, -1, -1), attn_mask=mask, need_weights=False)[0]
    torch.testing.assert_close(att(x, ref, value, grid, window), want)


def test_gaussian_prior_by_hand():
    sigma = torch.tensor([0.5, 2.0]).view(1, 1, 1, 2).expand(1, 1, 4, 2)
    t = gaussian_prior(sigma, (2, 2))
    # token 0 at (0, 0): tokens at (0,1), (1,0), (1,1): dy2/(2*.25), dx2/(2*4)
    raw = torch.tensor([1.0, math.exp(-1 / 8), math.exp(-2.0), math.exp(-2.0 - 1 / 8)])
    torch.testing.assert_close(t[0, 0, 0], raw / raw.sum())
    torch.testing.assert_close(t.sum(-1), torch.ones(1, 1, 4))


def test_kl_and_entropy_by_hand():
    p = torch.tensor([0.5, 0.5]).view(1, 1, 1, 2)
    q = torch.tensor([0.25, 0.75]).view(1, 1, 1, 2)
    e = 1e-4
    kl = 0.5 * (math.log(0.5 + e) - math.log(0.25 + e)) + 0.5 * (math.log(0.5 + e) - math.log(0.75 + e))
    torch.testing.assert_close(row_kl(p, q), torch.tensor([[kl]]))
    back = 0.25 * (math.log(0.25 + e) - math.log(0.5 + e)) + 0.75 * (math.log(0.75 + e) - math.log(0.5 + e))
    torch.testing.assert_close(symmetric_kl(p, q), torch.tensor(kl + back))
    torch.testing.assert_close(row_entropy(q), torch.tensor(-(0.25 * math.log(0.25 + e) + 0.75 * math.log(0.75 + e))))


def test_fod_two_phase_gradient_is_the_sum_of_the_phases():
    torch.manual_seed(0)
    model = tiny_fod()
    images = torch.randn(2, 3, 64, 64)
    model.build_references([images])
    model._ensure_optimizer()
    params = list(model.trainable_parameters())

    def grads(which):
        torch.manual_seed(1)
        l1, l2, _ = model.phase_losses(images)
        loss = l1 if which == 1 else l2
        return torch.autograd.grad(loss, params, allow_unused=True)

    g1, g2 = grads(1), grads(2)
    # the step itself: L1.backward(retain_graph=True), L2.backward(); capture grads before the update
    captured = {}
    model.optimizer.step = lambda: captured.update({id(p): p.grad.clone() for p in params if p.grad is not None})
    model.training_step(images, 0)
    n_checked = 0
    for p, a, b in zip(params, g1, g2):
        want = sum(g for g in (a, b) if g is not None)
        if isinstance(want, int):
            assert id(p) not in captured
            continue
        torch.testing.assert_close(captured[id(p)], want, rtol=1e-4, atol=1e-6)
        n_checked += 1
    assert n_checked > 10
    # the priors' sigma projections get correlation gradients from L1, the attention from L2
    sig = model.levels[0].layers[0].intra.sigma.weight
    q = model.levels[0].layers[0].intra.q.weight
    i_sig, i_q = [i for i, p in enumerate(params) if p is sig][0], [i for i, p in enumerate(params) if p is q][0]
    assert g1[i_sig].abs().sum() > 0 and g2[i_q].abs().sum() > 0


def test_fod_phase_losses_stop_gradients():
    s = torch.softmax(torch.randn(1, 2, 3, 3), -1).requires_grad_()
    t = torch.softmax(torch.randn(1, 2, 3, 3), -1).requires_grad_()
    rec = torch.tensor(0.0, requires_grad=True)
    l1, l2 = fod_phase_losses(rec, [{"Sg": s, "Tg": t}], 0.5, 0.5)
    g = torch.autograd.grad(l1, [s, t], allow_unused=True)
    assert g[0] is None and g[1] is not None  # L1 moves only the prior
    g = torch.autograd.grad(l2, [s, t], allow_unused=True)
    assert g[0] is not None and g[1] is None  # L2 moves only the attention


def test_prototype_memory_shapes_and_unit_norm():
    x = torch.randn(12, 5, 4)
    p = prototype_memory(x, 3, torch.Generator().manual_seed(0))
    assert p.shape == (5, 3, 4)
    torch.testing.assert_close(p.norm(dim=-1), torch.ones(5, 3))
    with pytest.raises(ValueError, match="at least 20"):
        prototype_memory(x, 20, torch.Generator())


@pytest.mark.parametrize("reference", ["mean", "nearest", "coreset", "prototype"])
def test_fod_trains_and_scores(reference):
    torch.manual_seed(0)
    x = torch.rand(4, 3, 64, 64)
    model = tiny_fod(reference=reference, prototypes=2, coreset_ratio=0.5).fit([x[:2], x[2:]])
    assert len(model.loss_history) == 3 and all(math.isfinite(v) for v in model.loss_history)
    scores, maps = model(x)
    assert scores.shape == (4,) and maps.shape == (4, 64, 64) and torch.isfinite(maps).all()
    assert (maps >= 0).all()


def test_fod_nearest_reference_never_matches_the_image_itself():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 64, 64)
    model = tiny_fod(reference="nearest")
    model.build_references([x])
    t = model.tokens(x)[0]
    ref = model.reference_tokens(0, t)
    assert ((ref - t).abs().amax(-1) > 0).all()


def test_rlr_trains_scores_and_resumes_exactly(tmp_path):
    from fastad.data import SyntheticDataset

    data = SyntheticDataset("train", 6, size=64)
    torch.manual_seed(0)
    straight = tiny_rlr(iterations=4).fit(data)
    torch.manual_seed(0)
    part = tiny_rlr(iterations=4)
    part.fit(data, 2, checkpoint=str(tmp_path / "c.safetensors"))
    resumed = load_checkpoint(tmp_path / "c.safetensors").fit(data)
    assert resumed.loss_history == straight.loss_history
    for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rlr_forward_and_bad_input():
    torch.manual_seed(0)
    model = tiny_rlr().fit([torch.rand(2, 3, 64, 64)])
    scores, maps = model(torch.rand(3, 3, 64, 64))
    assert scores.shape == (3,) and maps.shape == (3, 64, 64)
    with pytest.raises(ValueError, match="input size"):
        model(torch.rand(1, 3, 96, 96))
    with pytest.raises(ValueError, match="windows"):
        tiny_rlr(windows=[3])
    with pytest.raises(ValueError, match="reference"):
        tiny_fod(reference="codebook")


def test_registry_builds_rlr_and_fod():
    assert isinstance(create_model("rlr", weights="random", image_size=64, depth=1), RLR)
    assert isinstance(create_model("fod", weights="random", image_size=64, depth=1), FOD)


@pytest.mark.parametrize("name", ["rlr", "fod"])
def test_fastad_run_trains_rlr_and_fod(tmp_path, name):
    import json

    from fastad.cli import main

    args = ["run", "--model", name, "--out", str(tmp_path), "--overlays", "0"]
    for kv in ("weights=random", "depth=1", "iterations=2", "train_batch_size=4"):
        args += ["--set", kv]
    assert main(args) == 0
    row = json.loads((tmp_path / "results.json").read_text())[0]
    assert row["model"] == name and row["n_test"] == 32 and 0 <= row["image_auroc"] <= 1


@pytest.mark.parametrize("reference", ["mean", "nearest"])
def test_fod_checkpoint_holds_the_references_and_resumes_exactly(tmp_path, reference):
    from fastad.data import SyntheticDataset

    data = SyntheticDataset("train", 4, size=64)
    torch.manual_seed(0)
    straight = tiny_fod(reference=reference, iterations=3).fit(data)
    torch.manual_seed(0)
    tiny_fod(reference=reference, iterations=3).fit(data, 1, checkpoint=str(tmp_path / "f.safetensors"))
    resumed = load_checkpoint(tmp_path / "f.safetensors")
    assert resumed.reference_1.shape == straight.reference_1.shape  # data-dependent shape restored
    resumed.fit(data)
    assert resumed.loss_history == straight.loss_history
    for (k, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    x = torch.stack([data[i]["image"] for i in range(2)])
    torch.testing.assert_close(resumed(x)[1], straight(x)[1], rtol=0, atol=0)
