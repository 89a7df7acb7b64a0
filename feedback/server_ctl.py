"""Manage the embedded Argilla server on one machine: Redis, the server, its rq worker, the owner's credentials.

Standard library only (runs in the main venv, or with a bare ``python3`` from the repository root for
``python3 -m feedback.server_ctl install``). The server runs in its own virtualenv (``feedback.server_venv`` builds
it); ``feedback/server/launcher.py`` runs there.

Layout (``RLHF_ARGILLA_HOME``, default ``~/.cache/rlhf-pipeline/argilla-server``)::

    state.json        ports, pids, url (written by start, removed by stop)
    owner.json        owner credentials (0600), generated at first start; when it is lost, the next start gives
                      the owner of the kept database a new password and API key
    home/argilla.db   Argilla's SQLite database (ARGILLA_HOME_PATH)
    redis/            Redis working directory (no persistence)
    logs/             redis.log, server.log, worker.log, setup.log (none of them holds a secret)

Secrets (the owner's password and API key) reach the launcher on stdin, never in argv, which ``ps`` shows to every
local user, nor in the environment, which the server and worker processes would inherit.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# ServerError and default_cache are imported from here too (feedback.cli, feedback.annotators)
from feedback.server_venv import (  # noqa: F401
    LAUNCHER, ServerError, default_cache, default_venv, install, is_installed, read_marker, redis_binary, venv_python,
)

ENGINE_NAME = "rlhf-sql"
DEFAULT_PORT = 6900
DEFAULT_REDIS_PORT = 16379
OWNER_USERNAME = "owner"
OWNER_WORKSPACE = "argilla"


def default_home() -> Path:
    return Path(os.environ.get("RLHF_ARGILLA_HOME", default_cache() / "argilla-server"))


# ------------------------------------------------------------------------------------------------ processes
def _alive(pid: Optional[int]) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _spawn(cmd: list[str], log: Path, env: dict) -> int:
    with open(log, "ab") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                             start_new_session=True, close_fds=True)
    return p.pid


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _terminate(pid: Optional[int], timeout: float = 10.0) -> None:
    """SIGTERM the process group the process leads (the worker pool has children), then SIGKILL if needed."""
    if not _alive(pid):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:  # reap it when it is our child (tests start and stop in one process)
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            if not _alive(pid) and not _group_alive(pid):
                return
            time.sleep(0.1)


# ------------------------------------------------------------------------------------------------ the server
@dataclass
class Credentials:
    api_url: str
    username: str
    password: str
    api_key: str


def _write_private(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.chmod(path, 0o600)


def db_revision(db: Path) -> Optional[str]:
    """The Alembic revision stamped in the SQLite database; None when there is no database (or no stamp yet)."""
    if not db.exists():
        return None
    try:
        with closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as con:
            row = con.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def _http_json(url: str, api_key: Optional[str] = None, timeout: float = 2.0):
    req = urllib.request.Request(url, headers={"X-Argilla-Api-Key": api_key} if api_key else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


class EmbeddedServer:
    def __init__(self, home: Optional[Path] = None, venv: Optional[Path] = None):
        self.home = Path(home or default_home())
        self.venv = Path(venv or default_venv())
        self.state_file = self.home / "state.json"
        self.credentials_file = self.home / "owner.json"
        self.db = self.home / "home" / "argilla.db"
        self.logs = self.home / "logs"

    # state ------------------------------------------------------------------------------------------------
    def state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def credentials(self) -> Optional[Credentials]:
        try:
            return Credentials(**json.loads(self.credentials_file.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def _env(self, redis_port: int) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ARGILLA_", "VIRTUAL_ENV", "PYTHON"))}
        env.update(
            ARGILLA_HOME_PATH=str(self.db.parent),
            ARGILLA_DATABASE_URL=f"sqlite+aiosqlite:///{self.db}",
            ARGILLA_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
            ARGILLA_SEARCH_ENGINE=ENGINE_NAME,
            ARGILLA_ENABLE_TELEMETRY="0",
            ARGILLA_SHOW_HUGGINGFACE_SPACE_PERSISTENT_STORAGE_WARNING="0",
        )
        return env

    def _set_up_database(self, env: dict, url: str, log) -> Credentials:
        """Migrate when the database is not at the installed server's revision; create the owner on a new database,
        or give it a new password and API key when owner.json is gone (the database and its datasets stay)."""
        creds = self.credentials()
        revision = db_revision(self.db)
        stale = revision != read_marker(self.venv).get("alembic_head")
        setup = ["database", "migrate", "++"] if stale else []
        if creds is None:
            if revision is not None:
                log(f"{self.credentials_file} is missing: giving the owner of {self.db} a new password and API key")
            creds = Credentials(url, OWNER_USERNAME, secrets.token_urlsafe(18), "rlhf." + secrets.token_urlsafe(32))
            setup += ["owner", "--rotate"]
        elif stale:
            setup += ["owner"]  # a new database (or one deleted under a kept owner.json) needs that owner
        if setup:  # a warm restart (database at head, owner.json there) skips the ~4 s of this process
            secret = {"username": creds.username, "password": creds.password, "api_key": creds.api_key,
                      "workspace": OWNER_WORKSPACE}
            self._launch(setup, env, "database set-up (migration, owner user)", stdin=json.dumps(secret))
        creds.api_url = url
        _write_private(self.credentials_file, creds.__dict__)
        return creds

    def _launch(self, args: list[str], env: dict, what: str, stdin: str) -> None:
        """Run the launcher to completion; secrets go on stdin, output to setup.log (the launcher prints none)."""
        log = self.logs / "setup.log"
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as out:
            r = subprocess.run([str(venv_python(self.venv)), str(LAUNCHER), *args], env=env, stdout=out,
                               stderr=subprocess.STDOUT, input=stdin.encode(), check=False)
        if r.returncode != 0:
            raise ServerError(f"{what} failed (exit {r.returncode}); see {log}")

    def running(self) -> bool:
        st = self.state()
        return _alive(st.get("server_pid"))

    # start ------------------------------------------------------------------------------------------------
    def start(self, port: int = DEFAULT_PORT, redis_port: int = DEFAULT_REDIS_PORT, timeout: float = 60.0,
              log=print) -> Credentials:
        if self.running():
            st = self.state()
            log(f"already running at {st.get('url')}")
            return self.credentials() or self._set_up_database(self._env(st["redis_port"]), st["url"], log)
        self.stop(quiet=True)  # leftovers of a crashed run
        install(self.venv, log=log)
        for p, what in ((port, "server"), (redis_port, "redis")):
            if not _port_free(p):
                raise ServerError(f"port {p} on 127.0.0.1 ({what}) is in use; choose another with --port/--redis-port")
        t0 = time.monotonic()
        for d in (self.logs, self.home / "redis", self.db.parent):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)
        env = self._env(redis_port)
        url = f"http://127.0.0.1:{port}"
        state = {"url": url, "port": port, "redis_port": redis_port}
        python = str(venv_python(self.venv))
        try:
            state["redis_pid"] = _spawn(
                [redis_binary(self.venv), "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "",
                 "--appendonly", "no", "--dir", str(self.home / "redis"), "--daemonize", "no"],
                self.logs / "redis.log", env)
            self._save_state(state)
            self._wait(lambda: _redis_ping(redis_port), state["redis_pid"], 10, "redis", "redis.log")
            # the worker needs only Redis until the first job: its ~4 s import overlaps the database set-up
            state["worker_pid"] = _spawn([python, str(LAUNCHER), "worker", "--num-workers", "1"],
                                         self.logs / "worker.log", env)
            self._save_state(state)
            creds = self._set_up_database(env, url, log)
            state["server_pid"] = _spawn(
                [python, str(LAUNCHER), "start", "--host", "127.0.0.1", "--port", str(port), "--no-access-log"],
                self.logs / "server.log", env)
            self._save_state(state)
            self._wait(lambda: self._api_ok(url), state["server_pid"], timeout, "argilla server", "server.log")
        except BaseException:
            self.stop(quiet=True)
            raise
        log(f"Argilla server running at {url} (started in {time.monotonic() - t0:.1f} s)")
        self._check_owner_key(creds, log)
        return creds

    def _check_owner_key(self, creds: Credentials, log) -> None:
        """owner.json kept but the owner changed (a restored database, a password reset): say how to recover."""
        try:
            _http_json(f"{creds.api_url}/api/v1/me", creds.api_key)
        except OSError as e:  # urllib's HTTPError is one; anything else is not this check's business
            if getattr(e, "code", None) == 401:
                log(f"warning: the server rejects the API key in {self.credentials_file}; stop the server, delete "
                    "that file and start again to give the owner a new password and key")

    def _save_state(self, state: dict) -> None:
        _write_private(self.state_file, state)

    @staticmethod
    def _api_ok(url: str) -> bool:
        try:
            return bool(_http_json(f"{url}/api/v1/status"))
        except (OSError, ValueError):
            return False

    def _wait(self, ready, pid: int, timeout: float, what: str, logname: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if not _alive(pid):
                raise ServerError(f"{what} exited during start; see {self.logs / logname}")
            time.sleep(0.2)
        raise ServerError(f"{what} not ready after {timeout:.0f} s; see {self.logs / logname}")

    # stop -------------------------------------------------------------------------------------------------
    def stop(self, quiet: bool = False, log=print) -> bool:
        st = self.state()
        pids = [st.get(k) for k in ("worker_pid", "server_pid", "redis_pid")]
        was_running = any(_alive(p) for p in pids)
        for pid in pids:
            _terminate(pid)
        self.state_file.unlink(missing_ok=True)
        if not quiet:
            log("stopped" if was_running else "not running")
        return was_running

    # status -----------------------------------------------------------------------------------------------
    def status(self) -> dict:
        st = self.state()
        creds = self.credentials()
        out = {
            "running": self.running(),
            "url": st.get("url"),
            "home": str(self.home),
            "venv": str(self.venv),
            "installed": is_installed(self.venv),
            "processes": {k[:-4]: {"pid": st.get(k), "alive": _alive(st.get(k))}
                          for k in ("server_pid", "worker_pid", "redis_pid")},
            "credentials_file": str(self.credentials_file) if creds else None,
        }
        if out["running"] and creds:
            url = st["url"]
            try:
                out["version"] = _http_json(f"{url}/api/v1/status").get("version")
                out["users"] = [{"username": u["username"], "role": u["role"]}
                                for u in _http_json(f"{url}/api/v1/users", creds.api_key)["items"]]
                out["datasets"] = [{"name": d["name"], "status": d.get("status"),
                                    "workspace_id": d.get("workspace_id")}
                                   for d in _http_json(f"{url}/api/v1/me/datasets", creds.api_key)["items"]]
                ws = {w["id"]: w["name"] for w in _http_json(f"{url}/api/v1/me/workspaces", creds.api_key)["items"]}
                for d in out["datasets"]:
                    d["workspace"] = ws.get(d.pop("workspace_id"))
            except (OSError, ValueError, KeyError) as e:
                out["api_error"] = str(e)
        return out


def main(argv: Optional[list[str]] = None) -> int:
    """``python3 -m feedback.server_ctl install`` (used by .ci/install-argilla-server)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["install"]:
        print("usage: python3 -m feedback.server_ctl install", file=sys.stderr)
        return 2
    try:
        install(quiet=True)
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"argilla-server venv ready: {default_venv()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
