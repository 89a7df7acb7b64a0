"""``rlhf feedback push``: ranking records -> an Argilla dataset that annotators rank in the web UI (issue 4).

Input: records in the ranking vocabulary (``id``, ``source``, ``prompt``, ``candidates: [{content, ...}]``, ``meta``),
as written by ``rlhf feedback generate`` (``candidates.jsonl``) or ``rlhf curate`` (``ranking/*.jsonl|parquet``).
Each becomes one Argilla record: the prompt and ``response_1..k`` fields, terms metadata ``source``/``model``/``run``
(filters in the UI) and, as extra metadata, the prompt as JSON and the input record's id so pull can rebuild exact
TRL rows. Records are upserted under ``dataset.record_id`` (prompt + candidate texts): pushing the same items again
creates no duplicates and keeps every annotator's responses (the server's bulk upsert only touches what it is sent).

Suggestions (optional): a reward model from ``rlhf align rm`` scores every candidate and the ranking it implies is
shown to annotators as a hint. The SDK drops the ``rank`` of ranking suggestions exactly as it does for responses
(argilla-io/argilla#5712, field-notes trap 11), and the UI pre-fills a ranking only from ``rank``, so suggestions
go over the REST bulk-upsert endpoint the SDK itself uses.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from feedback.client import ArgillaConfig, FeedbackError, connect
from feedback.dataset import (PROMPT, PROMPT_JSON, RANKING, SOURCE_ID, DatasetSpec, METADATA, build_settings,
                              record_id, render_prompt, response_field)
from feedback.suggest import SuggestionsConfig, put_suggestions, ranking_suggestion, suggest

if TYPE_CHECKING:
    import argilla as rg

CURATE_FOLDER = "ranking"  # the ranking kind's folder in an `rlhf curate` output
ROLES = ("system", "user", "assistant")
UPSERT_MAX = 500  # records per bulk upsert request (argilla_server RECORDS_BULK_UPSERT_MAX_ITEMS)


# ---------------------------------------------------------------------------------------------------- the recipe
@dataclass
class PushConfig:
    """A feedback push recipe (samples/telecom/feedback.yaml)."""

    dataset: DatasetSpec  # the Argilla dataset: name, k, optional rating/correction, guidelines, overlap
    input: str | list[str]  # ranking records: JSONL/Parquet files, globs, or generate/curate output folders
    argilla: ArgillaConfig = field(default_factory=ArgillaConfig)  # server URL, API key (secret), workspace
    suggestions: Optional[SuggestionsConfig] = None  # reward-model rankings shown to annotators as hints
    batch_size: int = 256  # records per upsert request (Argilla takes at most 500)
    base_dir: Optional[str] = None  # relative paths resolve against it; None: the working directory

    def __post_init__(self) -> None:
        items = [self.input] if isinstance(self.input, str) else self.input
        if not isinstance(items, list) or not items or not all(isinstance(p, str) and p.strip() for p in items):
            raise ValueError(f"input: expected a path or a list of paths, got {self.input!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) \
                or not 1 <= self.batch_size <= UPSERT_MAX:
            raise ValueError(f"batch_size: expected an integer in 1..{UPSERT_MAX}, got {self.batch_size!r}")

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() or self.base_dir is None else Path(self.base_dir) / p


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PushConfig:
    """The push recipe at ``path`` with ``--set key=value`` overrides; errors (``ConfigError``) name file and key.
    Relative paths stay relative to the working directory, as in generate/pull and the align stages: they name
    outputs of earlier commands (out/...) run from the same place."""
    from rlhf.config import load_config as load

    return load(PushConfig, path, overrides)


# ----------------------------------------------------------------------------------------------------- the input
@dataclass
class Item:
    """One ranking record, checked: what an Argilla record is built from."""

    id: Optional[str]  # the input record's id (kept as SOURCE_ID metadata)
    source: Optional[str]
    prompt: str | list[dict[str, str]]  # a string, or messages reduced to {role, content}
    candidates: list[str]
    meta: dict[str, Any]


def input_files(cfg: PushConfig) -> list[Path]:
    """The files named by ``cfg.input``: a folder is a generate output (its candidates.jsonl), a curate output (its
    ranking/ folder) or any folder of JSONL files, else of Parquet files: curate writes the same rows in both
    formats, so a folder is read in one of them, never both."""
    from curation.steps import CurationError, expand_paths
    from feedback.generate import CANDIDATES

    files: list[Path] = []
    for item in [cfg.input] if isinstance(cfg.input, str) else cfg.input:
        path = cfg.resolve(item)
        suffixes: tuple[str, ...] = ()
        if path.is_dir():
            if (path / CANDIDATES).is_file():
                path = path / CANDIDATES
            elif (path / CURATE_FOLDER).is_dir():
                path = path / CURATE_FOLDER
            suffixes = (".jsonl",) if path.is_dir() and any(path.rglob("*.jsonl")) else (".parquet",)
        try:
            files += expand_paths(str(path), None, suffixes)
        except CurationError as e:  # "input not found: PATH", "no input files with suffix ... under PATH"
            raise FeedbackError(f"input: {e}") from None
    return files


def read_items(files: list[Path]) -> list[Item]:
    """Every ranking record of ``files``; a malformed row stops the push naming its file and line."""
    from curation.readers.rows import iter_rows
    from curation.steps import CurationError, Reader

    items = []
    for path in files:
        try:
            for line, row in iter_rows(Reader(), path):  # a bare Reader: malformed JSON raises, naming file:line
                items.append(parse_item(row, f"{path}:{line}"))
        except CurationError as e:
            raise FeedbackError(str(e)) from None
    if not items:
        raise FeedbackError(f"input: no ranking records in {', '.join(map(str, files))}")
    return items


def parse_item(row: dict, where: str) -> Item:
    """A row of the ranking vocabulary as an :class:`Item`; anything else is a FeedbackError naming ``where``."""
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                                 for m in prompt):
            raise FeedbackError(f"{where}: prompt: expected chat messages {{role, content}} with roles "
                                f"{'/'.join(ROLES)}")
        if prompt[-1]["role"] != "user":
            raise FeedbackError(f"{where}: prompt: the last message must be a user turn, got {prompt[-1]['role']!r}")
        # Only role and content: Parquet adds null keys to structs, and the record id must not depend on the format.
        prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
    elif not isinstance(prompt, str) or not prompt.strip():
        raise FeedbackError(f"{where}: prompt: expected a non-empty string or chat messages, got {_kind(prompt)}")
    candidates = row.get("candidates")
    if not isinstance(candidates, list) or not all(isinstance(c, dict) and isinstance(c.get("content"), str)
                                                   for c in candidates):
        raise FeedbackError(f"{where}: candidates: expected a list of {{content, ...}}, got {_kind(candidates)}")
    meta = row.get("meta") or {}
    if isinstance(meta, str):  # curate stores meta as a JSON string (one Arrow schema for all rows)
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError as e:
            raise FeedbackError(f"{where}: meta: not valid JSON ({e.msg})") from None
    if not isinstance(meta, dict):
        raise FeedbackError(f"{where}: meta: expected an object, got {_kind(meta)}")
    return Item(id=row.get("id"), source=row.get("source"), prompt=prompt,
                candidates=[c["content"] for c in candidates], meta=meta)


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def select_items(items: list[Item], k: int) -> tuple[dict[str, Item], Counter]:
    """``({record id: item}, skipped reasons)``. A record with another number of candidates than ``k`` is skipped,
    not fatal: the dataset's layout is fixed at k responses, generate may dedupe identical samples and curated
    rankings (OASST) have any size, and one odd record should not keep the rest from annotators. Cutting it to k
    would change which answers compete, so it is left out and counted."""
    kept: dict[str, Item] = {}
    skipped: Counter = Counter()
    for item in items:
        n = len(item.candidates)
        if n != k:
            skipped[f"{'fewer' if n < k else 'more'}_than_{k}_candidates"] += 1
            continue
        rid = record_id(item.prompt, item.candidates)
        if rid in kept:
            skipped["duplicate"] += 1  # one bulk request may not hold an id twice
            continue
        kept[rid] = item
    return kept, skipped


def record_values(item: Item, spec: DatasetSpec) -> tuple[dict[str, str], dict[str, Any]]:
    """``(fields, metadata)`` of the Argilla record for ``item``; unset metadata is left out, not sent as null."""
    fields = {PROMPT: render_prompt(item.prompt),
              **{response_field(i): c for i, c in enumerate(item.candidates, start=1)}}
    terms = {"source": item.source, **{m: item.meta.get(m) for m in (*METADATA[1:], *spec.extra_metadata)}}
    metadata = {k: str(v) for k, v in terms.items() if v is not None}
    metadata[PROMPT_JSON] = json.dumps(item.prompt, ensure_ascii=False)
    if item.id is not None:
        metadata[SOURCE_ID] = str(item.id)
    return fields, metadata


# ------------------------------------------------------------------------------------------------ the dataset
def layout_differences(have: "rg.Settings", want: "rg.Settings") -> list[str]:
    """What differs between an existing dataset's fields/questions and the recipe's (Argilla cannot change either
    once a dataset is published)."""
    def shape(props) -> dict[str, str]:
        return {p.name: p.type + (f" {list(p.values)}" if hasattr(p, "values") else "") for p in props}

    diffs = []
    for what, h, w in (("field", shape(have.fields), shape(want.fields)),
                       ("question", shape(have.questions), shape(want.questions))):
        diffs += [f"{what} {n} is missing" for n in w if n not in h]
        diffs += [f"{what} {n} is not in the recipe" for n in h if n not in w]
        diffs += [f"{what} {n} is {h[n]}, the recipe wants {w[n]}" for n in w if n in h and h[n] != w[n]]
    return diffs


def reconcile(ds: "rg.Dataset", want: "rg.Settings", spec: DatasetSpec) -> list[str]:
    """Check an existing dataset fits the recipe, then bring what may change (guidelines, overlap, metadata
    filters) up to date; returns what was updated."""
    import argilla as rg

    diffs = layout_differences(ds.settings, want)
    if diffs:
        raise FeedbackError(f"dataset {spec.name!r} exists with another layout: {'; '.join(diffs)} "
                            f"(push to a new dataset name, or delete it in Argilla)")
    s, changed = ds.settings, []
    if want.guidelines is not None and s.guidelines != want.guidelines:
        s.guidelines = want.guidelines
        changed.append("guidelines")
    if s.distribution.min_submitted != spec.min_submitted:
        s.distribution = rg.TaskDistribution(min_submitted=spec.min_submitted)
        changed.append("min_submitted")
    if not s.allow_extra_metadata:
        s.allow_extra_metadata = True
        changed.append("allow_extra_metadata")
    for prop in [p for p in want.metadata if p.name not in {m.name for m in s.metadata}]:
        s.metadata.add(prop)  # metadata, unlike fields and questions, may be added to a published dataset
        changed.append(f"metadata {prop.name}")
    if changed:
        ds.update()
    return changed


def existing_records(ds: "rg.Dataset") -> dict[str, tuple]:
    """``{record id: (fields, metadata, ranking suggestion)}`` of what the dataset holds, to tell new, updated and
    unchanged records apart (the SDK keeps a suggestion's order and scores, only its ranks are lost)."""
    out = {}
    for r in ds.records(with_suggestions=True):
        s = next((s for s in r.suggestions if s.question_name == RANKING), None)
        out[r.id] = (dict(r.fields), dict(r.metadata), _suggestion_key(s.value, s.score, s.agent) if s else None)
    return out


def _suggestion_key(order: list, scores: Optional[list], agent: Optional[str]) -> tuple:
    return tuple(order), tuple(round(s, 6) for s in scores or ()), agent


# ------------------------------------------------------------------------------------------------------- run
def run(cfg: PushConfig, log=print) -> dict:
    """Create or update the dataset and upsert the records; returns a summary (no secrets in it)."""
    import argilla as rg

    from feedback.annotators import ensure_workspace
    from feedback.client import sdk_errors

    items, skipped = select_items(read_items(input_files(cfg)), cfg.dataset.k)
    if not items:
        raise FeedbackError(f"input: no record has k={cfg.dataset.k} candidates (skipped: {dict(skipped)})")
    client = connect(cfg.argilla)  # before scoring: an unreachable server fails fast
    want = build_settings(cfg.dataset, _guidelines(cfg), client)
    agent, suggestions = suggest(cfg, items) if cfg.suggestions else (None, {})

    with sdk_errors(client):  # 403 for a key that may not create datasets, 422 for a record the server refuses
        workspace = ensure_workspace(client, cfg.argilla.workspace)
        ds = next((d for d in workspace.datasets if d.name == cfg.dataset.name), None)
        created = ds is None
        if created:
            ds = rg.Dataset(name=cfg.dataset.name, workspace=workspace, settings=want, client=client).create()
        settings_updated = [] if created else reconcile(ds.get(), want, cfg.dataset)
        question_id = str(ds.settings.questions[RANKING].id)

        have = {} if created else existing_records(ds)
        status, send = plan(items, have, cfg.dataset, {rid: ranking_suggestion(scores, question_id, agent)
                                                       for rid, scores in suggestions.items()})
        if send:
            ds.records.log([r for r, _ in send], batch_size=cfg.batch_size)
            put_suggestions(client, ds, [(r.id, s) for r, s in send if s is not None], cfg.batch_size)

    summary = {"dataset": cfg.dataset.name, "workspace": cfg.argilla.workspace, "id": str(ds.id),
               "url": f"{client.api_url.rstrip('/')}/dataset/{ds.id}/annotation-mode", "created": created,
               "settings_updated": settings_updated,
               "records": {"read": len(items) + sum(skipped.values()), "pushed": len(send), **{
                   s: status[s] for s in ("new", "updated", "unchanged")}},
               "skipped": dict(skipped),
               "suggestions": {"agent": agent, "records": len(suggestions)} if suggestions else None}
    log(f"{'created' if created else 'updated'} {cfg.argilla.workspace}/{cfg.dataset.name}: "
        f"{status['new']} new, {status['updated']} updated, {status['unchanged']} unchanged"
        + (f", skipped {dict(skipped)}" if skipped else "") + f"; {summary['url']}")
    return summary


def plan(items: dict[str, Item], have: dict[str, tuple], spec: DatasetSpec,
         suggestions: dict[str, dict]) -> tuple[Counter, list[tuple["rg.Record", Optional[dict]]]]:
    """``(counts of new/updated/unchanged, [(record, suggestion)] to send)``: unchanged records are not sent, so a
    re-push does not touch them at all."""
    import argilla as rg

    status: Counter = Counter()
    send = []
    for rid, item in items.items():
        fields, metadata = record_values(item, spec)
        state = _state(have.get(rid), fields, metadata, suggestions.get(rid))
        status[state] += 1
        if state != "unchanged":
            send.append((rg.Record(id=rid, fields=fields, metadata=metadata), suggestions.get(rid)))
    return status, send


def _state(old: Optional[tuple], fields: dict, metadata: dict, sug: Optional[dict]) -> str:
    """new / updated / unchanged: a record whose suggestion is not recomputed this time keeps the old one."""
    if old is None:
        return "new"
    key = _suggestion_key([v["value"] for v in sug["value"]], sug["score"], sug["agent"]) if sug else old[2]
    return "unchanged" if old == (fields, metadata, key) else "updated"


def _guidelines(cfg: PushConfig) -> Optional[str]:
    if cfg.dataset.guidelines is None:
        return None
    path = cfg.resolve(cfg.dataset.guidelines)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise FeedbackError(f"dataset.guidelines: cannot read {path} ({e.strerror})") from None
