"""Text cleaning mappers: Unicode repair and boilerplate-line removal.

Both work on every text field of a record through :func:`map_texts`, so raw documents, conversations, preference rows
and ranked candidates are cleaned alike. A mapper never drops: a text emptied by cleaning stays in the stream and the
quality filters downstream drop it with a reason, so the rejects file says why it went.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

from curation.records import Record, map_texts
from curation.steps import CurationError, Mapper, register

_NORMAL_FORMS = ("NFC", "NFKC", "NFD", "NFKD")

# C0/C1 control characters except \t and \n. ftfy's own remove_control_chars keeps \f, \v and \r on purpose (they
# "have a displayed effect"); in training text they are noise, and line breaks are unified to \n just before.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Runs of 2+ horizontal whitespace (spaces, NBSP, ideographic space...) after a non-space character. Leading
# indentation is left alone: code snippets and nested lists in support documents depend on it.
_INNER_SPACE_RE = re.compile(r"(?<=\S)[^\S\n]{2,}")
_TRAILING_SPACE_RE = re.compile(r"[^\S\n]+$", re.MULTILINE)
_BLANK_LINES_RE = re.compile(r"\n{3,}")


def normalize_whitespace(text: str) -> str:
    """Collapse inner runs of spaces, strip line ends, keep at most one blank line between paragraphs."""
    text = _INNER_SPACE_RE.sub(" ", text)
    text = _TRAILING_SPACE_RE.sub("", text)
    return _BLANK_LINES_RE.sub("\n\n", text).strip("\n")


@register("fix_text")
@dataclass
class FixText(Mapper):
    """Repair broken Unicode (mojibake such as ``cafÃ©``), normalise it, tidy control characters and whitespace."""

    unicode: bool = True  # repair mojibake, HTML entities, C1 controls... with ftfy
    uncurl_quotes: bool = False  # let ftfy turn curly quotes into straight ones (off: they are legitimate text)
    normalization: str | None = "NFC"  # Unicode normal form (NFC, NFKC, NFD, NFKD) or null to leave it as is
    whitespace: bool = True  # collapse space runs, strip trailing spaces, cap blank lines at one

    def __post_init__(self) -> None:
        for name in ("unicode", "uncurl_quotes", "whitespace"):
            if not isinstance(getattr(self, name), bool):
                raise CurationError(f"fix_text: {name} must be true or false, got {getattr(self, name)!r}")
        if self.normalization is not None and self.normalization not in _NORMAL_FORMS:
            raise CurationError(f"fix_text: normalization must be one of {', '.join(_NORMAL_FORMS)} or null, "
                                f"got {self.normalization!r}")

    def apply(self, record: Record) -> Record:
        return map_texts(record, self.fix)

    def fix(self, text: str) -> str:
        """One text, cleaned; counts texts changed and texts whose mojibake ftfy repaired."""
        out = text
        if self.unicode:
            import ftfy  # lazy: only recipes that clean text pay for the import

            # fix_text works line by line, so one bad line does not stop the rest being decoded; it gives no
            # explanation in that mode, so "was this mojibake?" is asked of ftfy's own badness heuristic instead.
            out = ftfy.fix_text(out, uncurl_quotes=self.uncurl_quotes, normalization=self.normalization)
            if out != text and ftfy.badness.is_bad(text):
                self.counters["mojibake_fixed"] += 1
        elif self.normalization is not None:
            out = unicodedata.normalize(self.normalization, out)
        out = _CONTROL_RE.sub("", out.replace("\r\n", "\n").replace("\r", "\n"))
        if self.whitespace:
            out = normalize_whitespace(out)
        if out != text:
            self.counters["texts_changed"] += 1
        return out


# Lines that are page furniture rather than content. Each pattern is searched (case-insensitively) in a stripped
# line. C4 (Raffel et al. 2020, sec. 2.2) drops lines mentioning "javascript" and pages with cookie notices for the
# same reason; here only the line goes, and only a short one (see ``max_words``).
DEFAULT_BOILERPLATE = [
    r"\b(we|this (web)?site) uses? cookies\b",
    r"\b(accept|reject|manage) (all )?cookies\b",
    r"\bcookie (policy|settings|preferences|consent)\b",
    r"\ball rights reserved\b",
    r"^(©|\(c\)|copyright\b)",
    r"\b(subscribe|sign up) (to|for) (our|the) newsletter\b",
    r"\bclick here\b",
    r"\bshare (this )?(on|via) (facebook|twitter|x|linkedin|whatsapp|pinterest|reddit|e-?mail)\b",
    r"\bfollow us on\b",
    r"\b(skip to (main )?content|back to top)\b",
    r"\b(enable|requires?) javascript\b|\bjavascript is (disabled|required)\b",
    r"\b(privacy policy|terms of (use|service)|terms (and|&) conditions)\b",
    r"^home\s*[>»›]\s*\S|^home\s+[|/]\s+\S",  # breadcrumbs: "Home > Support > Billing"
    r"^([^>»›]{1,40}\s[>»›]\s){2,}[^>»›]{1,40}$",  # breadcrumbs without "Home": "Help › Mobile › Roaming"
]


@register("drop_boilerplate_lines")
@dataclass
class DropBoilerplateLines(Mapper):
    """Remove boilerplate lines (cookie banners, copyright footers, share buttons, breadcrumbs) from each text.

    Per record only: a line repeated across many documents is the deduplication step's business."""

    patterns: list[str] = field(default_factory=lambda: list(DEFAULT_BOILERPLATE))  # regexes; replace the defaults
    extra_patterns: list[str] = field(default_factory=list)  # regexes added to ``patterns``
    max_words: int | None = 25  # only lines up to this many words are candidates (null: any line)

    def __post_init__(self) -> None:
        if self.max_words is not None and (not isinstance(self.max_words, int) or self.max_words < 1):
            raise CurationError(f"drop_boilerplate_lines: max_words must be >= 1 or null, got {self.max_words!r}")
        compiled = []
        for key in ("patterns", "extra_patterns"):
            value = getattr(self, key)
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                raise CurationError(f"drop_boilerplate_lines: {key} must be a list of regular expressions, "
                                    f"got {value!r}")
            for p in value:
                try:
                    compiled.append(re.compile(p, re.IGNORECASE))
                except re.error as e:
                    raise CurationError(f"drop_boilerplate_lines: bad regular expression in {key}: "
                                        f"{p!r} ({e})") from None
        # Compiled patterns are rebuilt from the options, so they live under "_" and are not pickled to workers.
        self._compiled = compiled

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__post_init__()

    def apply(self, record: Record) -> Record:
        return map_texts(record, self.clean)

    def is_boilerplate(self, line: str) -> bool:
        line = line.strip()
        if not line or (self.max_words is not None and len(line.split()) > self.max_words):
            return False
        return any(p.search(line) for p in self._compiled)

    def clean(self, text: str) -> str:
        lines = text.split("\n")
        kept = [line for line in lines if not self.is_boilerplate(line)]
        if len(kept) == len(lines):
            return text
        self.counters["lines_removed"] += len(lines) - len(kept)
        # A removed line between two blank lines would leave a double gap: close it up again.
        out = _BLANK_LINES_RE.sub("\n\n", "\n".join(kept)).strip("\n")
        if not out.strip():
            self.counters["texts_emptied"] += 1
        return out
