"""The report's figures, drawn with matplotlib (Agg, no pyplot) and embedded as base64 PNG data URIs."""

from __future__ import annotations

import base64
import io
import math
from typing import Any, Iterable

from fedsq_app.runtime.report.markup import escape

LEGEND_OUTSIDE = dict(loc="center left", bbox_to_anchor=(1.0, 0.5))  # right of the axes, centred
MAX_NODE_LINES = 20  # more lines than that are unreadable; the table has them all
MAX_LABEL_PARTITIONS = 100  # more bars than that: no label plot


def new_figure(width: float, height: float):
    # A Figure with no pyplot: Agg renders it, and no global backend or figure registry is touched.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def embed(figure, alt: str) -> str:
    """An ``<img>`` holding the figure as a PNG data URI."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img alt=\"{escape(alt)}\" src=\"data:image/png;base64,{data}\">\n"


def _round_axis(axes, rounds: list) -> None:
    # Every round on the axis, integer ticks: a round with nothing to plot still has its place.
    xs = [r for r in rounds if isinstance(r, int)]
    if xs:
        axes.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
    axes.xaxis.get_major_locator().set_params(integer=True)


def _series(rounds: list[dict], key: str) -> list[float]:
    return [float(r[key]) if isinstance(r.get(key), (int, float)) else math.nan for r in rounds]


def _gaps(values: Iterable) -> list:
    """None (not measured) as NaN: a gap in the line."""
    return [math.nan if y is None else y for y in values]


def _stacked_bars(axes, x, layers: Iterable[tuple[list, str, Any]], width: float) -> None:
    """One bar per x, its ``(values, label, color)`` layers stacked bottom to top."""
    bottom = [0] * len(x)
    for values, name, color in layers:
        axes.bar(x, values, bottom=bottom, color=color, label=name, width=width)
        bottom = [b + v for b, v in zip(bottom, values)]


def curves(results: dict, points: list[dict]) -> str:
    """Validation accuracy (with the best round and its test accuracy) and the losses, per round."""
    x = [p.get("round") for p in points]
    figure = new_figure(11, 3.6)
    accuracy, loss = figure.subplots(1, 2)
    accuracy.plot(x, _series(points, "val_accuracy"), "o-", color="C0", label="validation accuracy")
    best = results.get("best_round")
    if isinstance(best, int) and isinstance(results.get("best_val_accuracy"), (int, float)):
        accuracy.plot([best], [results["best_val_accuracy"]], "*", color="C2", markersize=14,
                      label=f"best round ({best})")
    if isinstance(results.get("test_accuracy"), (int, float)) and isinstance(best, int):
        accuracy.plot([best], [results["test_accuracy"]], "X", color="C3", markersize=10,
                      label=f"test accuracy (round {best}'s model)")
    accuracy.set(xlabel="round (0 = start model)", ylabel="accuracy", title="Validation accuracy")
    loss.plot(x, _series(points, "val_loss"), "o-", color="C0", label="validation loss")
    loss.plot(x, _series(points, "train_loss"), "s--", color="C1", label="train loss (accepted replies)")
    loss.set(xlabel="round (0 = start model)", ylabel="loss", title="Loss")
    for axes in (accuracy, loss):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        _round_axis(axes, x)
    return embed(figure, "validation accuracy and loss per round")


def node_accuracy(points: list[dict], nodes: list, label: dict) -> str:
    """Each node's accuracy on its own validation data, and their mean under the server's weights, per round."""
    x = [p["round"] for p in points]
    figure = new_figure(11, 3.4)
    axes = figure.subplots()
    for i, node in enumerate(nodes[:MAX_NODE_LINES]):
        ys = [((p["node_validation"].get("nodes") or {}).get(node) or {}).get("accuracy") for p in points]
        axes.plot(x, _gaps(ys), "o-", color=f"C{i % 10}", linewidth=1, markersize=4, label=label[node])
    weighted = [p["node_validation"].get("accuracy") for p in points]
    axes.plot(x, _gaps(weighted), "kD--", linewidth=2, markersize=4, label="mean (server's weights)")
    axes.set(xlabel="round", ylabel="accuracy", title="Each node's accuracy on its own validation data")
    axes.grid(alpha=0.3)
    _round_axis(axes, x)
    axes.legend(fontsize=7, ncol=1 if len(nodes) <= 10 else 2, **LEGEND_OUTSIDE)
    return embed(figure, "per-node validation accuracy per round")


def reply_outcomes(x: list, accepted: list, bounded: list, rejected: list, missing: list) -> str:
    """Stacked bars per round: replies accepted, accepted but bounded, rejected, and requests without reply."""
    figure = new_figure(11, 2.8)
    axes = figure.subplots()
    _stacked_bars(axes, x, ((accepted, "accepted", "#4c9a4c"),
                            (bounded, "accepted, bounded (clip scale < 1)", "#e0b030"),
                            (rejected, "rejected", "#c03a3a"), (missing, "no reply", "#bbbbbb")), width=0.7)
    axes.set(xlabel="round", ylabel="replies", title="What became of each round's replies")
    _round_axis(axes, x)
    axes.yaxis.get_major_locator().set_params(integer=True)
    axes.legend(fontsize=8, **LEGEND_OUTSIDE)
    return embed(figure, "replies accepted, bounded, rejected and missing per round")


def label_distribution(labels: dict[str, dict[str, int]]) -> str:
    """Stacked bars per partition, one layer per label; '' when there is nothing or too much to draw."""
    if not labels or len(labels) > MAX_LABEL_PARTITIONS:
        return ""
    names = list(next(iter(labels.values())).keys())
    figure = new_figure(11, 3.2)
    axes = figure.subplots()
    partitions = list(labels)
    from matplotlib import colormaps

    colors = colormaps["tab10" if len(names) <= 10 else "tab20" if len(names) <= 20 else "viridis"]
    _stacked_bars(axes, range(len(partitions)),
                  (([labels[p].get(name, 0) for p in partitions], str(name),
                    colors(i) if len(names) <= 20 else colors(i / max(len(names) - 1, 1)))
                   for i, name in enumerate(names)), width=0.75)
    axes.set_xticks(range(len(partitions)), partitions)
    axes.set(xlabel="partition", ylabel="images", title="Training images per partition, by label")
    if len(names) <= 20:
        axes.legend(title="label", fontsize=7, ncol=2, **LEGEND_OUTSIDE)
    return embed(figure, "label distribution per partition")
