"""Check a rendered ``report.html`` against the run record it was made from (issue 6).

Two passes over the same assertions: the page's markup parsed with the stdlib (always), then the page as headless
Chromium renders it (skipped with ``RLHF_SKIP_BROWSER=1``, the convention of tests/feedback/test_browser.py; a missing
browser fails). The hooks are those rlhf/report.py documents: ``data-metric`` (a dot-joined key path in the record)
with ``data-value`` (the exact value as JSON) on every number, ``data-curve="stage.curve"`` on every plot and one
``<circle data-step data-value>`` per point.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from tests.feedback.browser import SKIP_ENV, find_chromium, launch

SECTIONS = ("summary", "stages", "funnel", "feedback", "training", "eval", "samples")
DASH = "\u2014"


# ------------------------------------------------------------------------------------------------- expectations
def resolve(root: Any, path: str) -> tuple[bool, Any]:
    """``(found, value)`` at a dot-joined path; a dict key may itself hold dots (an annotator called "j.doe"), so
    the longest key that matches is tried first; list indexes are integers."""
    parts = path.split(".")

    def go(node: Any, i: int) -> tuple[bool, Any]:
        if i == len(parts):
            return True, node
        if isinstance(node, list):
            if re.fullmatch(r"-?\d+", parts[i]) and -len(node) <= int(parts[i]) < len(node):
                return go(node[int(parts[i])], i + 1)
            return False, None
        if isinstance(node, dict):
            for j in range(len(parts), i, -1):
                key = ".".join(parts[i:j])
                if key in node:
                    found, value = go(node[key], j)
                    if found:
                        return found, value
        return False, None

    return go(root, 0)


def shows(text: str, value: Any) -> bool:
    """Whether ``text`` is how ``value`` may be shown: a dash for nothing, yes/no, the string itself, or the number
    rounded to the digits the text shows (thousands commas, a % suffix and e-notation allowed)."""
    text = text.strip()
    if value is None:
        return text == DASH
    if isinstance(value, bool):
        return text == ("yes" if value else "no")
    if isinstance(value, str):
        return text == value
    t = text.replace(",", "")
    pct = t.endswith("%")
    m = re.fullmatch(r"-?\d+(?:\.(\d+))?(?:e([+-]?\d+))?", t[:-1] if pct else t)
    if m is None:
        return False
    shown, target = float(m.group(0)), value * 100 if pct else value
    tol = 0.5 * 10 ** (int(m.group(2) or 0) - len(m.group(1) or ""))
    return abs(shown - target) <= tol * (1 + 1e-9) + 1e-12 * abs(target)


def same(a: Any, b: Any) -> bool:
    """Equal, and a bool is not taken for 1 or 0."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def expected_curves(record: dict) -> dict[str, list]:
    training = (record.get("results") or {}).get("training") or {}
    return {f"{stage}.{name}": points for stage, t in training.items() if t
            for name, points in (t.get("curves") or {}).items() if points}


def banner_expected(record: dict) -> bool:
    """Simulation is labelled when the pipeline ran in simulated mode or the pull saw sim-* annotators."""
    feedback = (record.get("results") or {}).get("feedback") or {}
    return (record.get("annotation") or {}).get("mode") == "simulated" or bool(feedback.get("simulated_annotators"))


# ------------------------------------------------------------------------------------------------- assertions
def _check_line(name: str, circles: list[dict], axis: str, data: str, increasing: bool) -> None:
    """Screen positions must be a linear function of the data (higher value -> higher on screen)."""
    pts = [(c[data], c[axis]) for c in circles]
    lo, hi = min(pts), max(pts)
    if hi[0] == lo[0]:
        assert all(abs(p - lo[1]) < 0.75 for _, p in pts), f"{name}: equal {data}s drawn at different {axis}"
        return
    slope = (hi[1] - lo[1]) / (hi[0] - lo[0])
    assert (slope > 0) == increasing, f"{name}: {axis} runs the wrong way"
    for v, p in pts:
        assert abs(lo[1] + slope * (v - lo[0]) - p) < 0.75, f"{name}: point {data}={v} drawn at {axis}={p}, off the line"


def check_facts(facts: dict, record: dict, where: str) -> None:
    """The assertions shared by both passes; ``facts`` as :class:`_Facts` or the browser's script collect them."""
    assert facts["scripts"] == 0, f"{where}: the page holds {facts['scripts']} script elements"
    for sid in SECTIONS:
        assert facts["sections"].get(sid), f"{where}: section #{sid} missing or not visible"
    assert bool(facts["banner"]) == banner_expected(record), (
        f"{where}: simulated banner shown={bool(facts['banner'])}, annotation={record.get('annotation')}")
    assert bool(facts["waiting"]) == (record.get("status") == "waiting"), f"{where}: waiting box vs status"
    assert facts["metrics"], f"{where}: no data-metric elements"
    for m in facts["metrics"]:
        found, value = resolve(record, m["path"])
        shown = json.loads(m["value"])
        assert same(shown, value if found else None), f"{where}: {m['path']}: data-value {shown!r}, record {value!r}"
        assert shows(m["text"], shown), f"{where}: {m['path']}: text {m['text']!r} is not {shown!r} rounded"
        assert m.get("visible", True), f"{where}: {m['path']} is not visible"
    want, got = expected_curves(record), facts["curves"]
    assert sorted(got) == sorted(want), f"{where}: plots {sorted(got)} != curves {sorted(want)}"
    for name, points in want.items():
        circles = got[name]
        assert len(circles) == len(points), f"{where}: {name}: {len(circles)} points drawn, {len(points)} in record"
        drawn = [[json.loads(c["step"]), json.loads(c["value"])] for c in circles]
        assert drawn == points, f"{where}: {name}: drawn points differ from the record's curve"
        for c, (step, value) in zip(circles, points):
            c["s"], c["v"] = step, value
        _check_line(name, circles, "x", "s", increasing=True)
        _check_line(name, circles, "y", "v", increasing=False)


