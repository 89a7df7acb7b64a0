"""Evaluation of an alignment pipeline's models: ``rlhf align eval --config RECIPE.yaml`` (issue 6).

Three policies are compared on held-out data: the **base** model (before SFT), the **SFT** policy and the final
**policy** (a DPO, PPO, GRPO or RLOO run). run.json ``metrics`` records:

- ``perplexity``: exp of the mean negative log-likelihood of the held-out conversations' assistant tokens, tokenised
  as ``trl.SFTTrainer`` tokenised them for training (the chat template's ``{% generation %}`` mask; the completion
  for prompt-completion rows), with the SFT run's tokenizer for every model, so the numbers are comparable;
- ``general_perplexity``: the same on a plain general-domain text (no template), in windows of ``max_length``
  tokens. Aligning a model can cost general ability (the "alignment tax", Ouyang et al. 2022, sec. 4.3); this is the
  cheap check that it did not;
- ``reward_accuracy`` / ``reward_margin`` / ``reward_pairs``: the reward model on held-out preference pairs (share
  with r(chosen) > r(rejected), mean r(chosen) - r(rejected)), measured with :func:`alignment.reward.pair_metrics`;
- ``mean_reward`` and ``win_rate``: each policy answers the held-out prompts (greedy by default) and the reward model
  scores every answer; a win rate is the share of prompts where one policy's answer scores higher, ties counting ½
  (the pairwise win rate of InstructGPT, Ouyang et al. 2022, and AlpacaFarm, Dubois et al. 2023, here with the
  reward model as the judge, so it says how well the policy exploits *this* reward, not that humans prefer it).

How each number is measured (SFT tokenisation, perplexity, generation, win rate) is alignment/measure.py.

Every answer is in ``samples.jsonl`` beside run.json (the first ``samples`` rows also in run.json, key ``samples``).
Models load one base at a time: roles on the same base weights (an SFT adapter and a policy adapter on it, or a
full-weights SFT and a policy adapter on those weights) share one copy, switched with alignment/roles.py's
:func:`~alignment.roles.active`; the reward model loads after the policies are freed. An identical re-run is
skipped: the run's inputs are the run folders' run.json fingerprints, the datasets and the config.
"""

from __future__ import annotations

import dataclasses
import gc
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from alignment.data import DataConfig, dataset_root, load_split
from alignment.measure import (
    Example,
    generate,
    perplexity,
    prompt_rows,
    sft_example,
    text_windows,
    win_rate,
)
from alignment.models import ModelConfig, resolve_model_path
from alignment.policy import POLICY_STAGES
from alignment.runs import RUN_JSON, Run, RunError, fingerprint_path, load_run, write_text_atomic
from rlhf.config import ConfigError

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

ROLES = ("base", "sft", "policy")
WIN_RATES = {"policy_vs_sft": ("policy", "sft"), "policy_vs_base": ("policy", "base"), "sft_vs_base": ("sft", "base")}
SAMPLES_FILE = "samples.jsonl"


