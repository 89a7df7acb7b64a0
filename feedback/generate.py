"""``rlhf feedback generate``: K candidate responses per prompt, sampled from a model or an alignment run, for
annotators to rank in Argilla (issue 4).

Prompts come from an ``rlhf curate`` output (its instruction conversations up to the last user turn and its
preference prompts, one per distinct prompt) or from JSONL/Parquet files with ``prompt`` or ``messages``. Each prompt
goes through the model's chat template and ``model.generate`` samples K replies; every reply records whether it ended
with an end-of-turn token or ran into ``max_new_tokens`` (field-notes trap 5: endless generation when eos and template
disagree, hiyouga/LlamaFactory 7943, 7454) and its log-probability under the policy.

Output, in ``output_dir``:

- ``candidates.jsonl``: ranking records of the shared vocabulary (``curation.records``): ``prompt`` (chat messages
  ending with a user turn), ``candidates`` [{content, rank, score, finish, logprob, n_tokens}], ``lineage`` back to the
  prompt record, ``meta`` {model, run, sampling};
- ``generate.json``: provenance: the resolved config (secrets redacted), the model (base, adapter, revision, the run's
  ``run.json`` fingerprint), the prompt datasets' fingerprints, package versions, counts, wall time and tokens/s.

The same config gives the same candidates (sampling is seeded per batch), and a run that stopped part-way continues
where it stopped: prompts already in ``candidates.jsonl`` are skipped when its ``generate.json`` has the same
fingerprint (config, model, prompt data), so raising ``max_prompts`` later adds prompts without redoing any (and
matches an uninterrupted run exactly when the earlier ``max_prompts`` was a multiple of ``batch_size``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignment.models import ModelConfig, resolve_model_path, stop_token_ids
from alignment.runs import (
    RUN_JSON,
    VERSION_PACKAGES,
    dataset_entry,
    fingerprint_path,
    load_run,
    sha256_json,
    utc_now,
    write_json_atomic,
)
from curation.records import make_lineage, stable_id
from feedback.client import FeedbackError
from feedback.prompts import KINDS, Prompt, load_prompts, prompt_roots
from rlhf.config import redact_argv, redact_secrets
from rlhf.provenance import git_commit, versions

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CANDIDATES = "candidates.jsonl"
MANIFEST = "generate.json"
# Config keys that change where or how much is written, never what a given prompt's candidates are.
OUTPUT_ONLY = frozenset({"output_dir", "overwrite", "max_prompts", "log_every", "base_dir"})


@dataclass
class SamplingConfig:
    """The recipe's ``sampling:`` section (transformers ``GenerationConfig`` settings; sampling is always on)."""

    temperature: float = 1.0  # > 0; 1 samples the policy as it is, lower values sharpen it
    top_p: float = 1.0  # nucleus sampling (Holtzman et al. 2020): keep the smallest set of tokens with this mass
    top_k: int = 0  # keep the k likeliest tokens; 0 turns it off (transformers would otherwise default to 50)
    max_new_tokens: int = 256  # a reply that has not ended by then is cut and marked finish: length
    repetition_penalty: float = 1.0  # > 0; 1 is off (CTRL, Keskar et al. 2019)
    seed: int = 0  # same seed, same config, same prompts -> the same candidates

    def __post_init__(self) -> None:
        for name, high in (("temperature", float("inf")), ("repetition_penalty", float("inf")), ("top_p", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= high:
                raise ValueError(f"{name}: expected a number > 0{'' if high > 1 else ' and <= 1'}, got {value!r}")
        _check_int("top_k", self.top_k, 0)
        _check_int("max_new_tokens", self.max_new_tokens, 1)
        _check_int("seed", self.seed, 0)


@dataclass
class GenerateConfig:
    """What ``rlhf feedback generate`` samples, from what, and where it writes."""

    model: ModelConfig | str  # Hub id, model folder or alignment run folder (a string is short for name_or_path)
    prompts: str | list[str]  # rlhf curate output, one of its kind folders, or .jsonl/.json/.parquet files
    output_dir: str  # folder for candidates.jsonl and generate.json
    kind: str | None = None  # in a curated folder: instruction or preference; None: both, instruction first
    split: str = "train"  # split of a curated/kind folder to take prompts from (a file is read whole)
    max_prompts: int | None = None  # distinct prompts, in file order; None: all (raise it later to add more)
    k: int = 4  # candidates per prompt (annotators rank them, so at least 2)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # temperature, top_p, ..., seed
    batch_size: int = 8  # prompts per generate call (each becomes k sequences)
    log_every: int = 10  # report progress every N prompts
    overwrite: bool = False  # replace candidates in output_dir that were made from a different config
    base_dir: str | None = None  # relative paths are read against this folder; None: the working directory

    def __post_init__(self) -> None:
        if isinstance(self.model, (str, dict)):  # Python callers; recipes arrive with a ModelConfig already
            self.model = ModelConfig(**self.model) if isinstance(self.model, dict) else ModelConfig(self.model)
        if not isinstance(self.model, ModelConfig):
            raise ValueError(f"model: expected a Hub id, a folder or a model section, got {self.model!r}")
        if isinstance(self.sampling, dict):
            self.sampling = SamplingConfig(**self.sampling)
        self.prompts = [self.prompts] if isinstance(self.prompts, str) else self.prompts
        if not isinstance(self.prompts, list) or not self.prompts or not all(
                isinstance(p, str) and p for p in self.prompts):
            raise ValueError(f"prompts: expected a dataset path or a list of them, got {self.prompts!r}")
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ValueError(f"output_dir: expected a folder, got {self.output_dir!r}")
        if self.kind is not None and self.kind not in KINDS:
            raise ValueError(f"kind: expected {' or '.join(KINDS)} (or null for both), got {self.kind!r}")
        if not isinstance(self.split, str) or not self.split:
            raise ValueError(f"split: expected a split name such as train or test, got {self.split!r}")
        if self.max_prompts is not None:
            _check_int("max_prompts", self.max_prompts, 1)
        _check_int("k", self.k, 2)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("log_every", self.log_every, 1)
        if not isinstance(self.overwrite, bool):
            raise ValueError(f"overwrite: expected true or false, got {self.overwrite!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")


def load_config(path: Path | str, overrides: list[str] = ()) -> GenerateConfig:
    """The config from a recipe file with ``--set key=value`` overrides; errors name the file and the key."""
    from rlhf.config import load_config as load

    return load(GenerateConfig, path, overrides)


def _local(cfg: GenerateConfig, path: str) -> Path:
    return Path(cfg.base_dir) / path if cfg.base_dir and not Path(path).is_absolute() else Path(path)


# --- the model ----------------------------------------------------------------------------------------------------

def model_entry(model: ModelConfig) -> dict[str, Any]:
    """What the manifest says about the model, with a fingerprint: a run's ``run.json`` hash (it names the base and
    the adapter was saved with it), a local folder's files, or a Hub id with its pinned revision."""
    base, adapter = resolve_model_path(model.name_or_path)
    folder = Path(model.name_or_path)
    run = None
    if (folder / RUN_JSON).is_file():
        record = load_run(folder)
        if record["status"] != "finished":
            raise FeedbackError(f"model: run {folder} is {record['status']}, not finished; finish it first")
        run = {"path": str(folder.resolve()), "name": folder.resolve().name, "stage": record["stage"],
               "fingerprint": fingerprint_path(folder / RUN_JSON)}
        fingerprint = run["fingerprint"]
    elif Path(base).is_dir():
        fingerprint = fingerprint_path(base)
    else:  # a Hub id: the name and the revision it is pinned to (the resolved commit is recorded after loading)
        fingerprint = hashlib.sha256(f"{base}@{model.revision or 'main'}".encode()).hexdigest()
    return {"name_or_path": model.name_or_path, "base": base, "adapter": adapter, "revision": model.revision,
            "run": run, "fingerprint": fingerprint}


def _candidate(tokenizer: PreTrainedTokenizerBase, ids: list[int], logprobs: Any, stop: set[int]) -> dict:
    """One sampled reply: up to and including its first stop token (generate pads finished rows after it)."""
    end = next((i for i, t in enumerate(ids) if t in stop), None)
    n = len(ids) if end is None else end + 1
    return {"content": tokenizer.decode(ids[:n], skip_special_tokens=True), "rank": None, "score": None,
            "finish": "length" if end is None else "eos", "logprob": float(logprobs[:n].sum()), "n_tokens": n,
            "token_ids": ids[:n]}


def sample(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[dict]], k: int,
           sampling: SamplingConfig, stop_ids: list[int]) -> list[list[dict]]:
    """``k`` replies to each prompt in one ``generate`` call: per prompt a list of ``{content, rank, score, finish,
    logprob, n_tokens, token_ids}``. ``logprob`` sums the log-probabilities of the sampled tokens under the model
    itself (raw logits, log-softmaxed): temperature, top-p/top-k and the repetition penalty shape what is drawn,
    not the policy the annotators' rankings will train."""
    from transformers import GenerationConfig

    tokenizer.padding_side = "left"  # every row's prompt must end where its generation starts
    # sanitize_control_tokens: a "<|im_end|>" typed in a prompt stays text and cannot close the user turn early
    batch = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True, padding=True,
                                          return_dict=True, return_tensors="pt", sanitize_control_tokens=True)
    batch = batch.to(model.device)
    config = GenerationConfig(do_sample=True, num_return_sequences=k, max_new_tokens=sampling.max_new_tokens,
                              temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                              repetition_penalty=sampling.repetition_penalty, eos_token_id=stop_ids,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              return_dict_in_generate=True, output_logits=True)
    out = model.generate(**batch, generation_config=config)
    logprobs = model.compute_transition_scores(out.sequences, out.logits, normalize_logits=True)
    new = out.sequences[:, batch["input_ids"].shape[1]:].tolist()
    stop = set(stop_ids)
    flat = [_candidate(tokenizer, ids, lp, stop) for ids, lp in zip(new, logprobs)]
    return [flat[i * k:(i + 1) * k] for i in range(len(prompts))]  # generate repeats each prompt k times in a row


