"""``rlhf align <stage> --config RECIPE.yaml [--set key=value ...]`` and ``rlhf model tiny``.

Each stage module has a ``Config`` dataclass and ``run(config) -> Path``; this file only parses arguments and
loads the recipe into that dataclass (torch, transformers and TRL are imported by the stage, after parsing).
Paths in alignment recipes are relative to the working directory: they name outputs of earlier commands.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated, Optional

import typer

# stage name -> module; every module here has `Config` and `run(config) -> Path`
STAGES = {}

align_app = typer.Typer(help="Train and evaluate: SFT, reward model, DPO, PPO, GRPO, RLOO with LoRA-family adapters.",
                        no_args_is_help=True)
model_app = typer.Typer(help="Models: build the tiny offline model used by tests and the sample.", no_args_is_help=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Stage recipe (YAML)")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key: a.b=value")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last checkpoint")]


def load_stage_config(stage: str, path: Path, overrides: list[str] = ()):
    """The stage's Config from a recipe file with ``--set`` overrides; errors name the file and the key."""
    from rlhf.config import load_config

    return load_config(importlib.import_module(STAGES[stage]).Config, path, overrides)


def _run_stage(stage: str, config: Path, set_: list[str] | None, resume: bool) -> None:
    module = importlib.import_module(STAGES[stage])
    cfg = load_stage_config(stage, config, (set_ or []) + (["resume=true"] if resume else []))
    run_dir = module.run(cfg)
    _leave_process_group()
    typer.echo(f"{stage} run: {run_dir}")


def _leave_process_group() -> None:
    """Under torchrun / accelerate launch, ranks meet once more and close the group before exiting: a rank that
    exits while its peer still holds the gloo/NCCL connection can make the peer abort (seen: SIGABRT when both
    ranks skipped a finished run and returned at once)."""
    import sys

    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _stage_command(stage: str, doc: str):
    def command(config: ConfigOpt, set_: SetOpt = None, resume: ResumeOpt = False) -> None:
        _run_stage(stage, config, set_, resume)

    command.__doc__ = doc
    return command


def register_stage(name: str, module: str, doc: str) -> None:
    STAGES[name] = module
    align_app.command(name)(_stage_command(name, doc))


@model_app.command("tiny")
def tiny(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the model and tokenizer to")],
    corpus: Annotated[Optional[list[Path]], typer.Option("--corpus", help="Text files to train the tokenizer on "
                                                         "(default: the bundled telecom sample)")] = None,
    hidden_size: Annotated[int, typer.Option(help="Hidden size")] = 64,
    num_layers: Annotated[int, typer.Option(help="Decoder layers")] = 2,
    vocab_size: Annotated[int, typer.Option(help="BPE vocabulary size")] = 1024,
    seed: Annotated[int, typer.Option(help="Seed for the weights")] = 0,
) -> None:
    """Build a small random-init Llama-family model with a BPE tokenizer trained on CORPUS and a chat template."""
    from alignment.models import build_tiny_model

    files = list(corpus or sample_corpus())
    if not files:
        raise typer.BadParameter("no corpus files given and the bundled sample was not found", param_hint="--corpus")
    path = build_tiny_model(out, files, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    typer.echo(f"tiny model: {path}")


def sample_corpus() -> list[Path]:
    raw = Path(__file__).resolve().parents[1] / "samples" / "telecom" / "raw"
    return sorted(p for p in raw.rglob("*") if p.suffix in (".md", ".txt", ".jsonl"))


register_stage("sft", "alignment.sft", "Supervised fine-tuning (trl.SFTTrainer): chat template, assistant-only loss.")


@align_app.command("merge")
def merge_command(
    run: Annotated[Path, typer.Argument(help="A finished alignment run folder (holds run.json and adapter/)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the merged model (new or empty)")],
    dtype: Annotated[str, typer.Option(help="auto (the run's base dtype, never 4-bit), bfloat16, float16, float32")]
    = "auto",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier merge in --out")] = False,
) -> None:
    """Merge a run's adapter into its full-precision base and save a standalone model (safetensors + tokenizer)."""
    from alignment import merge

    path = merge.run(merge.Config(run_dir=str(run), output_dir=str(out), dtype=dtype, overwrite=overwrite))
    typer.echo(f"merged model: {path}")


register_stage("dpo", "alignment.dpo", "Direct preference optimisation (trl.DPOTrainer) from an SFT run; the "
               "reference is the SFT policy, without a second model copy.")
register_stage("rm", "alignment.reward", "Reward model (trl.RewardTrainer): the score head trains and saves with the "
               "adapter; held-out accuracy and margin in run.json.")
register_stage("grpo", "alignment.grpo", "GRPO (trl.GRPOTrainer) from an SFT run; rewards: rm runs, Python rules.")
register_stage("rloo", "alignment.rloo", "RLOO (trl.RLOOTrainer) from an SFT run; rewards: rm runs, Python rules.")
register_stage("ppo", "alignment.ppo", "PPO from an SFT run and a reward (rm run or Python rule); policy, reference, "
               "value and reward share one base as adapters.")
register_stage("eval", "alignment.evaluate", "Base vs SFT vs final policy: perplexity, reward accuracy, win rates.")
