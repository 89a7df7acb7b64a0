"""Rewards for the online stages (GRPO, RLOO): a recipe's ``rewards:`` section -> the ``reward_funcs`` callables
``trl.GRPOTrainer`` and ``trl.RLOOTrainer`` take, ``(prompts, completions, **kwargs) -> list[float]``.

A reward's ``source`` is one of:

- **an ``rlhf align rm`` run folder**: the reward model loads the way ``alignment.reward`` saved it (base + adapter
  with its trained score head, or full weights; recorded dtype and quantisation), frozen and in eval mode, and scores
  ``prompt + completion`` with :func:`alignment.reward.score`: tokenised exactly as ``trl.RewardTrainer`` trained it
  and read at the last non-pad token, so the policy is rewarded by the same numbers the rm run's held-out accuracy
  was measured with. TRL can score a ``PreTrainedModel`` itself, but it renders the chat to text and re-tokenises it
  with ``add_special_tokens=False``, and sets pad = eos when the tokenizer has none, so the score head can read a
  different token than it was trained on (field notes trap 3; huggingface/trl 1379, 937). Passing a callable keeps
  one scoring path for training, evaluation and RL.
- **``module:function``**, a reward written in Python. A function with a ``completions`` parameter follows TRL's own
  convention and is passed through unchanged (``trl.rewards:think_format_reward`` works). Any other function is a
  per-example rule ``f(prompt_text, response_text) -> float`` (``alignment.synthetic:rule_reward``); for
  conversations the prompt text is the last user turn (the question the reply answers: a system prompt or earlier
  turns naming other things would make keyword rules misfire) and the response text is the assistant's reply.

Several rewards add up with their ``weight`` (TRL's ``reward_weights``); each is logged as ``rewards/<name>/mean``.
Every reward is fingerprinted for the run record (an rm run by its run.json, a function by its module's source), so
re-running with a retrained reward model or an edited rule is a new run, not a silent skip.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignment.models import ModelConfig, load_sequence_classifier, load_tokenizer
from alignment.runs import RunError, fingerprint_path, load_run
from rlhf.config import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

RewardFunc = Callable[..., list[float]]  # TRL's reward_funcs signature: (prompts, completions, **kwargs)
_FUNCTION_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")  # package.module:function


@dataclass
class RewardSpec:
    """One entry of a recipe's ``rewards:`` list."""

    source: str  # an `rlhf align rm` run folder, or module:function (a Python reward)
    weight: float = 1.0  # its weight in the summed reward (TRL's reward_weights); negative penalises
    name: str | None = None  # metric name (rewards/<name>/mean); default: the run folder's or the function's name
    batch_size: int = 16  # reward model only: sequences scored per forward pass

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ValueError(f"source: expected an rm run folder or module:function, got {self.source!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)):
            raise ValueError(f"weight: expected a number, got {self.weight!r}")
        if self.name is not None and (not isinstance(self.name, str) or not re.fullmatch(r"[\w.-]+", self.name)):
            raise ValueError(f"name: expected letters, digits, '_', '.' or '-', got {self.name!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size: expected an integer >= 1, got {self.batch_size!r}")

    @property
    def is_function(self) -> bool:
        """``module:function`` rather than a folder (a folder that exists wins over the pattern)."""
        return bool(_FUNCTION_SPEC.match(self.source)) and not Path(self.source).exists()

    @property
    def metric_name(self) -> str:
        if self.name:
            return self.name
        return self.source.rpartition(":")[2] if self.is_function else Path(self.source).resolve().name


def as_reward_specs(rewards: Any) -> list[RewardSpec]:
    """A recipe's ``rewards:`` as a list of specs: one source string, one mapping, or a list of either. Errors name
    the entry (``rewards[1].weight: ...``); metric names must differ, or TRL would merge two rewards' logs."""
    items = rewards if isinstance(rewards, list) else [rewards]
    if not items:
        raise ValueError("rewards: expected at least one reward (an rm run folder or module:function)")
    specs = [_spec(item, f"rewards[{i}]") for i, item in enumerate(items)]
    first: dict[str, int] = {}
    for i, spec in enumerate(specs):
        taken = first.setdefault(spec.metric_name, i)
        if taken != i:
            raise ValueError(f"rewards[{i}].name: {spec.metric_name!r} already names rewards[{taken}]; give one of "
                             "them another name")
    return specs


def _spec(item: Any, where: str) -> RewardSpec:
    if isinstance(item, RewardSpec):
        return item
    if isinstance(item, str):
        item = {"source": item}
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an rm run folder, module:function or a mapping, got {item!r}")
    known = [f.name for f in dataclasses.fields(RewardSpec)]
    unknown = sorted(set(item) - set(known))
    if unknown or "source" not in item:
        problem = f"unknown key(s) {', '.join(unknown)}" if unknown else "missing required key source"
        raise ValueError(f"{where}: {problem}; known keys: {', '.join(known)}")
    try:
        return RewardSpec(**item)
    except ValueError as e:  # "field: ..." from __post_init__
        raise ValueError(f"{where}.{e}") from None


# --- checks and records (no model is loaded) ----------------------------------------------------------------------

def _reward_run(spec: RewardSpec, where: str) -> dict[str, Any]:
    """The rm run record behind ``spec``, after checking it is a finished reward model run."""
    path = Path(spec.source)
    if not path.exists():
        raise ConfigError(f"{where}: {spec.source} not found: expected an `rlhf align rm` run folder or "
                          "module:function")
    try:
        record = load_run(path)
    except RunError as e:
        raise ConfigError(f"{where}: {e}") from None
    if record["stage"] != "rm" or record["status"] != "finished":
        raise ConfigError(f"{where}: {spec.source} is a {record['status']} {record['stage']} run; a reward model is a "
                          "finished rm run")
    return record


def _function(spec: RewardSpec, where: str) -> Callable[..., Any]:
    module_name, _, attr = spec.source.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{where}: cannot import module {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{where}: module {module_name!r} has no function {attr!r}")
    return fn


def _source_sha256(fn: Callable[..., Any]) -> str | None:
    """The sha256 of the file that defines ``fn``: an edited rule (or a helper it calls) changes the run's inputs."""
    try:
        file = inspect.getsourcefile(fn)
    except TypeError:  # a builtin or C function: no source to hash
        return None
    return hashlib.sha256(Path(file).read_bytes()).hexdigest() if file else None


def reward_record(spec: RewardSpec, index: int) -> dict[str, Any]:
    """What the run record says about one reward (checked, nothing loaded): kind, where it is, its fingerprint."""
    where = f"rewards[{index}].source"
    record: dict[str, Any] = {"name": spec.metric_name, "weight": spec.weight}
    if spec.is_function:
        return {**record, "kind": "function", "source": spec.source,
                "source_sha256": _source_sha256(_function(spec, where))}
    run = _reward_run(spec, where)
    path = Path(spec.source).resolve()
    return {**record, "kind": "reward_model", "source": str(path), "fingerprint": fingerprint_path(path / "run.json"),
            "base": run["model"]["name_or_path"], "heldout_accuracy": run["metrics"].get("eval_accuracy")}


# --- the callables TRL calls ---------------------------------------------------------------------------------------

class RewardModelReward:
    """A finished rm run as a TRL reward function: ``(prompts, completions, **kwargs) -> list[float]``."""

    def __init__(self, run_dir: str | Path, name: str, batch_size: int = 16) -> None:
        from accelerate import PartialState

        record = load_run(run_dir)
        # the run folder (its adapter or model/ weights and tokenizer), loaded with the recorded dtype/quantisation
        cfg = dataclasses.replace(ModelConfig(**record["config"]["model"]), name_or_path=str(run_dir), revision=None)
        self.tokenizer: PreTrainedTokenizerBase = load_tokenizer(cfg)
        self.model: PreTrainedModel = load_sequence_classifier(cfg, self.tokenizer)
        if not cfg.quantization:  # bitsandbytes places quantised weights itself
            self.model.to(PartialState().device)
        self.model.requires_grad_(False)  # frozen: the policy's optimizer never sees it
        self.model.eval()
        self.batch_size = batch_size
        self.__name__ = name  # TRL names the reward's metrics after it (trl.trainer.utils.get_callable_name)

    def __call__(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        from alignment.reward import score

        # conversations concatenate (prompt messages + the assistant reply), texts likewise, as pair_metrics does
        return score(self.model, self.tokenizer, [p + c for p, c in zip(prompts, completions)], self.batch_size)


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else "\n".join(m["content"] for m in prompt)


def _completion_text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    return "\n".join(m["content"] for m in completion if m.get("role") == "assistant")


def text_reward(fn: Callable[[str, str], float], name: str) -> RewardFunc:
    """A per-example rule ``fn(prompt_text, response_text) -> float`` in TRL's batch signature."""

    def reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        return [float(fn(_prompt_text(p), _completion_text(c))) for p, c in zip(prompts, completions)]

    reward.__name__ = name
    return reward


def load_reward(spec: RewardSpec, index: int = 0) -> RewardFunc:
    """The TRL reward function for one spec (an rm run loads its model here)."""
    where = f"rewards[{index}].source"
    if not spec.is_function:
        _reward_run(spec, where)
        return RewardModelReward(spec.source, spec.metric_name, spec.batch_size)
    fn = _function(spec, where)
    if "completions" in inspect.signature(fn).parameters:  # already TRL's convention
        if spec.name and spec.name != getattr(fn, "__name__", None):
            fn = _renamed(fn, spec.name)
        return fn
    return text_reward(fn, spec.metric_name)


def _renamed(fn: RewardFunc, name: str) -> RewardFunc:
    def reward(*args: Any, **kwargs: Any) -> list[float]:
        return fn(*args, **kwargs)

    reward.__name__ = name
    return reward


def reward_functions(specs: list[RewardSpec]) -> list[RewardFunc]:
    """``reward_funcs`` for a TRL online trainer (their weights are its ``reward_weights``)."""
    return [load_reward(spec, i) for i, spec in enumerate(specs)]
