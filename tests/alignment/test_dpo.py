"""The DPO stage on the tiny model: it learns a simple preference from an SFT run, its reference is the SFT policy
held in the same weights (field notes trap 9), run records, recipe validation, the CLI."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from alignment import dpo, sft
from alignment.cli import load_stage_config
from alignment.models import ModelConfig, load_causal_lm, load_tokenizer
from alignment.policy import REF_ADAPTER
from alignment.runs import Run, load_run
from rlhf.cli import main
from rlhf.config import ConfigError

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "telecom"
# The preference rule: the chosen reply opens with the keyword, the rejected one does not. Held-out prompts use
# topics never seen in training, so a policy that passes them learned the rule, not the prompts.
KEYWORD = "Certainly!"
TOPICS = ["roaming", "my bill", "my SIM", "5G", "broadband", "an eSIM", "voicemail", "my data", "my contract",
          "a top-up", "wifi calling", "my hub"]
QUESTIONS = ["How do I fix {}?", "Where can I check {}?", "Who can help with {}?", "What changed with {}?"]
ANSWERS = ["Open the app and check {}.", "Call support about {}.", "Restart your phone, then check {}.",
           "Visit a store about {}."]


def _qa(topics: list[str]) -> list[tuple[str, str]]:
    return [(q.format(t), ANSWERS[(i + j) % len(ANSWERS)].format(t))
            for i, t in enumerate(topics) for j, q in enumerate(QUESTIONS)]


TRAIN_QA, HELDOUT_QA = _qa(TOPICS[:9]), _qa(TOPICS[9:])


def _write_splits(folder: Path, make_row) -> Path:
    folder.mkdir(parents=True)
    for split, rows in (("train", TRAIN_QA), ("test", HELDOUT_QA)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(make_row(q, a)) + "\n" for q, a in rows))
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Conversations for the SFT run (plain answers) and preference pairs (the keyword decides), train + test."""
    root = tmp_path_factory.mktemp("dpo-data")
    conv = _write_splits(root / "conv", lambda q, a: {"messages": [{"role": "user", "content": q},
                                                                   {"role": "assistant", "content": a}]})
    pref = _write_splits(root / "pref", lambda q, a: {"prompt": [{"role": "user", "content": q}],
                                                      "chosen": [{"role": "assistant", "content": f"{KEYWORD} {a}"}],
                                                      "rejected": [{"role": "assistant", "content": f"Sorry, {a}"}]})
    return {"conv": conv, "pref": pref}


def _sft_run(model_dir: Path, data: dict[str, Path], out: Path, method: str = "lora", steps: int = 12) -> Path:
    train = {"max_steps": steps, "batch_size": 4, "max_length": 64, "learning_rate": 1e-2, "save_steps": 100}
    return sft.run(sft.Config(model={"name_or_path": str(model_dir)}, data={"path": str(data["conv"]),
                                                                         "eval_split": None},
                              output_dir=str(out), peft={"method": method, "r": 8}, train=train))


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, data, tmp_path_factory) -> Path:
    return _sft_run(tiny_model_dir, data, tmp_path_factory.mktemp("sft") / "run")


def _cfg(parent: Path, data: dict[str, Path], out: Path, **over) -> dpo.Config:
    train = {"max_steps": 20, "batch_size": 4, "max_length": 64, "learning_rate": 5e-3, "logging_steps": 1,
             "save_steps": 100, **over.pop("train", {})}
    return dpo.Config(parent=str(parent), data=[{"path": str(data["pref"])}], output_dir=str(out), train=train, **over)


def _logprob(model, tokenizer, question: str, reply: str) -> float:
    """log p(reply | chat prompt) summed over the reply's tokens, computed directly from the logits."""
    import torch

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt + reply, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    return logprobs[n_prompt - 1:].gather(1, ids[0, n_prompt:, None]).sum().item()


