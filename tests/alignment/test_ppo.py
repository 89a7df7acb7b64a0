"""The PPO stage on the tiny model: every role on one copy of the base weights (counted), the reference is exactly
the SFT policy, an adapter reward scores exactly like the reward run loaded on its own, PPO raises a programmatic
reward with bounded KL, QLoRA trains through 4-bit layers, resume after a failure matches an uninterrupted run,
run records, recipes and the CLI; and, end to end, SFT -> reward model -> PPO beats the SFT policy on held-out
prompts of the synthetic task (alignment/synthetic.py), judged by the reward model *and* by the rule itself.

Settings were measured on one CPU thread; numbers are in the comments."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import warnings
from pathlib import Path

import pytest

from alignment import ppo, reward, roles, sft
from alignment.cli import load_stage_config
from alignment.models import ModelConfig, load_causal_lm, load_sequence_classifier, load_tokenizer
from alignment.rollout import load_prompts
from alignment.runs import RunError, load_run
from rlhf.cli import main
from rlhf.config import ConfigError

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "telecom"
TARGET = ("app", "plan", "data", "bill", "phone", "call", "text", "roaming")  # the words the toy reward pays for
OTHER = ("the", "your", "check", "help", "can", "we", "you", "it")
TOPICS = ("roaming", "my bill", "my SIM", "5G", "broadband", "an eSIM", "voicemail", "my data", "my contract",
          "a top-up", "wifi calling", "my hub")
FAIL_AT_CALL: dict[str, int | None] = {"call": None, "calls": 0}  # flaky_share's switch (the resume test)


def target_share(prompt_text: str, response_text: str) -> float:
    """The toy reward: the share of the response's words that are TARGET words (0 for an empty response)."""
    words = re.findall(r"[a-z]+", response_text.lower())
    return sum(w in TARGET for w in words) / len(words) if words else 0.0


