"""Rewards for the online stages on the tiny model: an rm run scores prompt + completion exactly as
``alignment.reward.score`` does (frozen, batched, read at the last real token), Python rules take TRL's signature,
TRL's own reward functions pass through, and a bad ``rewards:`` entry is an error that names its field."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from alignment import reward
from alignment.models import ModelConfig, load_sequence_classifier, load_tokenizer
from alignment.reward_fn import (
    RewardModelReward,
    RewardSpec,
    as_reward_specs,
    load_reward,
    reward_functions,
    reward_record,
)
from alignment.runs import Run
from alignment.synthetic import make_preference_task
from rlhf.config import ConfigError


def make_rm_run(model_dir: Path, root: Path) -> Path:
    """A finished rm run on the synthetic product-rule pairs: LoRA with its score head, 4 steps (about 1 s)."""
    task = make_preference_task(root / "task", n_train=32, n_test=8)
    cfg = reward.Config(model={"name_or_path": str(model_dir)}, data=[{"path": str(task)}], output_dir=str(root / "rm"),
                        peft={"method": "lora", "r": 4},
                        train={"max_steps": 4, "batch_size": 8, "max_length": 128, "learning_rate": 1e-2,
                               "save_steps": 100})
    return reward.run(cfg)


@pytest.fixture(scope="module")
def rm_run(tiny_model_dir, tmp_path_factory) -> Path:
    return make_rm_run(tiny_model_dir, tmp_path_factory.mktemp("rm"))


def _turns(question: str, answer: str) -> tuple[list[dict], list[dict]]:
    return [{"role": "user", "content": question}], [{"role": "assistant", "content": answer}]


PAIRS = [_turns("Does Gale Unlimited work abroad?", "Gale Unlimited works in Roam Zone 1 at no extra cost."),
         _turns("Does Gale Unlimited work abroad?", "Spend Cap works in Roam Zone 1."),
         _turns("Hi. How do I pay for Fibre 900? Thanks.", "Fibre 900 is charged on your monthly bill."),
         _turns("Can I cancel Travel Pass?", "Yes.")]  # lengths differ, so the batch is padded


def test_rm_run_scores_like_reward_score(rm_run):
    prompts, completions = [p for p, _ in PAIRS], [c for _, c in PAIRS]
    fn = load_reward(RewardSpec(source=str(rm_run)))
    assert isinstance(fn, RewardModelReward) and fn.__name__ == rm_run.name  # TRL logs rewards/<name>/mean
    assert not fn.model.training and not any(p.requires_grad for p in fn.model.parameters())  # frozen
    # what TRL passes: prompts, completions and keyword columns it has no use for here
    rewards = fn(prompts=prompts, completions=completions, completion_ids=[[1]] * 4, trainer_state=None)
    tokenizer = load_tokenizer(ModelConfig(str(rm_run)))
    model = load_sequence_classifier(ModelConfig(str(rm_run)), tokenizer)
    assert rewards == pytest.approx(reward.score(model, tokenizer, [p + c for p, c in PAIRS]), abs=1e-6)
    # By hand, one conversation at a time without padding: the head reads the last real token of each.
    import torch

    for (prompt, completion), value in zip(PAIRS, rewards):
        ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            assert model(input_ids=torch.tensor([ids])).logits[0, 0].item() == pytest.approx(value, abs=1e-5)
    one_by_one = load_reward(RewardSpec(source=str(rm_run), batch_size=1))
    assert one_by_one(prompts, completions) == pytest.approx(rewards, abs=1e-5)  # batching changes nothing
    assert len({round(r, 6) for r in rewards}) == len(rewards)  # a trained head, not a constant


def test_python_rule_takes_trls_signature():
    fn = load_reward(RewardSpec(source="alignment.synthetic:rule_reward"))
    assert fn.__name__ == "rule_reward"
    system = {"role": "system", "content": "You answer questions about Spend Cap and every other plan."}
    prompts = [[system, *p] for p, _ in PAIRS]  # the rule reads the last user turn, not the system prompt
    assert fn(prompts=prompts, completions=[c for _, c in PAIRS]) == [1.0, 0.0, 1.0, 0.0]
    texts = [p[0]["content"] for p, _ in PAIRS], [c[0]["content"] for _, c in PAIRS]
    assert fn(prompts=texts[0], completions=texts[1]) == [1.0, 0.0, 1.0, 0.0]  # standard (non-chat) prompts


def test_trl_reward_functions_pass_through():
    from trl.rewards import think_format_reward

    assert load_reward(RewardSpec(source="trl.rewards:think_format_reward")) is think_format_reward
    renamed = load_reward(RewardSpec(source="trl.rewards:think_format_reward", name="format"))
    assert renamed.__name__ == "format"
    completions = [[{"role": "assistant", "content": "<think>x</think>y"}], [{"role": "assistant", "content": "y"}]]
    assert renamed(prompts=[[], []], completions=completions) == [1.0, 0.0]


def test_several_rewards_with_weights_and_fingerprints(rm_run):
    specs = as_reward_specs(["alignment.synthetic:rule_reward", {"source": str(rm_run), "weight": -0.5}])
    assert [(s.metric_name, s.weight) for s in specs] == [("rule_reward", 1.0), (rm_run.name, -0.5)]
    assert [f.__name__ for f in reward_functions(specs)] == ["rule_reward", rm_run.name]
    rule, model = (reward_record(s, i) for i, s in enumerate(specs))
    import alignment.synthetic

    assert rule["kind"] == "function"
    assert rule["source_sha256"] == hashlib.sha256(Path(alignment.synthetic.__file__).read_bytes()).hexdigest()
    assert model["kind"] == "reward_model" and model["source"] == str(rm_run.resolve())
    assert model["fingerprint"] == hashlib.sha256((rm_run / "run.json").read_bytes()).hexdigest()
    assert as_reward_specs(str(rm_run))[0].source == str(rm_run)  # one source alone is a list of one


def test_bad_specs_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"^rewards: expected at least one"):
        as_reward_specs([])
    with pytest.raises(ValueError, match=r"^rewards\[0\]\.source: expected an rm run folder"):
        as_reward_specs([{"source": ""}])
    with pytest.raises(ValueError, match=r"^rewards\[1\]\.weight: expected a number, got 'heavy'"):
        as_reward_specs(["a:b", {"source": "c:d", "weight": "heavy"}])
    with pytest.raises(ValueError, match=r"^rewards\[0\]: unknown key\(s\) src; known keys: source, weight"):
        as_reward_specs([{"src": "a:b"}])
    with pytest.raises(ValueError, match=r"^rewards\[1\]\.name: 'f' already names rewards\[0\]"):
        as_reward_specs(["a:f", "b:f"])
    with pytest.raises(ValueError, match=r"^rewards\[0\]\.batch_size: expected an integer >= 1"):
        as_reward_specs([{"source": "a:b", "batch_size": 0}])
    checks = {
        str(tmp_path / "nowhere"): r"rewards\[0\]\.source: .*nowhere not found: expected an `rlhf align rm` run",
        "no_such_module_xyz:f": r"rewards\[0\]\.source: cannot import module 'no_such_module_xyz'",
        "alignment.synthetic:nope": r"rewards\[0\]\.source: module 'alignment.synthetic' has no function 'nope'",
        str(tmp_path): r"rewards\[0\]\.source: .*run\.json",  # a folder that is not a run
    }
    Run.start(tmp_path / "sft", "sft", {"output_dir": "sft"}, model={"name_or_path": "some/model"}).finish()
    checks[str(tmp_path / "sft")] = r"rewards\[0\]\.source: .*sft is a finished sft run; a reward model is a finish"
    for source, message in checks.items():
        with pytest.raises(ConfigError, match=message):
            reward_record(RewardSpec(source=source), 0)
        with pytest.raises(ConfigError, match=message):
            load_reward(RewardSpec(source=source))
