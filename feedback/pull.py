"""``rlhf feedback pull`` (issue 4): submitted rankings in Argilla -> a TRL preference dataset + an agreement report.

Ranks are read over REST, never from the SDK: ``Response.value`` of a ranking question keeps the option order and
drops ``rank`` (argilla-io/argilla#5712, field-notes trap 11), which would silently turn every ranking into
"response_1 > response_2 > ...". The raw value is ``[{"value": "response_2", "rank": 1}, ...]``.

Incremental: ``pull_state.json`` keeps, per record, each counted response's (id, updated_at, status) and the rows
it gave. Argilla 2.8 cannot list "responses changed since": the records listing has no such filter, and a record's
own ``updated_at`` moves only when the record changes (fields, metadata, completion status), not with each response.
So a pull lists the records with their responses (one request per 1000 records), compares, and re-aggregates only
the records whose responses changed. The output files are always rewritten whole from all rows, so a second pull
adds what is new and duplicates nothing.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignment.runs import write_json_atomic
from feedback import export
from feedback.agreement import agreement_report
from feedback.client import ArgillaConfig, FeedbackError, Rest, connect
from feedback.dataset import CORRECTION, PROMPT, PROMPT_JSON, RANKING, RATING, SOURCE_ID
from feedback.simulate import is_simulated

if TYPE_CHECKING:
    import argilla as rg

METHODS = ("majority", "bradley_terry", "none")
STATUSES = ("submitted", "discarded")  # drafts are unfinished work and never count
FORMATS = ("jsonl", "parquet", "datasets")
STATE_FILE = "pull_state.json"
STATE_VERSION = 1
_PAGE = 1000  # the largest page the records listing serves (LIST_DATASET_RECORDS_LIMIT_LE in argilla_server 2.8)
_RESPONSE_FIELD = re.compile(r"^response_(\d+)$")


@dataclass
class PullConfig:
    """A ``feedback pull`` recipe: which dataset, how rankings become pairs, where the files go."""

    dataset: str  # Argilla dataset name (in argilla.workspace)
    output_dir: str  # folder for preference/, agreement.json/.md, curation.json, pull_state.json (relative to cwd)
    argilla: ArgillaConfig = field(default_factory=ArgillaConfig)  # server, key and workspace
    aggregate: str = "majority"  # majority | bradley_terry | none (every annotator's pairs as rows, annotator in meta)
    min_votes: int = 1  # majority: a pair needs at least this many votes, and more than the opposite order
    bt_margin: float = 0.0  # bradley_terry: keep pairs whose strength gap exceeds this (1.1 ~ P(win) 0.75)
    min_annotators: int = 1  # records with fewer counted rankings wait for a later pull
    statuses: list[str] = field(default_factory=lambda: ["submitted"])  # response statuses that count (no draft)
    use_corrections: bool = False  # an annotator's correction -> one extra pair: correction > their best response
    test_fraction: float = 0.0  # share of prompts held out as test.jsonl, grouped by prompt (0: train only)
    seed: int = 0  # hash seed of the train/test split
    formats: list[str] = field(default_factory=lambda: ["jsonl", "parquet"])  # jsonl, parquet, datasets

    def __post_init__(self) -> None:
        for name in ("dataset", "output_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"{name}: must be a non-empty string")
        if isinstance(self.argilla, dict):
            self.argilla = ArgillaConfig(**self.argilla)
        if self.aggregate not in METHODS:
            raise ValueError(f"aggregate: expected one of {', '.join(METHODS)}, got {self.aggregate!r}")
        for name in ("min_votes", "min_annotators"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        if isinstance(self.bt_margin, bool) or not isinstance(self.bt_margin, (int, float)) or self.bt_margin < 0:
            raise ValueError(f"bt_margin: expected a number >= 0, got {self.bt_margin!r}")
        if not self.statuses or any(s not in STATUSES for s in self.statuses):
            raise ValueError(f"statuses: expected a non-empty subset of {', '.join(STATUSES)} (drafts never count), "
                             f"got {self.statuses!r}")
        if not isinstance(self.use_corrections, bool):
            raise ValueError(f"use_corrections: expected true or false, got {self.use_corrections!r}")
        if isinstance(self.test_fraction, bool) or not isinstance(self.test_fraction, (int, float)) \
                or not 0 <= self.test_fraction < 1:
            raise ValueError(f"test_fraction: expected a fraction in [0, 1), got {self.test_fraction!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed: expected an integer, got {self.seed!r}")
        if not self.formats or any(f not in FORMATS for f in self.formats):
            raise ValueError(f"formats: expected a non-empty subset of {', '.join(FORMATS)}, got {self.formats!r}")


def load_config(path: Path, overrides: list[str] = ()) -> PullConfig:
    """A :class:`PullConfig` from a YAML recipe with ``--set key=value`` overrides; errors name the file and key."""
    from rlhf.config import load_config as load

    return load(PullConfig, path, overrides)


# ------------------------------------------------------------------------------------------------ reading
@dataclass
class Answer:
    """One annotator's response to one record, as the REST API returns it."""

    user: str  # username (the user id when the key may not list users)
    user_id: str  # Argilla's user id (what the incremental state is keyed by: names need an owner's key)
    status: str  # submitted | discarded | draft
    ranks: dict[str, int]  # {response_field: rank}, best (1) first; equal ranks are ties; {} when not ranked
    rating: int | None  # the optional 1-5 rating of the best response
    correction: str | None  # the optional corrected answer
    response_id: str
    updated_at: str


