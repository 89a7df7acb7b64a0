"""``rlhf curate CONFIG.yaml``: the curation command (heavy imports happen inside, after argument parsing)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer


def curate(
    config: Annotated[Optional[Path], typer.Argument(help="Curation recipe (YAML), e.g. samples/telecom/curate.yaml")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (overrides output.dir)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key: a.b=value, "
                                                     "steps.<name|type|index>.<option>=value")] = None,
    num_proc: Annotated[Optional[int], typer.Option("--num-proc", help="Worker processes for per-record steps")] = None,
    on_error: Annotated[Optional[str], typer.Option("--on-error", help="fail (default) or skip malformed rows")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar")] = False,
    list_steps: Annotated[bool, typer.Option("--list-steps", help="List the step types and their options")] = False,
) -> None:
    """Clean and format a domain corpus into instruction and preference datasets (TRL formats) with a card."""
    from curation.recipe import describe_step, load_recipe, step_catalogue
    from curation.run import run_curation

    if list_steps:
        for cls in step_catalogue().values():
            typer.echo(describe_step(cls))
        return
    if config is None:
        raise typer.BadParameter("give a recipe, e.g. rlhf curate samples/telecom/curate.yaml", param_hint="CONFIG")
    overrides = list(set_ or [])
    if out is not None:
        overrides.append(f"output.dir={out}")
    if num_proc is not None:
        overrides.append(f"num_proc={num_proc}")
    if on_error is not None:
        overrides.append(f"on_error={on_error}")
    recipe = load_recipe(config, overrides)
    out_dir = run_curation(recipe, argv=["rlhf", *sys.argv[1:]], progress=not quiet)
    typer.echo(f"wrote {out_dir} (card: {out_dir / 'README.md'}, rejects: {out_dir / 'rejects.jsonl'})")
