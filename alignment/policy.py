"""The policy a stage starts from (DPO, GRPO, RLOO, PPO): a finished parent run, and the reference it is kept near.

- **the parent trained an adapter** (LoRA, QLoRA, DoRA, ...): its base is the parent's own base (its run.json
  ``config.model``) and the adapter is continued, so the recipe's ``peft`` must be unset;
- **the parent saved full weights** (``full``/``freeze`` SFT): its ``model/`` folder becomes this run's base and
  ``peft`` (default lora) is the adapter that trains on it.

TRL's trainers keep the reference as a frozen copy of a PEFT policy's adapter named ``ref``, but copy only the
parameters whose names contain ``.default.`` (:func:`pin_reference` fixes that; field notes trap 9).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from alignment.adapters import AdapterConfig
from alignment.models import ModelConfig
from alignment.runs import RunError, load_run
from alignment.stage import apply_qlora_base
from rlhf.config import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

POLICY_STAGES = ("sft", "dpo", "ppo", "grpo", "rloo")  # every stage whose run holds a policy
REF_ADAPTER = "ref"  # the adapter name TRL reads the reference from (trl.trainer.utils.use_adapter)


def parent_base(parent: str, peft: AdapterConfig | None, stage: str, parents: tuple[str, ...],
                adalora_refusal: str | None = None) -> tuple[ModelConfig, AdapterConfig | None]:
    """``(model, peft)`` for a run of ``stage`` starting from the ``parent`` run folder, which must be a finished
    run of one of ``parents``. ``adalora_refusal`` (why the stage cannot continue an AdaLoRA adapter) refuses
    one; None allows it. Errors are ConfigErrors naming the recipe field, raised before any run folder exists."""
    try:
        record = load_run(parent)
    except RunError as e:
        raise ConfigError(f"parent: {e}") from None
    if record["stage"] not in parents or record["status"] != "finished":
        raise ConfigError(f"parent: {parent} is a {record['status']} {record['stage']} run; {stage.upper()} starts "
                          f"from a finished {' or '.join(parents)} run")
    model = ModelConfig(**record["config"]["model"])
    adapter, weights = Path(parent) / "adapter" / "adapter_config.json", Path(parent) / "model"
    if adapter.is_file():
        adapter_type = json.loads(adapter.read_text(encoding="utf-8"))["peft_type"]
        if peft is not None:
            raise ConfigError(f"peft: {parent} trained a {adapter_type} adapter, which {stage.upper()} continues (its "
                              "method and rank are the parent's); remove peft, or start from a run with full weights")
        if adapter_type == "ADALORA" and adalora_refusal:
            raise ConfigError(f"parent: {parent} trained an AdaLoRA adapter; {adalora_refusal}")
        return model, None
    if not weights.is_dir():
        raise ConfigError(f"parent: {parent} holds neither adapter/ nor model/ weights")
    model = dataclasses.replace(model, name_or_path=str(weights.resolve()), revision=None)
    peft = peft or AdapterConfig()
    apply_qlora_base(model, peft)
    return model, peft


def policy_weights(model: ModelConfig, parent: str, peft: AdapterConfig | None) -> ModelConfig:
    """What loads the parent's policy: its run folder for an adapter (base + adapter), else its full weights."""
    return dataclasses.replace(model, name_or_path=parent) if peft is None else model


def pin_reference(model: PreTrainedModel, parent: str, copy_parent: bool) -> None:
    """Make the trainer's ``ref`` adapter the reference run.json records, where TRL 1.16 does otherwise.

    Given a ``PeftModel``, TRL adds ``ref`` and copies the parameters whose names contain ``.default.``. LoRA's live
    in ModuleDicts (``lora_A.default.weight``) and are copied; (IA)3, LoHa and LoKr keep ParameterDicts
    (``ia3_l.default``), which the pattern misses, so their ``ref`` stayed freshly initialised: the raw base, not the
    parent policy. With ``copy_parent`` the parent's saved adapter is loaded into ``ref``: exact for every method (and
    full precision where TRL rounds the trained adapter to bf16 on a 4-bit base). Otherwise ``ref`` is deleted: a
    fresh adapter switched off is exactly the parent's weights, and without beta nothing reads it."""
    from peft import PeftModel
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    if not isinstance(model, PeftModel) or REF_ADAPTER not in model.peft_config:
        return
    if not copy_parent:
        model.delete_adapter(REF_ADAPTER)
        return
    weights = load_peft_weights(str(Path(parent) / "adapter"), device=str(model.device))
    loaded = set_peft_model_state_dict(model, weights, adapter_name=REF_ADAPTER)
    if loaded.unexpected_keys:
        raise RuntimeError(f"{parent}/adapter: weights the model has no place for: {loaded.unexpected_keys[:3]}")


def drop_reference(model: PreTrainedModel) -> None:
    """Delete the ``ref`` adapter before saving: the saved adapter is the policy alone."""
    from peft import PeftModel

    if isinstance(model, PeftModel) and REF_ADAPTER in model.peft_config:
        model.delete_adapter(REF_ADAPTER)
