"""feedback.simulate: scripted annotators rank pushed records through the real embedded Argilla server, and pull
reads their rankings back. Every expected ranking below is worked out by hand in the comments next to the data."""

from __future__ import annotations

import json

import pytest

from feedback.client import ArgillaConfig
from feedback.dataset import DatasetSpec, record_id
from feedback.pull import PullConfig, fetch_rankings
from feedback.simulate import SimulateConfig, ideal_ranks, jaccard, perturb, run

R1, R2, R3 = "response_1", "response_2", "response_3"
NAMES = ["sim-annotator-1", "sim-annotator-2", "sim-annotator-3"]
WS = "sim-ws"


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# prompt -> (candidates, reference or None). Jaccard over lower-cased word sets:
# A: ref {open the app and tap top up} (7). R1 {dial 123 to top up}: 2 shared / 10 = 0.2; R2 = the ref: 1.0;
#    R3 {no idea}: 0 -> R2 1, R1 2, R3 3.
# B: ref {yes roaming in roam zone 1 is free} (8). R1 {maybe}: 0; R2 {yes it is free in roam zone 1}: 7 / 9;
#    R3 {it costs 5 eur a day}: 0 -> R2 1, and R1, R3 tie at 2.
# C: no reference -> fallback length (words): R1 3, R2 7, R3 1 -> R2 1, R1 2, R3 3.
EXACT = {
    "How do I top up?": (["Dial *123# to top up.", "Open the app and tap Top up.", "No idea."],
                         "Open the app and tap Top up."),
    "Is roaming free in the EU?": (["Maybe.", "Yes, it is free in Roam Zone 1.", "It costs 5 EUR a day."],
                                   "Yes, roaming in Roam Zone 1 is free."),
    "Where is my bill?": (["In the app.", "Under Account, then Bills, in the app.", "Bills."], None),
}
EXPECTED = {"How do I top up?": {R2: 1, R1: 2, R3: 3},
            "Is roaming free in the EU?": {R2: 1, R1: 2, R3: 2},
            "Where is my bill?": {R2: 1, R1: 2, R3: 3}}


@pytest.fixture(scope="module")
def argilla(argilla_server) -> ArgillaConfig:
    srv, creds = argilla_server  # home: generated passwords go to the test server's folder, not ~/.cache
    return ArgillaConfig(api_url=creds.api_url, api_key=creds.api_key, workspace=WS, home=str(srv.home))


def push(tmp_path, argilla: ArgillaConfig, name: str, items: dict, min_submitted: int) -> None:
    from feedback.push import PushConfig
    from feedback.push import run as push_run

    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"id": f"{name}-{i}", "source": "test", "prompt": user(p),
                                        "candidates": [{"content": c} for c in cands]}) + "\n"
                            for i, (p, (cands, _)) in enumerate(items.items())))
    push_run(PushConfig(dataset=DatasetSpec(name=name, k=3, min_submitted=min_submitted), input=str(path),
                        argilla=argilla), log=lambda m: None)


def references(tmp_path, items: dict) -> str:
    """Curated-style instruction rows (system turn, question, reply) for the items that have a reference."""
    path = tmp_path / "refs.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "system", "content": "Be brief."}, *user(p),
                                                     {"role": "assistant", "content": ref}]}) + "\n"
                            for p, (_, ref) in items.items() if ref is not None))
    return str(path)


def by_prompt(client, name: str, items: dict) -> dict[str, dict[str, dict[str, int]]]:
    """``{prompt: {annotator: ranks}}`` of the submitted rankings, read back over REST."""
    rankings = fetch_rankings(client, name, WS)
    return {p: rankings.get(record_id(user(p), cands), {}) for p, (cands, _) in items.items()}


# ------------------------------------------------------------------------------------------ pure building blocks
def test_scores_ranks_and_noise_by_hand():
    assert jaccard("Dial *123# to top up.", "Open the app and tap Top up.") == pytest.approx(0.2)
    assert ideal_ranks({R1: 0.2, R2: 1.0, R3: 0.2}) == {R1: 2, R2: 1, R3: 2}
    import random

    ranks = {R1: 1, R2: 2, R3: 3}
    assert perturb(ranks, 0.0, random.Random(1)) == ranks
    swapped = perturb(ranks, 1.0, random.Random(1))  # always perturbed: exactly two neighbouring levels trade places
    assert swapped in ({R1: 2, R2: 1, R3: 3}, {R1: 1, R2: 3, R3: 2})
    assert perturb({R1: 1, R2: 1, R3: 1}, 1.0, random.Random(1)) == {R1: 1, R2: 1, R3: 1}  # all tied: no order


def test_config_validation_names_the_field():
    cfg = SimulateConfig(dataset="d", preference="length", noise=0.2)
    assert cfg.usernames() == NAMES and cfg.noise_levels() == pytest.approx([0.1, 0.2, 0.3])
    for kwargs, name in [({"annotators": ["alice"]}, "annotators"), ({"annotators": 0}, "annotators"),
                         ({"preference": "loudness"}, "preference"), ({"preference": "keyword:"}, "preference"),
                         ({"fallback": "reference"}, "fallback"), ({"noise": 1.5}, "noise"),
                         ({"noise": [0.1, 0.2]}, "noise"), ({"max_records": 0}, "max_records"),
                         ({"preference": "reference"}, "references")]:
        with pytest.raises(ValueError, match=f"^{name}:"):
            SimulateConfig(**{"dataset": "d", "preference": "length", **kwargs})


