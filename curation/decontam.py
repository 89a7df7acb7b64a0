"""Evaluation-set decontamination: drop training records that share long word n-grams with an evaluation set.

This is the n-gram overlap test of GPT-3 (Brown et al. 2020, appendix C): 13-grams of lower-cased words, and a
record is contaminated when it shares at least ``min_overlap`` of them with any evaluation item. An evaluation text
shorter than ``ngram`` words counts as one n-gram of all its words, so a short question copied verbatim into a
training record (as its whole prompt, say) is still caught. N-grams never span two texts: each field of an eval row
and each text of a training record (prompt, every turn, every candidate) is cut separately.

N-gram hashes come from :func:`curation.dedup.shingle_hashes`, the same fingerprint near-duplicate removal uses.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curation.dedup import shingle_hashes
from curation.records import Record, iter_texts, words
from curation.steps import CurationError, InputError, Step, decode_line, expand_paths, read_text_file, register

EVAL_SUFFIXES = (".jsonl", ".json", ".txt")


def row_texts(row: Any, fields: list[str] | None) -> Iterator[str]:
    """Texts of one eval item: a string itself; for an object, its ``fields`` (default: every field) that hold a
    string, a list of strings, or a list of messages (their ``content``)."""
    if isinstance(row, str):
        yield row
        return
    values = row.values() if fields is None else (row.get(name) for name in fields)
    for value in values:
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, str):
                    yield item
                elif isinstance(item, dict) and isinstance(item.get("content"), str):
                    yield item["content"]


def _jsonl_items(path: Path, counters: Any) -> Iterator[Any]:
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            text = decode_line(raw, counters).strip()
            if not text:
                continue
            try:
                item = json.loads(text)
            except json.JSONDecodeError as e:
                raise InputError(path, line_no, f"malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(item, (dict, str)):
                raise InputError(path, line_no, f"expected a JSON object or string, got {type(item).__name__}")
            yield item


def _json_items(path: Path, counters: Any) -> Iterator[Any]:
    try:
        data = json.loads(read_text_file(path, counters))
    except json.JSONDecodeError as e:
        raise InputError(path, e.lineno, f"malformed JSON ({e.msg} at column {e.colno})") from None
    items = data if isinstance(data, list) else [data]
    for i, item in enumerate(items, start=1):
        if not isinstance(item, (dict, str)):
            raise InputError(path, None, f"item {i} is a {type(item).__name__}, expected a JSON object or string")
        yield item


def eval_items(path: Path, counters: Any = None) -> Iterator[Any]:
    """The items of an eval file: JSONL rows, a JSON array's elements, or a text file's non-blank lines (the usual
    way to ship a plain list of prompts: one item per line)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_items(path, counters)
    elif suffix == ".json":
        yield from _json_items(path, counters)
    elif suffix == ".txt":
        yield from (line for line in read_text_file(path, counters).splitlines() if line.strip())
    else:
        raise CurationError(f"{path}: cannot read an eval set from a '{suffix}' file "
                            f"(expected one of {', '.join(EVAL_SUFFIXES)})")


@register("decontaminate")
@dataclass
class Decontaminate(Step):
    """Drops training records sharing at least ``min_overlap`` word n-grams with the evaluation files."""

    eval_paths: list[str] = field(default_factory=list)  # eval files (.jsonl/.json/.txt), folders or globs
    eval_fields: list[str] | None = None  # fields of eval rows that hold text; None: every string field and message
    ngram: int = 13  # words per n-gram (13 as in GPT-3's decontamination)
    min_overlap: int = 1  # shared n-grams that make a record contaminated

    per_record = False

    def __post_init__(self) -> None:
        if isinstance(self.eval_paths, str):
            self.eval_paths = [self.eval_paths]
        if not self.eval_paths or not all(isinstance(p, str) and p for p in self.eval_paths):
            raise CurationError(f"decontaminate: eval_paths must name at least one eval file, got {self.eval_paths!r}")
        if isinstance(self.eval_fields, str):
            self.eval_fields = [self.eval_fields]
        if self.eval_fields is not None and (not self.eval_fields
                                             or not all(isinstance(f, str) for f in self.eval_fields)):
            raise CurationError(f"decontaminate: eval_fields must be a list of field names, got {self.eval_fields!r}")
        for name in ("ngram", "min_overlap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CurationError(f"decontaminate: {name} must be a positive integer, got {value!r}")

    def load_eval_ngrams(self) -> set[int]:
        """Hashes of every n-gram of the eval files; a file that yields no words at all is an error, not a no-op."""
        ngrams: set[int] = set()
        for path in expand_paths(self.eval_paths, self.base_dir, EVAL_SUFFIXES):
            texts = 0
            for item in eval_items(path, self.counters):
                for text in row_texts(item, self.eval_fields):
                    hashes = shingle_hashes(words(text), self.ngram)
                    texts += len(hashes) > 0
                    ngrams.update(hashes.tolist())
            if not texts:
                fields = f" in fields {', '.join(self.eval_fields)}" if self.eval_fields else ""
                raise CurationError(f"decontaminate: eval file {path} holds no text{fields}")
        return ngrams

    def run(self, records: Iterable[Record]) -> Iterator[Record]:
        eval_ngrams = self.load_eval_ngrams()  # here, not in __post_init__: base_dir is set after construction
        self.counters["eval_ngrams"] = len(eval_ngrams)
        for record in records:
            hashes: set[int] = set()
            for text in iter_texts(record):
                hashes.update(shingle_hashes(words(text), self.ngram).tolist())
            shared = len(eval_ngrams.intersection(hashes))
            if shared >= self.min_overlap:
                self.drop({**record, "meta": {**(record.get("meta") or {}), "contaminated_ngrams": shared}},
                          "contaminated")
            else:
                yield record