@dataclass
class PulledRecord:
    """One Argilla record: the prompt, its candidates by field, and every annotator's answer."""

    uuid: str  # Argilla's record id
    external_id: str  # our stable id (feedback.dataset.record_id); the uuid when the record has none
    prompt: list[dict] | None  # chat messages ending with a user turn; None when the record has no usable prompt
    candidates: dict[str, str]  # {response_field: text}
    source_id: str | None  # the ranking record it was pushed from (lineage back to generate/curate)
    updated_at: str
    answers: list[Answer]

    def rankings(self) -> dict[str, dict[str, int]]:
        """``{annotator: {response_field: rank}}`` over the answers that carry a ranking."""
        return {a.user: a.ranks for a in self.answers if a.ranks}


def _value(values: dict, question: str) -> Any:
    return (values.get(question) or {}).get("value")


def _answer(raw: dict, names: dict[str, str]) -> Answer:
    values = raw.get("values") or {}
    items = [i for i in _value(values, RANKING) or [] if i.get("rank") is not None]  # drafts may leave ranks out
    return Answer(
        user=names.get(raw["user_id"], raw["user_id"]), user_id=raw["user_id"], status=raw["status"],
        ranks={i["value"]: i["rank"] for i in sorted(items, key=lambda i: i["rank"])},
        rating=_value(values, RATING), correction=_value(values, CORRECTION),
        response_id=raw["id"], updated_at=raw["updated_at"])


def _prompt(fields: dict, metadata: dict) -> list[dict] | None:
    """The prompt as TRL chat messages: PROMPT_JSON metadata when pushed by us (chat turns survive exactly),
    else the prompt field's text as one user turn."""
    value = metadata.get(PROMPT_JSON, fields.get(PROMPT))
    if isinstance(value, str) and metadata.get(PROMPT_JSON) is not None:
        try:
            value = json.loads(value)
        except ValueError:
            pass  # a plain string stored as is
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in value) \
            and value[-1]["role"] == "user":
        return [{"role": m["role"], "content": m["content"]} for m in value]
    return None


def parse_record(raw: dict, names: dict[str, str]) -> PulledRecord:
    """A REST record (``include=responses``) as a :class:`PulledRecord`."""
    fields, metadata = raw.get("fields") or {}, raw.get("metadata") or {}
    slots = sorted((int(m.group(1)), name) for name in fields if (m := _RESPONSE_FIELD.match(name)))
    return PulledRecord(
        uuid=raw["id"], external_id=raw.get("external_id") or raw["id"], prompt=_prompt(fields, metadata),
        candidates={name: fields[name] or "" for _, name in slots}, source_id=metadata.get(SOURCE_ID),
        updated_at=raw["updated_at"], answers=[_answer(r, names) for r in raw.get("responses") or []])


def find_dataset(client: rg.Argilla, name: str, workspace: str) -> rg.Dataset:
    """The ranking dataset ``workspace/name``, or a FeedbackError saying what is missing."""
    with warnings.catch_warnings():  # the SDK warns before returning None; we raise instead
        warnings.simplefilter("ignore")
        if client.workspaces(workspace) is None:
            raise FeedbackError(f"no Argilla workspace {workspace!r} (argilla.workspace) at {client.api_url}")
        ds = client.datasets(name=name, workspace=workspace)
    if ds is None:
        raise FeedbackError(f"no dataset {name!r} in Argilla workspace {workspace!r} at {client.api_url}")
    ranking = ds.settings.questions[RANKING]
    if ranking is None:
        raise FeedbackError(f"dataset {workspace}/{name} has no {RANKING!r} question: not a ranking dataset "
                            f"(push one with `rlhf feedback push`)")
    fields = {f.name for f in ds.settings.fields}
    odd = [v for v in ranking.values if v not in fields or not _RESPONSE_FIELD.match(v)]
    if odd:  # pairs are built from the fields the options name (feedback.dataset's layout)
        raise FeedbackError(f"dataset {workspace}/{name}: ranking options {odd} are not response_<i> fields of the "
                            f"dataset (laid out by feedback.dataset.build_settings)")
    return ds


