"""compile=True / --compile: each model's encoders and trainable networks through torch.compile,
the same results as eager within float32 rounding, config and checkpoints unchanged, and a network
that fails to compile running eager with one warning."""
import warnings

import pytest
import torch

from fastad.models import create_model
from fastad.models.base import _COMPILE_WARNED, _CompiledForward
from test_precision import CASES, _fit, _images


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


def test_a_network_that_fails_to_compile_runs_eager_with_one_warning(monkeypatch):
    eager, compiled, x = _pair("dinomaly")
    _COMPILE_WARNED.clear()

    def broken(*a, **k):
        raise RuntimeError("boom: cannot lower this op")

    for block in compiled.decoder:
        monkeypatch.setattr(block.forward, "compiled", broken)
    for name in ("encoder", "bottleneck"):
        getattr(compiled, name).forward.compiled = None  # eager, quickly
    with pytest.warns(RuntimeWarning, match=r"Dinomaly.decoder could not be compiled \(RuntimeError: boom") as rec:
        got = compiled(x)
    assert sum("could not be compiled" in str(w.message) for w in rec) == 1  # one per network
    want = eager(x)
    assert torch.equal(got.maps, want.maps) and torch.equal(got.scores, want.scores)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        compiled(x)  # eager from then on, silently
    with pytest.raises(ValueError):  # the input's own errors are still raised
        compiled(torch.randn(1, 3, 57, 57))


def test_training_with_compile_is_eager_and_bit_identical():
    runs = []
    for compile_mode in (False, True):
        torch.manual_seed(0)
        model = create_model("dinomaly", compile=compile_mode, **CASES["dinomaly"])
        _fit(model, _images(model))
        runs.append(model)
    assert runs[0].loss_history == runs[1].loss_history
    for (k, a), b in zip(runs[0].state_dict().items(), runs[1].state_dict().values()):
        assert torch.equal(a, b), k


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
