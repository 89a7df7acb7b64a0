"""Run directories and their ``run.json``: what a training stage was given, what it made, and whether re-running it
would change anything.

A run directory holds ``adapter/`` (or ``model/`` for a full fine-tune) with its tokenizer beside the weights, TensorBoard ``logs/``,
trainer ``checkpoints/`` and ``run.json``: the resolved config (secrets redacted), stage, base model, datasets with
their fingerprints, the parent run (path + fingerprint of its ``run.json``), package versions, git commit, metrics,
wall time and status (running / finished / failed).

``inputs_fingerprint`` hashes what decides the result: stage, config minus output-only keys, model, dataset
fingerprints, parent fingerprint. A stage opens its run with :meth:`Run.start`, which says what to do::

    run = Run.start(cfg.output_dir, "sft", asdict(cfg), model=asdict(cfg.model), datasets=[cfg.data.path])
    if run.action == "skip":  # finished before with the same inputs: runs are immutable, nothing to do
        return run.dir
    with run:  # an exception marks the run failed (and is re-raised); it can be resumed later
        trainer.train(resume_from_checkpoint=training.last_checkpoint(run.dir) if run.action == "resume" else None)
        run.finish(metrics)

Different inputs into an existing run directory are an error naming the keys that differ (``overwrite=True``
replaces the run). Every write is atomic, so a killed job never leaves half a ``run.json``.
Nothing heavy is imported here: ``rlhf --help`` and lineage queries stay instant.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rlhf.config import ConfigError, redact_argv, redact_secrets
from rlhf.provenance import git_commit, versions

RUN_JSON = "run.json"
FORMAT = 1  # run.json schema version; bump when a field changes meaning
STATUSES = ("running", "finished", "failed")
VERSION_PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes")
# Keys (at any depth of the config) that change where or how often things are written, never the trained weights.
OUTPUT_ONLY_KEYS = frozenset({"output_dir", "out_dir", "overwrite", "resume", "logging_steps", "save_steps",
                              "save_total_limit", "report_to", "push_to_hub", "hub_model_id", "num_proc"})
_REQUIRED = {"format": int, "stage": str, "status": str, "inputs_fingerprint": str, "config": dict, "model": dict,
             "datasets": list, "metrics": dict}
_BLOCK = 1 << 20  # 1 MiB reads: hashing runs at disk/SHA speed with flat memory


class RunError(ConfigError):
    """A run directory cannot be used as asked (different inputs, unfinished parent, damaged run.json): a user
    mistake, so the CLI prints it as one line."""


class InputsChanged(RunError):
    """The output folder holds a run made from other inputs: ``rlhf run`` replaces it (its recipe owns the folder),
    a single stage command refuses unless told to overwrite."""


# --- fingerprints -------------------------------------------------------------------------------------------------

def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _is_data_file(rel: Path) -> bool:
    """Hidden files (editor droppings, our own temp files), ``curation.json`` (its wall time changes from one identical
    curation to the next; it is lineage, not data) and the ``cache-*.arrow`` files ``datasets`` writes beside a
    ``save_to_disk`` folder on every ``.map()``/``.filter()`` (so loading a dataset would otherwise change it)."""
    name = rel.name
    return not (any(part.startswith(".") for part in rel.parts) or name == "curation.json"
                or (name.startswith("cache-") and name.endswith(".arrow")))


def find_curation_manifest(path: Path) -> Path | None:
    """The ``curation.json`` of the curated folder that ``path`` (a dataset file or folder) lies in, if any."""
    path = Path(path).resolve()
    for folder in [path, *path.parents] if path.is_dir() else path.parents:
        if (folder / "curation.json").is_file():
            return folder / "curation.json"
    return None


def _load_manifest(manifest: Path) -> dict[str, Any]:
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"{manifest}: unreadable curation manifest ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("outputs"), dict):
        raise RunError(f"{manifest}: not a curation manifest (no 'outputs' mapping)")
    return data


def _manifest_hashes(manifest: Path) -> dict[Path, str]:
    """``{file: sha256}`` from a curation manifest, for files not modified since it was written (``rlhf curate``
    writes curation.json last, so a newer file was edited afterwards and is hashed again)."""
    root, written = manifest.parent, manifest.stat().st_mtime_ns
    known = {}
    for output in _load_manifest(manifest)["outputs"].values():
        for rel, digest in (output.get("files") or {}).items():
            file = root / rel
            if file.is_file() and file.stat().st_mtime_ns <= written:
                known[file.resolve()] = digest
    return known


def fingerprint_path(path: Path | str) -> str:
    """sha256 of a file's bytes, or of a folder's ``relative path + file sha256`` lines in sorted order (so renames
    count). Files are read in 1 MiB blocks; files listed in the ``curation.json`` of the curated folder they lie in
    reuse its sha256 instead of being read again."""
    path = Path(path)
    if not path.exists():
        raise RunError(f"dataset not found: {path}")
    manifest = find_curation_manifest(path)
    known = _manifest_hashes(manifest) if manifest else {}
    if path.is_file():
        return known.get(path.resolve()) or _sha256_file(path)
    files = sorted((p for p in path.rglob("*") if p.is_file() and _is_data_file(p.relative_to(path))),
                   key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise RunError(f"dataset folder has no files: {path}")
    h = hashlib.sha256()
    for file in files:
        digest = known.get(file.resolve()) or _sha256_file(file)
        h.update(f"{file.relative_to(path).as_posix()}\0{digest}\n".encode())
    return h.hexdigest()


# --- JSON ---------------------------------------------------------------------------------------------------------

def _json_default(obj: Any) -> Any:
    """Paths, sets and NumPy/torch scalars become JSON; anything else is an error rather than a ``repr`` that would
    hold a memory address and make every fingerprint unique."""
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _plain(obj: Any) -> Any:
    """JSON-normal form (tuples -> lists, Paths -> str): what is stored is exactly what was hashed."""
    return json.loads(json.dumps(obj, default=_json_default))


def sha256_json(obj: Any) -> str:
    """A content hash of a JSON-able object (key order does not matter)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default).encode()
                          ).hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, fsync, then ``os.replace``: readers see the old file or the new
    one, never a partial one, even if the job is killed half-way."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # hidden: not fingerprinted
    try:
        with tmp.open("x", encoding="utf-8") as f:  # mode "x" honours the umask (mkstemp would force 0600)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """``data`` as indented JSON, written by :func:`write_text_atomic` (serialised first: a value that cannot be
    written leaves the old file as it was)."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=_json_default) + "\n")