def _usernames(rest: Rest) -> dict[str, str]:
    """User id -> username. Only an owner may list users; anyone else gets their own name and ids for others.
    The listing also carries every user's API key: only id and username are kept."""
    me = rest.get("/api/v1/me")
    if me.get("role") != "owner":
        return {me["id"]: me["username"]}
    return {u["id"]: u["username"] for u in rest.get("/api/v1/users")["items"]}


def _list_records(rest: Rest, dataset_id: str) -> list[dict]:
    """Every record of the dataset with its responses.

    The listing is ordered by ``inserted_at`` alone, and records logged in one bulk call share it, so with offset
    paging the order among them may differ from one page request to the next (SQL leaves ties unordered). Records
    are therefore keyed by id, and the listing is repeated (at most 3 passes) until all ``total`` were seen.
    """
    seen: dict[str, dict] = {}
    for _ in range(3):
        offset, total = 0, 0
        while True:
            page = rest.get(f"/api/v1/datasets/{dataset_id}/records", include="responses", offset=offset, limit=_PAGE)
            total = page["total"]
            seen.update((r["id"], r) for r in page["items"])
            offset += len(page["items"])
            if not page["items"] or offset >= total:
                break
        if len(seen) >= total:
            return list(seen.values())
    raise FeedbackError(f"records of dataset {dataset_id} kept changing while paging ({len(seen)} of {total} seen); "
                        "pull again")


def fetch_records(client: rg.Argilla, dataset: rg.Dataset) -> list[PulledRecord]:
    """Every record of ``dataset`` with every answer (all statuses), ordered by external id."""
    rest = Rest(client)
    names = _usernames(rest)
    records = [parse_record(r, names) for r in _list_records(rest, str(dataset.id))]
    return sorted(records, key=lambda r: r.external_id)


def fetch_rankings(client: rg.Argilla, dataset: rg.Dataset | str, workspace: str = "argilla",
                   statuses: tuple[str, ...] = ("submitted",)) -> dict[str, dict[str, dict[str, int]]]:
    """``{external_id: {username: {response_field: rank}}}`` of the submitted rankings (rank 1 = best), read over
    REST so the ranks are the ones annotators gave. ``dataset``: an SDK dataset or its name in ``workspace``."""
    if isinstance(dataset, str):
        dataset = find_dataset(client, dataset, workspace)
    out = {}
    for rec in fetch_records(client, dataset):
        rankings = {a.user: a.ranks for a in rec.answers if a.status in statuses and a.ranks}
        if rankings:
            out[rec.external_id] = rankings
    return out


# -------------------------------------------------------------------------------------------- incremental
def _signature(rec: PulledRecord) -> dict[str, list[str]]:
    """What makes a record's rows change: its counted responses (id, updated_at, status) and the record itself."""
    return {"record": [rec.updated_at], **{a.user_id: [a.response_id, a.updated_at, a.status] for a in rec.answers}}


def _config_key(cfg: PullConfig) -> dict[str, Any]:
    """The settings rows depend on: when any differs from the last pull, every record is aggregated again."""
    keys = ("dataset", "aggregate", "min_votes", "bt_margin", "min_annotators", "statuses", "use_corrections",
            "test_fraction", "seed")
    return {"workspace": cfg.argilla.workspace, **{k: getattr(cfg, k) for k in keys}}


def _load_state(out_dir: Path, cfg: PullConfig) -> tuple[dict[str, dict], bool]:
    """``(records of the last pull, whether its rows can be reused)``."""
    path = out_dir / STATE_FILE
    if not path.is_file():
        return {}, False
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FeedbackError(f"{path}: unreadable pull state ({e}); delete it to pull everything again") from None
    reusable = state.get("version") == STATE_VERSION and state.get("config") == _config_key(cfg)
    return state.get("records", {}), reusable


