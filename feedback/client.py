"""Connection to any Argilla 2.x server: the embedded one by default, or ARGILLA_API_URL / ARGILLA_API_KEY, or a recipe.

Order of precedence for each of url and key: the recipe's ``argilla:`` section, then the environment variables the
Argilla SDK itself reads, then the embedded server (its state.json and owner.json under $RLHF_ARGILLA_HOME). The API
key is a secret: it is never logged, and recipes copied into manifests go through ``rlhf.config.redact_secrets``.

Two ways in, both authenticated with the same key:
* the SDK (``connect()`` -> ``argilla.Argilla``) for datasets, records, users and workspaces;
* ``Rest`` (the SDK's own httpx client) for what the SDK gets wrong: ranking responses lose their ``rank`` in
  ``Response.value`` (argilla-io/argilla#5712, field-notes trap 11), so ranks are read and written over REST.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import argilla as rg


class FeedbackError(RuntimeError):
    """A problem the user can act on: printed as one line, no traceback."""


@dataclass
class ArgillaConfig:
    """Where the Argilla server is (the ``argilla:`` section of feedback recipes)."""

    api_url: Optional[str] = None  # e.g. http://argilla.example:6900; unset -> $ARGILLA_API_URL -> embedded server
    api_key: Optional[str] = field(default=None, repr=False)  # secret (kept out of repr); unset -> $ARGILLA_API_KEY -> the embedded server's owner key
    workspace: str = "argilla"  # workspace that holds the datasets (created when missing, if the key may)
    home: Optional[str] = None  # embedded server's data directory; unset -> $RLHF_ARGILLA_HOME or its default
    timeout: int = 60  # seconds per HTTP request

    def __post_init__(self) -> None:
        if self.api_url is not None and not str(self.api_url).startswith(("http://", "https://")):
            raise ValueError(f"api_url: expected an http(s):// URL, got {self.api_url!r}")
        if not self.workspace or not str(self.workspace).strip():
            raise ValueError("workspace: must not be empty")
        if self.timeout <= 0:
            raise ValueError(f"timeout: must be > 0, got {self.timeout}")

    def resolve(self) -> tuple[str, str, str]:
        """``(api_url, api_key, where_from)``; ``where_from`` names the source for messages (never the key)."""
        url = self.api_url or os.environ.get("ARGILLA_API_URL")
        key = self.api_key or os.environ.get("ARGILLA_API_KEY")
        where = "recipe/environment"
        if not url or not key:
            from feedback.server_ctl import EmbeddedServer

            srv = EmbeddedServer(home=self.home)
            creds = srv.credentials()
            state_url = srv.state().get("url")
            if not url and not state_url:
                raise FeedbackError(
                    "no Argilla server: set ARGILLA_API_URL and ARGILLA_API_KEY (or argilla.api_url/api_key in the "
                    "recipe), or start the embedded one with `rlhf feedback server start`")
            url = url or state_url
            if not key:
                if creds is None:
                    raise FeedbackError(f"no API key for {url}: set ARGILLA_API_KEY or argilla.api_key")
                key = creds.api_key
            where = f"embedded server ({srv.home})"
        return url.rstrip("/"), key, where


def connect(cfg: ArgillaConfig) -> "rg.Argilla":
    """The SDK client, with the two usual failures (unreachable, key rejected) as one clear line each."""
    import argilla as rg
    from argilla._exceptions import ArgillaCredentialsError

    url, key, where = cfg.resolve()
    try:
        return rg.Argilla(api_url=url, api_key=key, timeout=cfg.timeout, retries=1)
    except ArgillaCredentialsError:
        raise FeedbackError(f"Argilla at {url} rejected the API key (401 Unauthorized; key from {where})") from None
    except Exception as e:  # httpx.ConnectError and friends, wrapped differently across SDK versions
        if "401" in str(e):
            raise FeedbackError(f"Argilla at {url} rejected the API key (401 Unauthorized; key from {where})") from None
        raise FeedbackError(f"cannot reach Argilla at {url} ({where}): {type(e).__name__}: {e}") from None


class Rest:
    """Thin JSON access to Argilla's REST API over the SDK's authenticated httpx client."""

    def __init__(self, client: "rg.Argilla"):
        self.http = client.http_client

    def _check(self, method: str, path: str, r) -> Any:
        if r.status_code >= 400:
            detail = r.text[:300]
            if r.status_code == 401:
                raise FeedbackError(f"{method} {path}: API key rejected (401)")
            if r.status_code == 403:
                raise FeedbackError(f"{method} {path}: forbidden for this user (403): {detail}")
            raise FeedbackError(f"{method} {path}: HTTP {r.status_code}: {detail}")
        return r.json() if r.content else None

    def get(self, path: str, **params: Any) -> Any:
        return self._check("GET", path, self.http.get(path, params=params or None))

    def post(self, path: str, json: Any = None, **params: Any) -> Any:
        return self._check("POST", path, self.http.post(path, json=json, params=params or None))

    def put(self, path: str, json: Any = None) -> Any:
        return self._check("PUT", path, self.http.put(path, json=json))

    def delete(self, path: str) -> Any:
        return self._check("DELETE", path, self.http.delete(path))


@contextmanager
def sdk_errors(client: "rg.Argilla"):
    """The SDK's API errors (403 for a key without the role, 404, 422) as one FeedbackError line. They carry the
    server's reason; only user creation sends a secret, and it is handled apart (see the module docstring)."""
    from argilla._exceptions import ArgillaError

    try:
        yield
    except ArgillaError as e:
        raise FeedbackError(f"Argilla at {client.api_url}: {' '.join(str(e).split())}") from None
