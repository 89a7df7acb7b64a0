"""The GRPO stage on the tiny model: from an SFT run, an easy Python reward rises within 20 steps and the run folder
records its lineage; an rm run works as the reward; prompts come from `prompt` or `messages` rows; recipe errors
name the field; the shipped recipe and the CLI. test_rloo.py reuses the fixtures and helpers here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from alignment import grpo, online, sft
from alignment.cli import load_stage_config
from alignment.models import ModelConfig, load_causal_lm, load_tokenizer
from alignment.policy import REF_ADAPTER
from alignment.runs import load_run
from rlhf.cli import main
from rlhf.config import ConfigError
from tests.alignment.test_reward_fn import make_rm_run

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "telecom"
TOPICS = ["roaming", "my bill", "my SIM", "5G", "broadband", "an eSIM", "voicemail", "my data", "my contract",
          "a top-up", "wifi calling", "my hub"]
QUESTIONS = ["How do I fix {}?", "Where can I check {}?", "Who can help with {}?", "What changed with {}?"]
# The SFT policy learns these four replies; one in four mentions the app, so the toy reward starts low but not at 0.
ANSWERS = ["Open the app and check {}.", "Call support about {}.", "Restart your phone, then check {}.",
           "Visit a store about {}."]
TOY_REWARD = f"{__name__}:mentions_app"


def mentions_app(prompt_text: str, response_text: str) -> float:
    """The easy toy reward: 1 when the reply mentions the app (one of the four answers the SFT policy knows)."""
    return float("app" in response_text.lower())


INTERRUPT = {"at_step": None, "calls": 0}  # the resume test's switch: the reward below fails once at that step


def mentions_app_or_fail(prompts: list, completions: list, trainer_state=None, **kwargs) -> list[float]:
    """mentions_app in TRL's own signature, failing once at INTERRUPT's step (a job killed mid-run)."""
    INTERRUPT["calls"] += 1
    if trainer_state is not None and trainer_state.global_step == INTERRUPT["at_step"]:
        INTERRUPT["at_step"] = None
        raise RuntimeError("interrupted")
    return [mentions_app("", c[0]["content"]) for c in completions]


def _qa(topics: list[str]) -> list[tuple[str, str]]:
    return [(q.format(t), ANSWERS[(i + j) % len(ANSWERS)].format(t))
            for i, t in enumerate(topics) for j, q in enumerate(QUESTIONS)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Conversations (SFT and a `messages` prompt source) and prompts (the `prompt` column), train + test splits."""
    root = tmp_path_factory.mktemp("online-data")
    splits = {"train": _qa(TOPICS[:10]), "test": _qa(TOPICS[10:])[:4]}
    rows = {"conv": lambda q, a: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
            "prompts": lambda q, a: {"prompt": [{"role": "user", "content": q}]}}
    for name, make in rows.items():
        (root / name).mkdir()
        for split, qa in splits.items():
            (root / name / f"{split}.jsonl").write_text("".join(json.dumps(make(q, a)) + "\n" for q, a in qa))
    return {name: root / name for name in rows}


def sft_run(model_dir: Path, data: dict[str, Path], out: Path, method: str = "full", steps: int = 60) -> Path:
    """An SFT policy that has learnt the four replies (a full fine-tune: LoRA barely moves a random-init base)."""
    train = {"max_steps": steps, "batch_size": 8, "max_length": 64, "learning_rate": 1e-2, "save_steps": 100}
    return sft.run(sft.Config(model={"name_or_path": str(model_dir)},
                              data={"path": str(data["conv"]), "eval_split": None}, output_dir=str(out),
                              peft={"method": method, "r": 8}, train=train))


@pytest.fixture(scope="module")
def parent(tiny_model_dir, data, tmp_path_factory) -> Path:
    return sft_run(tiny_model_dir, data, tmp_path_factory.mktemp("sft") / "run")


def online_cfg(module, parent: Path, folders: dict[str, Path], out: Path, **over):
    """A stage Config for the toy task: 4 completions per prompt, 2 prompts per step, short completions."""
    train = {"max_steps": 20, "batch_size": 8, "max_length": 64, "learning_rate": 3e-3, "logging_steps": 1,
             "save_steps": 100, **over.pop("train", {})}
    if (parent / "model").is_dir():
        over.setdefault("peft", {"method": "lora", "r": 8})
    return module.Config(parent=str(parent),
                         data=over.pop("data", [{"path": str(folders["prompts"]), "eval_split": None}]),
                         rewards=over.pop("rewards", [TOY_REWARD]), output_dir=str(out),
                         sampling={"num_generations": 4, "max_completion_length": 16, **over.pop("sampling", {})},
                         train=train, **over)


def logged_rewards(run_dir: Path) -> list[float]:
    state = json.loads(next((run_dir / "checkpoints").glob("checkpoint-*/trainer_state.json")).read_text())
    return [entry["reward"] for entry in state["log_history"] if "reward" in entry]