def _load(model_cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    import torch

    from alignment.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_cfg, require_chat_template=True)
    model = load_causal_lm(model_cfg, tokenizer).eval()
    if getattr(model, "hf_device_map", None) is None and torch.accelerator.is_available():
        model.to(torch.accelerator.current_accelerator())  # quantised models were placed by their device_map
    return model, tokenizer


# --- output -------------------------------------------------------------------------------------------------------

def _fingerprint(cfg: GenerateConfig, model: dict, data: list[dict]) -> str:
    """What decides the candidates: the config minus output-only keys, the model and the prompt data."""
    config = {k: v for k, v in asdict(cfg).items() if k not in OUTPUT_ONLY}
    return sha256_json({"config": config, "model": model["fingerprint"], "prompts": [d["fingerprint"] for d in data]})


def _record_id(prompt: Prompt, model: dict, cfg: GenerateConfig) -> str:
    return stable_id(prompt.id, model["fingerprint"], sha256_json({"k": cfg.k, **asdict(cfg.sampling)}))


def _record(prompt: Prompt, candidates: list[dict], model: dict, cfg: GenerateConfig) -> dict:
    return {"id": _record_id(prompt, model, cfg), "source": "generate",
            "lineage": make_lineage(prompt.path, prompt.row, parent=prompt.id), "prompt": prompt.messages,
            "candidates": [{k: v for k, v in c.items() if k != "token_ids"} for c in candidates],
            "meta": {"model": cfg.model.name_or_path, "run": model["run"]["name"] if model["run"] else None,
                     "sampling": asdict(cfg.sampling)}}


