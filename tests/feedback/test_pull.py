"""feedback.pull: rankings submitted by real annotator users on the real embedded server -> pairs, agreement, files.

Three annotators rank K=3 responses over REST (the SDK drops ranks, argilla-io/argilla#5712). Expected pairs, votes
and agreement figures are worked out by hand in the comments next to each ranking.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from feedback.client import ArgillaConfig, FeedbackError, Rest
from feedback.dataset import PROMPT_JSON, SOURCE_ID, DatasetSpec, build_settings, record_id, render_prompt
from feedback.pull import PullConfig, fetch_rankings, load_config, run

R1, R2, R3 = "response_1", "response_2", "response_3"
CHAT = [{"role": "system", "content": "You are a telecom support agent."},
        {"role": "user", "content": "My router keeps dropping Wi-Fi. What should I do?"}]
ITEMS = {  # key -> (prompt, candidates)
    "A": (CHAT, ["Restart it and update the firmware.", "Buy a new one.", "Call us."]),
    "B": ("What is roaming?", ["Using your phone abroad.", "Using a network other than your own.", "A fee."]),
    "C": ("How do I check my data balance?", ["Dial *100#.", "Open the app.", "Ask a friend."]),
}
# A: ann1 1-2-3; ann2 1-3-2; ann3 ties R2 and R3 above R1. Votes: R1>R2 2-1, R1>R3 2-1, R2 vs R3 1-1 (ann3 tied).
A_RANKS = {"ann1": {R1: 1, R2: 2, R3: 3}, "ann2": {R1: 1, R3: 2, R2: 3}, "ann3": {R2: 1, R3: 1, R1: 2}}
# B: ann1 and ann2 agree R2 > R1 > R3; ann3 only saved a draft (never counts).
B_RANKS = {"ann1": {R2: 1, R1: 2, R3: 3}, "ann2": {R2: 1, R1: 2, R3: 3}}
B_DRAFT = {R3: 1, R1: 2, R2: 3}


@pytest.fixture(scope="module")
def annotators(client):
    """Three annotator users in the workspace: ``{name: api_key}`` (the owner reads their keys over REST)."""
    import argilla as rg

    ws = client.workspaces("argilla")
    keys = {}
    for name in ("ann1", "ann2", "ann3"):
        user = rg.User(username=f"pull-{name}", password="annotator-pass-1", role="annotator", client=client).create()
        user.add_to_workspace(ws)
        keys[name] = Rest(client).get(f"/api/v1/users/{user.id}")["api_key"]
    return keys


def make_dataset(client, name: str, keys=("A", "B", "C")) -> tuple[dict[str, str], dict[str, str]]:
    """A ranking dataset laid out by feedback.dataset: ``({key: record uuid}, {key: external id})``."""
    import argilla as rg

    settings = build_settings(DatasetSpec(name=name, k=3, rating=True, correction=True))
    ds = rg.Dataset(name=name, workspace="argilla", settings=settings, client=client).create()
    ext = {k: record_id(*ITEMS[k]) for k in keys}
    ds.records.log([rg.Record(
        id=ext[k],
        fields={"prompt": render_prompt(ITEMS[k][0]), **{f"response_{i}": c for i, c in enumerate(ITEMS[k][1], 1)}},
        metadata={"source": "test", "model": "m", "run": "r1", PROMPT_JSON: json.dumps(ITEMS[k][0]),
                  SOURCE_ID: f"src-{k}"}) for k in keys])
    items = Rest(client).get(f"/api/v1/datasets/{ds.id}/records", limit=100)["items"]
    by_ext = {r["external_id"]: r["id"] for r in items}
    return {k: by_ext[ext[k]] for k in keys}, ext


def submit(api_url: str, key: str, record: str, ranks: dict, status="submitted", **extra) -> dict:
    """POST one response as that annotator: the raw REST ranking value keeps each option's rank."""
    values = {"ranking": {"value": [{"value": f, "rank": r} for f, r in ranks.items()]},
              **{q: {"value": v} for q, v in extra.items()}}
    r = httpx.post(f"{api_url}/api/v1/records/{record}/responses", headers={"X-Argilla-Api-Key": key},
                   json={"status": status, "values": values})
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture(scope="module")
def ranked(argilla_server, client, annotators):
    """Dataset ``pull-main``: A ranked by 3 (a tie, a disagreement), B by 2 (+ a draft, a rating, corrections),
    C by nobody."""
    _, creds = argilla_server
    uuids, ext = make_dataset(client, "pull-main")
    for name, ranks in A_RANKS.items():
        submit(creds.api_url, annotators[name], uuids["A"], ranks)
    submit(creds.api_url, annotators["ann1"], uuids["B"], B_RANKS["ann1"], rating=4,
           correction=ITEMS["B"][1][1])  # a "correction" that copies the best response: no pair
    submit(creds.api_url, annotators["ann2"], uuids["B"], B_RANKS["ann2"],
           correction="Using another operator's network.")
    submit(creds.api_url, annotators["ann3"], uuids["B"], B_DRAFT, status="draft")
    return creds, ext


