"""The public-format readers on small hand-made files in the real formats; every expected value was worked out by
hand from the fixture (tests/curation/fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from curation.pipeline import Pipeline
from curation.readers.oasst import ReadOASST
from curation.readers.public import (
    ReadAlpaca,
    ReadHHRLHF,
    ReadOpenAIChat,
    ReadShareGPT,
    ReadTRLPreference,
)
from curation.steps import CurationError, InputError
from tests.curation.helpers import run_step

FIX = Path(__file__).parent / "fixtures"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def read(step, on_error="fail"):
    """All records of a reader, and its rejects as (record, reason)."""
    return run_step(step, on_error=on_error)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# --- Alpaca ----------------------------------------------------------------------------------------------------------

def test_alpaca_joins_instruction_and_input_and_drops_empty_output():
    records, rejects = read(ReadAlpaca(paths=str(FIX / "alpaca.json")))
    assert [r["messages"] for r in records] == [
        [user("Give three tips for staying healthy."),
         assistant("1. Eat a balanced diet.\n2. Exercise regularly.\n3. Get enough sleep.")],
        [user("Translate the sentence into French.\n\nGood morning, how are you?"),
         assistant("Bonjour, comment allez-vous ?")],
    ]
    assert [r["lineage"]["row"] for r in records] == [1, 2]
    assert records[0]["source"] == "read_alpaca" and records[0]["meta"] == {}
    assert [(rec["lineage"]["row"], reason) for rec, reason in rejects] == [(3, "empty_turn")]
    assert "Write a haiku" in rejects[0][0]["raw"]


def test_alpaca_system_column_and_missing_input(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Define RAM.", "output": "Working memory.", "sys": "Be brief."},
        {"instruction": "Define ROM.", "input": None, "output": "Read-only memory.", "sys": ""},
    ])
    records, _ = read(ReadAlpaca(paths=str(path), system="sys", source="alp"))
    assert [r["messages"] for r in records] == [
        [system("Be brief."), user("Define RAM."), assistant("Working memory.")],
        [user("Define ROM."), assistant("Read-only memory.")],
    ]
    assert records[0]["source"] == "alp"


# --- ShareGPT ---------------------------------------------------------------------------------------------------------

def test_sharegpt_maps_roles_merges_trims_and_drops_tool_turns():
    step = ReadShareGPT(paths=str(FIX / "sharegpt.json"))
    records, rejects = read(step)
    assert [(r["meta"]["source_id"], r["messages"]) for r in records] == [
        ("QWJhY2F_0", [user("What is a prime number?"),
                       assistant("A whole number greater than 1 whose only divisors are 1 and itself."),
                       user("Is 9 prime?"), assistant("No: 9 = 3 x 3.")]),
        ("sys_merge", [system("You are a terse assistant."),
                       user("Convert 10 km to miles.\n\nRound to one decimal."), assistant("6.2 miles.")]),
        ("cut_short", [user("Name a blue fruit."), assistant("Blueberries.")]),
    ]
    assert [(json.loads(rec["raw"])["id"], reason) for rec, reason in rejects] == [
        ("tool_call", "unsupported_role"), ("gpt_first", "assistant_first")]
    assert "function_call" in rejects[0][0]["error"]
    assert step.counters["merged_turns"] == 1 and step.counters["trailing_turns_trimmed"] == 1


# --- OpenAI chat ------------------------------------------------------------------------------------------------------

def test_openai_chat_joins_text_parts_and_drops_images_and_tools():
    records, rejects = read(ReadOpenAIChat(paths=str(FIX / "openai_chat.jsonl")))
    assert [r["messages"] for r in records] == [
        [system("You are a helpful support agent."), user("How do I reset my router?"),
         assistant("Hold the reset button for 10 seconds.")],
        [user("Summarise this:\nThe meeting moved to Friday."), assistant("The meeting is now on Friday.")],
    ]
    assert [(rec["lineage"]["row"], reason) for rec, reason in rejects] == [
        (3, "non_text_content"), (4, "tool_call"), (5, "unsupported_role")]
    assert rejects[0][0]["error"] == "messages[0].content[1] is a 'image_url' part"


# --- TRL preference ---------------------------------------------------------------------------------------------------

def test_trl_preference_all_row_shapes_become_conversational():
    records, rejects = read(ReadTRLPreference(paths=str(FIX / "trl_preference.jsonl"), id_field="prompt_id"))
    got = [(r["lineage"]["row"], r["prompt"], r["chosen"], r["rejected"], r["meta"]) for r in records]
    assert got == [
        (1, [user("The sky is")], [assistant(" blue.")], [assistant(" green.")],
         {"score_chosen": 9.0, "score_rejected": 2.0}),
        (2, [system("Answer briefly."), user("What color is the sky?")], [assistant("It is blue.")],
         [assistant("It is green.")], {}),
        # implicit prompt: the three shared turns
        (3, [user("Hi, I need a recipe."), assistant("Sure, for what dish?"), user("Pancakes.")],
         [assistant("Mix flour, milk and eggs, then fry.")], [assistant("Pancakes are unhealthy.")], {}),
        # UltraFeedback-binarized style: the plain prompt repeats the conversations' first turn, so it is not doubled
        (5, [user("Name a prime number.")], [assistant("7")], [assistant("9")],
         {"source_id": "a1b2c3", "score_chosen": 8.0, "score_rejected": 3.5}),
    ]
    assert [(rec["lineage"]["row"], reason) for rec, reason in rejects] == [(4, "no_shared_prompt")]


def test_trl_replies_differing_only_in_white_space_are_identical(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Sky?", "chosen": "Blue.", "rejected": " Blue.\n"},
                                              {"prompt": "Sky?", "chosen": "Blue.", "rejected": "Grey."}])
    records, rejects = read(ReadTRLPreference(paths=str(path)))
    assert [r["rejected"] for r in records] == [[assistant("Grey.")]]
    assert [(rec["lineage"]["row"], reason) for rec, reason in rejects] == [(1, "identical_responses")]


def test_trl_plain_text_without_prompt_is_an_error_naming_the_line(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"chosen": "Q? A.", "rejected": "Q? B."}])
    with pytest.raises(InputError, match=rf"{path}:1: 'chosen' is plain text and there is no 'prompt'"):
        read(ReadTRLPreference(paths=str(path)))


# --- HH-RLHF ----------------------------------------------------------------------------------------------------------

def test_hh_rlhf_splits_shared_turns_from_final_replies():
    step = ReadHHRLHF(paths="hh_rlhf.jsonl")
    step.base_dir = FIX
    records, rejects = read(step)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in records] == [
        ([user("What is the capital of France?")],
         [assistant("The capital of France is Paris.")], [assistant("I'm not sure, maybe Lyon?")]),
        ([user("Can you help me bake bread at home?"),
          assistant("Sure. Here is what you need:\n\nflour, water, salt and yeast."),
          user("I only have one packet of yeast. Is that enough?")],
         [assistant("Yes, one packet is enough for one loaf. Dissolve it in warm water first.")],
         [assistant("Bread is hard. Just buy some.")]),
    ]
    assert records[1]["lineage"] == {"path": "hh_rlhf.jsonl", "row": 2, "parent": None, "chunk": None}
    assert [(rec["lineage"]["row"], reason) for rec, reason in rejects] == [
        (3, "identical_responses"), (4, "no_shared_prompt"), (5, "empty_turn")]


def test_hh_rlhf_ledger_reconciles_in_a_pipeline():
    rejects = []
    pipeline = Pipeline([ReadHHRLHF(paths=str(FIX / "hh_rlhf.jsonl"))],
                        sink=lambda rec, label, reason: rejects.append(reason))
    assert len(list(pipeline.run())) == 2
    ledger = pipeline.ledger
    ledger.check()
    assert (ledger.read, ledger.kept, ledger.dropped) == (5, 2, 3)
    assert len(rejects) == 3


# --- OpenAssistant ----------------------------------------------------------------------------------------------------

EGG = "How do I boil an egg?"
NINE = "Put it in boiling water for nine minutes, then cool it in cold water."


def _oasst_expected():
    return [
        ([user(EGG)], [(NINE, 1), ("Microwave it for five minutes.", 2)]),
        ([user(EGG), assistant(NINE), user("How do I peel it without breaking it?")],
         [("Roll it on the counter to crack the shell, then peel it under running water.", 1), ("Peel it slowly.", 2)]),
        ([user("Wie spät ist es?")], [("Schau auf die Uhr: ich kann sie nicht sehen.", 1), ("Ich weiß es nicht.", 2)]),
    ]


def _shape(record):
    assert all(c["score"] is None for c in record["candidates"])
    return record["prompt"], [(c["content"], c["rank"]) for c in record["candidates"]]


def test_oasst_trees_one_record_per_ranked_sibling_set():
    step = ReadOASST(paths=str(FIX / "oasst_tree.jsonl"))
    records, rejects = read(step)
    assert [_shape(r) for r in records] == _oasst_expected()
    assert records[1]["meta"] == {
        "source_id": "6708c47f-05c9-4346-b3d2-40b2bd24fde4", "message_tree_id": "6ab24d72-0181-4594-a9cd-deaf170242fb",
        "lang": "en", "candidate_ids": ["18145bf4-37fd-4ac0-80f5-6108b5f2b365", "343ee2d4-87ae-41fd-a768-bdd65959dc4a"]}
    assert [r["lineage"]["row"] for r in records] == [1, 1, 2]
    assert rejects == []
    # "Boil it." and "You're welcome!" have no rank; the deleted spam reply is counted apart
    assert step.counters["unranked_replies"] == 2 and step.counters["deleted_messages"] == 1


def test_oasst_lang_filter_drops_other_languages():
    records, rejects = read(ReadOASST(paths=str(FIX / "oasst_tree.jsonl"), lang="en"))
    assert [_shape(r) for r in records] == _oasst_expected()[:2]
    assert [(rec["meta"]["lang"], reason) for rec, reason in rejects] == [("de", "language_not_selected")]


def _flatten(tree: dict) -> list[dict]:
    """The oasst1 layout of a tree: one row per message, linked by parent_id."""
    rows, stack = [], [tree["prompt"]]
    while stack:
        node = stack.pop()
        rows.append({**{k: v for k, v in node.items() if k != "replies"}, "message_tree_id": tree["message_tree_id"]})
        stack.extend(node["replies"])
    return rows


def test_oasst_flat_messages_are_rebuilt_into_the_same_trees(tmp_path):
    trees = [json.loads(line) for line in (FIX / "oasst_tree.jsonl").read_text(encoding="utf-8").splitlines()]
    rows = [row for tree in trees for row in _flatten(tree)][::-1]  # replies before their parents
    rows.append({"message_id": "lost", "parent_id": "not-in-this-file", "role": "assistant", "text": "orphan"})
    step = ReadOASST(paths=str(write_jsonl(tmp_path / "oasst1.jsonl", rows)))
    records, _ = read(step)
    assert sorted(map(_shape, records), key=repr) == sorted(_oasst_expected(), key=repr)
    peel = next(r for r in records if len(r["prompt"]) == 3)
    assert rows[peel["lineage"]["row"] - 1]["text"] == "How do I peel it without breaking it?"
    assert step.counters["orphan_messages"] == 1 and step.counters["unranked_replies"] == 2


def test_oasst_malformed_tree_is_quarantined_whole(tmp_path):
    good, bad = (FIX / "oasst_tree.jsonl").read_text(encoding="utf-8").splitlines()
    bad = bad.replace('"rank": 1,', '"rank": "first",')
    path = write_jsonl(tmp_path / "t.jsonl", [good, bad])
    with pytest.raises(InputError, match=rf"{path}:2: rank 'first' of message '4f5a6b7c"):
        read(ReadOASST(paths=str(path)))
    records, rejects = read(ReadOASST(paths=str(path)), on_error="skip")
    assert len(records) == 2
    assert [(rec["lineage"]["row"], reason) for rec, reason in rejects] == [(2, "malformed_row")]


# --- errors shared by every reader ------------------------------------------------------------------------------------

def test_malformed_json_line_names_file_and_line_or_goes_to_rejects(tmp_path):
    good = (FIX / "hh_rlhf.jsonl").read_text(encoding="utf-8").splitlines()[0]
    path = write_jsonl(tmp_path / "hh.jsonl", [good, '{"chosen": "\\n\\nHuman: hi'])
    with pytest.raises(InputError, match=rf"{path}:2: malformed JSON"):
        read(ReadHHRLHF(paths=str(path)))
    records, rejects = read(ReadHHRLHF(paths=str(path)), on_error="skip")
    assert len(records) == 1
    assert [(rec["lineage"]["row"], reason) for rec, reason in rejects] == [(2, "malformed_json")]


def test_malformed_field_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"conversations": [{"from": "human"}]},
    ])
    with pytest.raises(InputError, match=rf"{path}:2: conversations\[0\] has no 'value' \(it has 'from'\)"):
        read(ReadShareGPT(paths=str(path)))
    records, rejects = read(ReadShareGPT(paths=str(path)), on_error="skip")
    assert [r["messages"] for r in records] == [[user("Hi"), assistant("Hello")]]
    assert [(rec["lineage"]["row"], reason) for rec, reason in rejects] == [(2, "malformed_row")]


@pytest.mark.parametrize("cls, missing", [
    (ReadAlpaca, "'instruction', 'output'"), (ReadShareGPT, "'conversations'"), (ReadOpenAIChat, "'messages'"),
    (ReadTRLPreference, "'chosen', 'rejected'"), (ReadHHRLHF, "'chosen', 'rejected'"),
    (ReadOASST, "'message_id', 'parent_id', 'role', 'text'"),
])
def test_missing_column_lists_the_columns_that_exist(tmp_path, cls, missing):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(CurationError) as err:
        read(cls(paths=str(path)))
    assert str(err.value) == (f"{path}:1: missing column(s) {missing}; "
                              "the columns that exist are: 'question', 'answer'")


@pytest.mark.parametrize("make, field", [
    (lambda: ReadAlpaca(paths=""), "paths"),
    (lambda: ReadShareGPT(paths="x.json", id_field=3), "id_field"),
    (lambda: ReadShareGPT(paths="x.json", column=["conversations"]), "column"),
    (lambda: ReadOASST(paths="x.jsonl", lang=["en", 5]), "lang"),
])
def test_bad_options_name_the_field(make, field):
    with pytest.raises(CurationError, match=f"'{field}'"):
        make()
