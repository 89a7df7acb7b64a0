"""Heuristic quality filters: Gopher's rules for documents, and per-text length bounds for instruction data.

``gopher_quality`` implements the quality and repetition rules of Rae et al. 2021, "Scaling Language Models: Methods,
Analysis & Insights from Training Gopher", appendix A.1.1 (MassiveWeb), with the paper's thresholds as defaults. Every
threshold can be set to null to switch its rule off (the stop-word rule, for one, only makes sense for English).

Where the paper leaves a detail open we follow datatrove's GopherQualityFilter / GopherRepetitionFilter: a duplicate
line, paragraph or n-gram counts from its *second* occurrence on, and a character is counted at most once however many
duplicate n-grams overlap it. Two deliberate differences: words come from :func:`curation.records.words` (runs of
letters and digits, shared with the other steps), so pure-punctuation tokens are not words and ``min_alpha_words``
measures number-like tokens only; and the most frequent n-gram only counts when it occurs at least twice, otherwise
every short reply would "repeat" its one and only 2-gram.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import filterfalse

from curation.records import KINDS, Record, document_text, record_kind, words
from curation.steps import CurationError, Filter, register

GOPHER_STOP_WORDS = ["the", "be", "to", "of", "and", "that", "have", "with"]
BULLETS = ("•", "-", "*", "‣", "◦", "▪", "●", "·")
ELLIPSES = ("...", "…")
# Rae et al. 2021, table A1: {n: max fraction of characters} for the most frequent n-gram and for repeated n-grams.
GOPHER_TOP_NGRAMS = {2: 0.20, 3: 0.18, 4: 0.16}
GOPHER_DUP_NGRAMS = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
_PARAGRAPH_RE = re.compile(r"\n[^\S\n]*\n\s*")


def _ngrams(ws: tuple[str, ...], n: int) -> Iterator[tuple[str, ...]]:
    return zip(*(ws[i:] for i in range(n)))


def _covered_chars(ws: tuple[str, ...], covered: bytearray) -> int:
    return sum(len(w) for w, c in zip(ws, covered) if c)


def alpha_word_count(ws: tuple[str, ...]) -> int:
    """Words with at least one letter. Most words are all letters, and ``filterfalse(str.isalpha, ...)`` passes
    over those in C; only the rest (numbers, words with digits or apostrophes) are looked at letter by letter."""
    return len(ws) - sum(1 for w in filterfalse(str.isalpha, ws) if not any(map(str.isalpha, w)))


def stop_word_count(ws: tuple[str, ...], stops: frozenset[str]) -> int:
    """Occurrences of ``stops`` (lower-case) among the words, case-insensitively; counted in C, not word by word."""
    return sum(map(stops.__contains__, map(str.lower, ws)))


def duplicate_stats(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of characters in those repeats)."""
    seen: set[str] = set()
    dup_items = dup_chars = 0
    for item in items:
        if item in seen:
            dup_items += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    total_chars = sum(len(item) for item in items)
    return dup_items / len(items), (dup_chars / total_chars if total_chars else 0.0)


def top_ngram_chars(ws: tuple[str, ...], n: int) -> int:
    """Characters (of words) covered by the most frequent n-gram, or 0 when no n-gram occurs twice."""
    counts = Counter(_ngrams(ws, n))
    if not counts:
        return 0
    top, count = counts.most_common(1)[0]
    if count < 2:
        return 0
    covered = bytearray(len(ws))
    for i, gram in enumerate(_ngrams(ws, n)):
        if gram == top:
            covered[i:i + n] = b"\x01" * n
    return _covered_chars(ws, covered)


def duplicate_ngram_chars(ws: tuple[str, ...], n: int) -> int:
    """Characters (of words) covered by n-grams that repeat an earlier occurrence, overlaps counted once."""
    seen: set[tuple[str, ...]] = set()
    covered = bytearray(len(ws))
    for i, gram in enumerate(_ngrams(ws, n)):
        if gram in seen:
            covered[i:i + n] = b"\x01" * n
        else:
            seen.add(gram)
    return _covered_chars(ws, covered)


def _fraction_option(step: str, name: str, value: object) -> None:
    if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= 1):
        raise CurationError(f"{step}: {name} must be a fraction between 0 and 1 or null, got {value!r}")


def _count_option(step: str, name: str, value: object) -> None:
    if value is not None and not (isinstance(value, (int, float)) and value >= 0):
        raise CurationError(f"{step}: {name} must be a number >= 0 or null, got {value!r}")


