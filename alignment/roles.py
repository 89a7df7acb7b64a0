"""PPO's four models in one: a single copy of the base weights carries the policy, the reference, the value model and
(when it was trained on the same base) the reward model as PEFT adapters, switched per forward pass.

- **policy**: adapter ``policy``, the SFT run's adapter trained further; or, when the SFT run saved full weights, a
  new adapter (``peft:``) on those weights.
- **reference**: adapter ``ref``, a frozen second copy of the SFT adapter; or, for full-weight SFT runs, the base
  with every adapter disabled. Either way exactly the SFT policy (tested against the SFT run loaded on its own).
- **value**: adapter ``value`` + a linear head on the last hidden state, started from the reward adapter if any.
- **reward**: adapter ``reward`` + the reward run's score head, when that run is an adapter of the same kind on
  this base; otherwise a separate frozen model, or a Python function (alignment/reward_fn.py loads both).

Why: PPO with four full models is what puts it out of reach of one GPU, and the wrappers that kept PPO and PEFT
together broke (field notes trap 1; huggingface/trl 3093, 1618; PPOTrainer removed in huggingface/trl 7020). PEFT's
multi-adapter API (``load_adapter``, ``add_adapter``, ``set_adapter``) is all it takes; PEFT allows one adapter type
per model, so the value adapter is a copy of the policy's (or the reward's) kind and shape.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    from alignment.adapters import AdapterConfig
    from alignment.models import ModelConfig

POLICY, REFERENCE, VALUE, REWARD = "policy", "ref", "value", "reward"
TRAINABLE = (POLICY, VALUE)
VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass
class Roles:
    model: PeftModel  # the base with the policy, value (and ref / reward) adapters
    tokenizer: PreTrainedTokenizerBase
    value_head: torch.nn.Linear | None  # hidden state -> value, on the value adapter's last hidden state
    reference: str | None  # the reference's adapter name, or None: the base with every adapter disabled
    reward_head: torch.nn.Linear | None = None  # the reward run's score head, when the reward is the REWARD adapter
    reward_fn: Callable[..., list[float]] | None = None  # otherwise: (prompts, completions) -> scores, TRL's form
    amp_dtype: torch.dtype | None = None  # forward passes under autocast to this dtype (bf16 precision), else none
    record: dict[str, Any] = field(default_factory=dict)  # what run.json says about each role

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The policy and value adapters and the value head, in a fixed order (optimizer state follows it)."""
        adapters = [p for name, p in self.model.named_parameters() if adapter_of(name) in TRAINABLE]
        return adapters + list(self.value_head.parameters())

    def parameter_summary(self) -> dict[str, Any]:
        """run.json's counts: what PPO trains out of all it holds (4-bit weights counted unpacked, as PEFT counts).
        ``requires_grad`` is no guide here: ``set_adapter`` flips it with every switch of role."""
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = self.model.get_nb_trainable_parameters()[1] + sum(p.numel() for p in self.value_head.parameters())
        return {"trainable_params": trainable, "total_params": total,
                "trainable_percent": round(100 * trainable / total, 4)}


def adapter_of(name: str) -> str | None:
    """The adapter a parameter belongs to: LoRA keeps ``lora_A.<adapter>.weight``, (IA)3/LoHa/LoKr end in it."""
    parts = name.split(".")
    return next((p for p in reversed(parts) if p in (POLICY, REFERENCE, VALUE, REWARD)), None)


