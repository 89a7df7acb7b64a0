"""read_jsonl / read_csv / read_parquet / read_hf_disk on tiny hand-written tables; expected outputs checked by hand."""

from __future__ import annotations

import json

import pytest

from curation.readers.tabular import ReadCsv, ReadHfDisk, ReadJsonl, ReadParquet
from curation.steps import CurationError, InputError
from tests.curation.helpers import run_step


def run(step, base, on_error="fail"):
    return run_step(step, base=base, on_error=on_error)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_jsonl_column_mapping_ids_and_meta(tmp_path):
    write_jsonl(tmp_path / "docs.jsonl", [
        {"doc_id": "kb-1", "body": "Reset the router.", "lang": "en", "extra": 1},
        "",  # blank lines are skipped, but still counted in line numbers
        {"doc_id": "kb-2", "body": "Check the cable.", "lang": "en"},
    ])
    step = ReadJsonl(paths="docs.jsonl", columns={"text": "body", "id": "doc_id"}, meta_columns=["lang"], source="kb")

    records, rejects = run(step, tmp_path)

    assert rejects == []
    assert [(r["text"], r["lineage"]["row"], r["meta"]) for r in records] == [
        ("Reset the router.", 1, {"lang": "en", "source_id": "kb-1"}),
        ("Check the cable.", 3, {"lang": "en", "source_id": "kb-2"}),
    ]
    assert {r["source"] for r in records} == {"kb"}
    assert records[0]["lineage"] == {"path": "docs.jsonl", "row": 1, "parent": None, "chunk": None}
    # The source id is part of our id: the same row with another source id gets another id.
    other = ReadJsonl(paths="docs.jsonl", columns={"text": "body"}, source="kb")
    unmapped, _ = run(other, tmp_path)
    assert records[0]["id"] != unmapped[0]["id"]
    assert [r["id"] for r in run(step, tmp_path)[0]] == [r["id"] for r in records]  # stable on re-reading


def test_malformed_json_line_names_file_and_line(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, '{"text": "broken', {"text": "fine"}])
    with pytest.raises(InputError) as err:
        run(ReadJsonl(paths="d.jsonl"), tmp_path)
    assert err.value.line == 2
    assert str(err.value).startswith(f"{tmp_path / 'd.jsonl'}:2: malformed JSON")


def test_malformed_json_line_is_quarantined_with_on_error_skip(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, '{"text": "broken', '["not", "an", "object"]', {"text": "fine"}])
    step = ReadJsonl(paths="d.jsonl")

    records, rejects = run(step, tmp_path, on_error="skip")

    assert [r["text"] for r in records] == ["ok", "fine"]
    assert [(rec["lineage"]["row"], rec["raw"], reason) for rec, reason in rejects] == [
        (2, '{"text": "broken', "malformed_json"),
        (3, '["not", "an", "object"]', "not_an_object"),
    ]
    assert step.drops == {"malformed_json": 1, "not_an_object": 1}


def test_missing_column_lists_the_columns_that_exist(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"body": "x", "title": "y"}])
    expected = r"d.jsonl:1: missing column\(s\) 'text'; the columns that exist are: 'body', 'title'"
    with pytest.raises(CurationError, match=expected):
        run(ReadJsonl(paths="d.jsonl"), tmp_path)
    with pytest.raises(CurationError, match=r"missing column\(s\) 'topic'"):
        run(ReadJsonl(paths="d.jsonl", columns={"text": "body"}, meta_columns=["topic"]), tmp_path)


def test_column_option_validation():
    with pytest.raises(CurationError, match=r"unknown field\(s\) \['body'\].*text, prompt, completion"):
        ReadJsonl(paths="x", columns={"body": "text"})
    with pytest.raises(CurationError, match="maps no text"):
        ReadJsonl(paths="x", columns={"id": "doc_id"})
    with pytest.raises(CurationError, match="'meta_columns'"):
        ReadJsonl(paths="x", meta_columns="lang")


def test_csv_preference_rows_scores_and_non_utf8(tmp_path):
    rows = ('question,good,bad,rating\n'
            'How do I roam?,Buy a travel pass.,No idea.,4.5\n'
            '"Caf\xe9 wifi, free?",Yes,No,\n')
    (tmp_path / "prefs.csv").write_bytes(rows.encode("cp1252"))
    step = ReadCsv(paths=".", columns={"prompt": "question", "chosen": "good", "rejected": "bad", "score": "rating"})

    records, _ = run(step, tmp_path)

    assert step.counters["non_utf8_files"] == 1
    first, second = records
    assert first["lineage"]["row"] == 2  # the header is line 1
    assert first["prompt"] == [{"role": "user", "content": "How do I roam?"}]
    assert first["chosen"] == [{"role": "assistant", "content": "Buy a travel pass."}]
    assert first["rejected"] == [{"role": "assistant", "content": "No idea."}]
    assert first["score"] == 4.5
    assert second["prompt"][0]["content"] == "Café wifi, free?"
    assert second["score"] is None  # an empty cell is no rating, not an error


