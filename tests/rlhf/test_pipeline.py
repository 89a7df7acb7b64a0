"""`rlhf run`: the whole telecom loop on the tiny model with simulated annotators and a real embedded Argilla server,
then what a second run skips, what an edit re-runs, how a human-annotated run waits, and how a failure is recorded.

One scenario in order (each step builds on the last; about 2 minutes on 2 cores): the shipped pipeline recipe with
smaller counts, so it is the recipe users run that is tested."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.cli import main
from rlhf.config import ConfigError
from rlhf.pipeline import ORDER, WAITING_EXIT_CODE, load_pipeline
from tests.feedback.conftest import free_port
from tests.rlhf.report_check import check_report

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "samples" / "telecom" / "pipeline.yaml"
SMALL = [  # the sample's recipe at test size: 8 prompts to rank, short trainings
    "stages.sft.set.train.max_steps=30", "stages.generate.set.max_prompts=8", "stages.rm.set.train.epochs=2",
    "stages.policy.set.train.max_steps=4", "stages.policy.set.train.save_steps=2",
    "stages.eval.set.max_prompts=4", "stages.eval.set.samples=2", "stages.eval.set.max_new_tokens=24"]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    import torch

    torch.set_num_threads(1)  # see tests/alignment/conftest.py: extra threads only contend on a 2-core box


def _run(*extra: str) -> tuple[int, dict]:
    args = ["run", str(RECIPE)]
    for item in [*SMALL, *extra]:
        args += ["--set", item]
    code = main(args)
    return code, json.loads(Path("out/pipeline/run.json").read_text())


def _status(record: dict) -> dict[str, str]:
    return {s["name"]: s["status"] for s in record["stages"]}


def test_the_loop_runs_skips_reruns_waits_and_fails_cleanly(tmp_path, monkeypatch, capsys):
    from feedback.server_ctl import EmbeddedServer

    monkeypatch.chdir(tmp_path)  # the recipes' outputs (out/...) land here
    (tmp_path / "samples").symlink_to(ROOT / "samples")  # as from the repository root: guidelines, general text
    for var in ("ARGILLA_API_URL", "ARGILLA_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "argilla"
    monkeypatch.setenv("RLHF_ARGILLA_HOME", str(home))
    ports = [f"server.port={free_port()}", f"server.redis_port={free_port()}"]

    # 1. everything runs; the pipeline starts the embedded server and stops it at the end
    code, record = _run(*ports)
    out = capsys.readouterr()
    assert code == 0, out.err
    assert record["status"] == "finished" and _status(record) == {n: "ran" for n in ORDER}
    assert "SIMULATION" in out.err and "(SIMULATED annotators)" in out.out
    assert not EmbeddedServer(home=home).running()
    annotation = record["annotation"]
    assert annotation["mode"] == "simulated" and annotation["completed"] == annotation["total"] == 8
    assert annotation["url"].startswith("http://127.0.0.1:") and "api_key" not in json.dumps(record)
    metrics = record["results"]["eval"]["metrics"]
    assert metrics["perplexity"]["sft"] < metrics["perplexity"]["base"]  # SFT learnt the domain
    assert 0 <= metrics["win_rate"]["policy_vs_sft"] <= 1 and metrics["prompts"] == 4
    assert record["results"]["feedback"]["simulated"] is True
    check_report(Path(record["report"]), record)  # renders in Chromium, every figure equals run.json

    # 2. the same recipe again: nothing local runs; Argilla's stages sync and find nothing new
    srv = EmbeddedServer(home=home)
    srv.start(port=free_port(), redis_port=free_port(), log=lambda m: None)
    try:
        code, again = _run(*ports)
        assert code == 0
        local = [n for n in ORDER if n not in ("push", "annotate", "pull")]
        assert all(_status(again)[n] == "skipped" for n in local), _status(again)
        assert again["stages"][ORDER.index("pull")]["summary"]["responses"]["new"] == 0
        assert srv.running()  # not started by this run, so not stopped by it

        # 3. a policy setting changed: only the policy and its evaluation run again
        code, edited = _run(*ports, "stages.policy.set.ppo.kl_coef=0.2")
        assert code == 0
        ran = {n for n, s in _status(edited).items() if s == "ran"}
        assert ran == {"push", "annotate", "pull", "policy", "eval"}, _status(edited)

        # 4. people annotate: two more prompts are pushed and nobody has ranked them yet, so the run waits
        code, waiting = _run(*ports, "annotation.mode=human", "stages.generate.set.max_prompts=10")
        err = capsys.readouterr().err
        assert code == WAITING_EXIT_CODE and waiting["status"] == "waiting"
        assert "8/10" in err and waiting["annotation"]["dataset_url"] in err
        status = _status(waiting)
        assert status["annotate"] == "waiting" and all(status[n] == "pending" for n in ORDER[ORDER.index("pull"):])
        assert Path(waiting["report"]).is_file()

        # ... and the next run (the simulated annotators rank the two) goes on from there
        code, done = _run(*ports, "stages.generate.set.max_prompts=10")
        assert code == 0 and done["annotation"]["completed"] == 10
        assert _status(done)["curate"] == "skipped" and _status(done)["rm"] == "ran"

        # 5. a broken stage recipe fails before anything runs (every recipe is loaded first), naming the field ...
        code, failed = _run(*ports, "stages.generate.set.max_prompts=10", "stages.rm.set.train.learning_rate=-1")
        assert code == 2 and failed["status"] == "failed" and "learning_rate" in failed["error"]["message"]
        assert set(_status(failed).values()) == {"pending"}
        # ... and keeps what the last good run knew: fixed, nothing local runs again
        code, fixed = _run(*ports, "stages.generate.set.max_prompts=10")
        assert code == 0 and all(_status(fixed)[n] == "skipped" for n in local), _status(fixed)
    finally:
        srv.stop(quiet=True)


def test_recipe_errors_name_the_field(tmp_path):
    text = RECIPE.read_text()
    bad = tmp_path / "pipeline.yaml"
    for before, after, expected in [
        ("stage: ppo, ", "", r"policy\.stage"),
        ("mode: simulated", "mode: crowd", "mode"),
        ("", "", r"stages\.curate\.recipe: recipe not found: " + str(tmp_path)),  # relative to the recipe's folder
    ]:
        bad.write_text(text.replace(before, after) if before else text)
        with pytest.raises(ConfigError, match=expected):
            load_pipeline(bad)
    assert load_pipeline(RECIPE).stages.rm.overrides() == ['data.path="out/feedback/pulled"']
