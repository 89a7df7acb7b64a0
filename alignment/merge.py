"""Merge a run's adapter into its base model: ``rlhf align merge RUN --out DIR``.

The merged folder is a plain transformers model (safetensors, config, generation config, tokenizer) that loads with
``from_pretrained`` and serves without PEFT. ``merge.json`` beside it records where it came from (the run's path and
the sha256 of its ``run.json``), so lineage continues from raw documents to served weights.

Field notes trap 6 (huggingface/peft 2321, 2105; unslothai/unsloth 1519): merging a QLoRA adapter into the 4-bit
weights it was trained on bakes NF4 rounding into every merged layer (``W4 + BA`` re-quantised, or dequantised with
the rounding kept), and the merged model drifts from what was evaluated. We always load the base in the dtype the
run's recipe named (``auto``: the checkpoint's own dtype), never quantised, and merge there: the merged model then
equals the adapter applied to the full-precision base exactly (tests: max |logit difference| ~1e-6 in fp32).

Reward runs (stage ``rm``) and any adapter PEFT saved as ``SEQ_CLS`` load as sequence classifiers, so the trained
``score`` head (saved as a ``modules_to_save`` copy, trap 3) replaces the base's fresh one in the merged weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignment.models import DTYPES, ModelConfig, load_causal_lm, load_sequence_classifier, load_tokenizer
from alignment.runs import RUN_JSON, VERSION_PACKAGES, RunError, fingerprint_path, load_run, write_json_atomic
from rlhf.config import redact_argv
from rlhf.provenance import git_commit, versions

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MERGE_JSON = "merge.json"
FORMAT = 1  # merge.json schema version


@dataclass
class Config:
    run_dir: str  # a finished alignment run folder holding run.json and adapter/
    output_dir: str  # folder for the merged model: new, empty, or (with overwrite) an earlier merge output
    dtype: str = "auto"  # auto: the base dtype the run's recipe named (never 4-bit); or bfloat16/float16/float32
    overwrite: bool = False  # replace an earlier merge in output_dir (a folder without merge.json is never replaced)

    def __post_init__(self) -> None:
        for name in ("run_dir", "output_dir"):
            value = getattr(self, name)
            if isinstance(value, Path):
                setattr(self, name, str(value))
            elif not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name}: expected a folder, got {value!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.overwrite, bool):
            raise ValueError(f"overwrite: expected true or false, got {self.overwrite!r}")


def adapter_dir(run_dir: Path, record: dict[str, Any]) -> Path:
    """The run's ``adapter/`` folder, or an error saying why there is nothing to merge."""
    if record["status"] != "finished":
        raise RunError(f"{run_dir} is a {record['status']} {record['stage']} run; only a finished run has a final "
                       "adapter to merge (continue it with --resume first)")
    adapter = run_dir / "adapter"
    if (adapter / "adapter_config.json").is_file():
        return adapter
    if (run_dir / "model").is_dir():
        raise RunError(f"{run_dir} is a full or partial fine-tune (method {_method(record)}): its model/ folder "
                       "already holds complete weights, so there is no adapter to merge; load that folder directly")
    raise RunError(f"{run_dir}: no adapter/adapter_config.json, so there is no adapter to merge")


def _method(record: dict[str, Any], adapter: Path | None = None) -> str:
    """The adapter method from the recipe, else (a DPO run continuing its parent's adapter has no `peft` section)
    from the saved adapter's own config."""
    peft = record["config"].get("peft")
    if isinstance(peft, dict) and peft.get("method"):
        return peft["method"]
    config = adapter / "adapter_config.json" if adapter else None
    if config is not None and config.is_file():
        return str(json.loads(config.read_text()).get("peft_type", "unknown")).lower()
    return "unknown"


def is_classifier(record: dict[str, Any], adapter: Path) -> bool:
    """Reward models (stage ``rm``) and any adapter PEFT saved for sequence classification load a classifier head."""
    from peft import PeftConfig

    return record["stage"] == "rm" or PeftConfig.from_pretrained(str(adapter)).task_type == "SEQ_CLS"