def config(creds, out, **kw) -> PullConfig:
    return PullConfig(dataset=kw.pop("dataset", "pull-main"), output_dir=str(out),
                      argilla=ArgillaConfig(api_url=creds.api_url, api_key=creds.api_key), **kw)


def rows(out, split="train") -> list[dict]:
    path = out / "preference" / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def pairs(rs) -> dict:
    """``{(record key, chosen field, rejected field): (votes_for, votes_against)}``."""
    key = {v: k for k, v in ((k, record_id(*ITEMS[k])) for k in ITEMS)}
    return {(key[m["record_id"]], m["chosen_field"], m["rejected_field"]): (m["votes_for"], m["votes_against"])
            for m in (json.loads(r["meta"]) for r in rs)}


# ------------------------------------------------------------------------------------------------ reading
def test_fetch_rankings_reads_ranks_not_option_order(ranked, client):
    _, ext = ranked
    got = fetch_rankings(client, "pull-main")
    assert got == {ext["A"]: {f"pull-{a}": r for a, r in A_RANKS.items()},
                   ext["B"]: {f"pull-{a}": r for a, r in B_RANKS.items()}}  # the draft and unranked C are absent
    # best first, as ranked (option order would put response_1 first)
    assert list(got[ext["B"]]["pull-ann1"]) == [R2, R1, R3]


def test_missing_dataset_and_workspace_are_clear_errors(argilla_server, client, tmp_path):
    _, creds = argilla_server
    with pytest.raises(FeedbackError, match="no dataset 'nope' in Argilla workspace 'argilla'"):
        run(config(creds, tmp_path, dataset="nope"))
    cfg = config(creds, tmp_path)
    cfg.argilla.workspace = "elsewhere"
    with pytest.raises(FeedbackError, match="no Argilla workspace 'elsewhere'"):
        run(cfg)


def test_datasets_pull_cannot_read_are_clear_errors(ranked, annotators, client, tmp_path):
    import argilla as rg

    creds, _ = ranked
    settings = rg.Settings(fields=[rg.TextField(name="prompt"), rg.TextField(name="response_1")],
                           questions=[rg.RankingQuestion(name="ranking", values=["good", "bad"])])
    rg.Dataset(name="pull-odd", workspace="argilla", settings=settings, client=client).create()
    with pytest.raises(FeedbackError, match=r"ranking options \['good', 'bad'\] are not response_<i> fields"):
        run(config(creds, tmp_path, dataset="pull-odd"))
    cfg = config(creds, tmp_path)
    cfg.argilla.api_key = annotators["ann1"]  # an annotator may not read other annotators' responses
    with pytest.raises(FeedbackError, match="forbidden for this user"):
        run(cfg)


