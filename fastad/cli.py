"""The ``fastad`` command line: ``fastad run`` fits and evaluates a model (default: PatchCore with
the offline EfficientNet-Lite0 backbone on the embedded synthetic data); ``fastad bench`` runs the
benchmark suites; ``fastad pretrain`` pretrains ADPretrain's projectors."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path


class UsageError(Exception):
    """A user error: ``main`` prints it as one line ``fastad: error: ...`` and exits with 2."""


KINDS = ("synthetic", "mvtec", "mpdd", "btad", "visa", "realiad", "mtd", "folder", "imagefolder", "list")


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
    import inspect

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


def _fmt(v):
    return "n/a" if v is None or math.isnan(v) else f"{100 * v:.2f}"


def _mean(values: list[float]) -> float:
    defined = [v for v in values if v is not None and not math.isnan(v)]
    return sum(defined) / len(defined) if defined else math.nan


def results_markdown(rows: list[dict], title: str) -> str:
    """Per-class table of the seven metrics and mAD (percent), with a mean row (over the classes
    where a metric exists) and one line per class whose pixel metrics are missing or partial."""
    from .metrics import METRICS

    cols = [*METRICS, "mad"]
    head = ["class", "I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO", "mAD", "fit s", "img/s"]
    lines = [f"# {title}", ""]
    if rows and "protocol" in rows[0]:  # what the numbers are comparable with
        lines += [f"- recipe: {_recipe_line(rows[0])}", f"- protocol: {rows[0]['protocol']}"]
        chosen = [r for r in rows if r.get("selection", "last") != "last"]
        lines += [f"- checkpoint: **{chosen[0]['selection'].split(':')[0]}** (see the notes below)" if chosen else
                  "- checkpoint: the last iteration (no test-set selection)", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["class"], *(_fmt(r[c]) for c in cols), f"{r['fit_s']:.1f}", f"{r['images_per_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if len(rows) > 1:
        mean = [_fmt(_mean([r[c] for r in rows])) for c in cols]
        lines.append("| **mean** | " + " | ".join(mean) + " | | |")
    notes = [f"- {r['class']}: {r['pixel_note']}; mAD is the mean of the {r.get('mad_of', 'image metrics')}"
             for r in rows if r.get("pixel_note")]
    notes += [f"- {r['class']}: {r['selection']}" for r in rows if r.get("selection", "last") != "last"]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


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


def _check_types(name: str, kwargs: dict) -> None:
    """A ``--set`` value whose JSON type cannot be the argument's (its default's type; a number for
    a float, a list for an int size or a tuple) is a one-line error naming the argument."""
    import inspect

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


def _plain(row: dict) -> dict:
    """A results row as JSON can hold it: NaN (an undefined metric) becomes null."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def _recipe_line(row: dict) -> str:
    """What the run applied: the recipe (or the model's defaults) and the user's --set arguments."""
    args = ", ".join(f"{k}={json.dumps(v)}" for k, v in row.get("recipe_args", {}).items())
    text = f"{row['recipe']} ({args})" if row.get("recipe") else "none for this model, data and setting: the model's defaults"
    user = ", ".join(f"{k}={json.dumps(v)}" for k, v in row.get("set_args", {}).items())
    return text + (f"; --set {user}" + (" (wins over the recipe)" if row.get("recipe") else "") if user else "")


def _with_recipe(model: str, data: str, setting: str, user: dict, no_recipe: bool) -> tuple[dict, dict]:
    """(model arguments, what was applied for :func:`_recipe_line`): the recipe of (model, the data
    kind of ``data``, setting) unless ``no_recipe``, updated by the user's ``--set`` arguments."""
    from .recipes import recipe_for

    recipe = None if no_recipe else recipe_for(model, data.partition(":")[0], setting)
    applied = {"recipe": recipe["source"] if recipe else None, "recipe_args": recipe["args"] if recipe else {},
               "set_args": user}
    return {**applied["recipe_args"], **user}, applied


