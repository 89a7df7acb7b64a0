"""The reward stage on the tiny model: it learns a keyword rule that holds out of sample, the score head trains and is
saved under LoRA and the run folder reloads to the same rewards (field notes trap 3), ``score`` reads rewards the way
``trl.RewardTrainer`` trains them, SFT parents, every method, re-runs, recipes and the CLI."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from alignment import reward, sft
from alignment.models import ModelConfig, load_sequence_classifier, load_tokenizer
from alignment.runs import RunError, load_run
from alignment.cli import load_stage_config
from rlhf.cli import main
from rlhf.config import ConfigError

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "telecom"
KEYWORD = "sorry"
TOPICS = ("roaming", "my bill", "an eSIM", "broadband", "a PAC code", "top ups", "5G", "voicemail", "my data",
          "my contract", "wifi calling", "my router", "a refund", "my number", "the app", "coverage")
ASKS = ("How do I set up {}?", "What is wrong with {}?", "Can you explain {}?", "Why is {} not working?")
WORDS = "open the app tap settings then choose your plan and check the page for details it can take a day".split()


def _pairs(rng: random.Random, n: int) -> list[dict]:
    """Chosen replies contain KEYWORD at a random position; the rejected reply is the same sentence with another
    word in its place, so length and position tell nothing: only the word does."""
    rows = []
    for _ in range(n):
        body = rng.sample(WORDS, 8)
        at = rng.randrange(len(body) + 1)
        filler = rng.choice([w for w in WORDS if w not in body])
        rows.append({"prompt": [{"role": "user", "content": rng.choice(ASKS).format(rng.choice(TOPICS))}],
                     "chosen": [{"role": "assistant", "content": " ".join([*body[:at], KEYWORD, *body[at:]]) + "."}],
                     "rejected": [{"role": "assistant", "content": " ".join([*body[:at], filler, *body[at:]]) + "."}]})
    return rows


@pytest.fixture(scope="module")
def keyword_data(tmp_path_factory) -> Path:
    """A preference folder in TRL conversational format: 64 training pairs, 32 held-out pairs."""
    folder = tmp_path_factory.mktemp("keyword")
    rng = random.Random(0)
    for split, n in (("train", 64), ("test", 32)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _pairs(rng, n)))
    return folder


def _cfg(model_dir, data, out, **over) -> reward.Config:
    train = {"max_steps": 30, "batch_size": 8, "max_length": 128, "learning_rate": 1e-2, "logging_steps": 1,
             "save_steps": 100, **over.pop("train", {})}
    return reward.Config(model={"name_or_path": str(model_dir)}, data=[{"path": str(data)}], output_dir=str(out),
                         peft=over.pop("peft", {"method": "lora", "r": 8}), train=train, **over)


@pytest.fixture(scope="module")
def rm_run(tiny_model_dir, keyword_data, tmp_path_factory) -> tuple[reward.Config, Path]:
    cfg = _cfg(tiny_model_dir, keyword_data, tmp_path_factory.mktemp("rm") / "run")
    return cfg, reward.run(cfg)


def _fresh_head(model_dir: Path, seed: int = 42):
    """The score head the stage starts from: drawn at load time after seeding, as run() does."""
    from transformers import set_seed

    set_seed(seed)
    return load_sequence_classifier(ModelConfig(str(model_dir))).score.weight.detach().clone()


def test_reward_model_learns_the_rule_on_held_out_pairs(rm_run):
    _, run_dir = rm_run
    record = load_run(run_dir)
    assert record["status"] == "finished" and record["stage"] == "rm"
    metrics = record["metrics"]
    assert metrics["eval_pairs"] == metrics["eval_rows"] == 32 and metrics["train_rows"] == 64
    assert metrics["eval_accuracy"] >= 0.9  # measured 0.97-1.0 over seeds
    assert metrics["eval_margin"] > 1.0
    assert metrics["train_loss_last"] < 0.5 * metrics["train_loss_first"]
    assert "eval_perplexity" not in metrics  # exp(pairwise loss) means nothing
    assert list((run_dir / "logs").glob("events.out.tfevents.*"))


def test_score_head_trains_and_is_saved_with_the_adapter(rm_run, tiny_model_dir):
    """Trap 3 (huggingface/trl 1379, 937): the random head must leave the run trained, inside the adapter."""
    from safetensors.torch import load_file

    cfg, run_dir = rm_run
    assert cfg.peft.modules_to_save == ["score"]  # set by the stage; the recipe named none
    adapter_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_CLS" and "score" in adapter_config["modules_to_save"]
    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    head = saved["base_model.model.score.weight"]
    assert (head - _fresh_head(tiny_model_dir)).abs().max().item() > 1e-2
    assert any("lora_A" in k for k in saved)


def test_run_folder_reloads_to_the_same_rewards(rm_run, keyword_data):
    """Reloading through the run folder (base + adapter with its head) gives the rewards the trained model gave."""
    import datasets

    _, run_dir = rm_run
    cfg = ModelConfig(str(run_dir))
    tokenizer = load_tokenizer(cfg)
    model = load_sequence_classifier(cfg, tokenizer)
    pairs = datasets.load_dataset("json", data_files=str(keyword_data / "test.jsonl"), split="train")
    again = reward.pair_metrics(model, tokenizer, pairs)
    recorded = load_run(run_dir)["metrics"]
    for key in ("eval_accuracy", "eval_margin", "eval_reward_mean", "eval_reward_std"):
        assert again[key] == pytest.approx(recorded[key], abs=1e-5), key


def test_identical_rerun_is_a_skip_and_changed_inputs_an_error(rm_run, tiny_model_dir, keyword_data):
    cfg, run_dir = rm_run
    stamp = (run_dir / "run.json").stat().st_mtime_ns
    assert reward.run(cfg) == run_dir and (run_dir / "run.json").stat().st_mtime_ns == stamp
    with pytest.raises(RunError, match="center_rewards_coefficient"):
        reward.run(_cfg(tiny_model_dir, keyword_data, run_dir, center_rewards_coefficient=0.1))


def test_score_reads_rewards_the_way_reward_trainer_trains_them(tiny_model_dir, keyword_data, tmp_path):
    """Same token ids as RewardTrainer's preprocessing, same rewards as its collated batches, whatever the padding."""
    import datasets
    import torch
    from trl import RewardConfig, RewardTrainer

    tokenizer = load_tokenizer(ModelConfig(str(tiny_model_dir)))
    torch.manual_seed(0)
    model = load_sequence_classifier(ModelConfig(str(tiny_model_dir)), tokenizer)
    rows = datasets.load_dataset("json", data_files=str(keyword_data / "test.jsonl"), split="train").select(range(6))
    trainer = RewardTrainer(model=model, args=RewardConfig(output_dir=str(tmp_path), report_to="none", bf16=False),
                            train_dataset=rows, processing_class=tokenizer)
    conversations = [r["prompt"] + r["chosen"] for r in rows] + [r["prompt"] + r["rejected"] for r in rows]
    prepared = list(trainer.train_dataset)
    assert [p["chosen_ids"] for p in prepared] + [p["rejected_ids"] for p in prepared] == \
        [reward.token_ids(tokenizer, c) for c in conversations]
    batch = trainer.data_collator(prepared)  # chosen first, then rejected, right-padded
    with torch.no_grad():
        trained = model.eval()(**batch).logits[:, 0].tolist()
    assert reward.score(model, tokenizer, conversations) == pytest.approx(trained, abs=1e-5)
    one_by_one = reward.score(model, tokenizer, conversations, batch_size=1)  # no padding at all
    assert one_by_one == pytest.approx(trained, abs=1e-5)
    # plain-text pairs get eos appended, as TRL does for the standard format
    assert reward.token_ids(tokenizer, "Hello")[-1] == tokenizer.eos_token_id


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, keyword_data, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sft")
    rows = [json.loads(line) for line in (keyword_data / "train.jsonl").read_text().splitlines()]
    data = folder / "conv.jsonl"
    data.write_text("".join(json.dumps({"messages": r["prompt"] + r["chosen"]}) + "\n" for r in rows))
    return sft.run(sft.Config(model={"name_or_path": str(tiny_model_dir)}, data=[{"path": str(data)}],
                              output_dir=str(folder / "run"), peft={"method": "lora", "r": 8},
                              train={"max_steps": 3, "batch_size": 8, "max_length": 128, "learning_rate": 1e-2,
                                     "logging_steps": 1, "save_steps": 100}))


