"""``feedback.generate`` on the tiny offline model: K candidates per prompt with finish flags and policy log-probs,
seeded determinism, resume, provenance, and a real SFT run folder as the model (field-notes trap 5: it stops)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignment.models import stop_token_ids
from alignment.runs import Run, fingerprint_path, load_run
from curation.records import stable_id
from feedback.client import FeedbackError
from feedback.generate import (
    CANDIDATES,
    MANIFEST,
    GenerateConfig,
    SamplingConfig,
    load_config,
    run,
    sample,
)
from feedback.prompts import chat_prompt, load_prompts, prompt_roots
from rlhf.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SYSTEM = {"role": "system", "content": "You are Northwind Mobile's support assistant."}
QA = [("How do I top up?", "Open the app and tap Top up."),
      ("Is roaming free in Spain?", "Yes, Spain is in Roam Zone 1."),
      ("How do I get a PAC code?", "Text PAC to 65075."),
      ("Why is my bill higher?", "Roaming charges from May.")]


def _conversation(question: str, answer: str) -> list[dict]:
    return [SYSTEM, {"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core CI box extra threads only contend."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The alignment tests' tiny Llama (hidden 64, 2 layers, ChatML with <|im_end|> as eos), random-init."""
    from alignment.models import build_tiny_model

    raw = ROOT / "samples" / "telecom" / "raw"
    files = [*sorted(p for p in (raw / "docs").iterdir() if p.suffix in (".md", ".txt")),
             raw / "chats" / "transcripts.jsonl"]
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), files)


