"""The RLOO stage on the tiny model: from an SFT run, the easy toy reward rises against the KL penalty and the run
folder records its lineage; with a continued (IA)3 adapter the reference is exactly the parent policy, where TRL's
own copy would leave it at the raw base; an rm run works as the reward; recipe errors; the shipped recipe; the CLI.
Fixtures and helpers come from test_grpo.py (same toy task)."""

from __future__ import annotations

import pytest

from alignment import online, rloo
from alignment.cli import load_stage_config
from alignment.models import ModelConfig, load_causal_lm
from alignment.policy import REF_ADAPTER
from alignment.runs import load_run
from rlhf.cli import main
from tests.alignment import test_grpo as toy
from tests.alignment.test_grpo import (
    SAMPLES,
    assert_trained_policy_run,
    logged_rewards,
    online_cfg,
    sft_run,
    write_recipe,
)
from tests.alignment.test_reward_fn import make_rm_run

data, parent = toy.data, toy.parent  # the toy task's module-scoped fixtures: prompts, conversations, the SFT run


def share_of_e(prompt_text: str, response_text: str) -> float:
    """A reward that varies even among the near-random replies of a barely trained policy, so every step updates."""
    return response_text.count("e") / max(1, len(response_text))


def test_rloo_raises_an_easy_reward_against_the_kl_penalty(parent, data, tmp_path):
    run_dir = rloo.run(online_cfg(rloo, parent, data, tmp_path / "rloo"))
    record = assert_trained_policy_run(run_dir, parent, "rloo")
    # RLOO's default beta 0.05 needs a reference: the parent's weights with the fresh adapter switched off
    assert record["reference"] == {"kind": "adapter_disabled", "description": online.REFERENCES["adapter_disabled"],
                                   "beta": 0.05}
    metrics = record["metrics"]
    assert metrics["global_step"] == 20 and "kl" in metrics and metrics["train_reward_first"] is not None
    rewards = logged_rewards(run_dir)
    # measured: 0.42 over the first five steps, 0.72 over the last five (seeds 0 and 1: 0.25 -> 0.75, 0.38 -> 0.55)
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.15


def test_reference_is_the_parent_adapter_for_every_method(tiny_model_dir, data, tmp_path):
    """Trap 9 (huggingface/trl 4723): TRL copies the continued adapter into `ref` by the name pattern `.default.`,
    which (IA)3's ParameterDict weights (`ia3_l.default`) do not match; pin_reference loads the parent's adapter."""
    import torch
    from trl.trainer.utils import use_adapter

    ia3_parent = sft_run(tiny_model_dir, data, tmp_path / "sft", method="ia3", steps=4)
    cfg = online_cfg(rloo, ia3_parent, data, tmp_path / "rloo", rewards=[f"{__name__}:share_of_e"],
                     train={"max_steps": 2, "learning_rate": 1e-2})
    assert cfg.peft is None  # an adapter parent: its adapter is continued
    trainer, _ = rloo.build_trainer(cfg, tmp_path / "rloo")
    model = trainer.model
    assert set(model.peft_config) == {"default", REF_ADAPTER} and trainer.ref_model is None
    ia3_weights = [name for name, _ in model.named_parameters() if "ia3_l" in name]
    assert ia3_weights and not any(".default." in name for name in ia3_weights)  # what TRL's copy misses
    trainer.train()  # the policy adapter moves; the reference must stay the parent
    model.eval()
    ids = torch.tensor([trainer.processing_class("Open the app and check roaming.")["input_ids"]])
    parent_policy = load_causal_lm(ModelConfig(str(ia3_parent)), trainer.processing_class)
    with torch.no_grad(), use_adapter(model, REF_ADAPTER):  # what RLOOTrainer runs for the reference
        reference = model(input_ids=ids).logits
    with torch.no_grad():
        assert torch.allclose(reference, parent_policy(input_ids=ids).logits, atol=1e-5)
        assert not torch.allclose(model(input_ids=ids).logits, reference, atol=1e-4)  # the policy moved


def test_reward_model_run_as_the_reward(tiny_model_dir, parent, data, tmp_path):
    rm = make_rm_run(tiny_model_dir, tmp_path)
    cfg = online_cfg(rloo, parent, data, tmp_path / "rloo", rewards=[{"source": str(rm), "name": "support_rm"}],
                     train={"max_steps": 2}, normalize_advantages=True, reward_clip_range=[-5, 5])
    run_dir = rloo.run(cfg)
    record = assert_trained_policy_run(run_dir, parent, "rloo")
    assert {"rewards/support_rm/mean", "kl"} <= set(record["metrics"]) and record["metrics"]["global_step"] == 2
    assert record["config"]["reward_records"][0]["kind"] == "reward_model"


def test_recipe_errors_name_the_field(parent, data, tmp_path):
    for clip in ([1, -1], [0], "wide", [0, True]):
        with pytest.raises(ValueError, match="reward_clip_range: expected"):
            online_cfg(rloo, parent, data, tmp_path / "x", reward_clip_range=clip)
    with pytest.raises(ValueError, match="normalize_advantages: expected true or false"):
        online_cfg(rloo, parent, data, tmp_path / "x", normalize_advantages="yes")
    with pytest.raises(ValueError, match="sampling.temperature: expected a number > 0"):
        online_cfg(rloo, parent, data, tmp_path / "x", sampling={"temperature": 0})
    # RLOOTrainer keeps a `ref` copy of the adapter even at beta 0, and PEFT allows one AdaLoRA adapter per model
    with pytest.raises(ValueError, match="peft: adalora cannot train beside the frozen reference copy"):
        online_cfg(rloo, parent, data, tmp_path / "x", peft={"method": "adalora"}, beta=0)


def test_shipped_recipe_starts_from_the_sft_run_and_scores_with_the_rm_run():
    cfg = load_stage_config("rloo", SAMPLES / "rloo.yaml")
    assert cfg.parent == load_stage_config("sft", SAMPLES / "sft.yaml").output_dir
    assert cfg.rewards[0].source == load_stage_config("rm", SAMPLES / "rm.yaml").output_dir
    assert cfg.output_dir == "out/runs/rloo" and cfg.beta > 0 and cfg.peft.method == "lora"


def test_cli_runs_a_recipe(parent, data, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "rloo.yaml", parent, data, tmp_path / "cli-run")
    assert main(["align", "rloo", "--config", str(recipe), "--set", "beta=0"]) == 0
    record = load_run(tmp_path / "cli-run")
    assert record["config"]["beta"] == 0 and record["reference"]["kind"] == "none"
    assert main(["align", "rloo", "--config", str(recipe), "--set", "reward_clip_range=[1,0]"]) == 2
    assert "reward_clip_range: expected [low, high]" in capsys.readouterr().err