# -------------------------------------------------------------------------------------------- aggregation
def test_majority_pairs_counts_and_agreement(ranked, tmp_path):
    creds, ext = ranked
    out = tmp_path / "maj"
    summary = run(config(creds, out))
    got = rows(out)
    # A: R2 vs R3 is a 1-1 split -> dropped; B: unanimous 2-0 on all three pairs; C unranked; draft ignored
    assert pairs(got) == {("A", R1, R2): (2, 1), ("A", R1, R3): (2, 1),
                          ("B", R2, R1): (2, 0), ("B", R2, R3): (2, 0), ("B", R1, R3): (2, 0)}
    a_row = next(r for r in got if json.loads(r["meta"])["record_id"] == ext["A"])
    assert a_row["prompt"] == CHAT  # chat turns from PROMPT_JSON, system turn included
    assert a_row["chosen"] == [{"role": "assistant", "content": ITEMS["A"][1][0]}]
    meta = json.loads(a_row["meta"])
    assert meta["annotators"] == ["pull-ann1", "pull-ann2", "pull-ann3"] and meta["source_id"] == "src-A"
    assert a_row["lineage"]["parent"] == "src-A" and a_row["source"] == "argilla:argilla/pull-main"
    b_meta = json.loads(next(r for r in got if json.loads(r["meta"])["record_id"] == ext["B"])["meta"])
    assert b_meta["ratings"] == {"pull-ann1": 4}
    assert len({r["id"] for r in got}) == len(got) == 5

    counts = summary["counts"]
    assert counts["records_seen"] == 3 and counts["records_counted"] == 2
    assert counts["responses_submitted"] == 5 and counts["responses_draft"] == 1
    assert counts["annotator_pairs"] == 3 + 3 + 2 + 3 + 3 and counts["tied_pairs"] == 1
    assert counts["pairs_without_majority"] == 1 and counts["rows"] == counts["rows_train"] == 5

    # agreement by hand. Pairwise: A has 3 annotator pairs x 3 candidate pairs; ann1/ann2 agree on R1>R2 and
    # R1>R3 only, ann3 disagrees with both everywhere -> 2 of 9; B: ann1 and ann2 agree on all 3 -> 5 / 12
    report = json.loads((out / "agreement.json").read_text())
    assert report["comparisons"] == 12 and report["pairwise_agreement"] == pytest.approx(5 / 12)
    assert report["annotators"] == {"pull-ann1": {"records": 2, "pairs": 6}, "pull-ann2": {"records": 2, "pairs": 6},
                                    "pull-ann3": {"records": 1, "pairs": 2}}
    import krippendorff  # alpha on the matrix written out by hand: coders x (A R1..R3, B R1..R3)

    nan = np.nan
    matrix = np.array([[1, 2, 3, 2, 1, 3], [1, 3, 2, 2, 1, 3], [2, 1, 1, nan, nan, nan]])
    expected = krippendorff.alpha(reliability_data=matrix, level_of_measurement="ordinal")
    assert report["krippendorff_alpha_ordinal"] == pytest.approx(expected) and summary["krippendorff_alpha_ordinal"]
    md = (out / "agreement.md").read_text()
    assert f"{expected:.3f}" in md and "| pull-ann3 | 1 | 2 |" in md


def test_min_votes_and_min_annotators(ranked, tmp_path):
    creds, _ = ranked
    out = tmp_path / "strict"
    summary = run(config(creds, out, min_votes=2, min_annotators=3))
    # only A has 3 submitted rankings; its two 2-1 majorities have 2 votes; B (2 annotators) waits
    assert pairs(rows(out)) == {("A", R1, R2): (2, 1), ("A", R1, R3): (2, 1)}
    assert summary["counts"]["records_waiting_for_annotators"] == 1
    run(config(creds, out, min_votes=3))  # no pair has 3 votes
    assert rows(out) == [] and not (out / "preference").exists()


