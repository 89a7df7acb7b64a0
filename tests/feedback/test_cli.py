"""The `rlhf feedback` commands as users run them (the installed console command, a real server): annotators add,
push a candidates file, annotators rank over REST, pull -> pairs + agreement; a wrong key is one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from feedback.client import Rest

R1, R2, R3 = "response_1", "response_2", "response_3"
ITEMS = [
    {"id": "c1", "source": "generate", "prompt": [{"role": "user", "content": "How do I top up?"}],
     "candidates": [{"content": "Dial *123#."}, {"content": "Use the app, tap Top up."}, {"content": "No idea."}],
     "meta": {"model": "tiny", "run": "sft"}},
    {"id": "c2", "source": "generate", "prompt": [{"role": "user", "content": "Is roaming free in the EU?"}],
     "candidates": [{"content": "Yes, in Roam Zone 1."}, {"content": "It costs 5 EUR a day."}, {"content": "Maybe."}],
     "meta": {"model": "tiny", "run": "sft"}},
]


def rlhf(*args: str, env: dict, stdin: str | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("rlhf")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "rlhf.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, input=stdin, timeout=300)


@pytest.fixture(scope="module")
def env(argilla_server):
    srv, creds = argilla_server
    return {**os.environ, "ARGILLA_API_URL": creds.api_url, "ARGILLA_API_KEY": creds.api_key,
            "RLHF_ARGILLA_HOME": str(srv.home)}


def test_round_trip_through_the_commands(tmp_path, env, client):
    # two annotators: generated passwords land in 0600 files, never on the terminal
    keys = {}
    for name in ("cli-ann1", "cli-ann2"):
        p = rlhf("feedback", "annotators", "add", name, "--workspace", "cli-ws", env=env)
        assert p.returncode == 0, p.stderr
        cred_file = Path(p.stdout.split("credentials in ")[1].strip())
        cred = json.loads(cred_file.read_text())
        assert oct(cred_file.stat().st_mode & 0o777) == "0o600"
        assert cred["password"] not in p.stdout + p.stderr
        keys[name] = cred["api_key"]
    listed = rlhf("feedback", "annotators", "list", "--workspace", "cli-ws", env=env)
    assert listed.stdout.split() == ["cli-ann1", "annotator", "cli-ann2", "annotator"]

    candidates = tmp_path / "candidates.jsonl"
    candidates.write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    recipe = tmp_path / "feedback.yaml"
    recipe.write_text(f"input: {candidates}\ndataset:\n  name: cli-ranking\n  k: 3\n  min_submitted: 2\n"
                      "argilla:\n  workspace: cli-ws\n")
    pushed = rlhf("feedback", "push", "--config", str(recipe), env=env)
    assert pushed.returncode == 0, pushed.stderr
    assert json.loads(pushed.stdout)["records"]["new"] == 2
    again = rlhf("feedback", "push", "--config", str(recipe), env=env)
    assert json.loads(again.stdout)["records"]["unchanged"] == 2  # stable ids: no duplicates

    # both annotators rank both records (REST keeps the ranks; the SDK would drop them, argilla-io/argilla#5712)
    ds = client.datasets("cli-ranking", workspace="cli-ws")
    records = Rest(client).get(f"/api/v1/datasets/{ds.id}/records", limit=10)["items"]
    assert len(records) == 2
    plans = {"cli-ann1": {R2: 1, R1: 2, R3: 3}, "cli-ann2": {R2: 1, R3: 2, R1: 3}}
    for name, ranks in plans.items():
        for rec in records:
            r = httpx.post(f"{env['ARGILLA_API_URL']}/api/v1/records/{rec['id']}/responses",
                           headers={"X-Argilla-Api-Key": keys[name]},
                           json={"status": "submitted", "values": {"ranking": {"value": [
                               {"value": f, "rank": k} for f, k in ranks.items()]}}})
            assert r.status_code == 201, r.text

    out = tmp_path / "pulled"
    pull_recipe = tmp_path / "pull.yaml"
    pull_recipe.write_text(f"dataset: cli-ranking\noutput_dir: {out}\naggregate: majority\nmin_annotators: 2\n"
                           "argilla:\n  workspace: cli-ws\n")
    pulled = rlhf("feedback", "pull", "--config", str(pull_recipe), env=env)
    assert pulled.returncode == 0, pulled.stderr
    rows = [json.loads(line) for line in (out / "preference" / "train.jsonl").read_text().splitlines()]
    # per record: both say R2 > R1 and R2 > R3 (2-0); R1 vs R3 is 1-1 -> no majority, no pair
    assert len(rows) == 4
    texts = {i["prompt"][0]["content"]: [c["content"] for c in i["candidates"]] for i in ITEMS}
    for row in rows:
        cands = texts[row["prompt"][-1]["content"]]
        assert row["chosen"][0]["content"] == cands[1]
        assert row["rejected"][0]["content"] in (cands[0], cands[2])
    agreement = json.loads((out / "agreement.json").read_text())
    # 2 records x 3 candidate pairs, one annotator pair: they agree on R2>R1 and R2>R3, not on R1 vs R3
    assert agreement["pairwise_agreement"] == pytest.approx(4 / 6)
    assert agreement["annotators"]["cli-ann1"] == {"records": 2, "pairs": 6}
    assert "Krippendorff" in pulled.stdout

    second = rlhf("feedback", "pull", "--config", str(pull_recipe), env=env)
    assert second.returncode == 0 and "'new': 0" in second.stdout  # incremental: nothing new


def test_a_wrong_key_is_one_clear_line(tmp_path, env):
    bad = {**env, "ARGILLA_API_KEY": "rlhf.wrong-key-123456789"}
    recipe = tmp_path / "pull.yaml"
    recipe.write_text(f"dataset: nothing\noutput_dir: {tmp_path / 'o'}\n")
    p = rlhf("feedback", "pull", "--config", str(recipe), env=bad)
    assert p.returncode != 0
    assert p.stderr.strip().count("\n") == 0 and "rejected the API key" in p.stderr and env["ARGILLA_API_URL"] in p.stderr
    assert "wrong-key" not in p.stderr + p.stdout and "Traceback" not in p.stderr


def test_a_bad_recipe_names_the_field(tmp_path, env):
    recipe = tmp_path / "feedback.yaml"
    recipe.write_text("input: x.jsonl\ndataset:\n  name: d\n  k: 1\n")
    p = rlhf("feedback", "push", "--config", str(recipe), env=env)
    assert p.returncode != 0 and "k" in p.stderr and "Traceback" not in p.stderr


def test_push_finds_the_embedded_server_without_argilla_env(tmp_path, env):
    # Regression: the settings' fields and questions built the SDK's default client from ARGILLA_API_URL/KEY and
    # failed with "Missing api_key" when the key came from the embedded server's home (the README's main job).
    home_only = {k: v for k, v in env.items() if k not in ("ARGILLA_API_URL", "ARGILLA_API_KEY")}
    candidates = tmp_path / "candidates.jsonl"
    candidates.write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    recipe = tmp_path / "feedback.yaml"
    recipe.write_text(f"input: {candidates}\ndataset:\n  name: cli-no-env\n  k: 3\n")
    pushed = rlhf("feedback", "push", "--config", str(recipe), env=home_only)
    assert pushed.returncode == 0, pushed.stderr
    assert json.loads(pushed.stdout)["records"]["new"] == 2