# ------------------------------------------------------------------------------------------------- static pass
class _Facts(HTMLParser):
    """What the markup says (no layout): ids present count as visible, circle positions are their attributes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.facts: dict[str, Any] = {"scripts": 0, "sections": {}, "metrics": [], "curves": {}, "banner": False,
                                      "waiting": False, "external": []}
        self._metric: dict | None = None
        self._curve: str | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        f = self.facts
        f["scripts"] += tag == "script"
        if tag in ("link", "img", "iframe", "object", "embed") or "src" in a or (tag != "a" and "href" in a):
            f["external"].append(f"<{tag} {a}>")
        if a.get("id") in SECTIONS:
            f["sections"][a["id"]] = True
        f["banner"] |= a.get("id") == "simulated-banner"
        f["waiting"] |= a.get("id") == "waiting"
        if "data-metric" in a:
            self._metric = {"path": a["data-metric"], "value": a.get("data-value", "undefined"), "text": ""}
        if tag == "svg" and "data-curve" in a:
            self._curve = a["data-curve"]
            f["curves"].setdefault(self._curve, [])
        if tag == "circle" and self._curve is not None:
            f["curves"][self._curve].append({"step": a.get("data-step"), "value": a.get("data-value"),
                                             "x": float(a["cx"]), "y": float(a["cy"])})

    def handle_endtag(self, tag: str) -> None:
        if tag == "span" and self._metric is not None:
            self.facts["metrics"].append(self._metric)
            self._metric = None
        if tag == "svg":
            self._curve = None

    def handle_data(self, data: str) -> None:
        if self._metric is not None:
            self._metric["text"] += data


def check_static(html_text: str, record: dict) -> dict:
    parser = _Facts()
    parser.feed(html_text)
    facts = parser.facts
    assert not facts["external"], f"markup: the page loads outside resources: {facts['external'][:3]}"
    assert "url(" not in html_text and "@import" not in html_text, "markup: the style sheet loads outside resources"
    check_facts(facts, record, "markup")
    return facts


# ------------------------------------------------------------------------------------------------- browser pass
_COLLECT = """sections => {
  const vis = el => !!el && el.checkVisibility() && el.getBoundingClientRect().height > 0;
  const centre = c => { const r = c.getBoundingClientRect(); return {x: r.x + r.width / 2, y: r.y + r.height / 2}; };
  const curves = {};
  for (const svg of document.querySelectorAll('svg[data-curve]'))
    curves[svg.dataset.curve] = vis(svg) ? [...svg.querySelectorAll('circle')].map(c => (
      {step: c.dataset.step, value: c.dataset.value, ...centre(c)})) : [];
  return {
    scripts: document.querySelectorAll('script').length,
    sections: Object.fromEntries(sections.map(id => [id, vis(document.getElementById(id))])),
    banner: vis(document.getElementById('simulated-banner')), waiting: vis(document.getElementById('waiting')),
    metrics: [...document.querySelectorAll('[data-metric]')].map(el => (
      {path: el.dataset.metric, value: el.dataset.value, text: el.innerText, visible: vis(el)})),
    curves, text: document.body.innerText,
  };
}"""


def check_browser(html_path: Path, record: dict, browser=None) -> dict:
    """Open the page in headless Chromium (``browser``: one already launched, to check many pages with one launch):
    no console or page errors, no requests beyond the file, then the shared assertions on what is rendered
    (visibility, on-screen circle positions). Returns the facts (``text``: the page's visible text)."""
    if browser is None:
        with chromium() as launched:
            return check_browser(html_path, record, launched)
    url = Path(html_path).resolve().as_uri()
    problems: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}")
                if msg.type == "error" else None)
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.route("**/*", lambda route: route.continue_() if route.request.url == url
                   else (problems.append(f"request {route.request.url}"), route.abort()))
        page.goto(url, wait_until="load")
        facts = page.evaluate(_COLLECT, list(SECTIONS))
    finally:
        page.close()
    assert not problems, f"browser: {problems}"
    check_facts(facts, record, "browser")
    return facts


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium launched as tests/feedback/browser.py does; a missing browser fails the test."""
    from playwright.sync_api import sync_playwright

    executable = find_chromium()
    if executable is None:
        pytest.fail(f"no Chromium (/usr/bin/chromium or $RLHF_CHROMIUM): install it or set {SKIP_ENV}=1")
    with sync_playwright() as pw:
        browser = launch(pw, executable)
        try:
            yield browser
        finally:
            browser.close()


def check_report(html_path: Path | str, record: dict) -> dict:
    """Both passes; returns the browser's facts. With RLHF_SKIP_BROWSER=1 the markup pass runs, then the test is
    skipped (an assertion from the markup pass still fails it)."""
    return check_reports([(html_path, record)])[0]


def check_reports(pages: list[tuple[Path | str, dict]]) -> list[dict]:
    """:func:`check_report` for several (page, record) pairs with one browser launch."""
    for html_path, record in pages:
        check_static(Path(html_path).read_text(encoding="utf-8"), record)
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1: browser part of the report check skipped on request")
    with chromium() as browser:
        return [check_browser(Path(html_path), record, browser) for html_path, record in pages]
