"""What the evaluate step writes besides metrics.json: the comparison table (markdown), the
data files DVC plots read, and PNG charts.

``doc`` is the metrics.json document (see ``kdpipe.steps.evaluate``). Plot data files, in
``plots/``:

- ``confusion_<model>.csv``: ``actual,predicted`` label names, one row per example (DVC's
  ``confusion`` template);
- ``reliability.csv``: ``model,bin,confidence,accuracy,count``, non-empty bins only;
- ``accuracy_latency.csv``: ``model,latency_b<B>_p50_ms,accuracy``, B the smallest batch
  size timed (1 by default).

Charts (matplotlib's Agg canvas through ``Figure``: no display, no pyplot global state):
``confusion.png`` (a panel per model), ``reliability.png``, ``accuracy_latency.png``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

CONFUSION_CSV = "confusion_{model}.csv"
RELIABILITY_CSV = "reliability.csv"
ACCURACY_LATENCY_CSV = "accuracy_latency.csv"
CHARTS = ("confusion.png", "reliability.png", "accuracy_latency.png")


def headline_batch(doc: dict[str, Any]) -> str:
    """The batch key (``"b1"``) that single-number latency comparisons use: the smallest
    batch size timed."""
    return f"b{min(doc['latency']['batch_sizes'])}"


def comparison_markdown(doc: dict[str, Any]) -> str:
    """A markdown table of every model: quality, calibration, speed, size, and ratios to
    the teacher."""
    keys = [f"b{b}" for b in doc["latency"]["batch_sizes"]]
    head = headline_batch(doc)
    columns = (["model", "kind", "accuracy", "macro-F1", "ECE", "agrees w/ teacher"]
               + [f"p50 {k} ms" for k in keys] + [f"p95 {k} ms" for k in keys]
               + [f"texts/s {k}" for k in keys]
               + ["size MB", "params", "acc / teacher", f"speed-up {head}", "size / teacher"])
    rows = []
    for name, m in doc["models"].items():
        vs = m["vs_teacher"] or {}
        rows.append([name, m["kind"], _num(m["accuracy"], 4), _num(m["macro_f1"], 4),
                     _num(m["ece"], 4), _num(m["agreement_with_teacher"], 4)]
                    + [_num(m["latency_ms"][k]["p50"], 2) for k in keys]
                    + [_num(m["latency_ms"][k]["p95"], 2) for k in keys]
                    + [_num(m["throughput"][k], 0) for k in keys]
                    + [_num(m["size_bytes"] / 1e6, 2), f"{m['params']:,}",
                       _num(vs.get("accuracy"), 3), _ratio(vs.get(f"speedup_{head}_p50")),
                       _ratio(vs.get("size"))])
    lines = [f"# Model comparison: {doc['split']} split, {doc['rows']:,} rows",
             "",
             f"Latency: tokenization included, {doc['threads']} thread(s) for PyTorch and "
             f"ONNX Runtime, {doc['latency']['warmup']} warm-up and "
             f"{doc['latency']['repeats']} timed calls per batch size. ECE: "
             f"{doc['ece_bins']} equal-width bins of the max probability. Ratios are to "
             f"the {doc['reference'] or 'teacher (not evaluated)'}.",
             "",
             "| " + " | ".join(columns) + " |",
             "|" + "|".join(["---"] * 2 + ["---:"] * (len(columns) - 2)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _num(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def write_plot_data(doc: dict[str, Any], labels: np.ndarray,
                    predictions: dict[str, np.ndarray],
                    reliability: dict[str, list[dict[str, Any]]], plots: Path) -> list[Path]:
    """The CSV files DVC plots read (see the module docstring); ``labels`` (n,) gold ids,
    ``predictions`` model -> (n,) predicted ids, ``reliability`` model -> its bins."""
    plots.mkdir(parents=True, exist_ok=True)
    names = doc["labels"]
    written = []
    for model, predicted in predictions.items():
        path = plots / CONFUSION_CSV.format(model=model)
        _write_csv(path, ["actual", "predicted"],
                   [[names[a], names[p]] for a, p in zip(labels, predicted, strict=True)])
        written.append(path)
    path = plots / RELIABILITY_CSV
    _write_csv(path, ["model", "bin", "confidence", "accuracy", "count"],
               [[model, b["bin"], b["confidence"], b["accuracy"], b["count"]]
                for model, bins in reliability.items() for b in bins if b["count"]])
    written.append(path)
    head = headline_batch(doc)
    path = plots / ACCURACY_LATENCY_CSV
    _write_csv(path, ["model", f"latency_{head}_p50_ms", "accuracy"],
               [[model, m["latency_ms"][head]["p50"], m["accuracy"]]
                for model, m in doc["models"].items()])
    written.append(path)
    return written


def _write_csv(path: Path, header: Sequence[str], rows: list[list[Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_charts(doc: dict[str, Any], reliability: dict[str, list[dict[str, Any]]],
                 plots: Path) -> list[Path]:
    """confusion.png, reliability.png and accuracy_latency.png in ``plots``."""
    plots.mkdir(parents=True, exist_ok=True)
    paths = [plots / name for name in CHARTS]
    _confusion_chart(doc, paths[0])
    _reliability_chart(reliability, paths[1])
    _accuracy_latency_chart(doc, paths[2])
    return paths


def _confusion_chart(doc: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    models = doc["models"]
    names = doc["labels"]
    side = max(2.6, 0.45 * len(names) + 1.6)
    fig = Figure(figsize=(side * len(models), side + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(models), squeeze=False)[0])
    for ax, (model, m) in zip(axes, models.items(), strict=True):
        matrix = np.asarray(m["confusion"])
        ax.imshow(matrix, cmap="Blues")
        ticks = range(len(names))
        ax.set_xticks(ticks, names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(ticks, names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title(f"{model}\naccuracy {m['accuracy']:.3f}", fontsize=9)
        if len(names) <= 12:  # beyond that the counts overlap
            threshold = matrix.max() / 2 if matrix.size else 0
            for (i, j), count in np.ndenumerate(matrix):
                ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                        color="white" if count > threshold else "black")
    fig.savefig(path, dpi=110)


def _reliability_chart(reliability: dict[str, list[dict[str, Any]]], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    for model, bins in reliability.items():
        filled = [b for b in bins if b["count"]]
        ax.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled],
                marker="o", label=model)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (mean max probability in bin)")
    ax.set_ylabel("accuracy in bin")
    ax.set_title("Reliability diagram")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def _accuracy_latency_chart(doc: dict[str, Any], path: Path) -> None:
    accuracy_latency_figure(doc).savefig(path, dpi=110)


def accuracy_latency_figure(doc: dict[str, Any]) -> Any:
    """Each model's accuracy against its latency (log scale). Ticks at 1, 2 and 5 per decade
    (1 only past four decades) so their labels never crowd, labelled plainly (0.5, not
    5 x 10^-1); each point's name kept inside the figure."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    head = headline_batch(doc)
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.subplots()
    points = [(model, m["latency_ms"][head]["p50"], m["accuracy"])
              for model, m in doc["models"].items()]
    for _, x, y in points:
        ax.scatter([x], [y], s=40)
    ax.set_xscale("log")
    xs = [x for _, x, _ in points if x and x > 0]
    decades = np.log10(max(xs) / min(xs)) if xs else 0
    subs = (1.0,) if decades > 4 else (1.0, 2.0, 5.0)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    # Room at the right and top for the names, which are placed on the side with space.
    ax.margins(x=0.12, y=0.12)
    middle = np.sqrt(min(xs) * max(xs)) if xs else 1.0
    for model, x, y in points:
        right = x <= middle
        ax.annotate(model, (x, y), textcoords="offset points", xytext=(6 if right else -6, 5),
                    ha="left" if right else "right", fontsize=8)
    ax.set_xlabel(f"latency {head} p50, ms (tokenization included; log scale)")
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy against latency")
    ax.grid(True, which="both", alpha=0.3)
    return fig