def _open_output(out: Path, fingerprint: str, overwrite: bool) -> dict | None:
    """The manifest of earlier work with the same fingerprint (to continue it), else None for a fresh start."""
    manifest = out / MANIFEST
    if manifest.is_file():
        previous = json.loads(manifest.read_text(encoding="utf-8"))
        if previous.get("fingerprint") == fingerprint:
            return previous
        if not overwrite:
            raise FeedbackError(f"{out} holds candidates made from a different config, model or prompt data "
                                f"(see {manifest}); choose another output_dir or set overwrite: true")
        (out / CANDIDATES).unlink(missing_ok=True)
    elif out.exists() and any(out.iterdir()):
        raise FeedbackError(f"{out} is not empty and holds no {MANIFEST}: choose a new or empty output_dir")
    out.mkdir(parents=True, exist_ok=True)
    return None


def _done_ids(path: Path) -> set[str]:
    """Ids already written. A line cut short by a killed job (no final newline) is dropped, to be generated again."""
    if not path.is_file():
        return set()
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        with path.open("r+b") as f:
            f.truncate(keep)
    return {json.loads(line)["id"] for line in data[:keep].splitlines() if line.strip()}


def _counts(path: Path) -> dict[str, Any]:
    """Totals over the whole candidates file (earlier attempts included)."""
    finish: Counter = Counter()
    prompts = candidates = identical = tokens = 0
    with path.open(encoding="utf-8") as f:
        for line in f:
            cands = json.loads(line)["candidates"]
            prompts += 1
            candidates += len(cands)
            finish.update(c["finish"] for c in cands)
            # replies equal to another reply of the same prompt give annotators nothing to choose between
            identical += len(cands) - len({c["content"] for c in cands})
            tokens += sum(c["n_tokens"] for c in cands)
    return {"prompts": prompts, "candidates": candidates, "finished_eos": finish["eos"],
            "finished_length": finish["length"], "identical_candidates": identical, "generated_tokens": tokens}


