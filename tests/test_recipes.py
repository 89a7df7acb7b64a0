"""Every shipped recipe loads into its config (curation recipes also build their steps): YAML is the interface."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf.config import load_yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "samples").rglob("*.yaml") if "accelerate" not in p.parts)


# Feedback recipes: <command>[-variant].yaml -> the module whose load_config reads them.
FEEDBACK = {"generate": "feedback.generate", "feedback": "feedback.push", "pull": "feedback.pull",
            "simulate": "feedback.simulate"}


def _stage(path: Path) -> str:
    return path.stem.split("-")[0]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_recipe_loads(path):
    if "steps" in load_yaml(path):
        from curation.recipe import build_steps, load_recipe

        steps = build_steps(load_recipe(path))
        assert steps
        return
    stage = _stage(path)
    if stage == "pipeline":  # every stage recipe it names, with its overrides, loads into that stage's config
        from rlhf.pipeline import ORDER, load_pipeline, prepare_all

        prepared = prepare_all(load_pipeline(path), log=lambda m: None)
        assert list(prepared) == list(ORDER) and prepared["policy"].output
        return
    if stage in FEEDBACK:
        import importlib

        cfg = importlib.import_module(FEEDBACK[stage]).load_config(path)
        assert cfg.dataset if stage in ("feedback", "simulate") else cfg.output_dir
        return
    from alignment.cli import STAGES, load_stage_config

    assert stage in STAGES, f"{path.name}: name stage recipes <stage>[-variant].yaml; stages: {sorted(STAGES)}"
    cfg = load_stage_config(stage, path)
    assert cfg.output_dir


def test_there_are_recipes_for_every_stage():
    stems = {_stage(p) for p in RECIPES}
    assert "curate" in stems
    assert set(FEEDBACK) <= stems, "every feedback command has a sample recipe"
