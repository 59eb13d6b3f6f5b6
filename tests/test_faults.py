"""Faults: a run killed at any moment (also inside a checkpoint write) resumes bit-identically;
damaged, foreign or newer checkpoints, NaN losses and gradients, unwritable or full disks and out
of memory give one clear error and leave what was saved untouched; the kNN search runs under a
memory cap with the scores of the uncapped search."""
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import conftest
from conftest import assert_close_to_oracle, cli_error
from fastad import create_model, load_checkpoint
from fastad.cli import main
from fastad.data import SyntheticDataset
from fastad.faults import atomic_write, memory_stage
from fastad.ops import FeatureBank, dispatch, feature_bank

ROOT = Path(__file__).resolve().parents[1]

# the child process of the kill tests: the CLI, with a fault injected by FASTAD_TEST_KILL=PHASE:N
#   step:N    SIGKILL right after the N-th optimizer update
#   write:N   the N-th checkpoint write gets half its bytes to disk, then SIGKILL
#   rename:N  SIGKILL after the N-th checkpoint's temporary file is complete, before the rename
CHILD = r'''
import os, signal, sys
import torch
torch.set_num_threads(1)
from fastad.ops import dispatch
dispatch.settings["triton"] = False
kill = os.environ.get("FASTAD_TEST_KILL")
if kill:
    phase, n = kill.split(":")
    n, count = int(n), [0]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if phase == "step":
        from fastad.models.training import TrainedModel
        update = TrainedModel.update
        def counted(self, *losses):
            taken = update(self, *losses)
            count[0] += 1
            if count[0] == n:
                die()
            return taken
        TrainedModel.update = counted
    else:
        import safetensors.torch as st
        save_file = st.save_file
        def counted_save(tensors, filename, metadata=None):
            count[0] += 1
            save_file(tensors, filename, metadata)
            if count[0] == n and phase == "write":
                data = open(filename, "rb").read()
                open(filename, "wb").write(data[: len(data) // 2])
                die()
            if count[0] == n and phase == "rename":
                die()
        st.save_file = counted_save
from fastad.cli import main
sys.exit(main(sys.argv[1:]))
'''
TINY_DINOMALY = dict(conftest.TINY_DINOMALY, train_batch_size=4, iterations=10, warmup_iters=1, map_size=28, p_ramp=2)


@pytest.fixture(autouse=True)
def _torch_paths(monkeypatch):
    monkeypatch.setitem(dispatch.settings, "triton", False)