def load_policy(model_cfg: ModelConfig, parent: str, peft_cfg: AdapterConfig | None,
                tokenizer: PreTrainedTokenizerBase) -> tuple[PeftModel, str | None]:
    """The base with the trainable policy adapter and the reference; ``(model, reference adapter or None)``.

    ``peft_cfg`` is None for an adapter parent (its adapter is continued: DPO's rule, see dpo.py), else the adapter
    to put on the parent's full weights."""
    import peft

    from alignment.adapters import peft_config
    from alignment.models import load_causal_lm

    base = load_causal_lm(model_cfg, tokenizer, training=True)  # 4-bit bases come back ready for k-bit training
    if peft_cfg is None:
        adapter = str(Path(parent) / "adapter")
        model = peft.PeftModel.from_pretrained(base, adapter, adapter_name=POLICY, is_trainable=True)
        # Disabling the adapter would give the raw base, not the SFT policy: load the SFT adapter a second time,
        # frozen, from disk (exact for every adapter type; dpo.py _pin_reference has the story of copying it).
        model.load_adapter(adapter, adapter_name=REFERENCE, is_trainable=False)
        model.set_adapter(POLICY)
        return model, REFERENCE
    model = peft.get_peft_model(base, peft_config(peft_cfg, "CAUSAL_LM", base), adapter_name=POLICY)
    return model, None  # a new adapter on the SFT weights: switching it off *is* the SFT policy


def build(model_cfg: ModelConfig, parent: str, peft_cfg: AdapterConfig | None, tokenizer: PreTrainedTokenizerBase,
          reward_source: str) -> Roles:
    """Every role on one base: the policy and reference, the reward (an adapter on this base when the reward run
    allows, else a separate frozen model or a Python function, loaded by alignment/reward_fn.py as GRPO loads them),
    then the value model, which starts from the reward adapter when there is one."""
    import torch
    from trl.trainer.utils import disable_dropout_in_model

    from alignment.reward_fn import RewardSpec, load_reward

    model, reference = load_policy(model_cfg, parent, peft_cfg, tokenizer)
    if not model_cfg.quantization:  # a quantised base was placed on its device while loading
        model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    roles = Roles(model, tokenizer, value_head=None, reference=reference)
    spec = RewardSpec(source=reward_source)
    if not spec.is_function and reward_shares_base(reward_source, model_cfg, model):
        roles.reward_head, kind = add_reward_adapter(model, reward_source), f"adapter '{REWARD}' on the same base"
    else:
        roles.reward_fn = load_reward(spec)
        kind = "a Python function" if spec.is_function else "a separate frozen model"
    value_source = REWARD if roles.reward_head is not None else POLICY
    roles.value_head = add_value(model, value_source, roles.reward_head)
    # Huang et al. 2024, sec. 4, "disable dropout": with dropout on, the rollout's log-probs and the training pass's
    # differ for the same tokens, so the PPO ratio starts away from 1 and the KL estimate is noise (LoRA dropout too)
    disable_dropout_in_model(model)
    # from_pretrained returns eval mode; the model stays in train mode for good (see rollout.generate: bitsandbytes
    # repacks 4-bit weights for inference-only CPU kernels the first time it sees eval mode)
    model.train()
    model.set_adapter(POLICY)
    roles.record = {
        "policy": f"adapter '{POLICY}': " + ("the parent's adapter, trained further" if peft_cfg is None
                                             else f"a new {peft_cfg.method} adapter on the parent's weights"),
        "reference": f"adapter '{REFERENCE}', a frozen copy of the parent's adapter" if reference
        else "the parent's weights with every adapter disabled",
        "value": f"adapter '{VALUE}' (started from '{value_source}') + a linear head",
        "reward": f"{kind}: {reward_source}",
        "base_copies": 2 if kind == "a separate frozen model" else 1,
    }
    return roles


def reward_shares_base(reward_run: str, model_cfg: ModelConfig, model: PeftModel) -> bool:
    """Whether the reward run is an adapter of the same kind on the same base, loaded the same way (quantisation),
    so it can be one more adapter on this model rather than a second model."""
    from alignment.models import resolve_model_path

    base, adapter = resolve_model_path(reward_run)
    if adapter is None:
        return False
    recorded = json.loads((Path(reward_run) / "run.json").read_text(encoding="utf-8"))["config"]["model"]
    kind = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))["peft_type"]
    same_base = (Path(base).resolve() == Path(model_cfg.name_or_path).resolve()
                 if Path(base).exists() else base == model_cfg.name_or_path)
    return (same_base and recorded.get("quantization") == model_cfg.quantization
            and kind == model.peft_config[POLICY].peft_type.value)


