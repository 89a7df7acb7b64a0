"""Supervised fine-tuning with ``trl.SFTTrainer``: ``rlhf align sft --config RECIPE.yaml``.

Conversations (TRL ``messages``) go through the model's chat template and the loss covers assistant tokens only
(``assistant_only_loss``: TRL reads the template's ``{% generation %}`` markers; field notes trap 4, huggingface/trl
4879 and 4147); prompt-completion rows train on the completion only. Packing is optional. The run records eval loss and
perplexity on the held-out split.
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
from alignment.training import TrainConfig, tensorboard_callback, trainer_kwargs


@dataclass
class Config:
    model: ModelConfig  # base model: Hub id, local folder or an earlier run directory
    data: list[DataConfig]  # one dataset or a weighted mixture (instruction / prompt_completion rows)
    output_dir: str  # the run directory
    peft: AdapterConfig = field(default_factory=AdapterConfig)  # adapter menu: lora, qlora, dora, ..., full, freeze
    train: TrainConfig = field(default_factory=TrainConfig)
    assistant_only_loss: bool = True  # conversations: loss on assistant tokens only
    packing: bool = False  # pack short sequences into max_length blocks (faster; needs a flash/sdpa-style mask)
    resume: bool = False  # continue an unfinished run with the same inputs from its last checkpoint
    overwrite: bool = False  # replace a finished run whose inputs differ

    def __post_init__(self) -> None:
        check_common(self)


def _sft_args(cfg: Config, run_dir: Path, has_eval: bool, conversational: bool) -> Any:
    from trl import SFTConfig

    return SFTConfig(**trainer_kwargs(cfg.train, run_dir, has_eval), max_length=cfg.train.max_length,
                     packing=cfg.packing, assistant_only_loss=cfg.assistant_only_loss and conversational,
                     completion_only_loss=None if conversational else True)


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
        model = prepare(load_causal_lm(cfg.model, tokenizer, training=True), cfg.peft, "CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=_sft_args(cfg, run_.dir, eval_ds is not None, conversational),
                             train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                             callbacks=[tensorboard_callback(run_.dir), *adapter_callbacks(cfg.peft)])
        metrics = train(trainer, run_, checkpoint)
        if "eval_loss" in metrics:  # per-token cross-entropy on held-out assistant tokens
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
        save_weights(trainer, run_)
        run_.finish({**metrics, **trainable_summary(trainer.model), "train_rows": len(train_ds),
                     "eval_rows": len(eval_ds) if eval_ds is not None else 0})
    return run_.dir
