"""``feedback.push`` against the real embedded Argilla server: dataset layout, stable ids, re-push without duplicates
and with annotators' rankings kept, layout conflicts, settings updates, curate/generate inputs, bad input, recipes,
and reward-model suggestions from a real tiny ``rlhf align rm`` run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from feedback.client import ArgillaConfig, FeedbackError, Rest
from feedback.dataset import DatasetSpec, record_id, render_prompt
from feedback.push import PushConfig, SuggestionsConfig, input_files, load_config, read_items, run
from rlhf.config import ConfigError

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "telecom"
CHAT = [{"role": "system", "content": "You are Northwind support."},
        {"role": "user", "content": "How do I get my PAC code?"}]


def _row(i: int, prompt, candidates: list[str], model: str = "tiny-sft") -> dict:
    return {"id": f"gen-{i}", "source": "generate:telecom", "lineage": {"path": None, "row": i},
            "prompt": prompt, "candidates": [{"content": c} for c in candidates],
            "meta": {"model": model, "run": "out/runs/sft", "topic": "porting"}}


def _rows() -> list[dict]:
    return [
        _row(0, "How do I top up?", ["Use the app.", "Dial *100#.", "Visit a shop."]),
        _row(1, CHAT, ["Text PAC to 65075.", "Call us.", "You cannot."]),
        _row(2, "Is 5G included?", ["Yes, on Gale.", "No.", "Only in London."]),
        _row(3, "Too few?", ["Only one.", "And two."]),  # k=3: skipped
        _row(4, "How do I top up?", ["Use the app.", "Dial *100#.", "Visit a shop."]),  # same item as row 0
    ]


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(server, inp, name: str, **dataset) -> PushConfig:
    srv, _ = server
    spec = DatasetSpec(name=name, **{"k": 3, **dataset})
    # only `home`: the embedded server's own state and owner key are the default connection
    return PushConfig(dataset=spec, input=str(inp), argilla=ArgillaConfig(workspace="push-tests", home=str(srv.home)))


def _records(client, name: str) -> dict:
    ds = client.datasets(name, workspace="push-tests")
    return {r.id: r for r in ds.records}


def _submit_ranking(client, record_uuid, order: list[str]) -> None:
    Rest(client).post(f"/api/v1/records/{record_uuid}/responses", json={
        "status": "submitted", "values": {"ranking": {"value": [
            {"value": v, "rank": rank} for rank, v in enumerate(order, start=1)]}}})


def _ranking_responses(client, record_uuid) -> list:
    return [r["values"]["ranking"]["value"] for r in Rest(client).get(f"/api/v1/records/{record_uuid}")["responses"]]


def test_push_creates_the_dataset_and_a_repush_keeps_rankings(argilla_server, client, tmp_path):
    guidelines = tmp_path / "guidelines.md"
    guidelines.write_text("Rank by correctness.")
    inp = _write(tmp_path / "gen" / "candidates.jsonl", _rows())
    cfg = _cfg(argilla_server, tmp_path / "gen", "push-main", rating=True, correction=True,
               guidelines=str(guidelines), min_submitted=2)
    first = run(cfg, log=lambda m: None)
    assert first["created"] and first["records"] == {"read": 5, "pushed": 3, "new": 3, "updated": 0, "unchanged": 0}
    assert first["skipped"] == {"fewer_than_3_candidates": 1, "duplicate": 1}
    assert first["url"] == f"{argilla_server[1].api_url}/dataset/{first['id']}/annotation-mode"

    ds = client.datasets("push-main", workspace="push-tests")
    assert [f.name for f in ds.settings.fields] == ["prompt", "response_1", "response_2", "response_3"]
    assert [(q.name, q.type) for q in ds.settings.questions] == [
        ("ranking", "ranking"), ("rating", "rating"), ("correction", "text")]
    assert ds.settings.guidelines == "Rank by correctness." and ds.settings.distribution.min_submitted == 2

    records = _records(client, "push-main")
    chat_id = record_id(CHAT, ["Text PAC to 65075.", "Call us.", "You cannot."])
    assert set(records) == {record_id("How do I top up?", ["Use the app.", "Dial *100#.", "Visit a shop."]),
                            chat_id, record_id("Is 5G included?", ["Yes, on Gale.", "No.", "Only in London."])}
    chat = records[chat_id]
    assert chat.fields["prompt"] == render_prompt(CHAT) and chat.fields["response_1"] == "Text PAC to 65075."
    assert {k: chat.metadata[k] for k in ("source", "model", "run", "source_id")} == {
        "source": "generate:telecom", "model": "tiny-sft", "run": "out/runs/sft", "source_id": "gen-1"}
    assert json.loads(chat.metadata["prompt_json"]) == CHAT

    # an annotator ranks one record; pushing the same input again changes nothing
    _submit_ranking(client, chat._server_id, ["response_1", "response_2", "response_3"])
    again = run(cfg, log=lambda m: None)
    assert not again["created"] and again["id"] == first["id"] and again["settings_updated"] == []
    assert again["records"] == {"read": 5, "pushed": 0, "new": 0, "updated": 0, "unchanged": 3}

    # new metadata for the ranked record and one new record: the ranked record is re-sent, its ranking survives
    rows = _rows()
    rows[1]["meta"]["model"] = "tiny-dpo"
    rows.append(_row(5, "Can I keep my number?", ["Yes, with a PAC.", "No.", "Maybe."]))
    _write(inp, rows)
    third = run(cfg, log=lambda m: None)
    assert third["records"] == {"read": 6, "pushed": 2, "new": 1, "updated": 1, "unchanged": 2}
    records = _records(client, "push-main")
    assert len(records) == 4 and records[chat_id].metadata["model"] == "tiny-dpo"
    assert _ranking_responses(client, records[chat_id]._server_id) == [[
        {"value": "response_1", "rank": 1}, {"value": "response_2", "rank": 2}, {"value": "response_3", "rank": 3}]]


def test_existing_dataset_with_another_layout_is_refused(argilla_server, client, tmp_path):
    inp = _write(tmp_path / "a.jsonl", _rows()[:3])
    run(_cfg(argilla_server, inp, "push-layout"), log=lambda m: None)
    rows = [_row(i, f"Question {i}?", ["a", "b", "c", "d"]) for i in range(2)]
    with pytest.raises(FeedbackError) as e:
        run(_cfg(argilla_server, _write(tmp_path / "b.jsonl", rows), "push-layout", k=4, rating=True),
            log=lambda m: None)
    msg = str(e.value)
    assert "'push-layout' exists with another layout" in msg
    assert "field response_4 is missing" in msg and "question rating is missing" in msg
    assert "question ranking is ranking ['response_1', 'response_2', 'response_3'], the recipe wants ranking " \
           "['response_1', 'response_2', 'response_3', 'response_4']" in msg
    assert len(_records(client, "push-layout")) == 3  # nothing was pushed


def test_guidelines_overlap_and_metadata_filters_are_updated(argilla_server, client, tmp_path):
    inp = _write(tmp_path / "a.jsonl", _rows()[:3])
    guidelines = tmp_path / "g.md"
    guidelines.write_text("v1")
    run(_cfg(argilla_server, inp, "push-settings", guidelines=str(guidelines)), log=lambda m: None)
    guidelines.write_text("v2: prefer correct answers")
    out = run(_cfg(argilla_server, inp, "push-settings", guidelines=str(guidelines), min_submitted=3,
                   extra_metadata=["topic"]), log=lambda m: None)
    assert out["settings_updated"] == ["guidelines", "min_submitted", "metadata topic"]
    # the new filter is filled on records that are re-sent: their metadata changed, so they count as updated
    assert out["records"]["updated"] == 3
    ds = client.datasets("push-settings", workspace="push-tests")
    assert ds.settings.guidelines == "v2: prefer correct answers" and ds.settings.distribution.min_submitted == 3
    assert "topic" in [m.name for m in ds.settings.metadata]
    assert {r.metadata["topic"] for r in ds.records} == {"porting"}


def test_curate_output_is_read_once_in_one_format(tmp_path):
    """A curate folder holds the same rows as JSONL and Parquet: one format is read, and record ids do not depend on
    it (pyarrow gives every message struct the union of keys, nulls included; the prompt keeps role and content)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.writers import DatasetWriter

    rows = [{**r, "prompt": [{"role": "user", "content": r["prompt"]}] if isinstance(r["prompt"], str) else r["prompt"],
             "candidates": [{**c, "rank": n, "score": None} for n, c in enumerate(r["candidates"], 1)]}
            for r in _rows()[:3]]
    writer = DatasetWriter(tmp_path / "cur", ["jsonl", "parquet"])
    for row in rows:
        writer.write({**row, "split": "train"})
    writer.close()
    cfg = PushConfig(dataset=DatasetSpec(name="x", k=3), input=str(tmp_path / "cur"))
    assert [p.name for p in input_files(cfg)] == ["train.jsonl"]
    jsonl = read_items(input_files(cfg))
    assert len(jsonl) == 3 and jsonl[1].meta["model"] == "tiny-sft"  # curate's meta is a JSON string
    ids = [record_id(i.prompt, i.candidates) for i in jsonl]
    for f in (tmp_path / "cur" / "ranking").glob("*.jsonl"):
        f.unlink()
    assert [p.name for p in input_files(cfg)] == ["train.parquet"]
    assert [record_id(i.prompt, i.candidates) for i in read_items(input_files(cfg))] == ids

    rows[2]["prompt"] = [{**rows[2]["prompt"][0], "name": "Ana"}]  # -> name: null in every other message
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "named.parquet")
    named = read_items(input_files(PushConfig(dataset=cfg.dataset, input=str(tmp_path / "named.parquet"))))
    assert [record_id(i.prompt, i.candidates) for i in named] == ids