def test_csv_messages_as_json_cells_and_bad_values(tmp_path):
    chat = json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    (tmp_path / "chats.csv").write_text(
        'conv,stars\n'
        f'"{chat.replace(chr(34), chr(34) * 2)}",5\n'
        'just text,3\n'
        f'"{chat.replace(chr(34), chr(34) * 2)}",five\n')
    step = ReadCsv(paths="chats.csv", columns={"messages": "conv", "score": "stars"})

    with pytest.raises(InputError, match=r"chats.csv:3: column 'conv' should hold a non-empty list"):
        run(step, tmp_path)
    records, rejects = run(ReadCsv(paths="chats.csv", columns={"messages": "conv", "score": "stars"}), tmp_path,
                           on_error="skip")
    assert [(r["messages"], r["score"]) for r in records] == [(json.loads(chat), 5.0)]
    assert [(rec["lineage"]["row"], reason) for rec, reason in rejects] == [(3, "bad_value"), (4, "bad_value")]
    assert "column 'stars' (mapped to score) is not a number: 'five'" in rejects[1][0]["error"]


def test_parquet_messages_and_bad_roles(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({
        "id": [7, 8],
        "conversation": [
            [{"role": "user", "content": "Is 5G on my plan?"}, {"role": "assistant", "content": "Yes."}],
            [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "hello"}],
        ],
    }), tmp_path / "chats.parquet")
    step = ReadParquet(paths="*.parquet", columns={"messages": "conversation", "id": "id"})

    records, rejects = run(step, tmp_path, on_error="skip")

    assert len(records) == 1
    assert records[0]["messages"] == [{"role": "user", "content": "Is 5G on my plan?"},
                                      {"role": "assistant", "content": "Yes."}]
    assert records[0]["meta"] == {"source_id": 7}
    assert rejects[0][1] == "bad_value"
    assert "message 1 is not a {role, content} message" in rejects[0][0]["error"]


def test_hf_disk_dataset_dict_reads_every_split(tmp_path):
    import datasets

    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"instruction": ["Explain APN", "Define MMS"],
                                             "output": ["An APN is...", "MMS is..."]}),
        "test": datasets.Dataset.from_dict({"instruction": ["What is VoLTE?"], "output": ["Voice over LTE."]}),
    }).save_to_disk(str(tmp_path / "saved" / "telecom"))
    step = ReadHfDisk(paths="saved", columns={"prompt": "instruction", "completion": "output"})

    records, _ = run(step, tmp_path)

    assert sorted((r["prompt"], r["completion"]) for r in records) == [
        ("Define MMS", "MMS is..."), ("Explain APN", "An APN is..."), ("What is VoLTE?", "Voice over LTE.")]
    assert {r["lineage"]["path"] for r in records} == {"saved/telecom"}
    assert sorted(r["lineage"]["row"] for r in records) == [1, 2, 3]


def test_hf_disk_reads_loose_arrow_files_as_arrow(tmp_path):
    import pyarrow as pa

    (tmp_path / "loose").mkdir()
    with pa.ipc.new_stream(str(tmp_path / "loose" / "x.arrow"), pa.schema([("text", pa.string())])) as w:
        w.write_table(pa.table({"text": ["a", "b"]}))
    records, _ = run(ReadHfDisk(paths="loose"), tmp_path)
    assert [r["text"] for r in records] == ["a", "b"]
    assert [r["lineage"]["row"] for r in records] == [1, 2]


def test_row_readers_do_not_mistake_a_saved_dataset_for_json_files(tmp_path):
    """A save_to_disk folder holds dataset_info.json/state.json: a JSONL reader pointed at a folder containing one
    must skip it, and read_hf_disk pointed at the same parent folder reads the dataset once."""
    import datasets

    datasets.Dataset.from_list([{"text": "from arrow"}]).save_to_disk(str(tmp_path / "data" / "hf"))
    (tmp_path / "data" / "more.jsonl").write_text('{"text": "from jsonl"}\n')
    assert [r["text"] for r in run(ReadJsonl(paths="data"), tmp_path)[0]] == ["from jsonl"]
    assert [r["text"] for r in run(ReadHfDisk(paths="data"), tmp_path)[0]] == ["from arrow"]
