"""The embedded Argilla server: the real argilla-server 2.8.0 (own venv), real Redis, the real SDK.

The server venv comes from $RLHF_ARGILLA_VENV (default ~/.cache/rlhf-pipeline/argilla-server-venv); if it is missing
the first start installs it (about a minute; .ci/install-argilla-server does it ahead of time).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys

import pytest

from feedback.server_ctl import EmbeddedServer, ServerError, _alive


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def argilla_server(tmp_path_factory):
    srv = EmbeddedServer(home=tmp_path_factory.mktemp("argilla-home"))
    creds = srv.start(port=_free_port(), redis_port=_free_port(), log=lambda m: print(m, file=sys.stderr))
    yield srv, creds
    srv.stop(quiet=True)


@pytest.fixture(scope="session")
def client(argilla_server):
    import argilla as rg

    _, creds = argilla_server
    return rg.Argilla(api_url=creds.api_url, api_key=creds.api_key)


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


def test_stop_ends_every_process(tmp_path):
    srv = EmbeddedServer(home=tmp_path / "h")
    srv.start(port=_free_port(), redis_port=_free_port(), log=lambda m: None)
    pids = [srv.state()[k] for k in ("server_pid", "worker_pid", "redis_pid")]
    assert srv.stop(quiet=True)
    assert not any(_alive(p) for p in pids)
    assert srv.status()["running"] is False


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
