"""Shared fixtures for the feedback tests: one embedded Argilla server per test session (the real argilla-server
2.8.0 in its own venv, real Redis, SQLite, our SQL search engine) and the real SDK client for its owner.

The server venv comes from $RLHF_ARGILLA_VENV (default ~/.cache/rlhf-pipeline/argilla-server-venv); if it is missing
the first start installs it (about a minute; .ci/install-argilla-server does it ahead of time)."""

from __future__ import annotations

import socket
import sys

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def argilla_server(tmp_path_factory):
    """``(EmbeddedServer, Credentials)`` of a server started for this session in a fresh data directory."""
    from feedback.server_ctl import EmbeddedServer

    srv = EmbeddedServer(home=tmp_path_factory.mktemp("argilla-home"))
    creds = srv.start(port=free_port(), redis_port=free_port(), log=lambda m: print(m, file=sys.stderr))
    yield srv, creds
    srv.stop(quiet=True)


@pytest.fixture(scope="session")
def client(argilla_server):
    """The SDK client of the server's owner."""
    import argilla as rg

    _, creds = argilla_server
    return rg.Argilla(api_url=creds.api_url, api_key=creds.api_key)
