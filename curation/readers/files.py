"""Readers of whole documents, one record per file: plain text / Markdown (``read_text``) and web pages
(``read_html``). Also the base class every file reader shares: option ``paths`` resolved against the recipe folder,
option ``source`` stamped on each record, lazy file-by-file reading, and a clear error when nothing was read.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from curation.records import Record, make_lineage, new_record
from curation.steps import CurationError, Reader, expand_paths, read_text_file, register


@dataclass
class PathReader(Reader):
    """A reader of files named by ``paths``. Subclasses set ``suffixes`` and implement :meth:`read_file`."""

    paths: str | list[str] = ""  # files, folders (searched recursively) or glob patterns, relative to the recipe
    source: str = ""  # short label stored in every record's `source`; default: the step's type name

    suffixes: ClassVar[tuple[str, ...]] = ()  # what a folder in `paths` is searched for

    def __post_init__(self) -> None:
        items = [self.paths] if isinstance(self.paths, str) else self.paths
        if not isinstance(items, list) or not items or not all(isinstance(p, str) and p for p in items):
            raise CurationError(f"{self.type_name}: option 'paths' must be a path or a list of paths, "
                                f"got {self.paths!r}")
        if not isinstance(self.source, str):
            raise CurationError(f"{self.type_name}: option 'source' must be a string, got {self.source!r}")
        self.source = self.source or self.type_name

    def files(self) -> list[Path]:
        return expand_paths(self.paths, self.base_dir, self.suffixes)

    def read(self) -> Iterator[Record]:
        n = 0
        for path in self.files():  # resolved here, not in __post_init__: base_dir is set after construction
            for record in self.read_file(path):
                n += 1
                yield record
        if n == 0:
            dropped = ", ".join(f"{reason}={k}" for reason, k in sorted(self.drops.items()))
            raise CurationError(f"no records read from {self.paths}" + (f" (dropped: {dropped})" if dropped else ""))

    def read_file(self, path: Path) -> Iterator[Record]:
        raise NotImplementedError

    def drop_file(self, path: Path, text: str, reason: str) -> None:
        """A file that yields no record goes to rejects with the start of its text, so a reviewer can see why."""
        self.drop({"lineage": make_lineage(self.where(path), None), "text": text[:500]}, reason)


# --- Markdown helpers (also used by the FAQ reader) -------------------------------------------------------------

# YAML front matter as Jekyll/Hugo write it: a block between '---' lines at the very start of the file.
_FRONT_MATTER_RE = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n(?:---|\.\.\.)[ \t]*(?:\r?\n|\Z)", re.S)
# An ATX heading (CommonMark: up to 3 spaces of indent, 1-6 '#', optional closing '#'s).
_HEADING_RE = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_FENCE_RE = re.compile(r"^ {0,3}(```|~~~)")


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """``(front matter, body)``. A leading block that is not valid YAML is not front matter (a document may open
    with a '---' rule), so it stays in the body."""
    m = _FRONT_MATTER_RE.match(text)
    if not m:
        return {}, text
    import yaml

    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return {}, text
    if data is not None and not isinstance(data, dict):
        return {}, text
    return data or {}, text[m.end():]


def markdown_lines(text: str) -> Iterator[tuple[int, str, str | None]]:
    """``(line number, line, heading text or None)`` for each line; '#' lines inside code fences are not headings."""
    fence: str | None = None
    for line_no, line in enumerate(text.splitlines(), start=1):
        m = _FENCE_RE.match(line)
        if m:
            fence = None if fence == m.group(1) else (fence or m.group(1))
        heading = None
        if fence is None and not m:
            h = _HEADING_RE.match(line)
            if h:
                heading = h.group(2).strip()
        yield line_no, line, heading


def markdown_title(front_matter: dict[str, Any], body: str, skip_questions: bool = False) -> str | None:
    """The front matter's ``title``, else the first heading's text (on FAQ pages: the first that is not a question)."""
    if isinstance(front_matter.get("title"), str) and front_matter["title"].strip():
        return front_matter["title"].strip()
    return next((h for _, _, h in markdown_lines(body) if h and not (skip_questions and h.endswith("?"))), None)


# --- Readers ----------------------------------------------------------------------------------------------------


@register("read_text")
@dataclass
class ReadText(PathReader):
    """Plain-text and Markdown files, one record per file; Markdown front matter is stripped."""

    suffixes: ClassVar[tuple[str, ...]] = (".txt", ".md", ".markdown")

    def read_file(self, path: Path) -> Iterator[Record]:
        text = read_text_file(path, self.counters)
        title = None
        if path.suffix.lower() in (".md", ".markdown"):
            front_matter, text = split_front_matter(text)
            title = markdown_title(front_matter, text)
        text = text.strip()
        if not text:
            self.drop_file(path, text, "empty_document")
            return
        yield new_record(self.source, self.where(path), None, text=text, meta={"title": title or path.stem})


@register("read_html")
@dataclass
class ReadHtml(PathReader):
    """Web pages, one record per file: the main text as trafilatura extracts it (Barbaresi, ACL 2021 demos), with
    navigation, cookie banners, footers and comment threads left out; paragraphs on separate lines."""

    favor_precision: bool = True  # trafilatura's precision mode: drop borderline text (link lists, banners)
    include_tables: bool = True  # keep the text of <table> elements (price lists, plan comparisons)

    suffixes: ClassVar[tuple[str, ...]] = (".html", ".htm")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("favor_precision", "include_tables"):
            if not isinstance(getattr(self, name), bool):
                raise CurationError(f"read_html: option '{name}' must be true or false, got {getattr(self, name)!r}")

    def read_file(self, path: Path) -> Iterator[Record]:
        import trafilatura

        html = read_text_file(path, self.counters)
        doc = trafilatura.bare_extraction(html, with_metadata=True, include_comments=False,
                                          include_tables=self.include_tables, favor_precision=self.favor_precision)
        text = (doc.text or "").strip() if doc is not None else ""
        if not text:
            self.drop_file(path, html, "no_main_text")
            return
        title = (doc.title or "").strip() or path.stem
        yield new_record(self.source, self.where(path), None, text=text, meta={"title": title})
