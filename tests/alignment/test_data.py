"""Datasets for the stages come from files in TRL formats: curated folders, kind folders, plain files, mixtures."""

from __future__ import annotations

import json

import pytest

from alignment.data import DataConfig, load_mixture, load_split
from curation.writers import DatasetWriter


def _conv(i, split="train"):
    return {"id": f"c{i}", "source": "t", "lineage": {"path": "x", "row": i, "parent": None, "chunk": None},
            "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
            "split": split}


def _pair(i, split="train"):
    return {"id": f"p{i}", "prompt": [{"role": "user", "content": f"q{i}"}],
            "chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "bad"}],
            "split": split}


def _curated(tmp_path, records, name="cur"):
    out = tmp_path / name
    writer = DatasetWriter(out, ["jsonl", "parquet", "datasets"])
    for r in records:
        writer.write(r)
    writer.close()
    (out / "curation.json").write_text("{}")
    return out


def test_curated_folder_gives_each_stage_its_kind_and_only_trl_columns(tmp_path):
    out = _curated(tmp_path, [_conv(i) for i in range(6)] + [_conv(9, "test")] + [_pair(i) for i in range(4)])
    sft = load_split(DataConfig(str(out)), "sft", "train")
    assert sft.column_names == ["messages"] and len(sft) == 6
    assert load_split(DataConfig(str(out)), "sft", "test")[0]["messages"][0]["content"] == "q9"
    dpo = load_split(DataConfig(str(out)), "dpo", "train")
    assert dpo.column_names == ["prompt", "chosen", "rejected"] and len(dpo) == 4
    assert load_split(DataConfig(str(out)), "dpo", "test") is None
    with pytest.raises(FileNotFoundError, match="has no 'ranking' dataset; it has: instruction, preference"):
        load_split(DataConfig(str(out), kind="ranking"), "sft", "train")


def test_plain_files_and_wrong_columns(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}", "x": 1}) for i in range(3)))
    ds = load_split(DataConfig(str(path), max_samples=2), "sft", "train")
    assert ds.column_names == ["prompt", "completion"] and len(ds) == 2
    with pytest.raises(ValueError, match="a dpo dataset needs columns prompt/chosen/rejected; it has prompt, completion, x"):
        load_split(DataConfig(str(path)), "dpo", "train")
    with pytest.raises(FileNotFoundError):
        load_split(DataConfig(str(tmp_path / "nope.jsonl")), "sft", "train")
    with pytest.raises(ValueError, match="weight"):
        DataConfig(str(path), weight=0)


def test_mixture_samples_by_weight_deterministically(tmp_path):
    a = _curated(tmp_path, [_conv(i) for i in range(400)], "a")
    b = _curated(tmp_path, [{**_conv(i), "messages": [{"role": "user", "content": "B"},
                                                     {"role": "assistant", "content": "b"}]} for i in range(400)], "b")
    cfgs = [DataConfig(str(a), weight=3), DataConfig(str(b), weight=1)]
    mixed = load_mixture(cfgs, "sft", seed=0)
    from_b = sum(1 for r in mixed if r["messages"][0]["content"] == "B")
    assert 0.15 < from_b / len(mixed) < 0.35  # weight 1 of 4
    assert load_mixture(cfgs, "sft", seed=0)["messages"] == mixed["messages"]
    assert load_mixture(cfgs, "sft", seed=0, eval=True) is None  # no test split anywhere


def test_an_empty_split_file_is_no_split(tmp_path):
    # a curated kind folder whose test split got no rows (small sets: the split step hashes prompts) has a 0-byte
    # test.jsonl; datasets' JSON builder raised a bare StopIteration on it
    out = tmp_path / "kind"
    out.mkdir()
    (out / "train.jsonl").write_text("".join(json.dumps(_pair(i)) + "\n" for i in range(3)))
    (out / "test.jsonl").write_text("")
    assert load_split(DataConfig(str(out)), "dpo", "test") is None
    assert len(load_split(DataConfig(str(out)), "dpo", "train")) == 3
