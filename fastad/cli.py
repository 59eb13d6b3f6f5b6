"""The ``fastad`` command line: ``fastad run`` fits and evaluates a model (default: PatchCore with
the offline EfficientNet-Lite0 backbone on the embedded synthetic data)."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path


def _datasets(spec: str, classes: list[str] | None):
    from .data import SyntheticDataset, mtd, mvtec

    kind, _, path = spec.partition(":")
    if kind == "synthetic":
        return [("synthetic", SyntheticDataset("train", 32), SyntheticDataset("test", 32))]
    if not path:
        raise SystemExit(f"--data {spec!r}: expected KIND:PATH, e.g. mvtec:/data/mvtec or mtd:/data/mtd")
    if kind == "mtd":
        return [("mtd", mtd(path, "train"), mtd(path, "test"))]
    if kind == "mvtec":
        names = classes or sorted(d.name for d in Path(path).iterdir() if (d / "train").is_dir())
        if not names:
            raise SystemExit(f"no MVTec AD class folders (with train/) under {path}")
        return [(c, mvtec(path, c, "train"), mvtec(path, c, "test")) for c in names]
    raise SystemExit(f"unknown data kind {kind!r}; expected synthetic, mvtec or mtd")


def _fmt(v):
    return "-" if v is None or math.isnan(v) else f"{100 * v:.2f}"


def run(args) -> int:
    from .engine import evaluate

    rows = []
    for name, train, test in _datasets(args.data, args.classes):
        kwargs = {"coreset_ratio": args.coreset_ratio} if args.model == "patchcore" and args.coreset_ratio else {}
        res = evaluate(args.model, train, test, device=args.device, batch_size=args.batch_size,
                       num_workers=args.num_workers, **kwargs)
        res.pop("model_obj")
        res["class"] = name
        rows.append(res)
        print(f"{name}: image AUROC {_fmt(res['image_auroc'])}  pixel AUROC {_fmt(res['pixel_auroc'])}  "
              f"AUPRO {_fmt(res['pixel_aupro'])}  mAD {_fmt(res['mad'])}  "
              f"fit {res['fit_s']:.1f}s  inference {res['images_per_s']:.1f} img/s", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            # NaN (an undefined metric) is not JSON: write null
            json.dump([{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows], f, indent=2)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastad", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="fit and evaluate a model")
    r.add_argument("--model", default="patchcore", choices=["patchcore", "padim"])
    r.add_argument("--data", default="synthetic", help="synthetic | mvtec:ROOT | mtd:ROOT")
    r.add_argument("--classes", nargs="*", help="MVTec AD classes (default: all found)")
    r.add_argument("--device", default="cpu")
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--num-workers", type=int, default=0)
    r.add_argument("--coreset-ratio", type=float, default=None, help="PatchCore coreset fraction (default 0.1)")
    r.add_argument("--out", default=None, help="folder for results.json")
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
