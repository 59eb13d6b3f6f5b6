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

    from .data import ImageTransform, SyntheticDataset

    options = options or {}
    kind, _, path = spec.partition(":")
    if kind not in KINDS:
        raise SystemExit(f"unknown data kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind == "synthetic":
        if options or (classes and classes != ["synthetic"]):
            raise SystemExit("fastad: error: the synthetic data has one class, 'synthetic', and no --data-opt options")
        return [("synthetic", SyntheticDataset("train", 32, size=transform.crop), SyntheticDataset("test", 32, size=transform.crop))]
    if not path:
        raise SystemExit(f"--data {spec!r}: expected KIND:PATH, e.g. mvtec:/data/mvtec or mtd:/data/mtd")
    root = Path(path)
    if kind == "list" and not root.is_file():
        raise SystemExit(f"--data {spec!r}: {root} is not a file (a CSV or JSON list)")
    if kind != "list" and not root.is_dir():
        raise SystemExit(f"--data {spec!r}: {root} is not a folder")
    load, signature_of = _loaders()[kind]
    accepted = sorted(set(inspect.signature(signature_of).parameters) - FIXED_ARGUMENTS)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise SystemExit(f"fastad: error: --data-opt {', '.join(unknown)} is not an option of {kind} data; "
                         f"its options: {', '.join(accepted) or 'none'}")
    t = ImageTransform(transform.crop, transform.crop) if kind == "mtd" else transform
    try:
        available = _class_names(kind, root, options)
        names = classes or available
        if not names:
            raise SystemExit(f"no {kind} classes found under {root}")
        missing = [c for c in names if c not in available]
        if missing:
            raise SystemExit(f"fastad: error: --classes {', '.join(missing)} not found in {root}; available: {', '.join(available)}")
        return [(c, load(root, c, "train", t, **options), load(root, c, "test", t, **options)) for c in names]
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"fastad: error: --data {spec}: {exc}") from None