def _select_on_test(args, build, train, test_set, protocol, say):
    """FOD's / RLR's / ADPretrain's checkpoint selection: train in steps of ``--select-on-test`` iterations,
    score the **test set** after each, keep the metrics of the best image AUROC (the earliest on ties).
    Returns (model trained to the end, fit seconds, best metrics, their predictions, the selection label)."""
    import time

    from .engine import score
    from .models.training import TrainedModel

    model = build().to(args.device)
    if not isinstance(model, TrainedModel):
        raise UsageError(f"--select-on-test applies to trained models; {args.model} is fitted in one pass")
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


def _write_results(out: str, rows: list[dict], title: str) -> None:
    """results.json and results.md, each written atomically (a killed or failed write keeps the old file)."""
    from .faults import atomic_write

    text = json.dumps([_plain(r) for r in rows], indent=2)
    atomic_write(os.path.join(out, "results.json"), lambda tmp: Path(tmp).write_text(text))
    table = results_markdown(rows, title)
    atomic_write(os.path.join(out, "results.md"), lambda tmp: Path(tmp).write_text(table))


def _keep_previous_results(out: str) -> None:
    """Rename the results.json / results.md of an earlier run in ``out`` to ``NAME.~N~`` (the next
    free N, as ``cp --backup=numbered``) and say so: a new run never overwrites them silently."""
    for name in ("results.json", "results.md"):
        path = os.path.join(out, name)
        if os.path.exists(path):
            n = 1
            while os.path.exists(f"{path}.~{n}~"):
                n += 1
            os.replace(path, f"{path}.~{n}~")
            print(f"kept the earlier {name} as {name}.~{n}~", flush=True)


def _fit(args, build, train, checkpoint: str | None, group=None):
    """(fitted model, fit seconds): a fresh model from ``build()``, or with ``checkpoint`` the model
    saved there (written by an earlier run with the same configuration), trained on to its recipe's
    end (exact resume) or, for an embedding model, used as it is; the fitted model is saved there.
    With ``group`` every rank fits the one model together (data parallel)."""
    import inspect

    from . import distributed
    from .engine import fit_model
    from .models import load_checkpoint
    from .models.base import checkpoint_config
    from .models.training import TrainedModel

    model = build()
    fit_options = {"on_nan": args.on_nan} if isinstance(model, TrainedModel) else {}
    if distributed.active(group):
        if "group" not in inspect.signature(model.fit).parameters:
            raise UsageError(f"{args.model} has no data-parallel fit; run one job per process (--parallel jobs)")
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


JOBS = "jobs"  # --out's folder of finished (model, class) jobs: one JSON file each


def _job_path(out: str, model: str, name: str) -> str:
    return os.path.join(out, JOBS, f"{model}-{name}.json")


def _balance(sizes: list[int], n: int) -> list[int]:
    """Shard of each job for ``--shard I/N``: largest first, each to the least loaded shard (the same
    answer in every process)."""
    load, owner = [0] * n, [0] * len(sizes)
    for j in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        owner[j] = min(range(n), key=lambda s: (load[s], s))
        load[owner[j]] += max(1, sizes[j])
    return owner


def merge(out: str) -> list[dict]:
    """Build ``results.json`` / ``results.md`` in ``out`` from the finished jobs under ``out/jobs/``
    (written by ``--parallel jobs`` or ``--shard``), rows in class order; returns the rows."""
    folder = os.path.join(out, JOBS)
    files = sorted(Path(folder).glob("*.json")) if os.path.isdir(folder) else []
    if not files:
        raise UsageError(f"fastad merge: no finished jobs under {folder}")
    jobs = [json.loads(f.read_text()) for f in files]
    if any(j.get("settings") != jobs[0].get("settings") for j in jobs):
        raise UsageError(f"fastad merge: {folder} holds jobs of runs with different settings; merge each run's "
                         "folder on its own")
    rows = sorted((j["row"] for j in jobs), key=lambda r: r["class"])
    earlier = os.path.join(out, "results.json")
    if os.path.exists(earlier) and json.loads(Path(earlier).read_text()) != rows:
        _keep_previous_results(out)  # another run's results: kept, not overwritten
    _write_results(out, rows, jobs[0]["title"])
    return rows