def test_bad_input_names_file_and_line(tmp_path):
    def items(text: str):
        path = tmp_path / "bad.jsonl"
        path.write_text(text)
        return read_items(input_files(PushConfig(dataset=DatasetSpec(name="x"), input=str(path))))

    good = json.dumps(_rows()[0])
    with pytest.raises(FeedbackError, match=r"bad\.jsonl:2: malformed JSON"):
        items(good + "\n{not json\n")
    ends_with_assistant = _row(1, [*CHAT, {"role": "assistant", "content": "Hi"}], ["a", "b"])
    with pytest.raises(FeedbackError, match=r"bad\.jsonl:2: prompt: the last message must be a user turn"):
        items(good + "\n" + json.dumps(ends_with_assistant) + "\n")
    with pytest.raises(FeedbackError, match=r"bad\.jsonl:1: candidates: expected a list of \{content, \.\.\.\}"):
        items(json.dumps({"prompt": "Hi?", "candidates": ["a", "b"]}))
    missing = tmp_path / "nope" / "candidates.jsonl"
    with pytest.raises(FeedbackError, match=f"input: input not found: {missing}"):
        input_files(PushConfig(dataset=DatasetSpec(name="x"), input=str(missing)))


def test_recipe_loads_resolves_paths_and_names_bad_fields(tmp_path):
    cfg = load_config(SAMPLES / "feedback.yaml")
    assert (cfg.dataset.name, cfg.dataset.k, cfg.dataset.min_submitted) == ("telecom-ranking", 4, 2)
    assert cfg.dataset.rating and cfg.dataset.correction and cfg.argilla.workspace == "telecom"
    # paths are the working directory's, like generate's output_dir (out/feedback/candidates) it reads
    root = SAMPLES.parents[1]
    assert (root / cfg.dataset.guidelines).read_text().startswith("# Ranking Northwind Mobile support answers")
    assert cfg.input == "out/feedback/candidates" and cfg.resolve(cfg.input) == Path("out/feedback/candidates")
    moved = load_config(SAMPLES / "feedback.yaml", ["dataset.k=3", "base_dir=/data"])
    assert moved.dataset.k == 3 and moved.resolve(cfg.input) == Path("/data/out/feedback/candidates")
    assert moved.resolve("/abs/x.jsonl") == Path("/abs/x.jsonl")
    with pytest.raises(ConfigError, match=r"feedback\.yaml\.dataset: k: a ranking needs 2\.\.20 candidates, got 1"):
        load_config(SAMPLES / "feedback.yaml", ["dataset.k=1"])
    with pytest.raises(ConfigError, match=r"feedback\.yaml\.suggestions: agent: .* got 'rm\+v2'"):
        load_config(SAMPLES / "feedback.yaml", ["suggestions.reward_run=x", "suggestions.agent=rm+v2"])
    with pytest.raises(ConfigError, match=r"feedback\.yaml: unknown key\(s\) inputs; known keys: argilla, base_dir"):
        load_config(SAMPLES / "feedback.yaml", ["inputs=x"])
    with pytest.raises(ConfigError, match=r"feedback\.yaml: input: expected a path or a list of paths, got \[\]"):
        load_config(SAMPLES / "feedback.yaml", ["input=[]"])


