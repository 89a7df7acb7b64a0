"""The root command ``rlhf``: each package contributes its command (group); nothing heavy is imported here."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from alignment.cli import SetOpt, align_app, model_app
from curation.cli import curate
from feedback.cli import feedback_app

app = typer.Typer(
    name="rlhf",
    help="Turn a general LLM into a domain specialist with human feedback: curate -> rank -> align.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """rlhf-pipeline: curate a domain corpus, rank outputs in Argilla, align with SFT/RM/PPO/DPO."""


app.command("curate")(curate)
app.add_typer(align_app, name="align")
app.add_typer(model_app, name="model")
app.add_typer(feedback_app, name="feedback")


@app.command("run")
def run_pipeline(
    recipe: Annotated[Path, typer.Argument(help="Pipeline recipe (YAML), e.g. samples/telecom/pipeline.yaml")],
    set_: SetOpt = None,
) -> None:
    """The whole loop: curate -> sft -> generate -> push -> annotate -> pull -> rm -> ppo|dpo -> eval -> report.

    Re-running skips unchanged stages and resumes an interrupted one. While people still have to rank, it stops
    after the push, says what it waits for and exits with status 3; run it again later to go on."""
    from rlhf.pipeline import WAITING_EXIT_CODE, load_pipeline, run, summary_lines

    record = run(load_pipeline(recipe, set_ or []), recipe)
    for line in summary_lines(record):
        typer.echo(line)
    if record["status"] == "waiting":
        raise typer.Exit(WAITING_EXIT_CODE)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user mistakes print one clear line and return 2, never a traceback."""
    from curation.steps import CurationError
    from feedback.client import FeedbackError
    from rlhf.config import ConfigError

    # OSError covers what from_pretrained raises for a model folder that isn't there or a Hub id it cannot reach
    user_errors = (CurationError, ConfigError, FeedbackError, OSError, ValueError)
    saved_argv = sys.argv
    if argv is not None:  # in-process calls (tests, `rlhf run`): manifests record the command as given
        sys.argv = ["rlhf", *argv]
    try:
        app(args=argv, prog_name="rlhf")  # click handles usage errors and --help itself (exit codes 2 and 0)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except user_errors as e:  # bad recipes, missing inputs, invalid values: one line, exit 2
        if os.environ.get("RLHF_DEBUG"):  # developers get the traceback
            raise
        typer.echo(f"error: {e}", err=True)
        return 2
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    finally:
        sys.argv = saved_argv
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
