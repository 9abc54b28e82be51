"""A run's human-readable report: one self-contained HTML page, ``report.html``, next to results.json.

``write_report(out_dir, results)`` reads results.json's dict (and the label counts CSV it names, if it is
still there) and writes the page: validation and train curves, each silo's own validation, what became of
every reply, and a model card (architecture, S's provenance and hash, the data, the config, the trust
settings, intended use and limits). Plots are PNGs embedded as data URIs, the CSS is inline: the page opens
offline, mailed or archived on its own. Every string from the run (config values, node replies' reasons)
is untrusted and escaped.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import re
from collections import Counter, defaultdict
from logging import WARNING
from pathlib import Path
from typing import Any, Iterable

from flwr.common.logger import log

from fedsq_app.runtime.strategies import STRATEGIES
from fedsq_app.util import write_atomic

REPORT_FILE = "report.html"

# The run-config keys that decide what a reply may do to the global model (docs/RELIABILITY.md).
TRUST_KEYS = {
    "influence-bound": "a silo's largest pull on the mean, as a fraction of the round's median update norm (0 = off)",
    "clip-multiplier": "two-silo rounds: updates clipped to this multiple of the median norm (0 = off)",
    "bn-clamp": "each reply's BN statistics clamped into the other replies' range (from 3 replies)",
    "min-valid-replies": "fewer valid replies: the round keeps the previous model",
    "aggregation": "how accepted updates are combined",
    "trim-fraction": "trimmed-mean: share of the largest and of the smallest values dropped",
    "silo-sizes": "deployment: the silos' weights by registered key ('' = partition sizes or equal)",
}
MAX_LABEL_COLUMNS = 20  # wider label tables are summarised (size, labels present, largest label's share)


def write_report(out_dir: Path, results: dict, *, input_spec: Any = None) -> Path:
    """Write ``out_dir/report.html`` from a run's results.json dict; returns its path.

    ``input_spec``: how images are fed to the model (a ``fedsq_app.data.tensors.InputSpec`` or anything with
    ``channels``, ``size``, ``mean``, ``std``); results.json does not record it. Raises on anything it cannot
    draw: the caller decides whether that matters (``write_report_or_warn``).
    """
    out_dir = Path(out_dir)
    page = render_report(results, input_spec=input_spec, out_dir=out_dir)
    return write_atomic(out_dir / REPORT_FILE, page)


def write_report_or_warn(out_dir: Path, results: dict, **facts) -> Path | None:
    """``write_report``, but a failure only logs a WARNING: the run's results are already on disk."""
    try:
        return write_report(out_dir, results, **facts)
    except Exception as error:  # a plot or a malformed record must never cost the run its results
        log(WARNING, "%s not written (%s: %s); results.json and best_model are complete", REPORT_FILE,
            type(error).__name__, error)
        return None


# -- the page ------------------------------------------------------------------------------------------------


def render_report(results: dict, *, input_spec: Any = None, out_dir: Path | None = None) -> str:
    """The HTML text of the report (``out_dir``: where to look for the label counts CSV if it moved)."""
    config = results.get("config") or {}
    rounds = list(results.get("rounds") or [])
    data = data_summary(results, out_dir)
    title = f"FedSQ run report: {out_dir.name if out_dir else config.get('run-name', '')}"
    sections = [
        _summary(results, config, rounds),
        _section("Validation per round", _curves(results, rounds) + _round_table(results, rounds)),
        _node_validation(results, rounds),
        _replies(rounds),
        _model_card(results, config, rounds, data, input_spec),
    ]
    body = "\n".join(s for s in sections if s)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body>\n<h1>{_e(title)}</h1>\n{body}\n"
            f"<footer>Written by fedsq_app.runtime.report from results.json; every figure here is in "
            f"results.json or rounds.csv.</footer>\n</body></html>\n")


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;max-width:1100px;
 margin:24px auto;padding:0 16px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:18px;border-bottom:2px solid #ddd;padding-bottom:3px;
 margin-top:32px}h3{font-size:15px;margin-bottom:6px}