# --- records ------------------------------------------------------------------------------------------------------

def load_run(path: Path | str) -> dict[str, Any]:
    """The ``run.json`` of a run directory (or the file itself), checked; errors name the file."""
    path = Path(path)
    file = path / RUN_JSON if path.is_dir() else path
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{file}: not found (not a run directory)") from None
    except json.JSONDecodeError as e:
        raise RunError(f"{file}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise RunError(f"{file}: expected a JSON object, got {type(record).__name__}")
    for key, kind in _REQUIRED.items():
        if not isinstance(record.get(key), kind):
            raise RunError(f"{file}: '{key}' is missing or not a {kind.__name__}")
    if record["format"] > FORMAT:
        raise RunError(f"{file}: format {record['format']} is newer than this rlhf-pipeline reads ({FORMAT})")
    if record["status"] not in STATUSES:
        raise RunError(f"{file}: status {record['status']!r} is not one of {', '.join(STATUSES)}")
    if not isinstance(record.get("parent"), (dict, type(None))):
        raise RunError(f"{file}: 'parent' must be an object or null")
    if any(not isinstance(d, dict) or not isinstance(d.get("fingerprint"), str) for d in record["datasets"]):
        raise RunError(f"{file}: every entry of 'datasets' needs a 'fingerprint'")
    return record


def _strip(obj: Any, keys: frozenset[str]) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v, keys) for k, v in obj.items() if k not in keys}
    if isinstance(obj, list):
        return [_strip(v, keys) for v in obj]
    return obj


def _inputs(record: dict[str, Any], output_only: frozenset[str]) -> dict[str, Any]:
    """What ``inputs_fingerprint`` hashes; paths are left out (moving data or runs does not change them)."""
    return {"stage": record["stage"], "config": _strip(record["config"], output_only), "model": record["model"],
            "datasets": [d["fingerprint"] for d in record["datasets"]],
            "parent": record["parent"]["fingerprint"] if record.get("parent") else None}


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        return {k: v for key, value in obj.items()
                for k, v in _flatten(value, f"{prefix}.{key}" if prefix else key).items()}
    if isinstance(obj, list) and obj:
        return {k: v for i, value in enumerate(obj) for k, v in _flatten(value, f"{prefix}[{i}]").items()}
    return {prefix: obj}


def _show(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]  # a sha256: the first 12 hex digits tell two apart
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    old, new = _flatten(old), _flatten(new)
    missing = object()
    return [f"{key}: {'(absent)' if old.get(key, missing) is missing else _show(old[key])} -> "
            f"{'(absent)' if new.get(key, missing) is missing else _show(new[key])}"
            for key in sorted(old.keys() | new.keys()) if old.get(key, missing) != new.get(key, missing)]


