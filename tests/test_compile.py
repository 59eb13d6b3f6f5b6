"""compile=True / --compile: each model's encoders and trainable networks through torch.compile,
the same results as eager within float32 rounding, config and checkpoints unchanged, and a network
that fails to compile running eager with one warning."""
import warnings

import pytest
import torch

from fastad.models import create_model
from fastad.models.base import _COMPILE_WARNED, _CompiledForward
from test_precision import CASES, _fit, _images


@pytest.fixture(autouse=True)
def _torch_paths(request, monkeypatch):
    # Dinomaly's tests (scoring, training, fallback) run its attention as the custom ops that wrap the
    # Triton kernels (interpreted here), so compiled graphs hold them, forward and backward, as on a
    # GPU; the other models take the ops' PyTorch paths (the interpreter would take minutes there)
    from fastad.ops import dispatch

    if "dinomaly" not in request.node.name and "training" not in request.node.name:
        monkeypatch.setitem(dispatch.settings, "triton", False)


def _pair(name, **kw):
    torch.manual_seed(0)
    eager = create_model(name, **CASES[name])
    x = _images(eager)
    _fit(eager, x)
    compiled = create_model(name, compile=True, **{**CASES[name], **kw})
    compiled.load_state_dict(eager.state_dict())
    return eager.eval(), compiled.eval(), x


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_scores_equal_eager_within_float32_rounding(name):
    eager, compiled, x = _pair(name)
    assert "compile" not in compiled.config and compiled.config == eager.config
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no network fell back to eager
        got = compiled(x)
    want = eager(x)
    # compiled kernels fuse and reorder float32 sums: the error of a reordered float32 reduction of
    # K terms over L layers is ~ eps32 sqrt(K L) of the values' scale (K <= 1e4, L <= 50: 8.4e-5)
    scale = 2.0 ** -23 * (1e4 * 50) ** 0.5
    for a, b in ((want.maps, got.maps), (want.scores, got.scores)):
        assert b.dtype == torch.float32
        assert float((a - b).abs().max()) <= scale * float(a.abs().max()) + 1e-30
    assert all(isinstance(m.__dict__.get("forward"), _CompiledForward)
               for n in compiled.autocast_modules
               for m in (getattr(compiled, n) if isinstance(getattr(compiled, n), torch.nn.ModuleList) else [getattr(compiled, n)]))


def test_a_network_that_fails_to_compile_runs_eager_with_one_warning_dinomaly(monkeypatch):
    eager, compiled, x = _pair("dinomaly")
    _COMPILE_WARNED.clear()

    def broken(*a, **k):
        raise RuntimeError("boom: cannot lower this op")

    for block in compiled.decoder:
        monkeypatch.setattr(block.forward, "compiled", broken)
    for name in ("encoder", "bottleneck"):
        getattr(compiled, name).forward.compiled = None  # eager, quickly
    with pytest.warns(RuntimeWarning, match=r"Dinomaly.decoder \(scoring\) could not be compiled \(RuntimeError: boom") as rec:
        got = compiled(x)
    assert sum("could not be compiled" in str(w.message) for w in rec) == 1  # one per network
    want = eager(x)
    assert torch.equal(got.maps, want.maps) and torch.equal(got.scores, want.scores)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        compiled(x)  # eager from then on, silently
    with pytest.raises(ValueError):  # the input's own errors are still raised
        compiled(torch.randn(1, 3, 57, 57))


def _trained(compile_mode, iterations, **kw):
    torch.manual_seed(0)
    model = create_model("dinomaly", compile=compile_mode, **{**CASES["dinomaly"], **kw})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no network fell back to eager
        return model.fit(_images(model), iterations=iterations, progress=False)


def test_compiled_training_steps_equal_eager_within_float32_rounding():
    """Training runs the compiled networks (forward and backward, dropout drawing eager's masks):
    the losses and the gradient norm of the first update agree with eager within the reordered-sum
    bound of the scoring test. (Dinomaly's warm-up learning rate is 0 at iteration 0, so its second
    loss is computed from the same weights too.)"""
    eager, compiled = _trained(False, 2), _trained(True, 2)
    bound = 2.0 ** -23 * (1e4 * 50) ** 0.5
    for a, b in zip([*eager.loss_history, eager.last_grad_norm], [*compiled.loss_history, compiled.last_grad_norm]):
        assert abs(a - b) <= bound * abs(a)
    for net in (compiled.bottleneck, *compiled.decoder):
        assert net.forward.training is not None  # compiled, not fallen back


def test_compiled_training_resumes_exactly(tmp_path):
    from fastad.models import load_checkpoint

    straight = _trained(True, 4)
    _trained(True, 2).save(tmp_path / "c.safetensors")
    resumed = load_checkpoint(tmp_path / "c.safetensors", compile=True)
    resumed.fit(_images(resumed), iterations=4, progress=False)
    assert resumed.loss_history == straight.loss_history
    for k, v in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


def test_compile_on_the_command_line_gives_the_eager_metrics(tmp_path):
    import json

    from fastad.cli import main
    from test_cache import _defect_folder

    root = _defect_folder(tmp_path / "d")
    base = ["run", "--data", f"folder:{root}", "--overlays", "0", "--set", "coreset_ratio=0.5"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--compile", "--out", str(tmp_path / "b")]) == 0
    rows = [json.loads((tmp_path / o / "results.json").read_text())[0] for o in "ab"]
    for k in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        assert abs(rows[0][k] - rows[1][k]) < 1e-6, k  # the maps agree to float32 rounding
