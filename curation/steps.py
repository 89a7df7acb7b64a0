"""The building blocks of a curation pipeline, in the style of datatrove: small steps over an iterator of records.

- A :class:`Step` has ``run(records) -> iterator of records``. Its options are dataclass fields, validated in
  ``__post_init__``; the recipe's keys are checked against them.
- A :class:`Filter` only answers keep/drop: ``check(record)`` returns ``None`` to keep or a *reason* to drop. The base
  class counts the drop and hands the record to the pipeline's rejects sink, so every drop is accounted for.
- A :class:`Reader` yields the records upstream of it first, then its own, so several readers chain.

Steps register under the name recipes use (``@register("read_jsonl")``). A step that needs the whole stream
(dedup, grouping) sets ``per_record = False``; the pipeline only farms out runs of ``per_record`` steps to workers.
"""

from __future__ import annotations

import dataclasses
import glob
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from curation.records import Record


class CurationError(Exception):
    """A user mistake (bad recipe, bad input): the CLI prints it without a traceback and exits with status 2."""


class InputError(CurationError):
    """Bad input data, with the file and line it came from."""

    def __init__(self, path: object, line: int | None, problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")


RejectSink = Callable[[Record, str, str], None]  # (record, step name, reason)

REGISTRY: dict[str, type[Step]] = {}


def register(name: str) -> Callable[[type[Step]], type[Step]]:
    def deco(cls: type[Step]) -> type[Step]:
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise RuntimeError(f"two steps registered as {name!r}")
        cls.type_name = name
        REGISTRY[name] = cls
        return cls

    return deco


class Step:
    """Base of every step. Subclasses are dataclasses whose fields are the recipe options."""

    type_name: ClassVar[str] = "step"
    per_record: ClassVar[bool] = True  # True: output for a record depends on that record alone (safe to parallelise)
    creates: ClassVar[bool] = False  # True: may emit more or fewer records than it takes in, beyond drops

    # Set by the pipeline: where dropped records go, and the step's label in reports.
    _sink: RejectSink | None = None
    label: str = ""
    on_error: str = "fail"  # "fail" or "skip": what readers do with malformed rows (set from the recipe)
    base_dir: Path | None = None  # relative paths in options are read from here (the recipe's folder)
    seed: int = 0  # the recipe's seed, for steps that sample or hash with a seed

    @property
    def drops(self) -> Counter:
        if "_drops" not in self.__dict__:
            self.__dict__["_drops"] = Counter()
        return self.__dict__["_drops"]

    @property
    def counters(self) -> Counter:
        """Free-form counts for the report (PII found per type, duplicate clusters, bytes repaired...)."""
        if "_counters" not in self.__dict__:
            self.__dict__["_counters"] = Counter()
        return self.__dict__["_counters"]

    def drop(self, record: Record, reason: str) -> None:
        """Count a dropped record under ``reason`` and send it to the rejects sink with that reason."""
        self.drops[reason] += 1
        if self._sink is not None:
            self._sink(record, self.label or self.type_name, reason)

    def run(self, records: Iterable[Record]) -> Iterator[Record]:
        raise NotImplementedError

    def reset_stats(self) -> None:
        self.__dict__.pop("_drops", None)
        self.__dict__.pop("_counters", None)

    def __getstate__(self) -> dict:
        # Workers get the options and settings, not the sink (a closure), stats, or lazily loaded models
        # (spaCy pipelines, detectors): attributes whose names start with "_" are rebuilt where they are used.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def options(self) -> dict[str, Any]:
        """The step's resolved options (for the card and run records)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} if dataclasses.is_dataclass(self) else {}


class Filter(Step):
    """Keep/drop with a reason. Subclasses implement :meth:`check` and nothing else."""

    def check(self, record: Record) -> str | None:
        raise NotImplementedError

    def run(self, records: Iterable[Record]) -> Iterator[Record]:
        for record in records:
            reason = self.check(record)
            if reason is None:
                yield record
            else:
                self.drop(record, reason)


class Mapper(Step):
    """One record in, one record out (cleaning, redaction). Subclasses implement :meth:`apply`."""

    def apply(self, record: Record) -> Record:
        raise NotImplementedError

    def run(self, records: Iterable[Record]) -> Iterator[Record]:
        for record in records:
            yield self.apply(record)


class Reader(Step):
    """Yields upstream records, then its own. Subclasses implement :meth:`read` (records from this source)."""

    per_record = False  # a reader is a source, not a per-record transform
    creates = True

    def run(self, records: Iterable[Record]) -> Iterator[Record]:
        yield from records
        yield from self.read()

    def read(self) -> Iterator[Record]:
        raise NotImplementedError

    def where(self, path: Path) -> str:
        """The path kept in lineage (and hashed into ids): relative to the recipe folder, so ids stay the same
        when the project is checked out elsewhere."""
        path = Path(path)
        if self.base_dir is not None:
            try:
                return path.relative_to(self.base_dir).as_posix()
            except ValueError:
                pass
        return path.as_posix()

    def quarantine(self, path: object, line: int | None, raw: str, problem: str, reason: str) -> None:
        """A malformed row: stop with an error naming file and line, or (``on_error: skip``) send it to rejects."""
        if self.on_error != "skip":
            raise InputError(path, line, problem)
        self.drop({"lineage": {"path": self.where(Path(str(path))), "row": line, "parent": None, "chunk": None},
                   "raw": raw, "error": problem}, reason)


def expand_paths(paths: str | list[str], base: Path | None = None, suffixes: tuple[str, ...] = ()) -> list[Path]:
    """Files named by ``paths`` (files, folders searched recursively, or glob patterns), relative to ``base``.

    Raises a clear error when a pattern matches nothing: an empty input is a mistake, not a silent success."""
    items = [paths] if isinstance(paths, str) else list(paths)
    found: list[Path] = []
    for item in items:
        p = Path(item)
        if base is not None and not p.is_absolute():
            p = base / p
        if p.is_dir() and is_dataset_folder(p):
            matches = [p]
        elif p.is_dir():
            matches = _walk(p, suffixes)
        elif any(ch in str(p) for ch in "*?["):
            matches = sorted(Path(q) for q in glob.glob(str(p), recursive=True) if Path(q).is_file())
        elif p.is_file():
            matches = [p]
        else:
            raise CurationError(f"input not found: {p}")
        if not matches:
            want = f" with suffix {', '.join(suffixes)}" if suffixes else ""
            raise CurationError(f"no input files{want} under {p}")
        found.extend(matches)
    return found


def is_dataset_folder(path: Path) -> bool:
    """A folder written by ``datasets.save_to_disk`` (a Dataset has state.json, a DatasetDict dataset_dict.json)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _walk(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under ``folder`` with the wanted suffixes. A ``save_to_disk`` folder inside is one input (its
    outermost folder), taken only by readers of ``.arrow``: its ``dataset_info.json`` is not a data file."""
    out: dict[Path, None] = {}
    for q in sorted(folder.rglob("*")):
        if not q.is_file():
            continue
        root = next((a for a in reversed(q.relative_to(folder).parents[:-1]) if is_dataset_folder(folder / a)), None)
        if root is not None:
            if ".arrow" in suffixes:
                out[folder / root] = None
        elif not suffixes or q.suffix.lower() in suffixes:
            out[q] = None
    return list(out)


def read_text_file(path: Path, counters: Counter | None = None) -> str:
    """A file's text as UTF-8; bytes that are not UTF-8 are decoded with a fallback (cp1252, else replacement
    characters) and counted under ``non_utf8_files`` rather than failing or being lost."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        if counters is not None:
            counters["non_utf8_files"] += 1
        try:
            return data.decode("cp1252")
        except UnicodeDecodeError:
            return data.decode("utf-8", errors="replace")


def decode_line(raw: bytes, counters: Counter | None = None) -> str:
    """One line of a line-oriented file, with the same fallback as :func:`read_text_file`."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        if counters is not None:
            counters["non_utf8_lines"] += 1
        try:
            return raw.decode("cp1252")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")
