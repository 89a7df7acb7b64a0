"""The stages as ``rlhf run`` drives them: each loads its own recipe into its own config (the code its command
runs) and returns a :class:`Prepared` (config, output folder, own inputs, a callable that runs it), so the pipeline
can key, skip or run it without knowing what it does. Also the Argilla side: the embedded server, annotation status."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from rlhf.pipeline import AnnotationConfig, ServerConfig, StageSpec


# --- one stage ----------------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    config: Any  # the stage's loaded config dataclass
    output: Optional[Path]  # what it writes (fingerprinted); None for push / annotate
    inputs: list[Path]  # files it reads that no earlier stage wrote (raw corpus, base model)
    execute: Callable[[], Any]  # runs it; returns a summary for run.json


def curate_stage(spec: StageSpec, log) -> Prepared:
    from curation.recipe import load_recipe
    from curation.run import run_curation

    cfg = load_recipe(Path(spec.recipe), spec.overrides())
    argv = ["curate", spec.recipe, *[a for o in spec.overrides() for a in ("--set", o)]]
    return Prepared(cfg, Path(cfg.output.dir), raw_inputs(cfg),
                    lambda: str(run_curation(cfg, argv=argv, progress=True)))


def raw_inputs(cfg) -> list[Path]:
    """Reader steps' files (``paths``/``eval_paths``, relative to the recipe's folder): the corpus is an input whose
    edit must re-run curation and everything after it."""
    base = Path(cfg.recipe_path).parent
    found = []
    for step in cfg.steps:
        for key in ("paths", "eval_paths", "path"):
            values = step.get(key) if isinstance(step, dict) else None
            for value in [values] if isinstance(values, str) else values or []:
                path = Path(value) if Path(value).is_absolute() else base / value
                if path.exists():
                    found.append(path)
    return found


def align_stage(stage: str, spec: StageSpec, log, extra: list[str] = ()) -> Prepared:
    import importlib

    from alignment.cli import STAGES, load_stage_config
    from alignment.runs import InputsChanged

    cfg = load_stage_config(stage, Path(spec.recipe), [*extra, *spec.overrides(), "resume=true"])
    module = importlib.import_module(STAGES[stage])

    def execute():
        try:
            return str(module.run(cfg))
        except InputsChanged as e:  # an earlier stage changed: this recipe's folder is replaced, as rlhf run owns it
            log(f"  replacing: {e}")
            cfg.overwrite = True
            return str(module.run(cfg))
    return Prepared(cfg, Path(cfg.output_dir), [], execute)


def feedback_stage(module_name: str, spec: StageSpec, log) -> Prepared:
    import importlib

    module = importlib.import_module(module_name)
    cfg = module.load_config(Path(spec.recipe), spec.overrides())
    if module_name == "feedback.generate":
        cfg.overwrite = True  # continues the same config's candidates; replaces those of another config
    output = Path(cfg.output_dir) if hasattr(cfg, "output_dir") else None
    return Prepared(cfg, output, [], lambda: module.run(cfg, log=log))


# --- Argilla ------------------------------------------------------------------------------------------------------

def ensure_server(server: ServerConfig, argilla, log) -> Optional[Any]:
    """The embedded server this run started (to stop later), or None: an external server is configured, the
    embedded one already runs, or starting is off (push then says how to start one)."""
    from feedback.server_ctl import EmbeddedServer

    if argilla.api_url or os.environ.get("ARGILLA_API_URL") or not server.start:
        return None
    srv = EmbeddedServer(home=argilla.home)
    if srv.running():
        return None
    srv.start(port=server.port, redis_port=server.redis_port, log=log)
    return srv


def annotation_status(push_cfg, cfg: AnnotationConfig) -> dict[str, Any]:
    """Where the ranking stands: records completed (min_submitted submitted rankings) out of the target, the UI's
    address and the workspace's annotators; never a key or password."""
    from feedback.annotators import list_annotators
    from feedback.client import connect
    from feedback.pull import find_dataset

    client = connect(push_cfg.argilla)
    workspace = push_cfg.argilla.workspace
    ds = find_dataset(client, push_cfg.dataset.name, workspace)
    progress = ds.progress(with_users_distribution=True)
    url = push_cfg.argilla.resolve()[0]
    target = min(cfg.target or progress["total"], progress["total"])
    return {"mode": cfg.mode, "url": url, "dataset_url": f"{url}/dataset/{ds.id}/annotation-mode",
            "dataset": push_cfg.dataset.name, "workspace": workspace,
            "users": [u["username"] for u in list_annotators(client, workspace) if u["role"] == "annotator"],
            "submitted": {user: sum(v.get(part, {}).get("submitted", 0) for part in ("completed", "pending"))
                          for user, v in (progress.get("users") or {}).items()},
            "completed": progress["completed"], "total": progress["total"], "target": target}


def annotate_stage(spec: AnnotationConfig, push_cfg, log) -> Prepared:
    from feedback import simulate

    sim_cfg = simulate.load_config(Path(spec.simulate.recipe), spec.simulate.overrides()) if spec.simulate else None

    def execute():
        summary = None
        if spec.mode == "simulated":
            summary = simulate.run(sim_cfg, log=log)
        status = annotation_status(push_cfg, spec)
        return {"annotation": status, **({"simulation": summary} if summary else {})}
    return Prepared(spec, None, [], execute)


def waiting_message(status: dict[str, Any]) -> str:
    users = ", ".join(status["users"]) \
        or f"none yet: rlhf feedback annotators add NAME --workspace {status['workspace']}"
    return (f"waiting for annotators: {status['completed']}/{status['target']} records ranked by enough people in "
            f"{status['workspace']}/{status['dataset']}. Rank at {status['dataset_url']} (annotators: {users}); "
            "run `rlhf run` again to go on")
