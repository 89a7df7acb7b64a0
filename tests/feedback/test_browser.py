"""Issue 4: an annotator signs in to Argilla's real web UI (headless Chromium), ranks two records by dragging the
response cards into rank slots, submits, and exactly those ranks, a tie included, come back from Argilla's REST API
from ``feedback.pull.fetch_rankings`` and as the preference pairs ``rlhf feedback pull`` writes.

Needs Debian's ``chromium`` (``.ci/run`` installs it) and Playwright (the ``test`` extra). Without a browser the test
fails, so CI cannot pass it by accident; ``RLHF_SKIP_BROWSER=1`` skips it on purpose."""

from __future__ import annotations

import importlib.util
import json
import os
import secrets

import pytest

from feedback.dataset import RANKING, DatasetSpec, build_settings, record_id, response_field
from tests.feedback.browser import SKIP_ENV, ArgillaUI, find_chromium, launch

# prompt -> candidate texts (fields response_1..3)
RECORDS = {
    "How do I reset my router?": ["Hold the reset button for ten seconds.", "Unplug it and plug it back in.",
                                  "Call support."],
    "What does roaming cost in the EU?": ["Nothing extra on EU plans.", "It depends on the country.",
                                          "Same as at home, within fair use."],
}
# the annotator's ranks: neither the option order nor its reverse, and a tie, so that ranks lost or returned in
# option order (argilla-io/argilla#5712) cannot pass
PLAN = {
    "How do I reset my router?": {"response_3": 1, "response_1": 2, "response_2": 3},
    "What does roaming cost in the EU?": {"response_3": 1, "response_1": 1, "response_2": 2},
}


@pytest.fixture(scope="session")  # session scope: pytest sets those up first, so no server starts for nothing
def chromium() -> str:
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1: browser test skipped on request")
    path = find_chromium()
    if path is None:
        where = os.environ.get("RLHF_CHROMIUM") or "/usr/bin/chromium or on PATH"
        pytest.fail(f"no Chromium at {where}: `apt-get install chromium` (.ci/run does), "
                    f"or set {SKIP_ENV}=1 to skip the browser test")
    if importlib.util.find_spec("playwright") is None:
        pytest.fail("playwright is not installed: pip install -e '.[test]'")
    return path


@pytest.fixture
def ranking_task(client):
    """A workspace with a k=3 ranking dataset of the RECORDS and an annotator (known password) who belongs to it."""
    import argilla as rg

    suffix = secrets.token_hex(3)
    workspace = rg.Workspace(name=f"browser-{suffix}", client=client).create()
    name = f"browser-ranking-{suffix}"
    dataset = rg.Dataset(name=name, workspace=workspace.name, client=client,
                         settings=build_settings(DatasetSpec(name=name, k=3))).create()
    dataset.records.log([
        {"id": record_id(prompt, cands), "prompt": prompt,
         **{response_field(i): text for i, text in enumerate(cands, start=1)}}
        for prompt, cands in RECORDS.items()])
    password = secrets.token_urlsafe(12)  # a throwaway account; generated so no password sits in the repository
    annotator = rg.User(username=f"annotator-{suffix}", password=password, role="annotator", client=client).create()
    workspace.add_user(annotator)
    return dataset, annotator, password


def option_labels(client, dataset_id) -> dict[str, str]:
    """``{option value: text on its card}`` of the ranking question, as the UI receives them."""
    from feedback.client import Rest

    questions = Rest(client).get(f"/api/v1/datasets/{dataset_id}/questions")["items"]
    options = next(q for q in questions if q["name"] == RANKING)["settings"]["options"]
    return {o["value"]: o["text"] for o in options}


def submitted_ranks(client, dataset_id, user_id) -> dict[str, dict[str, int]]:
    """``{external_id: {option: rank}}`` of the user's submitted responses, read over REST as the owner (the SDK
    drops ranks, argilla-io/argilla#5712)."""
    from feedback.client import Rest

    items = Rest(client).get(f"/api/v1/datasets/{dataset_id}/records", include="responses")["items"]
    return {it["external_id"]: {v["value"]: v["rank"] for v in resp["values"][RANKING]["value"]}
            for it in items for resp in it["responses"]
            if resp["user_id"] == str(user_id) and resp["status"] == "submitted"}


def test_annotator_ranks_in_the_web_ui(chromium, argilla_server, client, ranking_task, tmp_path):
    from playwright.sync_api import sync_playwright

    from feedback import pull
    from feedback.agreement import ranking_pairs
    from feedback.client import ArgillaConfig
    from feedback.pull import fetch_rankings

    _, creds = argilla_server
    dataset, annotator, password = ranking_task
    labels = option_labels(client, dataset.id)
    assert submitted_ranks(client, dataset.id, annotator.id) == {}

    with sync_playwright() as pw:
        browser = launch(pw, chromium)
        try:
            ui = ArgillaUI(browser.new_page(viewport={"width": 1400, "height": 1000}), creds.api_url)
            with ui.evidence_on_failure(tmp_path):
                ui.sign_in(annotator.username, password)
                ui.open_dataset(dataset.name)
                todo = list(PLAN)
                while todo:
                    # the UI shows pending records in a per-user order: rank whichever one is on screen
                    prompt = ui.shown_field("Prompt", among=todo)
                    ui.rank({labels[option]: rank for option, rank in PLAN[prompt].items()})
                    assert ui.submit() == 201
                    todo.remove(prompt)
                    ui.wait_submitted(len(PLAN) - len(todo))
        finally:
            browser.close()

    expected = {record_id(prompt, RECORDS[prompt]): ranks for prompt, ranks in PLAN.items()}
    # what Argilla stored, read straight from its REST API (independent of our pull code) ...
    assert submitted_ranks(client, dataset.id, annotator.id) == expected
    # ... and what `rlhf feedback pull` reads
    assert fetch_rankings(client, dataset) == {rid: {annotator.username: ranks} for rid, ranks in expected.items()}

    # ... and the pairs pull writes: every strict preference of that ranking, the tie giving none
    summary = pull.run(pull.PullConfig(dataset=dataset.name, output_dir=str(tmp_path / "pulled"), aggregate="none",
                                       argilla=ArgillaConfig(api_url=creds.api_url, api_key=creds.api_key,
                                                             workspace=dataset.workspace.name)))
    rows = [json.loads(line) for line in (tmp_path / "pulled" / "preference" / "train.jsonl").read_text().splitlines()]
    got = {(r["prompt"][-1]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows}
    want = {(prompt, RECORDS[prompt][int(a[-1]) - 1], RECORDS[prompt][int(b[-1]) - 1])
            for prompt, ranks in PLAN.items() for a, b in ranking_pairs(ranks)}
    assert got == want and len(rows) == 5 and summary["counts"]["rows"] == 5