def _delta(old: dict[str, dict], new: dict[str, dict[str, list[str]]]) -> dict[str, dict[str, int]]:
    """New / changed / unchanged / removed counts, for records and for responses, between two pulls."""
    records, responses = (dict.fromkeys(("new", "changed", "unchanged", "removed"), 0) for _ in range(2))
    for uuid, sig in new.items():
        before = old.get(uuid, {}).get("signature")
        records["new" if before is None else "unchanged" if before == sig else "changed"] += 1
        before = {k: v for k, v in (before or {}).items() if k != "record"}
        for uid, resp in sig.items():
            if uid != "record":
                responses["new" if uid not in before else "unchanged" if before[uid] == resp else "changed"] += 1
        responses["removed"] += len(set(before) - set(sig))
    for uuid in set(old) - set(new):
        records["removed"] += 1
        responses["removed"] += len(old[uuid]["signature"]) - 1  # every key but "record" is a response
    return {"records": records, "responses": responses}


# ------------------------------------------------------------------------------------------------- run
def _aggregate(records: list[PulledRecord], old: dict[str, dict], reusable: bool, cfg: PullConfig,
               ) -> tuple[dict[str, dict], list[dict], Counter]:
    """Rows of every record: reused from the last pull when its signature is unchanged, else aggregated again.
    Returns the new state's records, all rows (in record order) and the summed counts."""
    source = f"argilla:{cfg.argilla.workspace}/{cfg.dataset}"
    state, rows, stats = {}, [], Counter()
    for rec in records:
        signature = _signature(rec)
        cached = old.get(rec.uuid) if reusable else None
        if cached is not None and cached["signature"] == signature:
            rec_rows, rec_stats = cached["rows"], Counter(cached["stats"])
        else:
            rec_rows, rec_stats = export.record_rows(rec, cfg, source)
            rec_rows = export.assign_split(rec_rows, cfg.test_fraction, cfg.seed)
        state[rec.uuid] = {"external_id": rec.external_id, "signature": signature, "rows": rec_rows,
                           "stats": dict(rec_stats)}
        rows.extend(rec_rows)
        stats.update(rec_stats)
    return state, rows, stats


def _usable(records: list[PulledRecord], statuses: list[str]) -> tuple[list[PulledRecord], Counter]:
    """Records with at least one counted response, narrowed to those responses; and why others were left out."""
    usable, skipped = [], Counter()
    for rec in records:
        rec = replace(rec, answers=[a for a in rec.answers if a.status in statuses])
        if not rec.answers:
            continue
        if rec.prompt is None:
            skipped["records_skipped_no_prompt"] += 1  # neither PROMPT_JSON nor a prompt field ending with a user turn
        elif len(rec.candidates) < 2:
            skipped["records_skipped_fewer_than_2_candidates"] += 1
        else:
            usable.append(rec)
    return usable, skipped


def run(cfg: PullConfig, log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Pull once: fetch, aggregate what changed, write the dataset, reports, state and manifest; returns a summary
    (``records`` and ``responses``: new / changed / unchanged / removed since the last pull; ``counts``)."""
    started = time.time()
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    client = connect(cfg.argilla)
    fetched = fetch_records(client, find_dataset(client, cfg.dataset, cfg.argilla.workspace))
    records, skipped = _usable(fetched, cfg.statuses)
    old, reusable = _load_state(out_dir, cfg)
    state, rows, stats = _aggregate(records, old, reusable, cfg)
    delta = _delta(old, {uuid: r["signature"] for uuid, r in state.items()})

    outputs = export.write_dataset(out_dir, rows, cfg.formats)
    report = agreement_report({r.external_id: r.rankings() for r in records if r.rankings()})
    # feedback.simulate's scripted annotators are named sim-*: the report says when rankings are not from people
    report["simulated_annotators"] = sorted(a for a in report["annotators"] if is_simulated(a))
    report["counts"] = {
        "records_seen": len(fetched), "records_counted": len(records), **skipped,
        **{f"responses_{k}": v for k, v in sorted(Counter(a.status for r in fetched for a in r.answers).items())},
        "records_waiting_for_annotators": stats.pop("records_waiting", 0), **stats,
        "rows": len(rows), **{f"rows_{k}": v for k, v in sorted(Counter(r["split"] for r in rows).items())}}
    export.write_reports(out_dir, cfg.dataset, report)
    write_json_atomic(out_dir / STATE_FILE, {"version": STATE_VERSION, "config": _config_key(cfg), "records": state})
    summary = {"dataset": f"{cfg.argilla.workspace}/{cfg.dataset}", "output_dir": str(out_dir),
               "reaggregated_all": not reusable, **delta, "counts": report["counts"],
               "krippendorff_alpha_ordinal": report["krippendorff_alpha_ordinal"],
               "pairwise_agreement": report["pairwise_agreement"],
               "simulated_annotators": report["simulated_annotators"]}
    export.write_manifest(out_dir, cfg, outputs, summary, started)
    log(f"{len(rows)} preference rows -> {out_dir}; responses {dict(delta['responses'])}")
    return summary
