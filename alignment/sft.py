"""Supervised fine-tuning with ``trl.SFTTrainer``: ``rlhf align sft --config RECIPE.yaml``.

Conversations (TRL ``messages``) go through the model's chat template and the loss covers assistant tokens only
(``assistant_only_loss``: TRL reads the template's ``{% generation %}`` markers; field notes trap 4, huggingface/trl
4879 and 4147); prompt-completion rows train on the completion only. The run records eval loss and perplexity on the
held-out split.

Batches are padding-free by default: each batch's sequences are concatenated into one row with position_ids that
restart per sequence, so no pad token is computed, and the attention runs per sequence (alignment.training
.padding_free_attention). Each step sees the same sequences as a padded batch would, so the loss curve is the same
(tests/alignment/test_sft.py checks it; bench/sft_vs_trl.py measures the speed). Packing (several conversations per
max_length block, fewer optimizer steps per epoch) stays optional. On CUDA, Liger kernels are used when installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignment.adapters import AdapterConfig, adapter_callbacks, prepare, trainable_summary
from alignment.data import DataConfig, load_mixture
from alignment.models import ModelConfig, load_causal_lm, load_tokenizer
from alignment.stage import check_common, fill_adalora_steps, open_run, resume_from, save_weights, train
from alignment.training import (TrainConfig, liger_kernel_default, padding_free_attention, tensorboard_callback,
                                trainer_kwargs)


@dataclass
class Config:
    model: ModelConfig  # base model: Hub id, local folder or an earlier run directory
    data: list[DataConfig]  # one dataset or a weighted mixture (instruction / prompt_completion rows)
    output_dir: str  # the run directory
    peft: AdapterConfig = field(default_factory=AdapterConfig)  # adapter menu: lora, qlora, dora, ..., full, freeze
    train: TrainConfig = field(default_factory=TrainConfig)
    assistant_only_loss: bool = True  # conversations: loss on assistant tokens only
    padding_free: bool = True  # concatenate each batch's sequences (position_ids, no pad tokens); same loss curve
    packing: bool = False  # pack short sequences into max_length blocks (fewer steps per epoch; padding-free too)
    resume: bool = False  # continue an unfinished run with the same inputs from its last checkpoint
    overwrite: bool = False  # replace a finished run whose inputs differ

    def __post_init__(self) -> None:
        check_common(self)
        for name in ("assistant_only_loss", "padding_free", "packing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected true or false, got {getattr(self, name)!r}")


def _sft_args(cfg: Config, run_dir: Path, has_eval: bool, conversational: bool) -> Any:
    from trl import SFTConfig

    kwargs = trainer_kwargs(cfg.train, run_dir, has_eval)
    kwargs.setdefault("use_liger_kernel", liger_kernel_default())  # train.extra.use_liger_kernel: false opts out
    return SFTConfig(**kwargs, max_length=cfg.train.max_length, packing=cfg.packing,
                     assistant_only_loss=cfg.assistant_only_loss and conversational,
                     completion_only_loss=None if conversational else True)


def data_collator(cfg: Config, tokenizer: Any) -> Any:
    """TRL's collator in padding-free mode, or None for TRL's default (padded batches, or packing's own).

    Passed explicitly because SFTConfig(padding_free=True) without packing refuses a max_length (TRL 1.16,
    SFTTrainer.__init__: "max_length is not enforced"), yet TRL truncates to max_length while preparing the dataset
    whenever packing is off, which is what the collator receives; so truncation and padding-free go together."""
    if not cfg.padding_free or cfg.packing:
        return None
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)


def run(cfg: Config) -> Path:
    """Train, evaluate and save; returns the run directory (an identical finished run is returned untouched)."""
    from transformers import set_seed
    from trl import SFTTrainer

    run_ = open_run(cfg, "sft")
    if run_.action == "skip":
        return run_.dir
    checkpoint = resume_from(run_, cfg.resume)  # refused before `with`: a refusal does not mark the run failed
    with run_:
        set_seed(cfg.train.seed)
        train_ds = load_mixture(cfg.data, "sft", cfg.train.seed)
        eval_ds = load_mixture(cfg.data, "sft", cfg.train.seed, eval=True)
        conversational = "messages" in train_ds.column_names
        fill_adalora_steps(cfg.peft, cfg.train, len(train_ds))
        tokenizer = load_tokenizer(cfg.model, require_chat_template=conversational)
        model = load_causal_lm(cfg.model, tokenizer, training=True)
        if cfg.padding_free or cfg.packing:
            padding_free_attention(model, cfg.model.attn_implementation)
        model = prepare(model, cfg.peft, "CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=_sft_args(cfg, run_.dir, eval_ds is not None, conversational),
                             data_collator=data_collator(cfg, tokenizer), train_dataset=train_ds,
                             eval_dataset=eval_ds, processing_class=tokenizer,
                             callbacks=[tensorboard_callback(run_.dir), *adapter_callbacks(cfg.peft)])
        metrics = train(trainer, run_, checkpoint)
        if "eval_loss" in metrics:  # per-token cross-entropy on held-out assistant tokens
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
        save_weights(trainer, run_)
        run_.finish({**metrics, **trainable_summary(trainer.model), "train_rows": len(train_ds),
                     "eval_rows": len(eval_ds) if eval_ds is not None else 0})
    return run_.dir