def test_sft_parent_adapter_is_where_the_reward_model_starts(sft_run, tiny_model_dir, keyword_data, tmp_path):
    """With a parent SFT run the reward model starts from the SFT model: its LoRA weights are the SFT adapter's,
    re-typed for classification with the score head trainable; the trained run still reloads on the base alone."""
    import torch
    from safetensors.torch import load_file

    cfg = _cfg(tiny_model_dir, keyword_data, tmp_path / "rm", parent=str(sft_run), train={"max_steps": 4})
    adapter = reward.parent_adapter(cfg)
    tokenizer = load_tokenizer(ModelConfig(str(sft_run)))
    model = reward.reward_model(cfg, tokenizer, adapter)
    start = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    sft_weights = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    assert sft_weights and all(torch.equal(start[k], v) for k, v in sft_weights.items())
    assert {n for n, p in model.named_parameters() if p.requires_grad and "score" in n}
    # full / freeze start from the same SFT model, merged: with the same head draw, the same rewards
    rows = [json.loads(line) for line in (keyword_data / "test.jsonl").read_text().splitlines()][:8]
    conversations = [r["prompt"] + r["chosen"] for r in rows]

    def start_rewards(method: str, parent: Path | None) -> list[float]:
        from transformers import set_seed

        set_seed(42)
        start_cfg = _cfg(tiny_model_dir, keyword_data, tmp_path / "x", peft={"method": method, "r": 8})
        return reward.score(reward.reward_model(start_cfg, tokenizer, parent), tokenizer, conversations)

    continued, merged = start_rewards("lora", adapter), start_rewards("full", adapter)
    assert merged == pytest.approx(continued, abs=1e-5)
    assert max(abs(a - b) for a, b in zip(continued, start_rewards("lora", None))) > 1e-3  # SFT moved the weights

    run_dir = reward.run(cfg)
    record = load_run(run_dir)
    assert record["parent"]["path"] == str(sft_run.resolve()) and record["parent"]["stage"] == "sft"
    assert record["model"]["name_or_path"] == str(tiny_model_dir)  # the adapter sits on the original base
    import datasets

    reloaded = load_sequence_classifier(ModelConfig(str(run_dir)))
    rows = [json.loads(line) for line in (keyword_data / "test.jsonl").read_text().splitlines()]
    again = reward.pair_metrics(reloaded, load_tokenizer(ModelConfig(str(run_dir))), datasets.Dataset.from_list(rows))
    assert again["eval_margin"] == pytest.approx(record["metrics"]["eval_margin"], abs=1e-5)


