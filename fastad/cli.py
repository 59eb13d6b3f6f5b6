"""The ``fastad`` command line: ``fastad run`` fits and evaluates models (default: PatchCore with the
offline EfficientNet-Lite0 backbone on the embedded synthetic data; several models and datasets: a
sweep), ``fastad predict`` scores new images with a saved model, ``fastad merge`` joins the jobs of
sharded runs, ``fastad pretrain`` pretrains ADPretrain's projectors, ``fastad bench`` runs the
benchmark suites. This module only parses arguments: running is :mod:`fastad.runs` /
:mod:`fastad.predict`, reporting :mod:`fastad.report`."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


from .faults import UsageError
from .runs import KINDS

def _model_args(pairs: list[str], flag: str = "--set") -> dict:
    """``KEY=VALUE`` strings -> model keyword arguments; a VALUE that parses as JSON is decoded
    (numbers, true/false, null, lists), anything else stays a string."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _runtime_args(args, user: dict) -> dict:
    """The ``--set`` arguments plus ``--precision`` and ``--compile`` (every model's keywords; a
    ``--set`` of the same key wins)."""
    if args.precision != "fp32":
        user.setdefault("precision", args.precision)
    if args.compile:
        user.setdefault("compile", args.compile)
    return user


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    i, sep, n = text.partition("/")
    try:
        i, n = int(i), int(n)
    except ValueError:
        i = n = -1
    if not sep or n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard expects I/N with 0 <= I < N (e.g. --shard 0/4), got {text!r}")
    return i, n


def _models(values: list[str]) -> list[str]:
    """``--model`` values (repeatable, each a comma-separated list) -> model names, each once, in order."""
    from .models import MODELS

    names = []
    for value in values:
        for name in filter(None, (v.strip() for v in value.split(","))):
            if name not in MODELS:
                raise UsageError(f"--model: unknown model {name!r}; expected one or several (comma-separated) of "
                                 f"{', '.join(sorted(MODELS))}")
            if name not in names:
                names.append(name)
    if not names:
        raise UsageError("--model: no model named")
    return names


def _per_model(models: list[str], user: dict) -> dict[str, dict]:
    """Each model's ``--set`` arguments: ``KEY=VALUE`` goes to every model, ``MODEL.KEY=VALUE`` to that
    model only (and wins over an unscoped KEY)."""
    from .models import MODELS

    out = {}
    for model in models:
        mine = {k: v for k, v in user.items() if k.partition(".")[0] not in MODELS or "." not in k}
        mine.update({k.partition(".")[2]: v for k, v in user.items() if "." in k and k.partition(".")[0] == model})
        out[model] = mine
    unused = sorted({k.partition(".")[0] for k in user if "." in k and k.partition(".")[0] in MODELS} - set(models))
    if unused:
        raise UsageError(f"--set {unused[0]}.KEY=...: {unused[0]} is not one of the models run ({', '.join(models)})")
    return out


def bench(args, extra: list[str]) -> int:
    """Runs the pytest-benchmark suites of a source checkout's ``bench/``; each prints its ratio table."""
    folder = Path(__file__).resolve().parents[1] / "bench"
    if not folder.is_dir():
        raise SystemExit(f"fastad bench runs the suites in a source checkout's bench/ folder; none at {folder}")
    try:
        import pytest
    except ImportError:
        raise SystemExit("fastad bench needs pytest and pytest-benchmark: pip install 'fastad[test]'") from None
    from .distributed import resolve_device

    os.environ["FASTAD_BENCH_DEVICE"] = resolve_device(args.device).type
    return int(pytest.main([str(folder), "-s", "-q", "-p", "no:cacheprovider", "--benchmark-columns=min,mean,rounds", *extra]))


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, OSError) and exc.strerror:  # without the "[Errno N]" prefix
        text = exc.strerror + (f": {exc.filename}" if exc.filename else "")
    text = " ".join(text.split()) or type(exc).__name__
    return text if isinstance(exc, (UsageError, ValueError, OSError, FloatingPointError)) else f"{type(exc).__name__}: {text}"


