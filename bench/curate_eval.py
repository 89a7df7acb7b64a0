"""Scoring the outputs of bench/curate_vs_datatrove.py against the corpus ground truth (bench/corpus.py).

Quality. Each contender's *passed* set is what its Gopher filter kept. Against the generator's intent: the share of
low-quality documents dropped (per kind) and the share of good documents (bases, variants, hard negatives) dropped.
Between the two filters: documents kept by both, by only one, by neither.

Dedup, over the documents that contender's own quality filter passed (its dedup never saw the others). For each
ground-truth group g: n_g passed, k_g kept after dedup, so n_g - k_g dropped.

- should drop: sum over groups of max(n_g - 1, 0), what a perfect deduplicator drops (one survivor per group);
- a dropped document is a true positive when at least one member of its group survived (the content is still in
  the output), a false positive when none did (the group's content was lost: merged into another group);
- precision = TP / dropped; recall = TP / should drop; duplicates left = sum of max(k_g - 1, 0).

This is the issue's "dropped doc is a true positive if an earlier member of its group was kept" without "earlier":
datatrove keeps the union-find root of a cluster, not the first document, so order-based scoring would punish it
for a choice that loses nothing. Recall is also given per bucket of the group's smallest within-group Jaccard, and
for hard negatives (revised articles, their own singleton groups) the share dropped.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

J_BUCKETS = ((0.80, 0.85), (0.85, 0.90), (0.90, 0.95), (0.95, 1.0), (1.0, 1.01))


def read_jsonl(path: Path):
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def load_truth(corpus: Path) -> dict[str, dict]:
    return {row["id"]: row for row in read_jsonl(corpus / "truth.jsonl")}


def ours_outcome(result: Path) -> dict:
    """Passed-quality and kept ids from an `rlhf curate` output folder; ids are the corpus ids (meta.source_id)."""
    kept = {json.loads(r["meta"])["source_id"] for r in read_jsonl(result / "document" / "train.jsonl")}
    quality_drops, dedup_drops, pairs = {}, set(), {}
    id_of = {}  # our record id -> corpus id, for duplicate_of
    for row in read_jsonl(result / "rejects.jsonl"):
        rec = row["record"]
        sid = rec["meta"]["source_id"]
        if "gopher_quality" in row["step"]:
            quality_drops[sid] = row["reason"]
        else:
            dedup_drops.add(sid)
            pairs[sid] = rec["meta"]["duplicate_of"]
    for r in read_jsonl(result / "document" / "train.jsonl"):
        id_of[r["id"]] = json.loads(r["meta"])["source_id"]
    return {"passed": kept | dedup_drops, "kept": kept, "quality_reasons": quality_drops,
            "pairs": {d: id_of.get(k) for d, k in pairs.items()}}


def datatrove_outcome(out: Path) -> dict:
    passed = {r["id"] for p in sorted((out / "filtered").glob("*.jsonl")) for r in read_jsonl(p)}
    kept = {r["id"] for p in sorted((out / "deduped").glob("*.jsonl")) for r in read_jsonl(p)}
    return {"passed": passed, "kept": kept}


def quality_scores(truth: dict[str, dict], passed: set[str]) -> dict:
    good = [i for i, r in truth.items() if r["role"] != "low_quality"]
    low = defaultdict(list)
    for i, r in truth.items():
        if r["role"] == "low_quality":
            low[r["low_quality"]].append(i)
    return {
        "passed": len(passed),
        "good_docs_dropped": sum(i not in passed for i in good),
        "good_docs_dropped_share": round(sum(i not in passed for i in good) / len(good), 4),
        "low_quality_dropped_share": round(sum(i not in passed for ids in low.values() for i in ids)
                                           / max(1, sum(map(len, low.values()))), 4),
        "low_quality_dropped_by_kind": {k: round(sum(i not in passed for i in ids) / len(ids), 3)
                                        for k, ids in sorted(low.items())},
    }


def quality_agreement(truth: dict[str, dict], ours: set[str], theirs: set[str]) -> dict:
    both = ours & theirs
    only_ours, only_theirs = ours - theirs, theirs - ours
    neither = set(truth) - ours - theirs

    def kinds(ids: set[str]) -> dict[str, int]:
        return dict(Counter(truth[i].get("low_quality") or truth[i]["role"] for i in ids).most_common())

    return {"kept_by_both": len(both), "kept_only_by_ours": len(only_ours), "kept_only_by_datatrove": len(only_theirs),
            "dropped_by_both": len(neither), "agreement": round((len(both) + len(neither)) / len(truth), 4),
            "only_ours_kinds": kinds(only_ours), "only_datatrove_kinds": kinds(only_theirs)}


def dedup_scores(truth: dict[str, dict], passed: set[str], kept: set[str], pairs: dict | None = None) -> dict:
    groups: dict[str, list[str]] = defaultdict(list)
    for i in passed:
        groups[truth[i]["group"]].append(i)
    tp = fp = should = left = lost = 0
    bucket_tp, bucket_should = Counter(), Counter()
    for members in groups.values():
        n, k = len(members), sum(i in kept for i in members)
        should += n - 1
        left += max(k - 1, 0)
        if k:
            tp += n - k
        else:
            fp += n
            lost += 1
        if n > 1:
            j = min(truth[i].get("min_jaccard_in_group", 1.0) for i in members)
            b = next(f"[{lo:.2f},{hi:.2f})" if lo < 1 else "1.00" for lo, hi in J_BUCKETS if lo <= j < hi)
            bucket_should[b] += n - 1
            bucket_tp[b] += (n - k) if k else 0
    dropped = tp + fp
    hard = [i for i in passed if truth[i]["role"] == "hard_negative"]
    out = {
        "dedup_in": len(passed), "kept": len(kept), "dropped": dropped, "should_drop": should, "true_positives": tp,
        "false_positives": fp, "groups_lost": lost, "duplicates_left": left,
        "precision": round(tp / dropped, 4) if dropped else 1.0, "recall": round(tp / should, 4) if should else 1.0,
        "recall_by_min_jaccard": {b: round(bucket_tp[b] / bucket_should[b], 4) for b in sorted(bucket_should)},
        "hard_negatives_dropped": sum(i not in kept for i in hard), "hard_negatives_in": len(hard),
    }
    if pairs:  # ours names the kept record each drop duplicates: is it in the same ground-truth group?
        out["pair_precision"] = round(sum(truth[d]["group"] == truth[k]["group"] for d, k in pairs.items() if k)
                                      / len(pairs), 4)
    return out
