"""Split long documents into passages of whole sentences, with spaCy finding the sentence boundaries.

Passages are packed greedily: sentences are added while the passage stays within ``target_chars``, so no passage ends
mid-sentence. A single sentence longer than ``max_chars`` (a table flattened into one line, a log dump) is the only
thing ever cut inside a sentence, at whitespace, and is counted. Text is first split at blank lines: a paragraph break
is always a boundary (the rule-based sentencizer only looks at punctuation, so it would glue a heading to the next
sentence), and it keeps each spaCy ``Doc`` small.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from curation.records import Record, derive
from curation.steps import CurationError, Step, register

_PARAGRAPH_BREAK_RE = re.compile(r"\n[^\S\n]*\n\s*")
# Components that play no part in sentence boundaries: left out when a trained pipeline is loaded, for speed.
_NOT_FOR_SENTENCES = ["ner", "lemmatizer", "textcat", "textcat_multilabel", "entity_linker", "entity_ruler",
                      "span_ruler", "spancat"]
_SENTENCE_COMPONENTS = ("parser", "senter", "sentencizer")
_CORE_KEYS = ("id", "source", "lineage", "text", "meta")

Span = tuple[int, int]  # character offsets into the document, whitespace stripped at both ends


def _strip(text: str, start: int, end: int) -> Span:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def paragraphs(text: str) -> list[Span]:
    """Non-empty stretches of ``text`` between blank lines."""
    spans, start = [], 0
    for m in _PARAGRAPH_BREAK_RE.finditer(text):
        spans.append(_strip(text, start, m.start()))
        start = m.end()
    spans.append(_strip(text, start, len(text)))
    return [(s, e) for s, e in spans if s < e]


def split_at_whitespace(text: str, start: int, end: int, limit: int) -> list[Span]:
    """Cut ``text[start:end]`` into pieces of at most ``limit`` characters, at the last whitespace that fits
    (inside a word only when a single word is longer than ``limit``)."""
    pieces = []
    start, end = _strip(text, start, end)
    while end - start > limit:
        cut = max(text.rfind(ch, start, start + limit + 1) for ch in " \n\t")
        if cut <= start:
            cut = start + limit
        pieces.append(_strip(text, start, cut))
        start = _strip(text, cut, end)[0]
    if start < end:
        pieces.append((start, end))
    return pieces


def pack(units: list[Span], target: int, overlap: int) -> list[tuple[int, int]]:
    """Greedy packing of consecutive units into ``(first, last + 1)`` index ranges spanning at most ``target``
    characters (a lone unit may span more); each range after the first repeats the previous range's last
    ``overlap`` units, but always moves on by at least one."""
    ranges, i = [], 0
    while i < len(units):
        j = i + 1
        while j < len(units) and units[j][1] - units[i][0] <= target:
            j += 1
        ranges.append((i, j))
        if j == len(units):
            break
        i = max(i + 1, j - overlap)
    return ranges


@register("chunk_sentences")
@dataclass
class ChunkSentences(Step):
    """Split documents (records with ``text``) longer than ``target_chars`` into chunk records of whole sentences."""

    creates = True  # one long document becomes several chunk records

    target_chars: int = 1500  # pack sentences into passages of up to this many characters
    max_chars: int = 3000  # a sentence longer than this is cut at whitespace (counted in sentences_split_hard)
    overlap_sentences: int = 0  # sentences repeated at the start of the next passage, for context
    model: str | None = None  # spaCy pipeline name or path (its parser/senter finds sentences); null: rule-based
    language: str = "en"  # language of the rule-based sentencizer (ignored when ``model`` is set)

    def __post_init__(self) -> None:
        for name in ("target_chars", "max_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise CurationError(f"chunk_sentences: {name} must be a positive integer, got {value!r}")
        if self.max_chars < self.target_chars:
            raise CurationError(f"chunk_sentences: max_chars ({self.max_chars}) must be >= target_chars "
                                f"({self.target_chars})")
        if self.model is not None and not isinstance(self.model, str):
            raise CurationError(f"chunk_sentences: model must be a spaCy pipeline name or path, got {self.model!r}")
        if not isinstance(self.language, str):
            raise CurationError(f"chunk_sentences: language must be a language code such as en, got {self.language!r}")
        if not isinstance(self.overlap_sentences, int) or self.overlap_sentences < 0:
            raise CurationError(f"chunk_sentences: overlap_sentences must be an integer >= 0, "
                                f"got {self.overlap_sentences!r}")

    @property
    def nlp(self):
        """The spaCy pipeline, loaded on first use (and again in each worker process: it is not pickled)."""
        if getattr(self, "_nlp", None) is None:
            self._nlp = self._load_nlp()
        return self._nlp

    def _load_nlp(self):
        import spacy  # lazy: ~2 s to import

        if self.model is None:
            try:
                nlp = spacy.blank(self.language)
            except ImportError:
                raise CurationError(f"chunk_sentences: language {self.language!r} is not a language spaCy knows "
                                    "(expected a code such as en, de, fr)") from None
            nlp.add_pipe("sentencizer")
            return nlp
        path = Path(self.model)
        if self.base_dir is not None and not path.is_absolute() and (self.base_dir / path).exists():
            path = self.base_dir / path
        try:
            nlp = spacy.load(path if path.exists() else self.model, exclude=_NOT_FOR_SENTENCES)
        except OSError as e:
            raise CurationError(f"chunk_sentences: cannot load spaCy model {self.model!r}: {e}") from None
        if not any(c in nlp.pipe_names for c in _SENTENCE_COMPONENTS):
            if "senter" not in nlp.component_names:
                raise CurationError(f"chunk_sentences: spaCy model {self.model!r} has no parser, senter or sentencizer "
                                    "to find sentences; leave model unset for the rule-based sentencizer")
            nlp.enable_pipe("senter")  # trained pipelines ship their senter disabled when the parser is excluded
        return nlp

    def sentences(self, text: str) -> list[Span]:
        """Sentence spans of ``text``, none longer than ``max_chars``."""
        nlp = self.nlp
        blocks = []
        for start, end in paragraphs(text):
            # spaCy refuses texts over nlp.max_length (1M characters): such a paragraph goes in at-whitespace pieces.
            blocks += split_at_whitespace(text, start, end, nlp.max_length - 1)
        spans = []
        for (offset, _), doc in zip(blocks, nlp.pipe(text[s:e] for s, e in blocks)):
            for sent in doc.sents:
                start, end = _strip(text, offset + sent.start_char, offset + sent.end_char)
                if end - start > self.max_chars:
                    self.counters["sentences_split_hard"] += 1
                    spans += split_at_whitespace(text, start, end, self.max_chars)
                elif start < end:
                    spans.append((start, end))
        return spans

    def chunk(self, text: str) -> list[str]:
        """``text`` as passages of whole sentences (original spacing kept inside each passage)."""
        units = self.sentences(text)
        return [text[units[i][0]:units[j - 1][1]] for i, j in pack(units, self.target_chars, self.overlap_sentences)]

    def run(self, records: Iterable[Record]) -> Iterator[Record]:
        for record in records:
            text = record.get("text")
            if not isinstance(text, str) or len(text) <= self.target_chars:
                yield record  # conversations, pairs and short documents pass through untouched
                continue
            chunks = self.chunk(text)
            if len(chunks) < 2:
                yield record
                continue
            self.counters["documents_chunked"] += 1
            self.counters["chunks_created"] += len(chunks)
            # Fields outside the core (a score, say) go with every chunk, so nothing the parent carried is lost.
            extra = {k: v for k, v in record.items() if k not in _CORE_KEYS}
            for i, chunk in enumerate(chunks):
                yield derive(record, key=i, chunk=i, **extra, text=chunk)