def flaky_share(prompt_text: str, response_text: str) -> float:
    """target_share, failing once at call FAIL_AT_CALL["call"]: a reward service that goes down mid-run."""
    FAIL_AT_CALL["calls"] += 1
    if FAIL_AT_CALL["calls"] == FAIL_AT_CALL["call"]:
        raise ConnectionError("reward service unavailable")
    return target_share(prompt_text, response_text)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """Conversations whose answers are "Sure:" + three words drawn from TARGET + OTHER (so an SFT policy says about
    half target words), plus preference pairs (the chosen answer has more target words); held-out topics in test."""
    folder = tmp_path_factory.mktemp("toy")
    rng = random.Random(0)
    words = TARGET + OTHER
    for split, topics, n in (("train", TOPICS[:9], 256), ("test", TOPICS[9:], 24)):
        conv, pref = [], []
        for _ in range(n):
            prompt = [{"role": "user", "content": f"Tell me about {rng.choice(topics)}."}]
            answer = "Sure: " + " ".join(rng.choice(words) for _ in range(3)) + "."
            conv.append({"messages": prompt + [{"role": "assistant", "content": answer}]})
            good, bad = (" ".join(rng.choice(pool) for _ in range(3)) for pool in (TARGET, OTHER))
            pref.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": f"Sure: {good}."}],
                         "rejected": [{"role": "assistant", "content": f"Sure: {bad}."}]})
        for kind, rows in (("conv", conv), ("pref", pref)):
            (folder / kind).mkdir(exist_ok=True)
            (folder / kind / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def full_sft(tiny_model_dir, toy, tmp_path_factory) -> Path:
    """A full fine-tune (LoRA barely moves the random tiny base; a full SFT learns the format in 80 steps)."""
    return sft.run(sft.Config(model={"name_or_path": str(tiny_model_dir)}, data={"path": str(toy / "conv")},
                              output_dir=str(tmp_path_factory.mktemp("ppo-sft") / "full"), peft={"method": "full"},
                              train={"max_steps": 80, "batch_size": 16, "max_length": 64, "learning_rate": 3e-3,
                                     "save_steps": 1000}))


@pytest.fixture(scope="module")
def adapter_sft(tiny_model_dir, toy, tmp_path_factory) -> Path:
    return sft.run(sft.Config(model={"name_or_path": str(tiny_model_dir)},
                              data={"path": str(toy / "conv"), "eval_split": None},
                              output_dir=str(tmp_path_factory.mktemp("ppo-sft") / "lora"),
                              peft={"method": "lora", "r": 8}, train={"max_steps": 4, "batch_size": 8,
                                                                      "max_length": 64, "learning_rate": 1e-2,
                                                                      "save_steps": 1000}))


@pytest.fixture(scope="module")
def adapter_rm(tiny_model_dir, toy, adapter_sft, tmp_path_factory) -> Path:
    """A reward model continuing the SFT adapter (reward.py): an adapter on the very base the policy uses."""
    return reward.run(reward.Config(model={"name_or_path": str(tiny_model_dir)}, parent=str(adapter_sft),
                                    data={"path": str(toy / "pref"), "eval_split": None},
                                    output_dir=str(tmp_path_factory.mktemp("ppo-rm") / "rm"),
                                    peft={"method": "lora", "r": 8},
                                    train={"max_steps": 4, "batch_size": 8, "max_length": 64, "learning_rate": 1e-2,
                                           "save_steps": 1000}))


def _cfg(parent: Path, toy: Path, out: Path, **over) -> ppo.Config:
    train = {"max_steps": 2, "batch_size": 8, "eval_batch_size": 32, "max_length": 64, "learning_rate": 3e-3,
             "logging_steps": 1, "save_steps": 1000, **over.pop("train", {})}
    rollout = {"max_new_tokens": 8, "temperature": 1.0, **over.pop("rollout", {})}
    over.setdefault("reward_fn", None if "reward_model" in over else f"{__name__}:target_share")
    return ppo.Config(parent=str(parent), data={"path": str(toy / "conv")}, output_dir=str(out), train=train,
                      rollout=rollout, **over)


def _roles(cfg: ppo.Config) -> roles.Roles:
    """The roles ppo.run builds, for inspecting them."""
    ppo.resolve_inputs(cfg)
    tokenizer = load_tokenizer(dataclasses.replace(cfg.model, name_or_path=cfg.parent))
    return roles.build(cfg.model, cfg.parent, cfg.peft, tokenizer, ppo.reward_source(cfg))


def _conversations(toy: Path, n: int = 6) -> list[list[dict]]:
    rows = [json.loads(line) for line in (toy / "pref" / "test.jsonl").read_text().splitlines()[:n]]
    return [r["prompt"] + r[side] for r in rows for side in ("chosen", "rejected")]


def _logits(model, tokenizer, conversations):
    import torch

    batch = tokenizer.pad({"input_ids": [tokenizer.apply_chat_template(c, return_dict=True)["input_ids"]
                                         for c in conversations]}, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def test_every_role_shares_one_copy_of_the_base(tiny_model_dir, toy, adapter_sft, adapter_rm, tmp_path):
    import torch

    r = _roles(_cfg(adapter_sft, toy, tmp_path / "run", reward_model=str(adapter_rm)))
    assert set(r.model.peft_config) == {roles.POLICY, roles.REFERENCE, roles.VALUE, roles.REWARD}
    assert r.reward_fn is None and r.record["base_copies"] == 1 and "same base" in r.record["reward"]

    # One copy of the base: the non-adapter tensors are exactly those of one plain load of the base, each once.
    plain = load_causal_lm(ModelConfig(str(tiny_model_dir)))
    base = {p.data_ptr(): p.numel() for n, p in r.model.named_parameters() if roles.adapter_of(n) is None}
    assert sum(base.values()) == sum(p.numel() for p in plain.parameters())
    embeddings = [m for m in r.model.modules() if isinstance(m, torch.nn.Embedding)]
    assert len(embeddings) == 1  # no second model hides anywhere (the reward's head is a 64 x 1 linear)
    # only the policy and value adapters (and the value head) train
    trainable = {id(p) for p in r.trainable_parameters()}
    for name, p in r.model.named_parameters():
        assert (id(p) in trainable) == (roles.adapter_of(name) in roles.TRAINABLE), name

    tokenizer, conversations = r.tokenizer, _conversations(toy)
    sft_model = load_causal_lm(ModelConfig(str(adapter_sft)), tokenizer)
    expected = _logits(sft_model, tokenizer, conversations)
    for adapter in (roles.REFERENCE, roles.POLICY):  # before training, the policy is the SFT policy, and so is ref
        with roles.active(r.model, adapter):
            torch.testing.assert_close(_logits(r.model, tokenizer, conversations), expected, atol=1e-5, rtol=1e-5)

    # the reward adapter scores exactly like the reward run loaded on its own (reward.score)
    rm = load_sequence_classifier(ModelConfig(str(adapter_rm)))
    separate = reward.score(rm, load_tokenizer(ModelConfig(str(adapter_rm))), conversations)
    shared = roles.score(r, [c[:-1] for c in conversations], [c[-1]["content"] for c in conversations], 4)
    assert shared.tolist() == pytest.approx(separate, abs=1e-5)
    assert len(set(separate)) > 1
    # and the value model starts as the reward model (Huang et al. 2024): same adapter weights, same head
    from peft import get_peft_model_state_dict

    value, rm_weights = (get_peft_model_state_dict(r.model, adapter_name=a) for a in (roles.VALUE, roles.REWARD))
    assert value.keys() == rm_weights.keys() and all(torch.equal(value[k], rm_weights[k]) for k in value)
    torch.testing.assert_close(r.value_head.weight, r.reward_head.weight)


def test_full_weight_parent_gets_a_new_policy_adapter_and_the_reference_is_the_parent(full_sft, toy, tmp_path):
    import torch

    r = _roles(_cfg(full_sft, toy, tmp_path / "run"))
    assert r.reference is None and set(r.model.peft_config) == {roles.POLICY, roles.VALUE}
    assert "disabled" in r.record["reference"] and "function" in r.record["reward"]
    conversations = _conversations(toy)
    expected = _logits(load_causal_lm(ModelConfig(str(full_sft / "model")), r.tokenizer), r.tokenizer, conversations)
    for adapter in (None, roles.POLICY):  # adapters off = the SFT weights; the fresh LoRA starts as a no-op
        with roles.active(r.model, adapter):
            torch.testing.assert_close(_logits(r.model, r.tokenizer, conversations), expected, atol=1e-5, rtol=1e-5)
    assert not r.value_head.weight.any()  # a zero value head: the first advantages are the rewards


def test_a_reward_model_on_other_weights_is_loaded_once_and_frozen(full_sft, toy, tmp_path):
    rm_run = reward.run(reward.Config(model={"name_or_path": str(full_sft / "model")}, parent=str(full_sft),
                                      data={"path": str(toy / "pref"), "eval_split": None},
                                      output_dir=str(tmp_path / "rm"), peft={"method": "full"},
                                      train={"max_steps": 2, "batch_size": 8, "max_length": 64, "save_steps": 1000}))
    r = _roles(_cfg(full_sft, toy, tmp_path / "run", reward_model=str(rm_run)))
    assert r.reward_head is None and roles.REWARD not in r.model.peft_config
    assert r.record["base_copies"] == 2 and "separate frozen model" in r.record["reward"]
    assert not any(p.requires_grad for p in r.reward_fn.model.parameters())
    conversations = _conversations(toy)
    expected = reward.score(load_sequence_classifier(ModelConfig(str(rm_run / "model"))),
                            load_tokenizer(ModelConfig(str(rm_run / "model"))), conversations)
    got = roles.score(r, [c[:-1] for c in conversations], [c[-1]["content"] for c in conversations], 4)
    assert got.tolist() == pytest.approx(expected, abs=1e-5)


def _scalars(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in sorted(run_dir.glob("logs/events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events)).Reload()
        if tag in accumulator.Tags()["scalars"]:
            values.update({e.step: e.value for e in accumulator.Scalars(tag)})
    return [values[step] for step in sorted(values)]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def test_ppo_raises_a_programmatic_reward_with_bounded_kl(full_sft, toy, tmp_path):
    # 30 updates of 32 prompts (micro-batches of 16, 2 mini-batches), 4 epochs, LoRA r 8 on the SFT weights, lr 3e-3:
    # measured over six seeds, score 0.20-0.25 -> 0.43-0.53 (mean of the first 3 vs the last 5 updates) with the
    # KL below 7 nats throughout, about 10 s. 16 prompts per update were too noisy (one seed in four stalled).
    def cfg():
        return _cfg(full_sft, toy, tmp_path / "ppo", peft={"method": "lora", "r": 8, "alpha": 16},
                    ppo={"mini_batches": 2, "kl_coef": 0.05}, train={"max_steps": 30, "batch_size": 16})

    run_dir = ppo.run(cfg())
    scores, kls = _scalars(run_dir, "ppo/objective/score"), _scalars(run_dir, "ppo/objective/kl")
    assert len(scores) == len(kls) == 30
    first, last = _mean(scores[:3]), _mean(scores[-5:])
    print(f"toy PPO: score {first:.3f} -> {last:.3f}, KL {kls[-1]:.2f}")
    assert last > first + 0.15 and last > 1.5 * first, scores
    assert max(kls) < 10.0, kls  # the KL penalty holds the policy near the SFT policy
    history = json.loads((run_dir / "history.json").read_text())  # the same curves without TensorBoard
    assert [h["step"] for h in history] == list(range(1, 31))
    assert [h["objective/score"] for h in history] == pytest.approx(scores)
    # each update says where its time went (bench/ppo_layout.py's rollout vs update split)
    assert all(h["time/rollout_s"] > 0 and h["time/update_s"] > 0 for h in history)

    record = load_run(run_dir)
    assert record["status"] == "finished" and record["stage"] == "ppo"
    assert record["parent"]["path"] == str(full_sft.resolve())
    assert record["reward"]["kind"] == "function" and record["reward"]["source_sha256"]
    assert record["roles"]["base_copies"] == 1
    metrics = record["metrics"]
    assert 0 < metrics["trainable_params"] < metrics["total_params"]  # the two adapters and the value head
    assert metrics["updates"] == 30 and metrics["episodes"] == 30 * 32 and metrics["optimizer_steps"] == 30 * 4 * 2
    for key in ("objective_kl", "policy_entropy", "policy_clipfrac", "policy_approxkl", "loss_value",
                "value_explained_variance", "response_length", "response_no_eos_rate", "eval_score",
                "eval_score_reference"):
        assert key in metrics, key
    # the saved adapter loads on the parent's weights like any run's adapter
    tokenizer = load_tokenizer(ModelConfig(str(run_dir)))
    assert type(load_causal_lm(ModelConfig(str(run_dir)), tokenizer)).__name__ == "PeftModelForCausalLM"
    before = (run_dir / "run.json").read_bytes()
    assert ppo.run(cfg()) == run_dir
    assert (run_dir / "run.json").read_bytes() == before  # identical finished run: nothing happens


def _adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_resume_after_a_failure_matches_an_uninterrupted_run(full_sft, toy, tmp_path):
    # 4 updates of 8 prompts, a checkpoint every 2; the reward fails at its 3rd update's first call (call 17)
    def cfg(out, **over):
        return _cfg(full_sft, toy, out, reward_fn=f"{__name__}:flaky_share",
                    train={"max_steps": 4, "save_steps": 2}, **over)

    FAIL_AT_CALL.update(call=17, calls=0)
    with pytest.raises(ConnectionError):
        ppo.run(cfg(tmp_path / "run"))
    record = load_run(tmp_path / "run")
    assert record["status"] == "failed" and record["metrics"]["updates"] == 2
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["checkpoint-2"]
    with pytest.raises(RunError, match="--resume"):
        ppo.run(cfg(tmp_path / "run"))
    resumed_dir = ppo.run(cfg(tmp_path / "run", resume=True))
    assert load_run(resumed_dir)["status"] == "finished" and load_run(resumed_dir)["attempts"] >= 2
    straight = ppo.run(cfg(tmp_path / "straight"))
    resumed, reference = _adapter(resumed_dir), _adapter(straight)
    assert resumed.keys() == reference.keys()
    worst = max((resumed[k] - reference[k]).abs().max().item() for k in reference)
    assert worst <= 1e-6, worst  # optimizer, scheduler, RNG, prompt order and KL state all came back
    assert _scalars(resumed_dir, "ppo/objective/score") == pytest.approx(_scalars(straight, "ppo/objective/score"))
    FAIL_AT_CALL.update(call=None)


def test_qlora_trains_through_4bit_layers(full_sft, toy, tmp_path):
    """A 4-bit NF4 base (bitsandbytes on CPU). Trap found here: bitsandbytes 0.50 repacks a Linear4bit's weight in
    place for its CPU inference kernel the first time the layer runs in eval mode (AVX512-BF16 machines), and that
    kernel has no backward: gradients stop at every 4-bit layer with only a warning. Rollouts therefore never
    switch the model to eval mode."""
    import bitsandbytes as bnb
    import torch

    from alignment import rl
    from alignment.rollout import make_rollout

    cfg = _cfg(full_sft, toy, tmp_path / "qlora", peft={"method": "qlora", "r": 8, "alpha": 16})
    assert cfg.model is None and cfg.peft.method == "qlora"
    r = _roles(cfg)
    layers = [m for m in r.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert cfg.model.quantization == "nf4" and len(layers) == 14  # 2 blocks x 7 projections
    prompts, ids = load_prompts(cfg, r.tokenizer)
    make_rollout(cfg, r, prompts[:8], ids[:8], 0.05, rl.RunningMoments())  # sample (generate) in train mode
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    # ... so a 4-bit layer still back-propagates: d sum(W x) / dx = the column sums of the dequantised weight
    layer = layers[-1]
    x = torch.randn(2, 3, layer.in_features, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "an autograd kernel was not registered ..." would raise
        layer(x).sum().backward()
    weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    torch.testing.assert_close(x.grad, weight.sum(0).expand_as(x))

    run_dir = ppo.run(_cfg(full_sft, toy, tmp_path / "qlora-run", peft={"method": "qlora", "r": 8, "alpha": 16}))
    record = load_run(run_dir)
    assert record["status"] == "finished" and record["model"]["quantization"] == "nf4"
    assert "qlora" in record["roles"]["policy"]


def test_config_checks_name_the_field(full_sft, adapter_sft, toy, tmp_path):
    base = {"parent": "p", "data": {"path": "d"}, "output_dir": "o", "reward_fn": "m:f"}
    for bad, field in (({"reward_fn": None}, "reward_model / reward_fn"),
                       ({"reward_model": "rm"}, "reward_model / reward_fn"), ({"reward_fn": "nocolon"}, "reward_fn"),
                       ({"peft": {"method": "full"}}, "peft"), ({"peft": {"method": "adalora"}}, "peft"),
                       ({"rollout": {"temperature": 0}}, "temperature"), ({"rollout": {"top_p": 2}}, "top_p"),
                       ({"ppo": {"reward_norm": "max"}}, "reward_norm"), ({"ppo": {"lam": 1.5}}, "lam"),
                       ({"ppo": {"epochs": 0}}, "epochs"), ({"train": {"precision": "fp16"}}, "precision"),
                       ({"parent": ""}, "parent")):
        with pytest.raises(ValueError, match=field):
            ppo.Config(**{**base, **bad})
    # checked when the stage runs: what the parent and the reward are
    with pytest.raises(ConfigError, match="peft"):  # an adapter parent's adapter is continued
        ppo.resolve_inputs(_cfg(adapter_sft, toy, tmp_path / "x", peft={"method": "lora"}))
    with pytest.raises(ConfigError, match="reward_model"):
        ppo.resolve_inputs(_cfg(full_sft, toy, tmp_path / "x", reward_model=str(full_sft)))  # an sft run, not rm
    with pytest.raises(ConfigError, match="reward_fn"):
        ppo.resolve_inputs(_cfg(full_sft, toy, tmp_path / "x", reward_fn="alignment.synthetic:no_such_rule"))


@pytest.mark.parametrize("recipe", ["ppo.yaml", "ppo-smollm.yaml"])
def test_shipped_recipes_load(recipe):
    cfg = load_stage_config("ppo", SAMPLES / recipe)
    assert cfg.data[0].path == "out/telecom" and cfg.output_dir.startswith("out/runs/ppo")
    assert cfg.reward_model.startswith("out/runs/rm") and cfg.reward_fn is None
    assert ppo.rollout_size(cfg) == (16 if recipe == "ppo.yaml" else 64)


def test_cli_trains_a_recipe(full_sft, toy, tmp_path):
    recipe = tmp_path / "ppo.yaml"
    recipe.write_text(f"parent: {full_sft}\nreward_fn: {__name__}:target_share\ndata:\n  path: {toy / 'conv'}\n"
                      f"output_dir: {tmp_path / 'cli-run'}\nrollout:\n  max_new_tokens: 6\n"
                      "train:\n  max_steps: 2\n  batch_size: 4\n  max_length: 64\n")
    # also the adaptive KL controller, running reward normalisation and bf16 autocast (CPU autocast here)
    assert main(["align", "ppo", "--config", str(recipe), "--set", "ppo.epochs=1", "--set", "ppo.kl_target=0.5",
                 "--set", "ppo.reward_norm=running", "--set", "train.precision=bf16"]) == 0
    record = load_run(tmp_path / "cli-run")
    assert record["config"]["ppo"]["epochs"] == 1 and record["metrics"]["updates"] == 2
    # the first update's KL is 0 (the policy is the reference), 100% under target: the error clips to -20%, and the
    # coefficient shrinks by 0.2 * 4 episodes / 10000 (Ziegler et al.'s controller)
    assert record["metrics"]["objective_kl_coef"] == pytest.approx(0.05 * (1 - 0.2 * 4 / 10000))
    assert (tmp_path / "cli-run" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_end_to_end_sft_reward_model_ppo_beats_the_sft_policy(tiny_model_dir, tmp_path):
    """SFT -> reward model -> PPO on the synthetic product task. The SFT run is stopped early (130 steps: greedy
    answers follow the rule on 41% of held-out prompts) so there is room to improve; the reward model (LoRA on the
    SFT weights, 150 steps, held-out accuracy 0.98) joins PPO as a fourth adapter on the same base.

    kl_coef matters: with 0.05 the policy learned to drop product names, which this reward model (trained only on
    right-vs-wrong names) over-rates: its score rose 0.9 -> 2.6 while the rule fell 0.41 -> 0.23 (reward hacking,
    Gao et al. 2023). With 0.5 both rise: measured over three seeds RM 0.89 -> 2.2-2.7, rule 0.41 -> 0.67-0.74."""
    from alignment.synthetic import make_preference_task, rule_reward

    task = make_preference_task(tmp_path / "task", n_train=1024, n_test=128)
    sft_run = sft.run(sft.Config(model={"name_or_path": str(tiny_model_dir)}, data={"path": str(task)},
                                 output_dir=str(tmp_path / "sft"), peft={"method": "full"},
                                 train={"max_steps": 130, "learning_rate": 3e-3, "batch_size": 16, "max_length": 80,
                                        "save_steps": 1000}))
    rm_run = reward.run(reward.Config(model={"name_or_path": str(sft_run / "model")}, parent=str(sft_run),
                                      data={"path": str(task)}, output_dir=str(tmp_path / "rm"),
                                      peft={"method": "lora", "r": 16, "alpha": 32},
                                      train={"max_steps": 150, "learning_rate": 5e-3, "batch_size": 16,
                                             "max_length": 80, "save_steps": 1000}))
    assert load_run(rm_run)["metrics"]["eval_accuracy"] > 0.9
    ppo_run = ppo.run(ppo.Config(parent=str(sft_run), reward_model=str(rm_run), data={"path": str(task)},
                                 output_dir=str(tmp_path / "ppo"), rollout={"max_new_tokens": 32},
                                 ppo={"mini_batches": 2, "kl_coef": 0.5},
                                 train={"max_steps": 20, "learning_rate": 1e-3, "batch_size": 16,
                                        "eval_batch_size": 64, "max_length": 80, "save_steps": 1000}))
    record = load_run(ppo_run)
    assert "same base" in record["roles"]["reward"] and record["roles"]["base_copies"] == 1
    metrics = record["metrics"]
    print(f"held-out reward-model score: SFT {metrics['eval_score_reference']:.2f} -> PPO {metrics['eval_score']:.2f}"
          f"; KL {metrics['objective_kl']:.2f}")
    assert metrics["eval_score"] > metrics["eval_score_reference"] + 0.5
    assert metrics["objective_kl"] < 3.0

    # the rule itself, on greedy answers to the 128 held-out prompts (no prompt, no question-product pair seen)
    tokenizer = load_tokenizer(ModelConfig(str(ppo_run)))
    rows = [json.loads(line) for line in (task / "preference" / "test.jsonl").read_text().splitlines()]
    follows = {}
    for name, source in (("sft", sft_run / "model"), ("ppo", ppo_run)):
        model = load_causal_lm(ModelConfig(str(source)), tokenizer)
        follows[name] = _mean(rule_reward(row["prompt"][-1]["content"], answer)
                              for row, answer in zip(rows, _greedy(model, tokenizer, [r["prompt"] for r in rows])))
    print(f"held-out rule-following: SFT {follows['sft']:.3f} -> PPO {follows['ppo']:.3f}")
    assert follows["ppo"] > follows["sft"] + 0.15


def _greedy(model, tokenizer, prompts: list[list[dict]]) -> list[str]:
    import torch

    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=32, do_sample=False)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
