"""The adapter menu: the recipe's ``peft:`` section -> what trains in a model.

Every stage (SFT, reward, DPO, PPO) calls ``prepare(model, cfg, task_type)`` once and gets back the model to train:

| method    | what trains                                                 | built by                                   |
|-----------|-------------------------------------------------------------|--------------------------------------------|
| `lora`    | low-rank A/B on every linear layer (Hu et al. 2021)         | `peft.LoraConfig`                          |
| `qlora`   | LoRA on a 4-bit NF4 base (Dettmers et al. 2023)             | `LoraConfig`; models.py loads 4-bit when `wants_4bit(cfg)` |
| `dora`    | LoRA + a learned magnitude per column (Liu et al. 2024)     | `LoraConfig(use_dora=True)`                |
| `rslora`  | LoRA scaled by alpha/sqrt(r), stable at high r (Kalajdzievski 2023) | `LoraConfig(use_rslora=True)`      |
| `adalora` | SVD-shaped LoRA whose rank budget is pruned during training (Zhang et al. 2023) | `peft.AdaLoraConfig`   |
| `ia3`     | one learned scale vector per key/value/FFN (Liu et al. 2022) | `peft.IA3Config`                          |
| `loha`    | Hadamard product of two low-rank pairs (LyCORIS)            | `peft.LoHaConfig`                          |
| `lokr`    | Kronecker product of a small and a low-rank factor (LyCORIS) | `peft.LoKrConfig`                         |
| `full`    | every weight                                                | the model as loaded                        |
| `freeze`  | the last N decoder blocks, the final norm and the head      | `apply_freeze` (requires_grad only)        |

AdaLoRA is the one method whose adapter must be told about training progress: `AdaLoraModel.update_and_allocate`
has to run after every `optimizer.step()` and before `zero_grad()` (it reads the gradients to score each rank).
Neither transformers' Trainer nor TRL calls it, and PEFT ships a Trainer callback only for AdaMSS, not for AdaLoRA
(huggingface/peft 1327 is the report of AdaLoRA silently training as plain LoRA). So: stages built on a TRL trainer
pass ``callbacks=adapter_callbacks(cfg)``; a hand-written loop (PPO) calls ``update_and_allocate(model, step)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import peft
    from torch import nn
    from transformers import PreTrainedModel, TrainerCallback

ADAPTER_METHODS = ("lora", "qlora", "dora", "rslora", "adalora", "ia3", "loha", "lokr")
METHODS = (*ADAPTER_METHODS, "full", "freeze")
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS")
# Attribute names of the final norm on the module that holds the decoder blocks (Llama/Mistral/Qwen, Phi, GPT-2/Falcon,
# Mamba, OPT) and of sequence-classification heads (the names PEFT's SEQ_CLS_HEAD_NAMES checks).
_FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "norm_f", "final_layer_norm")
_SEQ_CLS_HEAD_NAMES = ("score", "classifier")


@dataclass
class AdapterConfig:
    """Recipe section ``peft:``."""

    method: str = "lora"  # one of METHODS: an adapter method, `full` (all weights) or `freeze` (last N blocks + head)
    r: int = 16  # adapter rank (lora, qlora, dora, rslora, loha, lokr)
    alpha: int = 32  # scaling numerator: updates are scaled by alpha/r (alpha/sqrt(r) for rslora)
    dropout: float = 0.05  # LoRA-family input dropout; rank dropout for loha/lokr; unused by ia3
    target_modules: str | list[str] = "all-linear"  # PEFT's "all-linear" (minus the head), module names or a regex
    modules_to_save: list[str] | None = None  # whole modules trained and saved beside the adapter (reward: ["score"])
    freeze_trainable_layers: int = 2  # freeze: how many final decoder blocks train
    adalora_total_steps: int | None = None  # adalora: total optimizer steps; the stage fills it from its max steps
    init_r: int = 12  # adalora: starting rank of every adapted layer
    target_r: int = 8  # adalora: average rank left after the budget is pruned

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        for name in ("r", "alpha", "init_r", "target_r"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout!r}")
        if isinstance(self.target_modules, str):
            if not self.target_modules.strip():
                raise ValueError("target_modules must not be empty")
        elif not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError(f"target_modules must be 'all-linear', a regex or a list of module names; "
                             f"got {self.target_modules!r}")
        if self.modules_to_save is not None and not all(isinstance(m, str) and m for m in self.modules_to_save):
            raise ValueError(f"modules_to_save must be a list of module names; got {self.modules_to_save!r}")
        if not isinstance(self.freeze_trainable_layers, int) or self.freeze_trainable_layers < 0:
            raise ValueError(f"freeze_trainable_layers must be an integer >= 0; got {self.freeze_trainable_layers!r}")
        if self.adalora_total_steps is not None and (not isinstance(self.adalora_total_steps, int)
                                                     or self.adalora_total_steps < 1):
            raise ValueError(f"adalora_total_steps must be a positive integer; got {self.adalora_total_steps!r}")
        if self.target_r > self.init_r:
            raise ValueError(f"target_r ({self.target_r}) must not exceed init_r ({self.init_r}): AdaLoRA only prunes")


def wants_4bit(cfg: AdapterConfig) -> bool:
    """Whether models.py must load the base in 4-bit NF4 (QLoRA); every other method trains on the loaded dtype."""
    return cfg.method == "qlora"


def peft_config(cfg: AdapterConfig, task_type: str, model: PreTrainedModel) -> peft.PeftConfig | None:
    """The PEFT config for an adapter method; None for `full` and `freeze`, which PEFT has no part in."""
    import peft

    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {', '.join(TASK_TYPES)}; got {task_type!r}")
    # A copy: for SEQ_CLS PEFT appends its head names to this list in place, which would leak into the run record.
    modules_to_save = list(cfg.modules_to_save) if cfg.modules_to_save is not None else None
    common: dict[str, Any] = {"task_type": task_type, "modules_to_save": modules_to_save}
    if cfg.method in ("lora", "qlora", "dora", "rslora"):
        return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                               target_modules=cfg.target_modules, use_dora=cfg.method == "dora",
                               use_rslora=cfg.method == "rslora", **common)
    if cfg.method == "adalora":
        if cfg.adalora_total_steps is None:
            raise ValueError("adalora_total_steps must be set for method adalora (its rank budget is scheduled over "
                             "the run); the stage fills it from its max steps")
        return peft.AdaLoraConfig(init_r=cfg.init_r, target_r=cfg.target_r, lora_alpha=cfg.alpha,
                                  lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
                                  total_step=cfg.adalora_total_steps, **common)
    if cfg.method == "ia3":
        targets, feedforward = ia3_modules(model, cfg.target_modules)
        return peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, **common)
    if cfg.method == "loha":
        return peft.LoHaConfig(r=cfg.r, alpha=cfg.alpha, rank_dropout=cfg.dropout,
                               target_modules=cfg.target_modules, **common)
    if cfg.method == "lokr":
        return peft.LoKrConfig(r=cfg.r, alpha=cfg.alpha, rank_dropout=cfg.dropout,
                               target_modules=cfg.target_modules, **common)
    return None


def ia3_modules(model: PreTrainedModel, target_modules: str | list[str]) -> tuple[str | list[str], list[str]]:
    """(IA)3's target and feedforward modules for this model.

    (IA)3 rescales keys, values and the FFN's inner activation (Liu et al. 2022). "All linear layers" would scale
    every projection, which is not the method, so "all-linear" is replaced by PEFT's per-architecture table: for
    Llama k_proj, v_proj, down_proj, with down_proj a feedforward module (its vector scales the input, i.e. the FFN
    activation, rather than the output). Explicit targets keep the table's feedforward modules they contain.
    """
    from peft.utils import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD
    from peft.utils import TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if target_modules == "all-linear":
        if model_type not in TARGETS:
            raise ValueError(f"target_modules: method ia3 has no default modules for model type {model_type!r}; list "
                             f"the key/value projections and the FFN output projection, e.g. [k_proj, v_proj, down_proj]")
        return list(TARGETS[model_type]), list(FEEDFORWARD[model_type])
    known_ff = FEEDFORWARD.get(model_type, [])
    if isinstance(target_modules, str):  # a regex: PEFT matches feedforward names against what the regex selected
        return target_modules, list(known_ff)
    return list(target_modules), [m for m in known_ff if m in target_modules]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks: ``model.model.layers`` for Llama-family models, else the largest ModuleList."""
    from torch import nn

    layers = getattr(getattr(model, "model", None), "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no `model.layers` and no nn.ModuleList of decoder blocks; "
                         f"method freeze cannot tell which blocks are last")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def _final_norm(model: nn.Module, layers: nn.ModuleList) -> nn.Module:
    owner = next(m for m in model.modules() if any(child is layers for child in m.children()))
    for name in _FINAL_NORM_NAMES:
        if getattr(owner, name, None) is not None:
            return getattr(owner, name)
    raise ValueError(f"{type(owner).__name__} (the module holding the decoder blocks) has none of the final-norm "
                     f"attributes {', '.join(_FINAL_NORM_NAMES)}")


