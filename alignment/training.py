"""What every stage shares: the ``train:`` recipe section, turned into keyword arguments for TRL's config classes
(``SFTConfig``, ``RewardConfig``, ``DPOConfig`` are all ``TrainingArguments``), TensorBoard logs inside the run
directory, and resuming from the run's last checkpoint.

Also here: the attention and kernels that make padding-free batches pay off (the SFT stage's default; see
:func:`padding_free_attention`), and Liger kernels on CUDA when installed (:func:`liger_kernel_default`).

Stages compose these with TRL directly: no trainer subclass, no factory.
"""

from __future__ import annotations

import itertools
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


# --- padding-free batches ----------------------------------------------------------------------------------------
# A padding-free batch (TRL's DataCollatorForLanguageModeling(padding_free=True)) is one row: the batch's sequences
# concatenated, position_ids restarting at 0 for each, and cu_seq_lens_q / cu_seq_lens_k marking the boundaries (the
# flash-attention varlen layout; Dao 2023, FlashAttention-2, sec. 3). No pad token goes through the linear layers. What
# attention costs depends on the implementation: flash_attention_2 reads cu_seq_lens (varlen kernel, exact cost);
# transformers' sdpa/eager detect the packing from position_ids (masking_utils.find_packed_sequence_indices) and build
# a block-diagonal N x N mask over the whole row, which is correct but computes attention for every pair of tokens of
# the batch, B times the work of the padded batch: measured slower than padding on CPU (sdpa 5.0 s vs 2.8 s CPU for 20
# steps of the tiny model, eager 4x slower). SDPA_VARLEN below runs sdpa once per sequence instead.
SDPA_VARLEN = "sdpa_varlen"


def _sequence_bounds(query: Any, key: Any, attention_mask: Any, kwargs: dict[str, Any]) -> list[int] | None:
    """Token offsets of the sequences packed in a one-row batch, or None when it is an ordinary batch."""
    if query.shape[0] != 1 or query.shape[2] != key.shape[2] or attention_mask is not None:
        return None  # several rows, a cache (decoding) or a padding mask: not a padding-free batch
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        return [int(x) for x in cu.tolist()]
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        return None
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()  # packed rows without cu_seq_lens (other collators)
    return [*starts, position_ids.shape[-1]] if len(starts) > 1 and starts[0] == 0 else None


def sdpa_varlen_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                          scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' sdpa attention, but a padding-free batch is attended one sequence at a time (causal within each):
    exactly the pairs a padded batch computes minus its padding, and no N x N mask. Anything else goes to sdpa."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = _sequence_bounds(query, key, attention_mask, kwargs)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
        raise ValueError(f"{SDPA_VARLEN}: softcapping and sliding windows are not supported; use sdpa or flash")
    gqa = key.shape[1] != query.shape[1]
    parts = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout,
                                            is_causal=True, scale=scaling, enable_gqa=gqa)
             for s, e in itertools.pairwise(bounds)]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def _sdpa_varlen_mask(*args: Any, attention_mask: Any = None, **kwargs: Any) -> Any:
    """sdpa's mask, except none for a batch without a padding mask and without a cache offset: the attention above
    then reads the sequence boundaries itself (one N x N mask per forward cost ~8% of a tiny-model step)."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and kwargs.get("q_length") == kwargs.get("kv_length") and not kwargs.get("q_offset"):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def _plain_causal(config: Any) -> bool:
    """Full causal attention in every layer: no sliding windows and no logit softcapping, which SDPA_VARLEN lacks."""
    text = config.get_text_config()
    layer_types = getattr(text, "layer_types", None)
    if layer_types:
        sliding = any(t != "full_attention" for t in layer_types)
    else:
        sliding = getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True)
    return not sliding and getattr(text, "attn_logit_softcapping", None) is None


def padding_free_attention(model: Any, requested: str | None) -> str:
    """Switch ``model`` (before PEFT wraps it) to an attention that attends each packed sequence on its own, when the
    recipe left the choice to us (``requested`` None or sdpa); returns the implementation in use.

    On CUDA with flash-attn installed: flash_attention_2 (varlen kernel). Otherwise SDPA_VARLEN for models with plain
    causal attention. Anything else (an explicit eager/flex/flash choice, sliding windows) is kept: still correct
    through transformers' block-diagonal mask, only slower."""
    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.utils import is_flash_attn_2_available

    current = model.config._attn_implementation
    if requested not in (None, "sdpa") or current != "sdpa":
        return current
    if torch.cuda.is_available() and is_flash_attn_2_available() and getattr(model, "_supports_flash_attn", False):
        target = "flash_attention_2"
    elif _plain_causal(model.config):
        AttentionInterface.register(SDPA_VARLEN, sdpa_varlen_attention)
        AttentionMaskInterface.register(SDPA_VARLEN, _sdpa_varlen_mask)
        target = SDPA_VARLEN
    else:
        return current
    try:
        model.set_attn_implementation(target)
    except (ValueError, ImportError):  # a model class that refuses custom attention keeps sdpa (correct, slower)
        return current
    return model.config._attn_implementation


def liger_kernel_default() -> bool:
    """Liger's Triton kernels (Hsu et al. 2024; RMSNorm, SwiGLU, RoPE) on CUDA when liger-kernel is installed.
    TRL keeps its own chunked LM-head loss, so Liger's fused cross-entropy stays off (SFTTrainer enforces it)."""
    import torch
    from transformers.utils import is_liger_kernel_available

    return torch.cuda.is_available() and is_liger_kernel_available()