def test_a_key_that_may_not_create_datasets_is_one_line(argilla_server, client, tmp_path):
    """An annotator's API key: the SDK's 403 comes back as a FeedbackError naming the server, without the key."""
    from feedback.annotators import add_annotator

    srv, creds = argilla_server
    _, path = add_annotator(client, "push-annotator", "push-tests", home=srv.home)
    key = json.loads(path.read_text())["api_key"]
    cfg = _cfg(argilla_server, _write(tmp_path / "a.jsonl", _rows()[:3]), "push-forbidden")
    cfg.argilla = ArgillaConfig(api_url=creds.api_url, api_key=key, workspace="push-tests")
    with pytest.raises(FeedbackError, match=f"Argilla at {creds.api_url}: .*not authorized to create a dataset") as e:
        run(cfg, log=lambda m: None)
    assert key not in str(e.value) and "\n" not in str(e.value)


def test_missing_guidelines_file_is_named(argilla_server, tmp_path):
    inp = _write(tmp_path / "a.jsonl", _rows()[:3])
    with pytest.raises(FeedbackError, match=f"dataset.guidelines: cannot read {tmp_path / 'none.md'}"):
        run(_cfg(argilla_server, inp, "push-guidelines", guidelines=str(tmp_path / "none.md")), log=lambda m: None)


