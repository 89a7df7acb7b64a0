"""Row iteration shared by every reader of structured files: JSONL, JSON arrays, CSV, Parquet, datasets on disk.

Rows stream one at a time (Parquet in Arrow batches, ``save_to_disk`` folders memory-mapped), so memory stays flat.
Each row comes with its 1-based line/row number so errors and lineage can point back to it. A malformed JSON line goes
through :meth:`Reader.quarantine`: it stops the run naming file and line, or with ``on_error: skip`` lands in rejects.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from curation.steps import CurationError, Reader, decode_line, read_text_file

TABULAR_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow")


def iter_rows(reader: Reader, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(row number, row dict)`` for every row of ``path``, by its suffix; a folder is a ``save_to_disk`` dataset."""
    if path.is_dir():
        yield from _hf_disk_rows(path)
        return
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_rows(reader, path)
    elif suffix == ".json":
        yield from _json_rows(reader, path)
    elif suffix in (".csv", ".tsv"):
        yield from _csv_rows(reader, path, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        yield from _parquet_rows(path)
    elif suffix == ".arrow":
        yield from _arrow_rows(path)
    else:
        raise CurationError(f"{path}: cannot read rows from a '{suffix}' file (expected one of {', '.join(TABULAR_SUFFIXES)})")


def _jsonl_rows(reader: Reader, path: Path) -> Iterator[tuple[int, dict]]:
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            text = decode_line(raw, reader.counters).strip()
            if not text:
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                reader.quarantine(path, line_no, text, f"malformed JSON ({e.msg} at column {e.colno})", "malformed_json")
                continue
            if not isinstance(row, dict):
                reader.quarantine(path, line_no, text, f"expected a JSON object, got {type(row).__name__}", "not_an_object")
                continue
            yield line_no, row


def _json_rows(reader: Reader, path: Path) -> Iterator[tuple[int, dict]]:
    """A ``.json`` file holding one array of objects (Alpaca, ShareGPT and OASST dumps are often shipped so)."""
    text = read_text_file(path, reader.counters)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CurationError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise CurationError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    for i, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            reader.quarantine(path, i, json.dumps(row)[:2000], f"item {i} is not a JSON object", "not_an_object")
            continue
        yield i, row


def _csv_rows(reader: Reader, path: Path, delimiter: str) -> Iterator[tuple[int, dict]]:
    text = read_text_file(path, reader.counters)
    for i, row in enumerate(csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter), start=2):
        yield i, row  # row numbers count the header line, so they match what an editor shows


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for item in batch.to_pylist():
            row += 1
            yield row, item


def _arrow_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """An Arrow IPC file: ``datasets`` writes the streaming format (not Parquet); Feather v2 is the file format."""
    import pyarrow as pa

    try:
        batches = pa.ipc.open_stream(str(path))
    except pa.ArrowInvalid:
        try:
            file = pa.ipc.open_file(str(path))
        except pa.ArrowInvalid as e:
            raise CurationError(f"{path}: not an Arrow IPC file ({e})") from None
        batches = (file.get_batch(i) for i in range(file.num_record_batches))
    row = 0
    for batch in batches:
        for item in batch.to_pylist():
            row += 1
            yield row, item


def _hf_disk_rows(path: Path) -> Iterator[tuple[int, dict]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise CurationError(f"{path}: not a dataset saved with save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds.values())
    else:
        splits = [ds]
    row = 0
    for split in splits:
        for item in split:
            row += 1
            yield row, item


def require_columns(path: Path, row_no: int, row: dict, needed: list[str]) -> None:
    """A clear error listing the columns that do exist when a mapped column is missing."""
    missing = [c for c in needed if c not in row]
    if missing:
        raise CurationError(f"{path}:{row_no}: missing column(s) {', '.join(map(repr, missing))}; "
                            f"the columns that exist are: {', '.join(map(repr, row))}")