# ------------------------------------------------------------------------------------------- on the real server
def test_noise_free_annotators_rank_as_computed_by_hand_and_rerun_adds_nothing(tmp_path, argilla, client):
    push(tmp_path, argilla, "sim-exact", EXACT, min_submitted=3)
    cfg = SimulateConfig(dataset="sim-exact", argilla=argilla, preference="reference", fallback="length",
                         references=references(tmp_path, EXACT), noise=0.0, seed=1)
    summary = run(cfg)
    assert summary["simulated"] is True and summary["submitted"] == 9 and summary["references"] == 2
    assert {n: a["submitted"] for n, a in summary["annotators"].items()} == dict.fromkeys(NAMES, 3)
    got = by_prompt(client, "sim-exact", EXACT)
    assert got == {p: dict.fromkeys(NAMES, ranks) for p, ranks in EXPECTED.items()}

    assert run(cfg)["submitted"] == 0  # nothing is pending for them any more

    from feedback.pull import run as pull

    pulled = pull(PullConfig(dataset="sim-exact", output_dir=str(tmp_path / "pulled"), argilla=argilla,
                             min_annotators=3))
    # pairs: A 3 (R2>R1, R2>R3, R1>R3), B 2 (R1-R3 tie gives none), C 3; all three agree on everything
    assert pulled["counts"]["rows"] == 8 and pulled["pairwise_agreement"] == 1.0
    assert pulled["simulated_annotators"] == NAMES  # the simulation is labelled in pull's summary and report
    assert f"| simulated annotators | yes ({', '.join(NAMES)}) |" in (tmp_path / "pulled" / "agreement.md").read_text()
    rows = [json.loads(line) for line in (tmp_path / "pulled" / "preference" / "train.jsonl").read_text().splitlines()]
    top_up = [r for r in rows if r["prompt"][-1]["content"] == "How do I top up?"]
    assert {r["chosen"][0]["content"] for r in top_up} == {"Open the app and tap Top up.", "Dial *123# to top up."}


def test_skip_fallback_leaves_records_without_reference_pending(tmp_path, argilla, client):
    items = {p: v for p, v in EXACT.items() if p != "How do I top up?"}
    push(tmp_path, argilla, "sim-skip", items, min_submitted=1)
    cfg = SimulateConfig(dataset="sim-skip", argilla=argilla, annotators=["sim-solo"], preference="reference",
                         fallback="skip", references=references(tmp_path, items), noise=0.0)
    summary = run(cfg)
    assert summary["submitted"] == 1 and summary["skipped"] == {"no_reference": 1}
    assert by_prompt(client, "sim-skip", items) == {"Is roaming free in the EU?": {"sim-solo": EXPECTED[
        "Is roaming free in the EU?"]}, "Where is my bill?": {}}


# 10 prompts, candidates of 2, 4 and 6 words in shuffled slots: under "length" the ideal ranks are by word count.
NOISY = {f"Question {i}?": ([["one two", "one two three four", "one two three four five six"][(j + i) % 3]
                             for j in range(3)], None) for i in range(10)}


def test_noisy_annotators_are_deterministic_and_disagree_somewhat(tmp_path, argilla, client):
    from feedback.agreement import agreement_report

    rankings = {}
    for name in ("sim-noisy-a", "sim-noisy-b"):  # the same records and seed in two datasets
        push(tmp_path, argilla, name, NOISY, min_submitted=3)
        summary = run(SimulateConfig(dataset=name, argilla=argilla, preference="length", noise=0.5, seed=7))
        assert summary["submitted"] == 30
        rankings[name] = by_prompt(client, name, NOISY)
    assert rankings["sim-noisy-a"] == rankings["sim-noisy-b"]  # same seed, same rankings
    report = agreement_report(rankings["sim-noisy-a"])
    assert 0 < report["pairwise_agreement"] < 1 and 0 < report["krippendorff_alpha_ordinal"] < 1
    ideal = {p: {f"response_{j + 1}": 3 - len(c.split()) // 2 + 1 for j, c in enumerate(cands)}
             for p, (cands, _) in NOISY.items()}
    exact = sum(r == ideal[p] for p, rr in rankings["sim-noisy-a"].items() for r in rr.values())
    assert 0 < exact < 30  # some rankings are perturbed, most are not (levels 0.25 / 0.5 / 0.75)


def test_min_submitted_spreads_records_and_max_records_caps_a_run(tmp_path, argilla, client):
    items = dict(list(NOISY.items())[:4])
    push(tmp_path, argilla, "sim-spread", items, min_submitted=2)
    cfg = SimulateConfig(dataset="sim-spread", argilla=argilla, preference="length", noise=0.0, max_records=1)
    assert [a["submitted"] for a in run(cfg)["annotators"].values()] == [1, 1, 1]
    cfg.max_records = None
    rest = run(cfg)
    got = by_prompt(client, "sim-spread", items)
    # 4 records x 2 annotators each: completed records leave everyone's queue, as in the web UI
    assert [len(r) for r in got.values()] == [2, 2, 2, 2] and rest["submitted"] == 8 - 3
