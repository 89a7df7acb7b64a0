"""Proximal policy optimisation from an SFT run and a reward: ``rlhf align ppo --config RECIPE.yaml``.

TRL removed its PPOTrainer (huggingface/trl 7020; field notes trap 1), so this is our own loop, written like cleanrl
and summarize_from_feedback_details and following "The N+ Implementation Details of RLHF with PPO" (Huang et al.
2024, arXiv 2403.17031; each detail is cited where it is applied). Each update:

1. **rollout**: sample a response for each of ``train.batch_size * train.grad_accum * ppo.mini_batches`` prompts
   from the policy (``rollout:`` settings), truncate after EOS, score prompt + response with the reward (a reward
   run or a ``module:function``), penalise responses that never ended (``missing_eos_penalty``);
2. **rewards**: per-token KL penalty against the reference (k1 estimator, fixed or adaptive coefficient) with the
   score added at the last token; values from the value model; advantages and returns by GAE, advantages whitened;
3. **learn**: ``ppo.epochs`` passes over the rollout in ``ppo.mini_batches`` optimizer steps of ``grad_accum``
   micro-batches: clipped policy loss + ``vf_coef`` * clipped value loss.

All roles share one copy of the base weights (alignment/roles.py); rollouts are in alignment/rollout.py, the
arithmetic in alignment/rl.py. TensorBoard ``ppo/*`` scalars per update go to ``<run>/logs``; run.json records the
roles, the reward, first/last score and KL, and the held-out score of the trained policy next to the SFT policy's.
``--resume`` continues from the newest complete checkpoint. One process, one device.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignment.adapters import ADAPTER_METHODS, AdapterConfig
from alignment.data import DataConfig
from alignment.models import ModelConfig, load_tokenizer
from alignment.policy import POLICY_STAGES, parent_base
from alignment.reward_fn import RewardSpec, reward_record
from alignment.stage import check_common, open_run, resume_from
from alignment.training import TrainConfig
from rlhf.config import ConfigError

if TYPE_CHECKING:
    from alignment.roles import Roles
    from alignment.rollout import Rollout
    from alignment.runs import Run

PARENT_STAGES = POLICY_STAGES  # any finished policy run; a PPO run can start another round
REWARD_NORMS = ("none", "batch", "running")


def _number(value: Any, name: str, low: float, high: float = math.inf, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise ValueError(f"{name}: expected {what} in [{low}, {high}], got {value!r}")


@dataclass
class RolloutConfig:
    """Recipe section ``rollout:``: how responses are sampled and judged."""

    max_new_tokens: int = 64  # response budget in tokens
    temperature: float = 0.7  # sampling temperature (0.7 in Huang et al. 2024); log-probs use logits / temperature
    top_k: int = 0  # 0: off. Any truncation makes the sampler differ from the distribution whose log-probs PPO uses
    top_p: float = 1.0  # nucleus sampling; 1.0: off (same caveat as top_k)
    missing_eos_penalty: float | None = 1.0  # subtracted from the score of a response that never ended (None: off)

    def __post_init__(self) -> None:
        _number(self.max_new_tokens, "max_new_tokens", 1, integer=True)
        _number(self.top_k, "top_k", 0, integer=True)
        _number(self.top_p, "top_p", 1e-6, 1.0)
        _number(self.temperature, "temperature", 1e-6)
        if self.missing_eos_penalty is not None:
            _number(self.missing_eos_penalty, "missing_eos_penalty", 0)


@dataclass
class PPOConfig:
    """Recipe section ``ppo:`` (defaults: Huang et al. 2024, table of PPO hyper-parameters)."""

    epochs: int = 4  # passes over each rollout batch (K)
    mini_batches: int = 1  # optimizer steps per pass; rollout = train.batch_size * train.grad_accum * mini_batches
    cliprange: float = 0.2  # policy ratio clip (epsilon)
    cliprange_value: float = 0.2  # how far a value may move from the rollout's per update
    vf_coef: float = 0.1  # weight of the value loss
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    kl_coef: float = 0.05  # KL penalty coefficient beta (the starting value when adaptive)
    kl_target: float | None = None  # adaptive KL controller's target, nats per response (None: fixed kl_coef)
    kl_horizon: int = 10000  # adaptive controller's horizon in episodes (Ziegler et al. 2019)
    whiten_advantages: bool = True  # normalise advantages per rollout batch
    reward_norm: str = "none"  # none | batch (whiten scores per rollout) | running (mean/std of all scores so far)

    def __post_init__(self) -> None:
        for name in ("epochs", "mini_batches", "kl_horizon"):
            _number(getattr(self, name), name, 1, integer=True)
        for name in ("cliprange", "cliprange_value", "vf_coef", "kl_coef"):
            _number(getattr(self, name), name, 0)
        _number(self.gamma, "gamma", 0, 1)
        _number(self.lam, "lam", 0, 1)
        if self.kl_target is not None:
            _number(self.kl_target, "kl_target", 1e-9)
        if self.reward_norm not in REWARD_NORMS:
            raise ValueError(f"reward_norm: expected one of {', '.join(REWARD_NORMS)}, got {self.reward_norm!r}")
        if not isinstance(self.whiten_advantages, bool):
            raise TypeError(f"whiten_advantages: expected true or false, got {self.whiten_advantages!r}")


@dataclass
class Config:
    parent: str  # the finished SFT (or DPO/PPO) run to start from: its base and adapter, or its full weights
    data: list[DataConfig]  # prompts: `prompt` rows (preference data) or `messages` (the last assistant turn dropped)
    output_dir: str  # the run directory
    reward_model: str | None = None  # a finished `rlhf align rm` run folder
    reward_fn: str | None = None  # or a programmatic reward "package.module:function" (prompt_text, response_text)
    peft: AdapterConfig | None = None  # full-weight parents only: the policy adapter to train (default: lora)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    # max_steps counts PPO updates (rollouts); batch_size is the micro-batch; eval_batch_size the generation and
    # no-grad chunk; max_length caps prompt tokens (longer prompts are skipped); save/logging_steps count updates
    train: TrainConfig = field(default_factory=TrainConfig)
    resume: bool = False  # continue an unfinished run with the same inputs from its last checkpoint
    overwrite: bool = False  # replace a finished run whose inputs differ
    # Filled by resolve_inputs (not recipe keys): the parent's base, and the reward's fingerprint (the rm run's
    # run.json or the function's source file), so a retrained reward makes a re-run an error, not a silent skip.
    model: ModelConfig | None = field(default=None, init=False)
    reward_fingerprint: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        check_common(self)
        for name, cls in (("rollout", RolloutConfig), ("ppo", PPOConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))
        if not isinstance(self.parent, str) or not self.parent:
            raise ValueError(f"parent: expected the folder of a finished SFT run, got {self.parent!r}")
        if (self.reward_model is None) == (self.reward_fn is None):
            raise ValueError("reward_model / reward_fn: set exactly one (an rm run folder, or module:function)")
        if self.reward_fn is not None and (not isinstance(self.reward_fn, str) or self.reward_fn.count(":") != 1):
            raise ValueError(f"reward_fn: expected 'package.module:function', got {self.reward_fn!r}")
        if self.peft is not None and (self.peft.method not in ADAPTER_METHODS or self.peft.method == "adalora"):
            raise ValueError(f"peft: method {self.peft.method!r} cannot be used; the policy and value are adapters "
                             "on one base (PEFT allows a single trainable AdaLoRA adapter, full/freeze have no "
                             "adapter to switch off for the reference)")
        if self.ppo.reward_norm == "batch" and rollout_size(self) < 2:
            raise ValueError("ppo.reward_norm: batch whitening needs at least 2 prompts per update")
        if self.train.precision == "fp16":
            raise ValueError("train.precision: PPO runs in bf16 or fp32 (fp16 would need loss scaling)")


def resolve_inputs(cfg: Config) -> None:
    """Fill ``cfg.model`` from the parent run and ``cfg.reward_fingerprint`` from the reward run (once).

    The parent as alignment/policy.py resolves it: an adapter parent's adapter is continued (``peft`` must be unset);
    a full-weights parent's ``model/`` becomes the base and ``peft`` (default lora) is the new policy."""
    if cfg.model is not None:
        return
    cfg.model, cfg.peft = parent_base(cfg.parent, cfg.peft, "ppo", PARENT_STAGES, adalora_refusal=(
        "PEFT allows one trainable AdaLoRA adapter per model and PPO trains a value adapter beside it"))
    key = "reward_model" if cfg.reward_model is not None else "reward_fn"
    try:  # checks the rm run is a finished one / imports the function
        record = reward_record(RewardSpec(source=reward_source(cfg)), 0)
    except ConfigError as e:
        raise ConfigError(str(e).replace("rewards[0].source", key)) from None
    cfg.reward_fingerprint = record.get("fingerprint") or record.get("source_sha256")