def assert_trained_policy_run(run_dir: Path, parent: Path, stage: str) -> dict:
    """What every online run folder holds: lineage, the policy's adapter alone, weights that moved off the parent."""
    import torch

    record = load_run(run_dir)
    assert record["status"] == "finished" and record["stage"] == stage
    assert record["parent"]["path"] == str(parent.resolve()) and record["parent"]["stage"] == "sft"
    assert record["model"]["name_or_path"] == str((parent / "model").resolve())  # the parent's weights are the base
    assert (run_dir / "adapter" / "adapter_config.json").is_file() and (run_dir / "logs").is_dir()
    assert not (run_dir / "adapter" / REF_ADAPTER).exists()  # the saved adapter is the policy alone
    tokenizer = load_tokenizer(ModelConfig(str(run_dir)))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "How do I fix roaming?"}], tokenize=True,
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        policy = load_causal_lm(ModelConfig(str(run_dir)), tokenizer)(input_ids=ids).logits
        before = load_causal_lm(ModelConfig(str(parent / "model")), tokenizer)(input_ids=ids).logits
    assert (policy - before).abs().max() > 1e-2  # the adapter trained (and reloads onto the parent's weights)
    return record


def test_grpo_raises_an_easy_reward_and_records_the_run(parent, data, tmp_path):
    cfg = online_cfg(grpo, parent, data, tmp_path / "grpo")
    run_dir = grpo.run(cfg)
    record = assert_trained_policy_run(run_dir, parent, "grpo")
    assert record["reference"]["kind"] == "none"  # GRPO's default beta 0: no reference kept
    assert record["config"]["reward_records"][0] == {
        "name": "mentions_app", "weight": 1.0, "kind": "function", "source": TOY_REWARD,
        "source_sha256": record["config"]["reward_records"][0]["source_sha256"]}
    metrics = record["metrics"]
    assert metrics["global_step"] == 20 and metrics["train_prompts"] == 40 and metrics["prompts_dropped_too_long"] == 0
    rewards = logged_rewards(run_dir)  # the mean of 8 completions per step
    assert len(rewards) == 20 and metrics["train_reward_first"] == rewards[0]
    # measured: 0.50 over the first five steps, 0.88 over the last five (seeds 0 and 1: 0.30 -> 0.88, 0.33 -> 0.88)
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.2
    before = (run_dir / "run.json").read_bytes()
    assert grpo.run(online_cfg(grpo, parent, data, tmp_path / "grpo")) == run_dir  # same inputs: nothing to do
    assert (run_dir / "run.json").read_bytes() == before


def test_reward_model_run_as_the_reward(tiny_model_dir, parent, data, tmp_path):
    """An rm run beside a Python rule, prompts taken from `messages` rows, a held-out reward at the end."""
    rm = make_rm_run(tiny_model_dir, tmp_path)
    cfg = online_cfg(grpo, parent, data, tmp_path / "grpo", rewards=[str(rm), {"source": TOY_REWARD, "weight": 0.5}],
                     data=[{"path": str(data["conv"])}], beta=0.04, train={"max_steps": 2})
    run_dir = grpo.run(cfg)
    record = assert_trained_policy_run(run_dir, parent, "grpo")
    metrics = record["metrics"]
    assert {"rewards/rm/mean", "rewards/mentions_app/mean", "kl", "eval_reward"} <= set(metrics)
    assert metrics["eval_prompts"] == 4 and metrics["global_step"] == 2
    model_reward = record["config"]["reward_records"][0]
    assert model_reward["kind"] == "reward_model" and model_reward["source"] == str(rm.resolve())
    assert record["reference"]["kind"] == "adapter_disabled"  # a fresh adapter on full weights: switched off


def test_an_interrupted_run_resumes_to_the_same_adapter(parent, data, tmp_path):
    """Field notes trap 8: refused without --resume, then continued from its last checkpoint (optimizer, scheduler,
    RNG and sampler position), it ends where an uninterrupted run ends."""
    from safetensors.torch import load_file

    def cfg(out: Path, **over):
        return online_cfg(grpo, parent, data, out, rewards=[f"{__name__}:mentions_app_or_fail"],
                          train={"max_steps": 4, "save_steps": 2}, **over)

    straight = grpo.run(cfg(tmp_path / "straight"))
    INTERRUPT["at_step"] = 2  # after checkpoint-2 is written
    with pytest.raises(RuntimeError, match="interrupted"):
        grpo.run(cfg(tmp_path / "resumed"))
    assert load_run(tmp_path / "resumed")["status"] == "failed"
    with pytest.raises(ConfigError, match="pass --resume to continue it from checkpoint-2"):
        grpo.run(cfg(tmp_path / "resumed"))
    INTERRUPT["calls"] = 0
    resumed = grpo.run(cfg(tmp_path / "resumed", resume=True))
    record = load_run(resumed)
    assert record["status"] == "finished" and record["metrics"]["global_step"] == 4
    assert INTERRUPT["calls"] == 2  # steps 3 and 4 only: it continued, it did not start over
    ours, theirs = (load_file(str(run / "adapter" / "adapter_model.safetensors")) for run in (resumed, straight))
    assert ours.keys() == theirs.keys()
    assert all((ours[k] - theirs[k]).abs().max() <= 1e-6 for k in ours)


