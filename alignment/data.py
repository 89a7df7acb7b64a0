"""Training data for the alignment stages: read from files, never from ``feedback``/``curation`` objects.

A dataset is named by a path: an ``rlhf curate`` output folder (then ``kind`` picks instruction / preference / ...),
one of its kind folders, a ``save_to_disk`` folder, or a JSONL / JSON / Parquet file. Rows must already be in the
TRL format the stage trains on; the loader only selects the stage's columns (our ``id``/``lineage``/``meta``
provenance columns stay in the files, not in the batches), so training code never reshapes data silently.

Several datasets mix with weights (a multi-task recipe) through ``datasets.interleave_datasets``: the weights are
sampling probabilities, and sampling stops when the first dataset runs out, so no row is repeated within an epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets

# The TRL columns each stage trains on, in the order TRL documents them.
STAGE_COLUMNS = {
    "sft": (("messages",), ("prompt", "completion")),
    "rm": (("prompt", "chosen", "rejected"), ("chosen", "rejected")),
    "dpo": (("prompt", "chosen", "rejected"),),
    "prompts": (("prompt",), ("messages",)),
}
DEFAULT_KIND = {"sft": "instruction", "rm": "preference", "dpo": "preference", "prompts": "preference"}
_SUFFIX_BUILDER = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class DataConfig:
    path: str  # curated folder (rlhf curate output), a kind folder, a save_to_disk folder, or a .jsonl/.json/.parquet
    kind: str | None = None  # in a curated folder: instruction, prompt_completion, preference...; None: the stage's
    split: str = "train"  # split to train on
    eval_split: str | None = "test"  # split to evaluate on (None: no evaluation set from this dataset)
    weight: float = 1.0  # mixing weight among several datasets (sampling probability, normalised)
    max_samples: int | None = None  # cap rows per split (quick runs, tests)

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"path: expected a dataset path, got {self.path!r}")
        if not isinstance(self.weight, (int, float)) or self.weight <= 0:
            raise ValueError(f"weight: expected a number > 0, got {self.weight!r}")
        if self.max_samples is not None and (not isinstance(self.max_samples, int) or self.max_samples < 1):
            raise ValueError(f"max_samples: expected an integer >= 1, got {self.max_samples!r}")


def dataset_root(cfg: DataConfig, stage: str) -> Path:
    """The folder or file that holds this dataset's splits (what run records fingerprint)."""
    path = Path(cfg.path)
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}")
    if (path / "curation.json").is_file():  # a whole `rlhf curate` output: pick the kind
        kind = cfg.kind or DEFAULT_KIND[stage]
        if not (path / kind).is_dir():
            have = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
            raise FileNotFoundError(f"{path} has no '{kind}' dataset; it has: {', '.join(have)}")
        return path / kind
    return path


def _load_split(root: Path, split: str) -> datasets.Dataset | None:
    import datasets

    if (root / "hf").is_dir():
        root = root / "hf"
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        loaded = datasets.load_from_disk(str(root))
        if isinstance(loaded, datasets.Dataset):
            return loaded if split == "train" else None
        return loaded[split] if split in loaded else None
    if root.is_file():
        builder = _SUFFIX_BUILDER.get(root.suffix.lower())
        if builder is None:
            raise ValueError(f"{root}: cannot read a '{root.suffix}' dataset (use .jsonl, .json or .parquet)")
        return datasets.load_dataset(builder, data_files=str(root), split="train") if split == "train" else None
    for suffix, builder in _SUFFIX_BUILDER.items():
        file = root / f"{split}{suffix}"
        if file.is_file():
            # an empty split file (a curated split that got no rows) is no split: datasets' JSON builder raises a
            # bare StopIteration on a 0-byte file
            return datasets.load_dataset(builder, data_files=str(file), split="train") if file.stat().st_size else None
    return None


def _select(ds: datasets.Dataset, stage: str, where: str) -> datasets.Dataset:
    for columns in STAGE_COLUMNS[stage]:
        if all(c in ds.column_names for c in columns):
            return ds.select_columns(list(columns))
    wanted = " or ".join("/".join(c) for c in STAGE_COLUMNS[stage])
    raise ValueError(f"{where}: a {stage} dataset needs columns {wanted}; it has {', '.join(ds.column_names)}")


def load_split(cfg: DataConfig, stage: str, split: str) -> datasets.Dataset | None:
    """One split of one dataset with only the stage's TRL columns, or None when the split does not exist."""
    root = dataset_root(cfg, stage)
    ds = _load_split(root, split)
    if ds is None:
        return None
    if cfg.max_samples is not None:
        ds = ds.select(range(min(cfg.max_samples, len(ds))))
    return _select(ds, stage, f"{root} [{split}]")


def load_mixture(cfgs: list[DataConfig], stage: str, seed: int, eval: bool = False) -> datasets.Dataset | None:
    """The training (or evaluation) rows of every dataset, mixed by weight. Evaluation sets are concatenated
    whole: held-out numbers should not depend on sampling."""
    import datasets

    parts = []
    for cfg in cfgs:
        split = cfg.eval_split if eval else cfg.split
        ds = load_split(cfg, stage, split) if split else None
        if ds is None and not eval:
            raise FileNotFoundError(f"{cfg.path}: no '{split}' split for {stage}")
        if ds is not None and len(ds):
            parts.append((cfg, ds))
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0][1]
    if eval:
        return datasets.concatenate_datasets([ds for _, ds in parts])
    total = sum(cfg.weight for cfg, _ in parts)
    return datasets.interleave_datasets([ds for _, ds in parts], probabilities=[cfg.weight / total for cfg, _ in parts],
                                        seed=seed, stopping_strategy="first_exhausted")