def reward_source(cfg: Config) -> str:
    return cfg.reward_model if cfg.reward_model is not None else cfg.reward_fn


def rollout_size(cfg: Config) -> int:
    return cfg.train.batch_size * cfg.train.grad_accum * cfg.ppo.mini_batches


def total_updates(cfg: Config, n_prompts: int) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * n_prompts / rollout_size(cfg)))


@dataclass
class TrainState:
    """What a checkpoint must carry besides weights and optimizer for a resumed run to continue exactly."""

    step: int  # PPO updates done
    kl: Any  # rl.KLController: its coefficient moves when adaptive
    moments: Any  # rl.RunningMoments of the scores (reward_norm: running)
    history: list[dict[str, float]] = field(default_factory=list)  # per-update stats (first/last go to run.json)


def ppo_update(cfg: Config, roles: Roles, batch: Rollout, params: list, optimizer: Any,
               scheduler: Any) -> dict[str, float]:
    """``ppo.epochs`` passes over the rollout, one optimizer step per mini-batch of ``grad_accum`` micro-batches;
    each micro-batch back-propagates the policy loss, then the value loss (each right after its own forward pass:
    the active adapter is what gets gradients, see roles.active)."""
    import torch

    from alignment import rl
    from alignment.roles import POLICY, response_values
    from alignment.rollout import response_logprobs

    size = batch.responses.shape[0]
    sums: dict[str, float] = {}
    count = 0
    for _ in range(cfg.ppo.epochs):
        for mini_batch in torch.randperm(size).split(size // cfg.ppo.mini_batches):
            for rows in mini_batch.split(cfg.train.batch_size):
                logprobs, _ = response_logprobs(roles, batch, rows, POLICY, cfg.rollout.temperature)
                pg_loss, pg_stats = rl.policy_loss(logprobs.float(), batch.logprobs[rows].float(),
                                                   batch.advantages[rows], batch.padding_mask[rows],
                                                   cfg.ppo.cliprange)
                (pg_loss / cfg.train.grad_accum).backward()
                values = response_values(roles, batch.query_responses[rows], batch.attention_mask[rows],
                                         batch.context_length).float()
                vf_loss, vf_stats = rl.value_loss(values, batch.values[rows], batch.returns[rows],
                                                  batch.padding_mask[rows], cfg.ppo.cliprange_value)
                (cfg.ppo.vf_coef * vf_loss / cfg.train.grad_accum).backward()
                step = {"loss/policy": pg_loss.item(), "loss/value": vf_loss.item(),
                        "policy/clipfrac": pg_stats["clipfrac"].item(), "policy/approxkl": pg_stats["approxkl"].item(),
                        "policy/ratio": pg_stats["ratio"].item(), "value/clipfrac": vf_stats["clipfrac"].item()}
                sums = {k: sums.get(k, 0.0) + v for k, v in step.items()}
                count += 1
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    return {**{k: v / count for k, v in sums.items()}, "grad_norm": float(grad_norm),
            "learning_rate": scheduler.get_last_lr()[0]}


def train_loop(cfg: Config, roles: Roles, prompts: list[Any], prompt_ids: list[list[int]], run_: Run,
               checkpoint: str | None) -> dict[str, Any]:
    """Every PPO update from the start (or ``checkpoint``) to the last; logs to TensorBoard, checkpoints, and
    returns the run.json metrics."""
    import torch
    from torch.utils.tensorboard import SummaryWriter
    from transformers import get_scheduler

    from alignment import rl
    from alignment.rollout import batch_indices, make_rollout, rollout_stats

    updates, size = total_updates(cfg, len(prompts)), rollout_size(cfg)
    steps = updates * cfg.ppo.epochs * cfg.ppo.mini_batches
    params = roles.trainable_parameters()
    # eps 1e-5, the PPO implementations' value (Huang et al. 2022, "The 37 implementation details of PPO")
    optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay, eps=1e-5)
    scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer, num_training_steps=steps,
                              num_warmup_steps=math.ceil(cfg.train.warmup_ratio * steps))
    state = TrainState(0, rl.KLController(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon), rl.RunningMoments())
    if checkpoint:
        load_checkpoint(Path(checkpoint), roles, optimizer, scheduler, state)
    if cfg.train.gradient_checkpointing:
        roles.model.get_base_model().activation_checkpointing_enable({"use_reentrant": False})
    # a resumed run drops whatever the interrupted attempt logged after its checkpoint
    writer = SummaryWriter(str(run_.logs_dir), purge_step=state.step + 1 if checkpoint else None)
    for update in range(state.step, updates):
        rows = batch_indices(update, size, len(prompts), cfg.train.seed)
        started = time.perf_counter()
        batch = make_rollout(cfg, roles, [prompts[i] for i in rows], [prompt_ids[i] for i in rows], state.kl.value,
                             state.moments)
        rolled = time.perf_counter()
        stats = {**rollout_stats(batch, state.kl.value), **ppo_update(cfg, roles, batch, params, optimizer, scheduler)}
        # where an update's time goes (generation + scoring vs the PPO epochs): what bench/ppo_layout.py compares
        stats.update({"time/rollout_s": rolled - started, "time/update_s": time.perf_counter() - rolled})
        state.kl.update(stats["objective/kl"], size)
        state.step = update + 1
        state.history.append(stats)
        if state.step % cfg.train.logging_steps == 0 or state.step in (1, updates):
            for key, value in stats.items():
                writer.add_scalar(f"ppo/{key}", value, state.step)
            writer.flush()
        if state.step % cfg.train.save_steps == 0 and state.step < updates:
            save_checkpoint(run_, roles, optimizer, scheduler, state, cfg.train.save_total_limit)
    writer.close()
    run_.write_history([{"step": i + 1, **stats} for i, stats in enumerate(state.history)])
    first, last = state.history[0], state.history[-1]
    return {**{k.replace("/", "_"): v for k, v in last.items()}, "score_first": first["objective/score"],
            "score_last": last["objective/score"], "kl_first": first["objective/kl"], "updates": state.step,
            "optimizer_steps": state.step * cfg.ppo.epochs * cfg.ppo.mini_batches, "episodes": state.step * size}


