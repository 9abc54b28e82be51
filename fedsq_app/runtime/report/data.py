"""What the model trained on: the partitions' label counts (from the CSV results.json names) or the silos'
own claims (from their replies), and the model card's Data part drawn from them."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from fedsq_app.runtime.report import plots
from fedsq_app.runtime.report.markup import code, escape, note, num, pct, table

MAX_LABEL_COLUMNS = 20  # wider label tables are summarised (size, labels present, largest label's share)


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
    why = distribution.get("skipped") or distribution.get("error") or distribution.get("pending") \
        if isinstance(distribution, dict) else None
    return {"kind": "nodes", "nodes": dict(claims), "labels": {},
            "sizes": {n: c["num_examples"] for n, c in claims.items() if isinstance(c["num_examples"], int)},
            "note": why}


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


def partitioning(config: dict) -> str:
    """How the simulation split the training pool, in words."""
    partitioner = config.get("partitioner")
    if partitioner == "dirichlet":
        return f"Dirichlet label skew α = {config.get('alpha')}"
    if partitioner == "pathological":
        return f"pathological: {config.get('classes-per-client')} classes per partition"
    if partitioner == "iid":
        return "IID (no label skew)"
    return f"partitioner {partitioner}"


def data_section(results: dict, config: dict, data: dict) -> str:
    """The model card's Data part, from ``data_summary``'s dict."""
    if data["kind"] == "partitions":
        return _partitions(config, data)
    return _nodes(results, data)


def _partitions(config: dict, data: dict) -> str:
    sizes, labels = data["sizes"], data["labels"]
    names = list(next(iter(labels.values())).keys()) if labels else []
    total = sum(sizes.values())
    parts = [f"<p>The server's training pool of {code(config.get('dataset'))} "
             f"(split {code(config.get('train-split'))}): {total:,} images over {len(sizes)} "
             f"partitions, {escape(partitioning(config))}. Each node trained on its partition.</p>\n",
             plots.label_distribution(labels)]
    if len(names) <= MAX_LABEL_COLUMNS:
        rows = [[escape(p), num(sizes[p])] + [num(c.get(n, 0)) for n in names] for p, c in labels.items()]
        parts.append(table(["partition", "images"] + [f"label {n}" for n in names], rows,
                           numeric=set(range(1, len(names) + 2))))
    else:
        rows = [[escape(p), num(sizes[p]), num(sum(1 for v in c.values() if v)),
                 pct(max(c.values()) / sizes[p] if sizes[p] else None)] for p, c in labels.items()]
        parts.append(table(["partition", "images", "labels present", "largest label's share"], rows,
                           numeric={1, 2, 3}))
    return "".join(parts)


def _nodes(results: dict, data: dict) -> str:
    nodes = data.get("nodes") or {}
    parts = []
    if data.get("note"):
        parts.append(note(f"{escape(data['note'])}."))
    if not nodes:
        parts.append("<p>No node replied: nothing is known about the data.</p>\n")
        return "".join(parts)
    total = sum(data["sizes"].values())
    parts.append(f"<p>The nodes' own data, as each claimed in its replies (the server never sees it and weighs "
                 f"nodes by {escape(_weights_from(results))}, never by these claims): {total:,} training images "
                 f"over {len(nodes)} nodes. Label distributions stay with the nodes.</p>\n")
    rows = [[escape(n), num(c["num_examples"]), num(c["weight"]), num(c["accepted"]), num(c["rejected"])]
            for n, c in sorted(nodes.items())]
    parts.append(table(["node id", "training images (claimed)", "server weight", "replies accepted",
                        "replies rejected"], rows, numeric={1, 2, 3, 4}))
    return "".join(parts)


def _weights_from(results: dict) -> str:
    sources = {r.get("weights_from") for r in results.get("rounds") or [] if r.get("weights_from")}
    return ", ".join(sorted(sources)) or "the server's weights"