def base_config(run_dir: Path, record: dict[str, Any], dtype: str = "auto") -> ModelConfig:
    """How to load the run's base for merging: as the recipe said (revision, attention, dtype), but never quantised.

    ``name_or_path`` is the run folder, so models.py puts the run's adapter (and its tokenizer) on top."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    recorded = {k: v for k, v in record["model"].items() if k in known}
    return ModelConfig(**{**recorded, "name_or_path": str(run_dir), "quantization": None, "double_quant": False,
                          "dtype": recorded.get("dtype", "auto") if dtype == "auto" else dtype})


def load_merged(run_dir: Path, record: dict[str, Any], dtype: str = "auto"
                ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The run's adapter applied to its full-precision base and merged in (``merge_and_unload``), with its tokenizer."""
    cfg = base_config(run_dir, record, dtype)
    tokenizer = load_tokenizer(cfg)
    if is_classifier(record, adapter_dir(run_dir, record)):
        # our reward stage trains one scalar per sequence; a run may record another label count in its config
        model = load_sequence_classifier(cfg, tokenizer, num_labels=int(record["config"].get("num_labels", 1)))
    else:
        model = load_causal_lm(cfg, tokenizer)
    return model.merge_and_unload(), tokenizer


def _check_output(out: Path, run_dir: Path, overwrite: bool) -> None:
    if out == run_dir or run_dir in out.parents or out in run_dir.parents:
        raise RunError(f"{out}: the merged model must go outside the run folder {run_dir} (and not contain it)")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not (out / MERGE_JSON).is_file():
        raise RunError(f"{out} exists, is not empty and holds no {MERGE_JSON}: not a merge output, so nothing in it "
                       "is replaced; choose a new or empty folder")
    if not overwrite:
        raise RunError(f"{out} holds an earlier merge from other inputs; choose another folder or pass --overwrite")


def _same_merge(out: Path, fingerprint: str, dtype: str) -> bool:
    """Whether ``out`` already holds this merge (same run.json, same dtype): merging is deterministic, so skip it."""
    try:
        record = json.loads((out / MERGE_JSON).read_text(encoding="utf-8"))
        return record["merged_from"]["fingerprint"] == fingerprint and record["dtype_requested"] == dtype
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _record(run_dir: Path, record: dict[str, Any], fingerprint: str, model: PreTrainedModel, cfg: Config,
            wall: float) -> dict[str, Any]:
    return {"format": FORMAT, "stage": "merge",
            "merged_from": {"path": str(run_dir), "stage": record["stage"], "fingerprint": fingerprint},
            "base": {"name_or_path": record["model"].get("name_or_path"), "revision": record["model"].get("revision")},
            "method": _method(record, run_dir / "adapter"), "dtype_requested": cfg.dtype,
            "dtype": str(model.dtype).removeprefix("torch."),
            "architecture": type(model).__name__, "versions": versions(VERSION_PACKAGES), "git_commit": git_commit(),
            "command": shlex.join(redact_argv(sys.argv)),
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "wall_time_s": round(wall, 3)}


def run(cfg: Config) -> Path:
    """Merge ``cfg.run_dir``'s adapter into its base and save the result to ``cfg.output_dir``; returns that folder.

    The folder appears complete or not at all: everything is written to a hidden sibling, then renamed."""
    t0 = time.monotonic()
    run_dir, out = Path(cfg.run_dir).resolve(), Path(cfg.output_dir).resolve()
    record = load_run(run_dir)
    adapter_dir(run_dir, record)  # fail before anything is loaded
    fingerprint = fingerprint_path(run_dir / RUN_JSON)
    if _same_merge(out, fingerprint, cfg.dtype):
        return out
    _check_output(out, run_dir, cfg.overwrite)
    model, tokenizer = load_merged(run_dir, record, cfg.dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.merging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(str(tmp))  # safetensors, config.json, generation_config.json (causal LMs)
        tokenizer.save_pretrained(str(tmp))
        write_json_atomic(tmp / MERGE_JSON, _record(run_dir, record, fingerprint, model, cfg, time.monotonic() - t0))
        if out.exists():
            shutil.rmtree(out)  # empty, or an earlier merge output with overwrite (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
