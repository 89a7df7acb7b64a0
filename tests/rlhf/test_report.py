"""Issue 6: the run report. ``collect`` reads hand-built stage outputs shaped like the real ones (curation.json from
curation/run.py, the pull's curation.json + agreement.json from feedback/pull.py, run.json + history.json from
alignment/runs.py and the stages), ``render`` draws them, and tests/rlhf/report_check.py checks the page in headless
Chromium against the record (``RLHF_SKIP_BROWSER=1``: markup checks only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf import report
from tests.feedback.browser import SKIP_ENV
from tests.rlhf.report_check import check_browser, check_report, check_reports, check_static, chromium, shows

XSS = '<script>window.pwned = 1</script><img src="x" onerror="window.pwned = 2">'


def _dump(path: Path, data, name: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / name).write_text(json.dumps(data))  # json.dumps writes NaN as NaN, as Python's writers would


def _step(label, type_, n_in, n_out, dropped=None, counters=None):
    dropped = dropped or {}
    return {"step": label, "type": type_, "in": n_in, "out": n_out, "created": n_out - n_in + sum(dropped.values()),
            "dropped": dropped, "counters": counters or {}}


def _run(stage, metrics, status="finished"):
    return {"format": 1, "stage": stage, "status": status, "config": {}, "model": {}, "metrics": metrics,
            "wall_time_s": 2.5, "started_at": "2026-11-24T14:00:00+00:00"}


@pytest.fixture
def outputs(tmp_path) -> dict[str, Path]:
    """One tiny output folder per stage, with numbers chosen so that every total is checkable by hand."""
    out = {k: tmp_path / k for k in ("curate", "pull", "sft", "rm", "policy", "eval")}
    steps = [_step("00_read_text", "read_text", 0, 10),
             _step("01_redact_pii", "redact_pii", 10, 10, counters={"pii:EMAIL": 3, "pii:PHONE": 2}),
             _step("02_redact_pii", "redact_pii", 10, 10, counters={"pii:EMAIL": 1}),
             _step("03_exact_dedup", "exact_dedup", 10, 8, {"exact_duplicate": 2}, {"clusters": 1}),
             _step("04_minhash_dedup", "minhash_dedup", 8, 7, {"near_duplicate": 1}, {"clusters": 1}),
             _step("05_length", "length", 7, 6, {"too_short": 1})]
    _dump(out["curate"], {"name": "tiny", "ledger": {
        "read": 10, "created": 10, "kept": 6, "dropped": 4, "steps": steps,
        "drops_by_reason": {"05_length:too_short": 1, "03_exact_dedup:exact_duplicate": 2,
                            "04_minhash_dedup:near_duplicate": 1}},
        "outputs": {"instruction": {"splits": {"test": 1, "train": 5}, "files": {}}}, "wall_time_s": 0.5},
        "curation.json")
    counts = {"records_seen": 4, "records_counted": 4, "responses_submitted": 7, "records_waiting_for_annotators": 1,
              "rows": 9, "rows_train": 9}
    agreement = {"krippendorff_alpha_ordinal": 0.6180339887498949, "pairwise_agreement": 0.75, "comparisons": 12,
                 "records": 4, "records_with_overlap": 3,
                 "annotators": {"j.doe": {"records": 4, "pairs": 12}, "sim-annotator-1": {"records": 3, "pairs": 9}},
                 "simulated_annotators": ["sim-annotator-1"], "counts": counts}
    _dump(out["pull"], agreement, "agreement.json")
    _dump(out["pull"], {"name": "feedback-pull:t/d", "outputs": {"preference": {"splits": {"train": 9}}},
                        "pull": {"counts": counts, "pairwise_agreement": 0.75}}, "curation.json")
    _dump(out["sft"], _run("sft", {"global_step": 4, "train_loss_first": 2.5, "train_loss_last": 1.25,
                                   "eval_loss": 1.5, "entropy": 3.0}), "run.json")
    _dump(out["sft"], [{"loss": 2.5, "mean_token_accuracy": 0.1, "step": 2},
                       {"eval_loss": 1.75, "step": 2},
                       {"loss": 1.25, "mean_token_accuracy": 0.3, "step": 4},
                       {"eval_loss": 1.5, "eval_mean_token_accuracy": 0.4, "step": 4},
                       {"train_runtime": 1.0, "train_loss": 1.875, "step": 4}], "history.json")
    _dump(out["rm"], _run("rm", {"accuracy": 0.875, "margin": 1.5}), "run.json")  # an older run: no history.json
    _dump(out["policy"], _run("ppo", {"updates": 3, "score_last": 0.5, "objective_kl": 0.25}), "run.json")
    _dump(out["policy"], [{"step": 1, "objective/score": 0.125, "objective/kl": 0.25, "loss/policy": -0.03},
                          {"step": 2, "objective/score": float("nan"), "objective/kl": 0.25, "loss/policy": 0.01},
                          {"step": 3, "objective/score": 0.5, "objective/kl": 0.25, "loss/policy": 2e-05}],
          "history.json")
    metrics = {"perplexity": {"base": 42.123456, "sft": 12.5, "policy": 13.0}, "general_perplexity": None,
               "reward_accuracy": 0.8125, "reward_margin": 0.4375, "reward_pairs": 16,
               "mean_reward": {"base": -0.5, "sft": 0.25, "policy": 0.75},
               "win_rate": {"policy_vs_sft": 0.625, "policy_vs_base": 0.875, "sft_vs_base": 0.5625}, "prompts": 8,
               "tokens": {"heldout": 12345, "general": None}, "reference_reward": 1.0625,
               "no_eos_rate": {"base": 0.5, "sft": 0.125, "policy": 0.0}}  # as alignment/evaluate.py writes them
    samples = [{"prompt": "How do I top up?", "reference": "Use the app.", "base": "I don't know", "sft": "The app.",
                "policy": XSS, "score": {"base": -1.0, "sft": 0.5, "policy": 1.25}},
               {"prompt": [{"role": "user", "content": "Roaming?"}], "reference": "Free in the EU.", "base": None,
                "sft": "Free.", "policy": "Free in the EU.", "score": {"base": None, "sft": 0.1, "policy": 0.9}}]
    run = _run("eval", metrics)
    run["samples"] = samples
    _dump(out["eval"], run, "run.json")
    return out


ANNOTATION = {"mode": "simulated", "url": "http://127.0.0.1:6900", "dataset_url": "http://127.0.0.1:6900/dataset/1",
              "completed": 3, "target": 4, "total": 5, "submitted": {"ann-1": 6},  # as rlhf/pipeline.py writes it
              "users": ["ann-1", {"username": "ann-2", "password": "s3cret-pass"}]}


def _record(results, status="finished", annotation=None) -> dict:
    return {"name": "tiny <pipeline>", "status": status, "started_at": "2026-11-24T14:00:00+00:00", "wall_time_s": 61.25,
            "versions": {"python": "3.11.7"}, "annotation": annotation,
            "stages": [{"name": "curate", "status": "finished", "wall_time_s": 0.5, "output": "out/tiny"},
                       {"name": "eval", "status": status, "wall_time_s": None}], "results": results}


def test_collect_reads_every_stage(outputs):
    res = report.collect(outputs, ANNOTATION)
    funnel = res["funnel"]
    assert {k: funnel[k] for k in ("read", "created", "kept", "dropped")} == {
        "read": 10, "created": 10, "kept": 6, "dropped": 4}
    assert funnel["by_step"][3] == {"step": "03_exact_dedup", "type": "exact_dedup", "in": 10, "created": 0,
                                    "kept": 8, "dropped": 2}
    assert list(funnel["drops_by_reason"]) == ["03_exact_dedup:exact_duplicate", "05_length:too_short",
                                               "04_minhash_dedup:near_duplicate"]  # largest first, stable
    assert funnel["pii"] == {"EMAIL": 4, "PHONE": 2}  # summed over both PII steps
    assert funnel["duplicates"] == {"exact": 2, "near": 1, "total": 3, "clusters": 2}
    assert funnel["datasets"] == {"instruction/test": 1, "instruction/train": 5}
    fb = res["feedback"]
    assert {k: fb[k] for k in ("records", "submitted", "pairs", "waiting", "pairwise_agreement", "krippendorff_alpha",
                               "simulated", "simulated_annotators", "datasets")} == {
        "records": 4, "submitted": 7, "pairs": 9, "waiting": 1, "pairwise_agreement": 0.75,
        "krippendorff_alpha": 0.6180339887498949, "simulated": True, "simulated_annotators": ["sim-annotator-1"],
        "datasets": {"preference/train": 9}}
    assert fb["annotators"]["j.doe"] == {"records": 4, "pairs": 12}
    sft, rm, policy = (res["training"][k] for k in ("sft", "rm", "policy"))
    assert sft["kind"] == "sft" and sft["metrics"] == {"global_step": 4, "train_loss_first": 2.5,
                                                       "train_loss_last": 1.25, "eval_loss": 1.5}
    assert sft["curves"] == {"loss": [[2, 2.5], [4, 1.25]], "eval_loss": [[2, 1.75], [4, 1.5]],
                             "accuracy": [[2, 0.1], [4, 0.3]], "eval_accuracy": [[4, 0.4]]}  # one point plots too
    assert rm["curves"] == {} and rm["metrics"] == {"accuracy": 0.875, "margin": 1.5}
    assert policy["kind"] == "ppo" and policy["curve_keys"] == {"loss": "loss/policy", "reward": "objective/score",
                                                                "kl": "objective/kl"}
    assert policy["curves"]["reward"] == [[1, 0.125], [3, 0.5]]  # the NaN step is not a point
    assert policy["curves"]["kl"] == [[1, 0.25], [2, 0.25], [3, 0.25]]  # a flat line plots too
    assert res["eval"]["metrics"]["win_rate"]["policy_vs_sft"] == 0.625 and len(res["eval"]["samples"]) == 2
    assert res["annotation"] == ANNOTATION
    json.dumps(res, allow_nan=False)  # storable in run.json


def test_collect_tolerates_missing_stages_and_names_bad_input(tmp_path, outputs):
    res = report.collect({"curate": tmp_path / "not-yet", "pull": None, "sft": outputs["sft"], "eval": None})
    assert res == {"funnel": {}, "feedback": {}, "training": {"sft": res["training"]["sft"]}, "eval": {},
                   "annotation": None}
    with pytest.raises(ValueError, match="unknown output keys \\['ppo'\\]"):
        report.collect({"ppo": outputs["policy"]})
    (outputs["rm"] / "run.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"rm/run.json: not valid JSON"):
        report.collect({"rm": outputs["rm"]})


def test_report_renders_and_matches_the_record(tmp_path, outputs):
    record = _record(report.collect(outputs, ANNOTATION), status="waiting", annotation=ANNOTATION)
    path = report.write(tmp_path / "run", record)
    assert path == tmp_path / "run" / "report.html" and os.listdir(tmp_path / "run") == ["report.html"]
    html = path.read_text()
    assert "s3cret-pass" not in html and "tiny &lt;pipeline&gt;" in html
    paths = {m["path"] for m in check_static(html, record)["metrics"]}
    assert {"results.funnel.kept", "results.funnel.pii.EMAIL", "results.feedback.annotators.j.doe.pairs",
            "results.feedback.krippendorff_alpha", "results.eval.metrics.win_rate.policy_vs_sft",
            "results.eval.metrics.perplexity.base", "results.eval.samples.0.score.policy",
            "results.eval.metrics.no_eos_rate.sft", "results.eval.metrics.reference_reward", "annotation.completed",
            "annotation.total", "annotation.submitted.ann-1",
            "results.training.sft.metrics.eval_loss", "stages.0.wall_time_s"} <= paths
    facts = check_report(path, record)
    assert {k: len(v) for k, v in facts["curves"].items()} == {
        "sft.loss": 2, "sft.eval_loss": 2, "sft.accuracy": 2, "sft.eval_accuracy": 1,
        "policy.loss": 3, "policy.reward": 2, "policy.kl": 3}
    assert "SIMULATED ANNOTATORS" in facts["text"] and "3 / 4 records ranked" in facts["text"]


def test_a_script_in_a_generation_is_text_not_code(tmp_path, outputs):
    record = _record(report.collect(outputs))
    path = report.write(tmp_path, record)
    assert "<script" not in path.read_text()
    facts = check_report(path, record)  # asserts no <script> element, no request (the <img> would fetch "x")
    assert XSS in facts["text"]  # shown literally


def test_missing_stages_show_dashes(tmp_path):
    record = _record(report.collect({}), status="running", annotation={"mode": "human"})
    html = report.render(record)
    for text in ("curation not run", "no rankings pulled", "evaluation not run", "no samples"):
        assert f"\u2014 {text}" in html
    assert html.count("\u2014 not run") == 3  # sft, rm, policy
    # a run that failed before anything was collected: the error is shown, escaped
    bare = {"name": "x", "status": "failed", "error": {"type": "RunError", "message": "rm: <b>boom</b>"}}
    # waiting with an address that is not a web page: shown as text, never a link
    odd = {"name": "y", "status": "waiting", "annotation": {"mode": "human", "url": "javascript:alert(1)"}}
    assert "href" not in report.render(odd) and "javascript:alert(1)" in report.render(odd)
    # sections with few of their keys (another version's run.json): dashes, no crash
    partial = _record({"funnel": {"kept": 3}, "feedback": {"annotators": {"a": {}}}, "training": {"sft": {"kind": "sft"}},
                       "eval": {"metrics": {"perplexity": {"base": 3.5}}, "samples": [{"prompt": "p"}, "junk"]}})
    pages = [(report.write(tmp_path / str(i), r), r) for i, r in enumerate((record, bare, odd, partial))]
    facts = check_reports(pages)
    assert "RunError: rm: <b>boom</b>" in facts[1]["text"]


def test_simulated_annotators_are_labelled_even_in_human_mode(outputs):
    html = report.render(_record(report.collect(outputs), annotation={"mode": "human"}))
    assert 'id="simulated-banner"' in html and "sim-annotator-1" in html
    html = report.render(_record(report.collect({}), annotation={"mode": "human"}))
    assert "simulated-banner" not in html


def _tampered(outputs) -> list[tuple[str, str, dict, str, bool]]:
    """(what, page, record, expected message, caught by the markup pass too): pages that no longer match."""
    record = _record(report.collect(outputs, ANNOTATION), annotation=ANNOTATION)
    html = report.render(record)
    kept = 'data-metric="results.funnel.kept" data-value="6">6<'
    assert kept in html and html.count("<circle") == 15
    cut = html.index("<circle", html.index('data-curve="policy.kl"'))
    human = {**record, "annotation": {"mode": "human"}, "results": {**record["results"], "feedback": None}}
    return [
        ("data-value", html.replace(kept, kept.replace('"6"', '"7"')), record, "data-value 7, record 6", True),
        ("shown text", html.replace(kept, kept.replace(">6<", ">5<")), record, "text '5' is not 6 rounded", True),
        ("circle dropped", html[:cut] + html[html.index("</circle>", cut) + 9:], record, "policy.kl: 2 points", True),
        ("banner", html, human, "simulated banner shown=True", True),
        ("outside image", html.replace("</body>", '<img src="https://example.com/x.png"></body>'), record,
         "outside|request https://example.com", True),
        ("hidden section", html.replace("</style>", "#eval{display:none}</style>"), record, "#eval", False)]


def test_check_fails_on_a_tampered_page_markup(outputs):
    for what, html, record, message, caught in _tampered(outputs):
        if caught:
            with pytest.raises(AssertionError, match=message):
                check_static(html, record)
                pytest.fail(f"{what}: not caught")


def test_check_fails_on_a_tampered_page_browser(tmp_path, outputs):
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1")
    with chromium() as browser:
        for i, (what, html, record, message, _) in enumerate(_tampered(outputs)):
            path = tmp_path / f"tampered-{i}.html"
            path.write_text(html)
            with pytest.raises(AssertionError, match=message):
                check_browser(path, record, browser)
                pytest.fail(f"{what}: not caught")


@pytest.mark.parametrize("value", [0, 7, 12345, 1234567, 0.0, 3.0, 0.925, 0.9108023011588617, -0.0312, 138.3183,
                                   4.896694183349609, 12345.678, 9.49415269246856e-06, -2.5e-07, 0.001, 1e-3 - 1e-12,
                                   0.99995, 999.96, 9999.96, None, True, False])
def test_shown_numbers_are_their_rounding(value):
    assert shows(report.fmt(value), value)
    if isinstance(value, float) and value:
        assert shows(report.fmt(value, pct=True), value)
        assert not shows(report.fmt(value * 1.01 + 0.01), value)


def test_report_module_imports_only_the_standard_library():
    code = ("import sys; before = set(sys.modules); import rlhf.report; "
            "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] not in sys.stdlib_module_names))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.replace("'", '"')) == ["rlhf", "rlhf.report", "rlhf.report_html"]