def _ngram_option(name: str, value: object, defaults: dict[int, float]) -> dict[int, float | None]:
    """``{n: max fraction}`` with integer keys (YAML may hand them over as strings), over Gopher's defaults: an entry
    set to null switches that n off, and the whole option set to null switches the rule off."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CurationError(f"gopher_quality: {name} must map n-gram sizes to fractions, e.g. {{2: 0.2}}, "
                            f"got {value!r}")
    out: dict[int, float | None] = {}
    for n, frac in value.items():
        try:
            size = int(n)
        except (TypeError, ValueError):
            size = 0
        if size < 1:
            raise CurationError(f"gopher_quality: {name} has n-gram size {n!r}; sizes are integers >= 1")
        _fraction_option("gopher_quality", f"{name}[{n}]", frac)
        out[size] = frac
    return {**defaults, **out}


@register("gopher_quality")
@dataclass
class GopherQuality(Filter):
    """Drop documents that fail Gopher's quality or repetition rules, each rule with its own reason."""

    min_words: int | None = 50  # fewer words: too_few_words
    max_words: int | None = 100_000  # more words: too_many_words
    min_mean_word_length: float | None = 3  # mean word length outside [min, max]: mean_word_length
    max_mean_word_length: float | None = 10
    max_symbol_ratio: float | None = 0.1  # "#" per word, or "..."/"…" per word, above this: symbol_ratio
    max_bullet_lines: float | None = 0.9  # fraction of non-empty lines starting with a bullet: bullet_lines
    max_ellipsis_lines: float | None = 0.3  # fraction of non-empty lines ending with an ellipsis: ellipsis_lines
    min_alpha_words: float | None = 0.8  # fraction of words with at least one letter: alpha_words
    min_stop_words: int | None = 2  # occurrences of stop_words needed (English-only: null for other languages)
    stop_words: list[str] = field(default_factory=lambda: list(GOPHER_STOP_WORDS))  # Gopher's eight English words
    max_dup_lines: float | None = 0.3  # fraction of lines repeating an earlier line: dup_lines
    max_dup_paragraphs: float | None = 0.3  # fraction of paragraphs repeating an earlier one: dup_paragraphs
    max_dup_line_chars: float | None = 0.2  # fraction of characters in repeated lines: dup_line_chars
    max_dup_paragraph_chars: float | None = 0.2  # fraction of characters in repeated paragraphs: dup_paragraph_chars
    # {n: fraction of word characters covered by the most frequent n-gram}: top_<n>gram
    max_top_ngram_chars: dict | None = field(default_factory=lambda: dict(GOPHER_TOP_NGRAMS))
    # {n: fraction of word characters covered by repeated n-grams}: dup_<n>gram
    max_dup_ngram_chars: dict | None = field(default_factory=lambda: dict(GOPHER_DUP_NGRAMS))
    # record kinds judged (document, instruction, prompt_completion, preference, ranking); others pass. Gopher's
    # rules were fitted to web pages: a recipe can give chats their own, lighter instance of this step.
    kinds: list[str] | None = None

    def __post_init__(self) -> None:
        if self.kinds is not None:
            unknown = [k for k in self.kinds if k not in KINDS] if isinstance(self.kinds, list) else self.kinds
            if unknown:
                raise CurationError(f"gopher_quality: kinds must be a list of {', '.join(KINDS)}; got {self.kinds!r}")
        for name in ("min_words", "max_words", "min_mean_word_length", "max_mean_word_length", "max_symbol_ratio",
                     "min_stop_words"):
            _count_option("gopher_quality", name, getattr(self, name))
        for name in ("max_bullet_lines", "max_ellipsis_lines", "min_alpha_words", "max_dup_lines",
                     "max_dup_paragraphs", "max_dup_line_chars", "max_dup_paragraph_chars"):
            _fraction_option("gopher_quality", name, getattr(self, name))
        if not isinstance(self.stop_words, list) or not all(isinstance(w, str) for w in self.stop_words):
            raise CurationError(f"gopher_quality: stop_words must be a list of words, got {self.stop_words!r}")
        self.max_top_ngram_chars = _ngram_option("max_top_ngram_chars", self.max_top_ngram_chars, GOPHER_TOP_NGRAMS)
        self.max_dup_ngram_chars = _ngram_option("max_dup_ngram_chars", self.max_dup_ngram_chars, GOPHER_DUP_NGRAMS)

    def check(self, record: Record) -> str | None:
        if self.kinds is not None and record_kind(record) not in self.kinds:
            return None
        text = document_text(record)
        ws = words(text)
        if not ws:
            return "empty"  # whatever the thresholds: a text without a word is never training data
        return self.quality_reason(text, ws) or self.repetition_reason(text, ws)

    def quality_reason(self, text: str, ws: tuple[str, ...]) -> str | None:
        """Gopher's document-level rules, cheapest first."""
        n = len(ws)
        if self.min_words is not None and n < self.min_words:
            return "too_few_words"
        if self.max_words is not None and n > self.max_words:
            return "too_many_words"
        mean_len = sum(map(len, ws)) / n
        if (self.min_mean_word_length is not None and mean_len < self.min_mean_word_length) or \
                (self.max_mean_word_length is not None and mean_len > self.max_mean_word_length):
            return "mean_word_length"
        if self.max_symbol_ratio is not None:
            ellipses = text.count("...") + text.count("…")
            if max(text.count("#"), ellipses) / n > self.max_symbol_ratio:
                return "symbol_ratio"
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        if self.max_bullet_lines is not None and \
                sum(line.startswith(BULLETS) for line in lines) / len(lines) > self.max_bullet_lines:
            return "bullet_lines"
        if self.max_ellipsis_lines is not None and \
                sum(line.endswith(ELLIPSES) for line in lines) / len(lines) > self.max_ellipsis_lines:
            return "ellipsis_lines"
        if self.min_alpha_words is not None and alpha_word_count(ws) / n < self.min_alpha_words:
            return "alpha_words"
        if self.min_stop_words is not None and stop_word_count(ws, self._stop_set()) < self.min_stop_words:
            return "stop_words"
        return None

    def _stop_set(self) -> frozenset[str]:
        """The lower-cased stop words, built once per step (and again in a worker: "_" attributes are not pickled)."""
        stops = self.__dict__.get("_stops")
        if stops is None:
            stops = self.__dict__["_stops"] = frozenset(w.lower() for w in self.stop_words)
        return stops

    def repetition_reason(self, text: str, ws: tuple[str, ...]) -> str | None:
        """Gopher's repetition rules (Rae et al. 2021, table A1): repeated lines, paragraphs and n-grams. Each
        statistic is only computed when a rule that reads it is on."""
        line_frac = line_chars = para_frac = para_chars = 0.0
        if self.max_dup_lines is not None or self.max_dup_line_chars is not None:
            lines = [line.strip() for line in text.split("\n") if line.strip()]
            line_frac, line_chars = duplicate_stats(lines)
        if self.max_dup_lines is not None and line_frac > self.max_dup_lines:
            return "dup_lines"
        if self.max_dup_paragraphs is not None or self.max_dup_paragraph_chars is not None:
            paragraphs = [p.strip() for p in _PARAGRAPH_RE.split(text) if p.strip()]
            para_frac, para_chars = duplicate_stats(paragraphs)
        if self.max_dup_paragraphs is not None and para_frac > self.max_dup_paragraphs:
            return "dup_paragraphs"
        if self.max_dup_line_chars is not None and line_chars > self.max_dup_line_chars:
            return "dup_line_chars"
        if self.max_dup_paragraph_chars is not None and para_chars > self.max_dup_paragraph_chars:
            return "dup_paragraph_chars"
        total = sum(map(len, ws))
        for n, limit in sorted(self.max_top_ngram_chars.items()):
            if limit is not None and top_ngram_chars(ws, n) / total > limit:
                return f"top_{n}gram"
        for n, limit in sorted(self.max_dup_ngram_chars.items()):
            if limit is not None and duplicate_ngram_chars(ws, n) / total > limit:
                return f"dup_{n}gram"
        return None


