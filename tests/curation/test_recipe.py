"""Recipes -> steps: every error names the file, the step and what is allowed."""

from __future__ import annotations

import pytest

from curation.recipe import build_steps, load_recipe, step_catalogue
from rlhf.config import ConfigError

RECIPE = """
name: t
seed: 7
steps:
  - type: score_range
    name: good_only
    min: 4
  - type: meta_filter
    key: escalated
    drop_values: [true]
output:
  dir: {out}
"""


def _write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text.format(out=tmp_path / "out"))
    return path


def test_recipe_builds_labelled_steps_with_recipe_settings(tmp_path):
    config = load_recipe(_write(tmp_path, RECIPE), ["steps.good_only.min=3", "on_error=skip"])
    steps = build_steps(config)
    assert [s.label for s in steps] == ["00_good_only", "01_meta_filter"]
    assert steps[0].min == 3 and steps[0].seed == 7 and steps[0].on_error == "skip"
    assert steps[0].base_dir == tmp_path
    assert config.output.dir == str(tmp_path / "out")


def test_override_by_type_and_index(tmp_path):
    config = load_recipe(_write(tmp_path, RECIPE), ["steps.meta_filter.key=topic", "steps.0.max=5"])
    steps = build_steps(config)
    assert steps[1].key == "topic" and steps[0].max == 5


@pytest.mark.parametrize("change, message", [
    ("type: score_range", "unknown step type 'nope'; known types: .*score_range"),
    ("min: 4", r"unknown key\(s\) minimum; known keys: kinds, max, min"),
])
def test_step_errors_list_what_exists(tmp_path, change, message):
    replacement = {"type: score_range": "type: nope", "min: 4": "minimum: 4"}[change]
    config = load_recipe(_write(tmp_path, RECIPE.replace(change, replacement)))
    with pytest.raises(ConfigError, match=message):
        build_steps(config)


def test_step_validation_names_the_step(tmp_path):
    config = load_recipe(_write(tmp_path, RECIPE.replace("min: 4", "min: 5\n    max: 1")))
    with pytest.raises(ConfigError, match=r"steps\[0\] \(score_range\): .*min \(5\) is above max \(1\)"):
        build_steps(config)


def test_top_level_mistakes(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) stpes"):
        load_recipe(_write(tmp_path, "name: x\nstpes: []\n"))
    with pytest.raises(ConfigError, match="on_error: expected 'fail' or 'skip'"):
        load_recipe(_write(tmp_path, RECIPE), ["on_error=ignore"])
    with pytest.raises(ConfigError, match=r"output: formats: unknown \['csv'\]"):
        load_recipe(_write(tmp_path, RECIPE), ["output.formats=[csv]"])


def test_every_step_has_documented_defaults():
    catalogue = step_catalogue()
    assert {"score_range", "meta_filter"} <= set(catalogue)
    for name, cls in catalogue.items():
        assert cls.__doc__, f"{name} has no docstring"
        cls_fields = getattr(cls, "__dataclass_fields__", None)
        assert cls_fields is not None, f"{name} is not a dataclass"
