"""The peer of bench/ppo_layout.py: TRL's own PPOTrainer (the "PPOv2" design of trl 0.12 on: a policy, a reference
policy, a value model and a reward model, each a model of its own), run on the work our PPO runs.

TRL removed PPOTrainer (huggingface/trl 7020): the 1.13.0 wheel has none, 1.12.0 is the last release that ships it,
as ``trl.experimental.ppo`` (checked by listing the wheels). It cannot live in the project's .venv (TRL 1.16), so ``ensure_venv`` builds a virtualenv
of its own under ``~/.cache/rlhf-pipeline/bench-venvs/trl-ppo`` on first use: trl 1.12.0 with the *same* torch,
transformers, peft, accelerate and datasets versions as the project's .venv (read from it), so the trainer is the
only thing that differs. ``torch==2.13.0`` is pinned so pip takes the CPU wheel and never pulls CUDA.

Layouts (the VARIANT argument), as TRL's own example script (examples/scripts/ppo/ppo.py) builds them: the policy
from the SFT checkpoint, the value model and the reward model both from the reward checkpoint.

- ``full``: no ``--use_peft``: the policy and the value model train every weight; the reference is a second copy of
  the SFT model: 4 bases, 2 of them with gradients and AdamW state.
- ``peft``: ``--use_peft``: a LoRA adapter on the policy (the same r/alpha/targets as ours), the reference is the
  policy with its adapter disabled; the value model still trains in full (the old API has no PEFT option for it);
  the reward model is separate: 3 bases, 1 of them with gradients and AdamW state.
- ``peft-lora-value``: the closest the old API allows to ours: as ``peft``, and the value model wrapped in the same
  LoRA (+ its trained score head) by hand before it is passed in: 3 bases, adapters train only.

Timing: the trainer's own module functions are wrapped (not changed): ``batch_generation`` opens the rollout phase,
the first ``forward`` through the policy+value wrapper opens the update phase, ``on_step_end`` closes it.
Invoked by bench/ppo_layout.py as ``<venv>/bin/python bench/ppo_trl.py SPEC.json VARIANT``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

VENV = Path.home() / ".cache" / "rlhf-pipeline" / "bench-venvs" / "trl-ppo"
TRL_VERSION = "1.12.0"  # the last release with PPOTrainer (trl.experimental.ppo); 1.13.0 ships none
SAME_AS_OURS = ("transformers", "peft", "accelerate", "datasets")
VARIANTS = ("full", "peft", "peft-lora-value")


def ensure_venv(venv: Path = VENV) -> Path:
    """The peer's python, building its virtualenv first when missing or when our versions moved on."""
    from importlib import metadata

    pins = ["torch==2.13.0", f"trl=={TRL_VERSION}", *(f"{name}=={metadata.version(name)}" for name in SAME_AS_OURS),
            "pandas"]  # the trainer imports pandas at module level
    marker, python = venv / "bench-pins.txt", venv / "bin" / "python"
    if python.exists() and marker.exists() and marker.read_text().split() == pins:
        return python
    print(f"# building {venv} ({' '.join(pins)})", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = subprocess.run([str(python), "-m", "pip", "install", "-q", *pins], capture_output=True, text=True,
                         check=False)
    if pip.returncode:
        raise RuntimeError(f"pip install {' '.join(pins)} failed: {pip.stderr[-3000:]}")
    marker.write_text("\n".join(pins) + "\n")
    return python


def peer_versions(python: Path) -> dict[str, str]:
    code = ("import json, importlib.metadata as m; print(json.dumps({n: m.version(n) for n in "
            "('trl', 'transformers', 'peft', 'accelerate', 'torch')}))")
    return json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                                     check=True).stdout)


def _lora(spec: dict[str, Any], task_type: str, **extra: Any) -> Any:
    from peft import LoraConfig

    lora = spec["lora"]
    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=lora["target_modules"], task_type=task_type, **extra)