table{border-collapse:collapse;margin:8px 0 12px;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}table.kv th{white-space:nowrap}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.best td{background:#eef7ee}
.scroll{overflow-x:auto;max-width:100%}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:130px;background:#fafafa}
.card b{display:block;font-size:20px}.card span{color:#666;font-size:12px}
code,.hash{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;word-break:break-all}
img{max-width:100%;height:auto;display:block;margin:8px 0}
.note{color:#555;font-size:13px}ul{padding-left:22px}li{margin:3px 0}
footer{margin-top:40px;color:#888;font-size:12px}
"""


def _e(value: Any) -> str:
    """Escaped text: everything a run recorded may come from a config file or a node's reply."""
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return "—" if not math.isfinite(value) else f"{value:.{digits}f}"
    return _e(value)


def _pct(value: Any) -> str:
    return "—" if not isinstance(value, (int, float)) or isinstance(value, bool) else f"{100 * value:.2f} %"


def _section(title: str, body: str) -> str:
    return f"<section><h2>{_e(title)}</h2>\n{body}</section>"


def _table(header: Iterable[str], rows: Iterable[Iterable[str]], numeric: set[int] = frozenset(),
           row_classes: Iterable[str] | None = None) -> str:
    """A table from already-escaped cells; columns in ``numeric`` are right-aligned."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    classes = list(row_classes) if row_classes is not None else None
    lines = []
    for i, row in enumerate(rows):
        cells = "".join(f"<td class=\"n\">{c}</td>" if j in numeric else f"<td>{c}</td>" for j, c in enumerate(row))
        cls = f" class=\"{classes[i]}\"" if classes and classes[i] else ""
        lines.append(f"<tr{cls}>{cells}</tr>")
    return f"<div class=\"scroll\"><table><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(lines) + \
        "\n</tbody></table></div>\n"


def _kv_table(pairs: Iterable[tuple[str, str]]) -> str:
    return "<table class=\"kv\">" + "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in pairs) + "</table>\n"


def _figure(width: float, height: float):
    # A Figure with no pyplot: Agg renders it, and no global backend or figure registry is touched.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _img(figure, alt: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img alt=\"{_e(alt)}\" src=\"data:image/png;base64,{data}\">\n"


def _round_axis(axes, rounds: list) -> None:
    # Every round on the axis, integer ticks: a round with nothing to plot still has its place.
    xs = [r for r in rounds if isinstance(r, int)]
    if xs:
        axes.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
    axes.xaxis.get_major_locator().set_params(integer=True)


def _series(rounds: list[dict], key: str) -> list[float]:
    return [float(r[key]) if isinstance(r.get(key), (int, float)) else math.nan for r in rounds]


# -- summary and curves --------------------------------------------------------------------------------------


def _summary(results: dict, config: dict, rounds: list[dict]) -> str:
    cards = [("best validation accuracy", _pct(results.get("best_val_accuracy"))),
             ("best round", _num(results.get("best_round"))),
             ("test accuracy (best round)", _pct(results.get("test_accuracy"))),
             ("test loss", _num(results.get("test_loss"))),
             ("rounds run", f"{len(rounds)} of {_num(config.get('num-server-rounds'))}"),
             ("wall time", f"{results['total_wall_time_s']:.0f} s"
              if isinstance(results.get("total_wall_time_s"), (int, float)) else "—")]
    html_cards = "".join(f"<div class=\"card\"><b>{v}</b><span>{_e(k)}</span></div>" for k, v in cards)
    facts = [("strategy", f"<code>{_e(config.get('strategy'))}</code>"),
             ("model", f"<code>{_e(config.get('model'))}</code>"),
             ("dataset", f"<code>{_e(config.get('dataset'))}</code>"),
             ("validation", _e(results.get("validation_source"))),
             ("S (structural copy) sha256", f"<span class=\"hash\">{_e(results.get('structural_sha256'))}</span>")]
    if results.get("stopped_early"):
        stop = results["stopped_early"]
        facts.append(("stopped early", _e(f"after round {stop.get('after_round')}: no new best validation "
                                          f"accuracy for {stop.get('patience')} rounds (patience)")))
    for resumed in results.get("resumed") or []:
        facts.append(("resumed", _e(f"after round {resumed.get('after_round')} from {resumed.get('from')}")))
    note = ("<p class=\"note\">The test split is touched once, with the best round's model; the best round is "
            "chosen on validation, so the best validation accuracy is an optimistic estimate and the test "
            "accuracy is the one to quote.</p>")
    return f"<section>\n<div class=\"cards\">{html_cards}</div>\n{_kv_table(facts)}{note}</section>"


def _with_initial(results: dict, rounds: list[dict]) -> list[dict]:
    """Round 0 (the start model, ``results["initial"]``) followed by the rounds."""
    initial = results.get("initial")
    return ([{"round": 0, **initial}] if isinstance(initial, dict) else []) + rounds


def _curves(results: dict, rounds: list[dict]) -> str:
    points = _with_initial(results, rounds)
    if not points:
        return "<p class=\"note\">No round finished: nothing to plot.</p>\n"
    x = [p.get("round") for p in points]
    figure = _figure(11, 3.6)
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
    return _img(figure, "validation accuracy and loss per round")


def _bounded(record: dict) -> int:
    return sum(1 for r in record.get("replies") or []
               if r.get("accepted") and isinstance(r.get("clip_scale"), (int, float)) and r["clip_scale"] < 1)


def _round_table(results: dict, rounds: list[dict]) -> str:
    points = _with_initial(results, rounds)
    best = results.get("best_round")
    rows, classes = [], []
    for p in points:
        start = p.get("round") == 0
        rows.append([_num(p.get("round")), _pct(p.get("val_accuracy")), _num(p.get("val_loss")),
                     _num(p.get("train_loss")),
                     "" if start else _num(p.get("expected")), "" if start else _num(p.get("received")),
                     "" if start else _num(p.get("accepted")), "" if start else _num(_bounded(p)),
                     "" if start else _num(p.get("rejected")),
                     "start model" if start else ("yes" if p.get("aggregated") else "no: kept the previous model"),
                     _num(p.get("wall_time_s"), 1)])
        classes.append("best" if p.get("round") == best else "")
    return _table(["round", "val accuracy", "val loss", "train loss", "asked", "replied", "accepted", "bounded",
                   "rejected", "aggregated", "wall time (s)"], rows, numeric={0, 1, 2, 3, 4, 5, 6, 7, 8, 10},
                  row_classes=classes) + "<p class=\"note\">Highlighted: the best round, whose model was tested.</p>\n"


# -- each silo's own validation ------------------------------------------------------------------------------


def _node_validation(results: dict, rounds: list[dict]) -> str:
    points = [p for p in _with_initial(results, rounds) if isinstance(p.get("node_validation"), dict)]
    if not points:
        return ""
    nodes = sorted({n for p in points for n in (p["node_validation"].get("nodes") or {})}, key=str)
    label = {n: f"node {n}" for n in nodes}
    body = []
    if nodes:
        figure = _figure(11, 3.4)
        axes = figure.subplots()
        for i, node in enumerate(nodes[:20]):  # more lines than that are unreadable; the table has them all
            ys = [((p["node_validation"].get("nodes") or {}).get(node) or {}).get("accuracy") for p in points]
            axes.plot([p["round"] for p in points], [math.nan if y is None else y for y in ys], "o-",
                      color=f"C{i % 10}", linewidth=1, markersize=4, label=label[node])
        weighted = [p["node_validation"].get("accuracy") for p in points]
        axes.plot([p["round"] for p in points], [math.nan if y is None else y for y in weighted], "kD--",
                  linewidth=2, markersize=4, label="sample-weighted")
        axes.set(xlabel="round", ylabel="accuracy", title="Each node's accuracy on its own validation data")
        axes.grid(alpha=0.3)
        _round_axis(axes, [p["round"] for p in points])
        axes.legend(fontsize=7, ncol=1 if len(nodes) <= 10 else 2, loc="center left", bbox_to_anchor=(1.0, 0.5))
        body.append(_img(figure, "per-node validation accuracy per round"))
    rows = []
    for p in points:
        validation = p["node_validation"]
        per_node = validation.get("nodes") or {}
        cells = [_num(p.get("round")), _pct(validation.get("accuracy")), _num(validation.get("num_examples"))]
        for node in nodes:
            entry = per_node.get(node)
            cells.append(f"{_pct(entry.get('accuracy'))} ({_num(entry.get('num_examples'))})" if entry else "—")
        cells.append(_num(len(validation.get("rejected") or [])))
        rows.append(cells)
    body.append(_table(["round", "weighted accuracy", "samples"] + [label[n] for n in nodes] + ["rejected"], rows,
                       numeric=set(range(len(nodes) + 4))))
    body.append("<p class=\"note\">Each cell: the node's accuracy on its own held-out data (its sample count); "
                "the server cannot check these figures, it can only screen them.</p>\n")
    return _section("Each node's own validation", "".join(body))


# -- replies -------------------------------------------------------------------------------------------------


def _replies(rounds: list[dict]) -> str:
    if not rounds:
        return ""
    x = [r.get("round") for r in rounds]
    bounded = [_bounded(r) for r in rounds]
    accepted = [max((r.get("accepted") or 0) - b, 0) for r, b in zip(rounds, bounded)]
    rejected = [r.get("rejected") or 0 for r in rounds]
    missing = [r.get("missing") or 0 for r in rounds]
    figure = _figure(11, 2.8)
    axes = figure.subplots()
    bottom = [0] * len(rounds)
    for values, name, color in ((accepted, "accepted", "#4c9a4c"), (bounded, "accepted, bounded (clip scale < 1)",
                                                                      "#e0b030"),
                                (rejected, "rejected", "#c03a3a"), (missing, "no reply", "#bbbbbb")):
        axes.bar(x, values, bottom=bottom, color=color, label=name, width=0.7)
        bottom = [b + v for b, v in zip(bottom, values)]
    axes.set(xlabel="round", ylabel="replies", title="What became of each round's replies")
    _round_axis(axes, x)
    axes.yaxis.get_major_locator().set_params(integer=True)
    axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    body = [_img(figure, "replies accepted, bounded, rejected and missing per round")]
    body.append(_reasons(rounds))
    return _section("Replies: accepted, bounded, rejected", "".join(body))


def _reason_kind(reason: str) -> str:
    # The same check with different numbers is one kind of rejection.
    return re.sub(r"[-+]?\d+(\.\d+)?([eE][-+]?\d+)?", "#", reason)


def _reasons(rounds: list[dict]) -> str:
    kinds: dict[str, dict] = {}
    for record in rounds:
        for rejection in record.get("rejections") or []:
            reason = str(rejection.get("reason") or "(no reason given)")
            entry = kinds.setdefault(_reason_kind(reason), {"count": 0, "rounds": set(), "nodes": set(),
                                                            "example": reason})
            entry["count"] += 1
            entry["rounds"].add(record.get("round"))
            entry["nodes"].add(rejection.get("node_id"))
        for rejection in (record.get("node_validation") or {}).get("rejected") or []:
            reason = "validation reply: " + str(rejection.get("reason") or "(no reason given)")
            entry = kinds.setdefault(_reason_kind(reason), {"count": 0, "rounds": set(), "nodes": set(),
                                                            "example": reason})
            entry["count"] += 1
            entry["rounds"].add(record.get("round"))
            entry["nodes"].add(rejection.get("node_id"))
    bounded = [(record.get("round"), r.get("node_id"), r.get("clip_scale")) for record in rounds
               for r in record.get("replies") or []
               if r.get("accepted") and isinstance(r.get("clip_scale"), (int, float)) and r["clip_scale"] < 1]
    parts = ["<h3>Rejection reasons</h3>\n"]
    if not kinds:
        parts.append("<p>No reply was rejected.</p>\n")
    else:
        rows = [[_num(k["count"]), _e(_ranges(k["rounds"])), _num(len(k["nodes"])), _e(k["example"])]
                for k in sorted(kinds.values(), key=lambda k: -k["count"])]
        parts.append(_table(["replies", "rounds", "nodes", "reason (one example; numbers vary)"], rows,
                            numeric={0, 2}))
    parts.append("<h3>Bounded replies</h3>\n")
    if not bounded:
        parts.append("<p>No accepted reply was scaled down.</p>\n")
    else:
        scales = [s for _, _, s in bounded]
        parts.append(f"<p>{len(bounded)} accepted replies were scaled down by the influence bound or the norm clip "
                     f"(clip scale min {min(scales):.3f}, median {sorted(scales)[len(scales) // 2]:.3f}) in rounds "
                     f"{_e(_ranges({r for r, _, _ in bounded}))}.</p>\n")
    missing = sum(r.get("missing") or 0 for r in rounds)
    if missing:
        parts.append(f"<p>{missing} requests got no reply before the round's timeout.</p>\n")
    return "".join(parts)


def _ranges(values: Iterable) -> str:
    """1, 2, 3, 5 -> '1–3, 5'."""
    numbers = sorted(v for v in values if isinstance(v, int))
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in spans)


# -- the data ------------------------------------------------------------------------------------------------


def data_summary(results: dict, out_dir: Path | None = None) -> dict:
    """What each partition or silo trained on: ``{"kind": "partitions", "sizes": {id: n}, "labels": {id:
    {label: n}}}`` from the label counts CSV that results.json's ``label_distribution`` names, else ``{"kind":
    "nodes", "sizes": {node id: num_examples}}`` from the replies (silos: the server has only their claims)."""
    distribution = results.get("label_distribution") or {}
    counts = _read_counts(distribution.get("csv"), out_dir) if isinstance(distribution, dict) else None
    if counts:
        return {"kind": "partitions", "sizes": {p: sum(c.values()) for p, c in counts.items()}, "labels": counts,
                "note": None}
    claims: dict[str, dict] = defaultdict(lambda: {"num_examples": None, "weight": None, "accepted": 0,
                                                   "rejected": 0})
    for record in results.get("rounds") or []:
        for reply in record.get("replies") or []:
            entry = claims[str(reply.get("node_id"))]
            entry["accepted" if reply.get("accepted") else "rejected"] += 1
            if reply.get("num_examples") is not None:
                entry["num_examples"] = reply["num_examples"]  # the latest claim
            if reply.get("weight") is not None:
                entry["weight"] = reply["weight"]
    note = distribution.get("skipped") or distribution.get("error") or distribution.get("pending") \
        if isinstance(distribution, dict) else None
    return {"kind": "nodes", "nodes": dict(claims), "labels": {},
            "sizes": {n: c["num_examples"] for n, c in claims.items() if isinstance(c["num_examples"], int)},
            "note": note}


def _read_counts(path: str | None, out_dir: Path | None) -> dict[str, dict[str, int]] | None:
    """{partition id: {label: count}} from flwr-datasets' counts CSV (partition rows, label columns)."""
    if not path:
        return None
    candidates = [Path(path)] + ([out_dir / Path(path).name] if out_dir else [])  # the run dir may have moved
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        return None
    try:
        with open(found, newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            counts = {row[0]: {label: int(float(v or 0)) for label, v in zip(header[1:], row[1:])}
                      for row in reader if row}
    except (OSError, ValueError, TypeError, csv.Error):  # unreadable counts: the replies' sizes still tell
        return None
    return counts or None


def _data_section(results: dict, config: dict, data: dict) -> str:
    parts = []
    if data["kind"] == "partitions":
        sizes, labels = data["sizes"], data["labels"]
        names = list(next(iter(labels.values())).keys()) if labels else []
        total = sum(sizes.values())
        parts.append(f"<p>The server's training pool of <code>{_e(config.get('dataset'))}</code> "
                     f"(split <code>{_e(config.get('train-split'))}</code>): {total:,} images over {len(sizes)} "
                     f"partitions, {_e(_partitioning(config))}. Each node trained on its partition.</p>\n")
        parts.append(_label_plot(labels))
        if len(names) <= MAX_LABEL_COLUMNS:
            rows = [[_e(p), _num(sizes[p])] + [_num(c.get(n, 0)) for n in names] for p, c in labels.items()]
            parts.append(_table(["partition", "images"] + [f"label {n}" for n in names], rows,
                                numeric=set(range(1, len(names) + 2))))
        else:
            rows = [[_e(p), _num(sizes[p]), _num(sum(1 for v in c.values() if v)),
                     _pct(max(c.values()) / sizes[p] if sizes[p] else None)] for p, c in labels.items()]
            parts.append(_table(["partition", "images", "labels present", "largest label's share"], rows,
                                numeric={1, 2, 3}))
        return "".join(parts)
    nodes = data.get("nodes") or {}
    if data.get("note"):
        parts.append(f"<p class=\"note\">{_e(data['note'])}.</p>\n")
    if not nodes:
        parts.append("<p>No node replied: nothing is known about the data.</p>\n")
        return "".join(parts)
    total = sum(data["sizes"].values())
    parts.append(f"<p>The nodes' own data, as each claimed in its replies (the server never sees it and weighs "
                 f"nodes by {_e(_weights_from(results))}, never by these claims): {total:,} training images "
                 f"over {len(nodes)} nodes. Label distributions stay with the nodes.</p>\n")
    rows = [[_e(n), _num(c["num_examples"]), _num(c["weight"]), _num(c["accepted"]), _num(c["rejected"])]
            for n, c in sorted(nodes.items())]
    parts.append(_table(["node id", "training images (claimed)", "server weight", "replies accepted",
                         "replies rejected"], rows, numeric={1, 2, 3, 4}))
    return "".join(parts)


def _weights_from(results: dict) -> str:
    sources = {r.get("weights_from") for r in results.get("rounds") or [] if r.get("weights_from")}
    return ", ".join(sorted(sources)) or "the server's weights"


def _partitioning(config: dict) -> str:
    partitioner = config.get("partitioner")
    if partitioner == "dirichlet":
        return f"Dirichlet label skew α = {config.get('alpha')}"
    if partitioner == "pathological":
        return f"pathological: {config.get('classes-per-client')} classes per partition"
    if partitioner == "iid":
        return "IID (no label skew)"
    return f"partitioner {partitioner}"


def _label_plot(labels: dict[str, dict[str, int]]) -> str:
    if not labels or len(labels) > 100:
        return ""
    names = list(next(iter(labels.values())).keys())
    figure = _figure(11, 3.2)
    axes = figure.subplots()
    partitions = list(labels)
    bottom = [0] * len(partitions)
    from matplotlib import colormaps

    colors = colormaps["tab10" if len(names) <= 10 else "tab20" if len(names) <= 20 else "viridis"]
    for i, name in enumerate(names):
        values = [labels[p].get(name, 0) for p in partitions]
        color = colors(i) if len(names) <= 20 else colors(i / max(len(names) - 1, 1))
        axes.bar(range(len(partitions)), values, bottom=bottom, color=color, label=str(name), width=0.75)
        bottom = [b + v for b, v in zip(bottom, values)]
    axes.set_xticks(range(len(partitions)), partitions)
    axes.set(xlabel="partition", ylabel="images", title="Training images per partition, by label")
    if len(names) <= 20:
        axes.legend(title="label", fontsize=7, ncol=2, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _img(figure, "label distribution per partition")


# -- the model card ------------------------------------------------------------------------------------------


def _model_kind(strategy: str | None, config: dict) -> str:
    entry = STRATEGIES.get(strategy or "")
    if entry is None:
        return f"strategy '{strategy}' (unknown to this version)"
    if entry.switches:
        return (f"plain network (every weight trained and averaged) for {config.get('warmup-rounds')} warm-up "
                "rounds, then a FedSQ DualCopy whose frozen structural copy S is that global model: S decides "
                "which ReLUs fire, the trainable copy Q supplies the values, only Q travels")
    if entry.gated:
        return ("FedSQ DualCopy: a frozen structural copy S (the pretrained start model) decides at every ReLU "
                "which units fire; the trainable copy Q supplies the values; only Q travels and is aggregated")
    return "plain network: every weight is trained locally and aggregated (S is only the start point)"


def _gated(strategy: str | None) -> bool:
    entry = STRATEGIES.get(strategy or "")
    return entry is not None and (entry.gated or entry.switches)


def _input_spec(spec: Any) -> str:
    if spec is None:
        return "not recorded"
    size = getattr(spec, "size", None)
    mean = ", ".join(f"{m:.3f}" for m in getattr(spec, "mean", ()))
    std = ", ".join(f"{s:.3f}" for s in getattr(spec, "std", ()))
    return (f"{getattr(spec, 'channels', '?')}-channel uint8 images, "
            f"{f'resized to {size}×{size}' if size else 'at the dataset native resolution'}, scaled to [0, 1] "
            f"and normalised with mean ({mean}), std ({std})")


def _model_card(results: dict, config: dict, rounds: list[dict], data: dict, input_spec: Any) -> str:
    strategy = config.get("strategy")
    hashes = []
    for record in rounds:  # fedsq-warmup names a new S after its switch
        sha = record.get("structural_sha256")
        if sha and sha not in hashes:
            hashes.append(sha)
    model = [("architecture", f"<code>{_e(config.get('model'))}</code>"),
             ("trained as", _e(_model_kind(strategy, config))),
             ("strategy", f"<code>{_e(strategy)}</code>"),
             ("classes", _num(results.get("num_classes")) + (f" (labels {_e(config['classes'])} of the dataset, "
                                                              "remapped to 0..k-1)" if config.get("classes") else "")),
             ("input", _e(_input_spec(input_spec))),
             ("S pretrained from", f"<code>{_e(results.get('pretrained_from'))}</code>"),
             ("S sha256 (start model)", f"<span class=\"hash\">{_e(results.get('structural_sha256'))}</span>")]
    if any(h != results.get("structural_sha256") for h in hashes):
        model.append(("S sha256 named by the rounds",
                      "<br>".join(f"<span class=\"hash\">{_e(h)}</span>" for h in hashes)))
    model += [("best round", _num(results.get("best_round"))),
              ("best validation accuracy", _pct(results.get("best_val_accuracy"))),
              ("test accuracy", f"{_pct(results.get('test_accuracy'))} on split <code>"
                                f"{_e(config.get('test-split'))}</code> (loss {_num(results.get('test_loss'))})"),
              ("weights file", "<code>best_model.safetensors</code>: the best round's travelling weights; "
               "<code>fedsq_app.load_trained(&lt;run dir&gt;)</code> rebuilds the model"
               + (" under S and checks S's hash" if _gated(strategy) else ""))]
    trust = [[f"<code>{_e(k)}</code>", f"<code>{_e(_config_value(config[k]))}</code>", _e(why)]
             for k, why in TRUST_KEYS.items() if k in config]
    pairs = [[f"<code>{_e(k)}</code>", f"<code>{_e(_config_value(v))}</code>"] for k, v in sorted(config.items())]
    per_row = 3  # ~70 keys: three key/value pairs a row keeps the table one screen high
    height = -(-len(pairs) // per_row)
    config_rows = [sum((pairs[i + j * height] for j in range(per_row) if i + j * height < len(pairs)), [])
                   for i in range(height)]
    body = ("<h3>Model</h3>\n" + _kv_table(model)
            + "<h3>Data</h3>\n" + _data_section(results, config, data)
            + "<h3>Trust settings</h3>\n" + _table(["key", "value", "what it does"], trust)
            + "<h3>Intended use and limits</h3>\n" + _limits(results, config, rounds, data)
            + "<h3>Run config</h3>\n" + _table(["key", "value"] * per_row, config_rows))
    return _section("Model card", body)


def _config_value(value: Any) -> str:
    # As the run config (pyproject.toml, --run-config) spells it.
    if isinstance(value, bool):
        return "true" if value else "false"
    return "''" if value == "" else str(value)


def _limits(results: dict, config: dict, rounds: list[dict], data: dict) -> str:
    dataset, strategy = config.get("dataset"), config.get("strategy")
    entry = STRATEGIES.get(strategy or "")
    total = sum(data["sizes"].values())
    if data["kind"] == "partitions":
        trained = (f"Fine-tuned by federated learning ({strategy}) on {total:,} training images of dataset "
                   f"'{dataset}' (split '{config.get('train-split')}'), split over {len(data['sizes'])} simulated "
                   f"nodes with {_partitioning(config)}.")
    else:
        trained = (f"Fine-tuned by federated learning ({strategy}) on the nodes' own data: {total:,} training "
                   f"images as claimed by {len(data.get('nodes') or {})} nodes; the server has seen none of them "
                   f"and cannot confirm their labels or their distribution.")
    items = [trained,
             f"Started from '{results.get('pretrained_from')}' (S sha256 "
             f"{str(results.get('structural_sha256'))[:12]}…); "
             f"{results.get('num_classes')} classes"
             + (f" (labels {config.get('classes')} only)" if config.get("classes") else "") + ".",
             f"Best round chosen by validation ({results.get('validation_source')}); tested once on split "
             f"'{config.get('test-split')}' of '{dataset}': {_pct(results.get('test_accuracy'))} "
             f"(chance: {_pct(1 / results['num_classes']) if results.get('num_classes') else '—'}).",
             f"Not validated outside that distribution: other datasets, image sources, resolutions or label sets "
             f"need their own evaluation before any use."]
    if not config.get("server-validation", True):
        items.append("The best round was chosen on the nodes' self-reported accuracy, which the server screens "
                     "but cannot verify.")
    if _gated(strategy):
        source = "the warm-up rounds' global model" if entry.switches else "the pretrained network"
        items.append(f"FedSQ's gates are fixed by S: which units fire for an input was decided by {source} and "
                     "never trained, so the model only re-weights features S already detects. Q's weights are "
                     "meaningless without that exact S (check its sha256).")
    rejected = sum(r.get("rejected") or 0 for r in rounds)
    bounded = sum(_bounded(r) for r in rounds)
    items.append(f"Replies were screened: {rejected} rejected and {bounded} scaled down over {len(rounds)} rounds. "
                 "Screening bounds what one node can do to the model; it cannot tell a mislabelled but "
                 "well-formed update from an honest one.")
    if len(rounds) < 10 or total < 5000:
        items.append(f"A small run ({len(rounds)} rounds, {total:,} training images): a demonstration of the "
                     "pipeline, not a model to deploy.")
    return "<ul>" + "".join(f"<li>{_e(item)}</li>" for item in items) + "</ul>\n"
