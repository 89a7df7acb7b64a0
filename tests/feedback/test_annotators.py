"""``feedback.annotators`` against the real embedded Argilla server: idempotent add, membership, a generated password
kept only in a 0600 file, the new annotator logs in and sees only their workspace's datasets, removal."""

from __future__ import annotations

import json
import logging
import os
import stat

import httpx
import pytest

from feedback.annotators import add_annotator, credentials_dir, ensure_workspace, list_annotators, remove_annotator
from feedback.client import FeedbackError


def _dataset(client, name: str, workspace: str) -> None:
    import argilla as rg

    ensure_workspace(client, workspace)
    settings = rg.Settings(fields=[rg.TextField(name="prompt")],
                           questions=[rg.RankingQuestion(name="ranking", values=["response_1", "response_2"])])
    rg.Dataset(name=name, workspace=workspace, settings=settings, client=client).create()


def _login(api_url: str, username: str, password: str) -> httpx.Client:
    """What the web UI does: a bearer token from POST /api/v1/token (form username/password)."""
    r = httpx.post(f"{api_url}/api/v1/token", data={"username": username, "password": password})
    assert r.status_code == 201, r.text
    return httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {r.json()['access_token']}"})


def _my_datasets(session: httpx.Client) -> list[str]:
    return sorted(d["name"] for d in session.get("/api/v1/me/datasets").json()["items"])


def test_add_is_idempotent_and_the_annotator_sees_only_their_workspace(argilla_server, client, caplog, capsys):
    import argilla as rg

    srv, creds = argilla_server
    _dataset(client, "ann-visible", "ann-team")
    _dataset(client, "ann-hidden", "ann-other")

    with caplog.at_level(logging.DEBUG):
        user, path = add_annotator(client, "alice", "ann-team", home=srv.home)
    assert path == srv.home / "annotators" / "alice.json"
    saved = json.loads(path.read_text())
    password = saved["password"]
    assert saved == {"api_url": creds.api_url, "username": "alice", "password": password,
                     "api_key": saved["api_key"], "workspace": "ann-team"}
    assert len(password) >= 8 and saved["api_key"] != creds.api_key
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    out = capsys.readouterr()
    shown = caplog.text + out.out + out.err + repr(user)
    assert password not in shown and saved["api_key"] not in shown  # never logged, printed or in a repr

    assert user.role == "annotator"
    assert {"username": "alice", "role": "annotator"} in list_annotators(client, "ann-team")
    assert "alice" not in [u["username"] for u in list_annotators(client, "ann-other")]

    alice = _login(creds.api_url, "alice", password)
    assert _my_datasets(alice) == ["ann-visible"]
    alice_sdk = rg.Argilla(api_url=creds.api_url, api_key=saved["api_key"])  # the SDK way in, same view
    assert alice_sdk.me.username == "alice" and [d.name for d in alice_sdk.datasets] == ["ann-visible"]

    # again, and into a second workspace: same user, no new password, both memberships
    before = path.read_text()
    again, again_path = add_annotator(client, "alice", "ann-team", home=srv.home)
    assert again.id == user.id and again_path is None and path.read_text() == before
    assert [u["username"] for u in list_annotators(client, "ann-team")].count("alice") == 1
    add_annotator(client, "alice", "ann-other", home=srv.home)
    assert _my_datasets(alice) == ["ann-hidden", "ann-visible"]

    assert remove_annotator(client, "alice", "ann-other") is True
    assert remove_annotator(client, "alice", "ann-other") is False
    assert _my_datasets(alice) == ["ann-visible"]
    assert "alice" not in [u["username"] for u in list_annotators(client, "ann-other")]


def test_given_password_new_workspace_and_remote_server_folder(argilla_server, client, tmp_path, monkeypatch):
    srv, creds = argilla_server
    user, path = add_annotator(client, "bob", "ann-new-ws", password="bobs-own-pass", home=srv.home)
    assert path is None and not (srv.home / "annotators" / "bob.json").exists()  # the caller knows it
    assert list_annotators(client, "ann-new-ws") == [{"username": "bob", "role": "annotator"}]  # workspace created
    assert _my_datasets(_login(creds.api_url, "bob", "bobs-own-pass")) == []

    # a server that is not the embedded one: passwords go under the cache, one folder per host and port
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert credentials_dir("https://argilla.example.com:6900", home=srv.home) == \
        tmp_path / "cache" / "rlhf-pipeline" / "annotators" / "argilla.example.com_6900"
    assert credentials_dir(creds.api_url, home=srv.home) == srv.home / "annotators"


def test_mistakes_are_one_clear_line_without_the_password(argilla_server, client):
    srv, _ = argilla_server
    with pytest.raises(FeedbackError, match="password: must be 8-100 characters") as e:
        add_annotator(client, "carol", "ann-team", password="short", home=srv.home)
    assert "short" not in str(e.value).replace("must be", "")
    with pytest.raises(FeedbackError, match="username: '../carol' must be letters, digits"):
        add_annotator(client, "../carol", "ann-team", home=srv.home)
    with pytest.raises(FeedbackError, match="no workspace 'ann-nowhere' at .*existing: .*argilla"):
        list_annotators(client, "ann-nowhere")
    ensure_workspace(client, "ann-empty")
    with pytest.raises(FeedbackError, match="no user 'nobody'"):
        remove_annotator(client, "nobody", "ann-empty")