def _manifest(cfg: GenerateConfig, model: dict, data: list[dict], fingerprint: str,
              previous: dict | None) -> dict[str, Any]:
    return {"format": 1, "status": "running", "fingerprint": fingerprint, "config": redact_secrets(asdict(cfg)),
            "model": redact_secrets(model), "prompts": data, "stop_tokens": (previous or {}).get("stop_tokens"),
            "versions": versions(VERSION_PACKAGES), "git_commit": git_commit(),
            "command": shlex.join(redact_argv(sys.argv)), "counts": (previous or {}).get("counts", {}),
            "attempts": (previous or {}).get("attempts", 0) + 1, "started_at": utc_now(), "finished_at": None,
            "wall_time_s": (previous or {}).get("wall_time_s", 0.0), "throughput": None}


def _generate(cfg: GenerateConfig, model_cfg: ModelConfig, todo: list[Prompt], model_info: dict, manifest: dict,
              out: Path, log: Callable[[str], None]) -> None:
    """Sample ``todo`` batch by batch, appending each batch's records to the candidates file as it finishes."""
    from transformers import set_seed

    model, tokenizer = _load(model_cfg)
    stop_ids = stop_token_ids(tokenizer, model)
    manifest["stop_tokens"] = {"ids": stop_ids, "tokens": tokenizer.convert_ids_to_tokens(stop_ids)}
    manifest["model"]["commit"] = getattr(model.config, "_commit_hash", None)  # a Hub download's resolved commit
    write_json_atomic(out / MANIFEST, manifest)  # from here on, a stopped job can be continued
    t0, tokens = time.monotonic(), 0
    with (out / CANDIDATES).open("a", encoding="utf-8") as f:
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start:start + cfg.batch_size]
            # Seeded by the batch's first prompt, not once per job: batches are written whole, so a job continued
            # after a kill draws exactly what an uninterrupted one would have (batch_size is in the fingerprint).
            set_seed(int(stable_id(cfg.sampling.seed, batch[0].id), 16) % 2**32)
            groups = sample(model, tokenizer, [p.messages for p in batch], cfg.k, cfg.sampling, stop_ids)
            for prompt, candidates in zip(batch, groups):
                f.write(json.dumps(_record(prompt, candidates, model_info, cfg), ensure_ascii=False) + "\n")
                tokens += sum(c["n_tokens"] for c in candidates)
            f.flush()
            os.fsync(f.fileno())
            done, elapsed = start + len(batch), time.monotonic() - t0
            if done // cfg.log_every > start // cfg.log_every or done == len(todo):
                log(f"generate: {done}/{len(todo)} prompts, {tokens} tokens, {tokens / elapsed:.1f} tokens/s")
    elapsed = time.monotonic() - t0
    manifest["throughput"] = {"generated_tokens": tokens, "generation_s": round(elapsed, 3),  # this attempt
                              "tokens_per_s": round(tokens / elapsed, 2)}


def run(cfg: GenerateConfig, log: Callable[[str], None] | None = None) -> Path:
    """Generate ``k`` candidates for every prompt not yet in ``output_dir``; returns ``output_dir``. A finished
    output with the same fingerprint and nothing left to do is returned untouched."""
    log = log or logging.getLogger(__name__).info
    t0 = time.monotonic()
    out = _local(cfg, cfg.output_dir)
    model_cfg = replace(cfg.model, name_or_path=_model_path(cfg))
    model_info = model_entry(model_cfg)
    roots = prompt_roots([_local(cfg, p) for p in cfg.prompts], cfg.kind)
    data = [dataset_entry(root) for root in roots]
    fingerprint = _fingerprint(cfg, model_info, data)
    previous = _open_output(out, fingerprint, cfg.overwrite)
    done = _done_ids(out / CANDIDATES)
    todo = [p for p in load_prompts(roots, cfg.split, cfg.max_prompts) if _record_id(p, model_info, cfg) not in done]
    if not todo and previous is not None and previous["status"] == "finished":
        return out
    manifest = _manifest(cfg, model_info, data, fingerprint, previous)
    log(f"generate: {len(todo)} prompts to do, {len(done)} already in {out / CANDIDATES}")
    if todo:
        _generate(cfg, model_cfg, todo, model_info, manifest, out, log)
    manifest["counts"] = _counts(out / CANDIDATES)
    manifest.update(status="finished", finished_at=utc_now(),
                    wall_time_s=round(manifest["wall_time_s"] + time.monotonic() - t0, 3))
    write_json_atomic(out / MANIFEST, manifest)
    return out


def _model_path(cfg: GenerateConfig) -> str:
    """The model name with a relative folder read against ``base_dir``; a Hub id is left as it is."""
    local = _local(cfg, cfg.model.name_or_path)
    return str(local) if cfg.base_dir and local.exists() else cfg.model.name_or_path
