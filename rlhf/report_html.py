"""Issue 6: the HTML and SVG building blocks of ``report.html``: number formatting, the test-hooked number span,
tables, sections, the inline SVG line plot and the page's style sheet.

Split from rlhf/report.py (which reads the stage outputs and lays out the page) so neither module outgrows the size
guideline; nothing here knows the pipeline record's layout beyond "a key path into a dict". Stdlib only, like
rlhf/report.py: ``import rlhf.report`` must stay instant and pull in no third-party module
(tests/rlhf/test_report.py checks it). The hooks tests/rlhf/report_check.py reads are made here: ``data-metric`` /
``data-value`` on every number (`num`), ``data-curve`` and one ``<circle>`` per point on every plot (`plot`).
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

DASH = "\u2014"


# ------------------------------------------------------------------------------------------------------- numbers
def fmt(v: Any, pct: bool = False) -> str:
    """How a value is shown: report_check.py accepts the text when it is the value rounded to the digits shown."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return DASH
    if isinstance(v, bool):
        return "yes" if v else "no"
    if pct and isinstance(v, (int, float)):
        return f"{v * 100:.1f}%"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v == 0 or (v.is_integer() and abs(v) < 1e15):
            return f"{int(v):,}"
        if abs(v) >= 1e4:
            return f"{v:,.0f}"
        if abs(v) < 1e-3:
            return f"{v:.2e}"
        text = f"{v:.{max(0, 3 - math.floor(math.log10(abs(v))))}f}"  # 4 significant digits
        return text.rstrip("0").rstrip(".") if "." in text else text
    return str(v)


def lookup(root: Any, keys: tuple) -> Any:
    """The value at the key path ``keys`` (dict keys, list indexes) in ``root``; None where the path breaks."""
    for k in keys:
        if isinstance(root, dict):
            root = root.get(k)
        elif isinstance(root, list) and isinstance(k, int) and -len(root) <= k < len(root):
            root = root[k]
        else:
            return None
    return root


def num(record: dict, *keys: Any, pct: bool = False) -> str:
    """The value at ``keys`` in ``record`` as a span with its test hooks; a missing value shows a dash."""
    v = lookup(record, keys)
    path = html.escape(".".join(str(k) for k in keys))
    return (f'<span class="num" data-metric="{path}" data-value="{html.escape(json.dumps(v))}">'
            f"{html.escape(fmt(v, pct))}</span>")


# ------------------------------------------------------------------------------------------------------- markup
def esc(v: Any) -> str:
    """``v`` as escaped text; None shows a dash."""
    return DASH if v is None else html.escape(str(v))


def table(head: list[str], rows: list[list[str]], empty: str = "not run") -> str:
    """Cells are HTML already (escape data before); no rows -> a dash line."""
    if not rows:
        return f'<p class="none">{DASH} {html.escape(empty)}</p>'
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def section(sid: str, title: str, *parts: str) -> str:
    return f'<section id="{sid}"><h2>{html.escape(title)}</h2>{"".join(parts)}</section>'


# ------------------------------------------------------------------------------------------------------- plots
def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round-number ticks (1, 2, 2.5, 5 x 10^k) covering [lo, hi]."""
    if hi - lo < 1e-12 * max(abs(lo), abs(hi), 1e-300):
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / (n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first = math.floor(lo / step + 1e-9)
    ticks = [first * step]
    while ticks[-1] < hi - step * 1e-9 and len(ticks) < 3 * n:
        ticks.append((first + len(ticks)) * step)
    return ticks


def plot(curve_id: str, points: list, ylabel: str, width: int = 330, height: int = 190) -> str:
    """An SVG line plot of ``[[step, value], ...]`` with axes, round ticks and one circle per point."""
    left, right, top, bottom = 56, 10, 18, 34
    xt = _ticks(min(p[0] for p in points), max(p[0] for p in points))
    yt = _ticks(min(p[1] for p in points), max(p[1] for p in points))

    def sx(x: float) -> float:
        return left + (x - xt[0]) / (xt[-1] - xt[0]) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (y - yt[0]) / (yt[-1] - yt[0]) * (height - top - bottom)

    cid = html.escape(curve_id)
    svg = (f'<svg class="plot" data-curve="{cid}" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
           f'role="img" aria-label="{cid}"><text x="{left}" y="12" class="title">{html.escape(ylabel)}</text>')
    out = [svg]
    for y in yt:
        out.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}"/>'
                   f'<text x="{left - 4}" y="{sy(y) + 3:.1f}" text-anchor="end">{y:.4g}</text>')
    for x in xt:
        out.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 13}" text-anchor="middle">{x:g}</text>')
    out.append(f'<line class="axis" x1="{left}" x2="{left}" y1="{top}" y2="{height - bottom}"/>'
               f'<line class="axis" x1="{left}" x2="{width - right}" y1="{height - bottom}" y2="{height - bottom}"/>'
               f'<text x="{(left + width - right) / 2}" y="{height - 4}" text-anchor="middle">step</text>')
    out.append('<polyline points="' + " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points) + '"/>')
    r = 2.5 if len(points) <= 100 else 1.2
    out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{r}" data-step="{json.dumps(x)}" '
            f'data-value="{json.dumps(y)}"><title>step {x:g}: {fmt(y)}</title></circle>' for x, y in points]
    return "".join(out) + "</svg>"


# ------------------------------------------------------------------------------------------------------- style
# inline, no url() or @import: the page loads nothing from outside (report_check.py's static check)
CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1180px;padding:16px;color:#1d2433}
h1{margin:0 0 4px}h2{border-bottom:2px solid #d8dee9;padding-bottom:3px;margin-top:28px}h3{margin:18px 0 6px}
h4{margin:8px 0 2px;font-size:13px}table{border-collapse:collapse;margin:6px 0}
td,th{border:1px solid #d8dee9;padding:2px 8px;text-align:left;vertical-align:top}th{background:#eef1f6}
.num{font-variant-numeric:tabular-nums}.small{font-size:12px;color:#56607a}.none{color:#7a8399}
.badge{padding:1px 8px;border-radius:9px;color:#fff;background:#7a8399}.finished{background:#2e7d32}
.running{background:#1565c0}.waiting{background:#ef6c00}.failed{background:#c62828}
.error{background:#ffebee;border:2px solid #c62828;padding:8px 12px;white-space:pre-wrap}
.banner{background:#b71c1c;color:#fff;font-weight:700;padding:10px 14px;margin:10px 0;border-radius:4px}
div.waiting{background:#fff3e0;border:2px solid #ef6c00;padding:10px 14px;margin:10px 0;color:#1d2433}
.bar{background:#5c7cfa;height:10px;min-width:1px}.cols{display:flex;gap:28px;flex-wrap:wrap}
.plots{display:flex;flex-wrap:wrap;gap:8px}.plot{border:1px solid #d8dee9;background:#fff}
.plot text{font-size:10px;fill:#56607a}.plot .title{font-size:11px;fill:#1d2433}.plot .grid{stroke:#eef1f6}
.plot .axis{stroke:#56607a}.plot polyline{fill:none;stroke:#3b5bdb;stroke-width:1.5}.plot circle{fill:#3b5bdb}
.sample{border:1px solid #d8dee9;padding:8px;margin:10px 0}
.side{display:grid;grid-template-columns:1fr 1fr 1fr;gap:8px}
.text{white-space:pre-wrap;background:#f6f8fb;padding:4px 6px;font-family:ui-monospace,monospace;font-size:12px}"""
