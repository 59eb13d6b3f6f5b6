"""Running ``fastad run`` and ``fastad pretrain``: data specs, building models (recipes and ``--set``
arguments), fitting (checkpoints, test-set selection), scoring, and the job queue. Every (model,
dataset, class) of a run (a sweep: several models and datasets) is one job: serial, one job per
process under torchrun (``--parallel jobs``, shared queue in the c10d store), a balanced share per
``--shard I/N``, or all processes on each job (``--parallel data``). What a run writes for people
to read is :mod:`fastad.report`'s.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .faults import UsageError
from .report import fmt as _fmt
from .report import job_name, job_plot, keep_previous_results, plain, recipe_line, safe_name, write_results

KINDS = ("synthetic", "mvtec", "mpdd", "btad", "visa", "realiad", "mtd", "folder", "imagefolder", "list")
JOBS = "jobs"  # --out's folder of finished (model, dataset, class) jobs: one JSON file each


# -- data -----------------------------------------------------------------------------------------------------
def _class_names(kind: str, root: Path, options: dict) -> list[str]:
    """Every class a dataset root (or list file) holds, sorted."""
    from .data import list_classes

    if kind in ("mvtec", "mpdd", "btad"):
        return sorted(d.name for d in root.iterdir() if (d / "train").is_dir())
    if kind == "visa":
        import csv

        with open(root / "split_csv" / "1cls.csv", newline="") as f:
            return sorted({row["object"] for row in csv.DictReader(f)})
    if kind == "realiad":
        return sorted(p.stem for p in (root / options.get("json_dir", "realiad_jsons")).glob("*.json"))
    if kind == "list":
        return list_classes(root)
    if kind == "mtd":
        return ["mtd"]
    return [root.name]


def _loaders():
    """KIND -> (loader(root, class, split, transform, **options), the function whose keyword
    arguments are the kind's ``--data-opt`` options)."""
    from .data import btad, folder, imagefolder, listfile, mtd, mvtec, realiad, visa

    return {
        "mvtec": (mvtec, mvtec), "mpdd": (mvtec, mvtec), "btad": (btad, btad), "visa": (visa, visa),
        "realiad": (realiad, realiad),
        "mtd": (lambda root, c, split, t, **o: mtd(root, split, t, **o), mtd),
        "folder": (lambda root, c, split, t, **o: folder(root, split, t, **o), folder),
        "imagefolder": (lambda root, c, split, t, **o: imagefolder(root, split, t, **o), imagefolder),
        "list": (lambda root, c, split, t, **o: listfile(root, split, t, class_name=c, **o), listfile),
    }


FIXED_ARGUMENTS = {"root", "category", "split", "transform", "class_name", "listing", "layout"}


def _datasets(spec: str, classes: list[str] | None, transform, options: dict | None = None):
    """[(class name, train set, test set)] for ``--data KIND:PATH``, preprocessed by the model's
    ``transform`` (an ImageTransform; MTD tiles are resized to its crop size without cropping);
    ``options`` are the loader's keyword arguments (``--data-opt``). Every error is one line."""
    from .data import SyntheticDataset

    options = options or {}
    kind, _, path = spec.partition(":")
    if kind not in KINDS:
        raise UsageError(f"--data: unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind == "synthetic":
        if options or (classes and classes != ["synthetic"]):
            raise UsageError("the synthetic data has one class, 'synthetic', and no --data-opt options")
        return [("synthetic", SyntheticDataset("train", 32, size=transform.crop), SyntheticDataset("test", 32, size=transform.crop))]
    if not path:
        raise UsageError(f"--data {spec!r}: expected KIND:PATH, e.g. mvtec:/data/mvtec or mtd:/data/mtd")
    root = Path(path)
    if kind == "list" and not root.is_file():
        raise UsageError(f"--data {spec!r}: {root} is not a file (a CSV or JSON list)")
    if kind != "list" and not root.is_dir():
        raise UsageError(f"--data {spec!r}: {root} is not a folder")
    load, signature_of = _loaders()[kind]
    accepted = sorted(set(inspect.signature(signature_of).parameters) - FIXED_ARGUMENTS)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UsageError(f"--data-opt {', '.join(unknown)} is not an option of {kind} data; "
                         f"its options: {', '.join(accepted) or 'none'}")
    t = transform.with_sizes(transform.crop, transform.crop) if kind == "mtd" else transform
    try:
        available = _class_names(kind, root, options)
        names = classes or available
        if not names:
            raise UsageError(f"--data {spec}: no {kind} classes found under {root}")
        missing = [c for c in names if c not in available]
        if missing:
            raise UsageError(f"--classes {', '.join(missing)} not found in {root}; available: {', '.join(available)}")
        return [(c, load(root, c, "train", t, **options), load(root, c, "test", t, **options)) for c in names]
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"--data {spec}: {exc}") from None


def dataset_labels(specs: list[str]) -> list[str]:
    """The name of each ``--data`` spec in results and file names: its kind, or KIND-FOLDER where
    two specs share a kind (a one-line error if that still repeats)."""
    kinds = [s.partition(":")[0] for s in specs]
    labels = [k if kinds.count(k) == 1 else f"{k}-{Path(s.partition(':')[2]).name}" for k, s in zip(kinds, specs)]
    labels = [safe_name(x) for x in labels]
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise UsageError(f"--data: several data specs are named {', '.join(repeated)}; give each --data once "
                         "(datasets of one kind need folders of different names)")
    return labels


def _check_data(sets, skip_bad: bool = False, quiet: bool = False) -> tuple[list, dict[str, list[str]]]:
    """The validation pass before any model work: print what each split holds (not when ``quiet``:
    ranks other than 0), then stop with every problem of every file list at once (missing, empty or
    unreadable images and masks, mask sizes), or, with ``skip_bad``, drop the bad images with a
    warning. Returns (the sets, {class: the skipped problems})."""
    problems, skipped, checked = [], {}, []
    for name, *splits in sets:
        parts, kept = [], []
        for split, ds in zip(("train", "test"), splits):
            if hasattr(ds, "problems"):
                bad = ds.problems()
                if bad and skip_bad:
                    skipped.setdefault(name, []).extend(f"{split}: {msg}" for _, msg in bad)
                    try:
                        ds = ds.without([sample for sample, _ in bad])
                    except ValueError as exc:
                        raise UsageError(f"{name} {split}: {exc}") from None
                else:
                    problems += [msg for _, msg in bad]
                c = ds.counts()
                parts.append(f"{split} {c['normal']} normal, {c['anomalous']} anomalous "
                             f"({c['anomalous_with_mask']} with pixel masks)")
            else:
                labels = ds.labels
                parts.append(f"{split} {int((labels == 0).sum())} normal, {int((labels > 0).sum())} anomalous")
            kept.append(ds)
        checked.append((name, *kept))
        if not quiet:
            print(f"{name}: " + "; ".join(parts), flush=True)
    if problems:
        raise UsageError(f"{len(problems)} problem(s) in the data: " + "; ".join(problems) +
                         " (fix or remove these files, or pass --skip-bad-images)")
    for name, bad in skipped.items() if not quiet else ():
        print(f"warning: {name}: skipped {len(bad)} bad image(s): " + "; ".join(bad), file=sys.stderr, flush=True)
    return checked, skipped


def _cache_sets(args, sets, ctx=None):
    """Each (class, train, test) with its splits read through the preprocessed-image cache
    (:mod:`fastad.data.cache`), unless ``--no-cache``. Under torchrun rank 0 writes the files first."""
    if args.no_cache:
        return sets
    from .data.cache import cached

    if args.cache_max_gb <= 0:
        raise UsageError(f"--cache-max-gb expects a positive size in GiB, got {args.cache_max_gb}")
    cap = int(args.cache_max_gb * 2**30)

    def wrap(verbose):
        return [(name, *(cached(ds, args.cache, max_bytes=cap, verbose=verbose) for ds in splits)) for name, *splits in sets]

    if ctx is None or ctx.world == 1:
        return wrap(True)
    import torch

    if ctx.rank == 0:
        out = wrap(True)
    torch.distributed.barrier()
    return out if ctx.rank == 0 else wrap(False)


# -- models ---------------------------------------------------------------------------------------------------
def _check_types(name: str, kwargs: dict) -> None:
    """A ``--set`` value whose JSON type cannot be the argument's (its default's type; a number for
    a float, a list for an int size or a tuple) is a one-line error naming the argument."""
    from .models import MODELS

    cls = MODELS.get(name)
    params = inspect.signature(cls.__init__).parameters if cls else {}
    for key, value in kwargs.items():
        p = params.get(key)
        if p is None or p.default is inspect.Parameter.empty or p.default is None or value is None or "|" in str(p.annotation):
            continue  # no default to learn the type from, or a union
        want = type(p.default)
        ok = {bool: lambda v: isinstance(v, bool),
              int: lambda v: (isinstance(v, int) and not isinstance(v, bool)) or isinstance(v, list),  # sizes: [H, W]
              float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              str: lambda v: isinstance(v, str),
              tuple: lambda v: isinstance(v, (list, int)), list: lambda v: isinstance(v, list)}.get(want)
        if ok is not None and not ok(value):
            raise UsageError(f"--set {key}={json.dumps(value)}: {name}'s {key} expects {want.__name__} "
                             f"(default {json.dumps(p.default) if not isinstance(p.default, tuple) else list(p.default)}), "
                             f"got {type(value).__name__}")


def _build(name: str, kwargs: dict):
    """The model ``name`` with the ``--set`` arguments; a wrong argument is a one-line error."""
    from .models import create_model

    _check_types(name, kwargs)
    try:
        return create_model(name, **kwargs)
    except TypeError as exc:  # an unknown keyword
        raise UsageError(f"--set for {name}: {exc}") from None
    except ValueError as exc:
        raise UsageError(f"{name}: {exc}") from None


def _with_recipe(model: str, data: str, setting: str, user: dict, no_recipe: bool) -> tuple[dict, dict]:
    """(model arguments, what was applied for :func:`fastad.report.recipe_line`): the recipe of (model,
    the data kind of ``data``, setting) unless ``no_recipe``, updated by the user's ``--set`` arguments."""
    from .recipes import recipe_for

    recipe = None if no_recipe else recipe_for(model, data.partition(":")[0], setting)
    applied = {"recipe": recipe["source"] if recipe else None, "recipe_args": recipe["args"] if recipe else {},
               "set_args": user}
    return {**applied["recipe_args"], **user}, applied


def _device_line(device) -> str:
    """The device a run uses and the kernel families that run there (fastad.ops.dispatch.describe)."""
    from .ops import dispatch

    return dispatch.describe(device)


# -- fitting ---------------------------------------------------------------------------------------------------
def _select_on_test(args, build, train, test_set, protocol, say):
    """FOD's / RLR's / ADPretrain's checkpoint selection: train in steps of ``--select-on-test`` iterations,
    score the **test set** after each, keep the metrics of the best image AUROC (the earliest on ties).
    Returns (model trained to the end, fit seconds, best metrics, their predictions, the selection label)."""
    from .engine import score
    from .models.training import TrainedModel

    model = build().to(args.device)
    if not isinstance(model, TrainedModel):
        raise UsageError(f"--select-on-test applies to trained models; {model.registry_name} is fitted in one pass")
    total = model.recipe_length(train)
    best, fit_s, at = None, 0.0, 0
    while at < total:
        at = min(total, at + args.select_on_test)
        t0 = time.perf_counter()
        model.fit(train, iterations=at, num_workers=args.num_workers, on_nan=args.on_nan)
        fit_s += time.perf_counter() - t0
        metrics, predictions = score(model, test_set, batch_size=args.batch_size, num_workers=args.num_workers,
                                     eval_size=protocol.eval_size)
        say(f"  iteration {at}/{total}: image AUROC {_fmt(metrics['image_auroc'])} (test set)")
        if best is None or metrics["image_auroc"] > best[0]["image_auroc"]:
            best = (metrics, predictions, at)
    label = (f"TEST-SET SELECTION: the best image AUROC on the test set, at iteration {best[2]} of {total} "
             f"(evaluated every {args.select_on_test}); optimistic, as the papers that report it")
    return model, fit_s, best[0], best[1], label


def _fit(args, build, train, checkpoint: str | None, group=None):
    """(fitted model, fit seconds): a fresh model from ``build()``, or with ``checkpoint`` the model
    saved there (written by an earlier run with the same configuration), trained on to its recipe's
    end (exact resume) or, for an embedding model, used as it is; the fitted model is saved there.
    With ``group`` every rank fits the one model together (data parallel)."""
    from . import distributed
    from .engine import fit_model
    from .models import load_checkpoint
    from .models.base import checkpoint_config
    from .models.training import TrainedModel

    model = build()
    fit_options = {"on_nan": args.on_nan} if isinstance(model, TrainedModel) else {}
    if distributed.active(group):
        if "group" not in inspect.signature(model.fit).parameters:
            raise UsageError(f"{model.registry_name} has no data-parallel fit; run one job per process (--parallel jobs)")
        fit_options["group"] = group
    if checkpoint and os.path.exists(checkpoint):
        name, config = checkpoint_config(checkpoint)
        # an argument added after the file was written counts as its default
        defaults = {k: p.default for k, p in inspect.signature(type(model).__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        config = {**{k: v for k, v in model.config.items() if k not in config and v == defaults.get(k, object())},
                  **config}
        if name != model.registry_name or config != model.config:
            diff = sorted(k for k in {*config, *model.config} if config.get(k) != model.config.get(k))
            raise UsageError(f"--checkpoint-dir: {checkpoint} holds a {name} model with other settings "
                             f"({', '.join(diff) or 'model'} differ); use another --checkpoint-dir or delete the file")
        model = load_checkpoint(checkpoint, device=args.device, **({"compile": args.compile} if args.compile else {}))
        if not isinstance(model, TrainedModel):
            print(f"loaded the fitted model {checkpoint}", flush=True)
            return model, 0.0
        print(f"resuming {checkpoint} at iteration {model.iteration}", flush=True)
    if isinstance(model, TrainedModel) and checkpoint:
        fit_options.update(checkpoint=checkpoint, checkpoint_every=args.checkpoint_every)
    model, fit_s = fit_model(model, train, device=args.device, num_workers=args.num_workers, fit_options=fit_options)
    if checkpoint and not isinstance(model, TrainedModel) and distributed.rank(group) == 0:
        model.save(checkpoint)
    return model, fit_s


def _calibrated(model, predictions: list[tuple], protocol: str, source: str) -> dict:
    """Store on ``model`` (and return) :func:`fastad.metrics.calibration.calibrate` of its test-set
    ``predictions`` (:func:`fastad.engine.predict` tuples, one per class scored; every rank of a
    data-parallel run holds them all), with the protocol its images were resized by."""
    import torch

    from .metrics.calibration import calibrate

    scores, maps, labels, masks, has_mask = (torch.cat(parts) for parts in zip(*predictions))
    model.calibration = {**calibrate(scores, labels, maps, masks, has_mask), "protocol": protocol, "source": source}
    return model.calibration


# -- the jobs of a run --------------------------------------------------------------------------------------------
@dataclass
class Group:
    """One (model, dataset) of a run: its arguments and datasets, and the settings that a finished
    job file must match to be reused."""

    model: str
    data: str
    label: str
    kwargs: dict
    described: dict
    protocol: object
    first: object
    sets: list
    skipped: dict
    settings: dict
    title: str
    scored: list = field(default_factory=list)  # a unified model's class predictions, for its calibration


def _groups(args, ctx, many_data: bool) -> list[Group]:
    """Every (model, dataset) of the run, data-major: its recipe, protocol, first model (whose
    transform sizes the data), validated and cached datasets."""
    import torch

    from .data.protocols import protocol_for

    quiet = ctx.rank != 0
    sweep = len(args.models) > 1 or many_data
    groups = []
    for data, label in zip(args.data, dataset_labels(args.data)):
        for model_name in args.models:
            user = dict(args.model_args[model_name])
            kwargs, described = _with_recipe(model_name, data, args.setting, user, args.no_recipe)
            protocol = protocol_for(model_name, args.protocol)
            described["protocol"] = protocol.describe()
            torch.manual_seed(args.seed)  # torch seeds itself randomly per process: a run is reproducible only seeded
            first = _build(model_name, kwargs)
            if sweep and not quiet:
                print(f"== {model_name} on {data}", flush=True)
            sets = _datasets(data, args.classes, first.transform(args.protocol), args.data_options)
            sets, skipped = _check_data(sets, args.skip_bad_images, quiet=quiet)
            sets = _cache_sets(args, sets, ctx)
            if not quiet:
                print(f"recipe: {recipe_line(described)}", flush=True)
            # what a finished job file must match to be reused (a run with other settings never mixes in)
            settings = {"model": model_name, "config": first.config, "data": data, "data_opt": args.data_opt,
                        "setting": args.setting, "seed": args.seed, "skip_bad_images": args.skip_bad_images,
                        "protocol": args.protocol, "select_on_test": args.select_on_test}
            groups.append(Group(model_name, data, label, kwargs, described, protocol, first, sets, skipped, settings,
                                f"fastad {model_name} on {data} ({args.setting})"))
    return groups


def _balance(sizes: list[int], n: int) -> list[int]:
    """Shard of each job for ``--shard I/N``: largest first, each to the least loaded shard (the same
    answer in every process)."""
    load, owner = [0] * n, [0] * len(sizes)
    for j in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        owner[j] = min(range(n), key=lambda s: (load[s], s))
        load[owner[j]] += max(1, sizes[j])
    return owner


def _run_title(models: list[str], data: list[str], setting: str) -> str:
    return f"fastad sweep: {', '.join(models)} on {', '.join(data)} ({setting})"


def merge(out: str) -> list[dict]:
    """Build ``results.json`` / ``results.md`` (and the report, if the run asked for one) in ``out``
    from the finished jobs under ``out/jobs/`` (written by ``--parallel jobs`` or ``--shard``), rows
    by dataset, model and class; returns the rows."""
    folder = os.path.join(out, JOBS)
    files = sorted(Path(folder).glob("*.json")) if os.path.isdir(folder) else []
    if not files:
        raise UsageError(f"fastad merge: no finished jobs under {folder}")
    jobs = [json.loads(f.read_text()) for f in files]
    key = [j.get("run", j.get("settings")) for j in jobs]  # files of an older fastad: their settings
    if any(k != key[0] for k in key):
        raise UsageError(f"fastad merge: {folder} holds jobs of runs with different settings; merge each run's "
                         "folder on its own")
    run = jobs[0].get("run") or {}
    rank = {m: i for i, m in enumerate(run.get("models", []))}
    order = {d: i for i, d in enumerate(run.get("data", []))}
    jobs.sort(key=lambda j: (order.get(j["settings"]["data"], 0), rank.get(j["settings"]["model"], 0), j["row"]["class"]))
    rows = [j["row"] for j in jobs]
    titles = {(r["model"], r.get("dataset", "data")): j["title"] for j, r in zip(jobs, rows)}
    earlier = os.path.join(out, "results.json")
    if os.path.exists(earlier) and json.loads(Path(earlier).read_text()) != rows:
        keep_previous_results(out)  # another run's results: kept, not overwritten
    single = len(titles) == 1
    title = jobs[0]["title"] if single else _run_title(run.get("models", []), run.get("data", []), run.get("setting", ""))
    write_results(out, rows, title, titles, report=any(j.get("report") for j in jobs))
    return rows


def _parallel_mode(args, world: int, jobs: int) -> str:
    if args.parallel == "auto":
        return "jobs" if jobs >= world else "data"
    return args.parallel


def run(args) -> int:
    """``fastad run``: every (model, dataset, class) job of the arguments (``args``: the parsed command
    line, ``args.models`` a list of model names, ``args.data`` a list of data specs,
    ``args.model_args`` each model's arguments); the writing process holds ``--out`` exclusively."""
    import contextlib

    with contextlib.ExitStack() as held:
        return _run(args, held)


def _run(args, held) -> int:
    import torch
    from torch.utils.data import ConcatDataset

    from . import distributed
    from .engine import score
    from .faults import atomic_write, check_writable, exclusive_folder
    from .metrics.calibration import calibrate
    from .overlays import save_overlays

    ctx = distributed.init(args.device)
    group = distributed.world() if ctx.world > 1 else None
    args.device = str(ctx.device)
    if ctx.rank == 0:
        print(f"device {_device_line(ctx.device)}", flush=True)
    shard = args.shard
    if shard and ctx.world > 1:
        raise UsageError("--shard I/N splits the jobs between separate commands (Slurm arrays); under torchrun use "
                         "--parallel jobs instead")
    if args.select_on_test is not None:
        if args.select_on_test < 1:
            raise UsageError(f"--select-on-test expects a positive number of iterations, got {args.select_on_test}")
        if args.setting != "separate" or ctx.world > 1 or args.checkpoint_dir:
            raise UsageError("--select-on-test evaluates one class's model during its training: it runs with "
                             "--setting separate, in one process, without --checkpoint-dir")
    for folder, flag in ((args.out, "--out"), (args.checkpoint_dir, "--checkpoint-dir")):
        if folder:  # before hours of work whose results could not be written
            check_writable(folder, flag)
    many_data = len(args.data) > 1
    sweep = len(args.models) > 1 or many_data
    groups = _groups(args, ctx, many_data)
    jobs = [(g, j) for g in groups for j in range(len(g.sets))]
    quiet = ctx.rank != 0
    unified = args.setting == "unified"
    mode = "serial" if ctx.world == 1 and not shard else "shard" if shard else \
        _parallel_mode(args, ctx.world, len(groups) if unified else len(jobs))
    if mode in ("jobs", "shard") and not args.out:
        raise UsageError(f"--{'shard' if shard else 'parallel jobs'} writes each finished job under --out; pass --out DIR")
    if mode in ("serial", "data") and args.out and not quiet:
        # a second run into the same --out stops here with one line, before it touches a file; jobs
        # and shards write one file per job atomically and share --out by design
        held.enter_context(exclusive_folder(args.out, "--out"))
        keep_previous_results(args.out)
    common = dict(batch_size=args.batch_size, num_workers=args.num_workers)

    def build(g: Group):  # each class's model starts from the same seed, whatever ran (or was resumed) before it
        model, g.first = g.first, None  # the group's first model is reused, then a fresh one per class
        if model is None:
            torch.manual_seed(args.seed)
            model = _build(g.model, g.kwargs)
        return model

    def tag(g: Group, name: str) -> str:  # job files and checkpoints: MODEL-CLASS, MODEL-DATASET-CLASS for several datasets
        return f"{g.model}-{g.label}-{name}" if many_data else f"{g.model}-{name}"

    def checkpoint(g: Group, name: str) -> str | None:
        return os.path.join(args.checkpoint_dir, f"{tag(g, name)}.safetensors") if args.checkpoint_dir else None

    title = groups[0].title if not sweep else _run_title(args.models, args.data, args.setting)
    titles = {(g.model, g.label): g.title for g in groups}
    run_key = {"models": args.models, "data": args.data,
               **{k: v for k, v in groups[0].settings.items() if k not in ("model", "config", "data")}}
    say = (lambda msg: print(f"[rank {ctx.rank}] {msg}", flush=True)) if mode == "jobs" else \
        (lambda msg: None) if quiet else (lambda msg: print(msg, flush=True))
    job_group = group if mode == "data" else None
    fitted = {}

    def run_job(g: Group, name, train, test_set) -> dict | None:
        """Fit (or reuse the unified model) and score one class; the row on the rank that writes it."""
        key = (g.model, g.label)
        if unified and key not in fitted:
            fitted[key] = _fit(args, lambda: build(g), ConcatDataset([tr for _, tr, _ in g.sets]),
                               checkpoint(g, "unified"), job_group)
        selection = "last"
        if args.select_on_test:
            model, fit_s, metrics, predictions, selection = _select_on_test(args, lambda: build(g), train, test_set,
                                                                            g.protocol, say)
        else:
            model, fit_s = fitted[key] if unified else _fit(args, lambda: build(g), train, checkpoint(g, name), job_group)
            metrics, predictions = score(model, test_set, group=job_group, eval_size=g.protocol.eval_size, **common)
        # the thresholds and statistics `fastad predict` labels new images with, saved with the model
        path = checkpoint(g, "unified" if unified else name)
        if path and unified:  # one model for every class: calibrated on all of them
            g.scored.append(predictions)
            if len(g.scored) == len(g.sets):
                _calibrated(model, g.scored, args.protocol, f"{g.data}: the test sets of all classes")
                model.save(path)
                g.scored = []
        elif path:
            _calibrated(model, [predictions], args.protocol, f"{g.data}: the test set of {name}")
            model.save(path)
        if metrics is None:  # data parallel: rank 0 holds the metrics
            return None
        scores, maps, labels, *_ = predictions
        res = {"class": name, "model": g.model, "dataset": g.label, "data": g.data, "setting": args.setting,
               "n_train": len(train), "fit_s": fit_s, "image_size": list(model.image_size),
               "resize_size": list(model.resize_size), **metrics,
               "image_threshold": calibrate(scores, labels)["image_threshold"], "skipped_images": g.skipped.get(name, []),
               **g.described, "selection": selection}
        if args.out and args.overlays:
            prefix = f"{g.model}-{g.label}-{name}" if sweep else name
            paths = save_overlays(test_set, scores, maps, labels, os.path.join(args.out, "overlays"), prefix, args.overlays)
            res["overlays"] = [os.path.relpath(p, args.out) for p in paths]
        if args.out and args.report:
            job_plot(os.path.join(args.out, "plots", f"{job_name(res)}.png"), scores, labels, res["image_threshold"],
                     f"{g.model} on {g.label}: {name}")
        say((f"{g.model} on {g.label}: " if sweep else "") +
            f"{name}: image AUROC {_fmt(res['image_auroc'])}  pixel AUROC {_fmt(res['pixel_auroc'])}  "
            f"AUPRO {_fmt(res['pixel_aupro'])}  mAD {_fmt(res['mad'])}  "
            f"fit {res['fit_s']:.1f}s  inference {res['images_per_s']:.1f} img/s")
        return res

    if mode in ("serial", "data"):
        rows = []
        for g, j in jobs:
            name, train, test_set = g.sets[j]
            res = run_job(g, name, train, test_set)
            if res is not None:
                rows.append(res)
                if args.out:  # after every job: a sweep stopped later keeps the jobs already done
                    write_results(args.out, rows, title, titles, report=args.report)
        return 0

    # one whole job per process: --shard I/N picks a balanced share, torchrun ranks claim jobs from the c10d store
    order = sorted(range(len(jobs)), key=lambda i: (-len(jobs[i][0].sets[jobs[i][1]][1]), jobs[i][0].sets[jobs[i][1]][0], i))
    if shard:
        owner = _balance([len(g.sets[j][1]) for g, j in jobs], shard[1])
        claims = iter([i for i in order if owner[i] == shard[0]])
    else:
        store = distributed.store()
        key = f"fastad-jobs/{os.path.abspath(args.out)}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        claims = _claim(store, key, order)
    os.makedirs(os.path.join(args.out, JOBS), exist_ok=True)
    for i in claims:
        g, j = jobs[i]
        name, train, test_set = g.sets[j]
        path = os.path.join(args.out, JOBS, f"{tag(g, name)}.json")
        if os.path.exists(path):
            if json.loads(Path(path).read_text()).get("settings") != g.settings:
                raise UsageError(f"{path} was written by a run with other settings; use another --out or delete it")
            say(f"{tag(g, name)}: done by an earlier run ({path})")
            continue
        res = run_job(g, name, train, test_set)
        text = json.dumps({"title": g.title, "settings": g.settings, "run": run_key, "report": args.report,
                           "row": plain(res)}, indent=2)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    if shard:
        print(f"shard {shard[0]}/{shard[1]} done; when every shard is, run: fastad merge {args.out}", flush=True)
        return 0
    distributed.wait_all(store, key, ctx.rank, ctx.world)
    if ctx.rank == 0:
        merge(args.out)
        print(f"wrote {os.path.join(args.out, 'results.json')} ({len(jobs)} jobs on {ctx.world} processes)", flush=True)
    return 0


def _claim(store, key: str, order: list[int]):
    """Job indices this process claims from the shared counter in the c10d store, until none is left."""
    while True:
        j = store.add(key, 1) - 1
        if j >= len(order):
            return
        yield order[j]


def pretrain(args) -> int:
    """ADPretrain's projector pretraining on every labelled image (train and test splits) of the
    chosen classes, written to the ``--out`` checkpoint (resumed from it if it exists)."""
    from torch.utils.data import ConcatDataset

    from .distributed import resolve_device
    from .faults import check_writable
    from .models import load_checkpoint

    args.device = str(resolve_device(args.device))
    print(f"device {_device_line(args.device)}", flush=True)
    kwargs, applied = _with_recipe("adpretrain", args.data, "pretrain", args.model_args["adpretrain"], args.no_recipe)
    print(f"recipe: {recipe_line(applied)}", flush=True)
    check_writable(os.path.dirname(os.path.abspath(args.out)), "--out's folder")
    if os.path.exists(args.out):
        model = load_checkpoint(args.out, device=args.device, **kwargs)
        print(f"resuming {args.out} at iteration {model.iteration}", flush=True)
    else:
        import torch

        torch.manual_seed(args.seed)
        model = _build("adpretrain", kwargs).to(args.device)
    sets = _datasets(args.data, args.classes, model.transform(), args.data_options)
    sets, _ = _check_data(sets, args.skip_bad_images)
    sets = _cache_sets(args, sets)
    data = ConcatDataset([ds for _, train, test in sets for ds in (train, test)])
    model.fit(data, checkpoint=args.out, checkpoint_every=args.checkpoint_every, num_workers=args.num_workers,
              on_nan=args.on_nan)
    losses = model.loss_history
    nan = math.nan
    print(f"pretrained {model.iteration} iterations on {len(data)} images of {len(sets)} classes; "
          f"loss {losses[0] if losses else nan:.4f} -> {losses[-1] if losses else nan:.4f}; "
          f"wrote {args.out}", flush=True)
    return 0
