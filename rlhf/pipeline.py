"""``rlhf run PIPELINE.yaml``: the whole loop in one command, curate -> sft -> generate -> push -> annotate -> pull ->
rm -> policy (ppo/dpo/grpo/rloo) -> eval -> report.

Each stage is the same code its own command runs, driven by the same recipe (``recipe:`` + ``set:`` overrides), so
a pipeline never trains differently from the stage-by-stage walkthrough. This module only orders the stages, decides
what to skip and keeps the pipeline's ``run.json``:

- a stage is skipped when its key (its resolved config, its own input files and the fingerprints of every earlier
  stage's output) is the one recorded last time and its output still has the recorded fingerprint; an interrupted
  training stage resumes from its last checkpoint (``resume=true``), generation continues where it stopped;
- push, annotate and pull talk to Argilla, whose state can change between runs, so they always run (each is
  idempotent: an unchanged push or pull changes nothing, and pull's output fingerprint decides what trains again);
- with people annotating, the run stops after push and says what it waits for; the next ``rlhf run`` goes on
  from there. Simulated annotators (``feedback.simulate``) stand in for demos and CI, labelled as such everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from alignment.runs import VERSION_PACKAGES, fingerprint_path, sha256_json, utc_now, write_json_atomic
from rlhf.config import ConfigError, load_config, redact_argv, redact_secrets
from rlhf.provenance import git_commit, versions
from rlhf.stages import (Prepared, align_stage, annotate_stage, curate_stage, ensure_server, feedback_stage,
                         waiting_message)

ORDER = ("curate", "sft", "generate", "push", "annotate", "pull", "rm", "policy", "eval")
POLICY_STAGES = ("ppo", "dpo", "grpo", "rloo")
EXTERNAL = frozenset({"push", "annotate", "pull"})  # Argilla holds their state: they always run
RUN_JSON = "run.json"
WAITING_EXIT_CODE = 3  # `rlhf run` exit status while people still have to rank: scripts can tell it from done (0)


@dataclass
class StageSpec:
    recipe: str  # the stage's recipe, exactly as its own command reads it (rlhf curate / align / feedback)
    set: dict[str, Any] = field(default_factory=dict)  # overrides like --set: {data.path: out/feedback/pulled}
    stage: Optional[str] = None  # policy only: ppo | dpo | grpo | rloo

    def __post_init__(self) -> None:
        if not isinstance(self.set, dict):
            raise ValueError(f"set: expected a mapping of key: value, got {self.set!r}")
        if self.stage is not None and self.stage not in POLICY_STAGES:
            raise ValueError(f"stage: expected one of {', '.join(POLICY_STAGES)}, got {self.stage!r}")

    def overrides(self) -> list[str]:
        """``--set`` items; nested mappings become dotted keys, so ``{data: {path: x}}`` (what ``rlhf run --set
        stages.rm.set.data.path=x`` builds) changes one key instead of replacing the whole ``data`` section."""
        # JSON is YAML: parse_override reads strings, numbers, lists and null back exactly
        return [f"{k}={json.dumps(v)}" for k, v in _flatten(self.set)]


def _flatten(mapping: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


@dataclass
class Stages:
    curate: StageSpec
    sft: StageSpec
    generate: StageSpec  # candidates from the SFT policy
    push: StageSpec  # the feedback.yaml recipe: dataset, k, overlap, guidelines
    pull: StageSpec
    rm: StageSpec
    policy: StageSpec  # with stage: ppo | dpo | grpo | rloo
    eval: StageSpec  # its sft / policy / reward_model default to this pipeline's runs

    def __post_init__(self) -> None:
        if self.policy.stage is None:
            raise ValueError(f"policy.stage: name the policy stage ({', '.join(POLICY_STAGES)})")


@dataclass
class AnnotationConfig:
    mode: str = "simulated"  # simulated: scripted sim-* annotators rank through the real API (demos, CI); human
    simulate: Optional[StageSpec] = None  # simulated mode: the `rlhf feedback simulate` recipe (+ set:)
    target: Optional[int] = None  # human mode: records that must be fully ranked (min_submitted) first; null: all

    def __post_init__(self) -> None:
        if self.mode not in ("simulated", "human"):
            raise ValueError(f"mode: expected 'simulated' or 'human', got {self.mode!r}")
        if isinstance(self.simulate, str):  # a bare recipe path
            self.simulate = StageSpec(recipe=self.simulate)
        if self.mode == "simulated" and not self.simulate:
            raise ValueError("simulate: simulated mode needs the simulate recipe ({recipe: simulate.yaml})")
        if self.target is not None and (isinstance(self.target, bool) or not isinstance(self.target, int)
                                        or self.target < 1):
            raise ValueError(f"target: expected a record count >= 1 or null, got {self.target!r}")


@dataclass
class ServerConfig:
    start: bool = True  # start the embedded Argilla server when no api_url is set and it is not running
    port: int = 6900  # its HTTP port (127.0.0.1)
    redis_port: int = 16379
    stop: bool = True  # stop it at the end if this run started it (never while people are ranking)


@dataclass
class PipelineConfig:
    name: str  # shown in the report
    stages: Stages
    run_dir: str = "out/pipeline"  # the pipeline's run.json and report.html; stages write where their recipes say
    tiny_model: Optional[str] = None  # build the offline tiny model here first when it is missing (the sample base)
    annotation: AnnotationConfig = field(default_factory=AnnotationConfig)
    server: ServerConfig = field(default_factory=ServerConfig)


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> PipelineConfig:
    """The recipe with ``--set`` overrides. Stage recipes and the simulate recipe are relative to the pipeline
    recipe's folder (they ship beside it); outputs in them stay relative to the working directory."""
    cfg = load_config(PipelineConfig, path, overrides)
    folder = Path(path).parent
    for name in ("curate", "sft", "generate", "push", "pull", "rm", "policy", "eval"):
        spec = getattr(cfg.stages, name)
        spec.recipe = str(_beside(folder, spec.recipe, f"{path}: stages.{name}.recipe"))
    if cfg.annotation.simulate:
        spec = cfg.annotation.simulate
        spec.recipe = str(_beside(folder, spec.recipe, f"{path}: annotation.simulate.recipe"))
    return cfg


