import json

import pytest

from curation.decontam import Decontaminate
from curation.steps import CurationError, InputError
from tests.curation.helpers import run_step as run

# 20 words: 8 distinct 13-grams.
QUESTION = ("Which element has the atomic number seventy nine and was prized by ancient Egyptian "
            "goldsmiths for its lasting bright shine")
SHORT = "What is the capital of France?"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_step(tmp_path, **options):
    step = Decontaminate(**{"eval_paths": ["eval.jsonl"], **options})
    step.base_dir = tmp_path
    return step


@pytest.fixture
def eval_dir(tmp_path):
    write_jsonl(tmp_path / "eval.jsonl", [{"question": QUESTION, "answer": "Gold", "id": 7},
                                          {"messages": [{"role": "user", "content": SHORT}]}])
    return tmp_path


def test_planted_13_gram_dropped_and_clean_record_kept(eval_dir):
    q = QUESTION.split()
    records = [
        {"id": "planted", "text": "Trivia night notes: " + " ".join(q[3:16]).upper() + " -- then we ate pizza."},
        {"id": "twelve", "text": "Trivia night notes: " + " ".join(q[3:15]) + " -- then we ate pizza."},
        {"id": "clean", "text": "Gold is a soft yellow metal used in jewellery and electronics since antiquity."},
        {"id": "short", "messages": [{"role": "user", "content": "what is the capital of france"},
                                     {"role": "assistant", "content": "Paris is the capital of France."}]},
    ]
    step = make_step(eval_dir)
    kept, rejects = run(step, records)
    assert [r["id"] for r in kept] == ["twelve", "clean"]  # 12 shared words are not a 13-gram
    assert [(r["id"], r["meta"]["contaminated_ngrams"], why) for r, why in rejects] == [
        ("planted", 1, "contaminated"), ("short", 1, "contaminated")]
    assert "meta" not in records[0]
    # 8 n-grams of the question, 1 for the short question, 1 for "Gold"; the integer id is not text.
    assert step.counters["eval_ngrams"] == 10


def test_min_overlap_and_eval_fields(eval_dir):
    q = QUESTION.split()
    records = [{"id": "one", "text": "x " + " ".join(q[0:13]) + " y"},
               {"id": "two", "text": "x " + " ".join(q[0:14]) + " y"},
               {"id": "gold", "text": "Gold"}]
    step = make_step(eval_dir, min_overlap=2, eval_fields=["question"])
    kept, rejects = run(step, records)
    assert [r["id"] for r in kept] == ["one", "gold"]  # "gold" matches the answer field, which is not listed
    assert [(r["id"], r["meta"]["contaminated_ngrams"]) for r, _ in rejects] == [("two", 2)]
    assert step.counters["eval_ngrams"] == 8


def test_txt_and_json_eval_files(tmp_path):
    (tmp_path / "prompts.txt").write_text(f"{SHORT}\n\n{QUESTION}\n", encoding="utf-8")
    (tmp_path / "set.json").write_text(json.dumps([{"prompt": "Name the largest planet in our solar system"}]),
                                       encoding="utf-8")
    step = make_step(tmp_path, eval_paths=["prompts.txt", "set.json"])
    kept, rejects = run(step, [{"id": "a", "prompt": "name the largest planet in our solar system",
                                "completion": "Jupiter."},
                               {"id": "b", "text": "What is the capital of France?"},
                               {"id": "c", "text": "What is the capital of Spain?"}])
    assert [r["id"] for r in kept] == ["c"]
    assert step.counters["eval_ngrams"] == 8 + 1 + 1


def test_missing_or_empty_eval_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(CurationError, match="input not found: .*nope.jsonl"):
        run(make_step(tmp_path, eval_paths=["nope.jsonl"]), [])
    write_jsonl(tmp_path / "eval.jsonl", [{"label": 1}, {"question": "  "}])
    with pytest.raises(CurationError, match="eval file .*eval.jsonl holds no text"):
        run(make_step(tmp_path), [])
    write_jsonl(tmp_path / "eval.jsonl", [{"question": QUESTION}])
    with pytest.raises(CurationError, match="holds no text in fields prompt"):
        run(make_step(tmp_path, eval_fields=["prompt"]), [])


def test_malformed_jsonl_names_file_and_line(tmp_path):
    (tmp_path / "eval.jsonl").write_text(json.dumps({"q": QUESTION}) + "\n\n{broken\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"eval.jsonl:3: malformed JSON"):
        run(make_step(tmp_path), [])


def test_options_validated():
    with pytest.raises(CurationError, match="eval_paths must name at least one eval file"):
        Decontaminate()
    with pytest.raises(CurationError, match="ngram must be a positive integer, got 0"):
        Decontaminate(eval_paths="e.jsonl", ngram=0)
    with pytest.raises(CurationError, match="eval_fields must be a list of field names"):
        Decontaminate(eval_paths="e.jsonl", eval_fields=[1])