def _parallel_mode(args, world: int, jobs: int) -> str:
    if args.parallel == "auto":
        return "jobs" if jobs >= world else "data"
    return args.parallel


def run(args) -> int:
    """``fastad run``: the jobs of the arguments; the writing process holds ``--out`` exclusively."""
    import contextlib

    with contextlib.ExitStack() as held:
        return _run(args, held)


def _run(args, held) -> int:
    import torch
    from torch.utils.data import ConcatDataset

    from . import distributed
    from .engine import score
    from .faults import atomic_write, check_writable, exclusive_folder
    from .overlays import save_overlays

    ctx = distributed.init(args.device)
    group = distributed.world() if ctx.world > 1 else None
    args.device = str(ctx.device)
    if ctx.rank == 0:
        print(f"device {_device_line(ctx.device)}", flush=True)
    shard = _parse_shard(args.shard)
    if shard and ctx.world > 1:
        raise UsageError("--shard I/N splits the jobs between separate commands (Slurm arrays); under torchrun use "
                         "--parallel jobs instead")
    from .data.protocols import protocol_for

    user = _runtime_args(args, _model_args(args.set))
    if args.model == "patchcore" and args.coreset_ratio:
        user["coreset_ratio"] = args.coreset_ratio
    kwargs, described = _with_recipe(args.model, args.data, args.setting, user, args.no_recipe)
    protocol = protocol_for(args.model, args.protocol)
    described["protocol"] = protocol.describe()
    if args.select_on_test is not None:
        if args.select_on_test < 1:
            raise UsageError(f"--select-on-test expects a positive number of iterations, got {args.select_on_test}")
        if args.setting != "separate" or ctx.world > 1 or args.checkpoint_dir:
            raise UsageError("--select-on-test evaluates one class's model during its training: it runs with "
                             "--setting separate, in one process, without --checkpoint-dir")
    for folder, flag in ((args.out, "--out"), (args.checkpoint_dir, "--checkpoint-dir")):
        if folder:  # before hours of work whose results could not be written
            check_writable(folder, flag)
    torch.manual_seed(args.seed)  # torch seeds itself randomly per process: a run is reproducible only seeded
    first = _build(args.model, kwargs)  # its transform sizes the data
    sets = _datasets(args.data, args.classes, first.transform(args.protocol), _model_args(args.data_opt, "--data-opt"))
    quiet = ctx.rank != 0
    sets, skipped = _check_data(sets, args.skip_bad_images, quiet=quiet)
    sets = _cache_sets(args, sets, ctx)
    unified = args.setting == "unified"
    mode = "serial" if ctx.world == 1 and not shard else "shard" if shard else \
        _parallel_mode(args, ctx.world, 1 if unified else len(sets))
    if mode in ("jobs", "shard") and not args.out:
        raise UsageError(f"--{'shard' if shard else 'parallel jobs'} writes each finished job under --out; pass --out DIR")
    if mode in ("serial", "data") and args.out and not quiet:
        # a second run into the same --out stops here with one line, before it touches a file; jobs
        # and shards write one file per job atomically and share --out by design
        held.enter_context(exclusive_folder(args.out, "--out"))
        _keep_previous_results(args.out)
    common = dict(batch_size=args.batch_size, num_workers=args.num_workers)
    built = iter([first])  # the first model is reused, then a fresh one per class

    def build():  # each class's model starts from the same seed, whatever ran (or was resumed) before it
        model = next(built, None)
        if model is None:
            torch.manual_seed(args.seed)
            model = _build(args.model, kwargs)
        return model

    def checkpoint(name: str) -> str | None:
        return os.path.join(args.checkpoint_dir, f"{args.model}-{name}.safetensors") if args.checkpoint_dir else None

    title = f"fastad {args.model} on {args.data} ({args.setting})"
    # what a finished job file must match to be reused (a run with other settings never mixes in)
    settings = {"model": args.model, "config": first.config, "data": args.data, "data_opt": args.data_opt,
                "setting": args.setting, "seed": args.seed, "skip_bad_images": args.skip_bad_images,
                "protocol": args.protocol, "select_on_test": args.select_on_test}
    if not quiet:
        print(f"recipe: {_recipe_line(described)}", flush=True)
    say = (lambda msg: print(f"[rank {ctx.rank}] {msg}", flush=True)) if mode == "jobs" else \
        (lambda msg: None) if quiet else (lambda msg: print(msg, flush=True))
    job_group = group if mode == "data" else None
    fitted = {}

    def run_job(name, train, test_set) -> dict | None:
        """Fit (or reuse the unified model) and score one class; the row on the rank that writes it."""
        if unified and "unified" not in fitted:
            fitted["unified"] = _fit(args, build, ConcatDataset([tr for _, tr, _ in sets]), checkpoint("unified"), job_group)
        selection = "last"
        if args.select_on_test:
            model, fit_s, metrics, predictions, selection = _select_on_test(args, build, train, test_set, protocol, say)
        else:
            model, fit_s = fitted["unified"] if unified else _fit(args, build, train, checkpoint(name), job_group)
            metrics, predictions = score(model, test_set, group=job_group, eval_size=protocol.eval_size, **common)
        if metrics is None:  # data parallel: rank 0 holds the metrics
            return None
        scores, maps, labels, *_ = predictions
        res = {"class": name, "model": args.model, "setting": args.setting, "n_train": len(train), "fit_s": fit_s,
               "image_size": list(model.image_size), "resize_size": list(model.resize_size), **metrics,
               "skipped_images": skipped.get(name, []), **described, "selection": selection}
        if args.out and args.overlays:
            save_overlays(test_set, scores, maps, labels, os.path.join(args.out, "overlays"), name, args.overlays)
        say(f"{name}: image AUROC {_fmt(res['image_auroc'])}  pixel AUROC {_fmt(res['pixel_auroc'])}  "
            f"AUPRO {_fmt(res['pixel_aupro'])}  mAD {_fmt(res['mad'])}  "
            f"fit {res['fit_s']:.1f}s  inference {res['images_per_s']:.1f} img/s")
        return res

    if mode in ("serial", "data"):
        rows = []
        for name, train, test_set in sets:
            res = run_job(name, train, test_set)
            if res is not None:
                rows.append(res)
                if args.out:  # after every class: a sweep stopped later keeps the classes already done
                    _write_results(args.out, rows, title)
        return 0

    # one whole job per process: --shard I/N picks a balanced share, torchrun ranks claim jobs from the c10d store
    order = sorted(range(len(sets)), key=lambda j: (-len(sets[j][1]), sets[j][0]))  # largest training set first
    if shard:
        owner = _balance([len(tr) for _, tr, _ in sets], shard[1])
        claims = iter([j for j in order if owner[j] == shard[0]])
    else:
        store = distributed.store()
        key = f"fastad-jobs/{os.path.abspath(args.out)}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        claims = _claim(store, key, order)
    os.makedirs(os.path.join(args.out, JOBS), exist_ok=True)
    for j in claims:
        name, train, test_set = sets[j]
        path = _job_path(args.out, args.model, name)
        if os.path.exists(path):
            if json.loads(Path(path).read_text()).get("settings") != settings:
                raise UsageError(f"{path} was written by a run with other settings; use another --out or delete it")
            say(f"{name}: done by an earlier run ({path})")
            continue
        res = run_job(name, train, test_set)
        text = json.dumps({"title": title, "settings": settings, "row": _plain(res)}, indent=2)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    if shard:
        print(f"shard {shard[0]}/{shard[1]} done; when every shard is, run: fastad merge {args.out}", flush=True)
        return 0
    distributed.wait_all(store, key, ctx.rank, ctx.world)
    if ctx.rank == 0:
        merge(args.out)
        print(f"wrote {os.path.join(args.out, 'results.json')} ({len(sets)} jobs on {ctx.world} processes)", flush=True)
    return 0


