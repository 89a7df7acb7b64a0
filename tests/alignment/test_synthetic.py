"""The synthetic preference task: its known rule, its curated-folder layout, held-out prompts and determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignment.data import DataConfig, load_split
from alignment.runs import fingerprint_path
from alignment.synthetic import PRODUCTS, make_preference_task, products_in, rule_reward


def _rows(folder: Path, kind: str, split: str) -> list[dict]:
    return [json.loads(line) for line in (folder / kind / f"{split}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return make_preference_task(tmp_path_factory.mktemp("task") / "synthetic", n_train=200, n_test=50)


@pytest.mark.parametrize(("prompt", "response", "expected"), [
    ("Does Gale Unlimited work abroad?", "Gale Unlimited works in Roam Zone 1.", 1.0),
    ("Does Gale Unlimited work abroad?", "gale unlimited works in Roam Zone 1.", 1.0),  # case does not matter
    ("Does Gale Unlimited work abroad?", "Spend Cap works in Roam Zone 1.", 0.0),  # the wrong product
    ("Does Gale Unlimited work abroad?", "It works in Roam Zone 1.", 0.0),  # no product
    ("Does Gale Unlimited work abroad?", "Gale Unlimited and Spend Cap both do.", 0.0),  # listing products games it
    ("Is Breeze Lite cheaper?", "Breeze 30GB is cheaper.", 0.0),  # products sharing a word are told apart
    ("What is Fibre 900?", "Fibre 9000 is our fastest.", 0.0),  # whole names only
    ("How do I top up?", "Open the app and tap Top up.", 0.0),  # the prompt names no product
])
def test_rule_reward_by_hand(prompt, response, expected):
    assert rule_reward(prompt, response) == expected


def test_no_product_name_contains_another():
    assert all(products_in(name) == [name] for name in PRODUCTS)


def test_the_folder_reads_like_a_curated_one_for_every_stage(task):
    manifest = json.loads((task / "curation.json").read_text())
    assert manifest["outputs"]["preference"]["splits"] == {"train": 200, "test": 50}
    assert manifest["outputs"]["instruction"]["splits"] == {"train": 200, "test": 50}
    # the manifest's hashes are those of the files (run records reuse them as dataset fingerprints)
    for rel, digest in manifest["outputs"]["preference"]["files"].items():
        assert fingerprint_path(task / rel) == digest
    cfg = DataConfig(path=str(task))
    assert load_split(cfg, "sft", "train").column_names == ["messages"]
    assert load_split(cfg, "rm", "test").column_names == ["prompt", "chosen", "rejected"]
    assert len(load_split(cfg, "dpo", "train")) == 200


def test_every_pair_follows_the_rule_and_differs_only_in_the_product(task):
    for split in ("train", "test"):
        for row in _rows(task, "preference", split):
            prompt, chosen, rejected = (row[k][-1]["content"] for k in ("prompt", "chosen", "rejected"))
            assert [m["role"] for m in row["prompt"] + row["chosen"]] == ["user", "assistant"]
            assert rule_reward(prompt, chosen) == 1.0 and rule_reward(prompt, rejected) == 0.0
            meta = json.loads(row["meta"])
            assert rejected == chosen.replace(meta["product"], meta["wrong_product"])


def test_instruction_rows_are_the_prompt_with_its_chosen_answer(task):
    for pair, conversation in zip(_rows(task, "preference", "train"), _rows(task, "instruction", "train")):
        assert conversation["messages"] == pair["prompt"] + pair["chosen"]


def test_held_out_prompts_and_question_product_combinations_are_unseen(task):
    def prompts(split):
        return {row["prompt"][0]["content"] for row in _rows(task, "preference", split)}

    def cells(split):
        return {(json.loads(r["meta"])["question"], json.loads(r["meta"])["product"])
                for r in _rows(task, "preference", split)}

    assert len(prompts("train")) == 200 and len(prompts("test")) == 50  # distinct within a split too
    assert not prompts("train") & prompts("test")
    assert not cells("train") & cells("test")
    # ...yet every product is asked about in both splits: only the combination is new
    assert {p for _, p in cells("test")} == {p for _, p in cells("train")} == set(PRODUCTS)


def test_same_arguments_same_bytes_another_seed_other_data(task, tmp_path):
    again = make_preference_task(tmp_path / "again", n_train=200, n_test=50)
    other = make_preference_task(tmp_path / "other", n_train=200, n_test=50, seed=1)
    for rel in ("preference/train.jsonl", "preference/test.jsonl", "instruction/train.jsonl"):
        assert (again / rel).read_bytes() == (task / rel).read_bytes()
        assert (other / rel).read_bytes() != (task / rel).read_bytes()


@pytest.mark.parametrize(("kwargs", "field"), [({"n_train": 0}, "n_train"), ({"n_test": 513}, "n_test"),
                                               ({"n_train": 2000}, "n_train"), ({"n_test": True}, "n_test")])
def test_bad_sizes_name_the_argument(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        make_preference_task(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()  # nothing half-written
