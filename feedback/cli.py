"""``rlhf feedback ...``: the Argilla round trip. For now: ``rlhf feedback server start|stop|status``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

feedback_app = typer.Typer(help="Human rankings through Argilla (embedded server or any Argilla 2.x).",
                           no_args_is_help=True)
server_app = typer.Typer(help="The embedded Argilla server (127.0.0.1, SQLite, Redis; no Elasticsearch).",
                         no_args_is_help=True)
feedback_app.add_typer(server_app, name="server")

_HOME = typer.Option(None, "--home", help="Data directory [env RLHF_ARGILLA_HOME, ~/.cache/rlhf-pipeline/argilla-server].")
_VENV = typer.Option(None, "--venv", help="Server virtualenv [env RLHF_ARGILLA_VENV, ~/.cache/rlhf-pipeline/argilla-server-venv].")


def _server(home: Optional[Path], venv: Optional[Path]):
    from feedback.server_ctl import EmbeddedServer

    return EmbeddedServer(home=home, venv=venv)


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(1)


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
