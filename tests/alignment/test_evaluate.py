"""The eval stage on the tiny model: its perplexities equal a hand computation from the models' logits (SFT beats the
base on held-out rows), the reward model's accuracy is a hand count, a policy equal to the SFT policy ties with it
exactly, win rates and mean rewards agree with samples.jsonl, an identical re-run is skipped, errors name the field."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from alignment import dpo, evaluate, reward, sft
from alignment.models import ModelConfig, load_causal_lm, load_sequence_classifier, load_tokenizer
from alignment.runs import load_run
from rlhf.cli import main
from rlhf.config import ConfigError

GENERAL = Path(__file__).resolve().parents[2] / "samples" / "general" / "general.txt"
TOPICS = ["roaming", "my bill", "my SIM", "5G", "broadband", "an eSIM", "voicemail", "my data", "my contract",
          "a top-up", "wifi calling", "my hub"]
QUESTIONS = ["How do I fix {}?", "Where can I check {}?", "Who can help with {}?", "What changed with {}?"]
ANSWERS = ["Open the app and check {}.", "Call support about {}.", "Restart your phone, then check {}.",
           "Visit a store about {}."]
TRAIN = {"batch_size": 8, "max_length": 64, "learning_rate": 5e-3, "save_steps": 1000}


def _rows(topics: list[str]) -> tuple[list[dict], list[dict]]:
    conv, pref = [], []
    for i, topic in enumerate(topics):
        for j, question in enumerate(QUESTIONS):
            prompt = [{"role": "user", "content": question.format(topic)}]
            answer = ANSWERS[(i + j) % len(ANSWERS)].format(topic)
            conv.append({"messages": prompt + [{"role": "assistant", "content": answer}]})
            pref.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": f"Certainly! {answer}"}],
                         "rejected": [{"role": "assistant", "content": f"Sorry, {answer}"}]})
    return conv, pref


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> Path:
    """An `rlhf curate`-shaped folder: instruction/ and preference/ kinds, train and (held-out topics) test splits."""
    root = tmp_path_factory.mktemp("curated")
    (root / "curation.json").write_text(json.dumps({"outputs": {}}))
    for split, topics in (("train", TOPICS[:9]), ("test", TOPICS[9:])):
        for kind, rows in zip(("instruction", "preference"), _rows(topics)):
            (root / kind).mkdir(exist_ok=True)
            (root / kind / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def runs(tiny_model_dir, curated, tmp_path_factory) -> dict[str, Path]:
    """A full SFT (LoRA barely moves the random tiny base), a LoRA reward model and a short DPO run on top of it."""
    out = tmp_path_factory.mktemp("runs")
    data = {"path": str(curated), "eval_split": None}
    sft_run = sft.run(sft.Config(model={"name_or_path": str(tiny_model_dir)}, data=data, output_dir=str(out / "sft"),
                                 peft={"method": "full"}, train={**TRAIN, "max_steps": 30}))
    rm_run = reward.run(reward.Config(model={"name_or_path": str(sft_run / "model")}, parent=str(sft_run), data=data,
                                      output_dir=str(out / "rm"), peft={"method": "lora", "r": 8},
                                      train={**TRAIN, "max_steps": 10, "learning_rate": 1e-2}))
    dpo_run = dpo.run(dpo.Config(parent=str(sft_run), data=[data], output_dir=str(out / "dpo"),
                                 train={**TRAIN, "max_steps": 4, "batch_size": 4}))
    return {"sft": sft_run, "rm": rm_run, "dpo": dpo_run}


def _cfg(runs: dict[str, Path], curated: Path, out: Path, **over) -> evaluate.Config:
    settings = {"sft": str(runs["sft"]), "policy": str(runs["dpo"]), "reward_model": str(runs["rm"]),
                "general_text": str(GENERAL), "max_prompts": 8, "max_new_tokens": 12, "batch_size": 4, **over}
    return evaluate.Config(data={"path": str(curated)}, output_dir=str(out), **settings)


@pytest.fixture(scope="module")
def evaluated(runs, curated, tmp_path_factory) -> Path:
    return evaluate.run(_cfg(runs, curated, tmp_path_factory.mktemp("eval") / "run"))


def _hand_perplexity(run_dir: Path, rows: list[dict]) -> tuple[float, int]:
    """exp(mean NLL) of each reply's tokens and its end-of-turn token, one unpadded conversation at a time, from the
    run loaded on its own: the reply starts where the generation prompt ends; the template's final newline is not
    part of it."""
    import torch

    cfg = ModelConfig(str(run_dir))
    tokenizer = load_tokenizer(cfg)
    model = load_causal_lm(cfg, tokenizer)
    total, count = 0.0, 0
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True,
                                               return_dict=True)["input_ids"]
        ids = tokenizer.apply_chat_template(row["messages"], return_dict=True)["input_ids"]
        assert ids[:len(prompt)] == prompt and ids[-2] == tokenizer.eos_token_id
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        positions = range(len(prompt), len(ids) - 1)
        total -= sum(logprobs[t - 1, ids[t]].item() for t in positions)
        count += len(positions)
    return math.exp(total / count), count


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_perplexity_is_a_hand_computation_and_sft_beats_the_base(evaluated, runs, curated):
    metrics = load_run(evaluated)["metrics"]
    rows = _jsonl(curated / "instruction" / "test.jsonl")
    for role, run_dir in (("sft", runs["sft"]), ("policy", runs["dpo"])):  # no adapter / an adapter, one base
        expected, tokens = _hand_perplexity(run_dir, rows)
        assert metrics["perplexity"][role] == pytest.approx(expected, rel=1e-4)
        assert metrics["tokens"]["heldout"] == tokens
    assert metrics["perplexity"]["sft"] < metrics["perplexity"]["base"] / 5  # measured: 47 vs 1064
    general = metrics["general_perplexity"]
    assert set(general) == {"base", "sft", "policy"} and all(v > 1 for v in general.values())
    assert metrics["tokens"]["general"] > 1000


def test_reward_accuracy_is_a_hand_count_and_win_rates_follow_the_samples(evaluated, runs, curated):
    record = load_run(evaluated)
    metrics = record["metrics"]
    pairs = _jsonl(curated / "preference" / "test.jsonl")
    cfg = ModelConfig(str(runs["rm"]))
    model, tokenizer = load_sequence_classifier(cfg), load_tokenizer(cfg)
    chosen = [reward.score(model, tokenizer, [p["prompt"] + p["chosen"]])[0] for p in pairs]
    rejected = [reward.score(model, tokenizer, [p["prompt"] + p["rejected"]])[0] for p in pairs]
    assert metrics["reward_pairs"] == len(pairs) and metrics["reward_pairs_split"] == "test"
    assert metrics["reward_accuracy"] == sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)
    assert metrics["reward_margin"] == pytest.approx(sum(chosen) / len(pairs) - sum(rejected) / len(pairs), abs=1e-5)

    samples = _jsonl(evaluated / "samples.jsonl")
    assert len(samples) == metrics["prompts"] == 8 and record["samples"] == samples[:8]
    assert samples[0]["prompt"] == _jsonl(curated / "instruction" / "test.jsonl")[0]["messages"][:-1]
    for a, b in (("policy", "sft"), ("policy", "base"), ("sft", "base")):
        wins = [1 if s["score"][a] > s["score"][b] else 0.5 if s["score"][a] == s["score"][b] else 0 for s in samples]
        assert metrics["win_rate"][f"{a}_vs_{b}"] == sum(wins) / len(wins)
    for role in ("base", "sft", "policy"):
        assert metrics["mean_reward"][role] == pytest.approx(sum(s["score"][role] for s in samples) / len(samples))
    # the judge agrees with the reward model loaded on its own
    first = samples[0]
    alone = reward.score(model, tokenizer, [first["prompt"] + [{"role": "assistant", "content": first["sft"]}]])[0]
    assert first["score"]["sft"] == pytest.approx(alone, abs=1e-5)


def test_a_policy_equal_to_the_sft_policy_ties_with_it(runs, curated, tmp_path):
    out = evaluate.run(_cfg(runs, curated, tmp_path / "same", policy=str(runs["sft"]), general_text=None,
                            max_prompts=6))
    metrics = load_run(out)["metrics"]
    assert metrics["win_rate"]["policy_vs_sft"] == 0.5
    assert metrics["win_rate"]["policy_vs_base"] == metrics["win_rate"]["sft_vs_base"]
    assert metrics["perplexity"]["policy"] == metrics["perplexity"]["sft"]
    assert metrics["general_perplexity"] is None and metrics["tokens"]["general"] is None
    assert all(s["policy"] == s["sft"] for s in _jsonl(out / "samples.jsonl"))


def test_an_identical_rerun_is_skipped_and_records_lineage(evaluated, runs, curated, tmp_path, capsys):
    before = {name: (evaluated / name).read_bytes() for name in ("run.json", "samples.jsonl")}
    recipe = tmp_path / "eval.yaml"  # the same settings through the CLI
    recipe.write_text(f"sft: {runs['sft']}\npolicy: {runs['dpo']}\nreward_model: {runs['rm']}\ndata: {curated}\n"
                      f"general_text: {GENERAL}\nmax_prompts: 8\nmax_new_tokens: 12\nbatch_size: 4\n"
                      f"output_dir: {evaluated}\n")
    assert main(["align", "eval", "--config", str(recipe)]) == 0
    assert {name: (evaluated / name).read_bytes() for name in before} == before
    assert "win rate" in capsys.readouterr().out
    record = load_run(evaluated)
    assert record["stage"] == "eval" and record["parent"]["path"] == str(runs["dpo"].resolve())
    assert set(record["config"]["runs"]) == {"sft", "policy", "reward_model"}
    assert {Path(d["path"]).name for d in record["datasets"]} == {"instruction", "preference", "general.txt"}
    # a different setting into the same folder is an error naming it, not a silent skip
    assert main(["align", "eval", "--config", str(recipe), "--set", "max_new_tokens=5"]) == 2
    assert "max_new_tokens" in capsys.readouterr().err


def test_without_policy_or_reward_model_those_numbers_are_null(runs, curated, tmp_path):
    out = evaluate.run(evaluate.Config(sft=str(runs["sft"]), data=str(curated), output_dir=str(tmp_path / "run"),
                                       max_prompts=2, max_new_tokens=4))
    metrics = load_run(out)["metrics"]
    assert metrics["perplexity"]["policy"] is None and metrics["perplexity"]["sft"] > 1
    assert metrics["reward_accuracy"] is None and metrics["reward_pairs"] == 0
    assert metrics["mean_reward"] == {"base": None, "sft": None, "policy": None}
    assert set(metrics["win_rate"].values()) == {None}
    assert _jsonl(out / "samples.jsonl")[0]["score"] == {"base": None, "sft": None, "policy": None}


def test_errors_name_the_field(runs, curated, tmp_path):
    out = tmp_path / "run"
    cases = [({"sft": str(tmp_path / "nope")}, r"^sft: .*nope not found"),
             ({"policy": str(tmp_path / "gone")}, r"^policy: .*gone not found"),
             ({"reward_model": str(runs["sft"])}, r"^reward_model: .* finished sft run; expected a finished rm"),
             ({"pairs": str(curated / "instruction")}, r"^pairs: "),
             ({"general_text": str(tmp_path / "none.txt")}, r"^general_text: ")]
    for over, message in cases:
        with pytest.raises(ConfigError, match=message):
            evaluate.run(_cfg(runs, curated, out, **{"max_prompts": 1, **over}))
    empty = tmp_path / "empty"
    (empty / "instruction").mkdir(parents=True)
    (empty / "curation.json").write_text(json.dumps({"outputs": {}}))
    (empty / "instruction" / "train.jsonl").write_text((curated / "instruction" / "train.jsonl").read_text())
    (empty / "instruction" / "test.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"^data: .*no rows in its 'test' split"):
        evaluate.run(_cfg(runs, empty, out))
    assert not out.exists()  # refused before any run folder was made
    for over, message in (({"temperature": -1}, "^temperature: "), ({"max_prompts": 0}, "^max_prompts: "),
                          ({"data": {"path": str(curated), "eval_split": None}}, r"^data.eval_split: ")):
        with pytest.raises(ValueError, match=message):
            evaluate.Config(**{"sft": "x", "data": str(curated), **over})


def test_pairs_without_a_test_split_fall_back_to_train_and_say_so(runs, curated, tmp_path):
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    (pairs / "train.jsonl").write_text((curated / "preference" / "test.jsonl").read_text())
    out = evaluate.run(evaluate.Config(sft=str(runs["sft"]), data=str(curated), reward_model=str(runs["rm"]),
                                       pairs=str(pairs), output_dir=str(tmp_path / "run"), max_prompts=1,
                                       max_new_tokens=2))
    record = load_run(out)
    assert record["metrics"]["reward_pairs_split"] == "train" and record["metrics"]["reward_pairs"] == 12
    assert str(pairs.resolve()) in {d["path"] for d in record["datasets"]}
