"""Run directories: fingerprints, skip / resume / error on re-runs, redaction, lineage and atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from alignment.runs import (RUN_JSON, Run, RunError, fingerprint_path, load_run, parent_chain, write_json_atomic,
                            write_text_atomic)
from curation.writers import DatasetWriter

MODEL = {"name_or_path": "tiny-llama", "revision": "main"}


@dataclass
class Lora:
    r: int = 8  # adapter rank
    alpha: int = 16  # scaling numerator


@dataclass
class StageConfig:
    output_dir: str = "out"  # output-only: not an input
    learning_rate: float = 1e-4  # peak learning rate
    logging_steps: int = 10  # output-only: not an input
    lora: Lora = field(default_factory=Lora)  # adapter shape
    hub: dict = field(default_factory=dict)  # may hold a secret


def curated(tmp_path: Path) -> Path:
    """A curated folder as ``rlhf curate`` writes it: the real DatasetWriter, then curation.json last."""
    root = tmp_path / "curated"
    writer = DatasetWriter(root, ["jsonl"])
    for i in range(3):
        writer.write({"id": f"i{i}", "messages": [{"role": "user", "content": f"q{i}"},
                                                 {"role": "assistant", "content": f"a{i}"}]})
        writer.write({"id": f"p{i}", "prompt": [{"role": "user", "content": f"q{i}"}],
                      "chosen": [{"role": "assistant", "content": "good"}],
                      "rejected": [{"role": "assistant", "content": "bad"}]})
    outputs = writer.close()
    (root / "curation.json").write_text(json.dumps({"name": "tiny", "outputs": outputs, "wall_time_s": 0.1}))
    return root


def data_file(tmp_path: Path, text: str = '{"messages": []}\n') -> Path:
    path = tmp_path / "data" / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def start(out: Path, data: Path, config=None, **kw) -> Run:
    return Run.start(out, "sft", config if config is not None else StageConfig(), MODEL, [data], **kw)


def test_fingerprint_of_a_file_is_its_sha256_and_follows_content(tmp_path):
    path = data_file(tmp_path, "a" * 3_000_000)  # several 1 MiB blocks
    assert fingerprint_path(path) == hashlib.sha256(b"a" * 3_000_000).hexdigest()
    path.write_text("a" * 2_999_999 + "b")
    assert fingerprint_path(path) == hashlib.sha256(b"a" * 2_999_999 + b"b").hexdigest()


def test_fingerprint_of_a_folder_is_stable_and_sensitive(tmp_path):
    folder = data_file(tmp_path).parent
    (folder / "hf" / "train").mkdir(parents=True)
    (folder / "hf" / "train" / "data-00000-of-00001.arrow").write_bytes(b"\x00arrow")
    first = fingerprint_path(folder)
    assert fingerprint_path(folder) == first
    # what `datasets` and editors leave behind is not data
    (folder / "hf" / "train" / "cache-0123abcd.arrow").write_bytes(b"map cache")
    (folder / ".train.jsonl.swp").write_bytes(b"x")
    assert fingerprint_path(folder) == first
    (folder / "hf" / "train" / "data-00000-of-00001.arrow").write_bytes(b"\x00arrov")
    changed = fingerprint_path(folder)
    assert changed != first
    (folder / "train.jsonl").rename(folder / "test.jsonl")  # same bytes, other split: a different dataset
    assert fingerprint_path(folder) not in (first, changed)
    with pytest.raises(RunError, match="dataset not found"):
        fingerprint_path(tmp_path / "nope")


def test_curation_manifest_hashes_are_reused_until_a_file_is_edited(tmp_path):
    root = curated(tmp_path)
    manifest = json.loads((root / "curation.json").read_text())
    listed = manifest["outputs"]["instruction"]["files"]["instruction/train.jsonl"]
    train = root / "instruction" / "train.jsonl"
    assert fingerprint_path(train) == listed == hashlib.sha256(train.read_bytes()).hexdigest()
    # a manifest entry is trusted, not re-read: prove it with a manifest that lies about the file
    manifest["outputs"]["instruction"]["files"]["instruction/train.jsonl"] = "f" * 64
    (root / "curation.json").write_text(json.dumps(manifest))
    assert fingerprint_path(train) == "f" * 64
    # ...but a file written after the manifest was edited since curation, so it is hashed again
    later = (root / "curation.json").stat().st_mtime_ns + 10**9
    os.utime(train, ns=(later, later))
    assert fingerprint_path(train) == listed


def test_same_inputs_skip_and_output_only_keys_do_not_count(tmp_path):
    data, out = data_file(tmp_path), tmp_path / "run"
    run = start(out, data)
    assert run.action == "run" and run.logs_dir.is_dir() and run.checkpoints_dir.is_dir()
    run.finish({"train_loss": 1.5})
    before = (out / RUN_JSON).read_bytes()
    again = start(out, data, StageConfig(output_dir="elsewhere", logging_steps=1))
    assert again.action == "skip" and again.dir == out.resolve()
    assert again.record["metrics"] == {"train_loss": 1.5}
    assert (out / RUN_JSON).read_bytes() == before  # a finished run is never rewritten
    with pytest.raises(RunError, match="immutable"):
        again.record_metrics({"x": 1})


def test_changed_inputs_are_an_error_that_lists_what_differs(tmp_path):
    data, out = data_file(tmp_path), tmp_path / "run"
    start(out, data).finish()
    with pytest.raises(RunError) as e:
        start(out, data, StageConfig(learning_rate=2e-4, lora=Lora(r=16)))
    message = str(e.value)
    assert "config.learning_rate: 0.0001 -> 0.0002" in message and "config.lora.r: 8 -> 16" in message
    assert "logging_steps" not in message and "overwrite" in message
    data.write_text('{"messages": [1]}\n')
    with pytest.raises(RunError, match=r"datasets\[0\]: [0-9a-f]{12} -> [0-9a-f]{12}"):
        start(out, data)


def test_overwrite_replaces_the_run(tmp_path):
    data, out = data_file(tmp_path), tmp_path / "run"
    first = start(out, data)
    (first.logs_dir / "events.out").write_text("old")
    first.finish({"train_loss": 1.0})
    run = start(out, data, StageConfig(learning_rate=3e-4), overwrite=True)
    assert run.action == "run" and not (run.logs_dir / "events.out").exists()
    record = load_run(out)
    assert record["status"] == "running" and record["config"]["learning_rate"] == 3e-4 and record["metrics"] == {}


def test_a_folder_that_is_not_a_run_is_never_replaced(tmp_path):
    data, out = data_file(tmp_path), tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(RunError, match="not a run directory"):
        start(out, data, overwrite=True)
    assert (out / "notes.txt").read_text() == "precious"
    with pytest.raises(RunError, match="own folder"):
        Run.start(data.parent, "sft", {}, MODEL, [data])


def test_unfinished_run_resumes_and_keeps_its_history(tmp_path):
    data, out = data_file(tmp_path), tmp_path / "run"
    first = start(out, data)
    first.record_metrics({"step": 10})
    resumed = start(out, data)  # e.g. the job was killed: status still "running"
    assert resumed.action == "resume"
    assert resumed.record["attempts"] == 2 and resumed.record["metrics"] == {"step": 10}
    assert resumed.record["wall_time_s"] >= first.record["wall_time_s"]  # earlier attempts' time is kept
    resumed.finish({"step": 20})
    assert load_run(out)["status"] == "finished" and load_run(out)["metrics"]["step"] == 20


def test_failed_run_records_the_error_and_can_be_resumed(tmp_path):
    data, out = data_file(tmp_path), tmp_path / "run"
    with pytest.raises(RuntimeError, match="CUDA out of memory"), start(out, data) as run:
        raise RuntimeError("CUDA out of memory")
    record = load_run(out)
    assert record["status"] == "failed"
    assert record["error"] == {"type": "RuntimeError", "message": "CUDA out of memory"}
    resumed = start(out, data)
    assert resumed.action == "resume" and load_run(out)["error"] is None and load_run(out)["status"] == "running"
    with pytest.raises(RunError, match="finished runs are immutable"):
        run.fail("twice")  # the old handle is stale: its record says failed


def test_secrets_never_reach_run_json_and_do_not_change_inputs(tmp_path):
    data, out = data_file(tmp_path), tmp_path / "run"
    start(out, data, StageConfig(hub={"api_key": "sk-live-123456", "repo": "org/x"})).finish()
    text = (out / RUN_JSON).read_text()
    assert "sk-live-123456" not in text and "org/x" in text
    assert start(out, data, StageConfig(hub={"api_key": "sk-rotated-999", "repo": "org/x"})).action == "skip"


def test_record_holds_provenance(tmp_path):
    data, out = data_file(tmp_path), tmp_path / "run"
    start(out, data).finish({"eval_loss": 0.5})
    record = load_run(out)
    assert record["stage"] == "sft" and record["model"] == MODEL
    assert record["datasets"] == [{"path": str(data.resolve()), "fingerprint": fingerprint_path(data),
                                   "curation": None}]
    assert {"python", "torch", "transformers", "trl", "peft"} <= set(record["versions"])
    assert "git_commit" in record and record["wall_time_s"] >= 0 and record["finished_at"]


def test_parent_chain_runs_from_the_adapter_back_to_the_curated_data(tmp_path):
    root = curated(tmp_path)
    sft_dir, dpo_dir = tmp_path / "sft", tmp_path / "dpo"
    sft = Run.start(sft_dir, "sft", {"lr": 1e-4}, MODEL, [root / "instruction"])
    with pytest.raises(RunError, match="running, not finished"):
        Run.start(dpo_dir, "dpo", {"beta": 0.1}, MODEL, [root / "preference"], parent=sft_dir)
    sft.finish({"train_loss": 1.0})
    Run.start(dpo_dir, "dpo", {"beta": 0.1}, MODEL, [root / "preference"], parent=sft_dir).finish()
    chain = parent_chain(dpo_dir)
    assert [(c["kind"], c["path"]) for c in chain] == [
        ("run", dpo_dir.resolve()), ("run", sft_dir.resolve()), ("curation", (root / "curation.json").resolve())]
    assert chain[0]["record"]["parent"]["stage"] == "sft" and chain[2]["record"]["name"] == "tiny"
    # a parent whose record changed after the child was made from it breaks the lineage, loudly
    record = load_run(sft_dir)
    record["metrics"]["train_loss"] = 0.1
    write_json_atomic(sft_dir / RUN_JSON, record)
    with pytest.raises(RunError, match="changed after"):
        parent_chain(dpo_dir)


def test_writes_are_atomic(tmp_path):
    data, out = data_file(tmp_path), tmp_path / "run"
    run = start(out, data)
    run.record_metrics({"step": 1})
    before = (out / RUN_JSON).read_bytes()
    # serialisation fails: the document is serialised before any file is opened
    with pytest.raises(TypeError, match="object is not JSON serialisable"):
        write_json_atomic(out / RUN_JSON, {**run.record, "zz_bad": object()})
    with pytest.raises(TypeError):
        run.record_metrics({"bad": object()})
    assert (out / RUN_JSON).read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "logs", RUN_JSON]  # no temp file left
    run.finish({"step": 2})  # the run is still usable
    assert load_run(out)["metrics"] == {"step": 2}


def test_a_failed_replace_leaves_no_temp_file_and_the_target_as_it_was(tmp_path):
    """The failure comes after the temp file is written (the target is a folder os.replace cannot replace)."""
    target = tmp_path / "report.html"
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(OSError):
        write_text_atomic(target, "<html></html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    assert (target / "keep").read_text() == "x"


def test_atomic_writes_honour_the_umask(tmp_path):
    """A report or a run.json is shared with the team: mkstemp's 0600 would hide it from everyone but the owner."""
    import os

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "report.html", "<html></html>")
        write_json_atomic(tmp_path / RUN_JSON, {"a": 1})
    finally:
        os.umask(old)
    assert {(tmp_path / n).stat().st_mode & 0o777 for n in ("report.html", RUN_JSON)} == {0o644}
    assert (tmp_path / RUN_JSON).read_text() == '{\n  "a": 1\n}\n'


def test_load_run_errors_name_the_file(tmp_path):
    (tmp_path / RUN_JSON).write_text('{"stage": "sft",\n oops}')
    with pytest.raises(RunError, match=rf"{tmp_path / RUN_JSON}:2: invalid JSON"):
        load_run(tmp_path)
    (tmp_path / RUN_JSON).write_text(json.dumps({"format": 1, "stage": "sft"}))
    with pytest.raises(RunError, match=rf"{tmp_path / RUN_JSON}: 'status' is missing"):
        load_run(tmp_path)
    with pytest.raises(RunError, match="not a run directory"):
        load_run(tmp_path / "nothing")