def main(argv=None) -> int:
    """The ``fastad`` command. Returns the exit status: 0, or 2 after one line ``fastad: error: ...``
    on stderr for a user error (bad arguments or data, unreadable or foreign files, a file that
    cannot be written, a NaN loss, out of memory); ``--debug`` raises it with its traceback instead."""
    parser = argparse.ArgumentParser(prog="fastad", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    scoring = argparse.ArgumentParser(add_help=False)  # every command that runs a model
    scoring.add_argument("--debug", action="store_true", help="show the traceback of an error")
    scoring.add_argument("--skip-bad-images", action="store_true",
                         help="skip missing/unreadable images and masks (listed in a warning and in results.json) "
                              "instead of stopping")
    scoring.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                         help="the encoders and trainable networks under autocast in bfloat16 / float16 (weights, "
                              "optimizer states, losses, maps, scores and metrics stay float32; fp16 trains with a "
                              "dynamic loss scale); default fp32 (see the README: Speed)")
    scoring.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                         help="torch.compile the encoders and trainable networks, for scoring (MODE: torch's "
                              "reduce-overhead = CUDA graphs for fixed-size batches, or max-autotune) and training "
                              "steps (default mode); a network that fails to compile runs eager with a warning; same "
                              "results within float32 rounding")
    common = argparse.ArgumentParser(add_help=False, parents=[scoring])  # and those that read datasets
    common.add_argument("--seed", type=int, default=0, help="torch's seed before each model is built (weights, "
                        "dropout; the models' own seeds, e.g. of the coreset, are --set seed=N)")
    common.add_argument("--on-nan", default="stop", choices=["stop", "skip"],
                        help="a NaN/inf loss or gradient stops training (default; the last checkpoint is kept) "
                             "or skips that update")
    common.add_argument("--cache", default=None, metavar="DIR",
                        help="folder of the preprocessed-image cache: every image is decoded and resized once per "
                             "transform, later epochs and runs read the model-ready pixels (default: $FASTAD_CACHE_DIR, "
                             "else ~/.cache/fastad/images)")
    common.add_argument("--no-cache", action="store_true", help="decode every image from its file on every read")
    common.add_argument("--cache-max-gb", type=float, default=50.0,
                        help="cap of the cache folder in GiB: least recently used files are removed to make room; a "
                             "dataset over the cap is read uncached, with a warning (default 50)")
    r = sub.add_parser("run", help="fit and evaluate a model", parents=[common])
    from .models import MODELS

    r.add_argument("--model", action="append", default=None, metavar="MODEL[,MODEL...]",
                   help=f"the model, or several for a sweep (comma-separated or repeated), of {', '.join(sorted(MODELS))} "
                        "(default patchcore)")
    r.add_argument("--data", action="append", default=None, metavar="KIND:ROOT",
                   help=f"synthetic (default) or KIND:ROOT, KIND in {', '.join(KINDS[1:])} (list: KIND:FILE, a CSV or "
                        "JSON list); repeat for a sweep over datasets: every (model, dataset, class) is one job")
    r.add_argument("--classes", nargs="*", help="classes to run (default: all found under ROOT)")
    r.add_argument("--data-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="loader option, repeatable, e.g. --data-opt json_dir=realiad_jsons_fuiad_0.0 (realiad), "
                        "--data-opt test_good=0.3 (imagefolder, list)")
    r.add_argument("--setting", default="separate", choices=["separate", "unified"],
                   help="one model per class, or one model for all classes (multi-class)")
    r.add_argument("--device", default="auto", help="auto (CUDA when torch sees a GPU, else cpu), cpu, cuda or cuda:N")
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--num-workers", type=int, default=0)
    r.add_argument("--coreset-ratio", type=float, default=None, help="PatchCore coreset fraction (default 0.1)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="model argument, repeatable, e.g. --set iterations=5000 --set weights=/w/dinov2.pth; in a "
                        "sweep MODEL.KEY=VALUE sets it for that model only, e.g. --set dinomaly.iterations=5000")
    r.add_argument("--no-recipe", action="store_true",
                   help="run the model's defaults instead of the authors' recipe for this model, data kind and setting "
                        "(fastad.recipes; --set arguments win over a recipe either way)")
    r.add_argument("--protocol", default="fastad", choices=["fastad", "official"],
                   help="image resizing and pixel ground truth: fastad's one rule for every method (default, methods "
                        "compare with each other) or the method's official code (numbers compare with its paper)")
    r.add_argument("--select-on-test", type=int, default=None, metavar="N",
                   help="score the TEST set every N training iterations and report the best image AUROC's metrics, as "
                        "FOD/RLR/ADPretrain report (labelled as test-set selection in the results; default: the last)")
    r.add_argument("--out", default=None, help="folder for results.json, results.md and overlays/")
    r.add_argument("--overlays", type=int, default=4, help="anomaly-map overlay PNGs per class (0: none)")
    r.add_argument("--report", action="store_true",
                   help="also write plots under --out/plots (per dataset: a metric per class, one bar per model; per "
                        "job: image ROC and PR curves, score histogram with the F1-optimal threshold) and one "
                        "self-contained --out/report.html")
    r.add_argument("--checkpoint-dir", default=None,
                   help="save each fitted model there (MODEL-CLASS.safetensors; trained models every "
                        "--checkpoint-every iterations) and resume from it when run again")
    r.add_argument("--checkpoint-every", type=int, default=500, help="iterations between training checkpoints")
    r.add_argument("--parallel", default="auto", choices=["auto", "jobs", "data"],
                   help="under torchrun/srun: one (model, class) job per process from a shared queue (jobs, results "
                        "under --out/jobs, finished jobs skipped on a restart), all processes on each job (data: "
                        "sharded embedding, coreset and scoring, data-parallel training), or jobs when there are at "
                        "least as many jobs as processes (auto)")
    r.add_argument("--shard", default=None, metavar="I/N",
                   help="run only shard I of N of the jobs (Slurm arrays, separate machines), each finished job "
                        "written under --out/jobs; then fastad merge OUT")
    p = sub.add_parser("pretrain", help="pretrain ADPretrain's projectors on labelled images (train + test splits); "
                       "then score with --model featurenorm --set pretrained=OUT", parents=[common])
    p.add_argument("--data", default="synthetic", help="synthetic or KIND:ROOT, as for run")
    p.add_argument("--classes", nargs="*", help="classes to use (default: all found under ROOT)")
    p.add_argument("--data-opt", action="append", default=[], metavar="KEY=VALUE", help="loader option, as for run")
    p.add_argument("--out", required=True, help="checkpoint file (.safetensors), resumed if it exists")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N, as for run")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="ADPretrain argument, repeatable")
    p.add_argument("--no-recipe", action="store_true", help="the model's defaults instead of the authors' pretraining "
                   "recipe for this data kind (fastad.recipes)")
    m = sub.add_parser("merge", help="build results.json / results.md from the finished jobs of --shard or "
                       "--parallel jobs runs", parents=[common])
    m.add_argument("out", help="the --out folder of those runs")
    pr = sub.add_parser("predict", help="score new images with a saved model (a --checkpoint-dir file of fastad run): "
                        "predictions.csv, anomaly maps and overlays under --out", parents=[scoring])
    pr.add_argument("checkpoint", help="a model file written by fastad run --checkpoint-dir (or model.save)")
    pr.add_argument("inputs", nargs="+", metavar="INPUT",
                    help="image files, folders (searched recursively), glob patterns or list files (.txt / .csv: one "
                         "path per line, or a 'path' column)")
    pr.add_argument("--out", required=True, help="folder for predictions.csv, maps/ and overlays/")
    pr.add_argument("--threshold", type=float, default=None,
                    help="image score at and above which an image is labelled anomalous (default: the F1-optimal "
                         "threshold stored with the model by fastad run)")
    pr.add_argument("--maps", default="png,npy", help="anomaly maps to write: png (16-bit, normalised as the scores), "
                    "npy (raw float32), both (png,npy, default) or none")
    pr.add_argument("--overlays", type=int, default=None, metavar="N",
                    help="overlay PNGs of the N highest-scoring images (default: all, up to 100)")
    pr.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N, as for run")
    pr.add_argument("--batch-size", type=int, default=16)
    pr.add_argument("--num-workers", type=int, default=0)
    b = sub.add_parser("bench", help="run the kernel benchmarks (source checkout) and print ratio tables; "
                       "other arguments go to pytest, e.g. -k quantile")
    b.add_argument("--device", default="auto", help="auto (cuda when torch sees a GPU), cpu or cuda")
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        return bench(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    import torch

    try:
        if args.command == "merge":
            from .runs import merge

            rows = merge(args.out)
            print(f"wrote {os.path.join(args.out, 'results.json')} and results.md ({len(rows)} jobs)", flush=True)
            return 0
        if args.command == "predict":
            from .predict import predict_command

            return predict_command(args)
        from . import runs

        _arguments(args)
        return runs.pretrain(args) if args.command == "pretrain" else runs.run(args)
    except (UsageError, ValueError, TypeError, OSError, FloatingPointError, torch.cuda.OutOfMemoryError) as exc:
        if args.debug:
            raise
        from . import distributed

        where = f"[rank {distributed.rank(distributed.world())}] " if distributed.active(distributed.world()) else ""
        print(f"fastad: error: {where}{_one_line(exc)}", file=sys.stderr, flush=True)
        return 2


def _arguments(args) -> None:
    """``run`` / ``pretrain`` arguments turned into what :mod:`fastad.runs` takes: ``models`` (names),
    ``data`` (specs, a list for run), ``model_args`` (each model's keyword arguments: recipe-free
    ``--set`` plus ``--precision`` / ``--compile`` / ``--coreset-ratio``), ``data_options``, ``shard``."""
    user = _runtime_args(args, _model_args(args.set))
    args.data_options = _model_args(args.data_opt, "--data-opt")
    if args.command == "pretrain":
        args.models = ["adpretrain"]
        args.model_args = {"adpretrain": user}
        return
    args.models = _models(args.model or ["patchcore"])
    args.data = args.data or ["synthetic"]
    args.model_args = _per_model(args.models, user)
    if args.coreset_ratio and "patchcore" in args.model_args:
        args.model_args["patchcore"]["coreset_ratio"] = args.coreset_ratio
    args.shard = _parse_shard(args.shard)


if __name__ == "__main__":
    sys.exit(main())