def test_parent_that_does_not_fit_is_refused(sft_run, tiny_model_dir, keyword_data, tmp_path):
    with pytest.raises(ConfigError, match=r"peft\.r: parent 8, recipe 16"):
        reward.parent_adapter(_cfg(tiny_model_dir, keyword_data, tmp_path / "a", parent=str(sft_run),
                                   peft={"method": "lora", "r": 16}))
    with pytest.raises(ConfigError, match="model.name_or_path"):
        reward.parent_adapter(_cfg(tmp_path, keyword_data, tmp_path / "b", parent=str(sft_run)))
    with pytest.raises(ConfigError, match="not a run folder"):
        reward.parent_adapter(_cfg(tiny_model_dir, keyword_data, tmp_path / "c", parent=str(tiny_model_dir)))
    assert not (tmp_path / "a").exists()  # refused before a run folder is made


@pytest.mark.parametrize("method", ["dora", "ia3", "freeze", "full"])
def test_every_method_leaves_a_trained_score_head(tiny_model_dir, keyword_data, tmp_path, method):
    from safetensors.torch import load_file

    # Adam on every weight of a model this small jumps at 5e-3; (IA)3's scale vectors move slowly at it
    lr = {"full": 1e-3, "freeze": 1e-3, "ia3": 3e-2}.get(method, 5e-3)
    run_dir = reward.run(_cfg(tiny_model_dir, keyword_data, tmp_path / method, peft={"method": method, "r": 4},
                              train={"max_steps": 6, "learning_rate": lr}))
    record = load_run(run_dir)
    assert record["metrics"]["train_loss_last"] < record["metrics"]["train_loss_first"]
    weights = run_dir / ("model" if method in ("full", "freeze") else "adapter")
    saved = load_file(str(next(weights.glob("*.safetensors"))))
    head = saved["score.weight" if method in ("full", "freeze") else "base_model.model.score.weight"]
    assert (head - _fresh_head(tiny_model_dir)).abs().max().item() > 1e-3


