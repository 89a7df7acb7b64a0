"""``rlhf feedback ...``: the Argilla round trip.

``generate`` (K candidates per prompt) -> ``push`` (an Argilla ranking dataset) -> annotators rank in the web UI ->
``pull`` (ranks -> TRL preference pairs + agreement report); ``annotators add|list|remove``; ``server start|stop|status``
(the embedded Argilla). Recipe commands print one ``error:`` line for a bad recipe or an Argilla problem."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

feedback_app = typer.Typer(help="Human rankings through Argilla (embedded server or any Argilla 2.x).",
                           no_args_is_help=True)
server_app = typer.Typer(help="The embedded Argilla server (127.0.0.1, SQLite, Redis; no Elasticsearch).",
                         no_args_is_help=True)
annotators_app = typer.Typer(help="Annotators (Argilla users with role annotator) and their workspaces.",
                              no_args_is_help=True)
feedback_app.add_typer(server_app, name="server")
feedback_app.add_typer(annotators_app, name="annotators")

_CONFIG = typer.Option(..., "--config", "-c", help="Recipe (YAML).", exists=True, dir_okay=False)
_SET = typer.Option(None, "--set", help="Override a recipe key: a.b=value (repeatable).")
_WORKSPACE = typer.Option("argilla", "--workspace", "-w", help="Argilla workspace.")
_API_URL = typer.Option(None, "--api-url", help="Argilla URL [env ARGILLA_API_URL; default: the embedded server]. "
                        "The key comes from $ARGILLA_API_KEY (never a flag: it would land in shell history).")

_HOME = typer.Option(None, "--home", help="Data directory [env RLHF_ARGILLA_HOME, ~/.cache/rlhf-pipeline/argilla-server].")
_VENV = typer.Option(None, "--venv", help="Server virtualenv [env RLHF_ARGILLA_VENV, ~/.cache/rlhf-pipeline/argilla-server-venv].")


def _server(home: Optional[Path], venv: Optional[Path]):
    from feedback.server_ctl import EmbeddedServer

    return EmbeddedServer(home=home, venv=venv)


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(1)


def _log(message: str) -> None:
    typer.echo(message, err=True)


def _recipe_command(module: str, config: Path, set_: Optional[list[str]]):
    """Load the recipe with ``module.load_config`` and run ``module.run``; user mistakes become one line."""
    import importlib

    from feedback.client import FeedbackError
    from rlhf.config import ConfigError

    mod = importlib.import_module(module)
    try:
        return mod.run(mod.load_config(config, list(set_ or [])), log=_log)
    except (FeedbackError, ConfigError) as e:
        _fail(e)


@feedback_app.command("generate")
def generate(config: Path = _CONFIG, set_: Optional[list[str]] = _SET) -> None:
    """Sample K candidate answers per prompt from a model or an alignment run (candidates.jsonl + generate.json)."""
    from feedback.generate import CANDIDATES

    out = _recipe_command("feedback.generate", config, set_)
    typer.echo(f"candidates: {out / CANDIDATES}")


@feedback_app.command("push")
def push(config: Path = _CONFIG, set_: Optional[list[str]] = _SET) -> None:
    """Create or update the Argilla ranking dataset and upsert the candidates (no duplicates on re-push)."""
    summary = _recipe_command("feedback.push", config, set_)
    typer.echo(json.dumps(summary, indent=2))


@feedback_app.command("pull")
def pull(config: Path = _CONFIG, set_: Optional[list[str]] = _SET) -> None:
    """Submitted rankings -> TRL preference dataset + agreement report (incremental: only what is new)."""
    s = _recipe_command("feedback.pull", config, set_)
    typer.echo(f"{s['counts']['rows']} pairs -> {s['output_dir']}; responses {s['responses']}; "
               f"Krippendorff's alpha {s['krippendorff_alpha_ordinal']}, "
               f"pairwise agreement {s['pairwise_agreement']}")


@feedback_app.command("simulate")
def simulate(config: Path = _CONFIG, set_: Optional[list[str]] = _SET) -> None:
    """SIMULATION for demos and CI: scripted sim-* annotators rank what is pending for them via the real API."""
    summary = _recipe_command("feedback.simulate", config, set_)
    typer.echo(json.dumps(summary, indent=2))


def _client(api_url: Optional[str], workspace: str, home: Optional[Path]):
    from feedback.client import ArgillaConfig, FeedbackError, connect

    try:
        return connect(ArgillaConfig(api_url=api_url, workspace=workspace, home=str(home) if home else None))
    except (FeedbackError, ValueError) as e:
        _fail(e)


@annotators_app.command("add")
def annotators_add(
    name: str = typer.Argument(..., help="Username."),
    workspace: str = _WORKSPACE,
    password_stdin: bool = typer.Option(False, "--password-stdin",
                                        help="Read the password from stdin (default: generate one)."),
    api_url: Optional[str] = _API_URL,
    home: Optional[Path] = _HOME,
) -> None:
    """Make NAME an annotator of the workspace (created when missing); idempotent. A generated password is written
    to a 0600 credentials file whose path is printed, never the password itself."""
    import sys

    from feedback.annotators import add_annotator
    from feedback.client import FeedbackError

    password = sys.stdin.readline().rstrip("\n") if password_stdin else None
    client = _client(api_url, workspace, home)
    try:
        user, credentials = add_annotator(client, name, workspace, password=password, home=home)
    except FeedbackError as e:
        _fail(e)
    typer.echo(f"{user.username}: annotator in workspace {workspace}"
               + (f"; credentials in {credentials}" if credentials else ""))


@annotators_app.command("list")
def annotators_list(workspace: str = _WORKSPACE, api_url: Optional[str] = _API_URL,
                    home: Optional[Path] = _HOME) -> None:
    """Members of the workspace and their roles."""
    from feedback.annotators import list_annotators
    from feedback.client import FeedbackError

    try:
        for u in list_annotators(_client(api_url, workspace, home), workspace):
            typer.echo(f"{u['username']}\t{u['role']}")
    except FeedbackError as e:
        _fail(e)


@annotators_app.command("remove")
def annotators_remove(name: str = typer.Argument(..., help="Username."), workspace: str = _WORKSPACE,
                      api_url: Optional[str] = _API_URL, home: Optional[Path] = _HOME) -> None:
    """Take NAME out of the workspace (the user and their responses stay)."""
    from feedback.annotators import remove_annotator
    from feedback.client import FeedbackError

    try:
        removed = remove_annotator(_client(api_url, workspace, home), name, workspace)
    except FeedbackError as e:
        _fail(e)
    typer.echo(f"{name}: {'removed from' if removed else 'was not in'} workspace {workspace}")


@server_app.command("start")
def start(
    port: int = typer.Option(6900, help="HTTP port (bound to 127.0.0.1)."),
    redis_port: int = typer.Option(16379, help="Redis port (bound to 127.0.0.1)."),
    timeout: float = typer.Option(60.0, help="Seconds to wait for the API."),
    home: Optional[Path] = _HOME,
    venv: Optional[Path] = _VENV,
) -> None:
    """Start Redis, the Argilla server and its worker; installs the server venv on first use."""
    from feedback.server_ctl import ServerError

    srv = _server(home, venv)
    try:
        srv.start(port=port, redis_port=redis_port, timeout=timeout, log=lambda m: typer.echo(m, err=True))
    except ServerError as e:
        _fail(e)
    typer.echo(f"owner credentials: {srv.credentials_file} (rlhf feedback server status --show-credentials)")


@server_app.command("stop")
def stop(home: Optional[Path] = _HOME, venv: Optional[Path] = _VENV) -> None:
    """Stop the worker, the server and Redis."""
    _server(home, venv).stop(log=typer.echo)


@server_app.command("status")
def status(
    show_credentials: bool = typer.Option(False, "--show-credentials", help="Also print the owner's password and API key."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    home: Optional[Path] = _HOME,
    venv: Optional[Path] = _VENV,
) -> None:
    """URL, processes, users and datasets; exit code 0 when running, 3 when not."""
    srv = _server(home, venv)
    st = srv.status()
    creds = srv.credentials()
    if show_credentials and creds:
        st["credentials"] = creds.__dict__
    if as_json:
        typer.echo(json.dumps(st, indent=2))
    else:
        typer.echo(f"running:   {'yes' if st['running'] else 'no'}")
        if st["url"]:
            typer.echo(f"url:       {st['url']}  (Argilla {st.get('version', '?')})")
        typer.echo(f"home:      {st['home']}")
        typer.echo(f"venv:      {st['venv']} ({'installed' if st['installed'] else 'not installed'})")
        for name, p in st["processes"].items():
            if p["pid"]:
                typer.echo(f"{name + ':':<10} pid {p['pid']} ({'alive' if p['alive'] else 'dead'})")
        if "users" in st:
            typer.echo("users:     " + ", ".join(f"{u['username']} ({u['role']})" for u in st["users"]))
            typer.echo("datasets:  " + (", ".join(f"{d['workspace']}/{d['name']}" for d in st["datasets"]) or "none"))
        if st.get("api_error"):
            typer.echo(f"api error: {st['api_error']}")
        if st["credentials_file"]:
            typer.echo(f"owner credentials: {st['credentials_file']}")
        if show_credentials and creds:
            typer.echo(f"username:  {creds.username}\npassword:  {creds.password}\napi key:   {creds.api_key}")
    raise typer.Exit(0 if st["running"] else 3)
