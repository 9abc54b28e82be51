"""The report's per-round sections: validation per round (curves and table), each node's own validation, and
what became of every reply (accepted, bounded, rejected and why, missing)."""

from __future__ import annotations

import re
from typing import Iterable, Iterator

from fedsq_app.runtime.report import plots
from fedsq_app.runtime.report.markup import escape, note, num, pct, section, table


def with_initial(results: dict, rounds: list[dict]) -> list[dict]:
    """Round 0 (the start model, ``results["initial"]``) followed by the rounds."""
    initial = results.get("initial")
    return ([{"round": 0, **initial}] if isinstance(initial, dict) else []) + rounds


def _bounded_replies(record: dict) -> Iterator[dict]:
    """A round's accepted replies that the influence bound or the norm clip scaled down."""
    return (r for r in record.get("replies") or []
            if r.get("accepted") and isinstance(r.get("clip_scale"), (int, float)) and r["clip_scale"] < 1)


def bounded(record: dict) -> int:
    """How many of a round's accepted replies were scaled down."""
    return sum(1 for _ in _bounded_replies(record))


# -- validation per round ------------------------------------------------------------------------------------


def validation(results: dict, rounds: list[dict]) -> str:
    return section("Validation per round", _curves(results, rounds) + _round_table(results, rounds))


def _curves(results: dict, rounds: list[dict]) -> str:
    points = with_initial(results, rounds)
    if not points:
        return note("No round finished: nothing to plot.")
    return plots.curves(results, points)


def _round_table(results: dict, rounds: list[dict]) -> str:
    points = with_initial(results, rounds)
    best = results.get("best_round")
    rows, classes = [], []
    for p in points:
        start = p.get("round") == 0
        rows.append([num(p.get("round")), pct(p.get("val_accuracy")), num(p.get("val_loss")),
                     num(p.get("train_loss")),
                     "" if start else num(p.get("expected")), "" if start else num(p.get("received")),
                     "" if start else num(p.get("accepted")), "" if start else num(bounded(p)),
                     "" if start else num(p.get("rejected")),
                     "start model" if start else ("yes" if p.get("aggregated") else "no: kept the previous model"),
                     num(p.get("wall_time_s"), 1)])
        classes.append("best" if p.get("round") == best else "")
    return table(["round", "val accuracy", "val loss", "train loss", "asked", "replied", "accepted", "bounded",
                  "rejected", "aggregated", "wall time (s)"], rows, numeric={0, 1, 2, 3, 4, 5, 6, 7, 8, 10},
                 row_classes=classes) + note("Highlighted: the best round, whose model was tested.")


# -- each silo's own validation ------------------------------------------------------------------------------


def node_validation(results: dict, rounds: list[dict]) -> str:
    points = [p for p in with_initial(results, rounds) if isinstance(p.get("node_validation"), dict)]
    if not points:
        return ""
    nodes = sorted({n for p in points for n in (p["node_validation"].get("nodes") or {})}, key=str)
    label = {n: f"node {n}" for n in nodes}
    body = []
    if nodes:
        body.append(plots.node_accuracy(points, nodes, label))
    rows = []
    for p in points:
        validation = p["node_validation"]
        per_node = validation.get("nodes") or {}
        cells = [num(p.get("round")), pct(validation.get("accuracy")), num(validation.get("num_examples"))]
        for node in nodes:
            entry = per_node.get(node)
            cells.append(f"{pct(entry.get('accuracy'))} ({num(entry.get('num_examples'))})" if entry else "—")
        cells.append(num(len(validation.get("rejected") or [])))
        rows.append(cells)
    header = ["round", "mean (server's weights)", "samples"] + [label[n] for n in nodes] + ["rejected"]
    body.append(table(header, rows, numeric=set(range(len(nodes) + 4))))
    body.append(note("Each cell: the node's accuracy on its own held-out data (its sample count); "
                     "the server cannot check these figures, it can only screen them."))
    return section("Each node's own validation", "".join(body))


# -- replies -------------------------------------------------------------------------------------------------


def replies(rounds: list[dict]) -> str:
    if not rounds:
        return ""
    scaled = [bounded(r) for r in rounds]
    figure = plots.reply_outcomes([r.get("round") for r in rounds],
                                  accepted=[max((r.get("accepted") or 0) - b, 0) for r, b in zip(rounds, scaled)],
                                  bounded=scaled, rejected=[r.get("rejected") or 0 for r in rounds],
                                  missing=[r.get("missing") or 0 for r in rounds])
    return section("Replies: accepted, bounded, rejected", figure + _reasons(rounds))


def _reason_kind(reason: str) -> str:
    # The same check with different numbers is one kind of rejection.
    return re.sub(r"[-+]?\d+(\.\d+)?([eE][-+]?\d+)?", "#", reason)


def _rejections(rounds: list[dict]) -> Iterator[tuple[object, object, str]]:
    """(round, node id, reason) of every rejected reply: training replies, then validation replies, by round."""
    for record in rounds:
        for rejection in record.get("rejections") or []:
            yield record.get("round"), rejection.get("node_id"), str(rejection.get("reason") or "(no reason given)")
        for rejection in (record.get("node_validation") or {}).get("rejected") or []:
            yield (record.get("round"), rejection.get("node_id"),
                   "validation reply: " + str(rejection.get("reason") or "(no reason given)"))


def _reasons(rounds: list[dict]) -> str:
    kinds: dict[str, dict] = {}
    for round_, node_id, reason in _rejections(rounds):
        entry = kinds.setdefault(_reason_kind(reason), {"count": 0, "rounds": set(), "nodes": set(),
                                                        "example": reason})
        entry["count"] += 1
        entry["rounds"].add(round_)
        entry["nodes"].add(node_id)
    scaled = [(record.get("round"), r.get("clip_scale")) for record in rounds for r in _bounded_replies(record)]
    parts = ["<h3>Rejection reasons</h3>\n"]
    if not kinds:
        parts.append("<p>No reply was rejected.</p>\n")
    else:
        rows = [[num(k["count"]), escape(_ranges(k["rounds"])), num(len(k["nodes"])), escape(k["example"])]
                for k in sorted(kinds.values(), key=lambda k: -k["count"])]
        parts.append(table(["replies", "rounds", "nodes", "reason (one example; numbers vary)"], rows,
                           numeric={0, 2}))
    parts.append("<h3>Bounded replies</h3>\n")
    if not scaled:
        parts.append("<p>No accepted reply was scaled down.</p>\n")
    else:
        scales = [s for _, s in scaled]
        parts.append(f"<p>{len(scaled)} accepted replies were scaled down by the influence bound or the norm clip "
                     f"(clip scale min {min(scales):.3f}, median {sorted(scales)[len(scales) // 2]:.3f}) in rounds "
                     f"{escape(_ranges({r for r, _ in scaled}))}.</p>\n")
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