def test_dpo_learns_the_preference_and_records_its_lineage(sft_run, data, tmp_path):
    run_dir = dpo.run(_cfg(sft_run, data, tmp_path / "dpo"))
    record = load_run(run_dir)
    assert record["status"] == "finished" and record["stage"] == "dpo"
    assert record["parent"]["path"] == str(sft_run.resolve()) and record["parent"]["stage"] == "sft"
    assert record["model"] == load_run(sft_run)["config"]["model"]  # the SFT run's base, loaded the same way
    assert record["reference"]["kind"] == "sft_adapter_copy"
    assert record["reference"]["weights"] == str((sft_run / "adapter").resolve())
    metrics = record["metrics"]
    assert metrics["train_loss_last"] < metrics["train_loss_first"]
    assert metrics["heldout_reward_accuracy"] >= 0.9 and metrics["heldout_reward_margin"] > 0.1  # chance: 0.5, 0
    assert "eval_perplexity" not in metrics  # a DPO loss is no per-token NLL
    assert not (run_dir / "adapter" / REF_ADAPTER).exists()  # the saved adapter is the policy alone
    # The policy, loaded from the run like any adapter run, likes the held-out chosen replies better than the SFT
    # policy did and the rejected ones less; by hand, its implicit reward ranks every held-out pair right.
    tokenizer = load_tokenizer(ModelConfig(str(run_dir)))
    policy = load_causal_lm(ModelConfig(str(run_dir)), tokenizer)
    before = load_causal_lm(ModelConfig(str(sft_run)), tokenizer)
    gain = [_logprob(policy, tokenizer, q, f"{KEYWORD} {a}") - _logprob(before, tokenizer, q, f"{KEYWORD} {a}")
            for q, a in HELDOUT_QA]
    loss = [_logprob(policy, tokenizer, q, f"Sorry, {a}") - _logprob(before, tokenizer, q, f"Sorry, {a}")
            for q, a in HELDOUT_QA]
    assert sum(gain) / len(gain) > 0.5 and sum(loss) / len(loss) < -0.5
    assert all(g > r for g, r in zip(gain, loss))


@pytest.mark.parametrize("method", ["lora", "qlora", "ia3"])
def test_reference_is_the_sft_policy_in_the_same_weights(tiny_model_dir, data, tmp_path, method):
    """Trap 9 (huggingface/trl 2421, 6403): no second model, and the reference log-probs are the SFT policy's, by
    hand, after the policy has moved. (IA)3 is here because TRL's own copy of the adapter misses its weights."""
    from trl.trainer.utils import use_adapter

    parent = _sft_run(tiny_model_dir, data, tmp_path / "sft", method=method, steps=4)
    cfg = _cfg(parent, data, tmp_path / "dpo", train={"max_steps": 4})
    trainer = dpo.build_trainer(cfg, tmp_path / "dpo")
    model = trainer.model
    assert trainer.ref_model is None and set(model.peft_config) == {"default", REF_ADAPTER}
    # One copy of the weights: beside the two adapters, the trainer holds exactly as many as the base alone has.
    adapters = re.compile(rf"\.(default|{REF_ADAPTER})(\.|$)")
    assert sum(p.numel() for n, p in model.named_parameters() if not adapters.search(n)) \
        == sum(p.numel() for p in load_causal_lm(cfg.model).parameters())
    trainer.train()
    model.eval()
    sft_policy = load_causal_lm(dataclasses.replace(cfg.model, name_or_path=str(parent)), trainer.processing_class)
    question, answer = HELDOUT_QA[0]
    reply = f"{KEYWORD} {answer}"
    with use_adapter(model, REF_ADAPTER):  # what DPOTrainer runs for the reference
        reference = _logprob(model, trainer.processing_class, question, reply)
    assert reference == pytest.approx(_logprob(sft_policy, trainer.processing_class, question, reply), abs=1e-4)
    assert abs(_logprob(model, trainer.processing_class, question, reply) - reference) > 1e-3  # the policy moved