_PARTS = ("response", "prompt", "all")


def part_texts(record: Record, part: str) -> Iterable[str]:
    """The texts of one side of a record. ``response``: what the model learns to say (completion, assistant turns,
    chosen/rejected, candidates, and a raw document's text); ``prompt``: what it is given (prompt, other turns)."""
    want_response, want_prompt = part in ("response", "all"), part in ("prompt", "all")
    if want_response and isinstance(record.get("text"), str):
        yield record["text"]
    prompt = record.get("prompt")
    if want_prompt and isinstance(prompt, str):
        yield prompt
    elif want_prompt and isinstance(prompt, list):
        yield from (m["content"] for m in prompt)
    completion = record.get("completion")
    if want_response and isinstance(completion, str):
        yield completion
    elif want_response and isinstance(completion, list):
        yield from (m["content"] for m in completion)
    for m in record.get("messages") or ():
        if (m["role"] == "assistant" and want_response) or (m["role"] != "assistant" and want_prompt):
            yield m["content"]
    if want_response:
        for key in ("chosen", "rejected"):
            yield from (m["content"] for m in record.get(key) or ())
        yield from (c["content"] for c in record.get("candidates") or ())


@register("length")
@dataclass
class LengthFilter(Filter):
    """Every text on one side of a record (each assistant reply, say) must be within length bounds."""

    part: str = "response"  # which texts to check: response, prompt or all
    min_chars: int | None = None  # any checked text shorter than this: too_short
    max_chars: int | None = None  # any checked text longer than this: too_long
    min_words: int | None = 1  # any checked text with fewer words: too_short (1: no empty replies)
    max_words: int | None = None  # any checked text with more words: too_long

    def __post_init__(self) -> None:
        if self.part not in _PARTS:
            raise CurationError(f"length: part must be one of {', '.join(_PARTS)}, got {self.part!r}")
        for name in ("min_chars", "max_chars", "min_words", "max_words"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 0):
                raise CurationError(f"length: {name} must be an integer >= 0 or null, got {value!r}")
        for lo, hi in (("min_chars", "max_chars"), ("min_words", "max_words")):
            low, high = getattr(self, lo), getattr(self, hi)
            if low is not None and high is not None and low > high:
                raise CurationError(f"length: {lo} ({low}) is larger than {hi} ({high})")

    def check(self, record: Record) -> str | None:
        for text in part_texts(record, self.part):
            chars = len(text.strip())
            if self.min_chars is not None and chars < self.min_chars:
                return "too_short"
            if self.max_chars is not None and chars > self.max_chars:
                return "too_long"
            if self.min_words is not None or self.max_words is not None:
                n = len(words(text))
                if self.min_words is not None and n < self.min_words:
                    return "too_short"
                if self.max_words is not None and n > self.max_words:
                    return "too_long"
        return None
