"""Pulled rankings -> TRL preference rows, and the files ``rlhf feedback pull`` writes (issue 4).

The output folder has the layout of an ``rlhf curate`` output, so ``rlhf align rm|dpo`` reads it as a curated
dataset (``alignment.data`` picks ``preference/`` because ``curation.json`` is there):

    preference/       train.jsonl / test.jsonl (+ .parquet, hf/) written by curation's own DatasetWriter
    agreement.json    Krippendorff's alpha (ordinal), pairwise agreement, per-annotator counts, pair counts
    agreement.md      the same for people
    curation.json     manifest: config (secrets redacted), outputs with SHA-256, the pull summary; written last
    pull_state.json   what the last pull saw, for incremental pulls (feedback.pull)

Rows are exactly curation's preference rows (``ranked_to_pairs``): ``prompt`` (chat messages ending with a user
turn), one-message ``chosen`` / ``rejected``, ``id``/``source``/``lineage``, and ``meta`` saying where the pair came
from (Argilla record, candidate fields, votes, annotators, method).
"""

from __future__ import annotations

import math
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignment.runs import write_json_atomic
from curation.records import Record, make_lineage, message, stable_id
from feedback.agreement import bradley_terry, bt_pairs, majority, ranking_pairs
from feedback.dataset import CORRECTION

if TYPE_CHECKING:
    from feedback.pull import PullConfig, PulledRecord

KIND = "preference"
# (chosen field, rejected field, chosen text, extra meta): the chosen field is a candidate or CORRECTION
Pair = tuple[str, str, str, dict]


# ------------------------------------------------------------------------------------------- pairs -> rows
def _votes(rankings: dict[str, dict[str, int]], a: str, b: str) -> tuple[int, int]:
    """How many annotators strictly preferred ``a`` over ``b``, and ``b`` over ``a``."""
    both = [r for r in rankings.values() if a in r and b in r]
    return sum(r[a] < r[b] for r in both), sum(r[b] < r[a] for r in both)


def _row(rec: PulledRecord, source: str, pair: Pair, key: Any, meta: dict) -> Record:
    """One preference row in curation's shape."""
    chosen, rejected, chosen_text, _ = pair
    return {
        "id": stable_id(rec.external_id, chosen, rejected, key),
        "source": source,
        "lineage": make_lineage(source, None, parent=rec.source_id or rec.external_id),
        "prompt": rec.prompt,
        "chosen": [message("assistant", chosen_text)],
        "rejected": [message("assistant", rec.candidates[rejected])],
        "meta": {"record_id": rec.external_id, "source_id": rec.source_id, "chosen_field": chosen,
                 "rejected_field": rejected, **meta},
    }


def _aggregated_pairs(rec: PulledRecord, rankings: dict, cfg: PullConfig, stats: Counter) -> list[Pair]:
    """The record's pairs by the configured method; counts what each method drops."""
    if cfg.aggregate == "none":
        return [(w, lo, rec.candidates[w], {"annotator": user, "chosen_rank": ranks[w], "rejected_rank": ranks[lo]})
                for user, ranks in rankings.items() for w, lo in ranking_pairs(ranks)]
    voted = {frozenset(p) for ranks in rankings.values() for p in ranking_pairs(ranks)}
    if cfg.aggregate == "majority":
        kept = [(w, lo, rec.candidates[w], {}) for w, lo, _, _ in majority(rankings, min_votes=cfg.min_votes)]
        stats["pairs_without_majority"] += len(voted) - len(kept)  # split votes, or fewer than min_votes
        return kept
    scores = bradley_terry(rankings)
    kept = [(w, lo, rec.candidates[w], {"chosen_strength": round(scores[w], 4),
                                        "rejected_strength": round(scores[lo], 4)})
            for w, lo, _ in bt_pairs(rankings, margin=cfg.bt_margin, scores=scores)]
    stats["pairs_below_margin"] += math.comb(len(scores), 2) - len(kept)
    return kept


def _correction_pairs(rec: PulledRecord, stats: Counter) -> list[Pair]:
    """An annotator's correction beats the response they ranked best: one pair per correction.

    WHY against the best only: the annotator wrote it as better than everything offered, so it beats every
    candidate, but the best is the hardest negative and pairing with all K would let one correction outweigh the
    rankings. Not aggregated: each correction is a new text that nobody else voted on. A correction equal to the
    best response (a copy) says nothing and is skipped.
    """
    out = []
    for a in rec.answers:
        text = (a.correction or "").strip()
        if not text or not a.ranks:
            continue
        best = min(a.ranks, key=a.ranks.get)  # first best in ranking order when several share rank 1
        if text == rec.candidates[best].strip():
            stats["corrections_same_as_best"] += 1
            continue
        stats["correction_pairs"] += 1
        out.append((CORRECTION, best, a.correction, {"annotator": a.user, "method": "correction"}))
    return out


