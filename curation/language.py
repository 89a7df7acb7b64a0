"""Language identification with lingua (https://github.com/pemistahl/lingua-py), as a filter.

lingua is accurate on short texts (support replies, chat turns) where fastText-style classifiers are not, and it runs
offline from models shipped in the wheel. The detector chooses only among ``candidates``: each candidate's n-gram models
are loaded on first use, so a dozen languages cost about 0.5 GB and 4 s once per process, while all 75 cost about
0.9 GB and 9 s (``low_accuracy`` loads trigram models only: ~40 MB, well under a second, weaker on short texts). A text
in a language outside ``candidates`` is reported as the closest candidate, or as unknown when no candidate is confident.

Confidences are relative among the candidates and spread out on short texts: on twenty one-line English support
questions, high-accuracy mode ranked English first every time, but at >= 0.5 only twelve times (>= 0.2: all twenty),
while low-accuracy mode called four of them Danish or German. Hence the default: high accuracy with
``min_confidence`` 0.2; non-allowed languages are dropped either way, only their reason changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from curation.records import Record, document_text
from curation.steps import CurationError, Filter, register

# Common European languages plus the allow list: enough to tell "not English" reliably without loading every model.
DEFAULT_CANDIDATES = ["en", "de", "fr", "es", "it", "pt", "nl", "pl", "sv", "da", "fi", "cs", "ro", "hu"]


def _lingua_language(code: str):
    """The lingua ``Language`` for an ISO 639-1 code, or ``None`` when lingua has no such language."""
    from lingua import IsoCode639_1, Language

    try:
        return Language.from_iso_code_639_1(IsoCode639_1.from_str(code))
    except ValueError:
        return None


@register("language")
@dataclass
class LanguageFilter(Filter):
    """Keep records whose text is in an allowed language; record the detected language in ``meta.lang``."""

    allow: list[str] = field(default_factory=lambda: ["en"])  # ISO 639-1 codes to keep
    candidates: list[str] | None = None  # codes the detector chooses among (null: DEFAULT_CANDIDATES); allow is added
    min_confidence: float = 0.2  # top language below this confidence: "unknown", dropped (see the module docstring)
    low_accuracy: bool = False  # lingua's low-accuracy mode: trigram models only, faster and lighter
    max_chars: int = 2000  # detect on the first this-many characters of the record's text (speed)

    def __post_init__(self) -> None:
        if isinstance(self.allow, str):
            self.allow = [self.allow]
        if isinstance(self.candidates, str):
            self.candidates = [self.candidates]
        if self.candidates is None:
            self.candidates = list(DEFAULT_CANDIDATES)
        for key in ("allow", "candidates"):
            value = getattr(self, key)
            if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
                raise CurationError(f"language: {key} must be a list of ISO 639-1 codes such as [en, de], "
                                    f"got {value!r}")
        # An allowed language that the detector cannot answer would silently drop everything: always include it.
        codes = [c.lower() for c in self.candidates]
        codes += [c.lower() for c in self.allow if c.lower() not in codes]
        for key, values in (("allow", self.allow), ("candidates", codes)):
            bad = [c for c in values if _lingua_language(c.lower()) is None]
            if bad:
                raise CurationError(f"language: {key} has codes lingua does not know: {', '.join(map(repr, bad))} "
                                    "(expected ISO 639-1 codes such as en, de, fr)")
        if len(set(codes)) < 2:
            raise CurationError(f"language: candidates must hold at least two languages to choose among, got {codes}")
        self.allow = [c.lower() for c in self.allow]
        self.candidates = list(dict.fromkeys(codes))
        if not isinstance(self.min_confidence, (int, float)) or not 0.0 <= self.min_confidence <= 1.0:
            raise CurationError(f"language: min_confidence must be between 0 and 1, got {self.min_confidence!r}")
        if not isinstance(self.max_chars, int) or self.max_chars < 1:
            raise CurationError(f"language: max_chars must be an integer >= 1, got {self.max_chars!r}")
        if not isinstance(self.low_accuracy, bool):
            raise CurationError(f"language: low_accuracy must be true or false, got {self.low_accuracy!r}")

    @property
    def detector(self):
        """The lingua detector, built on first use (and again in each worker process: it is not pickled)."""
        if getattr(self, "_detector", None) is None:
            from lingua import LanguageDetectorBuilder

            builder = LanguageDetectorBuilder.from_languages(*(_lingua_language(c) for c in self.candidates))
            if self.low_accuracy:
                builder = builder.with_low_accuracy_mode()
            self._detector = builder.build()
        return self._detector

    def detect(self, text: str) -> str | None:
        """The ISO 639-1 code of ``text``'s language, or ``None`` when no candidate reaches ``min_confidence``."""
        values = self.detector.compute_language_confidence_values(text[: self.max_chars])
        # lingua's confidences are relative to the candidates and sum to 1; a text with no letters scores 0 for all.
        if not values or values[0].value <= 0.0 or values[0].value < self.min_confidence:
            return None
        return values[0].language.iso_code_639_1.name.lower()

    def annotate(self, record: Record) -> tuple[Record, str | None]:
        """A copy of ``record`` with ``meta.lang`` set, and the drop reason (``None`` to keep)."""
        lang = self.detect(document_text(record))
        out = dict(record)
        out["meta"] = {**(record.get("meta") or {}), "lang": lang or "unknown"}
        if lang is None:
            return out, "language:unknown"
        return out, None if lang in self.allow else f"language:{lang}"

    def check(self, record: Record) -> str | None:
        return self.annotate(record)[1]

    def run(self, records: Iterable[Record]) -> Iterator[Record]:
        # Overridden (rather than check alone) so kept and dropped records alike carry the language that decided.
        for record in records:
            out, reason = self.annotate(record)
            if reason is None:
                yield out
            else:
                self.drop(out, reason)
