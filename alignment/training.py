"""What every stage shares: the ``train:`` recipe section, turned into keyword arguments for TRL's config classes
(``SFTConfig``, ``RewardConfig``, ``DPOConfig`` are all ``TrainingArguments``), TensorBoard logs inside the run
directory, and resuming from the run's last checkpoint.

Stages compose these with TRL directly: no trainer subclass, no factory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import TrainerCallback

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass
class TrainConfig:
    learning_rate: float = 2e-4  # peak learning rate (adapters take ~10x a full fine-tune's)
    epochs: float = 1.0  # passes over the training set (ignored when max_steps > 0)
    max_steps: int = -1  # stop after this many optimizer steps (-1: use epochs)
    batch_size: int = 8  # sequences per device per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step (effective batch = batch_size * grad_accum * devices)
    eval_batch_size: int | None = None  # default: batch_size
    max_length: int = 1024  # tokens per sequence; longer ones are truncated
    warmup_ratio: float = 0.0  # share of steps with linear warm-up
    lr_scheduler: str = "linear"  # any transformers scheduler name (linear, cosine, constant...)
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping
    seed: int = 42  # seed for init of new weights, shuffling and dropout
    logging_steps: int = 10  # log loss and learning rate every N steps (TensorBoard: <run>/logs)
    eval_steps: int | None = None  # evaluate every N steps (None: at the end of each epoch)
    save_steps: int = 200  # checkpoint every N steps (what --resume continues from)
    save_total_limit: int = 2  # checkpoints kept
    precision: str = "auto"  # auto (bf16 on GPUs that have it, else fp32), bf16, fp16, fp32
    gradient_checkpointing: bool = False  # trade compute for activation memory
    extra: dict[str, Any] = field(default_factory=dict)  # any other TRL/transformers argument, passed through as is

    def __post_init__(self) -> None:
        for name in ("learning_rate", "epochs", "batch_size", "grad_accum", "max_length", "logging_steps", "save_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name}: expected a positive number, got {value!r}")
        if not isinstance(self.max_steps, int) or self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps: expected -1 (use epochs) or a positive integer, got {self.max_steps!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio: expected a fraction in [0, 1), got {self.warmup_ratio!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {self.precision!r}")


def _no_accelerator() -> bool:
    import torch

    return not torch.accelerator.is_available()


def _precision_flags(precision: str) -> dict[str, bool]:
    import torch

    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def trainer_kwargs(train: TrainConfig, run_dir: Path, has_eval: bool) -> dict[str, Any]:
    """Keyword arguments for any TRL config class; stage-specific ones are added by the stage."""
    steps_eval = train.eval_steps is not None
    kwargs: dict[str, Any] = dict(
        output_dir=str(run_dir / "checkpoints"),
        learning_rate=train.learning_rate,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.eval_batch_size or train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        warmup_steps=train.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        lr_scheduler_type=train.lr_scheduler,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        seed=train.seed,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        eval_strategy=("steps" if steps_eval else "epoch") if has_eval else "no",
        eval_steps=train.eval_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        # transformers 5 renamed gradient_checkpointing; TRL's configs still default the old name to True, so both
        # are set to keep the recipe's choice (and no deprecation warning)
        activation_checkpointing=train.gradient_checkpointing,
        gradient_checkpointing=None,
        report_to="none",  # TensorBoard is attached by tensorboard_callback(), writing into <run>/logs
        # On a machine without an accelerator, use_cpu is what makes TrainingArguments form a gloo process group
        # under torchrun / accelerate launch (it re-creates accelerate's state with cpu=use_cpu); else ranks train alone.
        use_cpu=_no_accelerator(),
        **_precision_flags(train.precision),
    )
    kwargs.update(train.extra)
    return kwargs


def tensorboard_callback(run_dir: Path) -> TrainerCallback:
    """transformers' own TensorBoard callback, writing into the run directory rather than checkpoints/runs/<date>."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run_dir / "logs")))


def last_checkpoint(run_dir: Path) -> str | None:
    """The newest *complete* ``checkpoint-N`` folder of a run (optimizer, scheduler, RNG and data position are in it).

    transformers (5.23, ``Trainer._save_checkpoint``) writes a checkpoint in place, with no temp folder and rename:
    weights, optimizer, scheduler and RNG state, then ``trainer_state.json`` last, with a plain ``open(..., "w")``.
    A job killed mid-save leaves a ``checkpoint-N`` without that file, or with half of it, and
    ``transformers.trainer_utils.get_last_checkpoint`` would still pick it (it only looks at folder names), and
    ``Trainer.train`` then fails reading that state on every attempt: the run could never be resumed. A checkpoint
    counts once its trainer_state.json parses (field notes trap 8)."""
    folder = run_dir / "checkpoints"
    steps = sorted(((int(p.name.removeprefix("checkpoint-")), p) for p in folder.glob("checkpoint-*")
                    if p.is_dir() and p.name.removeprefix("checkpoint-").isdigit()), reverse=True)
    for _, checkpoint in steps:
        try:
            json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        return str(checkpoint)
    return None


def log_history_metrics(log_history: list[dict]) -> dict[str, Any]:
    """The last value of every logged metric plus the first training loss (so records show that loss fell)."""
    metrics: dict[str, Any] = {}
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    if losses:
        metrics["train_loss_first"], metrics["train_loss_last"] = losses[0], losses[-1]
    for entry in log_history:
        for key, value in entry.items():
            if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                metrics[key] = value
    return metrics
