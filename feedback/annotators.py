"""``rlhf feedback annotators add|list|remove``: who may rank in which workspace (issue 4).

An annotator is an Argilla user with role ``annotator``: they see only the datasets of the workspaces they belong to,
and can submit responses but not change datasets. Everything goes through the SDK's users and workspaces.

Passwords: a password we generate is written once, with the user's API key, to a 0600 credentials file (in a
0700 folder) and only that file's path is returned, so it never reaches a log, a terminal transcript or an exception.
The file lives with the embedded server's data (``$RLHF_ARGILLA_HOME/annotators/``) when the client talks to it, else
under ``~/.cache/rlhf-pipeline/annotators/<host_port>/``. Error messages from user creation are not passed on
verbatim: the server's validation errors echo the request body, password included.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Optional
from urllib.parse import urlparse

from feedback.client import FeedbackError, Rest, sdk_errors

if TYPE_CHECKING:
    import argilla as rg

# Argilla 2.x only asks for a non-empty username; ours also names a file, so it is kept to a portable set
# (Argilla 1.x's own rule: letters, digits, '-' and '_', not starting with a separator).
USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
PASSWORD_LENGTH = (8, 100)  # what argilla-server accepts (USER_PASSWORD_MIN_LENGTH / _MAX_LENGTH)


def ensure_workspace(client: "rg.Argilla", name: str) -> "rg.Workspace":
    """The workspace called ``name``, created when missing (needs an owner's key)."""
    import argilla as rg

    with sdk_errors(client):
        return _workspace(client, name) or rg.Workspace(name=name, client=client).create()


def add_annotator(client: "rg.Argilla", username: str, workspace: str, password: Optional[str] = None,
                  home: Optional[Path] = None) -> tuple["rg.User", Optional[Path]]:
    """Make ``username`` an annotator of ``workspace`` (created when missing); idempotent.

    Returns ``(user, credentials file)``. A new user gets ``password``, or a generated one written to a 0600
    credentials file whose path is returned; an existing user keeps their password and role and is only added to
    the workspace (file ``None``). ``home`` is the embedded server's data folder, when it is not the default."""
    if not USERNAME_RE.match(username or ""):
        raise FeedbackError(f"username: {username!r} must be letters, digits, '.', '-' or '_' (up to 100), "
                            "starting with a letter or digit")
    if password is not None and not PASSWORD_LENGTH[0] <= len(password) <= PASSWORD_LENGTH[1]:
        raise FeedbackError(f"password: must be {PASSWORD_LENGTH[0]}-{PASSWORD_LENGTH[1]} characters")
    with sdk_errors(client):
        ws = ensure_workspace(client, workspace)
        user, credentials = _user(client, username), None
        if user is None:
            user, credentials = _create(client, username, password, workspace, home)
        if not _is_member(client, ws, username):
            user.add_to_workspace(ws)
    return user, credentials


def _create(client: "rg.Argilla", username: str, password: Optional[str], workspace: str,
            home: Optional[Path]) -> tuple["rg.User", Optional[Path]]:
    """A new annotator; ``(user, credentials file or None)``."""
    import argilla as rg

    secret = password or secrets.token_urlsafe(18)  # 24 characters, 144 bits
    try:
        user = rg.User(username=username, password=secret, role="annotator", client=client).create()
    except Exception as e:  # not passed on: a 422 echoes the request body, password included
        status = getattr(e, "status_code", None)
        raise FeedbackError(f"creating user {username!r} at {client.api_url} failed"
                            + (f" (HTTP {status})" if status else f" ({type(e).__name__})")) from None
    user.password = None  # the SDK keeps it on the object, and repr(user) would print it
    if password is not None:
        return user, None  # the caller knows it
    api_key = user_api_key(client, user.id)
    return user, _save_credentials(client.api_url, home, username=username, password=secret, api_key=api_key,
                                   workspace=workspace)


def user_api_key(client: "rg.Argilla", user_id) -> str:
    """A user's API key, read as the owner: GET /users/{id} returns it; the SDK's user model drops it."""
    return Rest(client).get(f"/api/v1/users/{user_id}")["api_key"]


def list_annotators(client: "rg.Argilla", workspace: str) -> list[dict]:
    """Members of ``workspace``: ``[{"username", "role"}]`` sorted by username (owners see every workspace
    without being members, so they are listed only when added)."""
    with sdk_errors(client):
        members = client.users.list(workspace=_require_workspace(client, workspace))
    return sorted(({"username": u.username, "role": getattr(u.role, "value", u.role)} for u in members),
                  key=lambda u: u["username"])


def remove_annotator(client: "rg.Argilla", username: str, workspace: str) -> bool:
    """Take ``username`` out of ``workspace`` (the user and their responses stay); False when not a member."""
    with sdk_errors(client):
        ws, user = _require_workspace(client, workspace), _user(client, username)
        if user is None:
            raise FeedbackError(f"no user {username!r} at {client.api_url}")
        if not _is_member(client, ws, username):
            return False
        user.remove_from_workspace(ws)
    return True


def credentials_dir(api_url: str, home: Optional[Path] = None) -> Path:
    """Where generated annotator passwords are kept for the server at ``api_url``."""
    from feedback.server_ctl import EmbeddedServer, default_cache

    srv = EmbeddedServer(home=home)
    if (srv.state().get("url") or "").rstrip("/") == api_url.rstrip("/"):
        return srv.home / "annotators"
    netloc = urlparse(api_url).netloc or "server"
    return default_cache() / "annotators" / re.sub(r"[^A-Za-z0-9._-]", "_", netloc)


def _save_credentials(api_url: str, home: Optional[Path], **entries: str) -> Path:
    folder = credentials_dir(api_url, home)
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    path = folder / f"{entries['username']}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"api_url": api_url, **entries}, f, indent=2)
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to a file that already existed
    return path


def _user(client: "rg.Argilla", username: str) -> Optional["rg.User"]:
    # client.users(username=...) does the same but warns when the user does not exist, which is our normal case
    return next((u for u in client.users.list() if u.username == username), None)


def _workspace(client: "rg.Argilla", name: str) -> Optional["rg.Workspace"]:
    return next((w for w in client.workspaces.list() if w.name == name), None)


def _require_workspace(client: "rg.Argilla", name: str) -> "rg.Workspace":
    ws = _workspace(client, name)
    if ws is None:
        raise FeedbackError(f"no workspace {name!r} at {client.api_url} "
                            f"(existing: {', '.join(w.name for w in client.workspaces.list()) or 'none'})")
    return ws


def _is_member(client: "rg.Argilla", ws: "rg.Workspace", username: str) -> bool:
    return any(u.username == username for u in client.users.list(workspace=ws))
