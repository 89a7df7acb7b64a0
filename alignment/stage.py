"""The steps every training stage takes around its TRL trainer: open the run record, decide whether to resume,
train with TensorBoard logs in the run folder, save the weights with their tokenizer, and close the record.

Each stage module (``sft``, ``reward``, ``dpo``) stays a straight line of TRL/PEFT calls and uses these for the
parts that must behave the same everywhere.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignment.data import DataConfig, dataset_root
from alignment.runs import Run, RunError
from alignment.training import last_checkpoint, log_history_metrics

if TYPE_CHECKING:
    from transformers import Trainer


def as_data_list(data: Any) -> list[DataConfig]:
    """A recipe's ``data:`` as a list: one dataset (a mapping) or a mixture (a list of mappings)."""
    items = data if isinstance(data, list) else [data]
    out = [d if isinstance(d, DataConfig) else DataConfig(**d) if isinstance(d, dict) else None for d in items]
    if not out or any(d is None for d in out):
        raise ValueError(f"data: expected a dataset mapping or a list of them, got {data!r}")
    return out


def apply_qlora_base(model: Any, peft: Any) -> None:
    """QLoRA means a 4-bit NF4 base (Dettmers et al. 2023): set it on the model section unless the recipe chose one."""
    from alignment.adapters import wants_4bit

    if model is not None and peft is not None and wants_4bit(peft) and model.quantization is None:
        model.quantization = "nf4"


def check_common(cfg: Any) -> None:
    """The sections every stage Config shares, for Python callers that pass mappings (recipes arrive as dataclasses
    already): ``model``/``peft``/``train`` become their dataclasses, ``data`` a list, ``output_dir`` must be set, and
    QLoRA implies a 4-bit NF4 base (Dettmers et al. 2023)."""
    from alignment.adapters import AdapterConfig
    from alignment.models import ModelConfig, resolve_model_path
    from alignment.training import TrainConfig

    for name, cls in (("model", ModelConfig), ("peft", AdapterConfig), ("train", TrainConfig)):
        if isinstance(getattr(cfg, name, None), dict):
            setattr(cfg, name, cls(**getattr(cfg, name)))
    cfg.data = as_data_list(cfg.data)
    if not isinstance(cfg.output_dir, str) or not cfg.output_dir:
        raise ValueError(f"output_dir: expected a folder for the run, got {cfg.output_dir!r}")
    model, peft = getattr(cfg, "model", None), getattr(cfg, "peft", None)
    if model is not None:
        resolve_model_path(model.name_or_path)  # a missing model folder fails here, before any run folder exists
    apply_qlora_base(model, peft)


def open_run(cfg: Any, stage: str, parent: str | None = None) -> Run:
    """The run record for ``cfg`` (a stage Config with ``output_dir``, ``model``, ``data``, ``overwrite``).

    Under ``accelerate launch`` / ``torchrun`` only the main process opens (and later writes) the record; it tells
    the other ranks what it decided (run, resume or skip), so every rank takes the same path."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    # The process state is a singleton: the first creation decides the backend. On a machine without CUDA, cpu=True
    # is what lets torchrun / accelerate launch form a gloo group (otherwise every rank would train alone).
    state = PartialState(cpu=not torch.accelerator.is_available())
    decision: list[Any] = [None]
    if state.is_main_process:
        roots = [dataset_root(d, stage if stage in ("sft", "rm", "dpo") else "prompts") for d in cfg.data]
        try:
            run = Run.start(cfg.output_dir, stage, dataclasses.asdict(cfg), model=dataclasses.asdict(cfg.model),
                            datasets=roots, parent=Path(parent) if parent else None, overwrite=cfg.overwrite)
            decision = [run.action]
        except Exception as e:  # the other ranks must not wait forever for a decision that never comes
            decision = [e]
    if state.num_processes > 1:
        broadcast_object_list(decision)
    if isinstance(decision[0], Exception):
        raise decision[0]
    return run if state.is_main_process else Run.follow(cfg.output_dir, decision[0])


def resume_from(run: Run, resume: bool) -> str | None:
    """The checkpoint to continue from. An unfinished run with the same inputs is continued only when asked
    (``--resume``): silently restarting would throw work away, silently resuming would surprise."""
    if run.action != "resume":
        return None
    checkpoint = last_checkpoint(run.dir)
    if not resume:
        raise RunError(f"{run.dir} holds an unfinished run with the same inputs: pass --resume to continue it"
                       f"{' from ' + Path(checkpoint).name if checkpoint else ''}, or --set overwrite=true to start over")
    return checkpoint


def fill_adalora_steps(peft_cfg: Any, train_cfg: Any, n_rows: int) -> None:
    """AdaLoRA schedules its rank budget over the whole run, so it needs the number of optimizer steps up front."""
    if peft_cfg.method != "adalora" or peft_cfg.adalora_total_steps is not None:
        return
    if train_cfg.max_steps > 0:
        peft_cfg.adalora_total_steps = train_cfg.max_steps
    else:
        per_epoch = math.ceil(n_rows / (train_cfg.batch_size * train_cfg.grad_accum))
        peft_cfg.adalora_total_steps = max(1, math.ceil(per_epoch * train_cfg.epochs))


def train(trainer: Trainer, run: Run, checkpoint: str | None) -> dict[str, Any]:
    """Train (from ``checkpoint`` when resuming), evaluate when there is an eval set; the metrics for run.json."""
    result = trainer.train(resume_from_checkpoint=checkpoint)
    run.write_history(trainer.state.log_history)  # the Trainer's entries carry "step"; evaluate() below adds no curve
    metrics = {"train_runtime_s": result.metrics.get("train_runtime"), "global_step": result.global_step,
               "epoch": trainer.state.epoch, "world_size": trainer.args.world_size,
               **log_history_metrics(trainer.state.log_history)}
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    return metrics


def save_weights(trainer: Trainer, run: Run) -> Path:
    """Adapters go to ``<run>/adapter``, full or partially frozen weights to ``<run>/model``, with the tokenizer
    beside them so either folder loads on its own. ``Trainer.save_model`` writes from the main process only and
    gathers sharded weights under FSDP / DeepSpeed ZeRO-3 (reward heads saved empty otherwise: LlamaFactory 1790)."""
    from peft import PeftModel

    model = trainer.accelerator.unwrap_model(trainer.model)
    target = run.adapter_dir if isinstance(model, PeftModel) else run.model_dir
    trainer.save_model(str(target))
    return target