def test_prompts_are_distinct_and_fit_the_context(parent, data, tmp_path):
    cfg = online_cfg(grpo, parent, data, tmp_path / "x", data=[{"path": str(data["conv"]), "eval_split": None}])
    tokenizer = load_tokenizer(ModelConfig(str(parent / "model")))
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in _qa(TOPICS)]
    import datasets

    ds = datasets.Dataset.from_list(rows + rows[:5])  # preference data repeats a prompt once per pair
    prompts, dropped = online.to_prompts(ds, tokenizer, cfg)
    assert dropped == 0 and prompts["prompt"] == [r["messages"][:1] for r in rows]  # each once, reply removed
    lengths = [len(tokenizer.apply_chat_template(r["messages"][:1], add_generation_prompt=True, return_dict=True)
                   ["input_ids"]) for r in rows]
    room = sorted(lengths)[len(lengths) // 2]
    cfg.train.max_length = cfg.sampling.max_completion_length + room  # longer prompts are dropped, not truncated
    prompts, dropped = online.to_prompts(ds, tokenizer, cfg)
    assert dropped == sum(n > room for n in lengths) > 0 and len(prompts) == sum(n <= room for n in lengths) > 0


def test_recipe_errors_name_the_field(parent, data, tmp_path):
    from trl import GRPOConfig

    help_text = GRPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    supported = help_text.split("Supported values are ")[1].split(". ")[0]
    assert set(grpo.LOSS_TYPES) == set(re.findall(r"'(\w+)'", supported))  # the list TRL 1.16 implements
    bad = {"loss_type: expected one of grpo": {"loss_type": "ppo"},
           "scale_rewards: expected one of group": {"scale_rewards": "std"},
           "beta: expected a number >= 0": {"beta": -0.1},
           "num_iterations: expected an integer >= 1": {"num_iterations": 0},
           "sampling.num_generations: expected an integer >= 2": {"sampling": {"num_generations": 1}},
           "sampling.top_p: expected a number in": {"sampling": {"top_p": 1.5}},
           r"train.batch_size: batch_size \* grad_accum \(6 \* 1\) counts completions": {"train": {"batch_size": 6}},
           "train.eval_batch_size: must be a multiple": {"train": {"eval_batch_size": 2},
                                                         "data": [{"path": str(data["prompts"])}]},
           r"rewards\[0\]\.weight: expected a number": {"rewards": [{"source": TOY_REWARD, "weight": None}]},
           "peft: adalora cannot train beside": {"peft": {"method": "adalora"}, "beta": 0.1}}
    for message, over in bad.items():
        with pytest.raises(ValueError, match=message):
            online_cfg(grpo, parent, data, tmp_path / "x", **over)
    # Earlier commands' outputs are checked when the stage runs, before any run folder exists.
    run_time = {"parent: .*not found": {"parent": tmp_path / "nowhere"},
                r"rewards\[0\]\.source: .*nowhere not found": {"rewards": [str(tmp_path / "nowhere")]}}
    for message, over in run_time.items():
        cfg = online_cfg(grpo, over.pop("parent", parent), data, tmp_path / "x", **over)
        with pytest.raises(ConfigError, match=message):
            grpo.run(cfg)
        assert not (tmp_path / "x").exists()


def test_shipped_recipe_starts_from_the_sft_run_and_scores_with_the_rm_run():
    cfg = load_stage_config("grpo", SAMPLES / "grpo.yaml")
    assert cfg.parent == load_stage_config("sft", SAMPLES / "sft.yaml").output_dir
    assert cfg.rewards[0].source == load_stage_config("rm", SAMPLES / "rm.yaml").output_dir
    assert cfg.output_dir == "out/runs/grpo" and cfg.loss_type in grpo.LOSS_TYPES and cfg.peft.method == "lora"


def write_recipe(path: Path, parent: Path, data: dict[str, Path], output_dir: Path) -> Path:
    """A 2-step recipe for the toy task, as a user would write it."""
    path.write_text(f"parent: {parent}\ndata:\n  path: {data['prompts']}\n  eval_split: null\n"
                    f"rewards:\n  - source: {TOY_REWARD}\noutput_dir: {output_dir}\n"
                    "peft:\n  method: lora\n  r: 4\nsampling:\n  num_generations: 4\n  max_completion_length: 8\n"
                    "train:\n  max_steps: 2\n  batch_size: 8\n  max_length: 64\n")
    return path


def test_cli_runs_a_recipe_and_reports_a_bad_loss_type(parent, data, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "grpo.yaml", parent, data, tmp_path / "cli-run")
    assert main(["align", "grpo", "--config", str(recipe), "--set", "loss_type=dr_grpo", "--set",
                 "scale_rewards=none"]) == 0
    record = load_run(tmp_path / "cli-run")
    assert record["config"]["loss_type"] == "dr_grpo" and record["config"]["scale_rewards"] == "none"
    assert main(["align", "grpo", "--config", str(recipe), "--set", "loss_type=ppo"]) == 2
    assert "loss_type: expected one of grpo" in capsys.readouterr().err