def _check_data(sets) -> None:
    """The validation pass before any model work: print what each split holds, then stop with every
    problem of every file list at once (missing / unreadable images and masks, mask sizes)."""
    problems = []
    for name, *splits in sets:
        parts = []
        for split, ds in zip(("train", "test"), splits):
            if hasattr(ds, "counts"):
                c = ds.counts()
                parts.append(f"{split} {c['normal']} normal, {c['anomalous']} anomalous "
                             f"({c['anomalous_with_mask']} with pixel masks)")
                problems += ds.validate()
            else:
                labels = ds.labels
                parts.append(f"{split} {int((labels == 0).sum())} normal, {int((labels > 0).sum())} anomalous")
        print(f"{name}: " + "; ".join(parts), flush=True)
    if problems:
        raise SystemExit(f"fastad: error: {len(problems)} problem(s) in the data:\n  " + "\n  ".join(problems))


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
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["class"], *(_fmt(r[c]) for c in cols), f"{r['fit_s']:.1f}", f"{r['images_per_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if len(rows) > 1:
        mean = [_fmt(_mean([r[c] for r in rows])) for c in cols]
        lines.append("| **mean** | " + " | ".join(mean) + " | | |")
    notes = [f"- {r['class']}: {r['pixel_note']}; mAD is the mean of the {r.get('mad_of', 'image metrics')}"
             for r in rows if r.get("pixel_note")]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _model_args(pairs: list[str], flag: str = "--set") -> dict:
    """``KEY=VALUE`` strings -> model keyword arguments; a VALUE that parses as JSON is decoded
    (numbers, true/false, null, lists), anything else stays a string."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _build(name: str, kwargs: dict):
    """The model ``name`` with the ``--set`` arguments; a wrong argument is a one-line error."""
    from .models import create_model

    try:
        return create_model(name, **kwargs)
    except TypeError as exc:  # an unknown keyword
        raise SystemExit(f"fastad: error: --set for {name}: {exc}") from None
    except ValueError as exc:
        raise SystemExit(f"fastad: error: {name}: {exc}") from None


def run(args) -> int:
    from torch.utils.data import ConcatDataset

    from .engine import fit_model, score
    from .overlays import save_overlays

    kwargs = _model_args(args.set)
    if args.model == "patchcore" and args.coreset_ratio:
        kwargs["coreset_ratio"] = args.coreset_ratio
    first = _build(args.model, kwargs)  # its transform sizes the data
    sets = _datasets(args.data, args.classes, first.transform(), _model_args(args.data_opt, "--data-opt"))
    _check_data(sets)
    common = dict(batch_size=args.batch_size, num_workers=args.num_workers)
    unified = None
    if args.setting == "unified":  # one model for all classes, evaluated class by class
        unified = fit_model(first, ConcatDataset([train for _, train, _ in sets]), device=args.device, num_workers=args.num_workers)
    rows = []
    for i, (name, train, test_set) in enumerate(sets):
        # separate: a fresh model per class (the first reuses the one built above)
        model, fit_s = unified or fit_model(first if i == 0 else _build(args.model, kwargs), train, device=args.device,
                                            num_workers=args.num_workers)
        res = {"class": name, "model": args.model, "setting": args.setting, "n_train": len(train), "fit_s": fit_s,
               "image_size": list(model.image_size), "resize_size": list(model.resize_size)}
        metrics, (scores, maps, labels, *_) = score(model, test_set, **common)
        res.update(metrics)
        rows.append(res)
        if args.out and args.overlays:
            save_overlays(test_set, scores, maps, labels, os.path.join(args.out, "overlays"), name, args.overlays)
        print(f"{name}: image AUROC {_fmt(res['image_auroc'])}  pixel AUROC {_fmt(res['pixel_auroc'])}  "
              f"AUPRO {_fmt(res['pixel_aupro'])}  mAD {_fmt(res['mad'])}  "
              f"fit {res['fit_s']:.1f}s  inference {res['images_per_s']:.1f} img/s", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            # NaN (an undefined metric) is not JSON: write null
            json.dump([{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows], f, indent=2)
        title = f"fastad {args.model} on {args.data} ({args.setting})"
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(results_markdown(rows, title))
    return 0


def pretrain(args) -> int:
    """ADPretrain's projector pretraining on every labelled image (train and test splits) of the
    chosen classes, written to the ``--out`` checkpoint (resumed from it if it exists)."""
    from torch.utils.data import ConcatDataset

    from .models import load_checkpoint

    kwargs = _model_args(args.set)
    if os.path.exists(args.out):
        model = load_checkpoint(args.out, device=args.device, **kwargs)
        print(f"resuming {args.out} at iteration {model.iteration}", flush=True)
    else:
        model = _build("adpretrain", kwargs).to(args.device)
    sets = _datasets(args.data, args.classes, model.transform(), _model_args(args.data_opt, "--data-opt"))
    _check_data(sets)
    data = ConcatDataset([ds for _, train, test in sets for ds in (train, test)])
    model.fit(data, checkpoint=args.out, checkpoint_every=args.checkpoint_every, num_workers=args.num_workers)
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
    os.environ["FASTAD_BENCH_DEVICE"] = args.device
    return int(pytest.main([str(folder), "-s", "-q", "-p", "no:cacheprovider", "--benchmark-columns=min,mean,rounds", *extra]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastad", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="fit and evaluate a model")
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
    r.add_argument("--device", default="cpu")
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--num-workers", type=int, default=0)
    r.add_argument("--coreset-ratio", type=float, default=None, help="PatchCore coreset fraction (default 0.1)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="model argument, repeatable, e.g. --set iterations=5000 --set weights=/w/dinov2.pth")
    r.add_argument("--out", default=None, help="folder for results.json, results.md and overlays/")
    r.add_argument("--overlays", type=int, default=4, help="anomaly-map overlay PNGs per class (0: none)")
    p = sub.add_parser("pretrain", help="pretrain ADPretrain's projectors on labelled images (train + test splits); "
                       "then score with --model featurenorm --set pretrained=OUT")
    p.add_argument("--data", default="synthetic", help="synthetic or KIND:ROOT, as for run")
    p.add_argument("--classes", nargs="*", help="classes to use (default: all found under ROOT)")
    p.add_argument("--data-opt", action="append", default=[], metavar="KEY=VALUE", help="loader option, as for run")
    p.add_argument("--out", required=True, help="checkpoint file (.safetensors), resumed if it exists")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="ADPretrain argument, repeatable")
    b = sub.add_parser("bench", help="run the kernel benchmarks (source checkout) and print ratio tables; "
                       "other arguments go to pytest, e.g. -k quantile")
    b.add_argument("--device", default="cpu", help="cpu or cuda")
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        return bench(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return pretrain(args) if args.command == "pretrain" else run(args)


if __name__ == "__main__":
    sys.exit(main())
