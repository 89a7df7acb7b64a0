"""The bundled sample recipe end to end through the `rlhf` console command, checked against the corpus's ground
truth (samples/telecom/planted.json): reconciled counts, no planted PII left anywhere we write, duplicates removed,
contaminated pairs dropped, splits disjoint by prompt, TRL formats."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from curation.records import normalize, prompt_text

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "samples" / "telecom"
PLANTED = json.loads((SAMPLE / "planted.json").read_text())
KINDS = ("instruction", "preference", "document")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _rlhf_cmd() -> list[str]:
    """The installed console command when there is one (what users run), else the module."""
    exe = Path(sys.executable).with_name("rlhf")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "rlhf.cli"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("telecom") / "out"
    cmd = _rlhf_cmd()
    proc = subprocess.run([*cmd, "curate", str(SAMPLE / "curate.yaml"), "--out", str(out), "-q"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "curation.json").read_text())
    rows = {kind: {split: _jsonl(out / kind / f"{split}.jsonl") for split in ("train", "test")
                   if (out / kind / f"{split}.jsonl").exists()} for kind in KINDS}
    return out, manifest, rows, _jsonl(out / "rejects.jsonl")


def _all(rows: dict) -> list[dict]:
    return [r for kind in rows.values() for split in kind.values() for r in split]


def test_counts_reconcile(run):
    out, manifest, rows, rejects = run
    ledger = manifest["ledger"]
    n_faq = sum(PLANTED["faq_pairs_per_file"].values())
    n_chats = len((SAMPLE / "raw" / "chats" / "transcripts.jsonl").read_text().splitlines())
    n_docs = len([p for p in (SAMPLE / "raw" / "docs").iterdir() if p.is_file()])
    assert ledger["read"] == n_faq + n_chats + n_docs
    assert ledger["created"] == ledger["kept"] + ledger["dropped"]
    assert ledger["kept"] == len(_all(rows))
    assert ledger["dropped"] == len(rejects)
    for step in ledger["steps"]:
        if step["type"] not in ("read_faq", "read_transcripts", "read_text", "chunk_sentences", "ratings_to_pairs"):
            assert step["in"] == step["out"] + sum(step["dropped"].values()), step["step"]
    card = (out / "README.md").read_text()
    assert f"kept **{ledger['kept']}**, dropped **{ledger['dropped']}**" in card
    for kind, info in manifest["outputs"].items():
        for split, n in info["splits"].items():
            assert len(rows[kind][split]) == n


def test_no_planted_pii_left_in_anything_written(run):
    out, manifest, _, _ = run
    written = "\n".join(p.read_text(encoding="utf-8") for p in out.rglob("*") if p.suffix in (".jsonl", ".json", ".md"))
    leaks = [(kind, value) for kind, values in PLANTED["pii"].items() for value in values if value in written]
    assert leaks == []
    counts = {k: v for step in manifest["ledger"]["steps"] for k, v in step["counters"].items() if k.startswith("pii:")}
    assert set(counts) >= {f"pii:{kind}" for kind in PLANTED["pii"]}


def _keys(record: dict) -> set[str]:
    """The ids planted.json uses for a record: a conversation id, a file path, or `path::question` for FAQ pairs."""
    meta = record.get("meta") or {}
    meta = json.loads(meta) if isinstance(meta, str) else meta
    path = record["lineage"]["path"]
    keys = {path}
    if meta.get("source_id"):
        keys.add(str(meta["source_id"]))
    msgs = record.get("messages") or record.get("prompt") or []
    questions = [m["content"] for m in msgs if isinstance(m, dict) and m["role"] == "user"]
    if questions:
        keys.add(f"{path}::{questions[0]}")
    return keys


def _reasons_by_key(rejects: list[dict]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for rej in rejects:
        for key in _keys(rej["record"]):
            out.setdefault(key, set()).add(rej["reason"])
    return out


@pytest.mark.parametrize("group_kind, reasons", [("exact_duplicates", {"exact_duplicate"}),
                                                 ("near_duplicates", {"near_duplicate", "exact_duplicate"})])
def test_planted_duplicates_are_removed_keeping_one(run, group_kind, reasons):
    _, _, rows, rejects = run
    kept = set().union(*(_keys(r) for r in _all(rows)))
    dropped = _reasons_by_key(rejects)
    for group in PLANTED[group_kind]:
        # keep-first follows read order (files sorted by name: billing-copy.html comes before billing.html)
        survivors = [m for m in group if m in kept]
        as_duplicates = [m for m in group if dropped.get(m, set()) & reasons]
        assert len(survivors) <= 1, f"several members of {group} survived: {survivors}"
        assert len(as_duplicates) == len(group) - 1, f"{group}: dropped as duplicates: {as_duplicates}"


def test_non_english_and_contaminated_items_are_dropped_with_their_reason(run):
    _, _, rows, rejects = run
    kept = set().union(*(_keys(r) for r in _all(rows)))
    by_key = _reasons_by_key(rejects)
    for item in PLANTED["non_english"]:
        assert item not in kept
        assert any(reason.startswith("language:") for reason in by_key.get(item, ())), item
    kept_questions = {k.split("::", 1)[1] for k in kept if "::" in k}
    for question in PLANTED["contaminated_faq_questions"]:
        assert question not in kept_questions
    assert sum(1 for rej in rejects if rej["reason"] == "contaminated") >= len(PLANTED["contaminated_faq_questions"])


def test_splits_are_disjoint_by_prompt_and_rows_are_trl_formats(run):
    from trl.data_utils import is_conversational

    _, _, rows, _ = run
    for kind in ("instruction", "preference"):
        prompts = {split: {normalize(prompt_text(r)) for r in split_rows} for split, split_rows in rows[kind].items()}
        assert not prompts.get("train", set()) & prompts.get("test", set()), kind
    assert rows["preference"].get("test"), "held-out preference pairs exist (the reward model is scored on them)"
    # every question the corpus had answered by several agents with different ratings became a preference prompt
    pair_prompts = {r["prompt"][-1]["content"] for split in rows["preference"].values() for r in split}
    assert pair_prompts == set(PLANTED["single_exchanges"])
    for row in rows["preference"]["train"] + rows["instruction"]["train"]:
        assert is_conversational(row)
    for row in rows["preference"]["train"]:
        assert row["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in row["chosen"]] == ["assistant"] == [m["role"] for m in row["rejected"]]
        assert row["chosen"] != row["rejected"]
        meta = json.loads(row["meta"])
        assert meta["chosen_score"] - meta["rejected_score"] >= 2
    for row in rows["instruction"]["train"]:
        assert row["messages"][0]["role"] == "system" and row["messages"][-1]["role"] == "assistant"
        assert row["score"] is None or row["score"] >= 4


def test_lineage_leads_back_to_the_raw_input(run):
    _, _, rows, _ = run
    for row in _all(rows):
        path = SAMPLE / row["lineage"]["path"]
        assert path.is_file(), row["lineage"]
        if row["lineage"]["row"] is not None and path.suffix == ".jsonl":
            raw = path.read_text(encoding="utf-8").splitlines()[row["lineage"]["row"] - 1]
            assert json.loads(raw)["conversation_id"] == json.loads(row["meta"])["source_id"]
    chunks = [r for r in rows["document"].get("train", []) if r["lineage"]["chunk"] is not None]
    assert chunks and all(r["lineage"]["parent"] for r in chunks)


def test_rerun_gives_identical_files(run, tmp_path):
    out, manifest, _, _ = run
    again = tmp_path / "again"
    shutil.copytree(out, again)  # re-running into an existing folder replaces our files, nothing else
    (again / "notes.txt").write_text("mine")
    cmd = _rlhf_cmd()
    subprocess.run([*cmd, "curate", str(SAMPLE / "curate.yaml"), "--out", str(again), "-q"], check=True,
                   capture_output=True, timeout=600)
    second = json.loads((again / "curation.json").read_text())
    assert second["outputs"] == manifest["outputs"]
    assert (again / "notes.txt").read_text() == "mine"