def save_checkpoint(run_: Run, roles: Roles, optimizer: Any, scheduler: Any, state: TrainState, keep: int) -> None:
    """``checkpoints/checkpoint-N``: adapters, value head, optimizer, scheduler, RNG, then ``trainer_state.json``
    last, the file training.last_checkpoint looks for (a checkpoint killed mid-save is never resumed from)."""
    import random
    import shutil

    import numpy as np
    import torch

    from alignment.roles import save_trainable
    from alignment.runs import write_json_atomic

    folder = run_.checkpoints_dir / f"checkpoint-{state.step}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    save_trainable(roles, folder)
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
               folder / "rng_state.pth")
    write_json_atomic(folder / "trainer_state.json", {
        "global_step": state.step, "kl_coef": state.kl.value, "moments": dataclasses.asdict(state.moments),
        "log_history": state.history})
    old = sorted(run_.checkpoints_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for stale in old[:-keep]:
        shutil.rmtree(stale)
    run_.record_metrics({"updates": state.step, "score_last": state.history[-1]["objective/score"]})


def load_checkpoint(folder: Path, roles: Roles, optimizer: Any, scheduler: Any, state: TrainState) -> None:
    """Put what :func:`save_checkpoint` wrote back into ``roles``, the optimizer, the scheduler and ``state``."""
    import random

    import numpy as np
    import torch

    from alignment import rl
    from alignment.roles import load_trainable

    load_trainable(roles, folder)
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    rng = torch.load(folder / "rng_state.pth", weights_only=False)  # our own file: Python and NumPy RNG tuples
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state_all(rng["cuda"])
    saved = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    state.step, state.kl.value, state.history = saved["global_step"], saved["kl_coef"], saved["log_history"]
    state.moments = rl.RunningMoments(**saved["moments"])


def run(cfg: Config) -> Path:
    """Train, evaluate on held-out prompts, save the policy adapter; returns the run directory (an identical
    finished run is returned untouched)."""
    from accelerate import PartialState
    from transformers import set_seed

    from alignment import roles as roles_
    from alignment.rollout import evaluate, load_prompts

    resolve_inputs(cfg)
    if PartialState().num_processes > 1:
        raise ConfigError("ppo: runs in one process; launch it without accelerate/torchrun")
    run_ = open_run(cfg, "ppo", parent=cfg.parent)
    if run_.action == "skip":
        return run_.dir
    checkpoint = resume_from(run_, cfg.resume)  # refused before `with`: a refusal does not mark the run failed
    with run_:
        set_seed(cfg.train.seed)  # fresh adapter and value-head draws happen while building the roles
        tokenizer = load_tokenizer(dataclasses.replace(cfg.model, name_or_path=cfg.parent))
        prompts = load_prompts(cfg, tokenizer)
        roles = roles_.build(cfg.model, cfg.parent, cfg.peft, tokenizer, reward_source(cfg))
        roles.amp_dtype = _amp_dtype(cfg.train.precision)
        run_.record["roles"] = roles.record
        run_.record["reward"] = reward_record(RewardSpec(source=reward_source(cfg)), 0)
        metrics = train_loop(cfg, roles, *prompts, run_, checkpoint)
        metrics.update(evaluate(cfg, roles, *load_prompts(cfg, tokenizer, eval=True)))
        save_policy(roles, run_.adapter_dir)
        run_.finish({**metrics, **roles.parameter_summary(), "train_prompts": len(prompts[0])})
    return run_.dir


def _amp_dtype(precision: str) -> Any:
    """bf16 autocast for ``bf16``, and for ``auto`` on a GPU that has it (the other stages' rule); else none."""
    import torch

    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if precision == "bf16" or (precision == "auto" and gpu_bf16) else None


def save_policy(roles: Roles, target: Path) -> None:
    """The policy adapter alone, with the tokenizer, in ``<run>/adapter``: loadable like any run's adapter."""
    import shutil

    from alignment.roles import POLICY

    staging = target.parent / ".adapter-staging"
    shutil.rmtree(staging, ignore_errors=True)
    roles.model.save_pretrained(str(staging), selected_adapters=[POLICY])  # PEFT writes a named one to staging/policy
    (staging / POLICY).rename(target)
    shutil.rmtree(staging)  # what is left is PEFT's model card for the folder
    roles.tokenizer.save_pretrained(str(target))
