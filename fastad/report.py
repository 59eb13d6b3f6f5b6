"""What a run leaves to read and look at under ``--out``: ``results.json`` (one row per (model,
dataset, class) job), ``results.md`` (the per-class table of one model on one dataset; for a sweep,
one summary table per dataset of classes x models first), and with ``--report`` the plots
(``plots/DATASET.png``: a metric per class, one bar per model; ``plots/JOB.png``: the image ROC and
PR curves and the score histogram of normal and anomalous test images with the F1-optimal
threshold, the plotted numbers beside it in ``plots/JOB.json``) and one self-contained
``report.html`` (every picture embedded, no external resource: it reads offline).

Every file is written atomically; the results of an earlier run in the same folder are kept as
``NAME.~N~``, never overwritten silently.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import re
from pathlib import Path

import torch

from .overlays import pyplot

__all__ = ["METRIC_HEADS", "dataset_plot", "job_curves", "job_name", "job_plot", "keep_previous_results", "report_html", "results_markdown",
           "safe_name", "summary_markdown", "summary_tables", "write_results"]

PLOTS = "plots"
SUMMARY_METRICS = (("image_auroc", "I-AUROC"), ("pixel_auroc", "P-AUROC"), ("mad", "mAD"))
# the column heads of fastad.metrics.METRICS and mAD, in that order
METRIC_HEADS = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO", "mAD")


def fmt(v) -> str:
    """A metric in percent with two decimals; 'n/a' for an undefined one (None or NaN)."""
    return "n/a" if v is None or math.isnan(v) else f"{100 * v:.2f}"


def mean(values: list) -> float:
    """The mean of the defined values (NaN when none is)."""
    defined = [v for v in values if v is not None and not math.isnan(v)]
    return sum(defined) / len(defined) if defined else math.nan


def plain(row: dict) -> dict:
    """A results row as JSON can hold it: NaN (an undefined metric) becomes null."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


def _number(v) -> float:
    return math.nan if v is None else v


def recipe_line(row: dict) -> str:
    """What the run applied: the recipe (or the model's defaults) and the user's --set arguments."""
    args = ", ".join(f"{k}={json.dumps(v)}" for k, v in row.get("recipe_args", {}).items())
    text = f"{row['recipe']} ({args})" if row.get("recipe") else "none for this model, data and setting: the model's defaults"
    user = ", ".join(f"{k}={json.dumps(v)}" for k, v in row.get("set_args", {}).items())
    return text + (f"; --set {user}" + (" (wins over the recipe)" if row.get("recipe") else "") if user else "")


def safe_name(text: str) -> str:
    """``text`` as a file name: characters outside [A-Za-z0-9._-] as '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def job_name(row: dict) -> str:
    """The file name stem of a job's plots: MODEL-DATASET-CLASS (:func:`safe_name`)."""
    return safe_name(f"{row['model']}-{row.get('dataset', 'data')}-{row['class']}")


def _plot_links(rows: list[dict]) -> str:
    """results.md's line linking each job's plot."""
    return "- plots: " + ", ".join(f"[{r['class']}]({PLOTS}/{job_name(r)}.png)" for r in rows)


