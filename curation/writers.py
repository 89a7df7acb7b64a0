"""Writers: kept records -> one dataset per record kind, in exactly TRL's formats, as JSONL, Parquet and
``save_to_disk``; dropped records -> ``rejects.jsonl`` with the step and reason.

Records stream into one JSONL file per (kind, split) as they arrive, so memory stays flat; Parquet and the
``datasets`` folder are then built from those files through Arrow (``datasets`` memory-maps them).

Every row of a kind has the same columns: that kind's TRL columns, then ``id``, ``source``, ``lineage``, ``score`` and
``meta``. ``meta`` is stored as a JSON string: its keys differ from row to row (topic, language, duplicate cluster...)
and a JSON string keeps one Arrow schema for all rows, so the three formats hold identical values.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

from curation.records import Record, make_lineage, record_kind

TRL_COLUMNS = {
    "instruction": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "ranking": ("prompt", "candidates"),
    "document": ("text",),
}
COMMON_COLUMNS = ("id", "source", "lineage", "score", "meta")


def to_row(record: Record) -> tuple[str, str, dict[str, Any]]:
    """(kind, split, row): the record in its kind's fixed column order. Keys outside the vocabulary are kept
    under ``meta`` rather than lost."""
    kind = record_kind(record)
    split = record.get("split") or "train"
    known = set(TRL_COLUMNS[kind]) | set(COMMON_COLUMNS) | {"split"}
    meta = dict(record.get("meta") or {})
    for key, value in record.items():
        if key not in known:
            meta[key] = value
    row = {col: record.get(col) for col in TRL_COLUMNS[kind]}
    row.update(id=record.get("id"), source=record.get("source"), lineage=record.get("lineage") or make_lineage(None, None),
               score=None if record.get("score") is None else float(record["score"]),
               meta=json.dumps(meta, ensure_ascii=False, sort_keys=True))
    return kind, split, row


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class RejectsWriter:
    """``rejects.jsonl``: one line per dropped record, ``{"step", "reason", "record"}``."""

    def __init__(self, path: Path | None):
        self.path = path
        self._f: TextIO | None = path.open("w", encoding="utf-8") if path else None
        self.count = 0

    def __call__(self, record: Record, step: str, reason: str) -> None:
        self.count += 1
        if self._f is not None:
            self._f.write(json.dumps({"step": step, "reason": reason, "record": record}, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


class DatasetWriter:
    """Streams rows into ``<out>/<kind>/<split>.jsonl``, then converts to the other formats on :meth:`close`."""

    def __init__(self, out_dir: Path, formats: list[str]):
        self.out_dir = out_dir
        self.formats = formats
        self.counts: Counter = Counter()
        self._files: dict[tuple[str, str], TextIO] = {}

    def _path(self, kind: str, split: str, suffix: str) -> Path:
        return self.out_dir / kind / f"{split}{suffix}"

    def write(self, record: Record) -> None:
        kind, split, row = to_row(record)
        key = (kind, split)
        if key not in self._files:
            path = self._path(kind, split, ".jsonl")
            path.parent.mkdir(parents=True, exist_ok=True)
            self._files[key] = path.open("w", encoding="utf-8")
        self._files[key].write(json.dumps(row, ensure_ascii=False) + "\n")
        self.counts[key] += 1

    def close(self) -> dict[str, Any]:
        """Finish every format; returns ``{kind: {"splits": {split: rows}, "files": {path: sha256}}}``."""
        for f in self._files.values():
            f.close()
        outputs: dict[str, Any] = {}
        for kind in sorted({k for k, _ in self._files}):
            splits = {s: self.counts[(k, s)] for k, s in sorted(self._files) if k == kind}
            self._convert(kind, list(splits))
            files = {}
            for path in sorted((self.out_dir / kind).glob("*.*")):
                files[str(path.relative_to(self.out_dir))] = sha256_file(path)
            outputs[kind] = {"splits": splits, "files": files}
        return outputs

    def _convert(self, kind: str, splits: list[str]) -> None:
        jsonl = {s: self._path(kind, s, ".jsonl") for s in splits}
        if "parquet" in self.formats or "datasets" in self.formats:
            import datasets

            with tempfile.TemporaryDirectory(dir=self.out_dir, prefix=".arrow-") as cache:
                dd = datasets.load_dataset("json", data_files={s: str(p) for s, p in jsonl.items()}, cache_dir=cache)
                if "parquet" in self.formats:
                    for split, ds in dd.items():
                        ds.to_parquet(str(self._path(kind, split, ".parquet")))
                if "datasets" in self.formats:
                    target = self.out_dir / kind / "hf"
                    if target.exists():
                        shutil.rmtree(target)
                    dd.save_to_disk(str(target))
        if "jsonl" not in self.formats:
            for path in jsonl.values():
                path.unlink()


def push_to_hub(out_dir: Path, repo_id: str, kinds: list[str], private: bool) -> None:
    """Push each kind as a config of one Hub dataset repo, then the card. The token comes from the environment
    (HF_TOKEN) and is never written anywhere by us. Not exercised in tests: the Hub is unreachable here."""
    import datasets
    from huggingface_hub import HfApi

    for kind in kinds:
        dd = datasets.load_from_disk(str(out_dir / kind / "hf"))
        dd.push_to_hub(repo_id, config_name=kind, private=private)
    HfApi().upload_file(path_or_fileobj=str(out_dir / "README.md"), path_in_repo="README.md", repo_id=repo_id,
                        repo_type="dataset")