def _claim(store, key: str, order: list[int]):
    """Job indices this process claims from the shared counter in the c10d store, until none is left."""
    while True:
        j = store.add(key, 1) - 1
        if j >= len(order):
            return
        yield order[j]


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


def pretrain(args) -> int:
    """ADPretrain's projector pretraining on every labelled image (train and test splits) of the
    chosen classes, written to the ``--out`` checkpoint (resumed from it if it exists)."""
    from torch.utils.data import ConcatDataset

    from .faults import check_writable
    from .models import load_checkpoint

    from .distributed import resolve_device

    args.device = str(resolve_device(args.device))
    print(f"device {_device_line(args.device)}", flush=True)
    kwargs, applied = _with_recipe("adpretrain", args.data, "pretrain", _runtime_args(args, _model_args(args.set)),
                                   args.no_recipe)
    print(f"recipe: {_recipe_line(applied)}", flush=True)
    check_writable(os.path.dirname(os.path.abspath(args.out)), "--out's folder")
    if os.path.exists(args.out):
        model = load_checkpoint(args.out, device=args.device, **kwargs)
        print(f"resuming {args.out} at iteration {model.iteration}", flush=True)
    else:
        import torch

        torch.manual_seed(args.seed)
        model = _build("adpretrain", kwargs).to(args.device)
    sets = _datasets(args.data, args.classes, model.transform(), _model_args(args.data_opt, "--data-opt"))
    sets, _ = _check_data(sets, args.skip_bad_images)
    sets = _cache_sets(args, sets)
    data = ConcatDataset([ds for _, train, test in sets for ds in (train, test)])
    model.fit(data, checkpoint=args.out, checkpoint_every=args.checkpoint_every, num_workers=args.num_workers,
              on_nan=args.on_nan)
    losses = model.loss_history
    print(f"pretrained {model.iteration} iterations on {len(data)} images of {len(sets)} classes; "
          f"loss {losses[0] if losses else float('nan'):.4f} -> {losses[-1] if losses else float('nan'):.4f}; "
          f"wrote {args.out}", flush=True)
    return 0


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


