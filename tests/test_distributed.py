"""Many processes (torch.distributed, gloo on the CPU): the distributed ops and models against one
process on the same data, the CLI's parallel modes against a serial run, resume and failure paths.

Each case runs in fresh processes (``fastad.distributed.spawn``, a file store, no port). The
one-process oracle of a model runs the same way (``spawn(fn, 1)``): torch's CPU kernels may round
differently with another thread count, and every spawned process uses one thread.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastad import distributed
from fastad.cli import main
from fastad.data import SyntheticDataset
from fastad.ops import FeatureBank, dispatch, greedy_coreset, nearest_reference, quantile, select_rank

ROOT = Path(__file__).resolve().parents[1]
W = distributed.world


def _local():
    dispatch.settings["triton"] = False  # models take the ops' PyTorch path in the children (no interpreter)


# -- sharding and gathering ----------------------------------------------------------------------------
def test_shard_range_is_contiguous_and_covers_everything():
    for n in (0, 1, 5, 37, 100):
        for world in (1, 2, 3, 7):
            parts = [distributed.shard_range(n, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(e - b for b, e in parts) - min(e - b for b, e in parts) <= 1
    with pytest.raises(ValueError, match="rank 2"):
        distributed.shard_range(5, 2, 2)


def test_without_a_group_nothing_is_collective(monkeypatch):
    assert not distributed.active(None) and distributed.rank() == 0 and distributed.world_size() == 1
    x = torch.randn(5, 3)
    assert distributed.gather_rows(x) is x
    assert distributed.init("cpu").world == 1
    # a one-task Slurm job (plain `fastad run` inside sbatch) starts no process group
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.init("cpu").world == 1 and not torch.distributed.is_initialized()


# -- exact distributed ops ---------------------------------------------------------------------------
def _coreset_job(rank, world, x, bounds, cases):
    lo, hi = bounds[rank], bounds[rank + 1]
    out = []
    for ratio, extension in cases:
        with dispatch.kernels(extension=extension):
            out.append(greedy_coreset(x[lo:hi], ratio=ratio, group=W()))
    return out


def _coreset_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 40, generator=g)
    x[36:39] = x[36]  # duplicates across the 37/63 boundary
    x[80] = x[20]
    return x


def test_distributed_coreset_selects_the_one_process_indices():
    x = _coreset_data()
    cases = [(0.1, True), (0.2, True), (0.2, False)]
    want = []
    for ratio, extension in cases:
        with dispatch.kernels(extension=extension):
            want.append(greedy_coreset(x, ratio=ratio))
    for world, bounds in ((2, [0, 37, 100]), (3, [0, 0, 50, 100])):  # uneven shards; an empty one
        for got in distributed.spawn(_coreset_job, world, x, bounds, cases):
            for g, w in zip(got, want):
                assert torch.equal(g, w), (world, g, w)


def _select_job(rank, world, shards, qs):
    out = []
    for shard in shards:
        x = shard[rank]
        n = sum(s.numel() for s in shard)
        out.append([quantile(x, q, group=W()) for q in qs] + [select_rank(x, r, group=W()) for r in (0, n // 2, n - 1)])
    for op, arg in ((quantile, 0.5), (select_rank, 0)):  # refused on every rank before any collective
        with pytest.raises(ValueError, match="dim= is not supported with group="):
            op(shards[0][rank], arg, dim=0, group=W())
    return out


def test_distributed_quantile_is_torch_quantile_of_the_whole():
    g = torch.Generator().manual_seed(1)
    cases = [torch.randn(1001, generator=g), torch.randint(0, 5, (300,), generator=g).float(),  # ties
             torch.randn(77, generator=g).double(), torch.randn(50, generator=g).half(), -torch.rand(40, generator=g)]
    cases[0][[3, 700]] = 0.0
    shards = [[x[:0], x] if i % 2 else [x[: len(x) // 3], x[len(x) // 3 :]] for i, x in enumerate(cases)]  # empty shards
    qs = [0.0, 0.1, 1 / 3, 0.5, 0.9999, 1.0]
    got = distributed.spawn(_select_job, 2, shards, qs)
    for i, x in enumerate(cases):
        xf = x.double() if x.dtype == torch.float64 else x.float()
        s = torch.sort(xf).values
        want = [torch.quantile(xf, q) for q in qs] + [s[0], s[len(s) // 2], s[-1]]
        for rank in range(2):
            for a, b in zip(got[rank][i], want):
                assert a.dtype == b.dtype and torch.equal(a, b), (i, rank, a, b)


def _nearest_job(rank, world, x, bank, rows, wq, wbank, images, fb, q2):
    lo, hi = rows[rank], rows[rank + 1]
    out = {}
    for extension in (True, False):
        with dispatch.kernels(extension=extension):
            out[extension] = [nearest_reference(x, bank[lo:hi], group=W()),
                              nearest_reference(x, bank[lo:hi], metric="cosine", group=W()),
                              nearest_reference(wq, wbank[images[rank] : images[rank + 1]], window=3, group=W())]
    for backend in ("torch", "faiss") if _has_faiss() else ("torch",):
        index = FeatureBank(fb.shape[1], backend=backend, group=W())
        if hi > lo:
            index.add(fb[lo:hi])
        out[backend] = index.search(q2, 4)
    return out


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def test_sharded_nearest_and_feature_bank_match_one_process():
    g = torch.Generator().manual_seed(2)
    bank = torch.randn(100, 8, generator=g)
    bank[60] = bank[10]  # the same entry on both ranks: the lower global index wins
    x = torch.cat([torch.randn(30, 8, generator=g), bank[10:11], bank[60:61]])
    wbank, wq = torch.randn(3, 5, 6, 4, generator=g), torch.randn(2, 5, 6, 4, generator=g)
    wbank[2] = wbank[0]  # a tied reference image in the other shard
    fb, q2 = torch.randn(100, 8, generator=g), torch.randn(20, 8, generator=g)
    whole = FeatureBank(8)
    whole.add(fb)
    want_bank = whole.search(q2, 4)
    want = {}
    for extension in (True, False):
        with dispatch.kernels(extension=extension):
            want[extension] = [nearest_reference(x, bank), nearest_reference(x, bank, metric="cosine"),
                               nearest_reference(wq, wbank, window=3)]
    for rows, images in (([0, 37, 100], [0, 1, 3]), ([0, 0, 100], [0, 0, 3])):
        for got in distributed.spawn(_nearest_job, 2, x, bank, rows, wq, wbank, images, fb, q2):
            for extension in (True, False):
                for g_, w_ in zip(got[extension], want[extension]):
                    assert all(torch.equal(a, b) for a, b in zip(g_, w_))
            # squared distances from float32 GEMMs of other shapes: within float32 rounding of |q|^2 + |b|^2
            # (FAISS's own search varies the same way with the batch size)
            scale = (q2.pow(2).sum(1, keepdim=True) + fb.pow(2).sum(1).max()).expand_as(want_bank[0])
            for backend in ("torch", "faiss") if _has_faiss() else ("torch",):
                assert torch.equal(got[backend][1], want_bank[1]), backend
                assert ((got[backend][0] - want_bank[0]).abs() <= 64 * torch.finfo(torch.float32).eps * scale).all()


# -- models ------------------------------------------------------------------------------------------
def test_patchcore_with_a_sharded_bank_scores_as_one_process():
    kw = dict(image_size=64, crop_fraction=1.0, bank="sharded")
    state, results, predictions, qmax = distributed.spawn(_embedding_job, 1, "patchcore", kw)[0]
    got = distributed.spawn(_embedding_job, 2, "patchcore", kw)
    whole, shards = state["bank.memory_bank"], [g[0]["bank.memory_bank"] for g in got]
    assert sum(len(b) for b in shards) == len(whole) and all(0 < len(b) < len(whole) for b in shards)
    assert torch.equal(torch.cat(shards).unique(dim=0), whole.unique(dim=0))  # the same rows, split
    bound = _knn_bound(qmax, whole)
    for g in got:
        for a, b in zip(g[2][:2], predictions[:2]):
            assert (a - b).abs().max() <= bound
        assert all(torch.equal(a, b) for a, b in zip(g[2][2:], predictions[2:]))  # labels and masks in order
    with pytest.raises(RuntimeError, match="cannot be saved to one file"):
        distributed.spawn(_save_sharded, 2)


def _save_sharded(rank, world):
    from fastad.models import create_model

    model = create_model("patchcore", image_size=64, crop_fraction=1.0, bank="sharded")
    model.fit(SyntheticDataset("train", 4, size=64), group=W())
    model.save(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"never-written-{os.getpid()}.safetensors"))



def _embedding_job(rank, world, name, kw):
    _local()
    from fastad.engine import score
    from fastad.models import create_model

    torch.manual_seed(0)
    model = create_model(name, **kw)
    # in whole batches of 4: 9 training images -> rank 0 reads batch 0, rank 1 batches 1-2; the test images
    # (9 for the sharded bank) -> rank 0 makes 1 forward call and a placeholder call, rank 1 two calls
    model.fit(SyntheticDataset("train", 9, size=64), batch_size=4, group=W())
    test = SyntheticDataset("test", 9 if kw.get("bank") == "sharded" else 10, size=64)
    results, predictions = score(model, test, batch_size=4, group=W())
    if name != "patchcore":
        return model.state_dict(), results, predictions, None
    with torch.no_grad():  # the largest |query|^2, for the rounding bound of the kNN distances
        q = model.embed(torch.stack([test[i]["image"] for i in range(len(test))]))[0]
    return model.state_dict(), results, predictions, float(q.pow(2).sum(-1).max())


def _knn_bound(qmax: float, bank: torch.Tensor) -> float:
    """Squared distances from float32 GEMMs over a shard of the bank instead of the whole: within
    the GEMM's rounding of |q|^2 + |b|^2; the map (bilinear, Gaussian: weights summing to 1) and the
    image score (a max) keep that bound."""
    return 64 * torch.finfo(torch.float32).eps * (qmax + float(bank.pow(2).sum(1).max()))


@pytest.mark.parametrize("name", ["patchcore", "padim"])
def test_embedding_models_on_two_ranks_equal_one_process(name):
    kw = dict(image_size=64, crop_fraction=1.0)
    state, results, predictions, qmax = distributed.spawn(_embedding_job, 1, name, kw)[0]
    got = distributed.spawn(_embedding_job, 2, name, kw)
    assert got[1][1] is None and got[0][1] is not None  # rank 0 computes the metrics
    for rank in range(2):
        s, _, p, _ = got[rank]
        assert all(torch.equal(a, b) for a, b in zip(p[2:], predictions[2:]))  # labels and masks, in order
        if name == "patchcore":  # the batches one process reads, rows copied: the same bank and scores, bit for bit
            assert s.keys() == state.keys() and all(torch.equal(s[k], state[k]) for k in state)
            assert all(torch.equal(a, b) for a, b in zip(p, predictions))
        else:  # float64 sums added in another order, rounded to float32: an element may round to the
            # neighbouring float32 (rtol), and the inversion turns the float64 summation-order differences
            # into errors relative to the matrix's largest entries, not to each (small) entry (atol)
            eps = torch.finfo(torch.float32).eps
            for k in state:
                if state[k].is_floating_point() and state[k].numel():
                    torch.testing.assert_close(s[k], state[k], rtol=4 * eps, atol=16 * eps * float(state[k].abs().max()))
                else:
                    assert torch.equal(s[k], state[k])
    metrics = {k: v for k, v in results.items() if not k.endswith("_s") and k != "images_per_s"}
    got_metrics = {k: got[0][1][k] for k in metrics}
    if name == "patchcore":
        assert got_metrics == metrics
    else:
        assert all(abs(got_metrics[k] - v) <= 1e-6 for k, v in metrics.items() if isinstance(v, float))


def _tiny_dinomaly(**kw):
    from fastad.models import Dinomaly

    tiny_vit = {"depth": 4, "embed_dim": 48, "num_heads": 2}
    return Dinomaly(**{**dict(encoder="dinov2reg_vit_small_14", weights="random", encoder_layers=(0, 1, 2, 3),
                              groups=((0, 1), (2, 3)), decoder_depth=4, encoder_kwargs=tiny_vit, train_batch_size=4,
                              iterations=4, warmup_iters=2, map_size=56, p_ramp=4, image_size=56, crop_fraction=1.0),
                       **kw})


def _train_job(rank, world, kind, folder):
    _local()
    from fastad.models import MiniMaxAD, load_checkpoint

    data = SyntheticDataset("train", 8, size=56 if kind == "dinomaly" else 64)

    def build(**kw):
        torch.manual_seed(0)
        if kind == "dinomaly":
            return _tiny_dinomaly(**kw)
        return MiniMaxAD(encoder="efficientnet_lite0", train_batch_size=4, iterations=4, image_size=64,
                         crop_fraction=1.0, loss=kind, **kw)

    first = build(dropout=0.0) if kind == "dinomaly" else build()
    first.fit(data, iterations=1, group=W())  # one update from the same weights: the gradients compare
    out = {"grad_norm": first.last_grad_norm, "loss0": first.loss_history[0]}
    model = build(dropout=0.0) if kind == "dinomaly" else build()
    model.fit(data, group=W())
    out["state"], out["losses"] = model.state_dict(), model.loss_history
    if kind == "dinomaly" and world > 1:  # exact resume, dropout on: every rank's RNG is restored
        straight = build()
        straight.fit(data, group=W())
        path = os.path.join(folder, "ck.safetensors")
        build().fit(data, iterations=2, checkpoint=path, checkpoint_every=1, group=W())
        torch.manual_seed(123)  # a resumed run must not depend on the RNG state before it
        resumed = load_checkpoint(path)
        resumed.fit(data, group=W())
        out["resume"] = [torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values())]
        out["resume_losses"] = (straight.loss_history, resumed.loss_history)
    return out


@pytest.mark.parametrize("kind", ["dinomaly", "fr"])  # Dinomaly's hard mining; MiniMaxAD's ADCLoss + BatchNorm
def test_data_parallel_training_equals_the_global_batch_run(kind, tmp_path):
    one = distributed.spawn(_train_job, 1, kind, str(tmp_path), timeout_s=60)[0]
    two = distributed.spawn(_train_job, 2, kind, str(tmp_path), timeout_s=60)
    # the same parameters on every rank, bit for bit (all-reduced gradients, one optimizer step each)
    assert all(torch.equal(two[0]["state"][k], two[1]["state"][k]) for k in one["state"])
    # the first loss and gradient: the same per-image computation, the batch's sums split in two
    # (the loss in float64; the gradient norm a float32 sum of B x points terms, relative error
    # <= terms x eps = 4 x 256 x 6e-8 < 1e-4); a missing all-reduce or share halves or doubles them
    assert two[0]["loss0"] == pytest.approx(one["loss0"], rel=8 * torch.finfo(torch.float32).eps)
    assert two[0]["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
    # after 4 (Adam) updates: each moves a weight by at most ~lr, so runs whose float32 gradients
    # differ in the last bits may differ by a fraction of lr per step, never more
    lr = 2e-3 if kind == "dinomaly" else 5e-3
    for k, v in one["state"].items():
        if v.is_floating_point() and "running" not in k:
            assert (two[0]["state"][k] - v).abs().max() <= 4 * lr, k
    assert two[0]["losses"] == pytest.approx(one["losses"], rel=1e-2)
    if kind == "dinomaly":
        assert all(two[0]["resume"]) and all(two[1]["resume"])
        assert two[0]["resume_losses"][0] == two[0]["resume_losses"][1]


def _resume_writer(rank, world, folder):
    _local()
    from fastad.models import FOD

    _tiny_dinomaly().fit(SyntheticDataset("train", 8, size=56), iterations=1,
                         checkpoint=os.path.join(folder, "ck.safetensors"), group=W())
    _tiny_dinomaly(iterations=1, warmup_iters=0).fit(SyntheticDataset("train", 8, size=56),  # a finished run
                                                     checkpoint=os.path.join(folder, "done.safetensors"), group=W())
    with pytest.raises(ValueError, match="cannot train data-parallel: its recipe trains with batch 1"):
        FOD(image_size=64, iterations=1).fit(SyntheticDataset("train", 4, size=64), group=W())
    return True


def test_resume_with_another_number_of_processes_is_refused(tmp_path):
    """...and a model whose recipe cannot be split between processes says so."""
    from fastad.models import load_checkpoint

    assert distributed.spawn(_resume_writer, 2, str(tmp_path)) == [True, True]
    model = load_checkpoint(tmp_path / "ck.safetensors")
    with pytest.raises(ValueError, match="written by a run of 2 process.*not 1"):
        model.fit(SyntheticDataset("train", 8, size=56))
    done = load_checkpoint(tmp_path / "done.safetensors")  # nothing left to train: usable anywhere
    assert done.fit(SyntheticDataset("train", 8, size=56)).iteration == 1


# -- failures end the run ------------------------------------------------------------------------------
def _raising_job(rank, world):
    if rank == 1:
        raise ValueError("rank one broke")
    greedy_coreset(torch.randn(50, 8), ratio=0.5, group=W())  # rank 0 waits in a collective


def test_a_rank_that_raises_ends_the_run_with_its_error():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="(?s)rank 1 failed.*ValueError: rank one broke"):
        distributed.spawn(_raising_job, 2, timeout_s=30)
    assert time.monotonic() - t0 < 60


# -- the command line ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An MVTec-style root with three small classes (6, 4 and 8 training images)."""
    root = tmp_path_factory.mktemp("mvtec")
    rng = np.random.default_rng(0)
    for c, n in (("a", 6), ("b", 4), ("c", 8)):
        base = rng.integers(60, 200, 3)
        for split, kind, k in (("train", "good", n), ("test", "good", 3), ("test", "crack", 3)):
            d = root / c / split / kind
            d.mkdir(parents=True)
            for i in range(k):
                img = (base + rng.normal(0, 12, (48, 48, 3))).clip(0, 255).astype(np.uint8)
                if kind == "crack":
                    y, x = rng.integers(4, 32, 2)
                    img[y : y + 10, x : x + 10] = 255
                    mask = np.zeros((48, 48), np.uint8)
                    mask[y : y + 10, x : x + 10] = 255
                    (root / c / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
                    Image.fromarray(mask).save(root / c / "ground_truth" / kind / f"{i:03d}_mask.png")
                Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


def _args(root, out, *extra):
    return ["run", "--data", f"mvtec:{root}", "--set", "image_size=48", "--set", "crop_fraction=1.0", "--overlays", "0",
            "--out", str(out), *extra]


def _metrics(out):
    rows = json.loads((Path(out) / "results.json").read_text())
    return {r["class"]: {k: v for k, v in r.items() if k.startswith(("image_", "pixel_")) or k == "mad"} for r in rows}


def _cli_job(rank, world, *argvs):
    _local()
    return [main(argv) for argv in argvs] if len(argvs) > 1 else main(argvs[0])


@pytest.fixture(scope="module")
def serial(folders, tmp_path_factory):
    """The metrics of a serial run (one process, one thread, as the spawned ones)."""
    out = tmp_path_factory.mktemp("serial")
    assert distributed.spawn(_cli_job, 1, _args(folders, out)) == [0]
    return _metrics(out)


def test_jobs_mode_runs_every_class_once_and_equals_a_serial_run(folders, serial, tmp_path, capfd):
    jobs = tmp_path / "jobs"
    assert distributed.spawn(_cli_job, 2, _args(folders, jobs, "--parallel", "jobs")) == [0, 0]
    assert sorted(p.name for p in (jobs / "jobs").iterdir()) == ["patchcore-a.json", "patchcore-b.json", "patchcore-c.json"]
    assert _metrics(jobs) == serial
    # a restart (torchrun restarts every worker after a failure) skips what is done
    stamps = {p: p.stat().st_mtime_ns for p in (jobs / "jobs").iterdir()}
    (jobs / "jobs" / "patchcore-b.json").unlink()
    assert distributed.spawn(_cli_job, 2, _args(folders, jobs, "--parallel", "jobs")) == [0, 0]
    assert {p: p.stat().st_mtime_ns for p in stamps if p.name != "patchcore-b.json"} == \
        {p: t for p, t in stamps.items() if p.name != "patchcore-b.json"}
    assert _metrics(jobs) == serial
    # a job folder of other settings is never mixed in
    assert distributed.spawn(_cli_job, 2, _args(folders, jobs, "--parallel", "jobs", "--set", "sigma=2")) == [2, 2]
    assert "written by a run with other settings" in capfd.readouterr().err  # the children's stderr


def test_shards_and_merge_give_the_serial_tables(folders, serial, tmp_path):
    sharded = tmp_path / "sharded"
    # two separate commands (as two Slurm array tasks), here one after the other in one process
    assert distributed.spawn(_cli_job, 1, *(_args(folders, sharded, "--shard", f"{i}/2") for i in range(2))) == [[0, 0]]
    assert not (sharded / "results.json").exists()
    assert main(["merge", str(sharded)]) == 0
    assert _metrics(sharded) == serial
    assert (sharded / "results.md").read_text().splitlines()[0] == f"# fastad patchcore on mvtec:{folders} (separate)"


def test_a_sweep_in_jobs_mode_equals_the_serial_sweep(folders, tmp_path):
    """Two models x two datasets: every (model, dataset, class) one job of the shared queue."""
    def argv(out, *extra):
        return ["run", "--model", "patchcore,padim", "--data", "synthetic", "--data", f"mvtec:{folders}",
                "--set", "image_size=48", "--set", "crop_fraction=1.0", "--overlays", "0", "--out", str(out), *extra]

    assert distributed.spawn(_cli_job, 1, argv(tmp_path / "serial")) == [0]
    assert distributed.spawn(_cli_job, 2, argv(tmp_path / "jobs", "--parallel", "jobs")) == [0, 0]
    assert sorted(p.name for p in (tmp_path / "jobs" / "jobs").iterdir()) == sorted(
        f"{m}-{d}-{c}.json" for m in ("patchcore", "padim")
        for d, c in (("synthetic", "synthetic"), ("mvtec", "a"), ("mvtec", "b"), ("mvtec", "c")))

    def keyed(out):
        rows = json.loads((Path(out) / "results.json").read_text())
        return [((r["dataset"], r["model"], r["class"]), {k: v for k, v in r.items() if k.startswith(("image_", "pixel_"))})
                for r in rows]

    assert keyed(tmp_path / "jobs") == keyed(tmp_path / "serial")  # same rows, same order


def test_data_mode_equals_a_serial_run(folders, serial, tmp_path):
    data = tmp_path / "data"
    assert distributed.spawn(_cli_job, 2, _args(folders, data, "--classes", "a", "c", "--parallel", "data")) == [0, 0]
    assert _metrics(data) == {c: serial[c] for c in ("a", "c")}


def test_shard_and_parallel_arguments_are_checked(folders, tmp_path, capsys):
    from conftest import cli_error

    assert "--shard expects I/N" in cli_error(capsys, _args(folders, tmp_path, "--shard", "2/2"))
    assert "no finished jobs" in cli_error(capsys, ["merge", str(tmp_path)])


_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "FASTAD_DIST_TIMEOUT": "30"}
_TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _torchrun(*args, timeout=120):
    cmd = [*_TORCHRUN, "--standalone", "--nproc-per-node=2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_ENV, timeout=timeout, cwd=ROOT)


def test_two_machines_command_line(folders, serial, tmp_path):
    """README's multi-node command (c10d rendezvous), as two 'machines' of one process on this one."""
    import socket

    with socket.socket() as s:  # a free port for the rendezvous endpoint
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [*_TORCHRUN, "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=fastad-test", "-m", "fastad", *_args(folders, tmp_path)]
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_ENV, cwd=ROOT)
             for _ in range(2)]
    outputs = [n.communicate(timeout=120) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], [e[-2000:] for _, e in outputs]
    assert _metrics(tmp_path) == serial  # auto: 3 jobs >= 2 processes, so one job per process at a time


def test_torchrun_ends_a_run_whose_rank_fails(folders, tmp_path):
    t0 = time.monotonic()
    script = tmp_path / "fail.py"
    script.write_text("import torch\nfrom fastad import distributed\nfrom fastad.ops import quantile\n"
                      "ctx = distributed.init('cpu')\n"
                      "if ctx.rank == 1:\n    raise SystemExit('fastad: error: [rank 1] rank one broke')\n"
                      "quantile(torch.randn(100), 0.5, group=distributed.world())\n")
    done = _torchrun(str(script))
    assert done.returncode != 0
    assert "rank one broke" in done.stderr
    assert time.monotonic() - t0 < 60
