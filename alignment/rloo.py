"""REINFORCE leave-one-out with ``trl.RLOOTrainer``: ``rlhf align rloo --config RECIPE.yaml``.

RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback
in LLMs") treats a whole completion as one action: the policy samples ``sampling.num_generations`` completions per
prompt, and each completion's baseline is the mean reward of the *other* completions of its prompt (the
leave-one-out estimator of Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!"), which is
unbiased and, unlike PPO, needs no value model. The KL penalty towards the parent policy is part of the reward, as in
the paper: ``reward - beta * sum_t (log pi - log ref)`` over the completion's tokens. What is shared with GRPO (the
parent run, the reference, prompts, sampling, run records) lives in ``alignment.online``; this module adds RLOO's
options.

TRL 1.16's RLOOTrainer adds a frozen ``ref`` copy of a PEFT policy's adapter even at ``beta: 0`` (GRPOTrainer only
when ``beta > 0``): ``online.pin_reference`` deletes it when nothing reads it, and AdaLoRA, which PEFT allows once per
model, is refused here at any beta.

run.json records the parent run, the rewards with their fingerprints (``config.reward_records``), the reference,
and the mean reward of the first and last logged steps (``train_reward_first`` / ``train_reward_last``; the reward
before the KL penalty, TRL's ``reward``), plus ``kl`` and the held-out ``eval_reward`` when there is an eval split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from alignment import online
from alignment.online import OnlineConfig

if TYPE_CHECKING:
    from trl import RLOOTrainer

STAGE = "rloo"


@dataclass
class Config(OnlineConfig):
    """``rlhf align rloo``: the fields of ``OnlineConfig`` (parent, data, rewards, sampling, peft, train...) and
    RLOO's own."""

    beta: float = 0.05  # KL penalty subtracted from each completion's reward (TRL 1.16's default; 0: no reference)
    normalize_advantages: bool = False  # rescale advantages to mean 0, std 1 over each generated batch
    reward_clip_range: list[float] | None = None  # [low, high]: clip the summed reward before the baseline
    copies_adapter_always: ClassVar[bool] = True  # TRL 1.16's RLOOTrainer adds the `ref` adapter even at beta 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.normalize_advantages, bool):
            raise ValueError(f"normalize_advantages: expected true or false, got {self.normalize_advantages!r}")
        clip = self.reward_clip_range
        if clip is not None and not (isinstance(clip, (list, tuple)) and len(clip) == 2
                                     and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in clip)
                                     and clip[0] < clip[1]):
            raise ValueError(f"reward_clip_range: expected [low, high] with low < high, or null; got {clip!r}")


def build_trainer(cfg: Config, run_dir: Path) -> tuple[RLOOTrainer, dict[str, int]]:
    """The RLOOTrainer for ``cfg`` writing under ``run_dir`` (reference pinned), and the prompt counts."""
    from trl import RLOOConfig, RLOOTrainer

    clip = tuple(cfg.reward_clip_range) if cfg.reward_clip_range is not None else None
    return online.build_trainer(cfg, STAGE, run_dir, RLOOTrainer, RLOOConfig,
                                {"normalize_advantages": cfg.normalize_advantages, "reward_clip_range": clip})


def run(cfg: Config) -> Path:
    """Train, evaluate and save; returns the run directory (an identical finished run is returned untouched)."""
    return online.run(cfg, STAGE, build_trainer)
