"""Reward model with ``trl.RewardTrainer``: ``rlhf align rm --config RECIPE.yaml``.

A reward model is the base LM with a one-output linear ``score`` head that reads the hidden state of the last non-pad
token, trained on preference pairs with the Bradley-Terry loss ``-log sigmoid(r(chosen) - r(rejected))`` (InstructGPT,
Ouyang et al. 2022, eq. 1), optionally plus a centring term that keeps rewards near zero for PPO (Eisenstein et al.
2023, eq. 2).

Field notes trap 3 (huggingface/trl 1379, 937; OpenRLHF 873): under LoRA the randomly initialised score head must be
trained *and saved*, or the saved reward model scores with a head nobody trained. The stage therefore always puts
``score`` in ``modules_to_save`` for adapter methods, whatever the recipe says; models.py gives every tokenizer a pad
distinct from eos so the head reads the right token. Held-out accuracy and margin are measured after training with
:func:`score`, the function PPO and evaluation use, so the recorded numbers are those of the reward later stages see.

Starting from an SFT run (``parent``): the reward model starts from the SFT model, as in InstructGPT (sec. 3.5) and
Stiennon et al. 2020. With an adapter method the SFT adapter itself is trained on (LLaMA-Factory's default for a
stage given an adapter), re-typed for sequence classification with the score head added, so the saved reward adapter
still sits on the original base: ``load_sequence_classifier(ModelConfig(<run>))`` reloads it exactly, and PPO can
hold the policy and reward adapters on one base. ``full`` and ``freeze`` merge the SFT adapter into the weights first.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignment.adapters import ADAPTER_METHODS, AdapterConfig, adapter_callbacks, prepare, trainable_summary
from alignment.data import DataConfig, load_mixture
from alignment.models import ModelConfig, load_sequence_classifier, load_tokenizer, resolve_model_path
from alignment.runs import load_run
from alignment.stage import check_common, fill_adalora_steps, open_run, resume_from, save_weights, train
from alignment.training import TrainConfig, tensorboard_callback, trainer_kwargs
from rlhf.config import ConfigError

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SCORE_HEAD = "score"  # transformers' name for the head of every decoder-only *ForSequenceClassification
ADAPTER_SHAPE = ("method", "r", "alpha", "target_modules", "init_r")  # what must match to continue a parent's adapter


@dataclass
class Config:
    model: ModelConfig  # base model: Hub id or local folder (with a parent: the base that run trained on)
    data: list[DataConfig]  # one dataset or a weighted mixture of preference pairs (prompt/chosen/rejected)
    output_dir: str  # the run directory
    peft: AdapterConfig = field(default_factory=AdapterConfig)  # adapter menu: lora, qlora, dora, ..., full, freeze
    train: TrainConfig = field(default_factory=TrainConfig)
    parent: str | None = None  # SFT run folder to start from (its adapter is trained on, or merged for full/freeze)
    center_rewards_coefficient: float | None = 0.01  # weight of mean(r^2) keeping rewards near 0 (None: off)
    resume: bool = False  # continue an unfinished run with the same inputs from its last checkpoint
    overwrite: bool = False  # replace a finished run whose inputs differ

    def __post_init__(self) -> None:
        check_common(self)
        if self.parent is not None and (not isinstance(self.parent, str) or not self.parent.strip()):
            raise ValueError(f"parent: expected an SFT run folder, got {self.parent!r}")
        coef = self.center_rewards_coefficient
        if coef is not None and (isinstance(coef, bool) or not isinstance(coef, (int, float)) or coef < 0):
            raise ValueError(f"center_rewards_coefficient: expected a number >= 0 or null, got {coef!r}")
        if self.peft.method in ADAPTER_METHODS and SCORE_HEAD not in (self.peft.modules_to_save or []):
            # trap 3: the fresh head must train and be saved beside the adapter (huggingface/trl 1379, 937)
            self.peft.modules_to_save = [*(self.peft.modules_to_save or []), SCORE_HEAD]


def score(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, conversations: list[Any],
          batch_size: int = 16) -> list[float]:
    """The reward of each conversation (a list of ``{role, content}`` messages: prompt + response), or of each plain
    text, tokenised exactly as ``trl.RewardTrainer`` does and read at the last non-pad token as in training."""
    import torch

    rewards: list[float] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(conversations), batch_size):
                ids = [token_ids(tokenizer, c) for c in conversations[start:start + batch_size]]
                batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(model.device)
                rewards += model(**batch).logits[:, 0].float().tolist()
    finally:
        model.train(was_training)
    return rewards


def token_ids(tokenizer: PreTrainedTokenizerBase, example: Any) -> list[int]:
    """What RewardTrainer._prepare_dataset makes of one side of a pair: a conversation through the chat template (no
    generation prompt), a plain text with eos appended and the tokenizer's special tokens."""
    if isinstance(example, str):
        text = example if example.endswith(tokenizer.eos_token) else example + tokenizer.eos_token
        return tokenizer(text)["input_ids"]
    return tokenizer.apply_chat_template(example, tokenize=True, return_dict=True)["input_ids"]


