"""The report page's HTML building blocks: escaping, number formats, sections, tables, and the inline CSS.

Every string from a run (config values, node replies' reasons) is untrusted: it goes through ``escape``.
"""

from __future__ import annotations

import html
import math
from typing import Any, Iterable

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


def escape(value: Any) -> str:
    """Escaped text: everything a run recorded may come from a config file or a node's reply."""
    return html.escape("" if value is None else str(value), quote=True)


def code(value: Any) -> str:
    return f"<code>{escape(value)}</code>"


def hash_text(value: Any) -> str:
    return f"<span class=\"hash\">{escape(value)}</span>"


def num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return "—" if not math.isfinite(value) else f"{value:.{digits}f}"
    return escape(value)


def pct(value: Any) -> str:
    return "—" if not isinstance(value, (int, float)) or isinstance(value, bool) else f"{100 * value:.2f} %"


def section(title: str, body: str) -> str:
    return f"<section><h2>{escape(title)}</h2>\n{body}</section>"


def table(header: Iterable[str], rows: Iterable[Iterable[str]], numeric: set[int] = frozenset(),
          row_classes: Iterable[str] | None = None) -> str:
    """A table from already-escaped cells; columns in ``numeric`` are right-aligned."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    classes = list(row_classes) if row_classes is not None else None
    lines = []
    for i, row in enumerate(rows):
        cells = "".join(f"<td class=\"n\">{c}</td>" if j in numeric else f"<td>{c}</td>" for j, c in enumerate(row))
        cls = f" class=\"{classes[i]}\"" if classes and classes[i] else ""
        lines.append(f"<tr{cls}>{cells}</tr>")
    return f"<div class=\"scroll\"><table><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(lines) + \
        "\n</tbody></table></div>\n"


def kv_table(pairs: Iterable[tuple[str, str]]) -> str:
    """Rows of a key (escaped here) and an already-escaped value."""
    return "<table class=\"kv\">" + "".join(f"<tr><th>{escape(k)}</th><td>{v}</td></tr>" for k, v in pairs) + \
        "</table>\n"


def note(text: str) -> str:
    """A grey paragraph from already-escaped text."""
    return f"<p class=\"note\">{text}</p>\n"
