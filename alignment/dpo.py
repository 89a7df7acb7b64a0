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

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignment.adapters import AdapterConfig, prepare, trainable_summary
from alignment.data import DataConfig, load_mixture
from alignment.models import ModelConfig, load_causal_lm, load_tokenizer
from alignment.runs import RunError, load_run
from alignment.stage import apply_qlora_base, check_common, open_run, resume_from, save_weights, train
from alignment.training import TrainConfig, tensorboard_callback, trainer_kwargs
from rlhf.config import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from trl import DPOTrainer

# The losses TRL 1.16's DPOTrainer implements (DPOConfig.loss_type); it only rejects an unknown name at the first
# training step, so recipes are checked here. tests/alignment/test_dpo.py keeps this list equal to TRL's.
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
PARENT_STAGES = ("sft", "dpo")  # a DPO run can start another round (iterative DPO: the last policy is the reference)
REF_ADAPTER = "ref"  # the adapter name DPOTrainer reads the reference from (trl.trainer.utils.use_adapter)
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
    """Fill ``cfg.model`` from the parent run and check the recipe against it (once; later calls do nothing).

    Done when the stage runs, not when the recipe loads: the parent is an output of an earlier command. An adapter
    parent's base is its own base (its run.json ``config.model``) and its adapter is continued, so ``peft`` must be
    unset; a full-weights parent's ``model/`` folder becomes this run's base, and ``peft`` (default lora) says what
    trains on it."""
    if cfg.model is not None:
        return
    try:
        record = load_run(cfg.parent)
    except RunError as e:
        raise ConfigError(f"parent: {e}") from None
    if record["stage"] not in PARENT_STAGES or record["status"] != "finished":
        raise ConfigError(f"parent: {cfg.parent} is a {record['status']} {record['stage']} run; DPO starts from a "
                          f"finished {' or '.join(PARENT_STAGES)} run")
    model = ModelConfig(**record["config"]["model"])
    adapter, weights = Path(cfg.parent) / "adapter" / "adapter_config.json", Path(cfg.parent) / "model"
    if adapter.is_file():
        adapter_type = json.loads(adapter.read_text(encoding="utf-8"))["peft_type"]
        if cfg.peft is not None:
            raise ConfigError(f"peft: {cfg.parent} trained a {adapter_type} adapter, which DPO continues (its method "
                              "and rank are the parent's); remove peft, or start from a run with full weights")
        if adapter_type == "ADALORA":
            raise ConfigError(f"parent: {cfg.parent} trained an AdaLoRA adapter; DPO keeps a frozen copy of the "
                              "adapter as the reference and PEFT allows one AdaLoRA adapter per model")
        cfg.model = model
        return
    if not weights.is_dir():
        raise ConfigError(f"parent: {cfg.parent} holds neither adapter/ nor model/ weights")
    cfg.model = dataclasses.replace(model, name_or_path=str(weights.resolve()), revision=None)
    cfg.peft = cfg.peft or AdapterConfig()
    apply_qlora_base(cfg.model, cfg.peft)


def reference_kind(cfg: Config) -> str:
    """Which reference this config trains against (a key of ``REFERENCES``); after :func:`resolve_parent`."""
    if cfg.peft is None:
        return "sft_adapter_copy"
    return "separate_copy" if cfg.peft.method in ("full", "freeze") else "adapter_disabled"


def _policy_weights(cfg: Config) -> ModelConfig:
    """What loads the parent's policy: its run folder for an adapter (base + adapter), else its full weights."""
    return dataclasses.replace(cfg.model, name_or_path=cfg.parent) if cfg.peft is None else cfg.model


def _models(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> tuple[PreTrainedModel, PreTrainedModel | None]:
    """The policy to train and, only when it has no adapter to switch off, a separate frozen reference."""
    if cfg.peft is None:  # a PeftModel whose (parent) adapter trains; DPOTrainer adds the frozen "ref" copy
        return load_causal_lm(_policy_weights(cfg), tokenizer, training=True), None
    policy = prepare(load_causal_lm(cfg.model, tokenizer, training=True), cfg.peft, "CAUSAL_LM")
    if reference_kind(cfg) == "separate_copy":
        return policy, load_causal_lm(cfg.model, tokenizer)
    return policy, None


def _pin_reference(model: PreTrainedModel, cfg: Config) -> None:
    """Make the trainer's reference the one run.json records, where TRL 1.16 does otherwise.

    Given a ``PeftModel``, DPOTrainer adds an adapter ``ref`` and copies the parameters whose names contain
    ``.default.``. LoRA's live in ModuleDicts (``lora_A.default.weight``) and are copied; (IA)3, LoHa and LoKr keep
    ParameterDicts (``ia3_l.default``), which the pattern misses, so their ``ref`` stayed freshly initialised: the raw
    base, not the SFT policy. Loading the parent's saved adapter into ``ref`` is exact for every method (and keeps it
    in full precision where TRL rounds the trained adapter to bf16 on a 4-bit base). A fresh adapter on full weights
    needs no copy at all: without ``ref`` TRL disables the adapter, which gives exactly the parent's weights."""
    from peft import PeftModel
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    if not isinstance(model, PeftModel) or REF_ADAPTER not in model.peft_config:
        return
    if reference_kind(cfg) == "adapter_disabled":
        model.delete_adapter(REF_ADAPTER)
        return
    weights = load_peft_weights(str(Path(cfg.parent) / "adapter"), device=str(model.device))
    loaded = set_peft_model_state_dict(model, weights, adapter_name=REF_ADAPTER)
    if loaded.unexpected_keys:
        raise RuntimeError(f"{cfg.parent}/adapter: weights the model has no place for: {loaded.unexpected_keys[:3]}")


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
    tokenizer = load_tokenizer(_policy_weights(cfg), require_chat_template=is_conversational(train_ds[0]))
    policy, ref_model = _models(cfg, tokenizer)
    trainer = DPOTrainer(model=policy, ref_model=ref_model, args=_dpo_args(cfg, run_dir, eval_ds is not None),
                         train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                         callbacks=[tensorboard_callback(run_dir)])
    _pin_reference(trainer.model, cfg)
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
    from peft import PeftModel
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
        if isinstance(trainer.model, PeftModel) and REF_ADAPTER in trainer.model.peft_config:
            trainer.model.delete_adapter(REF_ADAPTER)  # the saved adapter is the policy alone
        save_weights(trainer, run_)
        run_.finish({**metrics, **trainable_summary(trainer.model), "train_rows": len(trainer.train_dataset),
                     "eval_rows": len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0})
    return run_.dir