def pair_metrics(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: datasets.Dataset,
                 batch_size: int = 16) -> dict[str, float]:
    """Accuracy (share of pairs with r(chosen) > r(rejected)) and mean margin r(chosen) - r(rejected), plus the mean
    and spread of all rewards (what PPO's reward scaling will meet). Every pair counts: RewardTrainer drops pairs
    longer than max_length, but later stages score whatever they are given."""
    chosen, rejected = pairs["chosen"], pairs["rejected"]
    empty = "" if isinstance(chosen[0], str) else []
    prompts = pairs["prompt"] if "prompt" in pairs.column_names else [empty] * len(chosen)
    r_chosen = score(model, tokenizer, [p + c for p, c in zip(prompts, chosen)], batch_size)
    r_rejected = score(model, tokenizer, [p + r for p, r in zip(prompts, rejected)], batch_size)
    margins = [c - r for c, r in zip(r_chosen, r_rejected)]
    rewards = r_chosen + r_rejected
    mean = sum(rewards) / len(rewards)
    return {"eval_accuracy": sum(m > 0 for m in margins) / len(margins), "eval_margin": sum(margins) / len(margins),
            "eval_reward_mean": mean, "eval_reward_std": (sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5,
            "eval_pairs": len(margins)}


def parent_adapter(cfg: Config) -> str | None:
    """The parent SFT run's adapter folder, after checking the recipe can start from it (None without a parent)."""
    if cfg.parent is None:
        return None
    if not (Path(cfg.parent) / "run.json").is_file():
        raise ConfigError(f"parent: {cfg.parent} is not a run folder (no run.json)")
    base, adapter = resolve_model_path(cfg.parent)
    if not _same_model(base, resolve_model_path(cfg.model.name_or_path)[0]):
        what = "base" if adapter else "weights (model/)"
        raise ConfigError(f"model.name_or_path: {cfg.model.name_or_path!r} is not the {what} of parent {cfg.parent} "
                          f"({base!r})")
    if adapter is None:
        return None  # a full fine-tune: the reward model starts from its weights, named as the model
    if cfg.peft.method in ADAPTER_METHODS:
        recorded = load_run(Path(cfg.parent))["config"].get("peft") or {}
        diffs = [f"peft.{k}: parent {recorded.get(k)!r}, recipe {getattr(cfg.peft, k)!r}" for k in ADAPTER_SHAPE
                 if recorded.get(k) != getattr(cfg.peft, k)]
        if diffs:
            raise ConfigError(f"the reward model continues parent {cfg.parent}'s adapter, so its shape must match: "
                              f"{'; '.join(diffs)} (or use method full/freeze, which merge it first)")
    return adapter


def _same_model(a: str, b: str) -> bool:
    return Path(a).resolve() == Path(b).resolve() if Path(a).exists() and Path(b).exists() else a == b


def reward_model(cfg: Config, tokenizer: PreTrainedTokenizerBase, adapter: str | None) -> PreTrainedModel:
    """The classifier to train: the base with a fresh head, started from the parent's SFT adapter when there is one,
    and the recipe's adapter method applied."""
    import peft

    model = load_sequence_classifier(cfg.model, tokenizer, num_labels=1, training=True)
    if adapter and cfg.peft.method not in ADAPTER_METHODS:  # full / freeze train the SFT model's own weights
        config = peft.PeftConfig.from_pretrained(adapter)
        config.task_type = None  # saved for CAUSAL_LM; untyped, PEFT wraps the classifier without touching its head
        model = peft.PeftModel.from_pretrained(model, adapter, config=config).merge_and_unload()
    model = prepare(model, cfg.peft, "SEQ_CLS")
    if adapter and cfg.peft.method in ADAPTER_METHODS:
        # Same shape (parent_adapter checked it), so the SFT adapter's weights drop in; the score head, which the
        # SFT adapter does not have, keeps its fresh draw.
        weights = {**peft.get_peft_model_state_dict(model), **peft.load_peft_weights(adapter)}
        unexpected = peft.set_peft_model_state_dict(model, weights).unexpected_keys
        if unexpected:
            raise ConfigError(f"parent: {len(unexpected)} weights of {adapter} fit no layer of the reward adapter, "
                              f"e.g. {unexpected[0]}")
    return model


def _reward_args(cfg: Config, run_dir: Path, has_eval: bool) -> Any:
    from trl import RewardConfig

    return RewardConfig(**trainer_kwargs(cfg.train, run_dir, has_eval), max_length=cfg.train.max_length,
                        center_rewards_coefficient=cfg.center_rewards_coefficient)


def run(cfg: Config) -> Path:
    """Train, measure held-out accuracy and margin, save; returns the run directory (an identical finished run is
    returned untouched)."""
    from transformers import set_seed
    from trl import RewardTrainer

    adapter = parent_adapter(cfg)
    run_ = open_run(cfg, "rm", cfg.parent)
    if run_.action == "skip":
        return run_.dir
    checkpoint = resume_from(run_, cfg.resume)  # refused before `with`: a refusal does not mark the run failed
    with run_:
        train_ds = load_mixture(cfg.data, "rm", cfg.train.seed)
        eval_ds = load_mixture(cfg.data, "rm", cfg.train.seed, eval=True)
        conversational = not isinstance(train_ds[0]["chosen"], str)
        fill_adalora_steps(cfg.peft, cfg.train, len(train_ds))
        # with a parent, its adapter folder's tokenizer (the one the SFT model was trained with) wins
        source = dataclasses.replace(cfg.model, name_or_path=cfg.parent) if adapter else cfg.model
        tokenizer = load_tokenizer(source, require_chat_template=conversational)
        set_seed(cfg.train.seed)  # the score head is drawn at load time
        model = reward_model(cfg, tokenizer, adapter)
        trainer = RewardTrainer(model=model, args=_reward_args(cfg, run_.dir, eval_ds is not None),
                                train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                                callbacks=[tensorboard_callback(run_.dir), *adapter_callbacks(cfg.peft)])
        metrics = train(trainer, run_, checkpoint)
        if eval_ds is not None:  # exact per-pair numbers replace the trainer's mean of per-batch means
            metrics.update(pair_metrics(trainer.model, tokenizer, eval_ds, trainer.args.per_device_eval_batch_size))
        save_weights(trainer, run_)
        run_.finish({**metrics, **trainable_summary(trainer.model), "train_rows": len(train_ds),
                     "eval_rows": len(eval_ds) if eval_ds is not None else 0})
    return run_.dir