def _head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:  # a causal LM's lm_head
        return head
    for name in _SEQ_CLS_HEAD_NAMES:
        if getattr(model, name, None) is not None:
            return getattr(model, name)
    raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head) and none of the head attributes "
                     f"{', '.join(_SEQ_CLS_HEAD_NAMES)}")


def apply_freeze(model: nn.Module, n: int) -> nn.Module:
    """Train only the last ``n`` decoder blocks, the final norm and the LM/score head; everything else is frozen.

    The classic partial fine-tune (e.g. LLaMA-Factory's `freeze`): the top blocks adapt to the domain while the
    embeddings and lower blocks keep their general features. With tied embeddings the head *is* the input
    embedding matrix, so it trains too.
    """
    layers = decoder_layers(model)
    if n > len(layers):
        raise ValueError(f"freeze_trainable_layers ({n}) exceeds the model's {len(layers)} decoder blocks")
    model.requires_grad_(False)
    trainable = [*list(layers)[len(layers) - n:], _final_norm(model, layers), _head(model)]
    for module in trainable:
        module.requires_grad_(True)
    return model


def prepare(model: PreTrainedModel, cfg: AdapterConfig, task_type: str) -> PreTrainedModel:
    """The model a stage trains: as is (`full`), partly frozen (`freeze`) or wrapped in a PEFT adapter."""
    if cfg.method == "full":
        return model
    if cfg.method == "freeze":
        return apply_freeze(model, cfg.freeze_trainable_layers)
    import peft

    config = peft_config(cfg, task_type, model)  # validates task_type before anything is touched
    if cfg.method == "qlora":
        if not getattr(model, "is_loaded_in_4bit", False):
            raise ValueError("method qlora needs a base loaded in 4-bit (models.py does so when wants_4bit(cfg)); "
                             "use method lora for a full-precision base")
        # Casts norms/head to fp32 and freezes the base. Gradient checkpointing stays off here because the trainer's
        # arguments own it (TRL turns it on by default and then enables input grads for PEFT models itself).
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return peft.get_peft_model(model, config)