# ------------------------------------------------------------------------------------------- suggestions
KEYWORD = "sorry"
WORDS = "open the app tap settings then choose your plan and check the page for details it can take a day".split()
ASKS = ("How do I set up {}?", "Why is {} not working?", "Can you explain {}?")
TOPICS = ("roaming", "my bill", "an eSIM", "broadband", "voicemail", "my data", "my router", "the app")


def _reply(rng: random.Random, keyword: bool) -> str:
    body = rng.sample(WORDS, 8)
    body.insert(rng.randrange(len(body) + 1), KEYWORD if keyword else rng.choice(WORDS))
    return " ".join(body) + "."


def _ask(rng: random.Random) -> list[dict]:
    return [{"role": "user", "content": rng.choice(ASKS).format(rng.choice(TOPICS))}]


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory) -> Path:
    """A real `rlhf align rm` run on the tiny model: chosen replies say KEYWORD, rejected ones do not (about 10 s)."""
    import torch

    from alignment import reward
    from alignment.models import build_tiny_model

    torch.set_num_threads(1)  # tiny model: extra threads only contend on a shared 2-core box
    root = tmp_path_factory.mktemp("rm")
    raw = SAMPLES / "raw"
    model = build_tiny_model(root / "tiny", [*sorted((raw / "docs").glob("*.md")), raw / "chats" / "transcripts.jsonl"])
    rng = random.Random(0)
    pairs = [{"prompt": _ask(rng), "chosen": [{"role": "assistant", "content": _reply(rng, True)}],
              "rejected": [{"role": "assistant", "content": _reply(rng, False)}]} for _ in range(64)]
    _write(root / "pairs" / "train.jsonl", pairs)
    cfg = reward.Config(model={"name_or_path": str(model)}, data=[{"path": str(root / "pairs")}],
                        output_dir=str(root / "telecom-rm"), peft={"method": "lora", "r": 8},
                        train={"max_steps": 30, "batch_size": 8, "max_length": 128, "learning_rate": 1e-2,
                               "logging_steps": 10, "save_steps": 100})
    return reward.run(cfg)


def test_reward_model_suggestions_rank_candidates(argilla_server, client, tmp_path, reward_run):
    from alignment.models import ModelConfig, load_sequence_classifier, load_tokenizer
    from alignment.reward import score

    rng = random.Random(1)
    rows = []
    for i in range(12):
        replies = [_reply(rng, False), _reply(rng, False), _reply(rng, True)]
        rng.shuffle(replies)
        rows.append(_row(i, _ask(rng), replies))
    cfg = _cfg(argilla_server, _write(tmp_path / "c.jsonl", rows), "push-suggest")
    cfg.suggestions = SuggestionsConfig(reward_run=str(reward_run))
    out = run(cfg, log=lambda m: None)
    assert out["suggestions"] == {"agent": "telecom-rm", "records": 12} and out["records"]["new"] == 12

    # the suggestion is the reward model's own ranking, computed here independently, with explicit ranks
    tokenizer = load_tokenizer(ModelConfig(str(reward_run)))
    model = load_sequence_classifier(ModelConfig(str(reward_run)), tokenizer)
    records, rest, top_has_keyword = _records(client, "push-suggest"), Rest(client), 0
    for row in rows:
        texts = [c["content"] for c in row["candidates"]]
        rewards = score(model, tokenizer, [row["prompt"] + [{"role": "assistant", "content": t}] for t in texts])
        rid = record_id(row["prompt"], texts)
        (sug,) = rest.get(f"/api/v1/records/{records[rid]._server_id}/suggestions")["items"]
        best_first = sorted(range(3), key=lambda j: -rewards[j])
        assert sug["value"] == [{"value": f"response_{j + 1}", "rank": r} for r, j in enumerate(best_first, 1)]
        assert sug["agent"] == "telecom-rm" and sug["type"] == "model"
        assert abs(sum(sug["score"]) - 1) < 1e-4 and sug["score"] == sorted(sug["score"], reverse=True)
        top_has_keyword += KEYWORD in texts[best_first[0]]
    assert top_has_keyword >= 9  # the model learned the rule (measured: 11/12); a random head: 4, P(>=9) < 0.001

    assert run(cfg, log=lambda m: None)["records"]["unchanged"] == 12  # same model, same scores: nothing re-sent