def test_stage_always_trains_the_head_and_validates_its_options():
    cfg = reward.Config(model={"name_or_path": "m"}, data={"path": "d"}, output_dir="o",
                        peft={"method": "lora", "modules_to_save": ["lm_head"]})
    assert cfg.peft.modules_to_save == ["lm_head", "score"]
    full = reward.Config(model={"name_or_path": "m"}, data={"path": "d"}, output_dir="o", peft={"method": "full"})
    assert full.peft.modules_to_save is None  # nothing is frozen, the head trains anyway
    qlora = reward.Config(model={"name_or_path": "m"}, data={"path": "d"}, output_dir="o", peft={"method": "qlora"})
    assert qlora.model.quantization == "nf4"
    for bad, field in (({"center_rewards_coefficient": -1}, "center_rewards_coefficient"),
                       ({"parent": ""}, "parent"), ({"output_dir": ""}, "output_dir")):
        with pytest.raises(ValueError, match=field):
            reward.Config(**{"model": {"name_or_path": "m"}, "data": {"path": "d"}, "output_dir": "o", **bad})


@pytest.mark.parametrize("recipe", ["rm.yaml", "rm-smollm.yaml"])
def test_shipped_recipes_load(recipe):
    cfg = load_stage_config("rm", SAMPLES / recipe)
    assert cfg.data[0].path == "out/telecom" and cfg.output_dir.startswith("out/runs/rm")
    assert "score" in cfg.peft.modules_to_save
    if recipe == "rm.yaml":  # the tiny sample starts from its (full-weight) SFT run
        assert cfg.parent == "out/runs/sft" and cfg.model.name_or_path == "out/runs/sft/model"


def test_cli_trains_a_recipe(tiny_model_dir, keyword_data, tmp_path):
    recipe = tmp_path / "rm.yaml"
    recipe.write_text(f"model:\n  name_or_path: {tiny_model_dir}\ndata:\n  path: {keyword_data}\n"
                      f"output_dir: {tmp_path / 'cli-run'}\ntrain:\n  max_steps: 2\n  batch_size: 4\n"
                      f"  max_length: 128\n")
    assert main(["align", "rm", "--config", str(recipe), "--set", "peft.r=4"]) == 0
    record = load_run(tmp_path / "cli-run")
    assert record["config"]["peft"]["r"] == 4 and record["config"]["peft"]["modules_to_save"] == ["score"]
    assert 0 <= record["metrics"]["eval_accuracy"] <= 1 and "eval_margin" in record["metrics"]