def _sft(model_dir: Path, out: Path, peft: dict, steps: int) -> Path:
    """A finished run of the real SFT stage on the four conversations."""
    from alignment import sft

    data = out.parent / "conv.jsonl"
    data.write_text("".join(json.dumps({"messages": _conversation(q, a)}) + "\n" for q, a in QA * 8))
    return sft.run(sft.Config(model={"name_or_path": str(model_dir)}, data=[{"path": str(data), "eval_split": None}],
                              output_dir=str(out), peft=peft,
                              train={"max_steps": steps, "batch_size": 8, "max_length": 64, "learning_rate": 1e-2,
                                     "logging_steps": 10, "save_steps": 1000}))


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A full fine-tune (about 3 s of CPU): the tiny model learns the four answers and to end them with <|im_end|>,
    so its replies stop, which a random-init model almost never does. Its weights are in ``<run>/model``."""
    return _sft(tiny_model_dir, tmp_path_factory.mktemp("sft") / "sft", {"method": "full"}, 40)


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> Path:
    """An ``rlhf curate``-shaped folder written by the curation writer: instruction conversations and preference
    pairs whose train split holds 3 distinct questions (QA[0], QA[1], QA[2]), each asked twice."""
    from curation.writers import DatasetWriter

    out = tmp_path_factory.mktemp("curated")
    writer = DatasetWriter(out, ["jsonl"])
    rows = [{"id": "i1", "messages": _conversation(*QA[0])},
            {"id": "i2", "messages": _conversation(*QA[1])},
            {"id": "i3", "messages": _conversation(QA[0][0], "Another answer.")},  # same question as i1
            {"id": "i4", "messages": _conversation(*QA[3]), "split": "test"},
            {"id": "p1", "prompt": [SYSTEM, {"role": "user", "content": QA[1][0].upper()}],  # i2 up to case
             "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
            {"id": "p2", "prompt": [SYSTEM, {"role": "user", "content": QA[2][0]}],
             "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
            {"id": "p3", "prompt": [SYSTEM, {"role": "user", "content": QA[2][0]}],
             "chosen": [{"role": "assistant", "content": "c"}], "rejected": [{"role": "assistant", "content": "d"}]}]
    for row in rows:
        writer.write(row)
    (out / "curation.json").write_text(json.dumps({"outputs": writer.close()}))
    return out


def _cfg(model, prompts, out, **over) -> GenerateConfig:
    sampling = {"max_new_tokens": 6, "seed": 3, **over.pop("sampling", {})}
    return GenerateConfig(model=str(model), prompts=str(prompts), output_dir=str(out), k=3, batch_size=2,
                          sampling=sampling, **over)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / CANDIDATES).read_text().splitlines()]


def test_config_validation_names_the_field(tmp_path):
    for bad, field in (({"k": 1}, "k"), ({"split": ""}, "split"), ({"kind": "document"}, "kind"),
                       ({"max_prompts": 0}, "max_prompts"), ({"batch_size": True}, "batch_size")):
        with pytest.raises(ValueError, match=f"^{field}:"):
            GenerateConfig(model="m", prompts="p", output_dir="o", **bad)
    for bad, field in (({"temperature": 0}, "temperature"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"),
                       ({"max_new_tokens": 0}, "max_new_tokens")):
        with pytest.raises(ValueError, match=f"^{field}:"):
            SamplingConfig(**bad)
    recipe = tmp_path / "g.yaml"
    recipe.write_text("model: m\nprompts: p\noutput_dir: o\nsampling: {temprature: 0.5}\n")
    with pytest.raises(ConfigError, match="unknown key.*temprature.*known keys:.*temperature"):
        load_config(recipe)
    cfg = load_config(ROOT / "samples" / "telecom" / "generate.yaml", ["sampling.seed=7", "k=2"])
    assert (cfg.model.name_or_path, cfg.prompts, cfg.k, cfg.sampling.seed) == ("out/runs/sft", ["out/telecom"], 2, 7)
    assert cfg.output_dir == "out/feedback/candidates" and cfg.sampling.temperature == 0.9


def test_chat_prompt_cuts_before_the_reply():
    conversation = [SYSTEM, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                    {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    assert chat_prompt({"messages": conversation}, "x") == conversation[:4]
    assert chat_prompt({"prompt": "hi", "completion": "yo"}, "x") == [{"role": "user", "content": "hi"}]
    with pytest.raises(FeedbackError, match="f.jsonl:3: the conversation has no user turn"):
        chat_prompt({"messages": [SYSTEM]}, "f.jsonl:3")
    with pytest.raises(FeedbackError, match="f.jsonl:4: expected a 'prompt' or 'messages' column, found text"):
        chat_prompt({"text": "a document"}, "f.jsonl:4")


def test_prompts_from_files_and_every_curated_format(curated, tmp_path):
    from curation.writers import DatasetWriter

    file = tmp_path / "prompts.jsonl"
    file.write_text('{"prompt": "Hi"}\n\n{"id": "q2", "messages": [{"role": "user", "content": "Why?"}]}\n')
    prompts = load_prompts(prompt_roots([file]))
    assert [(p.id, p.messages, p.path, p.row) for p in prompts] == [
        (stable_id(file, 1), [{"role": "user", "content": "Hi"}], str(file), 1),
        ("q2", [{"role": "user", "content": "Why?"}], str(file), 3)]
    file.write_text('{"prompt": "Hi"}\n{"prompt": \n')
    with pytest.raises(FeedbackError, match=f"{file}:2: malformed JSON"):
        load_prompts(prompt_roots([file]))
    # the same curated rows written as Parquet only, or as a save_to_disk folder only, give the same prompts
    expected = [(p.id, p.messages) for p in load_prompts(prompt_roots([curated]))]
    assert [i for i, _ in expected] == ["i1", "i2", "p2"]
    rows = [json.loads(line) for kind in ("instruction", "preference")
            for line in (curated / kind / "train.jsonl").read_text().splitlines()]
    for fmt in ("parquet", "datasets"):
        writer = DatasetWriter(tmp_path / fmt, [fmt])
        for row in rows:
            writer.write({**row, "meta": json.loads(row["meta"])})
        (tmp_path / fmt / "curation.json").write_text(json.dumps({"outputs": writer.close()}))
        assert [(p.id, p.messages) for p in load_prompts(prompt_roots([tmp_path / fmt]))] == expected
    (tmp_path / "docs-only" / "document").mkdir(parents=True)
    (tmp_path / "docs-only" / "curation.json").write_text("{}")
    with pytest.raises(FeedbackError, match="docs-only has no instruction or preference dataset"):
        prompt_roots([tmp_path / "docs-only"])
    with pytest.raises(FeedbackError, match="prompts: not found: .*nowhere"):
        prompt_roots([tmp_path / "nowhere"])


def test_k_candidates_per_distinct_prompt_with_provenance(tiny_model_dir, curated, tmp_path):
    out = run(_cfg(tiny_model_dir, curated, tmp_path / "gen"))
    records = _records(out)
    # train split, instruction first then preference, one per distinct question (case and system turn aside)
    assert [r["lineage"]["parent"] for r in records] == ["i1", "i2", "p2"]
    assert [r["prompt"] for r in records] == [[SYSTEM, {"role": "user", "content": q}] for q, _ in QA[:3]]
    assert records[2]["lineage"] == {"path": str(curated / "preference" / "train.jsonl"), "row": 2, "parent": "p2",
                                     "chunk": None}
    for record in records:
        assert record["source"] == "generate" and len(record["candidates"]) == 3
        assert record["meta"] == {"model": str(tiny_model_dir), "run": None,
                                  "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 6,
                                               "repetition_penalty": 1.0, "seed": 3}}
        for c in record["candidates"]:
            assert c["finish"] in ("eos", "length") and c["logprob"] < 0 and c["rank"] is None
            assert c["n_tokens"] == 6 if c["finish"] == "length" else 1 <= c["n_tokens"] <= 6
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["status"] == "finished" and manifest["config"]["k"] == 3
    assert manifest["model"]["fingerprint"] == fingerprint_path(tiny_model_dir) and manifest["model"]["run"] is None
    assert [(Path(d["path"]).name, d["fingerprint"], d["curation"]) for d in manifest["prompts"]] == [
        (kind, fingerprint_path(curated / kind), str(curated / "curation.json")) for kind in ("instruction",
                                                                                               "preference")]
    assert manifest["stop_tokens"] == {"ids": [3], "tokens": ["<|im_end|>"]}
    assert manifest["versions"]["transformers"] and manifest["versions"]["torch"]
    counts = manifest["counts"]
    assert (counts["prompts"], counts["candidates"]) == (3, 9)
    assert counts["finished_eos"] + counts["finished_length"] == 9
    assert counts["generated_tokens"] == sum(c["n_tokens"] for r in records for c in r["candidates"])
    assert manifest["throughput"]["tokens_per_s"] > 0 and manifest["wall_time_s"] > 0
    # kind and split pick the rows
    with pytest.raises(FeedbackError, match="preference has no 'test' split"):
        run(_cfg(tiny_model_dir, curated, tmp_path / "pref", kind="preference", split="test"))
    held_out = _records(run(_cfg(tiny_model_dir, curated, tmp_path / "test", split="test", kind="instruction")))
    assert [r["lineage"]["parent"] for r in held_out] == ["i4"]


def test_same_seed_same_candidates_and_another_seed_differs(tiny_model_dir, curated, tmp_path):
    first = run(_cfg(tiny_model_dir, curated, tmp_path / "a"))
    again = run(_cfg(tiny_model_dir, curated, tmp_path / "b"))
    other = run(_cfg(tiny_model_dir, curated, tmp_path / "c", sampling={"seed": 4}))
    assert (first / CANDIDATES).read_bytes() == (again / CANDIDATES).read_bytes()
    contents = [[c["content"] for c in r["candidates"]] for r in _records(first)]
    assert contents != [[c["content"] for c in r["candidates"]] for r in _records(other)]
    assert [r["id"] for r in _records(first)] != [r["id"] for r in _records(other)]  # the seed is in the id


def test_resume_adds_prompts_and_matches_an_uninterrupted_run(tiny_model_dir, curated, tmp_path):
    whole = run(_cfg(tiny_model_dir, curated, tmp_path / "whole", max_prompts=3))
    part = tmp_path / "part"
    run(_cfg(tiny_model_dir, curated, part, max_prompts=2))
    assert len(_records(part)) == 2
    run(_cfg(tiny_model_dir, curated, part, max_prompts=3))  # max_prompts is not part of the fingerprint
    assert (part / CANDIDATES).read_bytes() == (whole / CANDIDATES).read_bytes()
    assert json.loads((part / MANIFEST).read_text())["attempts"] == 2
    # a job killed while writing leaves half a line: it is dropped and that prompt generated again, identically
    data = (part / CANDIDATES).read_bytes()
    (part / CANDIDATES).write_bytes(data[:len(data) - 40])
    run(_cfg(tiny_model_dir, curated, part, max_prompts=3))
    assert (part / CANDIDATES).read_bytes() == (whole / CANDIDATES).read_bytes()
    # finished, nothing to do: untouched
    stamp = (part / MANIFEST).stat().st_mtime_ns
    run(_cfg(tiny_model_dir, curated, part, max_prompts=3))
    assert (part / MANIFEST).stat().st_mtime_ns == stamp


def test_relative_paths_are_read_against_base_dir(tiny_model_dir, curated, tmp_path):
    base = tiny_model_dir.parent
    out = run(GenerateConfig(model=tiny_model_dir.name, prompts=str(curated), output_dir="gen-relative", k=2,
                             max_prompts=1, sampling={"max_new_tokens": 2}, base_dir=str(base)))
    assert out == base / "gen-relative" and _records(out)[0]["meta"]["model"] == tiny_model_dir.name
    assert json.loads((out / MANIFEST).read_text())["model"]["base"] == str(tiny_model_dir)


def test_a_different_config_is_refused_unless_overwrite(tiny_model_dir, curated, tmp_path):
    out = run(_cfg(tiny_model_dir, curated, tmp_path / "gen", max_prompts=1))
    with pytest.raises(FeedbackError, match="holds candidates made from a different config"):
        run(_cfg(tiny_model_dir, curated, out, max_prompts=1, sampling={"temperature": 0.5}))
    run(_cfg(tiny_model_dir, curated, out, max_prompts=1, sampling={"temperature": 0.5}, overwrite=True))
    assert json.loads((out / MANIFEST).read_text())["config"]["sampling"]["temperature"] == 0.5
    assert len(_records(out)) == 1
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FeedbackError, match="not empty and holds no generate.json"):
        run(_cfg(tiny_model_dir, curated, tmp_path / "busy"))


def test_logprob_is_the_policy_log_probability_of_the_reply(tiny_model_dir):
    """Recomputed by one forward pass over prompt + reply without padding: left padding, the batch and the sampling
    warpers (temperature, top-k) must not leak into the recorded log-probability."""
    import torch

    from alignment.models import ModelConfig, load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(str(tiny_model_dir)))
    model = load_causal_lm(ModelConfig(str(tiny_model_dir)), tokenizer).eval()
    prompts = [[{"role": "user", "content": q}] for q, _ in QA[:2]] + [[SYSTEM, {"role": "user", "content": "Hi"}]]
    torch.manual_seed(0)
    groups = sample(model, tokenizer, prompts, 2, SamplingConfig(temperature=0.7, top_k=20, max_new_tokens=5),
                    stop_token_ids(tokenizer, model))
    assert [len(g) for g in groups] == [2, 2, 2]
    for prompt, group in zip(prompts, groups):
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"]
        for c in group:
            ids = torch.tensor([prompt_ids + c["token_ids"]])
            with torch.no_grad():
                logits = model(ids).logits[0, len(prompt_ids) - 1:-1]
            expected = torch.log_softmax(logits.float(), -1).gather(1, ids[0, len(prompt_ids):, None]).sum()
            assert c["logprob"] == pytest.approx(expected.item(), abs=1e-3)
            assert c["n_tokens"] == len(c["token_ids"])


def test_a_run_folder_is_the_model_and_its_replies_stop(sft_run, tiny_model_dir, curated, tmp_path):
    """Trap 5 (hiyouga/LlamaFactory 7943): the fine-tuned policy ends its replies with the template's end-of-turn
    token, generation stops there, and the token is not part of the content."""
    out = run(_cfg(sft_run, curated, tmp_path / "gen", sampling={"max_new_tokens": 24}))
    records = _records(out)
    finished = [c for r in records for c in r["candidates"] if c["finish"] == "eos"]
    # measured: 9 of 9 replies end with <|im_end|> after 40 SFT steps (7 of 9 after 25), 4 to 19 tokens long
    assert len(finished) >= 6
    assert all(c["n_tokens"] < 24 and "<|im_end|>" not in c["content"] for c in finished)
    # the random-init base it started from almost never draws <|im_end|> (1 token in 1024)
    base = json.loads((run(_cfg(tiny_model_dir, curated, tmp_path / "base", sampling={"max_new_tokens": 24}))
                       / MANIFEST).read_text())
    assert base["counts"]["finished_eos"] <= 2
    assert all(r["meta"]["run"] == "sft" for r in records)
    model = json.loads((out / MANIFEST).read_text())["model"]
    assert model["base"] == str(sft_run / "model") and model["adapter"] is None
    assert model["run"]["stage"] == "sft" and model["run"]["fingerprint"] == fingerprint_path(sft_run / "run.json")
    assert model["fingerprint"] == model["run"]["fingerprint"] and load_run(sft_run)["status"] == "finished"


def test_a_run_with_an_adapter_is_its_base_plus_the_adapter(tiny_model_dir, curated, tmp_path):
    lora = _sft(tiny_model_dir, tmp_path / "lora", {"method": "lora", "r": 4}, 2)
    out = run(_cfg(lora, curated, tmp_path / "gen", max_prompts=2))
    records = _records(out)
    assert [len(r["candidates"]) for r in records] == [3, 3] and records[0]["meta"]["run"] == "lora"
    model = json.loads((out / MANIFEST).read_text())["model"]
    assert (model["base"], model["adapter"]) == (str(tiny_model_dir), str(lora / "adapter"))


def test_an_unfinished_run_is_refused(tiny_model_dir, curated, tmp_path):
    Run.start(tmp_path / "running", "sft", {"lr": 1}, model={"name_or_path": str(tiny_model_dir)})
    with pytest.raises(FeedbackError, match="is running, not finished"):
        run(_cfg(tmp_path / "running", curated, tmp_path / "gen"))