def build_models(spec: dict[str, Any], variant: str) -> dict[str, Any]:
    """policy, ref_model, value_model, reward_model and peft_config as TRL's example script builds them: the
    policy (and the reference copy) from the SFT checkpoint, the value and the reward model both from the reward
    checkpoint (the reward run merged into a full model by bench/ppo_layout.py)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    def scalar_head() -> Any:
        return AutoModelForSequenceClassification.from_pretrained(spec["reward_model_dir"], num_labels=1,
                                                                  dtype="float32")

    reward = scalar_head().requires_grad_(False)
    policy = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype="float32")
    value = scalar_head()
    if variant == "full":
        ref = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype="float32")
        return {"model": policy, "ref_model": ref, "value_model": value, "reward_model": reward, "peft_config": None}
    if variant == "peft-lora-value":
        value = get_peft_model(value, _lora(spec, "SEQ_CLS"))  # PEFT adds the score head to modules_to_save
    return {"model": policy, "ref_model": None, "value_model": value, "reward_model": reward,
            "peft_config": _lora(spec, "CAUSAL_LM")}


def count_params(models: list[Any], optimizer: Any) -> dict[str, int]:
    """Distinct parameter tensors held (a module shared by two roles counts once), and those the optimizer trains
    (not ``requires_grad``: TRL leaves it on for the reference copy, which only ever runs under no_grad)."""
    held = {id(p): p for model in models if model is not None for p in model.parameters()}
    trained = {id(p): p for group in optimizer.param_groups for p in group["params"]}
    return {"total_params": sum(p.numel() for p in held.values()),
            "trainable_params": sum(p.numel() for p in trained.values())}


def instrument(clock: Any, stats: dict[str, Any], eos_id: int, pad_id: int) -> None:
    """Wrap the trainer module's generation and forward functions to mark where each phase starts."""
    from trl.experimental.ppo import ppo_trainer as module

    generate, forward = module.batch_generation, module.forward

    def timed_generation(model, queries, *args, **kwargs):
        clock.start("rollout")
        query_responses, logits = generate(model, queries, *args, **kwargs)
        responses = query_responses[:, queries.shape[1]:]
        ended = (responses == eos_id).int()
        first_eos = ended.argmax(1)  # the response length counts its EOS; without one, every generated token
        lengths = ((first_eos + 1) * ended.any(1) + (responses != pad_id).sum(1) * (1 - ended.any(1).int()))
        stats["response_tokens"] += int(lengths.sum())
        stats["responses"] += responses.shape[0]
        stats["no_eos"] += int((~ended.bool().any(1)).sum())
        return query_responses, logits

    def timed_forward(model, *args, **kwargs):
        if clock.current == "rollout" and type(model).__name__ == "PolicyAndValueWrapper":
            clock.start("update")
        return forward(model, *args, **kwargs)

    module.batch_generation, module.forward = timed_generation, timed_forward


def run(spec: dict[str, Any], variant: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from datasets import Dataset
    from ppo_phases import PhaseClock
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    clock = PhaseClock()
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    tokenizer.padding_side = "left"  # generation appends on the right; TRL's examples pad prompts on the left
    prompts = json.loads(Path(spec["prompts_file"]).read_text())
    train = Dataset.from_dict({"input_ids": prompts})
    rollout = spec["batch_size"] * spec["grad_accum"] * spec["mini_batches"]
    ppo = spec["ppo"]
    args = PPOConfig(
        output_dir=str(Path(spec["work"]) / f"trl-{variant}"), report_to=[], save_strategy="no",
        disable_tqdm=True, logging_steps=1, seed=spec["seed"], bf16=False, fp16=False,
        gradient_checkpointing=False,  # PPOConfig turns it on by default; ours runs without
        # TRL's rollout batch is per_device_train_batch_size * gradient_accumulation_steps, split into
        # num_mini_batches; ours is batch_size * grad_accum * mini_batches with micro-batches of batch_size
        per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=spec["grad_accum"] * spec["mini_batches"], num_mini_batches=spec["mini_batches"],
        local_rollout_forward_batch_size=spec["chunk"], total_episodes=spec["updates"] * rollout,
        num_ppo_epochs=ppo["epochs"], response_length=spec["max_new_tokens"], temperature=spec["temperature"],
        stop_token="eos", missing_eos_penalty=spec["missing_eos_penalty"], kl_coef=ppo["kl_coef"],
        cliprange=ppo["cliprange"], cliprange_value=ppo["cliprange_value"], vf_coef=ppo["vf_coef"],
        gamma=ppo["gamma"], lam=ppo["lam"], learning_rate=spec["learning_rate"], adam_epsilon=1e-5,
        lr_scheduler_type="linear", num_sample_generations=0)
    models = build_models(spec, variant)
    history: list[dict[str, float]] = []

    class Phases(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.stop()

        def on_log(self, args, state, control, logs=None, **kwargs):
            history.append(dict(logs or {}))

    trainer = PPOTrainer(args=args, processing_class=tokenizer, train_dataset=train, eval_dataset=train.select(
        range(spec["chunk"])), callbacks=[Phases()], **models)
    params = count_params([trainer.policy_model, trainer.ref_model, trainer.value_model, trainer.reward_model],
                          trainer.optimizer)
    stats = {"response_tokens": 0, "responses": 0, "no_eos": 0}
    instrument(clock, stats, tokenizer.eos_token_id, tokenizer.pad_token_id)
    trainer.train()
    steps = [h for h in history if "objective/kl" in h]
    bases = 4 if variant == "full" else 3
    return {**clock.report(trainer.state.episode), **params, "updates": len(steps), "base_copies": bases,
            "trains": {"full": "policy + value, every weight", "peft": "policy LoRA + value every weight",
                       "peft-lora-value": "policy LoRA + value LoRA + score head"}[variant],
            "response_length": round(stats["response_tokens"] / max(stats["responses"], 1), 2),
            "no_eos_rate": round(stats["no_eos"] / max(stats["responses"], 1), 3),
            "kl_last": steps[-1]["objective/kl"] if steps else None,
            "score_first": steps[0]["objective/scores"] if steps else None,
            "score_last": steps[-1]["objective/scores"] if steps else None}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="TRL's PPOTrainer on bench/ppo_layout.py's work (its worker; "
                                                 "run it with the virtualenv's python, see ensure_venv)")
    parser.add_argument("spec", type=Path, help="the spec.json bench/ppo_layout.py wrote")
    parser.add_argument("variant", choices=VARIANTS, help="the layout (see the module docstring)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(json.dumps(run(json.loads(args.spec.read_text()), args.variant)), flush=True)


if __name__ == "__main__":
    main()
