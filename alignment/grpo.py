"""Group relative policy optimisation with ``trl.GRPOTrainer``: ``rlhf align grpo --config RECIPE.yaml``.

GRPO (Shao et al. 2024, DeepSeekMath) is PPO without a value model: for each prompt the policy samples a group of
``sampling.num_generations`` completions, the rewards (an rm run and/or Python rules, ``alignment.reward_fn``) are
compared within the group, and each completion's advantage is its reward minus the group mean, divided by the group's
standard deviation (``scale_rewards: group``). The clipped probability-ratio objective then raises the completions
that beat their siblings. What is shared with RLOO (the parent run, the KL reference, prompts, sampling, run
records) lives in ``alignment.online``; this module adds GRPO's loss choices.

Defaults are TRL 1.16's, which follow the fixes to the paper's loss:

- ``loss_type: dapo`` averages token losses over all tokens of the batch (DAPO, Yu et al. 2025): the paper's
  per-sequence mean gives each token of a short completion more weight, so long wrong answers are punished less.
  ``dr_grpo`` (Liu et al. 2025, "Understanding R1-Zero-like training") divides by a constant instead, and pairs with
  ``scale_rewards: none``, since dividing by the group's spread over-weights prompts that are too easy or too hard.
- ``beta: 0``: no KL term and no reference model (DAPO, Dr. GRPO); DeepSeek-R1 used 0.001. With ``beta > 0`` the
  reference is the parent policy, held in the same weights (``alignment.online``).

run.json records the parent run, the rewards with their fingerprints (``config.reward_records``), the reference,
and the mean reward of the first and last logged steps (``train_reward_first`` / ``train_reward_last``), plus the
held-out mean reward (``eval_reward``) when the data has an eval split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from alignment import online
from alignment.online import OnlineConfig

if TYPE_CHECKING:
    from trl import GRPOTrainer

STAGE = "grpo"
# The losses TRL 1.16's GRPOConfig.loss_type accepts; TRL rejects an unknown one only at the first training step, so
# recipes are checked here. tests/alignment/test_grpo.py keeps this list equal to TRL's.
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
SCALE_REWARDS = ("group", "batch", "none")


@dataclass
class Config(OnlineConfig):
    """``rlhf align grpo``: the fields of ``OnlineConfig`` (parent, data, rewards, sampling, beta, peft, train...)
    and GRPO's loss."""

    loss_type: str = "dapo"  # one of LOSS_TYPES: dapo (token mean over the batch), grpo (per sequence), dr_grpo...
    scale_rewards: str = "group"  # divide advantages by the reward std of the group, the batch, or none (Dr. GRPO)
    # Other GRPOConfig arguments pass through train.extra, e.g. importance_sampling_level: sequence (GSPO, LUSPO).

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type: expected one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards: expected one of {', '.join(SCALE_REWARDS)}, got {self.scale_rewards!r}")


def build_trainer(cfg: Config, run_dir: Path) -> tuple[GRPOTrainer, dict[str, int]]:
    """The GRPOTrainer for ``cfg`` writing under ``run_dir`` (reference pinned), and the prompt counts."""
    from trl import GRPOConfig, GRPOTrainer

    return online.build_trainer(cfg, STAGE, run_dir, GRPOTrainer, GRPOConfig,
                                {"loss_type": cfg.loss_type, "scale_rewards": cfg.scale_rewards})


def run(cfg: Config) -> Path:
    """Train, evaluate and save; returns the run directory (an identical finished run is returned untouched)."""
    return online.run(cfg, STAGE, build_trainer)
