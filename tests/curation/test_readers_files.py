"""read_text and read_html on tiny hand-written files; expected outputs checked by hand."""

from __future__ import annotations

import pytest

from curation.readers.files import ReadHtml, ReadText, split_front_matter
from curation.steps import CurationError
from tests.curation.helpers import run_step


def run(step, base):
    """All records a reader yields with base_dir = ``base``, and what it sent to rejects as (record, reason)."""
    return run_step(step, base=base)


def test_read_text_markdown_and_plain_text(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "guide.md").write_text("---\ntitle: Roaming guide\ntags: [travel]\n---\n# Roaming\n\nUse a travel pass.\n")
    (docs / "sub" / "notes.md").write_text("Intro line\n\n## Data caps\n\nCaps reset monthly.\n")
    (docs / "sub" / "plain.txt").write_text("  Call 121 for help.\n")
    (docs / "ignored.csv").write_text("a,b\n")

    records, rejects = run(ReadText(paths="docs"), tmp_path)

    assert rejects == []
    by_path = {r["lineage"]["path"]: r for r in records}
    assert sorted(by_path) == ["docs/guide.md", "docs/sub/notes.md", "docs/sub/plain.txt"]  # relative to the recipe
    guide = by_path["docs/guide.md"]
    assert guide["text"] == "# Roaming\n\nUse a travel pass."  # front matter stripped
    assert guide["meta"] == {"title": "Roaming guide"}  # front matter title wins over the heading
    assert by_path["docs/sub/notes.md"]["meta"]["title"] == "Data caps"  # first heading
    assert by_path["docs/sub/plain.txt"] == {
        "id": by_path["docs/sub/plain.txt"]["id"], "source": "read_text",
        "lineage": {"path": "docs/sub/plain.txt", "row": None, "parent": None, "chunk": None},
        "text": "Call 121 for help.", "meta": {"title": "plain"}}
    # Ids are stable: reading again gives the same ones.
    again, _ = run(ReadText(paths="docs"), tmp_path)
    assert [r["id"] for r in again] == [r["id"] for r in records]
    assert len({r["id"] for r in records}) == 3


def test_read_text_non_utf8_is_decoded_and_counted_and_empty_is_dropped(tmp_path):
    (tmp_path / "latin.txt").write_bytes("Caf\xe9 cr\xe8me \u2013 ok".encode("cp1252"))
    (tmp_path / "blank.md").write_text("---\ntitle: Nothing\n---\n\n   \n")
    step = ReadText(paths=["latin.txt", "blank.md"], source="notes")

    records, rejects = run(step, tmp_path)

    assert [r["text"] for r in records] == ["Café crème – ok"]
    assert records[0]["source"] == "notes"
    assert step.counters["non_utf8_files"] == 1
    assert [(rec["lineage"]["path"], reason) for rec, reason in rejects] == [("blank.md", "empty_document")]
    assert step.drops == {"empty_document": 1}


def test_reader_yields_upstream_records_first(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    step = ReadText(paths="a.txt")
    step.base_dir = tmp_path
    out = list(step.run([{"id": "up", "text": "upstream"}]))
    assert [r["text"] for r in out] == ["upstream", "hello"]


def test_no_records_is_an_error_that_says_what_was_dropped(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CurationError, match=r"no records read from empty.txt \(dropped: empty_document=1\)"):
        run(ReadText(paths="empty.txt"), tmp_path)


def test_bad_paths_option_and_missing_input(tmp_path):
    with pytest.raises(CurationError, match="option 'paths'"):
        ReadText(paths="")
    with pytest.raises(CurationError, match="option 'paths'"):
        ReadText(paths=["a.txt", 3])
    with pytest.raises(CurationError, match="input not found"):
        run(ReadText(paths="nope/"), tmp_path)


def test_front_matter_that_is_not_yaml_stays_in_the_text():
    assert split_front_matter("---\n: [unclosed\n---\nbody") == ({}, "---\n: [unclosed\n---\nbody")
    assert split_front_matter("---\na: 1\n---\nbody") == ({"a": 1}, "body")


PAGE = """<!DOCTYPE html>
<html><head><title>Roaming charges | Acme Telecom</title></head><body>
<nav><ul><li><a href="/">Home</a></li><li><a href="/plans">Plans</a></li>
<li><a href="/help">Help centre</a></li></ul></nav>
<div class="cookie-banner">We use cookies to improve your experience. Accept all cookies.</div>
<main><article><h1>Roaming charges explained</h1>
<p>When you travel abroad, your phone connects to a partner network and roaming charges apply to calls and data.</p>
<p>In the EU you can roam like at home: your plan allowance is used at no extra cost up to the fair use limit.</p>
<p>Outside the EU, buy a travel pass before you leave to cap your daily spend at a fixed price per day.</p>
</article></main>
<footer><p>Copyright 2024 Acme Telecom. All rights reserved.</p><a href="/privacy">Privacy policy</a></footer>
</body></html>"""


def test_read_html_keeps_main_text_and_drops_boilerplate(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "roaming.html").write_text(PAGE)
    (tmp_path / "site" / "menu.htm").write_text(
        "<html><body><nav><ul><li><a href='/'>Home</a></li><li><a href='/p'>Plans</a></li></ul></nav>"
        "<div id='cookie-banner'>We use cookies. Accept all cookies.</div>"
        "<footer><p>Copyright 2024 Acme Telecom. All rights reserved.</p></footer></body></html>")
    step = ReadHtml(paths="site")

    records, rejects = run(step, tmp_path)

    assert len(records) == 1
    text = records[0]["text"]
    assert text.splitlines() == [  # paragraphs stay on separate lines
        "Roaming charges explained",
        "When you travel abroad, your phone connects to a partner network and roaming charges apply to calls and data.",
        "In the EU you can roam like at home: your plan allowance is used at no extra cost up to the fair use limit.",
        "Outside the EU, buy a travel pass before you leave to cap your daily spend at a fixed price per day.",
    ]
    for boilerplate in ("Home", "Plans", "Help centre", "cookies", "Copyright", "Privacy policy"):
        assert boilerplate not in text
    assert records[0]["meta"] == {"title": "Roaming charges explained"}  # trafilatura prefers the <h1> here
    assert [(rec["lineage"]["path"], reason) for rec, reason in rejects] == [("site/menu.htm", "no_main_text")]
    assert rejects[0][0]["text"].startswith("<html><body><nav>")  # the start of the page, for review


def test_read_html_option_validation():
    with pytest.raises(CurationError, match="'favor_precision'"):
        ReadHtml(paths="x", favor_precision="yes")