def test_full_weights_parent_reference_is_the_adapter_switched_off(tiny_model_dir, data, tmp_path):
    from trl.trainer.utils import use_adapter

    parent = _sft_run(tiny_model_dir, data, tmp_path / "sft", method="full", steps=3)
    cfg = _cfg(parent, data, tmp_path / "dpo", peft={"method": "lora", "r": 4}, train={"max_steps": 3})
    dpo.resolve_parent(cfg)
    assert cfg.model.name_or_path == str((parent / "model").resolve())
    assert dpo.reference_kind(cfg) == "adapter_disabled"
    trainer = dpo.build_trainer(cfg, tmp_path / "dpo")
    assert trainer.ref_model is None and REF_ADAPTER not in trainer.model.peft_config
    trainer.train()
    trainer.model.eval()
    question, answer = HELDOUT_QA[1]
    with use_adapter(trainer.model, None):  # TRL's reference when there is no "ref" adapter: adapters disabled
        reference = _logprob(trainer.model, trainer.processing_class, question, answer)
    sft_policy = load_causal_lm(ModelConfig(str(parent / "model")), trainer.processing_class)
    assert reference == pytest.approx(_logprob(sft_policy, trainer.processing_class, question, answer), abs=1e-4)
    # Training every weight leaves nothing to switch off: only then is the reference a second copy.
    full = _cfg(parent, data, tmp_path / "dpo-full", peft={"method": "full"})
    assert dpo.build_trainer(full, tmp_path / "dpo-full").ref_model is not None
    assert dpo.reference_kind(full) == "separate_copy"


def test_recipe_errors_name_the_field(sft_run, data, tmp_path):
    from trl import DPOConfig

    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    assert set(dpo.LOSS_TYPES) == set(re.findall(r"`'(\w+)'`", help_text))  # the list TRL 1.16 implements
    with pytest.raises(ValueError, match="loss_type: expected one of sigmoid"):
        _cfg(sft_run, data, tmp_path / "x", loss_type="dpo")
    with pytest.raises(ValueError, match="loss_type"):
        _cfg(sft_run, data, tmp_path / "x", loss_type=["sigmoid", "kto"])
    with pytest.raises(ValueError, match="beta: expected a number > 0"):
        _cfg(sft_run, data, tmp_path / "x", beta=0)
    with pytest.raises(ValueError, match="peft: adalora cannot train"):
        _cfg(sft_run, data, tmp_path / "x", peft={"method": "adalora"})
    assert _cfg(sft_run, data, tmp_path / "x", loss_type=["sigmoid", "sft"]).loss_type == ["sigmoid", "sft"]
    # The parent is an earlier command's output: a recipe loads without it, and the stage checks it when it runs.
    missing = _cfg(tmp_path / "nowhere", data, tmp_path / "x")
    with pytest.raises(ConfigError, match="parent: .*not found"):
        dpo.run(missing)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="peft: .* DPO continues"):
        dpo.resolve_parent(_cfg(sft_run, data, tmp_path / "x", peft={"method": "lora"}))
    Run.start(tmp_path / "rm", "rm", {"output_dir": "rm"}, model={"name_or_path": "some/model"}).finish()
    with pytest.raises(ConfigError, match="parent: .* is a finished rm run; DPO starts from a finished sft or dpo"):
        dpo.resolve_parent(_cfg(tmp_path / "rm", data, tmp_path / "x"))


@pytest.mark.parametrize("recipe", ["dpo.yaml", "dpo-smollm.yaml"])
def test_shipped_recipes_start_from_the_matching_sft_run(recipe):
    cfg = load_stage_config("dpo", SAMPLES / recipe)
    sft_recipe = load_stage_config("sft", SAMPLES / recipe.replace("dpo", "sft"))
    assert cfg.parent == sft_recipe.output_dir and cfg.data[0].path == sft_recipe.data[0].path == "out/telecom"
    assert cfg.output_dir.startswith("out/runs/dpo") and cfg.peft is None and cfg.loss_type in dpo.LOSS_TYPES


def test_cli_runs_a_recipe_and_reports_a_bad_loss_type(sft_run, data, tmp_path, capsys):
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(f"parent: {sft_run}\ndata:\n  path: {data['pref']}\n  eval_split: null\n"
                      f"output_dir: {tmp_path / 'cli-run'}\nbeta: 0.2\n"
                      "train:\n  max_steps: 2\n  batch_size: 4\n  max_length: 64\n")
    assert main(["align", "dpo", "--config", str(recipe), "--set", "loss_type=ipo"]) == 0
    record = load_run(tmp_path / "cli-run")
    assert record["config"]["loss_type"] == "ipo" and record["config"]["beta"] == 0.2
    assert record["parent"]["path"] == str(sft_run.resolve())
    assert main(["align", "dpo", "--config", str(recipe), "--set", "loss_type=dpo"]) == 2
    assert "loss_type: expected one of sigmoid" in capsys.readouterr().err