def _device_line(device) -> str:
    """The device a run uses and the kernel families that run there (fastad.ops.dispatch.describe)."""
    from .ops import dispatch

    return dispatch.describe(device)


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
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common.add_argument("--skip-bad-images", action="store_true",
                        help="skip missing/unreadable images and masks (listed in a warning and in results.json) "
                             "instead of stopping")
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
    common.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="the encoders and trainable networks under autocast in bfloat16 / float16 (weights, "
                             "optimizer states, losses, maps, scores and metrics stay float32; fp16 trains with a "
                             "dynamic loss scale); default fp32 (see the README: Speed)")
    common.add_argument("--compile", nargs="?", const=True, default=False, metavar="MODE",
                        help="torch.compile the encoders and trainable networks, for scoring (MODE: torch's "
                             "reduce-overhead = CUDA graphs for fixed-size batches, or max-autotune) and training "
                             "steps (default mode); a network that fails to compile runs eager with a warning; same "
                             "results within float32 rounding")
    r = sub.add_parser("run", help="fit and evaluate a model", parents=[common])
    from .models import MODELS

    r.add_argument("--model", default="patchcore", choices=sorted(MODELS))
    r.add_argument("--data", default="synthetic", help=f"synthetic or KIND:ROOT, KIND in {', '.join(KINDS[1:])} "
                   "(list: KIND:FILE, a CSV or JSON list)")
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
                   help="model argument, repeatable, e.g. --set iterations=5000 --set weights=/w/dinov2.pth")
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
            rows = merge(args.out)
            print(f"wrote {os.path.join(args.out, 'results.json')} and results.md ({len(rows)} jobs)", flush=True)
            return 0
        return pretrain(args) if args.command == "pretrain" else run(args)
    except (UsageError, ValueError, TypeError, OSError, FloatingPointError, torch.cuda.OutOfMemoryError) as exc:
        if args.debug:
            raise
        from . import distributed

        where = f"[rank {distributed.rank(distributed.world())}] " if distributed.active(distributed.world()) else ""
        print(f"fastad: error: {where}{_one_line(exc)}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