def _beside(folder: Path, recipe: str, where: str) -> Path:
    path = Path(recipe) if Path(recipe).is_absolute() else folder / recipe
    if not path.is_file():
        raise ConfigError(f"{where}: recipe not found: {path}")
    return path


# --- the loop -----------------------------------------------------------------------------------------------------

def _prepare(name: str, cfg: PipelineConfig, prepared: dict[str, Prepared], log) -> Prepared:
    spec = getattr(cfg.stages, name, None)
    if name == "curate":
        return curate_stage(spec, log)
    if name in ("sft", "rm"):
        return align_stage(name, spec, log)
    if name == "policy":
        return align_stage(spec.stage, spec, log)
    if name == "eval":  # evaluates this pipeline's runs unless the stage's `set:` says otherwise
        mine = {"sft": str(prepared["sft"].output), "policy": str(prepared["policy"].output),
                "reward_model": str(prepared["rm"].output)}
        return align_stage("eval", spec, log, [f"{k}={json.dumps(v)}" for k, v in mine.items()])
    if name == "annotate":
        return annotate_stage(cfg.annotation, prepared["push"].config, log)
    module = {"generate": "feedback.generate", "push": "feedback.push", "pull": "feedback.pull"}[name]
    return feedback_stage(module, spec, log)


def stage_key(name: str, prepared: Prepared, upstream: list[list[str]]) -> str:
    """What decides a skip: the resolved config (secrets redacted), the stage's own input files and every earlier
    output's fingerprint, so an edit anywhere upstream re-runs everything after it."""
    config = dataclasses.asdict(prepared.config) if dataclasses.is_dataclass(prepared.config) else prepared.config
    return sha256_json({"stage": name, "config": redact_secrets(config), "upstream": upstream,
                        "inputs": [[str(p), fingerprint_path(p)] for p in prepared.inputs]})