def add_reward_adapter(model: PeftModel, reward_run: str) -> torch.nn.Linear:
    """Load the reward run's adapter as the frozen REWARD adapter; returns its score head as a module of its own.

    The adapter was saved for sequence classification, with the score head in ``modules_to_save`` (reward.py, trap
    3). This model is a causal LM without a ``score`` module, so the adapter is added untyped and without
    modules_to_save, its layer weights loaded, and the head's weight moved into a linear layer of our own."""
    import peft
    import torch

    folder = str(Path(reward_run) / "adapter")
    config = peft.PeftConfig.from_pretrained(folder)
    config.task_type, config.modules_to_save, config.inference_mode = None, None, True
    model.add_adapter(REWARD, config)
    weights = peft.load_peft_weights(folder, device=str(model.device))
    head = {key.rsplit(".", 1)[-1]: weights.pop(key) for key in list(weights) if key.split(".")[-2] == "score"}
    loaded = peft.set_peft_model_state_dict(model, weights, adapter_name=REWARD)
    if loaded.unexpected_keys or "weight" not in head:
        raise RuntimeError(f"{folder}: not a reward adapter with a score head ({loaded.unexpected_keys[:3]})")
    score = torch.nn.Linear(head["weight"].shape[1], head["weight"].shape[0], bias="bias" in head)
    score.load_state_dict(head)
    return score.to(model.device).requires_grad_(False)


def add_value(model: PeftModel, source: str, source_head: torch.nn.Linear | None) -> torch.nn.Linear:
    """The VALUE adapter, started as a copy of ``source`` (REWARD or POLICY), and its head.

    Huang et al. 2024 (sec. 7, "initialise the value model from the reward model"): a critic that starts out
    predicting the score learns faster than one that starts from scratch. Without a reward adapter it starts from
    the policy's features with a zero head (the 2019 lm-human-preferences value head starts at zero), so the first
    advantages are the rewards themselves."""
    import peft
    import torch

    config = copy.deepcopy(model.peft_config[source])
    config.inference_mode = False
    model.add_adapter(VALUE, config)
    peft.set_peft_model_state_dict(model, peft.get_peft_model_state_dict(model, adapter_name=source),
                                   adapter_name=VALUE)
    hidden = model.get_base_model().config.get_text_config().hidden_size
    head = torch.nn.Linear(hidden, 1, bias=source_head is not None and source_head.bias is not None)
    if source_head is not None:
        head.load_state_dict(source_head.state_dict())
    else:
        torch.nn.init.zeros_(head.weight)
    return head.to(model.device)


def autocast(roles: Roles) -> Any:
    """Mixed precision for forward passes only (PyTorch advises against running backward under autocast)."""
    import torch

    return torch.autocast(roles.model.device.type, dtype=roles.amp_dtype, enabled=roles.amp_dtype is not None)


@contextmanager
def active(model: PeftModel, adapter: str | None) -> Iterator[None]:
    """Forward passes inside run under ``adapter`` (None: every adapter off, the base alone).

    Unlike trl's ``use_adapter`` this does not switch back on exit: PEFT's ``set_adapter`` also sets
    ``requires_grad`` (only the active adapter trains), and autograd skips a parameter whose ``requires_grad`` was
    turned off between the forward pass and ``backward()``, so switching back before the value loss's backward
    would silently leave the value adapter untrained. Every forward pass names its adapter instead."""
    if adapter is None:
        with model.disable_adapter():
            yield
        return
    model.set_adapter(adapter, inference_mode=adapter not in TRAINABLE)
    yield


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, as ``generate`` counts them for left-padded prompts (Huang et al.
    2024, sec. 7, "left padding": without them a padded prompt shifts every position and the log-probs of the
    training pass no longer match those of sampling)."""
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


def policy_logits(roles: Roles, adapter: str | None, query_responses: torch.Tensor, attention_mask: torch.Tensor,
                  response_length: int) -> torch.Tensor:
    """Logits predicting each response token, ``(batch, response_length, vocab)``, under ``adapter`` (None: every
    adapter off). Only the response positions go through the LM head (``logits_to_keep``)."""
    with active(roles.model, adapter), autocast(roles):
        out = roles.model(input_ids=query_responses, attention_mask=attention_mask,
                          position_ids=_position_ids(attention_mask), logits_to_keep=response_length + 1)
    return out.logits[:, :-1]


def _last_hidden(roles: Roles, adapter: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden state (after its final norm: what a sequence-classification head reads) under
    ``adapter``; the LM head is skipped."""
    decoder = roles.model.get_base_model().get_decoder()
    with active(roles.model, adapter), autocast(roles):
        return decoder(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=_position_ids(attention_mask)).last_hidden_state


