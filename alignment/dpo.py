"""Direct preference optimisation with ``trl.DPOTrainer``: ``rlhf align dpo --config RECIPE.yaml``.

DPO (Rafailov et al. 2023) trains the policy to raise ``beta * (log pi(chosen) - log ref(chosen))`` above the same
term for the rejected reply; the reference ``ref`` is the SFT policy the run starts from. Keeping a second copy of
the model for it doubles memory, and precomputing its log-probs is fragile (field notes trap 9; huggingface/trl
2421, 6403), so the reference shares the policy's weights:

- **the parent trained an adapter** (LoRA, QLoRA, DoRA, ...): the policy *continues that adapter*, and the reference
  is the same adapter loaded a second time under the frozen PEFT name ``ref`` (TRL's own mechanism for a model that
  arrives as a ``PeftModel``). One copy of the base, two small adapters; the reference is exactly the SFT policy,
  and the saved adapter loads on the plain base like the SFT one did. Disabling the adapter instead would make the
  reference the raw base, not the SFT policy; merging the SFT adapter into the base and training a fresh one would
  be lossy on a 4-bit base (trap 6; huggingface/peft 2321) and leave an adapter that needs the merged base to load.
- **the parent saved full weights** (``full``/``freeze`` SFT): a fresh adapter (``peft:``) is trained on them and
  the reference is those weights with the adapter disabled. ``peft.method: full`` or ``freeze`` has nothing to
  switch off, so only then is the reference a separate frozen copy.

run.json records which of the three the reference was (``reference``), and the held-out implicit reward accuracy
and margin (``heldout_reward_accuracy``, ``heldout_reward_margin``: how often and by how much
``beta * log pi/ref`` ranks the chosen reply above the rejected one on the eval split).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignment.adapters import AdapterConfig, prepare, trainable_summary
from alignment.data import DataConfig, load_mixture
from alignment.models import ModelConfig, load_causal_lm, load_tokenizer
from alignment.policy import drop_reference, parent_base, pin_reference, policy_weights
from alignment.stage import check_common, open_run, resume_from, save_weights, train
from alignment.training import TrainConfig, tensorboard_callback, trainer_kwargs

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from trl import DPOTrainer

# The losses TRL 1.16's DPOTrainer implements (DPOConfig.loss_type); it only rejects an unknown name at the first
# training step, so recipes are checked here. tests/alignment/test_dpo.py keeps this list equal to TRL's.
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
# a DPO run can start another round (iterative DPO: the last policy is the reference), as can a PPO run
PARENT_STAGES = ("sft", "dpo", "ppo")
REFERENCES = {
    "sft_adapter_copy": "the parent's adapter loaded a second time as the frozen PEFT adapter 'ref' on the same base "
                        "(one copy of the base weights); the policy is that adapter, trained further",
    "adapter_disabled": "the parent's full weights with the policy's new adapter switched off (one copy of the "
                        "weights)",
    "separate_copy": "a second, frozen copy of the parent's weights (full or freeze training has no adapter to "
                     "switch off)",
}


@dataclass
class Config:
    parent: str  # the finished SFT run to start from (its folder); its base model and adapter/weights are loaded
    data: list[DataConfig]  # preference pairs (prompt/chosen/rejected): one dataset or a weighted mixture
    output_dir: str  # the run directory
    beta: float = 0.1  # pull towards the reference: higher keeps the policy closer (IPO's tau for loss_type ipo)
    loss_type: str | list[str] = "sigmoid"  # one of LOSS_TYPES (sigmoid = DPO), or a list (weights: train.extra)
    peft: AdapterConfig | None = None  # parents with full weights only: the adapter to train (default: lora)
    train: TrainConfig = field(default_factory=TrainConfig)
    resume: bool = False  # continue an unfinished run with the same inputs from its last checkpoint
    overwrite: bool = False  # replace a finished run whose inputs differ
    # Filled from the parent by resolve_parent (not a recipe key): the parent's base, loaded as the parent loaded it.
    model: ModelConfig | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        check_common(self)
        if not isinstance(self.parent, str) or not self.parent:
            raise ValueError(f"parent: expected the folder of a finished SFT run, got {self.parent!r}")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or self.beta <= 0:
            raise ValueError(f"beta: expected a number > 0, got {self.beta!r}")
        losses = [self.loss_type] if isinstance(self.loss_type, str) else self.loss_type
        if not isinstance(losses, list) or not losses or any(loss not in LOSS_TYPES for loss in losses):
            raise ValueError(f"loss_type: expected one of {', '.join(LOSS_TYPES)} (or a list of them), "
                             f"got {self.loss_type!r}")
        if self.peft is not None and self.peft.method == "adalora":
            raise ValueError("peft: adalora cannot train beside the frozen reference adapter DPOTrainer adds "
                             "(PEFT allows one AdaLoRA adapter per model); use lora, dora, ...")


def resolve_parent(cfg: Config) -> None:
    """Fill ``cfg.model`` (and ``cfg.peft`` for a full-weights parent) from the parent run, once (see
    alignment/policy.py). Done when the stage runs, not when the recipe loads: the parent is an output of an
    earlier command."""
    if cfg.model is None:
        cfg.model, cfg.peft = parent_base(cfg.parent, cfg.peft, "dpo", PARENT_STAGES, adalora_refusal=(
            "DPO keeps a frozen copy of the adapter as the reference and PEFT allows one AdaLoRA adapter per model"))


def reference_kind(cfg: Config) -> str:
    """Which reference this config trains against (a key of ``REFERENCES``); after :func:`resolve_parent`."""
    if cfg.peft is None:
        return "sft_adapter_copy"
    return "separate_copy" if cfg.peft.method in ("full", "freeze") else "adapter_disabled"


def _models(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> tuple[PreTrainedModel, PreTrainedModel | None]:
    """The policy to train and, only when it has no adapter to switch off, a separate frozen reference."""
    if cfg.peft is None:  # a PeftModel whose (parent) adapter trains; DPOTrainer adds the frozen "ref" copy
        return load_causal_lm(policy_weights(cfg.model, cfg.parent, cfg.peft), tokenizer, training=True), None
    policy = prepare(load_causal_lm(cfg.model, tokenizer, training=True), cfg.peft, "CAUSAL_LM")
    if reference_kind(cfg) == "separate_copy":
        return policy, load_causal_lm(cfg.model, tokenizer)
    return policy, None


def _dpo_args(cfg: Config, run_dir: Path, has_eval: bool) -> Any:
    from trl import DPOConfig

    losses = [cfg.loss_type] if isinstance(cfg.loss_type, str) else list(cfg.loss_type)
    return DPOConfig(**trainer_kwargs(cfg.train, run_dir, has_eval), max_length=cfg.train.max_length,
                     beta=cfg.beta, loss_type=losses)


def build_trainer(cfg: Config, run_dir: Path) -> DPOTrainer:
    """The DPOTrainer for ``cfg``, writing checkpoints and logs under ``run_dir``; its reference is pinned."""
    from trl import DPOTrainer
    from trl.data_utils import is_conversational

    resolve_parent(cfg)
    train_ds = load_mixture(cfg.data, "dpo", cfg.train.seed)
    eval_ds = load_mixture(cfg.data, "dpo", cfg.train.seed, eval=True)
    tokenizer = load_tokenizer(policy_weights(cfg.model, cfg.parent, cfg.peft), require_chat_template=is_conversational(train_ds[0]))
    policy, ref_model = _models(cfg, tokenizer)
    trainer = DPOTrainer(model=policy, ref_model=ref_model, args=_dpo_args(cfg, run_dir, eval_ds is not None),
                         train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                         callbacks=[tensorboard_callback(run_dir)])
    pin_reference(trainer.model, cfg.parent, copy_parent=reference_kind(cfg) == "sft_adapter_copy")
    return trainer


def _reference_record(cfg: Config) -> dict[str, Any]:
    kind = reference_kind(cfg)
    weights = Path(cfg.parent) / "adapter" if kind == "sft_adapter_copy" else Path(cfg.model.name_or_path)
    return {"kind": kind, "description": REFERENCES[kind], "weights": str(weights.resolve()),
            "base": cfg.model.name_or_path}


def _heldout_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """TRL's eval reward metrics (``eval_rewards/accuracies``, ``eval_rewards/margins``) also under names that say
    what they are: how often, and by how much, the implicit reward ranks held-out chosen replies first."""
    if "eval_rewards/accuracies" in metrics:
        metrics["heldout_reward_accuracy"] = metrics["eval_rewards/accuracies"]
        metrics["heldout_reward_margin"] = metrics["eval_rewards/margins"]
    return metrics


def run(cfg: Config) -> Path:
    """Train, evaluate and save; returns the run directory (an identical finished run is returned untouched)."""
    from transformers import set_seed

    resolve_parent(cfg)
    run_ = open_run(cfg, "dpo", parent=cfg.parent)
    if run_.action == "skip":
        return run_.dir
    checkpoint = resume_from(run_, cfg.resume)  # refused before `with`: a refusal does not mark the run failed
    with run_:
        set_seed(cfg.train.seed)
        run_.record["reference"] = _reference_record(cfg)
        trainer = build_trainer(cfg, run_.dir)
        metrics = _heldout_metrics(train(trainer, run_, checkpoint))
        drop_reference(trainer.model)
        save_weights(trainer, run_)
        run_.finish({**metrics, **trainable_summary(trainer.model), "train_rows": len(trainer.train_dataset),
                     "eval_rows": len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0})
    return run_.dir