def _existing(out_dir: Path) -> dict[str, Any] | None:
    if (out_dir / RUN_JSON).exists():
        return load_run(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise RunError(f"{out_dir} is not empty and holds no {RUN_JSON}: not a run directory, so nothing in it is "
                       "replaced; choose a new or empty output folder")
    return None


def dataset_entry(path: Path) -> dict[str, Any]:
    """A dataset as run records list theirs: path, fingerprint, and the curation manifest it came from."""
    manifest = find_curation_manifest(path) if path.exists() else None
    return {"path": str(path.resolve()), "fingerprint": fingerprint_path(path),
            "curation": str(manifest) if manifest else None}


def _parent_entry(parent: Path) -> dict[str, Any]:
    parent = parent.parent if parent.name == RUN_JSON else parent
    record = load_run(parent)
    if record["status"] != "finished":
        raise RunError(f"parent run {parent} is {record['status']}, not finished; finish it first")
    return {"path": str(parent.resolve()), "stage": record["stage"], "fingerprint": _sha256_file(parent / RUN_JSON)}


def _new_record(stage: str, config: Any, model: dict[str, Any], datasets: list[Path], parent: Path | None,
                output_only: frozenset[str]) -> dict[str, Any]:
    """A fresh ``run.json`` for these inputs, fingerprint included (this hashes the datasets)."""
    if not isinstance(stage, str) or not stage:
        raise ValueError(f"stage: expected a name such as 'sft', got {stage!r}")
    if not isinstance(model, dict) or not isinstance(model.get("name_or_path"), str):
        raise TypeError(f"model: expected a mapping with name_or_path, got {model!r}")
    config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    if not isinstance(config, dict):
        raise TypeError(f"config: expected a mapping or a dataclass, got {type(config).__name__}")
    record = {"format": FORMAT, "stage": stage, "status": "running", "inputs_fingerprint": "",
              "config": _plain(redact_secrets(config)), "model": _plain(redact_secrets(model)),
              "datasets": [dataset_entry(p) for p in datasets], "parent": _parent_entry(parent) if parent else None,
              "versions": versions(VERSION_PACKAGES), "git_commit": git_commit(),
              "command": shlex.join(redact_argv(sys.argv)), "metrics": {}, "error": None,
              "started_at": utc_now(), "finished_at": None, "wall_time_s": 0.0, "attempts": 1}
    record["inputs_fingerprint"] = sha256_json(_inputs(record, output_only))
    return record


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _inside(path: Path, folder: Path) -> bool:
    path = path.resolve()
    return path == folder or folder in path.parents


@dataclass
class Run:
    """An open run directory. ``action`` is what the stage should do: ``run`` (fresh), ``resume`` (an unfinished
    run with the same inputs: continue from its last checkpoint) or ``skip`` (finished with the same inputs)."""

    dir: Path  # the run directory (absolute)
    action: str  # run | resume | skip
    record: dict[str, Any]  # the content of run.json
    _t0: float = field(default_factory=time.monotonic, repr=False)  # wall time of this attempt starts here
    _wall_before: float = field(default=0.0, repr=False)  # wall time of earlier attempts (resumed runs)
    writes: bool = field(default=True, repr=False)  # False on the other ranks of a distributed job: one writer only

    adapter_dir = property(lambda self: self.dir / "adapter")  # PEFT adapter (save_pretrained)
    model_dir = property(lambda self: self.dir / "model")  # full weights (full fine-tune or merged)
    # the tokenizer is saved beside the weights (adapter/ or model/), so either folder loads on its own
    logs_dir = property(lambda self: self.dir / "logs")  # TensorBoard
    history_file = property(lambda self: self.dir / "history.json")  # every logged step, for plots without TensorBoard
    checkpoints_dir = property(lambda self: self.dir / "checkpoints")  # Trainer output_dir: checkpoint-N folders

    @classmethod
    def start(cls, out_dir: Path | str, stage: str, config: Any, model: dict[str, Any],
              datasets: Iterable[Path | str] = (), parent: Path | str | None = None, overwrite: bool = False,
              output_only: Iterable[str] = OUTPUT_ONLY_KEYS) -> Run:
        """Open ``out_dir`` for ``stage``: a new run, the unfinished run with the same inputs (``resume``), or the
        finished one (``skip``). ``config`` is the resolved config (a dict or dataclass; secrets are redacted
        before anything is hashed or written), ``model`` names the base (``name_or_path`` and ``revision``)."""
        out_dir = Path(out_dir).resolve()
        datasets = [Path(p) for p in datasets]
        if any(_inside(p, out_dir) for p in [*datasets, *([Path(parent)] if parent else [])]):
            raise RunError(f"{out_dir}: a run cannot read its datasets or parent from its own folder")
        output_only = frozenset(output_only)
        record = _new_record(stage, config, model, datasets, Path(parent) if parent else None, output_only)
        existing = _existing(out_dir)
        if existing is not None and not overwrite:
            if existing["inputs_fingerprint"] != record["inputs_fingerprint"]:
                diffs = _differences(_inputs(existing, output_only), _inputs(record, output_only))
                raise InputsChanged(f"{out_dir} holds a {existing['status']} {existing['stage']} run made from "
                                    f"different inputs: {'; '.join(diffs[:12]) or 'inputs fingerprint differs'}. "
                                    "Choose another output folder, or overwrite to replace it")
            if existing["status"] == "finished":
                return cls(out_dir, "skip", existing)
            return cls._resume(out_dir, existing, record)
        if existing is not None:
            shutil.rmtree(out_dir)  # only ever a folder holding a run.json (see _existing)
        out_dir.mkdir(parents=True, exist_ok=True)
        run = cls(out_dir, "run", record)
        run._save()
        run.logs_dir.mkdir(exist_ok=True)
        run.checkpoints_dir.mkdir(exist_ok=True)
        return run

    @classmethod
    def _resume(cls, out_dir: Path, existing: dict[str, Any], fresh: dict[str, Any]) -> Run:
        """Same inputs, not finished: keep the record's history, take this attempt's software and config (only
        output-only keys can differ)."""
        record = {**existing, "status": "running", "error": None, "finished_at": None, "config": fresh["config"],
                  "versions": fresh["versions"], "git_commit": fresh["git_commit"], "command": fresh["command"],
                  "attempts": int(existing.get("attempts", 1)) + 1}
        run = cls(out_dir, "resume", record, _wall_before=float(existing.get("wall_time_s") or 0.0))
        run._save()
        return run

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and self.record["status"] == "running":
            self.fail(exc)
        return False  # never swallow the exception

    @classmethod
    def follow(cls, out_dir: Path | str, action: str) -> Run:
        """The run as the main process opened it, for the other processes of a distributed job: same directory and
        action, never writes (each rank opening the run itself would find the main rank's fresh record "running")."""
        out_dir = Path(out_dir).resolve()
        return cls(out_dir, action, load_run(out_dir), writes=False)

    def _save(self) -> None:
        if not self.writes:
            return
        self.record["wall_time_s"] = round(self._wall_before + time.monotonic() - self._t0, 3)
        write_json_atomic(self.dir / RUN_JSON, self.record)

    def _check_open(self) -> None:
        if self.record["status"] != "running":
            raise RunError(f"{self.dir / RUN_JSON}: the run is {self.record['status']}; finished runs are immutable")

    def record_metrics(self, metrics: dict[str, Any]) -> None:
        """Merge ``metrics`` into the record and write it (a bad value raises before the record changes)."""
        self._check_open()
        self.record["metrics"].update(_plain(metrics))
        self._save()

    def write_history(self, entries: list[dict[str, Any]]) -> None:
        """Every logged step (a list of ``{"step": n, metric: value}``) as ``history.json``: reports and plots read it
        without TensorBoard; run.json keeps only first/last values."""
        if self.writes:
            write_json_atomic(self.history_file, _plain(entries))

    def finish(self, metrics: dict[str, Any] | None = None) -> None:
        self._check_open()
        self.record["metrics"].update(_plain(metrics or {}))
        self.record.update(status="finished", finished_at=utc_now())
        self._save()

    def fail(self, error: BaseException | str) -> None:
        self._check_open()
        kind = type(error).__name__ if isinstance(error, BaseException) else "Error"
        self.record.update(status="failed", error={"type": kind, "message": str(error)}, finished_at=utc_now())
        self._save()


def parent_chain(path: Path | str) -> list[dict[str, Any]]:
    """Lineage, newest first: ``{"kind": "run", "path", "record"}`` for the run and each parent in turn, then
    ``{"kind": "curation", ...}`` for the curation manifest of every dataset they read (the root: raw documents).
    Each parent's run.json must still match the fingerprint its child recorded."""
    chain: list[dict[str, Any]] = []
    manifests: dict[str, None] = {}  # ordered set
    current: Path | None = Path(path).resolve()
    expected: str | None = None
    while current is not None:
        if any(entry["path"] == current for entry in chain):
            raise RunError(f"{current / RUN_JSON}: parent links form a cycle")
        record = load_run(current)
        if expected is not None and _sha256_file(current / RUN_JSON) != expected:
            raise RunError(f"{current / RUN_JSON} changed after {chain[-1]['path']} was made from it "
                           f"(fingerprint {expected[:12]} recorded); the lineage is broken")
        chain.append({"kind": "run", "path": current, "record": record})
        manifests.update((d["curation"], None) for d in record["datasets"] if d.get("curation"))
        parent = record.get("parent")
        current, expected = (Path(parent["path"]), parent["fingerprint"]) if parent else (None, None)
    chain += [{"kind": "curation", "path": Path(m), "record": _load_manifest(Path(m))} for m in manifests]
    return chain