def record_rows(rec: PulledRecord, cfg: PullConfig, source: str) -> tuple[list[Record], Counter]:
    """Preference rows of one record (counted answers only) and the counts behind them.

    A record with fewer than ``cfg.min_annotators`` rankings gives no rows yet (``records_waiting``): a later pull
    picks it up once enough annotators submitted.
    """
    stats: Counter = Counter()
    rankings = rec.rankings()
    if len(rankings) < cfg.min_annotators:
        stats["records_waiting"] += 1
        return [], stats
    for ranks in rankings.values():
        strict = len(ranking_pairs(ranks))
        stats["annotator_pairs"] += strict
        stats["tied_pairs"] += math.comb(len(ranks), 2) - strict
    pairs = _aggregated_pairs(rec, rankings, cfg, stats)
    if cfg.use_corrections:
        pairs += _correction_pairs(rec, stats)
    ratings = {a.user: a.rating for a in rec.answers if a.rating is not None}
    rows = []
    for pair in pairs:
        chosen, rejected, chosen_text, extra = pair
        if chosen_text.strip() == rec.candidates[rejected].strip():
            stats["identical_pairs_skipped"] += 1  # two candidates with the same text: no signal
            continue
        votes_for, votes_against = _votes(rankings, chosen, rejected) if chosen != CORRECTION else (1, 0)
        meta = {"votes_for": votes_for, "votes_against": votes_against, "annotators": sorted(rankings),
                "method": cfg.aggregate, **extra, **({"ratings": ratings} if ratings else {})}
        rows.append(_row(rec, source, pair, extra.get("annotator") or cfg.aggregate, meta))
    return rows, stats


def assign_split(rows: list[Record], test_fraction: float, seed: int) -> list[Record]:
    """Train/test by curation's ``split`` step: grouped by prompt and hashed, so a prompt never lands in both and
    a pair keeps its split when later pulls add data."""
    if test_fraction <= 0:
        return [{**r, "split": "train"} for r in rows]
    from curation.formatters import Split

    step = Split(test_size=test_fraction, split_seed=seed)
    return [step.apply(r) for r in rows]


# ------------------------------------------------------------------------------------------------ files
def write_dataset(out_dir: Path, rows: list[Record], formats: list[str]) -> dict[str, Any]:
    """Rewrite ``preference/`` from all rows (never appended to, so nothing is duplicated or stale); returns the
    manifest's ``outputs`` (``{}`` when there is no row yet)."""
    from curation.writers import DatasetWriter

    shutil.rmtree(out_dir / KIND, ignore_errors=True)
    writer = DatasetWriter(out_dir, formats)
    for row in rows:
        writer.write(row)
    return writer.close()


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _simulated(names: list[str] | None) -> str:
    """``yes (names)`` when scripted annotators (feedback.simulate) ranked: their figures are not human agreement."""
    return f"yes ({', '.join(names)})" if names else "no"


def render_agreement(dataset: str, report: dict[str, Any]) -> str:
    """``agreement.md``: the agreement figures, per-annotator counts and pair counts as Markdown tables."""
    lines = [f"# Annotator agreement: {dataset}", "",
             "| figure | value |", "|---|---|",
             (f"| Krippendorff's alpha (ordinal, unit = candidate, value = rank) | "
              f"{_fmt(report['krippendorff_alpha_ordinal'])} |"),
             (f"| pairwise agreement (same outcome on a candidate pair; tie is an outcome) | "
              f"{_fmt(report['pairwise_agreement'])} over {report['comparisons']} comparisons |"),
             f"| records ranked / ranked by 2 or more | {report['records']} / {report['records_with_overlap']} |",
             f"| simulated annotators | {_simulated(report.get('simulated_annotators'))} |",
             "", "## Annotators", "", "| annotator | records | strict pairs |", "|---|---|---|"]
    lines += [f"| {name} | {c['records']} | {c['pairs']} |" for name, c in sorted(report["annotators"].items())]
    lines += ["", "## Pairs", "", "| count | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in report["counts"].items()]
    lines += ["", ("Alpha is read as a descriptive figure: ranks within one ranking are not independent. "
                   "Values near 1 mean annotators rank alike; near 0, no better than chance."), ""]
    return "\n".join(lines)


def write_reports(out_dir: Path, dataset: str, report: dict[str, Any]) -> None:
    write_json_atomic(out_dir / "agreement.json", report)
    (out_dir / "agreement.md").write_text(render_agreement(dataset, report), encoding="utf-8")


def write_manifest(out_dir: Path, cfg: PullConfig, outputs: dict, summary: dict, started: float) -> None:
    """``curation.json``, written last (alignment's fingerprints trust files older than the manifest). Its
    ``outputs`` mapping is what ``alignment.data`` and ``alignment.runs`` read, in curation's shape."""
    import dataclasses

    from rlhf.config import redact_secrets
    from rlhf.provenance import git_commit, versions

    manifest = {
        "name": f"feedback-pull:{cfg.argilla.workspace}/{cfg.dataset}",
        "command": None,
        "recipe": redact_secrets(dataclasses.asdict(cfg)),
        "outputs": outputs,
        "pull": summary,
        "versions": versions(("rlhf-pipeline", "argilla", "datasets", "krippendorff", "choix")),
        "git_commit": git_commit(),
        "wall_time_s": round(time.time() - started, 2),
    }
    write_json_atomic(out_dir / "curation.json", manifest)