def trainable_summary(model: nn.Module) -> dict[str, Any]:
    """Trainable and total parameter counts for run records (4-bit weights counted unpacked, as PEFT does)."""
    if hasattr(model, "get_nb_trainable_parameters"):  # a PeftModel: knows Params4bit packs two weights a byte
        trainable, total = model.get_nb_trainable_parameters()
    else:
        params = list(model.parameters())  # yields a tied weight once
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
    return {"trainable_params": trainable, "total_params": total,
            "trainable_percent": round(100 * trainable / total, 4) if total else 0.0}


def update_and_allocate(model: nn.Module, global_step: int) -> None:
    """AdaLoRA's per-step rank allocation (after ``optimizer.step()``, before ``zero_grad()``); a no-op otherwise."""
    import peft

    if isinstance(model, peft.PeftModel) and isinstance(model.base_model, peft.AdaLoraModel):
        model.base_model.update_and_allocate(global_step)


def adapter_callbacks(cfg: AdapterConfig) -> list[TrainerCallback]:
    """Trainer callbacks the adapter needs: AdaLoRA's allocation step, which no Trainer or TRL trainer calls."""
    if cfg.method != "adalora":
        return []
    from transformers import TrainerCallback

    class AdaLoraAllocation(TrainerCallback):
        # on_optimizer_step fires after optimizer.step() and before model.zero_grad(), where the gradients that
        # AdaLoRA's importance scores need still exist; global_step counts the steps completed before this one.
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            update_and_allocate(model, state.global_step)

    return [AdaLoraAllocation()]