@dataclass
class Config:
    sft: str  # the finished SFT run (its folder); its tokenizer and chat template are used for every model
    data: DataConfig | str  # held-out conversations: an `rlhf curate` folder (its instruction/ kind) or any SFT
    #                         dataset; its eval_split (test) gives perplexity rows and the prompts answered
    policy: str | None = None  # the final policy run (dpo, ppo, grpo, rloo): compared with the SFT policy and base
    reward_model: str | None = None  # a finished rm run: judges the answers; null: no accuracy, rewards, win rates
    base: str | None = None  # the model before SFT (Hub id or folder); default: the SFT run's base in its run.json
    pairs: DataConfig | str | None = None  # preference pairs for the reward model's accuracy (eval_split, else
    #                                        split, whichever has rows); default: `data` (its preference/ kind)
    general_text: str | None = None  # a plain-text file of general prose: perplexity before/after (null: skipped)
    max_prompts: int = 32  # held-out prompts answered by each policy (the first ones of the split)
    max_new_tokens: int = 64  # answer budget in tokens
    temperature: float = 0.0  # 0: greedy (deterministic); > 0: sampling, the same seed for every policy
    samples: int = 8  # side-by-side answers kept in run.json (all of them are in samples.jsonl)
    batch_size: int = 8  # sequences per forward pass / prompts per generate call
    max_length: int | None = None  # tokens per sequence (longer rows truncated, longer prompts skipped, general
    #                                text windowed); null: the SFT run's train.max_length
    seed: int = 42  # seed for sampling (temperature > 0)
    output_dir: str = "out/runs/eval"  # the run directory
    resume: bool = False  # accepted like every stage's; an unfinished evaluation has nothing to continue: it reruns
    overwrite: bool = False  # replace an earlier evaluation whose inputs differ
    # Filled by resolve_inputs (not recipe keys): the base model, each run's run.json fingerprint (a retrained run
    # makes a re-run an error, not a silent skip) and which split of the pairs was read.
    model: ModelConfig | None = field(default=None, init=False)
    runs: dict[str, Any] = field(default_factory=dict, init=False)
    pairs_split: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.data = _data_config(self.data, "data")
        self.pairs = None if self.pairs is None else _data_config(self.pairs, "pairs")
        for name in ("sft", "output_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"{name}: expected a folder, got {getattr(self, name)!r}")
        for name in ("policy", "reward_model", "base", "general_text"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name}: expected a path (or null), got {value!r}")
        for name, low in (("max_prompts", 1), ("max_new_tokens", 1), ("samples", 0), ("batch_size", 1)):
            _integer(getattr(self, name), name, low)
        _integer(self.seed, "seed", 0)
        if self.max_length is not None:
            _integer(self.max_length, "max_length", 2)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature: expected a number >= 0 (0: greedy), got {self.temperature!r}")
        if self.data.eval_split is None:
            raise ValueError("data.eval_split: expected the held-out split to evaluate on (e.g. test), got null")
        for name in ("resume", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected true or false, got {getattr(self, name)!r}")


def _integer(value: Any, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")


def _data_config(value: Any, name: str) -> DataConfig:
    if isinstance(value, DataConfig):
        return value
    if isinstance(value, str):
        return DataConfig(path=value)
    if isinstance(value, dict):
        try:
            return DataConfig(**value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name}.{e}") from None
    raise ValueError(f"{name}: expected a dataset path or a mapping with path, got {value!r}")


# --- inputs (checked before any run folder exists) -----------------------------------------------------------------

class Inputs(NamedTuple):
    models: dict[str, ModelConfig]  # role -> what loads it (a run folder loads as base + adapter)
    heldout: datasets.Dataset  # SFT-format rows of data's eval split
    pairs: datasets.Dataset | None  # preference pairs for the reward model, when there is one and pairs exist
    datasets: list[Path]  # what run.json fingerprints


def _finished_run(path: str, name: str, stages: tuple[str, ...]) -> dict[str, Any]:
    what = f"a finished {' / '.join(stages)} run folder"
    if not Path(path).exists():
        raise ConfigError(f"{name}: {path} not found: expected {what}")
    try:
        record = load_run(path)
    except RunError as e:
        raise ConfigError(f"{name}: {e}") from None
    if record["stage"] not in stages or record["status"] != "finished":
        raise ConfigError(f"{name}: {path} is a {record['status']} {record['stage']} run; expected {what}")
    return record


def _split(cfg: DataConfig, stage: str, split: str, name: str) -> datasets.Dataset | None:
    try:
        return load_split(cfg, stage, split)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{name}: {e}") from None


def _pairs(cfg: Config) -> tuple[DataConfig | None, datasets.Dataset | None]:
    """The preference pairs and the split read: the held-out split, else the training split (recorded, so a number
    measured on training pairs is not mistaken for a held-out one). Without explicit ``pairs`` a ``data`` folder
    with no preference pairs means no accuracy, not an error."""
    explicit = cfg.pairs is not None
    pairs = cfg.pairs or DataConfig(path=cfg.data.path, eval_split=cfg.data.eval_split)
    try:
        dataset_root(pairs, "rm")
    except FileNotFoundError as e:
        if explicit:
            raise ConfigError(f"pairs: {e}") from None
        return None, None
    for split in dict.fromkeys(s for s in (pairs.eval_split, pairs.split) if s):
        ds = _split(pairs, "rm", split, "pairs")
        if ds is not None and len(ds):
            cfg.pairs_split = split
            return pairs, ds
    if explicit:
        raise ConfigError(f"pairs: {pairs.path} has no preference pairs in its '{pairs.eval_split}' or "
                          f"'{pairs.split}' split")
    return None, None


def resolve_inputs(cfg: Config) -> Inputs:
    """Check every input and fill ``cfg.model``, ``cfg.runs``, ``cfg.max_length``, ``cfg.pairs_split``; errors are
    ConfigErrors naming the recipe field."""
    records = {"sft": _finished_run(cfg.sft, "sft", ("sft",))}
    if cfg.policy is not None:
        records["policy"] = _finished_run(cfg.policy, "policy", POLICY_STAGES)
    if cfg.reward_model is not None:
        records["reward_model"] = _finished_run(cfg.reward_model, "reward_model", ("rm",))
    cfg.runs = {name: {"path": str(Path(getattr(cfg, name)).resolve()), "stage": record["stage"],
                       "fingerprint": fingerprint_path(Path(getattr(cfg, name)) / RUN_JSON)}
                for name, record in records.items()}
    sft_base = ModelConfig(**records["sft"]["model"])
    cfg.model = sft_base if cfg.base is None else dataclasses.replace(sft_base, name_or_path=cfg.base, revision=None)
    if cfg.max_length is None:
        cfg.max_length = int((records["sft"]["config"].get("train") or {}).get("max_length") or 1024)
    models = {"base": cfg.model}
    for role in ("sft", "policy"):
        if role in records:
            models[role] = dataclasses.replace(ModelConfig(**records[role]["model"]), name_or_path=getattr(cfg, role))
    heldout = _split(cfg.data, "sft", cfg.data.eval_split, "data")
    if heldout is None or not len(heldout):
        raise ConfigError(f"data: {dataset_root(cfg.data, 'sft')} has no rows in its '{cfg.data.eval_split}' split; "
                          "evaluation needs held-out conversations the models were not trained on")
    roots = [dataset_root(cfg.data, "sft")]
    pairs, pairs_ds = _pairs(cfg) if cfg.reward_model is not None else (None, None)
    if pairs is not None:
        cfg.pairs = pairs
        roots.append(dataset_root(pairs, "rm"))
    if cfg.general_text is not None:
        if not Path(cfg.general_text).is_file():
            raise ConfigError(f"general_text: {cfg.general_text} not found: expected a plain-text file")
        roots.append(Path(cfg.general_text))
    return Inputs(models, heldout, pairs_ds, roots)


# --- the run -------------------------------------------------------------------------------------------------------

def _groups(models: dict[str, ModelConfig]) -> list[tuple[ModelConfig, list[tuple[str, str | None]]]]:
    """Roles that share base weights, loaded once: ``[(base to load, [(role, adapter folder or None)])]``. An adapter
    of another PEFT type than the group's starts a group of its own (PEFT holds one type per model)."""
    groups: list[dict[str, Any]] = []
    for role, cfg in models.items():
        base, adapter = resolve_model_path(cfg.name_or_path)
        full_run = adapter is None and (Path(cfg.name_or_path) / RUN_JSON).is_file()  # model/ is a local folder
        load = dataclasses.replace(cfg, name_or_path=str(Path(base).resolve()) if Path(base).exists() else base,
                                   revision=None if full_run else cfg.revision)
        kind = json.loads((Path(adapter) / "adapter_config.json").read_text())["peft_type"] if adapter else None
        group = next((g for g in groups if g["load"] == load and (kind is None or g["kind"] in (None, kind))), None)
        if group is None:
            group = {"load": load, "kind": None, "roles": []}
            groups.append(group)
        group["kind"] = group["kind"] or kind
        group["roles"].append((role, adapter))
    return [(g["load"], g["roles"]) for g in groups]


def _load(load: ModelConfig, roles: list[tuple[str, str | None]], tokenizer: PreTrainedTokenizerBase) -> Any:
    """The base of one group with each role's adapter loaded under the role's name (frozen)."""
    import torch
    from peft import PeftModel

    from alignment.models import load_causal_lm

    model = load_causal_lm(load, tokenizer)
    if not load.quantization:  # bitsandbytes placed quantised weights itself
        model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    for role, adapter in roles:
        if adapter and isinstance(model, PeftModel):
            model.load_adapter(adapter, adapter_name=role, is_trainable=False)
        elif adapter:
            model = PeftModel.from_pretrained(model, adapter, adapter_name=role, is_trainable=False)
    return model.eval()


def _policy_pass(cfg: Config, inputs: Inputs, tokenizer: PreTrainedTokenizerBase, examples: list[Example],
                 windows: list[Example], prompt_ids: list[list[int]]) -> dict[str, dict[str, Any]]:
    """Per role: held-out and general perplexity, answers and whether they ended; one base in memory at a time."""
    from contextlib import nullcontext

    import torch
    from peft import PeftModel

    from alignment.roles import active

    results: dict[str, dict[str, Any]] = {}
    for load, roles in _groups(inputs.models):
        model = _load(load, roles, tokenizer)
        for role, adapter in roles:
            with active(model, role if adapter else None) if isinstance(model, PeftModel) else nullcontext():
                ppl, _ = perplexity(model, examples, tokenizer.pad_token_id, cfg.batch_size)
                general = perplexity(model, windows, tokenizer.pad_token_id, cfg.batch_size)[0] if windows else None
                answers, ended = generate(model, tokenizer, prompt_ids, cfg.max_new_tokens, cfg.temperature,
                                          cfg.batch_size, cfg.seed)
            results[role] = {"perplexity": ppl, "general": general, "answers": answers, "ended": ended}
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


def _reward_pass(cfg: Config, inputs: Inputs, prompts: list[Any], texts: dict[str, list[str]]) -> dict[str, Any]:
    """The reward model's accuracy on the pairs and its score of every answer (and of the reference answers)."""
    from alignment.reward import pair_metrics
    from alignment.reward_fn import RewardModelReward

    judge = RewardModelReward(cfg.reward_model, "reward", cfg.batch_size)
    out: dict[str, Any] = {"pairs": None, "scores": {}}
    if inputs.pairs is not None:
        out["pairs"] = pair_metrics(judge.model, judge.tokenizer, inputs.pairs, cfg.batch_size)
    for name, answers in texts.items():  # one call per role: the same batches for equal answers, equal scores
        replies = [[{"role": "assistant", "content": a}] if isinstance(p, list) else a
                   for p, a in zip(prompts, answers)]
        out["scores"][name] = judge(prompts=prompts, completions=replies)
    return out


def evaluate(cfg: Config, inputs: Inputs) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(metrics, samples)`` for run.json and samples.jsonl."""
    from alignment.models import load_tokenizer

    conversational = "messages" in inputs.heldout.column_names or isinstance(inputs.heldout[0]["prompt"], list)
    tokenizer = load_tokenizer(inputs.models["sft"], require_chat_template=conversational)
    examples = [e for e in (sft_example(tokenizer, row, cfg.max_length) for row in inputs.heldout)
                if any(label != -100 for label in e[1][1:])]  # TRL drops rows truncation left without a label
    windows = (text_windows(tokenizer, Path(cfg.general_text).read_text(encoding="utf-8"), cfg.max_length)
               if cfg.general_text else [])
    prompts, references, prompt_ids = [], [], []
    for prompt, reference in prompt_rows(inputs.heldout):
        ids = (tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
               if isinstance(prompt, list) else tokenizer(prompt)["input_ids"])
        if len(ids) <= cfg.max_length and len(prompts) < cfg.max_prompts:
            prompts.append(prompt)
            references.append(reference)
            prompt_ids.append(ids)
    if not prompts:
        raise ConfigError(f"data: no held-out prompt fits max_length ({cfg.max_length} tokens)")
    results = _policy_pass(cfg, inputs, tokenizer, examples, windows, prompt_ids)
    roles = [r for r in ROLES if r in results]
    judged = (_reward_pass(cfg, inputs, prompts, {**{r: results[r]["answers"] for r in roles}, "reference": references})
              if cfg.reward_model else {"pairs": None, "scores": {}})
    scores, pairs = judged["scores"], judged["pairs"]

    def by_role(fn: Any) -> dict[str, Any]:
        return {r: fn(r) if r in results else None for r in ROLES}

    metrics = {
        "perplexity": by_role(lambda r: results[r]["perplexity"]),
        "general_perplexity": by_role(lambda r: results[r]["general"]) if windows else None,
        "reward_accuracy": pairs["eval_accuracy"] if pairs else None,
        "reward_margin": pairs["eval_margin"] if pairs else None,
        "reward_pairs": pairs["eval_pairs"] if pairs else 0,
        "reward_pairs_split": cfg.pairs_split if pairs else None,
        "mean_reward": by_role(lambda r: sum(scores[r]) / len(scores[r]) if scores else None),
        "reference_reward": sum(scores["reference"]) / len(scores["reference"]) if scores else None,
        "win_rate": {k: win_rate(scores[a], scores[b]) if scores and a in results and b in results else None
                     for k, (a, b) in WIN_RATES.items()},
        "no_eos_rate": by_role(lambda r: 1 - sum(results[r]["ended"]) / len(prompts)),
        "prompts": len(prompts),
        "tokens": {"heldout": sum(sum(label != -100 for label in e[1][1:]) for e in examples),
                   "general": sum(len(w) - 1 for w, _ in windows) if windows else None},
    }
    samples = [{"prompt": prompt, "reference": reference,
                **{r: results[r]["answers"][i] if r in results else None for r in ROLES},
                "score": {r: scores[r][i] if scores and r in results else None for r in ROLES}}
               for i, (prompt, reference) in enumerate(zip(prompts, references))]
    return metrics, samples


def run(cfg: Config) -> Path:
    """Evaluate, write run.json and samples.jsonl, print a summary table; returns the run directory (an identical
    finished evaluation is returned untouched, its table printed again)."""
    from accelerate import PartialState
    from transformers import set_seed

    inputs = resolve_inputs(cfg)
    if PartialState().num_processes > 1:
        raise ConfigError("eval: runs in one process; launch it without accelerate/torchrun")
    run_ = Run.start(cfg.output_dir, "eval", dataclasses.asdict(cfg), model=dataclasses.asdict(cfg.model),
                     datasets=inputs.datasets, parent=Path(cfg.policy or cfg.sft), overwrite=cfg.overwrite)
    if run_.action != "skip":
        with run_:  # an unfinished earlier attempt ("resume") has nothing to continue from: it is redone
            set_seed(cfg.seed)
            metrics, samples = evaluate(cfg, inputs)
            lines = (json.dumps(sample, ensure_ascii=False) + "\n" for sample in samples)
            write_text_atomic(run_.dir / SAMPLES_FILE, "".join(lines))
            run_.record["samples"] = samples[:cfg.samples]
            run_.finish(metrics)
    print(summary(run_.record["metrics"]))
    return run_.dir


def summary(metrics: dict[str, Any]) -> str:
    """A short table of the metrics, for the terminal."""
    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"

    lines = [f"{'':<20}{'base':>10}{'sft':>10}{'policy':>10}"]
    for label, key in (("perplexity", "perplexity"), ("general perplexity", "general_perplexity"),
                       ("mean reward", "mean_reward"), ("no-eos rate", "no_eos_rate")):
        row = metrics.get(key) or {}
        lines.append(f"{label:<20}" + "".join(f"{cell(row.get(r)):>10}" for r in ROLES))
    wins = metrics.get("win_rate") or {}
    lines.append("win rate (reward model judge): " + ", ".join(f"{k.replace('_', ' ')} {cell(v)}"
                                                               for k, v in wins.items()))
    lines.append(f"reward model: accuracy {cell(metrics.get('reward_accuracy'))}, margin "
                 f"{cell(metrics.get('reward_margin'))} on {metrics.get('reward_pairs')} pairs "
                 f"({metrics.get('reward_pairs_split') or 'none'} split); reference answers score "
                 f"{cell(metrics.get('reference_reward'))}")
    tokens = metrics.get("tokens") or {}
    lines.append(f"{metrics.get('prompts')} held-out prompts; {tokens.get('heldout')} held-out assistant tokens; "
                 f"{tokens.get('general')} general-text tokens")
    return "\n".join(lines)
