"""`rlhf curate` through the real CLI on small recipes: outputs in three formats, bad input, --num-proc."""

from __future__ import annotations

import json

import datasets
import pytest

from rlhf.cli import main

CHATS = [
    {"conversation_id": "c1", "turns": [{"speaker": "customer", "text": "How do I top up my prepaid SIM card online?"},
                                         {"speaker": "agent", "text": "Open the app, tap Top up, choose an amount and pay by card."}], "csat": 5},
    {"conversation_id": "c2", "turns": [{"speaker": "customer", "text": "How do I top up my prepaid SIM card online?"},
                                         {"speaker": "agent", "text": "Not sure, try calling the shop maybe."}], "csat": 1},
    {"conversation_id": "c3", "turns": [{"speaker": "customer", "text": "Why is my bill higher than last month?"},
                                         {"speaker": "agent", "text": "Your bill includes roaming charges from your trip to France in May."}], "csat": 4},
    {"conversation_id": "c4", "turns": [{"speaker": "customer", "text": "Can I keep my number when I switch to you?"},
                                         {"speaker": "agent", "text": "Yes: ask your old provider for a PAC code and give it to us within 30 days."}], "csat": 5},
]

RECIPE = """
name: cli-test
seed: 3
steps:
  - type: read_transcripts
    paths: chats.jsonl
  - type: ratings_to_pairs
    margin: 2
  - type: score_range
    min: 3
  - type: format_instructions
  - type: split
    test_size: 0.3
output:
  dir: {out}
"""


def _setup(tmp_path, lines=None):
    lines = lines if lines is not None else [json.dumps(c) for c in CHATS]
    (tmp_path / "chats.jsonl").write_text("\n".join(lines) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(out=tmp_path / "out"))
    return recipe


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _all_rows(out, kind):
    rows = []
    for split in ("train", "test"):
        path = out / kind / f"{split}.jsonl"
        if path.exists():
            rows += _read_jsonl(path)
    return rows


def test_curate_writes_three_identical_formats_and_a_reconciled_card(tmp_path):
    recipe = _setup(tmp_path)
    assert main(["curate", str(recipe), "-q"]) == 0
    out = tmp_path / "out"
    manifest = json.loads((out / "curation.json").read_text())
    ledger = manifest["ledger"]
    assert ledger["read"] == 4
    assert ledger["created"] == ledger["kept"] + ledger["dropped"]
    assert ledger["drops_by_reason"] == {"02_score_range:score_below_min": 1}
    # one pair: the csat-5 top-up answer over the csat-1 one (margin 2); the csat-1 chat is not SFT data
    prefs = _all_rows(out, "preference")
    assert len(prefs) == 1
    assert prefs[0]["chosen"][0]["content"].startswith("Open the app")
    assert prefs[0]["rejected"][0]["content"].startswith("Not sure")
    assert prefs[0]["prompt"] == [{"role": "user", "content": "How do I top up my prepaid SIM card online?"}]
    sft = _all_rows(out, "instruction")
    assert len(sft) == 3 and all(r["messages"][-1]["role"] == "assistant" for r in sft)
    for kind in ("instruction", "preference"):
        hf = datasets.load_from_disk(str(out / kind / "hf"))
        for split, ds in hf.items():
            assert ds.to_list() == _read_jsonl(out / kind / f"{split}.jsonl")
            assert datasets.Dataset.from_parquet(str(out / kind / f"{split}.parquet")).to_list() == ds.to_list()
    rejects = _read_jsonl(out / "rejects.jsonl")
    assert [(r["step"], r["reason"]) for r in rejects] == [("02_score_range", "score_below_min")]
    card = (out / "README.md").read_text()
    assert "config_name: preference" in card and "score_below_min" in card
    assert f"rlhf curate {recipe} -q" in card


def test_malformed_line_names_file_and_line_then_skip_quarantines_it(tmp_path, capsys):
    lines = [json.dumps(CHATS[0]), '{"conversation_id": "c9", "turns": [', json.dumps(CHATS[2])]
    recipe = _setup(tmp_path, lines)
    assert main(["curate", str(recipe), "-q"]) == 2
    err = capsys.readouterr().err
    assert "chats.jsonl:2: malformed JSON" in err and "Traceback" not in err
    assert main(["curate", str(recipe), "-q", "--on-error", "skip"]) == 0
    rejects = _read_jsonl(tmp_path / "out" / "rejects.jsonl")
    quarantined = [r for r in rejects if r["reason"] == "malformed_json"]
    assert len(quarantined) == 1
    assert quarantined[0]["record"]["raw"] == '{"conversation_id": "c9", "turns": ['
    assert quarantined[0]["record"]["lineage"]["row"] == 2
    ledger = json.loads((tmp_path / "out" / "curation.json").read_text())["ledger"]
    assert ledger["read"] == 3 and ledger["created"] == ledger["kept"] + ledger["dropped"]


@pytest.mark.parametrize("content, message", [
    ([json.dumps({"id": "x", "dialog": []})], "missing column.*'turns'.*columns that exist are: 'id', 'dialog'"),
    ([""], "no records read from chats.jsonl"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, content, message):
    recipe = _setup(tmp_path, content)
    assert main(["curate", str(recipe), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    import re

    assert re.search(message, err), err


def test_unknown_step_option_lists_the_known_ones(tmp_path, capsys):
    recipe = _setup(tmp_path)
    assert main(["curate", str(recipe), "-q", "--set", "steps.split.test_fraction=0.2"]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) test_fraction; known keys:" in err and "test_size" in err


def test_num_proc_gives_the_same_files(tmp_path):
    recipe = _setup(tmp_path, [json.dumps({**c, "conversation_id": f"{c['conversation_id']}-{i}"})
                               for i in range(30) for c in CHATS])
    assert main(["curate", str(recipe), "-q", "--out", str(tmp_path / "serial")]) == 0
    assert main(["curate", str(recipe), "-q", "--out", str(tmp_path / "parallel"), "--num-proc", "2"]) == 0
    serial = json.loads((tmp_path / "serial" / "curation.json").read_text())
    parallel = json.loads((tmp_path / "parallel" / "curation.json").read_text())
    assert parallel["ledger"] == serial["ledger"]
    assert parallel["outputs"] == serial["outputs"]  # same files, same SHA-256


def test_list_steps_shows_every_step_with_its_options(capsys):
    from curation.recipe import step_catalogue

    assert main(["curate", "--list-steps"]) == 0
    out = capsys.readouterr().out
    for name in step_catalogue():
        assert f"\n{name}: " in "\n" + out
    assert "    threshold = 0.8" in out  # minhash_dedup's default, read from the dataclass


def test_rlhf_debug_shows_the_traceback(tmp_path, monkeypatch):
    recipe = _setup(tmp_path, [""])
    monkeypatch.setenv("RLHF_DEBUG", "1")
    from curation.steps import CurationError

    with pytest.raises(CurationError, match="no records read"):
        main(["curate", str(recipe), "-q"])
