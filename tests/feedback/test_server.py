"""The embedded Argilla server: the real argilla-server 2.8.0 (own venv), real Redis, the real SDK (conftest)."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import time

import pytest

from feedback.server_ctl import EmbeddedServer, ServerError, _alive
from tests.feedback.conftest import free_port as _free_port


def test_status_and_credentials(argilla_server):
    srv, creds = argilla_server
    st = srv.status()
    assert st["running"] and st["url"] == creds.api_url and creds.api_url.startswith("http://127.0.0.1:")
    assert st["version"] == "2.8.0"
    assert {"username": "owner", "role": "owner"} in st["users"]
    assert all(p["alive"] for p in st["processes"].values())
    mode = stat.S_IMODE(os.stat(srv.credentials_file).st_mode)
    assert mode == 0o600
    assert json.loads(srv.credentials_file.read_text())["api_key"] == creds.api_key


def test_server_listens_on_loopback_only(argilla_server):
    srv, _ = argilla_server
    port = srv.state()["port"]
    addrs = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
    for addr in addrs - {"127.0.1.1"}:
        with socket.socket() as s:
            s.settimeout(1)
            assert s.connect_ex((addr, port)) != 0, f"server reachable on {addr}"


def test_dataset_round_trip(argilla_server, client):
    import argilla as rg

    settings = rg.Settings(
        fields=[rg.TextField(name="prompt"), rg.TextField(name="response_1"), rg.TextField(name="response_2")],
        questions=[rg.RankingQuestion(name="ranking", values=["response_1", "response_2"])],
        metadata=[rg.TermsMetadataProperty(name="source"), rg.IntegerMetadataProperty(name="n")],
    )
    ds = rg.Dataset(name="roundtrip", workspace="argilla", settings=settings, client=client).create()
    ds.records.log([
        {"id": "r1", "prompt": "How do I reset my router?", "response_1": "Hold reset.", "response_2": "Unplug it.",
         "source": "faq", "n": 1},
        {"id": "r2", "prompt": "What is roaming?", "response_1": "Abroad use.", "response_2": "A fee.",
         "source": "chat", "n": 5},
    ])
    records = list(ds.records)
    assert sorted(r.id for r in records) == ["r1", "r2"]
    r1 = next(r for r in records if r.id == "r1")
    assert r1.fields["prompt"] == "How do I reset my router?" and r1.metadata["source"] == "faq"

    # the engine answers text queries (AND semantics), metadata filters and progress
    assert [r.id for r in ds.records(query=rg.Query(query="reset router"))] == ["r1"]
    assert [r.id for r in ds.records(query=rg.Query(query="reset roaming"))] == []
    assert [r.id for r in ds.records(query=rg.Query(filter=rg.Filter(("metadata.source", "==", "chat"))))] == ["r2"]
    assert [r.id for r in ds.records(query=rg.Query(filter=rg.Filter(("metadata.n", ">=", 3))))] == ["r2"]
    assert ds.progress() == {"total": 2, "completed": 0, "pending": 2}

    st = argilla_server[0].status()
    assert {"name": "roundtrip", "status": "ready", "workspace": "argilla"} in st["datasets"]


def test_wrong_api_key_is_a_clear_error(argilla_server):
    import argilla as rg

    _, creds = argilla_server
    with pytest.raises(Exception) as e:
        rg.Argilla(api_url=creds.api_url, api_key="rlhf.not-the-key-0000000000")
    assert "401" in str(e.value) or "Unauthorized" in str(e.value) or "credentials" in str(e.value).lower()


def test_start_refuses_a_busy_port(argilla_server, tmp_path):
    srv, _ = argilla_server
    other = EmbeddedServer(home=tmp_path / "other")
    with pytest.raises(ServerError, match="in use"):
        other.start(port=srv.state()["port"], redis_port=_free_port(), log=lambda m: None)
    assert not other.running()


def test_venv_is_pinned_and_a_new_pin_reinstalls(argilla_server, tmp_path, monkeypatch):
    """Every package of the server venv has an exact pin; editing a pin makes the installed venv out of date."""
    import feedback.server_venv as venv

    srv, _ = argilla_server
    pins = [ln for ln in venv.CONSTRAINTS.read_text().splitlines() if ln and not ln.startswith("#")]
    assert len(pins) > 50 and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[A-Za-z0-9_.+-]+", p) for p in pins)
    assert "argilla-server==2.8.0" in pins and "argilla-server==2.8.0" in venv.ARGILLA_SERVER_SPEC
    assert venv.is_installed(srv.venv)
    edited = tmp_path / "constraints.txt"
    edited.write_text(re.sub(r"^click==.*$", "click==8.1.7", venv.CONSTRAINTS.read_text(), flags=re.MULTILINE))
    assert edited.read_text() != venv.CONSTRAINTS.read_text()
    monkeypatch.setattr(venv, "CONSTRAINTS", edited)
    assert not venv.is_installed(srv.venv)


def _spy_launches(monkeypatch) -> list[tuple[list[str], dict, bytes]]:
    """Record (argv, env, stdin) of every process server_ctl starts, and still start it (nothing is faked)."""
    import subprocess

    import feedback.server_ctl as ctl

    calls = []

    class Spy:  # stands in for the subprocess module inside server_ctl only
        def __getattr__(self, name):
            return getattr(subprocess, name)

        def run(self, cmd, *a, **kw):
            calls.append((list(cmd), dict(kw.get("env") or {}), kw.get("input") or b""))
            return subprocess.run(cmd, *a, **kw)

        def Popen(self, cmd, *a, **kw):  # the module's own name
            calls.append((list(cmd), dict(kw.get("env") or {}), b""))
            return subprocess.Popen(cmd, *a, **kw)

    monkeypatch.setattr(ctl, "subprocess", Spy())
    return calls


def _me(creds, api_key: str) -> int:
    import httpx

    return httpx.get(f"{creds.api_url}/api/v1/me", headers={"X-Argilla-Api-Key": api_key}).status_code


def test_restart_and_lost_owner_credentials(tmp_path, monkeypatch):
    """Fresh start; warm restart (no set-up process: the database is at the server's migration head); owner.json
    deleted with the database kept: the owner gets a new password and key, the old key stops working, the datasets
    stay; the same while running. Secrets go on the launcher's stdin only: never in argv, env or a log (issue 4)."""
    import argilla as rg
    import httpx

    from feedback.server_ctl import db_revision
    from feedback.server_venv import read_marker

    calls = _spy_launches(monkeypatch)
    srv = EmbeddedServer(home=tmp_path / "h")
    setup_log = srv.logs / "setup.log"
    first = srv.start(port=_free_port(), redis_port=_free_port(), log=lambda m: None)
    assert db_revision(srv.db) == read_marker(srv.venv)["alembic_head"]
    rg.Dataset(name="kept", workspace="argilla", client=rg.Argilla(api_url=first.api_url, api_key=first.api_key),
               settings=rg.Settings(fields=[rg.TextField(name="prompt")],
                                    questions=[rg.LabelQuestion(name="ok", labels=["yes", "no"])])).create()
    pids = [srv.state()[k] for k in ("server_pid", "worker_pid", "redis_pid")]
    assert srv.stop(quiet=True)
    assert not any(_alive(p) for p in pids) and srv.status()["running"] is False

    # warm restart with a stale key in owner.json: no set-up process runs, and start says how to recover
    log_before = setup_log.read_text()
    srv.credentials_file.write_text(json.dumps({**first.__dict__, "api_key": "rlhf.stale-key-0000"}))
    said = []
    srv.start(port=_free_port(), redis_port=_free_port(), log=said.append)
    assert setup_log.read_text() == log_before
    assert any(m.startswith("warning: the server rejects the API key in") for m in said)
    srv.stop(quiet=True)

    srv.credentials_file.unlink()
    said = []
    second = srv.start(port=_free_port(), redis_port=_free_port(), log=said.append)
    try:
        assert any("is missing: giving the owner" in m for m in said)
        assert not any(m.startswith("warning") for m in said)
        assert (second.username, second.api_url) == ("owner", srv.state()["url"])
        assert second.api_key != first.api_key and second.password != first.password
        assert stat.S_IMODE(os.stat(srv.credentials_file).st_mode) == 0o600
        assert json.loads(srv.credentials_file.read_text())["api_key"] == second.api_key
        assert (_me(second, second.api_key), _me(second, first.api_key)) == (200, 401)
        login = httpx.post(f"{second.api_url}/api/v1/token", data={"username": "owner", "password": second.password})
        assert login.status_code == 201
        assert [d.name for d in rg.Argilla(api_url=second.api_url, api_key=second.api_key).datasets] == ["kept"]
        log = setup_log.read_text()
        assert log.count("alembic") == log_before.count("alembic")  # the kept database was not migrated again
        assert log.count("owner user 'owner': new password and API key") == 1

        srv.credentials_file.unlink()  # lost while running: rotated in the live database
        third = srv.start(log=lambda m: None)
        assert (_me(third, third.api_key), _me(third, second.api_key)) == (200, 401)
    finally:
        srv.stop(quiet=True)

    secrets = [c.password for c in (first, second, third)] + [c.api_key for c in (first, second, third)]
    launches = [c for c in calls if any("launcher.py" in a for a in c[0])]
    assert len(launches) == 3 + 3 * 2  # set-ups (fresh, recovery, live) + server and worker per start, and ...
    for argv, env, _ in launches:
        blob = " ".join(argv) + " " + " ".join(f"{k}={v}" for k, v in env.items())
        assert not any(s in blob for s in secrets), argv
    assert [sum(c.api_key.encode() in stdin for _, _, stdin in launches) for c in (first, second, third)] == [1, 1, 1]
    for f in srv.logs.glob("*.log"):  # ... on stdin, and from there into no log
        assert not any(s in f.read_text(errors="replace") for s in secrets), f"a secret in {f}"


def test_me_search_statuses_and_progress(argilla_server, client):
    """The UI's queries go to /me/ search (which passes user_id to the engine): pending = no response of mine."""
    import argilla as rg
    import httpx

    _, creds = argilla_server
    headers = {"X-Argilla-Api-Key": creds.api_key}
    settings = rg.Settings(
        fields=[rg.TextField(name="prompt"), rg.TextField(name="response_1"), rg.TextField(name="response_2")],
        questions=[rg.RankingQuestion(name="ranking", values=["response_1", "response_2"])],
    )
    ds = rg.Dataset(name="me-search", workspace="argilla", settings=settings, client=client).create()
    ds.records.log([{"id": f"r{i}", "prompt": f"prompt {i}", "response_1": "a", "response_2": "b"} for i in range(3)])
    r1 = next(r for r in ds.records if r.id == "r1")
    # the SDK drops ranks of ranking responses (a known Argilla bug): submit through the REST API
    resp = httpx.post(
        f"{creds.api_url}/api/v1/records/{r1._model.id}/responses", headers=headers,
        json={"status": "submitted", "values": {"ranking": {"value": [
            {"value": "response_2", "rank": 1}, {"value": "response_1", "rank": 2}]}}},
    )
    assert resp.status_code == 201, resp.text

    def me_search(body: dict) -> tuple[int, list[str]]:
        r = httpx.post(f"{creds.api_url}/api/v1/me/datasets/{ds.id}/records/search", json=body, headers=headers)
        assert r.status_code == 200, r.text
        j = r.json()
        return j["total"], sorted(it["record"]["external_id"] for it in j["items"])

    def status_filter(*values: str) -> dict:
        return {"filters": {"and": [{"type": "terms", "scope": {"entity": "response", "property": "status"},
                                     "values": list(values)}]}}

    assert me_search(status_filter("pending")) == (2, ["r0", "r2"])
    assert me_search(status_filter("submitted")) == (1, ["r1"])
    assert me_search({}) == (3, ["r0", "r1", "r2"])
    first, second = (httpx.post(f"{creds.api_url}/api/v1/me/datasets/{ds.id}/records/search", json={},
                                headers=headers).json()["items"] for _ in range(2))
    assert [i["record"]["id"] for i in first] == [i["record"]["id"] for i in second]  # deterministic order
    assert ds.progress() == {"total": 3, "completed": 1, "pending": 2}
    metrics = httpx.get(f"{creds.api_url}/api/v1/me/datasets/{ds.id}/metrics", headers=headers).json()
    assert metrics["responses"]["submitted"] == 1 and metrics["responses"]["pending"] == 2


def test_bulk_upserts_still_notify_enabled_webhooks(argilla_server, client):
    """The launcher skips building webhook events only when no webhook is enabled (push ingests 2.5x faster); with
    one enabled, a record logged in bulk still reaches it through the worker, as in stock argilla-server."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import argilla as rg
    import httpx

    _, creds = argilla_server
    received: list[dict] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    http = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    headers = {"X-Argilla-Api-Key": creds.api_key}
    hook = httpx.post(f"{creds.api_url}/api/v1/webhooks", headers=headers,
                      json={"url": f"http://127.0.0.1:{http.server_port}/hook", "events": ["record.created"]})
    assert hook.status_code == 201, hook.text
    try:
        settings = rg.Settings(fields=[rg.TextField(name="text")], questions=[rg.TextQuestion(name="note")])
        ds = rg.Dataset(name="webhook-bulk", workspace="argilla", settings=settings, client=client).create()
        ds.records.log([{"id": "w1", "text": "hello"}])
        deadline = time.monotonic() + 30
        while not received and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [e["type"] for e in received] == ["record.created"]
        assert received[0]["data"]["external_id"] == "w1"
    finally:
        httpx.delete(f"{creds.api_url}/api/v1/webhooks/{hook.json()['id']}", headers=headers)
        http.shutdown()
