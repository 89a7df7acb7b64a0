"""What the online RL stages share (``grpo.py``, ``rloo.py``): both sample a group of completions per prompt from the
policy, score them with the recipe's rewards (``alignment.reward_fn``), and push up the completions that beat their
group; they differ only in the baseline and the loss, which TRL's ``GRPOTrainer`` / ``RLOOTrainer`` implement.

Here: the recipe fields both share (:class:`OnlineConfig`, with the ``sampling:`` section), the prompts (a
``prompt`` column, or ``messages`` without the final reply), the policy started from a parent run and its KL
reference, the trainer arguments common to both, and the run itself.

The policy starts from a parent run as in ``alignment.dpo`` (field notes trap 9: no second copy of the weights):

- **the parent trained an adapter**: the policy continues it (loaded trainable: TRL's trainers otherwise train
  nothing, huggingface/trl 3031, 6701). With ``beta > 0`` TRL adds a frozen copy of it named ``ref`` as the
  reference (huggingface/trl 4723; RLOOTrainer even at beta 0), but copies only parameters whose names contain
  ``.default.``: LoRA's ModuleDicts match, the ParameterDicts of (IA)3, LoHa and LoKr do not, so their reference
  would be the raw base.
  ``policy.pin_reference`` loads the parent's saved adapter into ``ref``, exact for every method.
- **the parent saved full weights**: a fresh adapter (``peft:``, default lora) trains on them, and the reference is
  those weights with the adapter switched off; ``peft.method: full``/``freeze`` get a separate frozen copy from TRL.
- ``beta: 0`` (GRPO's default in TRL, after DAPO, Yu et al. 2025, and Dr. GRPO, Liu et al. 2025) needs no reference.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from alignment.adapters import (
    AdapterConfig,
    adapter_callbacks,
    prepare,
    trainable_summary,
)
from alignment.data import DataConfig, load_mixture
from alignment.models import ModelConfig, load_causal_lm, load_tokenizer
from alignment.policy import (
    POLICY_STAGES,
    drop_reference,
    parent_base,
    pin_reference,
    policy_weights,
)
from alignment.reward_fn import (
    RewardSpec,
    as_reward_specs,
    reward_functions,
    reward_record,
)
from alignment.stage import (
    check_common,
    fill_adalora_steps,
    open_run,
    resume_from,
    save_weights,
)
from alignment.stage import train as train_stage
from alignment.training import TrainConfig, tensorboard_callback, trainer_kwargs
from rlhf.config import ConfigError

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

PARENT_STAGES = POLICY_STAGES  # any policy run; an RL run can start the next round
REFERENCES = {
    "none": "beta is 0: no KL term, so no reference model",
    "parent_adapter_copy": "the parent's adapter loaded a second time as the frozen PEFT adapter 'ref' on the same "
                           "base (one copy of the base weights); the policy is that adapter, trained further",
    "adapter_disabled": "the parent's full weights with the policy's new adapter switched off (one copy)",
    "separate_copy": "a second, frozen copy of the parent's weights (full or freeze training has no adapter to "
                     "switch off)",
}


@dataclass
class SamplingConfig:
    """The recipe's ``sampling:`` section: how completions are drawn from the policy during training."""

    num_generations: int = 8  # completions per prompt: the group whose rewards make each other's baseline
    max_completion_length: int = 256  # new tokens per completion; longer ones are cut (completions/clipped_ratio)
    temperature: float = 1.0  # sampling temperature; TRL divides the training logits by it too, so they match
    top_p: float = 1.0  # nucleus sampling mass (1.0: off)
    top_k: int = 0  # sample among the k most likely tokens (0: off)
    repetition_penalty: float = 1.0  # > 1 discourages repeating tokens (1.0: off)

    def __post_init__(self) -> None:
        for name, low in (("num_generations", 2), ("max_completion_length", 1), ("top_k", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
        for name in ("temperature", "repetition_penalty"):
            if not _positive(getattr(self, name)):
                raise ValueError(f"{name}: expected a number > 0, got {getattr(self, name)!r}")
        if not _positive(self.top_p) or self.top_p > 1:
            raise ValueError(f"top_p: expected a number in (0, 1], got {self.top_p!r}")


def _positive(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0


@dataclass
class OnlineConfig:
    """The recipe fields GRPO and RLOO share; ``grpo.Config`` and ``rloo.Config`` add their own."""

    parent: str  # the finished SFT run the policy starts from (or a DPO/GRPO/RLOO run: one more round)
    data: list[DataConfig]  # prompts: a `prompt` column (preference data has one) or `messages` (reply dropped)
    rewards: list[RewardSpec]  # rm run folders and/or module:function rewards, summed with their weights
    output_dir: str  # the run directory
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # group size, completion length, temperature
    beta: float = 0.0  # KL penalty towards the parent policy (0: none and no reference is kept)
    epsilon: float = 0.2  # clip range of the probability ratio (PPO's, Schulman et al. 2017); matters when mu > 1
    epsilon_high: float | None = None  # upper clip bound (DAPO's clip-higher uses 0.28); None: epsilon
    num_iterations: int = 1  # optimisation passes over each generated batch (mu in the GRPO paper)
    mask_truncated_completions: bool = False  # keep completions cut at max_completion_length out of the loss (DAPO)
    peft: AdapterConfig | None = None  # parents with full weights only: the adapter to train (default: lora)
    train: TrainConfig = field(default_factory=TrainConfig)  # batch_size counts completions, not prompts
    resume: bool = False  # continue an unfinished run with the same inputs from its last checkpoint
    overwrite: bool = False  # replace a finished run whose inputs differ
    # Filled by resolve_inputs when the stage runs (not recipe keys): the parent's base, loaded as the parent loaded
    # it, and what each reward is with its fingerprint (so a retrained reward model makes a new run).
    model: ModelConfig | None = field(default=None, init=False)
    reward_records: list[dict[str, Any]] | None = field(default=None, init=False)
    # Whether the trainer keeps a frozen `ref` copy of a PEFT policy's adapter even at beta 0 (RLOOTrainer does).
    copies_adapter_always: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_common(self)
        if isinstance(self.sampling, dict):  # a Python caller's mapping (recipes arrive as a SamplingConfig)
            try:
                self.sampling = SamplingConfig(**self.sampling)
            except ValueError as e:
                raise ValueError(f"sampling.{e}") from None
        self.rewards = as_reward_specs(self.rewards)
        if not isinstance(self.parent, str) or not self.parent:
            raise ValueError(f"parent: expected the folder of a finished SFT run, got {self.parent!r}")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or self.beta < 0:
            raise ValueError(f"beta: expected a number >= 0, got {self.beta!r}")
        if not _positive(self.epsilon):
            raise ValueError(f"epsilon: expected a number > 0, got {self.epsilon!r}")
        if self.epsilon_high is not None and not _positive(self.epsilon_high):
            raise ValueError(f"epsilon_high: expected a number > 0 or null, got {self.epsilon_high!r}")
        if isinstance(self.num_iterations, bool) or not isinstance(self.num_iterations, int) or self.num_iterations < 1:
            raise ValueError(f"num_iterations: expected an integer >= 1, got {self.num_iterations!r}")
        self._check_groups()
        if self.peft is not None and self.peft.method == "adalora" and self.keeps_reference_adapter:
            when = "" if self.copies_adapter_always else " at beta > 0"
            raise ValueError(f"peft: adalora cannot train beside the frozen reference copy of the adapter the trainer "
                             f"keeps{when} (PEFT allows one AdaLoRA adapter per model); use lora, dora, ...")

    @property
    def keeps_reference_adapter(self) -> bool:
        """Whether TRL adds a frozen `ref` copy of a PEFT policy's adapter (one AdaLoRA adapter per model is all PEFT
        allows)."""
        return self.beta > 0 or self.copies_adapter_always

    def _check_groups(self) -> None:
        """TRL generates batch_size * grad_accum completions at once and needs whole groups of them."""
        group, train = self.sampling.num_generations, self.train
        if (train.batch_size * train.grad_accum) % group:
            raise ValueError(f"train.batch_size: batch_size * grad_accum ({train.batch_size} * {train.grad_accum}) "
                             f"counts completions and must be a multiple of sampling.num_generations ({group})")
        if any(d.eval_split for d in self.data) and (train.eval_batch_size or train.batch_size) % group:
            raise ValueError(f"train.eval_batch_size: must be a multiple of sampling.num_generations ({group}) when "
                             "the data has an eval split (or set data.eval_split: null)")


# --- the parent run and the reference --------------------------------------------------------------------------------

def resolve_inputs(cfg: OnlineConfig, stage: str) -> None:
    """Fill ``cfg.model`` from the parent run (alignment/policy.py) and ``cfg.reward_records`` from the rewards
    (once), checking both. Done when the stage runs, not when the recipe loads: the parent and an rm run are outputs
    of earlier commands. Errors come before any run folder exists."""
    if cfg.model is not None:
        return
    cfg.reward_records = [reward_record(spec, i) for i, spec in enumerate(cfg.rewards)]
    refusal = (f"{stage.upper()} keeps a frozen copy of it as the reference and PEFT allows one AdaLoRA adapter per "
               "model") if cfg.keeps_reference_adapter else None
    cfg.model, cfg.peft = parent_base(cfg.parent, cfg.peft, stage, PARENT_STAGES, adalora_refusal=refusal)


def reference_kind(cfg: OnlineConfig) -> str:
    """Which reference the KL term uses (a key of ``REFERENCES``); after :func:`resolve_inputs`."""
    if cfg.beta == 0:
        return "none"
    if cfg.peft is None:
        return "parent_adapter_copy"
    return "separate_copy" if cfg.peft.method in ("full", "freeze") else "adapter_disabled"


def policy_model(cfg: OnlineConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The policy to train: the parent's adapter (trainable), or a fresh adapter (or none) on its full weights."""
    if cfg.peft is None:
        return load_causal_lm(policy_weights(cfg.model, cfg.parent, cfg.peft), tokenizer, training=True)
    return prepare(load_causal_lm(cfg.model, tokenizer, training=True), cfg.peft, "CAUSAL_LM")


# --- prompts ---------------------------------------------------------------------------------------------------------

def _prompt_of(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A conversation without its final assistant reply: what the policy is asked to answer."""
    prompt = list(messages)
    while prompt and prompt[-1].get("role") == "assistant":
        prompt.pop()
    return prompt


def _prompt_tokens(tokenizer: PreTrainedTokenizerBase, prompt: Any) -> int:
    if isinstance(prompt, str):
        return len(tokenizer(prompt)["input_ids"])
    return len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"])


def to_prompts(ds: datasets.Dataset | None, tokenizer: PreTrainedTokenizerBase, cfg: OnlineConfig
               ) -> tuple[datasets.Dataset | None, int]:
    """Rows of ``prompt`` only, each distinct prompt once, and how many were dropped for length.

    Preference data repeats a prompt for every pair made from its ranking, which would weight prompts by how many
    candidates they had. TRL 1.16 no longer truncates prompts (cutting a chat template breaks it), so a prompt that
    leaves fewer than ``max_completion_length`` tokens of ``train.max_length`` is dropped (a position past the
    model's context is garbage or an index error), as ``trl.RewardTrainer`` drops over-long pairs."""
    import datasets

    if ds is None:
        return None, 0
    column = "prompt" if "prompt" in ds.column_names else "messages"
    limit = cfg.train.max_length - cfg.sampling.max_completion_length
    seen, rows, dropped = set(), [], 0
    for value in ds[column]:
        prompt = value if column == "prompt" else _prompt_of(value)
        key = json.dumps(prompt, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        if _prompt_tokens(tokenizer, prompt) > limit:
            dropped += 1
        else:
            rows.append({"prompt": prompt})
    return (datasets.Dataset.from_list(rows) if rows else None), dropped


# --- trainer and run -------------------------------------------------------------------------------------------------

def trainer_args(config_cls: type, cfg: OnlineConfig, run_dir: Path, has_eval: bool, **algorithm: Any) -> Any:
    """``GRPOConfig`` / ``RLOOConfig``: the ``train:`` section, the ``sampling:`` one (its names are TRL's), the KL
    and clipping settings both share, the reward weights, then the stage's own ``algorithm`` arguments."""
    shared = {"beta": cfg.beta, "epsilon": cfg.epsilon, "epsilon_high": cfg.epsilon_high,
              "num_iterations": cfg.num_iterations, "mask_truncated_completions": cfg.mask_truncated_completions,
              "reward_weights": [float(spec.weight) for spec in cfg.rewards]}
    return config_cls(**{**trainer_kwargs(cfg.train, run_dir, has_eval), **dataclasses.asdict(cfg.sampling),
                         **shared, **algorithm})


def build_trainer(cfg: OnlineConfig, stage: str, run_dir: Path, trainer_cls: type, config_cls: type,
                  algorithm: dict[str, Any]) -> tuple[Trainer, dict[str, int]]:
    """The TRL online trainer for ``cfg``, logging into ``run_dir``, with its reference pinned; and the prompt
    counts for the run record."""
    from transformers import set_seed
    from trl.data_utils import is_conversational

    resolve_inputs(cfg, stage)
    raw_train = load_mixture(cfg.data, "prompts", cfg.train.seed)
    conversational = "messages" in raw_train.column_names or is_conversational(raw_train[0])
    tokenizer = load_tokenizer(policy_weights(cfg.model, cfg.parent, cfg.peft), require_chat_template=conversational)
    train_ds, dropped = to_prompts(raw_train, tokenizer, cfg)
    if train_ds is None:
        raise ConfigError(f"data: no prompt fits in train.max_length ({cfg.train.max_length}) minus "
                          f"sampling.max_completion_length ({cfg.sampling.max_completion_length}) tokens")
    eval_ds, _ = to_prompts(load_mixture(cfg.data, "prompts", cfg.train.seed, eval=True), tokenizer, cfg)
    if cfg.peft is not None:  # AdaLoRA's budget schedule counts optimizer steps; a prompt makes a group of rows
        fill_adalora_steps(cfg.peft, cfg.train, len(train_ds) * cfg.sampling.num_generations)
    args = trainer_args(config_cls, cfg, run_dir, eval_ds is not None, **algorithm)
    callbacks = [tensorboard_callback(run_dir), *(adapter_callbacks(cfg.peft) if cfg.peft else [])]
    set_seed(cfg.train.seed)  # a fresh adapter is drawn at load time
    trainer = trainer_cls(model=policy_model(cfg, tokenizer), reward_funcs=reward_functions(cfg.rewards), args=args,
                          train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer, callbacks=callbacks)
    pin_reference(trainer.model, cfg.parent, copy_parent=reference_kind(cfg) == "parent_adapter_copy")
    counts = {"train_prompts": len(train_ds), "eval_prompts": len(eval_ds) if eval_ds is not None else 0,
              "prompts_dropped_too_long": dropped}
    return trainer, counts


def reward_trend(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """The mean reward of the first and last logged steps (TRL logs ``reward``: the weighted sum, before scaling)."""
    rewards = [entry["reward"] for entry in log_history if "reward" in entry]
    return {"train_reward_first": rewards[0], "train_reward_last": rewards[-1]} if rewards else {}


def run(cfg: OnlineConfig, stage: str, build: Callable[..., tuple[Trainer, dict[str, int]]]) -> Path:
    """Train, evaluate and save with ``build(cfg, run_dir) -> (trainer, prompt counts)``; returns the run directory
    (an identical finished run is returned untouched)."""
    resolve_inputs(cfg, stage)
    run_ = open_run(cfg, stage, parent=cfg.parent)
    if run_.action == "skip":
        return run_.dir
    checkpoint = resume_from(run_, cfg.resume)  # refused before `with`: a refusal does not mark the run failed
    with run_:
        kind = reference_kind(cfg)
        run_.record["reference"] = {"kind": kind, "description": REFERENCES[kind], "beta": cfg.beta}
        trainer, counts = build(cfg, run_.dir)
        metrics = train_stage(trainer, run_, checkpoint)
        drop_reference(trainer.model)
        save_weights(trainer, run_)
        run_.finish({**metrics, **reward_trend(trainer.state.log_history), **trainable_summary(trainer.model),
                     **counts})
    return run_.dir