def test_bradley_terry_pools_all_comparisons(ranked, tmp_path):
    from feedback.agreement import bradley_terry

    creds, _ = ranked
    out = tmp_path / "bt"
    run(config(creds, out, aggregate="bradley_terry"))
    got = rows(out)
    # A: R2 and R3 each win 2 and lose 3 comparisons -> equal strength -> no pair; R1 beats both
    assert set(pairs(got)) == {("A", R1, R2), ("A", R1, R3), ("B", R2, R1), ("B", R2, R3), ("B", R1, R3)}
    scores = bradley_terry(A_RANKS)
    assert scores[R2] == pytest.approx(scores[R3]) and scores[R1] > scores[R2]
    meta = next(json.loads(r["meta"]) for r in got if json.loads(r["meta"])["chosen_field"] == R1
                and json.loads(r["meta"])["rejected_field"] == R2)
    assert meta["method"] == "bradley_terry" and meta["chosen_strength"] == pytest.approx(scores[R1], abs=1e-4)


def test_none_keeps_every_annotator_pair_and_corrections(ranked, tmp_path):
    creds, _ = ranked
    out = tmp_path / "none"
    summary = run(config(creds, out, aggregate="none", use_corrections=True))
    metas = [json.loads(r["meta"]) for r in rows(out)]
    ranked_rows = [m for m in metas if m["method"] == "none"]
    assert len(ranked_rows) == 3 + 3 + 2 + 3 + 3  # every annotator's strict pairs, the tie dropped
    assert {(m["annotator"], m["chosen_field"], m["rejected_field"]) for m in ranked_rows if m["annotator"] ==
            "pull-ann3"} == {("pull-ann3", R2, R1), ("pull-ann3", R3, R1)}
    # ann2's correction beats ann2's best (R2); ann1's "correction" is a copy of R2 -> no pair
    corr = [r for r in rows(out) if json.loads(r["meta"])["method"] == "correction"]
    assert len(corr) == 1 and corr[0]["chosen"][0]["content"] == "Using another operator's network."
    assert corr[0]["rejected"][0]["content"] == ITEMS["B"][1][1]
    assert summary["counts"]["correction_pairs"] == 1 and summary["counts"]["corrections_same_as_best"] == 1


# -------------------------------------------------------------------------------------------------- files
def test_output_is_a_curated_folder_alignment_reads(ranked, annotators, tmp_path):
    from alignment.data import DataConfig, load_split
    from curation.formatters import Split

    creds, _ = ranked
    out = tmp_path / "split"
    run(config(creds, out, test_fraction=0.5, seed=1, formats=["jsonl", "parquet", "datasets"]))
    train, test = rows(out, "train"), rows(out, "test")
    # curation's split step decides, grouped by prompt: with seed 1 A's prompt is train, B's is test
    assert {k[0] for k in pairs(train)} == {"A"} and {k[0] for k in pairs(test)} == {"B"}
    step = Split(test_size=0.5, split_seed=1)
    assert all(step.apply(r)["split"] == "train" for r in train) and all(step.apply(r)["split"] == "test" for r in test)
    manifest = json.loads((out / "curation.json").read_text())
    assert manifest["outputs"]["preference"]["splits"] == {"train": 2, "test": 3}
    for split, n in (("train", 2), ("test", 3)):
        for stage in ("dpo", "rm"):
            ds = load_split(DataConfig(str(out)), stage, split)
            assert len(ds) == n and ds.column_names == ["prompt", "chosen", "rejected"]
    assert (out / "preference" / "train.parquet").exists() and (out / "preference" / "hf").is_dir()
    # secrets: no API key in anything written
    keys = [creds.api_key, *annotators.values()]
    text = "".join(p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file())
    assert manifest["recipe"]["argilla"]["api_key"] == "<redacted>" and not any(k in text for k in keys)