def response_values(roles: Roles, query_responses: torch.Tensor, attention_mask: torch.Tensor,
                    context_length: int) -> torch.Tensor:
    """``(batch, response_length)``: the value of the state before each response token (the hidden state at the
    previous position, as the logits that predict it)."""
    hidden = _last_hidden(roles, VALUE, query_responses, attention_mask)[:, context_length - 1:-1]
    return roles.value_head(hidden.to(roles.value_head.weight.dtype)).squeeze(-1)


def score(roles: Roles, prompts: list[Any], responses: list[str], batch_size: int) -> torch.Tensor:
    """One score per (prompt, decoded response), by whichever reward this run has. A reward model reads the
    conversation tokenised as reward.score tokenises it (the chat template, as RewardTrainer trained it) and scores
    its last token, so an adapter reward and the same reward run loaded on its own agree (tested)."""
    import torch

    from alignment import reward

    if roles.reward_head is None:  # a function or a separate model, in TRL's reward signature
        completions = [[{"role": "assistant", "content": r}] if isinstance(p, list) else r
                       for p, r in zip(prompts, responses)]
        # keywords, as TRL calls reward functions: a TRL-native one may take only (completions, **kwargs)
        return torch.tensor(roles.reward_fn(prompts=prompts, completions=completions), dtype=torch.float)
    examples = [p + [{"role": "assistant", "content": r}] if isinstance(p, list) else p + r
                for p, r in zip(prompts, responses)]
    scores = []
    for start in range(0, len(examples), batch_size):
        ids = [reward.token_ids(roles.tokenizer, e) for e in examples[start:start + batch_size]]
        batch = roles.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(roles.model.device)
        hidden = _last_hidden(roles, REWARD, batch["input_ids"], batch["attention_mask"])
        # the rightmost non-pad token: the rule transformers' *ForSequenceClassification reads the score at
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        last = (positions * (batch["input_ids"] != roles.tokenizer.pad_token_id)).argmax(-1)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        scores.append(roles.reward_head(picked.to(roles.reward_head.weight.dtype))[:, 0].float().cpu())
    return torch.cat(scores)


def save_trainable(roles: Roles, folder: Path) -> None:
    """The policy and value adapters (``folder/policy``, ``folder/value``: PEFT's layout for named adapters) and
    the value head."""
    from safetensors.torch import save_file

    roles.model.save_pretrained(str(folder), selected_adapters=list(TRAINABLE))
    save_file({k: v.contiguous() for k, v in roles.value_head.state_dict().items()}, str(folder / VALUE_HEAD_FILE))


def load_trainable(roles: Roles, folder: Path) -> None:
    """Put the weights :func:`save_trainable` wrote back into the live adapters and head."""
    import peft
    from safetensors.torch import load_file

    for name in TRAINABLE:
        weights = peft.load_peft_weights(str(folder / name), device=str(roles.model.device))
        loaded = peft.set_peft_model_state_dict(roles.model, weights, adapter_name=name)
        if loaded.unexpected_keys:
            raise RuntimeError(f"{folder / name}: weights the model has no place for: {loaded.unexpected_keys[:3]}")
    roles.value_head.load_state_dict(load_file(str(folder / VALUE_HEAD_FILE), device=str(roles.model.device)))
