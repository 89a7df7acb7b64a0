"""``rlhf curate``: recipe -> steps -> pipeline -> datasets, rejects, card and manifest in one output folder."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from curation.card import render_card
from curation.pipeline import Pipeline
from curation.recipe import CurateConfig, build_steps
from curation.steps import CurationError
from curation.writers import DatasetWriter, RejectsWriter, push_to_hub
from rlhf.config import redact_argv, redact_secrets
from rlhf.provenance import git_commit, versions

VERSION_PACKAGES = ("rlhf-pipeline", "datasets", "pyarrow", "spacy", "ftfy", "lingua-language-detector", "trafilatura",
                    "phonenumbers", "numpy")
# Files and folders a previous run of this command left in the output folder (and nothing else is removed).
_OUR_OUTPUTS = ("README.md", "curation.json", "rejects.jsonl", "instruction", "prompt_completion", "preference",
                "ranking", "document")


def _clear_previous(out_dir: Path) -> None:
    """Remove what an earlier run wrote here, so stale files never mix with new ones; leave anything else alone."""
    for name in _OUR_OUTPUTS:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _recipe_yaml(config: CurateConfig) -> str:
    import yaml

    data = {"name": config.name, "description": config.description, "seed": config.seed, "on_error": config.on_error,
            "num_proc": config.num_proc, "steps": config.steps, "output": config.output.__dict__}
    return yaml.safe_dump(redact_secrets(data), sort_keys=False, allow_unicode=True)


def run_curation(config: CurateConfig, argv: list[str] | None = None, progress: bool = True) -> Path:
    """Run the recipe; returns the output folder. Raises :class:`CurationError` for user mistakes."""
    started = time.time()
    steps = build_steps(config)
    out_dir = Path(config.output.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous(out_dir)

    rejects = RejectsWriter(out_dir / "rejects.jsonl" if config.output.rejects else None)
    writer = DatasetWriter(out_dir, config.output.formats)
    pipeline = Pipeline(steps, sink=rejects, num_proc=config.num_proc, workdir=out_dir)
    stream = pipeline.run()
    if not progress:
        import datasets

        datasets.disable_progress_bars()
    else:
        from tqdm import tqdm

        stream = tqdm(stream, desc=f"curate {config.name}", unit=" records", file=sys.stderr, mininterval=0.5)
    try:
        for record in stream:
            writer.write(record)
    finally:
        rejects.close()
    ledger = pipeline.ledger
    ledger.check()
    if ledger.kept == 0:
        raise CurationError(f"every record was dropped ({ledger.dropped} dropped: "
                            f"{dict(ledger.drops_by_reason().most_common(5))}); see {out_dir / 'rejects.jsonl'}")
    outputs = writer.close()

    command = shlex.join(redact_argv(argv if argv is not None else sys.argv))
    recipe_yaml = _recipe_yaml(config)
    versions_ = versions(VERSION_PACKAGES)
    ledger_dict = ledger.as_dict()
    card = render_card(config.name, config.description, command, recipe_yaml, ledger_dict, outputs,
                       config.output.formats, versions_, rejects.count)
    (out_dir / "README.md").write_text(card, encoding="utf-8")
    manifest = {
        "name": config.name, "command": command, "recipe_path": str(config.recipe_path) if config.recipe_path else None,
        "recipe": redact_secrets({"steps": config.steps, "seed": config.seed, "on_error": config.on_error}),
        "ledger": ledger_dict, "outputs": outputs, "rejects": rejects.count, "versions": versions_,
        "git_commit": git_commit(), "wall_time_s": round(time.time() - started, 2),
    }
    (out_dir / "curation.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    if config.output.push_to_hub:
        push_to_hub(out_dir, config.output.push_to_hub, list(outputs), config.output.private)
    return out_dir