def _run(tmp_path, ckpt, out, kill=None):
    args = ["run", "--model", "dinomaly", *(a for k, v in TINY_DINOMALY.items() for a in ("--set", f"{k}={json.dumps(v)}")),
            "--checkpoint-dir", str(ckpt), "--checkpoint-every", "2", "--overlays", "0", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("FASTAD_TEST_KILL", None)
    if kill:
        env["FASTAD_TEST_KILL"] = kill
    return subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(path)


def test_a_run_killed_anywhere_resumes_bit_identically(tmp_path):
    straight = _run(tmp_path, tmp_path / "ck_straight", tmp_path / "out_straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    ckpt = tmp_path / "ck" / "dinomaly-synthetic.safetensors"
    # killed after update 5 (between the checkpoints of iterations 4 and 6), then inside the write of
    # the resumed run's 2nd checkpoint (iteration 8: half a file on disk), then after its next
    # checkpoint file is complete but not renamed, then after the first rename of the next run
    kills = ["step:5", "write:2", "rename:1", "rename:2"]
    iterations = []
    for kill in kills:
        proc = _run(tmp_path, tmp_path / "ck", tmp_path / "out", kill)
        assert proc.returncode == -signal.SIGKILL, (kill, proc.returncode, proc.stderr[-3000:])
        iterations.append(load_checkpoint(ckpt).iteration)  # the last complete checkpoint always loads
    assert iterations == [4, 6, 6, 8], iterations
    resumed = _run(tmp_path, tmp_path / "ck", tmp_path / "out")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout and "at iteration 8" in resumed.stdout
    a, b = _tensors(tmp_path / "ck_straight" / "dinomaly-synthetic.safetensors"), _tensors(ckpt)
    assert sorted(a) == sorted(b) and any(k.startswith("optim.") for k in a)
    for key in a:  # weights, optimizer moments, loss history, RNG state: bit for bit
        assert torch.equal(a[key], b[key]), key
    r1, r2 = (json.loads((tmp_path / o / "results.json").read_text())[0] for o in ("out_straight", "out"))
    assert all(r1[k] == r2[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro"))
    # a finished checkpoint is used as it is, and other settings are refused rather than overwritten
    again = _run(tmp_path, tmp_path / "ck", tmp_path / "out")
    assert again.returncode == 0 and "at iteration 10" in again.stdout
    before = ckpt.read_bytes()
    args = ["run", "--model", "dinomaly", "--set", "weights=random", "--checkpoint-dir", str(tmp_path / "ck")]
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert proc.returncode == 2 and "holds a dinomaly model with other settings" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and ckpt.read_bytes() == before


def _tiny_trained(**kw):
    torch.manual_seed(0)
    return create_model("dinomaly", **{**TINY_DINOMALY, **kw})


def test_damaged_foreign_and_newer_checkpoints_are_clear_errors(tmp_path, capsys):
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    model = _tiny_trained()
    model.save(good)
    saved = good.read_bytes()
    cases = {
        "truncated.safetensors": (saved[: len(saved) // 3], "not a readable safetensors file"),
        "empty.safetensors": (b"", "not a readable safetensors file"),
        "magic.safetensors": (b"PK\x03\x04" + saved[4:], "not a readable safetensors file"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=rf"{name}.*{message}"):
            load_checkpoint(tmp_path / name)
    save_file({"x": torch.zeros(1)}, tmp_path / "foreign.safetensors", metadata={"producer": "other"})
    with pytest.raises(ValueError, match="foreign.safetensors is not a fastad checkpoint"):
        load_checkpoint(tmp_path / "foreign.safetensors")
    meta = {"format": "fastad-checkpoint-9", "fastad": "9.0", "model": "dinomaly", "config": {}}
    save_file({"x": torch.zeros(1)}, tmp_path / "newer.safetensors", metadata={"fastad": json.dumps(meta)})
    with pytest.raises(ValueError, match="newer.safetensors has checkpoint format 'fastad-checkpoint-9', written by fastad 9.0; "
                                         "this fastad reads fastad-checkpoint-1, fastad-checkpoint-2"):
        load_checkpoint(tmp_path / "newer.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "garbled.safetensors", metadata={"fastad": "{not json"})
    with pytest.raises(ValueError, match="garbled.safetensors has corrupt fastad metadata"):
        load_checkpoint(tmp_path / "garbled.safetensors")
    other = _tiny_trained(encoder_layers=[0, 1], decoder_depth=2, groups=[[0], [1]])  # same class, differently built
    with pytest.raises(ValueError, match="good.safetensors does not fit this Dinomaly"):
        other.load_checkpoint(good)
    # through the CLI: one line naming the file, exit 2; the file is left as it was
    (tmp_path / "adp.safetensors").write_bytes(saved[:100])
    msg = cli_error(capsys, ["pretrain", "--out", str(tmp_path / "adp.safetensors")])
    assert "adp.safetensors is not a readable safetensors file" in msg
    assert (tmp_path / "adp.safetensors").read_bytes() == saved[:100] and good.read_bytes() == saved


def _nan_after(model, iteration, where):
    """Make ``where`` ('loss' or 'grad') NaN from training iteration ``iteration`` on."""
    if where == "grad":  # a finite loss whose gradient is NaN
        p = next(iter(model.trainable_parameters()))
        p.register_hook(lambda g: g * float("nan") if model.iteration >= iteration else g)
        return model
    loss_fn = model.training_loss
    model.training_loss = lambda images, it: loss_fn(images, it) * (float("nan") if it >= iteration else 1.0)
    return model


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nan_stops_with_the_iteration_and_keeps_the_last_good_checkpoint(tmp_path, where):
    train = SyntheticDataset("train", 8, size=56)
    path = tmp_path / "c.safetensors"
    model = _nan_after(_tiny_trained(), 5, where)
    what = "the loss became nan" if where == "loss" else "the gradient norm became nan"
    with pytest.raises(FloatingPointError, match=rf"Dinomaly: {what} at iteration 5; the last good checkpoint .*c.safetensors "
                                                 r"\(iteration 4\) is kept; on_nan='skip'"):
        model.fit(train, checkpoint=str(path), checkpoint_every=2, progress=False)
    kept = path.read_bytes()
    assert load_checkpoint(path).iteration == 4
    # a model resumed from the kept file fails the same way and does not touch the file
    resumed = _nan_after(load_checkpoint(path), 5, where)
    with pytest.raises(FloatingPointError, match=f"{path} was not rewritten"):
        resumed.fit(train, checkpoint=str(path), checkpoint_every=2, progress=False)
    assert path.read_bytes() == kept
    # on_nan='skip': no update from the bad iterations, the run finishes and says which were skipped
    skipping = _nan_after(_tiny_trained(), 8, where)
    skipping.fit(train, progress=False, on_nan="skip")
    straight = _tiny_trained()
    straight.fit(train, iterations=8, progress=False)
    assert skipping.iteration == 10 and skipping.skipped_iterations == [8, 9]
    for (k, a), b in zip(skipping.state_dict().items(), straight.state_dict().values()):
        assert torch.equal(a, b), k  # the skipped updates changed nothing


def test_nan_on_the_command_line_is_one_line(tmp_path, capsys, monkeypatch):
    from fastad.models.training import TrainedModel

    update = TrainedModel.update

    def poisoned(self, *losses):
        return update(self, *(loss * float("inf") if self.iteration == 3 else loss for loss in losses))

    monkeypatch.setattr(TrainedModel, "update", poisoned)
    args = ["run", "--model", "dinomaly", *(a for k, v in TINY_DINOMALY.items() for a in ("--set", f"{k}={json.dumps(v)}")),
            "--overlays", "0", "--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "2"]
    msg = cli_error(capsys, args)
    assert "the loss became inf at iteration 3; the last good checkpoint" in msg and "(iteration 2) is kept" in msg
    assert main([*args, "--on-nan", "skip", "--out", str(tmp_path / "out")]) == 0


def test_atomic_write_keeps_the_previous_file_when_the_disk_fills(tmp_path, monkeypatch):
    target = tmp_path / "model.safetensors"
    model = create_model("patchcore", image_size=64, crop_fraction=1.0)
    model.save(target)
    before = target.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=r"cannot write .*model.safetensors: No space left on device; the previous file is unchanged") as err:
        model.save(target)
    assert err.value.errno == errno.ENOSPC
    assert target.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["model.safetensors"]  # no temporary left
    with pytest.raises(OSError, match=r"new.txt: No space left on device; nothing was written"):
        atomic_write(tmp_path / "new.txt", lambda tmp: Path(tmp).write_text("x"))
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


def test_unwritable_output_is_an_error_before_any_work(tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "results.json").write_text("[]")
    blocked = tmp_path / "file"  # a file where the folder should be: unwritable for every user, root included
    blocked.write_text("mine")
    msg = cli_error(capsys, ["run", "--out", str(blocked / "sub")])
    assert msg == f"fastad: error: --out {blocked / 'sub'} is not writable: Not a directory" and blocked.read_text() == "mine"
    out.chmod(0o555)
    try:
        if not os.access(out, os.W_OK):  # root ignores permission bits
            msg = cli_error(capsys, ["run", "--out", str(out)])
            assert msg == f"fastad: error: --out {out} is not writable: Permission denied"
            assert sorted(os.listdir(out)) == ["results.json"] and (out / "results.json").read_text() == "[]"
    finally:
        out.chmod(0o755)


def test_a_second_run_into_a_busy_out_is_one_line_and_touches_nothing(tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["run", "--out", str(out), "--no-cache", "--overlays", "0"]) == 0
    def results():  # every file but the lock itself
        return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".fastad.lock"}

    before = results()
    holder = subprocess.Popen([sys.executable, "-c", f"from fastad.faults import exclusive_folder\nimport sys, time\n"
                               f"with exclusive_folder({str(out)!r}, '--out'):\n    print('held', flush=True)\n"
                               f"    sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        msg = cli_error(capsys, ["run", "--out", str(out), "--no-cache", "--overlays", "0"])
        assert f"--out {out} is being written by another fastad run (pid {holder.pid} on " in msg and "another --out" in msg
        assert results() == before and sorted(before) == ["results.json", "results.md"]  # nothing touched
    finally:
        holder.kill()  # a killed holder leaves no stale lock
        holder.wait()
    assert main(["run", "--out", str(out), "--no-cache", "--overlays", "0"]) == 0


def test_out_of_memory_names_the_stage_and_the_knob(monkeypatch, capsys):
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"out of memory in the kNN search: cap its memory with --set bank_memory=BYTES"):
        with memory_stage("the kNN search", "cap its memory with --set bank_memory=BYTES"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    with pytest.raises(ValueError, match="unrelated"):  # other errors pass through unchanged
        with memory_stage("the kNN search", "x"):
            raise ValueError("unrelated")
    from fastad.ops import feature_bank

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(feature_bank.FeatureBank, "search", oom)
    msg = cli_error(capsys, ["run", "--set", "image_size=64", "--set", "crop_fraction=1", "--overlays", "0"])
    assert msg.startswith("fastad: error: OutOfMemoryError: out of memory in the kNN search: cap its memory with "
                          "--set bank_memory=BYTES") and "Tried to allocate 9.00 GiB" in msg


def test_wrong_setting_types_are_one_line(capsys):
    msg = cli_error(capsys, ["run", "--set", "coreset_ratio=tenth"])
    assert msg == 'fastad: error: --set coreset_ratio="tenth": patchcore\'s coreset_ratio expects float (default 0.1), got str'
    assert "--data-opt expects KEY=VALUE" in cli_error(capsys, ["run", "--data-opt", "x"])


@pytest.mark.parametrize("n,dim,k", [(1000, 24, 1), (777, 5, 3), (64, 16, 9)])
def test_knn_under_a_memory_cap_equals_the_uncapped_search(n, dim, k, monkeypatch):
    blocks = []  # bank rows of each score block
    rescore = feature_bank._knn_rescore

    def spy(score, *args):
        blocks.append(score.shape[1])
        return rescore(score, *args)

    monkeypatch.setattr(feature_bank, "_knn_rescore", spy)
    g = torch.Generator().manual_seed(n)
    bank, queries = torch.randn(n, dim, generator=g), torch.randn(301, dim, generator=g)
    free = FeatureBank(dim)
    free.add(bank)
    cap = n * dim * 4 // 4  # a quarter of the bank's bytes: four or more bank blocks per query chunk
    capped = FeatureBank(dim, max_bytes=cap)
    capped.add(bank)
    d0, i0 = free.search(queries, k)
    assert set(blocks) == {n}
    blocks.clear()
    d1, i1 = capped.search(queries, k)
    assert max(blocks) <= n // 8 and sum(blocks) % n == 0  # half the cap per bank block: the bank in >= 8 blocks
    exact = torch.cdist(queries.double(), bank.double()).pow(2)
    oracle, order = exact.topk(k, largest=False)
    # the same neighbours (the oracle's distances here have no near-ties) and distances: both searches
    # re-score their candidates exactly
    assert torch.equal(i1, i0) and torch.equal(i0, order) and torch.equal(d1, d0)
    assert_close_to_oracle(d1, oracle, d0)


def test_patchcore_scores_are_the_same_with_the_bank_over_its_memory_cap():
    train = SyntheticDataset("train", 6, size=64)
    test = torch.stack([SyntheticDataset("test", 4, size=64)[i]["image"] for i in range(4)])
    torch.manual_seed(0)
    free = create_model("patchcore", image_size=64, crop_fraction=1.0, coreset_ratio=0.5).fit(train)
    bank_bytes = free.memory_bank.numel() * 4
    torch.manual_seed(0)
    capped = create_model("patchcore", image_size=64, crop_fraction=1.0, coreset_ratio=0.5, bank_memory=bank_bytes // 4).fit(train)
    assert torch.equal(capped.memory_bank, free.memory_bank) and len(capped.memory_bank) > 100
    s0, m0 = free(test)
    s1, m1 = capped(test)
    emb, _ = free.embed(test)
    oracle = torch.cdist(emb.double().reshape(-1, emb.shape[-1]), free.memory_bank.double()).pow(2).min(1).values
    patch0, patch1 = (m.bank.score(emb)[1].reshape(-1) for m in (free, capped))
    assert_close_to_oracle(patch1, oracle, patch0)  # blocked search: within the float32 error of the whole one
    assert_close_to_oracle(s1, oracle.reshape(4, -1).max(1).values, s0)
    # moving the model (here to the meta device; on a GPU, to the GPU) leaves a bank over the cap on the host
    assert capped.to("meta").memory_bank.device.type == "cpu" and free.to("meta").memory_bank.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: a host bank streamed to the device")
def test_patchcore_streams_a_host_bank_to_the_gpu(tmp_path):
    train = SyntheticDataset("train", 6, size=64)
    test = torch.stack([SyntheticDataset("test", 4, size=64)[i]["image"] for i in range(4)])
    torch.manual_seed(0)
    free = create_model("patchcore", image_size=64, crop_fraction=1.0, coreset_ratio=0.5).to("cuda").fit(train)
    cap = free.memory_bank.numel()  # a quarter of the bank's bytes
    torch.manual_seed(0)
    capped = create_model("patchcore", image_size=64, crop_fraction=1.0, coreset_ratio=0.5, bank_memory=cap).to("cuda").fit(train)
    assert capped.memory_bank.device.type == "cpu" and free.memory_bank.device.type == "cuda"
    s0, _ = free(test)
    s1, _ = capped(test)
    emb, _ = free.embed(test.cuda())
    oracle = torch.cdist(emb.double().reshape(-1, emb.shape[-1]), free.memory_bank.double()).pow(2).min(1).values
    assert_close_to_oracle(s1, oracle.reshape(4, -1).max(1).values, s0)  # float32 GEMMs of other shapes
    capped.save(tmp_path / "c.safetensors")
    loaded = load_checkpoint(tmp_path / "c.safetensors", device="cuda")
    assert loaded.memory_bank.device.type == "cpu" and torch.equal(loaded(test)[0], s1)


def test_earlier_results_are_kept_not_overwritten(tmp_path, capsys):
    out = tmp_path / "out"
    args = ["run", "--set", "image_size=64", "--set", "crop_fraction=1", "--overlays", "0", "--out", str(out)]
    assert main(args) == 0
    first = (out / "results.json").read_text()
    assert main(args) == 0 and main(args) == 0
    assert "kept the earlier results.json as results.json.~2~" in capsys.readouterr().out
    # (and the lock file of the run that writes --out)
    assert sorted(os.listdir(out)) == [".fastad.lock", "results.json", "results.json.~1~", "results.json.~2~", "results.md",
                                       "results.md.~1~", "results.md.~2~"]
    assert (out / "results.json.~1~").read_text() == first
