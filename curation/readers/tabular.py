"""Readers of structured rows: JSON Lines (and .json arrays), CSV/TSV, Parquet, and folders written by
``datasets.save_to_disk``. One generic reader maps source columns onto the record vocabulary; the four registered
names differ only in which files a folder is searched for (rows are parsed by :mod:`curation.readers.rows`).

Example recipe step::

    - type: read_csv
      paths: raw/tickets.csv
      columns: {prompt: question, completion: answer, id: ticket_id}
      meta_columns: [product]
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from curation.readers.files import PathReader
from curation.readers.rows import iter_rows, require_columns
from curation.records import Record, message, new_record
from curation.steps import CurationError, register

# Our fields a source column may be mapped to; `id` is the source's own id (kept in meta.source_id).
FIELDS = ("text", "prompt", "completion", "messages", "chosen", "rejected", "score", "id")
_CONTENT_FIELDS = ("text", "prompt", "completion", "messages", "chosen", "rejected")
_ROLES = ("system", "user", "assistant")


@dataclass
class TableReader(PathReader):
    """Rows of structured files -> records, through a column mapping."""

    columns: dict[str, str] = field(default_factory=lambda: {"text": "text"})  # our field -> source column
    meta_columns: list[str] = field(default_factory=list)  # source columns copied as they are into meta

    def __post_init__(self) -> None:
        super().__post_init__()
        name = self.type_name
        if not isinstance(self.columns, dict) or not self.columns:
            raise CurationError(f"{name}: option 'columns' must map our fields to source columns, got {self.columns!r}")
        unknown = [k for k in self.columns if k not in FIELDS]
        if unknown:
            raise CurationError(f"{name}: option 'columns' has unknown field(s) {unknown}; "
                                f"the fields that can be mapped are: {', '.join(FIELDS)}")
        bad = {k: v for k, v in self.columns.items() if not isinstance(v, str) or not v}
        if bad:
            raise CurationError(f"{name}: option 'columns' must name source columns as strings, got {bad}")
        if not any(k in _CONTENT_FIELDS for k in self.columns):
            raise CurationError(f"{name}: option 'columns' maps no text; map at least one of "
                                f"{', '.join(_CONTENT_FIELDS)}")
        if not isinstance(self.meta_columns, list) or not all(isinstance(c, str) for c in self.meta_columns):
            raise CurationError(f"{name}: option 'meta_columns' must be a list of column names, "
                                f"got {self.meta_columns!r}")

    def read_file(self, path: Path) -> Iterator[Record]:
        needed = [*self.columns.values(), *self.meta_columns]
        where = self.where(path)
        for row_no, row in iter_rows(self, path):
            require_columns(path, row_no, row, needed)
            try:
                fields = {ours: _convert(ours, col, row[col]) for ours, col in self.columns.items()}
            except ValueError as e:
                raw = json.dumps(row, ensure_ascii=False, default=str)
                self.quarantine(path, row_no, raw, str(e), "bad_value")
                continue
            source_id = fields.pop("id", None)
            if isinstance(fields.get("prompt"), str) and ("chosen" in fields or "rejected" in fields):
                fields["prompt"] = [message("user", fields["prompt"])]  # TRL conversational preference: a message list
            meta = {c: row[c] for c in self.meta_columns}
            if source_id is not None:
                meta["source_id"] = source_id
            yield new_record(self.source, where, row_no, key=source_id, **fields, meta=meta)


def _convert(ours: str, column: str, value: Any) -> Any:
    """A source value in the shape our vocabulary wants for field ``ours``; ValueError names the column."""
    if ours == "id":
        return None if value in (None, "") else value
    if ours == "score":
        return to_score(column, value)
    if value is None:
        raise ValueError(f"column {column!r} (mapped to {ours}) is null")
    if ours == "text":
        if not isinstance(value, str):
            raise ValueError(f"column {column!r} (mapped to text) is a {type(value).__name__}, expected a string")
        return value
    if ours == "messages":
        parsed = _json_list(value) if isinstance(value, str) else value  # CSV cells hold messages as JSON
        return _messages(column, value if parsed is None else parsed)
    # prompt / completion / chosen / rejected: plain text, or a message list (in CSV cells: as a JSON string)
    as_list = _json_list(value) if isinstance(value, str) else value
    if isinstance(as_list, list):
        return _messages(column, as_list)
    if not isinstance(value, str):
        raise ValueError(f"column {column!r} (mapped to {ours}) is a {type(value).__name__}, expected text or messages")
    if ours in ("chosen", "rejected"):
        return [message("assistant", value)]  # the vocabulary's one-message list
    return value


def _json_list(text: str) -> list | None:
    """A CSV cell holding a JSON message list; plain text (even text that starts with '[') stays text."""
    if not text.lstrip().startswith("[{"):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value) else None


def _messages(column: str, value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"column {column!r} should hold a non-empty list of {{role, content}} messages, "
                         f"got {value!r:.80}")
    out = []
    for i, m in enumerate(value, start=1):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            got = sorted(m) if isinstance(m, dict) else type(m).__name__
            raise ValueError(f"column {column!r}: message {i} is not a {{role, content}} message with role in "
                             f"{'/'.join(_ROLES)} (got {got})")
        out.append(message(m["role"], m["content"]))  # other keys (name, weight...) are not in our vocabulary
    return out


def to_score(column: str, value: Any) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ValueError(f"column {column!r} (mapped to score) is a boolean, expected a number")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"column {column!r} (mapped to score) is not a number: {value!r}") from None


@register("read_jsonl")
@dataclass
class ReadJsonl(TableReader):
    """JSON Lines files (and .json files holding an array of objects)."""

    suffixes: ClassVar[tuple[str, ...]] = (".jsonl", ".json")


@register("read_csv")
@dataclass
class ReadCsv(TableReader):
    """CSV and TSV files with a header row; row numbers count the header, as an editor shows them."""

    suffixes: ClassVar[tuple[str, ...]] = (".csv", ".tsv")


@register("read_parquet")
@dataclass
class ReadParquet(TableReader):
    """Parquet files, streamed in batches."""

    suffixes: ClassVar[tuple[str, ...]] = (".parquet",)


@register("read_hf_disk")
@dataclass
class ReadHfDisk(TableReader):
    """Folders written by ``datasets.save_to_disk`` (a Dataset or a DatasetDict; splits are read in turn)."""

    suffixes: ClassVar[tuple[str, ...]] = (".arrow",)