def _unchanged(before: Optional[dict], key: str, output: Optional[Path]) -> bool:
    if not before or before.get("key") != key or before.get("status") not in ("ran", "skipped", "pending") \
            or output is None:
        return False
    return output.exists() and fingerprint_path(output) == before.get("output_fingerprint")


def run_stage(name: str, prepared: Prepared, before: Optional[dict], upstream: list[list[str]]) -> dict[str, Any]:
    """Run (or skip) one stage; its entry for run.json."""
    key = stage_key(name, prepared, upstream)
    entry = {"name": name, "key": key, "output": str(prepared.output) if prepared.output else None}
    if name not in EXTERNAL and _unchanged(before, key, prepared.output):
        return {**before, **entry, "status": "skipped", "wall_time_s": 0.0}
    t0 = time.monotonic()
    result = prepared.execute()
    return {**entry, "status": "ran", "wall_time_s": round(time.monotonic() - t0, 3),
            "output_fingerprint": fingerprint_path(prepared.output) if prepared.output else None,
            "summary": result if isinstance(result, dict) else None}


def _ensure_tiny(path: Path, log) -> None:
    if (path / "config.json").is_file():
        return
    from alignment.cli import sample_corpus
    from alignment.models import build_tiny_model

    log(f"building the offline tiny model in {path}")
    build_tiny_model(path, sample_corpus())


