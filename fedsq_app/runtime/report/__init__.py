"""A run's human-readable report: one self-contained HTML page, ``report.html``, next to results.json.

``write_report(out_dir, results)`` reads results.json's dict (and the label counts CSV it names, if it is
still there) and writes the page: validation and train curves, each silo's own validation, what became of
every reply, and a model card (architecture, S's provenance and hash, the data, the config, the trust
settings, intended use and limits). Plots are PNGs embedded as data URIs, the CSS is inline: the page opens
offline, mailed or archived on its own. Every string from the run (config values, node replies' reasons)
is untrusted and escaped.

By job: ``page`` (the page, its order and the file), ``rounds`` (the per-round sections), ``data`` (what the
model trained on), ``card`` (the model card), ``plots`` (the figures), ``markup`` (HTML pieces and escaping).
"""

from fedsq_app.runtime.report.card import TRUST_KEYS
from fedsq_app.runtime.report.data import MAX_LABEL_COLUMNS, data_summary
from fedsq_app.runtime.report.markup import CSS
from fedsq_app.runtime.report.page import REPORT_FILE, render_report, write_report, write_report_or_warn

__all__ = ["CSS", "MAX_LABEL_COLUMNS", "REPORT_FILE", "TRUST_KEYS", "data_summary", "render_report", "write_report",
           "write_report_or_warn"]
