"""The measuring dispatcher (fastad.ops.dispatch.run): on the CPU with a fake timer (the CPU is made a
measured device type), and on CUDA the check that every implementation it may choose gives the op's
documented results."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastad.ops import (adc_loss, adc_loss_reference, dispatch, hard_mining_cosine_loss, hard_mining_cosine_loss_reference,
                        linear_attention, linear_attention_reference, local_window_attention,
                        local_window_attention_reference, nearest_reference, nearest_reference_reference,
                        neighbour_masked_attention, neighbour_masked_attention_reference, quantile, select_rank)
from fastad.ops import hard_mining, select

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not (dispatch.HAS_TRITON and (DEVICE == "cuda" or dispatch.TRITON_INTERPRET)),
                                  reason="needs Triton on CUDA or under TRITON_INTERPRET=1")


class FakeTimer:
    """Replaces dispatch._measure: runs the candidate once (so it must work) and answers its table."""

    def __init__(self, seconds):
        self.seconds, self.calls = dict(seconds), []

    def __call__(self, fn, device, name):
        fn()
        self.calls.append(name)
        if isinstance(self.seconds[name], Exception):
            raise self.seconds[name]
        return self.seconds[name]


@pytest.fixture
def tuner(tmp_path, monkeypatch):
    """Measuring on the CPU, with a fresh cache file and memory; returns a function installing a fake timer."""
    monkeypatch.setattr(dispatch, "AUTOTUNED_DEVICE_TYPES", {"cpu", "cuda"})
    monkeypatch.setenv("FASTAD_AUTOTUNE_CACHE", str(tmp_path / "autotune.json"))
    monkeypatch.setattr(dispatch, "_choices", {})
    monkeypatch.setattr(dispatch, "_loaded", [False])
    monkeypatch.setitem(dispatch.settings, "autotune", True)

    def install(**seconds):
        timer = FakeTimer(seconds)
        monkeypatch.setattr(dispatch, "_measure", timer)
        return timer

    return install


def _fresh_process(monkeypatch):
    """What a new process sees: nothing in memory, the file not read yet."""
    monkeypatch.setattr(dispatch, "_choices", {})
    monkeypatch.setattr(dispatch, "_loaded", [False])


def _x(n=3000, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


class Counter:
    def __init__(self, fn):
        self.fn, self.n = fn, 0

    def __call__(self, *a, **k):
        self.n += 1
        return self.fn(*a, **k)


def test_bucket():
    assert [dispatch.bucket(n) for n in (0, 1, 2, 3, 4, 5, 1000, 1024, 1025)] == [1, 1, 2, 4, 4, 8, 1024, 1024, 2048]


def test_forced_names_an_implementation():
    with pytest.raises(ValueError, match="implementation must be one of"):
        dispatch.forced("cuda")
    assert dispatch.current() is None
    with dispatch.forced("reference"):
        assert dispatch.current() == "reference"
        assert dispatch.implementation(_x(), triton=True) == "reference"
        with dispatch.forced(None):  # changes nothing
            assert dispatch.current() == "reference"
    assert dispatch.current() is None


def test_the_cpu_keeps_the_fixed_rule_without_reading_or_writing_a_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTAD_AUTOTUNE_CACHE", str(tmp_path / "autotune.json"))
    monkeypatch.setattr(dispatch, "_measure", lambda *a: pytest.fail("the CPU must not be measured"))
    monkeypatch.setattr(dispatch, "_choices", {})
    monkeypatch.setattr(dispatch, "_loaded", [False])
    monkeypatch.setitem(dispatch.settings, "autotune", True)
    x = _x().cpu()
    assert torch.equal(quantile(x, 0.9), torch.quantile(x, 0.9))
    assert not (tmp_path / "autotune.json").exists() and dispatch.choices() == {}


@needs_triton
def test_measuring_keeps_the_fastest_in_memory_and_in_the_file(tuner, tmp_path, monkeypatch):
    timer = tuner(triton=2e-3, reference=1e-3)
    radix = Counter(select._radix_select)
    monkeypatch.setattr(select, "_radix_select", radix)
    x = _x()
    value = quantile(x, 0.9)
    assert torch.equal(value.cpu(), torch.quantile(x.cpu(), 0.9))
    assert timer.calls == ["triton", "reference"]  # the fixed rule's first is measured first
    (key, entry), = dispatch.choices().items()
    assert key.startswith("quantile|") and "|fwd|" in key and entry["choice"] == "reference"
    assert entry["seconds"] == {"triton": 2e-3, "reference": 1e-3}
    on_disk = json.loads((tmp_path / "autotune.json").read_text())
    assert on_disk["format"] == "fastad-autotune" and on_disk["entries"] == dispatch.choices()
    runs = radix.n  # the triton candidate ran once while measured
    for _ in range(3):  # the choice is kept: no new measurement, and the reference is what runs
        assert torch.equal(quantile(x, 0.9).cpu(), value.cpu())
    assert timer.calls == ["triton", "reference"] and radix.n == runs
    # a new shape bucket is measured on its own
    quantile(_x(70000), 0.9)
    assert len(dispatch.choices()) == 2 and len(timer.calls) == 4
    runs = radix.n
    # a later process reads the file and measures nothing
    _fresh_process(monkeypatch)
    timer = tuner(triton=1e-3, reference=2e-3)
    quantile(_x(), 0.5)
    assert timer.calls == [] and radix.n == runs


@needs_triton
def test_the_chosen_kernel_is_what_runs(tuner, monkeypatch):
    tuner(triton=1e-3, reference=2e-3)
    radix = Counter(select._radix_select)
    monkeypatch.setattr(select, "_radix_select", radix)
    x = _x(5000)
    assert select_rank(x, 17).item() == torch.kthvalue(x.cpu(), 18).values.item()
    measured = radix.n
    assert measured >= 1
    select_rank(x, 17)
    assert radix.n == measured + 1  # the triton path again, not torch.kthvalue
    assert list(dispatch.choices().values())[0]["choice"] == "triton"


@needs_triton
def test_a_corrupt_or_foreign_cache_is_ignored_and_rewritten(tuner, tmp_path, monkeypatch):
    path = tmp_path / "autotune.json"
    path.write_text("{ not json")
    timer = tuner(triton=1e-3, reference=2e-3)
    with pytest.warns(RuntimeWarning, match="unreadable autotune cache"):
        quantile(_x(), 0.9)
    assert timer.calls == ["triton", "reference"]
    data = json.loads(path.read_text())
    assert [e["choice"] for e in data["entries"].values()] == ["triton"]
    # written by another fastad version: its timings are not trusted, the file is rewritten
    key = next(iter(data["entries"]))
    path.write_text(json.dumps({**data, "fastad": "0.0.1", "entries": {key: {"choice": "reference", "seconds": {}}}}))
    _fresh_process(monkeypatch)
    timer = tuner(triton=1e-3, reference=2e-3)
    quantile(_x(), 0.9)
    assert timer.calls == ["triton", "reference"]
    data = json.loads(path.read_text())
    assert data["fastad"] != "0.0.1" and data["entries"][key]["choice"] == "triton"
    # the same version measured with other kernel sources (an edited op file): not trusted either
    assert data["kernels"] == dispatch._kernels_digest()
    path.write_text(json.dumps({**data, "kernels": "0" * 16, "entries": {key: {"choice": "reference", "seconds": {}}}}))
    _fresh_process(monkeypatch)
    timer = tuner(triton=1e-3, reference=2e-3)
    quantile(_x(), 0.9)
    assert timer.calls == ["triton", "reference"]
    data = json.loads(path.read_text())
    assert data["entries"][key]["choice"] == "triton"
    # an entry naming no implementation is dropped, the rest kept
    path.write_text(json.dumps({**data, "entries": {**data["entries"], "x|cpu|float32|fwd": {"choice": "magic"}}}))
    _fresh_process(monkeypatch)
    timer = tuner(triton=1e-3, reference=2e-3)
    quantile(_x(), 0.9)
    assert timer.calls == [] and list(dispatch.choices()) == [key]


@needs_triton
def test_an_unwritable_cache_keeps_the_choices_in_memory(tuner, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FASTAD_AUTOTUNE_CACHE", str(blocker / "autotune.json"))  # its folder is a file
    monkeypatch.setattr(dispatch, "_warned", set())
    timer = tuner(triton=1e-3, reference=2e-3)
    with pytest.warns(RuntimeWarning, match="could not write the autotune cache"):
        quantile(_x(), 0.9)
    quantile(_x(), 0.9)
    assert timer.calls == ["triton", "reference"] and len(dispatch.choices()) == 1


@needs_triton
def test_switched_off_or_forced_there_is_no_measuring(tuner):
    timer = tuner(triton=2e-3, reference=1e-3)
    x = _x()
    with dispatch.kernels(autotune=False):
        quantile(x, 0.9)
    with dispatch.kernels(triton=True):  # forces the Triton kernels
        assert dispatch.implementation(x, triton=True) == "triton"
        quantile(x, 0.9)
    with dispatch.kernels(triton=False):  # forces the PyTorch path
        quantile(x, 0.9)
    assert timer.calls == [] and dispatch.choices() == {}
    with dispatch.kernels(triton=True, autotune=True):
        quantile(x, 0.9)
    assert timer.calls == ["triton", "reference"]
    # a measured choice whose kernels are switched off is not used
    with dispatch.kernels(triton=False):
        assert dispatch.run("quantile", x, lambda: dispatch.current(), triton=True) == "reference"


def test_fastad_autotune_0_turns_measuring_off():
    code = "from fastad.ops import dispatch; print(dispatch.settings['autotune'])"
    for value, expect in (("0", "False"), ("1", "True")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**__import__("os").environ, "FASTAD_AUTOTUNE": value})
        assert out.stdout.strip() == expect


def test_a_candidate_that_fails_is_not_chosen(tuner):
    t = _x()
    tuner(triton=1e-3, reference=2e-3)
    with pytest.raises(ValueError, match="bad input"):  # the op's own error surfaces from the fixed rule's first
        dispatch.run("op", t, lambda: (_ for _ in ()).throw(ValueError("bad input")), triton=True)
    if len(dispatch._runnable(t, False, True)) < 2:
        pytest.skip("needs Triton on CUDA or under TRITON_INTERPRET=1")
    timer = tuner(triton=2e-3, reference=RuntimeError("out of memory"))
    with pytest.warns(RuntimeWarning, match="reference implementation failed while being measured"):
        assert dispatch.run("op", t, dispatch.current, triton=True) == "triton"
    assert timer.calls == ["triton", "reference"] and dispatch.choices()[next(iter(dispatch.choices()))]["seconds"] == {"triton": 2e-3}


class Launches:
    """Counts the launches of a Triton kernel."""

    def __init__(self, kernel):
        self.kernel, self.n = kernel, 0

    def __getitem__(self, grid):
        self.n += 1
        return self.kernel[grid]


@needs_triton
def test_a_loss_is_measured_forward_and_backward_and_backpropagates_on_its_choice(tuner, monkeypatch):
    timer = tuner(triton=2e-3, reference=1e-3)
    tail, grad = Launches(hard_mining._square_tail_kernel), Launches(hard_mining._adc_backward_kernel)
    monkeypatch.setattr(hard_mining, "_square_tail_kernel", tail)
    monkeypatch.setattr(hard_mining, "_adc_backward_kernel", grad)
    maps = torch.rand(2, 40, 40, generator=torch.Generator().manual_seed(1)).to(DEVICE).requires_grad_()
    loss = adc_loss(maps, nonfinite="nan")
    assert timer.calls == ["triton", "reference"]
    assert tail.n == 1 and grad.n == 1  # the Triton candidate ran forward and backward once, while measured
    (key, entry), = dispatch.choices().items()  # the nested quantiles were not measured on their own
    assert key.startswith("adc_loss|") and "|fwd+bwd|" in key and entry["choice"] == "reference"
    assert maps.grad is None  # measuring backpropagates into nothing the user holds
    loss.backward()
    assert tail.n == 1 and grad.n == 1  # forward and backward on the chosen reference
    ref = maps.detach().clone().requires_grad_()
    expect = adc_loss_reference(ref)
    expect.backward()
    torch.testing.assert_close(loss, expect)
    torch.testing.assert_close(maps.grad, ref.grad)
    # without grad the forward alone is measured, under its own key
    with torch.no_grad():
        adc_loss(maps, nonfinite="nan")
    assert sorted(k.split("|")[3] for k in dispatch.choices()) == ["fwd", "fwd+bwd"]
    # a choice of the Triton kernels runs them forward and backward
    _fresh_process(monkeypatch)
    monkeypatch.setenv("FASTAD_AUTOTUNE_CACHE", str(dispatch.cache_path().with_name("other.json")))
    tuner(triton=1e-3, reference=2e-3)
    adc_loss(maps, nonfinite="nan").backward()
    assert tail.n == 4 and grad.n == 3  # the forward-only measurement, this one, then the run


# ----------------------------------------------------------------------------------------------------
# every implementation the dispatcher may pick gives the op's documented results (CUDA, or the CPU
# under the interpreter)


def _qkv(b, h, n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(DEVICE).requires_grad_() for _ in range(3)]


def _grads(out, inputs):
    return torch.autograd.grad(out, inputs, torch.ones_like(out))


CASES = ["quantile", "select_rank", "adc_loss", "hard_mining_cosine_loss", "linear_attention",
         "neighbour_masked_attention", "local_window_attention", "nearest_reference"]


@pytest.mark.parametrize("case", CASES)
def test_every_choice_gives_the_documented_results_on_cuda_or_the_interpreter(case):
    x = _x(20000, seed=3)
    names = {"nearest_reference": dispatch._runnable(x, True, True)}.get(case, dispatch._runnable(x, False, True))
    if len(names) < 2:
        pytest.skip(f"only {names} can run here")
    for name in names:
        with dispatch.forced(name):
            if case == "quantile":  # bit-identical to torch.quantile
                assert torch.equal(quantile(x, 0.9999).cpu(), torch.quantile(x.cpu(), 0.9999))
                rows = x.reshape(20, -1)
                assert torch.equal(quantile(rows, 0.3, dim=1).cpu(), torch.quantile(rows.cpu(), 0.3, dim=1))
            elif case == "select_rank":
                assert select_rank(x, 12345).item() == torch.kthvalue(x.cpu(), 12346).values.item()
            elif case == "adc_loss":
                maps = x.reshape(5, 40, 100).abs().requires_grad_()
                got = adc_loss(maps)
                ref = maps.detach().clone().requires_grad_()
                expect = adc_loss_reference(ref)
                torch.testing.assert_close(got, expect)
                torch.testing.assert_close(_grads(got, [maps])[0], _grads(expect, [ref])[0])
            elif case == "hard_mining_cosine_loss":
                g = torch.Generator().manual_seed(4)
                a = torch.randn(2, 24, 7, 9, generator=g).to(DEVICE)
                b = torch.randn(2, 24, 7, 9, generator=g).to(DEVICE).requires_grad_()
                got = hard_mining_cosine_loss(a, b, 0.9)
                ref_b = b.detach().clone().requires_grad_()
                expect = hard_mining_cosine_loss_reference(a, ref_b, 0.9)
                torch.testing.assert_close(got, expect)
                torch.testing.assert_close(_grads(got, [b])[0], _grads(expect, [ref_b])[0])
            elif case == "nearest_reference":
                g = torch.Generator().manual_seed(5)
                q, bank = torch.randn(50, 16, generator=g).to(DEVICE), torch.randn(70, 16, generator=g).to(DEVICE)
                for metric in ("l2", "cosine"):
                    v, i, r = nearest_reference(q, bank, metric=metric)
                    ev, ei, er = nearest_reference_reference(q, bank, metric=metric)
                    assert torch.equal(i, ei) and torch.equal(r, er)  # float64-exact scores: the same winners
                    torch.testing.assert_close(v, ev.to(v.dtype))
            else:  # attention: the dense reference within float32 accumulation
                op, ref_op = {"linear_attention": (linear_attention, linear_attention_reference),
                              "neighbour_masked_attention": (neighbour_masked_attention, neighbour_masked_attention_reference),
                              "local_window_attention": (local_window_attention, local_window_attention_reference)}[case]
                q, k, v = _qkv(1, 2, 35, 16)
                extra = () if case == "linear_attention" else ((5, 7), 3)
                got, expect = op(q, k, v, *extra), ref_op(q, k, v, *extra)
                torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)
                for a, e in zip(_grads(got, [q, k, v]), _grads(expect, [q, k, v])):
                    torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_measures_once_and_never_under_sync_debug(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTAD_AUTOTUNE_CACHE", str(tmp_path / "autotune.json"))
    monkeypatch.setattr(dispatch, "_choices", {})
    monkeypatch.setattr(dispatch, "_loaded", [False])
    monkeypatch.setitem(dispatch.settings, "autotune", True)
    x = torch.randn(1 << 20, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        quantile(x, 0.9, nonfinite="nan")  # no measuring (it would synchronise): the fixed rule
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert dispatch.choices() == {}
    expect = torch.quantile(x, 0.9)
    assert torch.equal(quantile(x, 0.9), expect)  # measured now, every candidate exact
    (entry,) = dispatch.choices().values()
    assert set(entry["seconds"]) == {"triton", "reference"} and all(s > 0 for s in entry["seconds"].values())
    assert (tmp_path / "autotune.json").exists()


def test_flex_is_measured_but_the_fixed_rule_takes_it_only_when_asked(tuner, monkeypatch):
    from torch.nn.attention.flex_attention import flex_attention

    from fastad.ops import grid_attention

    if not dispatch.HAS_FLEX:
        pytest.skip("this torch has no FlexAttention")
    # as on CUDA: FlexAttention runs (here eagerly, forward only: no gradients below)
    monkeypatch.setattr(dispatch, "_flex_runs", lambda t: dispatch.settings["flex"] is not False)
    monkeypatch.setattr(grid_attention, "_compiled_flex", lambda: flex_attention)
    x = _x().cpu()
    assert dispatch._runnable(x, False, True, flex=True)[-2:] == ["reference", "flex"]
    with dispatch.kernels(autotune=False):
        assert dispatch.implementation(x, flex=True) == "reference"  # FASTAD_AUTOTUNE=0: as before
    with dispatch.kernels(triton=False):
        assert dispatch.implementation(x, triton=True, flex=True) == "reference"  # "the PyTorch paths"
    with dispatch.kernels(triton=False, flex=True):
        assert dispatch.implementation(x, triton=True, flex=True) == "flex"
    with dispatch.kernels(flex=False):
        assert "flex" not in dispatch._runnable(x, False, True, flex=True)
    # measured: FlexAttention wins when it is the fastest, and gives the op's result
    timer = tuner(triton=3e-3, reference=2e-3, flex=1e-3)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 35, 16, generator=g) for _ in range(3))
    got = neighbour_masked_attention(q, k, v, (5, 7), 3)
    assert timer.calls[-1] == "flex" and list(dispatch.choices().values())[-1]["choice"] == "flex"
    torch.testing.assert_close(got, neighbour_masked_attention_reference(q, k, v, (5, 7), 3))


def test_fastad_flex_0_leaves_flexattention_out():
    code = "from fastad.ops import dispatch; print(dispatch.settings['flex'])"
    out = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env}).stdout.strip() for env in ({"FASTAD_FLEX": "0"}, {"FASTAD_FLEX": "1"})]
    assert out == ["False", "None"]


def test_an_interpreter_that_cannot_run_is_named(monkeypatch):
    # Triton <= 3.6's interpreter int()s 1-element arrays, which numpy >= 2.4 refuses: said in one
    # line (and the CPU takes the PyTorch paths) instead of an InterpreterError inside every kernel
    import numpy

    try:
        int(numpy.array([1]))
        refuses = False
    except TypeError:
        refuses = True
    monkeypatch.setattr(dispatch.triton, "__version__", "3.6.0")
    problem = dispatch._interpreter_problem()
    assert bool(problem) == refuses
    if refuses:
        assert problem == (f"Triton 3.6.0's interpreter (TRITON_INTERPRET=1) cannot run with numpy {numpy.__version__}: "
                           "install numpy<2.4 or Triton >= 3.7")
    monkeypatch.setattr(dispatch.triton, "__version__", "3.7.0")
    assert dispatch._interpreter_problem() == ""