def results_markdown(rows: list[dict], title: str) -> str:
    """Per-class table of the seven metrics and mAD (percent), with a mean row (over the classes
    where a metric exists) and one line per class whose pixel metrics are missing or partial."""
    from .metrics import METRICS

    cols = [*METRICS, "mad"]
    head = ["class", *METRIC_HEADS, "fit s", "img/s"]
    lines = [f"# {title}", ""]
    if rows and "protocol" in rows[0]:  # what the numbers are comparable with
        lines += [f"- recipe: {recipe_line(rows[0])}", f"- protocol: {rows[0]['protocol']}"]
        chosen = [r for r in rows if r.get("selection", "last") != "last"]
        lines += [f"- checkpoint: **{chosen[0]['selection'].split(':')[0]}** (see the notes below)" if chosen else
                  "- checkpoint: the last iteration (no test-set selection)", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["class"], *(fmt(_number(r[c])) for c in cols), f"{r['fit_s']:.1f}", f"{r['images_per_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if len(rows) > 1:
        mean_row = [fmt(mean([r[c] for r in rows])) for c in cols]
        lines.append("| **mean** | " + " | ".join(mean_row) + " | | |")
    notes = [f"- {r['class']}: {r['pixel_note']}; mAD is the mean of the {r.get('mad_of', 'image metrics')}"
             for r in rows if r.get("pixel_note")]
    notes += [f"- {r['class']}: {r['selection']}" for r in rows if r.get("selection", "last") != "last"]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _groups(rows: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """{dataset: {model: rows}} in the order the rows come."""
    out: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        out.setdefault(r.get("dataset", "data"), {}).setdefault(r["model"], []).append(r)
    return out


def _speed(rows: list[dict]) -> tuple[float, float]:
    """(fit seconds, test images per second) of one model on one dataset: the fits summed (a unified
    model's one fit once), all test images over all prediction time."""
    fit = max(r["fit_s"] for r in rows) if rows[0].get("setting") == "unified" else sum(r["fit_s"] for r in rows)
    seconds = sum(r.get("n_test", 0) / max(r["images_per_s"], 1e-12) for r in rows)
    return fit, sum(r.get("n_test", 0) for r in rows) / max(seconds, 1e-12)


def summary_tables(rows: list[dict]) -> dict[str, tuple[list[str], list[list[str]], list[list[str]]]]:
    """Per dataset: (header, the class rows and a mean row, the per-model speed rows) of the summary:
    classes x models for image AUROC, pixel AUROC and mAD (percent)."""
    out = {}
    for dataset, by_model in _groups(rows).items():
        models = list(by_model)
        classes = list(dict.fromkeys(r["class"] for rs in by_model.values() for r in rs))
        head = ["class", *(f"{m} {label}" for m in models for _, label in SUMMARY_METRICS)]
        cell = {(m, r["class"]): r for m, rs in by_model.items() for r in rs}
        body = [[c, *(fmt(_number(cell[(m, c)][k])) if (m, c) in cell else "" for m in models for k, _ in SUMMARY_METRICS)]
                for c in classes]
        if len(classes) > 1:
            body.append(["**mean**", *(fmt(mean([r[k] for r in by_model[m]])) for m in models for k, _ in SUMMARY_METRICS)])
        speed = [[m, *(f"{v:.1f}" for v in _speed(by_model[m]))] for m in models]
        out[dataset] = (head, body, speed)
    return out


def _md_table(head: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in body)]


def summary_markdown(rows: list[dict], title: str, titles: dict[tuple[str, str], str], plots: bool = False) -> str:
    """A sweep's ``results.md``: one summary table per dataset (classes x models, the mean row, fit
    time and test images/s per model; its bar plot linked with ``plots``), then each (model,
    dataset)'s per-class table (:func:`results_markdown`, titled by ``titles[(model, dataset)]``)."""
    lines = [f"# {title}", ""]
    for dataset, (head, body, speed) in summary_tables(rows).items():
        lines += [f"## {dataset}", ""] + _md_table(head, body) + [""]
        lines += _md_table(["model", "fit s", "test img/s"], speed) + [""]
        if plots:
            lines += [f"![{dataset}]({PLOTS}/{safe_name(dataset)}.png)", ""]
    for dataset, by_model in _groups(rows).items():
        for model, rs in by_model.items():
            table = results_markdown(rs, titles.get((model, dataset), f"{model} on {dataset}"))
            lines += ["#" + table.rstrip("\n").replace("\n# ", "\n## "), ""]
            if plots:
                lines += [_plot_links(rs), ""]
    return "\n".join(lines)


def keep_previous_results(out: str) -> None:
    """Rename the results.json / results.md / report.html of an earlier run in ``out`` to ``NAME.~N~``
    (the next free N, as ``cp --backup=numbered``) and say so: a new run never overwrites them silently."""
    for name in ("results.json", "results.md", "report.html"):
        path = os.path.join(out, name)
        if os.path.exists(path):
            n = 1
            while os.path.exists(f"{path}.~{n}~"):
                n += 1
            os.replace(path, f"{path}.~{n}~")
            print(f"kept the earlier {name} as {name}.~{n}~", flush=True)


def write_results(out: str, rows: list[dict], title: str, titles: dict[tuple[str, str], str] | None = None,
                  report: bool = False) -> None:
    """``results.json`` and ``results.md`` (one (model, dataset): its per-class table; several: the
    sweep's summary, :func:`summary_markdown`), and with ``report`` the dataset plots and
    ``report.html``; each file written atomically (a killed or failed write keeps the old file)."""
    from .faults import atomic_write

    text = json.dumps([plain(r) for r in rows], indent=2)
    atomic_write(os.path.join(out, "results.json"), lambda tmp: Path(tmp).write_text(text))
    pairs = {(r["model"], r.get("dataset", "data")) for r in rows}
    if len(pairs) > 1:
        table = summary_markdown(rows, title, titles or {}, plots=report)
    else:
        table = results_markdown(rows, title)
        if report and rows:
            table += f"\n{_plot_links(rows)}; everything in one page: [report.html](report.html)\n"
    atomic_write(os.path.join(out, "results.md"), lambda tmp: Path(tmp).write_text(table))
    if report:
        for dataset, by_model in _groups(rows).items():
            dataset_plot(os.path.join(out, PLOTS, f"{safe_name(dataset)}.png"), [r for rs in by_model.values() for r in rs])
        page = report_html(out, rows, title)
        atomic_write(os.path.join(out, "report.html"), lambda tmp: Path(tmp).write_text(page))


# -- plots ------------------------------------------------------------------------------------------------------
def _save(fig, path: str) -> None:
    from .faults import atomic_write

    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    pyplot().close(fig)


def dataset_plot(path: str, rows: list[dict]) -> None:
    """One PNG for one dataset: image AUROC, pixel AUROC and mAD per class (panels), one bar per model."""
    plt = pyplot()
    by_model = {m: {r["class"]: r for r in rows if r["model"] == m} for m in dict.fromkeys(r["model"] for r in rows)}
    classes = list(dict.fromkeys(r["class"] for r in rows))
    fig, axes = plt.subplots(1, len(SUMMARY_METRICS), squeeze=False,
                             figsize=(3 * max(3.0, 0.35 * len(classes) * len(by_model) + 1), 3.6))
    width = 0.8 / len(by_model)
    for ax, (key, label) in zip(axes[0], SUMMARY_METRICS):
        for j, (model, cells) in enumerate(by_model.items()):
            values = [100 * _number(cells[c][key]) if c in cells else math.nan for c in classes]
            ax.bar([i + (j - (len(by_model) - 1) / 2) * width for i in range(len(classes))],
                   [0 if math.isnan(v) else v for v in values], width, label=model)
        ax.set_xticks(range(len(classes)), classes, rotation=45 if len(classes) > 4 else 0, fontsize=8,
                      ha="right" if len(classes) > 4 else "center")
        ax.set_title(f"{label} (%)", fontsize=10)
        ax.set_ylim(0, 100)
    axes[0, 0].legend(fontsize=8, loc="lower right")
    fig.suptitle(os.path.splitext(os.path.basename(path))[0], fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def job_curves(scores: torch.Tensor, labels: torch.Tensor, bins: int = 30) -> dict:
    """The numbers a job's plot shows, from the scores the metrics were computed on: the image ROC
    (fpr, tpr) and PR (recall, precision) points (:class:`fastad.metrics.ranking.RankedScores`'
    thresholds; empty when the test set has one class only), and the score histogram of normal and
    anomalous images over ``bins`` common bins (edges, counts)."""
    from .metrics.ranking import RankedScores

    s = scores.detach().double().reshape(-1).cpu()
    y = labels.reshape(-1).cpu() > 0
    out = {"fpr": [], "tpr": [], "recall": [], "precision": []}
    ranked = RankedScores(s, y)
    if ranked.n_pos and ranked.n_neg:
        tp, fp = ranked.counts()
        out.update(fpr=(fp / ranked.n_neg).tolist(), tpr=(tp / ranked.n_pos).tolist(),
                   recall=(tp[1:] / ranked.n_pos).tolist(), precision=(tp[1:] / (tp[1:] + fp[1:])).tolist())
    lo, hi = float(s.min()), float(s.max())
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    out["edges"] = edges.tolist()
    out["normal"] = torch.histogram(s[~y], edges).hist.long().tolist() if (~y).any() else [0] * bins
    out["anomalous"] = torch.histogram(s[y], edges).hist.long().tolist() if y.any() else [0] * bins
    return out


def job_plot(path: str, scores: torch.Tensor, labels: torch.Tensor, threshold: float | None, title: str) -> dict:
    """``path`` (PNG): image ROC, PR and the score histogram of normal vs anomalous test images with
    the threshold; the plotted numbers (:func:`job_curves` and ``threshold``) go to the same name
    with ``.json``. Returns them."""
    from .faults import atomic_write

    data = {**job_curves(scores, labels), "threshold": threshold}
    plt = pyplot()
    fig, (roc, pr, hist) = plt.subplots(1, 3, figsize=(12, 3.6))
    if data["fpr"]:
        roc.plot(data["fpr"], data["tpr"], drawstyle="default")
        pr.plot(data["recall"], data["precision"])
    else:
        for ax in (roc, pr):
            ax.text(0.5, 0.5, "undefined: one class only", ha="center", va="center")
    roc.plot([0, 1], [0, 1], ":", color="gray")
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title="image ROC", xlim=(0, 1), ylim=(0, 1.02))
    pr.set(xlabel="recall", ylabel="precision", title="image PR", xlim=(0, 1), ylim=(0, 1.02))
    edges = data["edges"]
    for key, colour in (("normal", "tab:green"), ("anomalous", "tab:red")):
        hist.stairs(data[key], edges, fill=True, alpha=0.45, color=colour, label=f"{key} ({sum(data[key])})")
    if threshold is not None:
        hist.axvline(threshold, color="black", linestyle="--", label=f"F1-optimal threshold {threshold:.4g}")
    hist.set(xlabel="image score", ylabel="images", title="test scores")
    hist.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    text = json.dumps(data)
    atomic_write(os.path.splitext(path)[0] + ".json", lambda tmp: Path(tmp).write_text(text))
    return data


# -- report.html -----------------------------------------------------------------------------------------------
def _embedded(path: str, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _html_table(head: list[str], body: list[list[str]]) -> str:
    def cell(text: str) -> str:
        bold = text.startswith("**") and text.endswith("**")
        return f"<b>{html.escape(text.strip('*'))}</b>" if bold else html.escape(text)

    rows = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in body)
    return "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + f"</tr>{rows}</table>"


def report_html(out: str, rows: list[dict], title: str) -> str:
    """One self-contained page: per dataset its summary table and bar plot, then per job its metrics,
    curves/histogram plot and the overlays of ``out/overlays`` (all PNGs embedded as data URIs; no
    script, stylesheet or image is fetched)."""
    from .metrics import METRICS

    parts = [f"<h1>{html.escape(title)}</h1>"]
    for dataset, (head, body, speed) in summary_tables(rows).items():
        parts += [f"<h2>{html.escape(dataset)}</h2>", _html_table(head, body), _html_table(["model", "fit s", "test img/s"], speed)]
        plot = os.path.join(out, PLOTS, f"{safe_name(dataset)}.png")
        if os.path.exists(plot):
            parts.append(_embedded(plot, f"{dataset}: metrics per class"))
    cols = [*METRICS, "mad"]
    for r in rows:
        name = job_name(r)
        parts.append(f"<h3>{html.escape(r['model'])} on {html.escape(r.get('dataset', 'data'))}: {html.escape(r['class'])}</h3>")
        parts.append(_html_table([*METRIC_HEADS, "threshold"],
                                 [[*(fmt(_number(r.get(c))) for c in cols),
                                   "n/a" if r.get("image_threshold") is None else f"{r['image_threshold']:.6g}"]]))
        plot = os.path.join(out, PLOTS, f"{name}.png")
        if os.path.exists(plot):
            parts.append(_embedded(plot, f"{name}: ROC, PR, score histogram"))
        for overlay in r.get("overlays", []):
            path = os.path.join(out, overlay)
            if os.path.exists(path):
                parts.append(_embedded(path, overlay))
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #bbb;padding:2px 8px;text-align:right}img{max-width:100%;display:block;margin:.5em 0}")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
