"""A curation recipe: YAML -> :class:`CurateConfig` -> a list of steps.

```yaml
name: telecom-support
seed: 13
on_error: fail          # or skip: malformed rows go to rejects.jsonl with their reason
steps:
  - type: read_faq      # a registered step; its other keys are the step's options
    paths: raw/faq      # relative paths are read from the recipe's folder
  - type: minhash_dedup
    name: near_dups     # optional label (reports, and --set steps.near_dups.threshold=0.7)
    threshold: 0.8
output:
  dir: out/telecom
  formats: [jsonl, parquet, datasets]
```
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curation.steps import REGISTRY, CurationError, Step
from rlhf.config import ConfigError, build_dataclass, load_yaml, parse_override, set_path

# Modules that register steps; imported only when a recipe is built so `rlhf --help` stays instant.
STEP_MODULES = (
    "curation.readers.files",
    "curation.readers.tabular",
    "curation.readers.domain",
    "curation.readers.public",
    "curation.readers.oasst",
    "curation.clean",
    "curation.language",
    "curation.quality",
    "curation.chunking",
    "curation.pii",
    "curation.dedup",
    "curation.decontam",
    "curation.formatters",
    "curation.filters",
)

FORMATS = ("jsonl", "parquet", "datasets")


@dataclass
class OutputConfig:
    dir: str = "out/curated"  # where datasets, card, rejects and manifest go (relative to the working directory)
    formats: list[str] = field(default_factory=lambda: list(FORMATS))  # any of jsonl, parquet, datasets (save_to_disk)
    push_to_hub: str | None = None  # a Hub dataset repo id to push to after writing (token from HF_TOKEN)
    private: bool = True  # push as a private dataset
    rejects: bool = True  # write rejects.jsonl with every dropped record and its reason

    def __post_init__(self) -> None:
        if isinstance(self.formats, str):
            self.formats = [self.formats]
        bad = [f for f in self.formats if f not in FORMATS]
        if bad:
            raise ValueError(f"formats: unknown {bad}; choose from {list(FORMATS)}")
        if not self.formats:
            raise ValueError("formats: name at least one output format")


@dataclass
class CurateConfig:
    name: str  # dataset name, used in the card
    steps: list[dict[str, Any]]  # the step list: each item has a `type` and that step's options
    description: str = ""  # one paragraph for the card
    seed: int = 0  # seed for steps that hash or sample (splits, MinHash permutations)
    on_error: str = "fail"  # fail: a malformed row stops the run naming file and line; skip: it goes to rejects
    num_proc: int = 1  # worker processes for per-record steps (through datasets.map)
    output: OutputConfig = field(default_factory=OutputConfig)
    recipe_path: Path | None = None  # set by load_recipe; relative input paths resolve against its folder

    def __post_init__(self) -> None:
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"on_error: expected 'fail' or 'skip', got {self.on_error!r}")
        if not isinstance(self.num_proc, int) or self.num_proc < 1:
            raise ValueError(f"num_proc: expected an integer >= 1, got {self.num_proc!r}")
        if not isinstance(self.steps, list) or not self.steps:
            raise ValueError("steps: expected a non-empty list of steps")
        if isinstance(self.output, dict):
            self.output = OutputConfig(**self.output)


def _step_index(steps: list, key: str) -> int | None:
    """``--set steps.<name or type>.x=v``: find the step by its name, else by a type used only once."""
    by_name = [i for i, s in enumerate(steps) if isinstance(s, dict) and s.get("name") == key]
    by_type = [i for i, s in enumerate(steps) if isinstance(s, dict) and s.get("type") == key]
    if by_name:
        return by_name[0]
    if len(by_type) > 1:
        raise ConfigError(f"--set steps.{key}: {len(by_type)} steps have type {key!r}; give them names or use an index")
    return by_type[0] if by_type else None


def load_recipe(path: Path, overrides: list[str] = ()) -> CurateConfig:
    data = load_yaml(path)
    for item in overrides:
        keys, value = parse_override(item)
        set_path(data, keys, value, resolve=_step_index)
    config = build_dataclass(CurateConfig, data, str(path))
    config.recipe_path = Path(path)
    return config


def _import_steps() -> None:
    for module in STEP_MODULES:
        importlib.import_module(module)


def step_catalogue() -> dict[str, type[Step]]:
    _import_steps()
    return dict(sorted(REGISTRY.items()))


def build_steps(config: CurateConfig) -> list[Step]:
    """Instantiate the recipe's steps, with errors that name the step and list what is allowed."""
    _import_steps()
    base_dir = config.recipe_path.parent if config.recipe_path else Path.cwd()
    where = str(config.recipe_path or "recipe")
    steps: list[Step] = []
    for i, spec in enumerate(config.steps):
        if not isinstance(spec, dict) or "type" not in spec:
            raise ConfigError(f"{where}: steps[{i}] must be a mapping with a 'type' key, got {spec!r}")
        options = dict(spec)
        type_name = options.pop("type")
        label = options.pop("name", None)
        cls = REGISTRY.get(type_name)
        if cls is None:
            raise ConfigError(f"{where}: steps[{i}]: unknown step type {type_name!r}; known types: {', '.join(sorted(REGISTRY))}")
        try:
            step = build_dataclass(cls, options, f"{where}: steps[{i}] ({type_name})")
        except CurationError as e:
            raise ConfigError(f"{where}: steps[{i}] ({type_name}): {e}") from None
        step.label = f"{i:02d}_{label or type_name}"
        step.base_dir = base_dir
        step.seed = config.seed
        step.on_error = config.on_error
        steps.append(step)
    return steps


def describe_step(cls: type[Step]) -> str:
    """One line per option, from the dataclass fields (for `rlhf curate --list-steps`)."""
    doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
    lines = [f"{cls.type_name}: {doc}"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            "<required>" if f.default_factory is dataclasses.MISSING else f.default_factory())
        lines.append(f"    {f.name} = {default!r}")
    return "\n".join(lines)