def _previous(run_dir: Path) -> dict[str, dict]:
    try:
        return {s["name"]: s for s in json.loads((run_dir / RUN_JSON).read_text(encoding="utf-8"))["stages"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _new_record(cfg: PipelineConfig, recipe: str) -> dict[str, Any]:
    return {"format": 1, "kind": "pipeline", "name": cfg.name, "recipe": str(recipe), "status": "running",
            "started_at": utc_now(), "finished_at": None, "wall_time_s": 0.0,
            "command": shlex.join(redact_argv(sys.argv)),
            "versions": versions((*VERSION_PACKAGES, "argilla", "spacy")),
            "git_commit": git_commit(), "config": redact_secrets(dataclasses.asdict(cfg)),
            "annotation": {"mode": cfg.annotation.mode}, "stages": [], "error": None, "results": {}}


def _save(run_dir: Path, record: dict[str, Any], t0: float) -> None:
    record["wall_time_s"] = round(time.monotonic() - t0, 3)
    write_json_atomic(run_dir / RUN_JSON, record)


def _write_report(run_dir: Path, record: dict[str, Any], outputs: dict[str, Any]) -> Path:
    from rlhf import report

    record["results"] = report.collect({k: outputs.get(k) for k in ("curate", "pull", "sft", "rm", "policy", "eval")},
                                       annotation=record["annotation"])
    return report.write(run_dir, record)


def prepare_all(cfg: PipelineConfig, log) -> dict[str, Prepared]:
    """Every stage's config, loaded before anything runs: a bad key in the last recipe fails in a second, not after
    the first stages trained for minutes."""
    prepared: dict[str, Prepared] = {}
    for name in ORDER:
        prepared[name] = _prepare(name, cfg, prepared, log)
    return prepared


def run(cfg: PipelineConfig, recipe: str | Path, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)
        ) -> dict[str, Any]:
    """Run the loop; returns the pipeline record (also in ``<run_dir>/run.json``, with ``report.html`` beside it)."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    before, record, t0 = _previous(run_dir), _new_record(cfg, str(recipe)), time.monotonic()
    if cfg.annotation.mode == "simulated":
        log("SIMULATION: rankings come from scripted sim-* annotators, not people (annotation.mode: simulated)")
    upstream: list[list[str]] = []
    outputs: dict[str, Any] = {}
    server, name = None, None
    try:
        prepared = prepare_all(cfg, log)
        if cfg.tiny_model:
            _ensure_tiny(Path(cfg.tiny_model), log)
            upstream.append(["tiny_model", fingerprint_path(cfg.tiny_model)])
        for i, name in enumerate(ORDER, start=1):
            if name == "push":
                server = ensure_server(cfg.server, prepared[name].config.argilla, log)
            log(f"[{i}/{len(ORDER)}] {name} ...")
            entry = run_stage(name, prepared[name], before.get(name), upstream)
            log(f"[{i}/{len(ORDER)}] {name}: {entry['status']} ({entry['wall_time_s']:.1f} s)"
                + (f" -> {entry['output']}" if entry["output"] else ""))
            outputs[name] = entry["output"]
            if entry.get("output_fingerprint"):
                upstream.append([name, entry["output_fingerprint"]])
            record["stages"].append(entry)
            if name == "annotate":
                record["annotation"] = status = entry["summary"]["annotation"]
                if cfg.annotation.mode == "human" and status["completed"] < status["target"]:
                    entry["status"] = record["status"] = "waiting"
                    log(waiting_message(status))
                    break
            _save(run_dir, record, t0)
        if record["status"] == "running":
            record["status"] = "finished"
    except BaseException as e:
        # Ctrl-C is not a failure of the stage: "interrupted" tells the next run (and the reader) it can resume
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        record.update(status=status, error={"type": type(e).__name__, "message": str(e)})
        if name is not None:
            record["stages"].append({"name": name, "status": status})
        raise
    finally:
        _not_reached(record, before)
        _finish(cfg, run_dir, record, outputs, t0, server, log)
    return record


def _not_reached(record: dict[str, Any], before: dict[str, dict]) -> None:
    """Stages after a wait or a failure are pending; they keep their last key and fingerprint, so the next run
    still skips those that stay unchanged."""
    done = {s["name"] for s in record["stages"]}
    record["stages"] += [{**before.get(n, {}), "name": n, "status": "pending"} for n in ORDER if n not in done]


def _finish(cfg: PipelineConfig, run_dir: Path, record: dict, outputs: dict, t0: float, server, log) -> None:
    """Report, run.json, server: also after a failure, when the report must not hide the error that ended the run."""
    record["finished_at"] = utc_now()
    try:
        record["report"] = str(_write_report(run_dir, record, outputs))
    except Exception as e:
        if record["status"] not in ("failed", "interrupted"):
            raise
        log(f"report not written ({type(e).__name__}: {e})")
    finally:
        _save(run_dir, record, t0)
        if server is not None and cfg.server.stop and record["status"] != "waiting":
            server.stop(quiet=True, log=log)


def summary_lines(record: dict[str, Any]) -> list[str]:
    """What `rlhf run` prints at the end: status, each stage, the headline numbers and where the report is."""
    lines = [f"{record['name']}: {record['status']} in {record['wall_time_s']:.0f} s"
             + (" (SIMULATED annotators)" if record["annotation"].get("mode") == "simulated" else "")]
    lines += [f"  {s['name']:<9} {s['status']:<8} {s.get('output') or ''}" for s in record["stages"]]
    metrics = (record.get("results") or {}).get("eval", {}).get("metrics") or {}
    for key in ("perplexity", "general_perplexity", "mean_reward", "win_rate"):
        if isinstance(metrics.get(key), dict):
            lines.append(f"  {key}: " + ", ".join(f"{k} {v:.3g}" for k, v in metrics[key].items()
                                                    if isinstance(v, (int, float))))
    if metrics.get("reward_accuracy") is not None:
        lines.append(f"  reward_accuracy: {metrics['reward_accuracy']:.3f} on {metrics.get('reward_pairs')} pairs")
    if record.get("report"):
        lines.append(f"report: {record['report']}")
    return lines
