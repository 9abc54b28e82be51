"""The report page itself: its title, summary cards, sections in order and footer, written to report.html."""

from __future__ import annotations

from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.common.logger import log

from fedsq_app.runtime.report.card import model_card
from fedsq_app.runtime.report.data import data_summary
from fedsq_app.runtime.report.markup import CSS, code, escape, hash_text, kv_table, num, pct
from fedsq_app.runtime.report.rounds import node_validation, replies, validation
from fedsq_app.util import write_atomic

REPORT_FILE = "report.html"


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


def render_report(results: dict, *, input_spec: Any = None, out_dir: Path | None = None) -> str:
    """The HTML text of the report (``out_dir``: where to look for the label counts CSV if it moved)."""
    config = results.get("config") or {}
    rounds = list(results.get("rounds") or [])
    data = data_summary(results, out_dir)
    title = f"FedSQ run report: {out_dir.name if out_dir else config.get('run-name', '')}"
    sections = [
        _summary(results, config, rounds),
        validation(results, rounds),
        node_validation(results, rounds),
        replies(rounds),
        model_card(results, config, rounds, data, input_spec),
    ]
    body = "\n".join(s for s in sections if s)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body>\n<h1>{escape(title)}</h1>\n{body}\n"
            f"<footer>Written by fedsq_app.runtime.report from results.json; every figure here is in "
            f"results.json or rounds.csv.</footer>\n</body></html>\n")


def _summary(results: dict, config: dict, rounds: list[dict]) -> str:
    cards = [("best validation accuracy", pct(results.get("best_val_accuracy"))),
             ("best round", num(results.get("best_round"))),
             ("test accuracy (best round)", pct(results.get("test_accuracy"))),
             ("test loss", num(results.get("test_loss"))),
             ("rounds run", f"{len(rounds)} of {num(config.get('num-server-rounds'))}"),
             ("wall time", f"{results['total_wall_time_s']:.0f} s"
              if isinstance(results.get("total_wall_time_s"), (int, float)) else "—")]
    html_cards = "".join(f"<div class=\"card\"><b>{v}</b><span>{escape(k)}</span></div>" for k, v in cards)
    facts = [("strategy", code(config.get("strategy"))),
             ("model", code(config.get("model"))),
             ("dataset", code(config.get("dataset"))),
             ("validation", escape(results.get("validation_source"))),
             ("S (structural copy) sha256", hash_text(results.get("structural_sha256")))]
    if results.get("stopped_early"):
        stop = results["stopped_early"]
        facts.append(("stopped early", escape(f"after round {stop.get('after_round')}: no new best validation "
                                              f"accuracy for {stop.get('patience')} rounds (patience)")))
    for resumed in results.get("resumed") or []:
        facts.append(("resumed", escape(f"after round {resumed.get('after_round')} from {resumed.get('from')}")))
    note = ("<p class=\"note\">The test split is touched once, with the best round's model; the best round is "
            "chosen on validation, so the best validation accuracy is an optimistic estimate and the test "
            "accuracy is the one to quote.</p>")
    return f"<section>\n<div class=\"cards\">{html_cards}</div>\n{kv_table(facts)}{note}</section>"