# ------------------------------------------------------------------------------------------- incremental
def test_second_pull_adds_only_what_is_new(argilla_server, client, annotators, tmp_path):
    _, creds = argilla_server
    uuids, ext = make_dataset(client, "pull-inc", keys=("A", "B"))
    out = tmp_path / "inc"
    cfg = config(creds, out, dataset="pull-inc")
    first = submit(creds.api_url, annotators["ann1"], uuids["A"], A_RANKS["ann1"])
    s1 = run(cfg)
    assert s1["responses"] == {"new": 1, "changed": 0, "unchanged": 0, "removed": 0}
    assert s1["records"] == {"new": 1, "changed": 0, "unchanged": 0, "removed": 0}
    assert pairs(rows(out)) == {("A", R1, R2): (1, 0), ("A", R1, R3): (1, 0), ("A", R2, R3): (1, 0)}

    s2 = run(cfg)  # nothing happened in between
    assert s2["responses"]["unchanged"] == 1 and s2["responses"]["new"] == 0 and not s2["reaggregated_all"]
    assert len(rows(out)) == 3

    submit(creds.api_url, annotators["ann2"], uuids["B"], B_RANKS["ann2"])
    s3 = run(cfg)
    assert s3["responses"] == {"new": 1, "changed": 0, "unchanged": 1, "removed": 0}
    assert s3["records"] == {"new": 1, "changed": 0, "unchanged": 1, "removed": 0}
    got = rows(out)
    assert len(got) == 6 and len({r["id"] for r in got}) == 6  # the extra pairs, nothing duplicated
    assert {k for k in pairs(got) if k[0] == "B"} == {("B", R2, R1), ("B", R2, R3), ("B", R1, R3)}

    # Only changed records are aggregated again; unchanged ones keep their rows from the state. To see that, mark
    # every cached row in the state, then let ann1 change their mind on A (PUT over REST): B keeps its marks.
    state_path = out / "pull_state.json"
    state = json.loads(state_path.read_text())
    for rec in state["records"].values():
        for row in rec["rows"]:
            row["meta"] = {**row["meta"], "marker": "cached"}
    state_path.write_text(json.dumps(state))
    r = httpx.put(f"{creds.api_url}/api/v1/responses/{first['id']}", headers={"X-Argilla-Api-Key": annotators["ann1"]},
                  json={"status": "submitted", "values": {"ranking": {"value": [
                      {"value": R3, "rank": 1}, {"value": R2, "rank": 2}, {"value": R1, "rank": 3}]}}})
    assert r.status_code == 200, r.text
    s4 = run(cfg)
    assert s4["responses"] == {"new": 0, "changed": 1, "unchanged": 1, "removed": 0}
    got = rows(out)
    assert {json.loads(r["meta"])["record_id"] for r in got if "marker" in r["meta"]} == {ext["B"]}
    assert {k for k in pairs(got) if k[0] == "A"} == {("A", R3, R2), ("A", R3, R1), ("A", R2, R1)}

    s5 = run(config(creds, out, dataset="pull-inc", aggregate="none"))  # another method: nothing reused
    assert s5["reaggregated_all"] and not any("marker" in r["meta"] for r in rows(out)) and len(rows(out)) == 6


# ---------------------------------------------------------------------------------------------- config
def test_config_validation_and_recipe(tmp_path):
    with pytest.raises(ValueError, match="aggregate"):
        PullConfig(dataset="d", output_dir="o", aggregate="mean")
    with pytest.raises(ValueError, match="statuses.*drafts never count"):
        PullConfig(dataset="d", output_dir="o", statuses=["draft"])
    with pytest.raises(ValueError, match="test_fraction"):
        PullConfig(dataset="d", output_dir="o", test_fraction=1.0)
    recipe = tmp_path / "pull.yaml"
    recipe.write_text("dataset: telecom\noutput_dir: out/pulled\naggregate: bradley_terry\n"
                      "argilla:\n  workspace: team\n")
    cfg = load_config(recipe, ["min_annotators=2", "argilla.timeout=5"])
    assert (cfg.aggregate, cfg.min_annotators, cfg.argilla.workspace, cfg.argilla.timeout) == (
        "bradley_terry", 2, "team", 5)
    from rlhf.config import ConfigError

    recipe.write_text("dataset: telecom\noutput_dir: o\nmin_vote: 2\n")
    with pytest.raises(ConfigError, match="unknown key.*min_vote.*known keys:.*min_votes"):
        load_config(recipe)
