"""Who sees what on the embedded Argilla server, and where the secrets are (never in logs, argv or errors).

All against the session's real server (conftest): two workspaces, a dataset in each, annotators who belong only to
the first; every annotator gets their API key the way a real one does, by logging in with username and password.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import httpx
import pytest

RANKING_VALUES = ["response_1", "response_2"]


def _api_key(url: str, username: str, password: str) -> str:
    """Log in like the UI (OAuth2 password form -> bearer token), then read the user's own API key from /me."""
    token = httpx.post(f"{url}/api/v1/token", data={"username": username, "password": password})
    assert token.status_code == 201, token.text
    me = httpx.get(f"{url}/api/v1/me", headers={"Authorization": f"Bearer {token.json()['access_token']}"})
    assert me.status_code == 200 and me.json()["username"] == username
    return me.json()["api_key"]


@pytest.fixture(scope="module")
def realm(argilla_server, client):
    """Workspaces sec-a and sec-b, one ranking dataset each (3 records, metadata "topic" shown to annotators and
    "model" hidden from them); annotators sec-ann-1, sec-ann-2 in sec-a."""
    import argilla as rg

    _, creds = argilla_server
    settings = rg.Settings(
        fields=[rg.TextField(name="prompt"), *(rg.TextField(name=v) for v in RANKING_VALUES)],
        questions=[rg.RankingQuestion(name="ranking", values=RANKING_VALUES)],
        metadata=[rg.TermsMetadataProperty(name="topic"),
                  rg.TermsMetadataProperty(name="model", visible_for_annotators=False)],
    )
    out = {"url": creds.api_url}
    for ws_name in ("sec-a", "sec-b"):
        ws = rg.Workspace(name=ws_name, client=client).create()
        ds = rg.Dataset(name=f"{ws_name}-data", workspace=ws, settings=settings, client=client).create()
        ds.records.log([{"id": f"{ws_name}-{i}", "prompt": f"question {i} of {ws_name}", "response_1": "yes",
                         "response_2": "no", "topic": "billing", "model": "policy-v2"} for i in range(3)])
        out[ws_name] = {"workspace": ws, "dataset": ds, "record_ids": [str(r._model.id) for r in ds.records]}
    for name in ("sec-ann-1", "sec-ann-2"):
        password = f"{name}-password-0123"
        user = rg.User(username=name, password=password, role="annotator", client=client).create()
        user.add_to_workspace(out["sec-a"]["workspace"])
        out[name] = {"id": str(user.id), "key": _api_key(creds.api_url, name, password)}
    return out


def _as(realm: dict, who: str) -> httpx.Client:
    return httpx.Client(base_url=realm["url"], headers={"X-Argilla-Api-Key": realm[who]["key"]})


def _rank(realm: dict, who: str, record: str, order: list[str]) -> None:
    with _as(realm, who) as http:
        r = http.post(f"/api/v1/records/{record}/responses", json={"status": "submitted", "values": {
            "ranking": {"value": [{"value": v, "rank": i + 1} for i, v in enumerate(order)]}}})
        assert r.status_code == 201, r.text


def test_annotator_sees_only_their_workspace(realm):
    """(a) REST: an annotator of sec-a lists only sec-a's dataset and gets 403 on anything of sec-b."""
    ds_a, ds_b = realm["sec-a"]["dataset"], realm["sec-b"]["dataset"]
    with _as(realm, "sec-ann-1") as http:
        assert [d["name"] for d in http.get("/api/v1/me/datasets").json()["items"]] == ["sec-a-data"]
        assert [w["name"] for w in http.get("/api/v1/me/workspaces").json()["items"]] == ["sec-a"]
        # the key works where it should (so the 403s below are about the workspace, not a broken key)
        assert http.get(f"/api/v1/datasets/{ds_a.id}").status_code == 200
        search_a = http.post(f"/api/v1/me/datasets/{ds_a.id}/records/search", json={})
        assert search_a.status_code == 200 and search_a.json()["total"] == 3

        record_b = realm["sec-b"]["record_ids"][0]
        assert http.get(f"/api/v1/datasets/{ds_b.id}").status_code == 403
        assert http.get(f"/api/v1/datasets/{ds_b.id}/records").status_code == 403
        assert http.post(f"/api/v1/me/datasets/{ds_b.id}/records/search", json={}).status_code == 403
        assert http.get(f"/api/v1/me/datasets/{ds_b.id}/metrics").status_code == 403
        assert http.get(f"/api/v1/records/{record_b}").status_code == 403
        answer = {"status": "submitted", "values": {"ranking": {"value": [
            {"value": "response_1", "rank": 1}, {"value": "response_2", "rank": 2}]}}}
        assert http.post(f"/api/v1/records/{record_b}/responses", json=answer).status_code == 403


def test_annotator_sdk_lists_only_their_datasets(realm):
    """(a) the SDK with the annotator's key shows sec-a's dataset only, and finds nothing named in sec-b."""
    import argilla as rg

    annotator = rg.Argilla(api_url=realm["url"], api_key=realm["sec-ann-1"]["key"])
    assert [d.name for d in annotator.datasets] == ["sec-a-data"]
    assert [w.name for w in annotator.workspaces] == ["sec-a"]


def test_annotator_does_not_see_other_annotators_responses(realm):
    """(b) the /me/ views an annotator works in carry only their own response, never a colleague's, and only the
    metadata shown to annotators."""
    ds = realm["sec-a"]["dataset"]
    record = realm["sec-a"]["record_ids"][0]
    ranks = {"sec-ann-1": ["response_1", "response_2"], "sec-ann-2": ["response_2", "response_1"]}
    for who, order in ranks.items():
        _rank(realm, who, record, order)

    for who, order in ranks.items():
        with _as(realm, who) as http:
            found = http.post(f"/api/v1/me/datasets/{ds.id}/records/search", params={"include": "responses"},
                              json={}).json()["items"]
            mine = next(i["record"] for i in found if i["record"]["id"] == record)
            assert mine["metadata"] == {"topic": "billing"}  # "model" is hidden from annotators
            responses = mine["responses"]
            assert [r["user_id"] for r in responses] == [realm[who]["id"]]
            assert [v["value"] for v in responses[0]["values"]["ranking"]["value"]] == order
            metrics = http.get(f"/api/v1/me/datasets/{ds.id}/metrics").json()["responses"]
            assert metrics["submitted"] == 1 and metrics["pending"] == 2  # their own count, not the dataset's


def test_wrong_api_key_is_one_clear_error_without_the_key(argilla_server):
    """(c) connect() with a rejected key: FeedbackError naming the URL and the 401, never echoing the key."""
    from feedback.client import ArgillaConfig, FeedbackError, connect

    _, creds = argilla_server
    wrong = "rlhf.wrong-key-" + "x" * 20
    with pytest.raises(FeedbackError) as e:
        connect(ArgillaConfig(api_url=creds.api_url, api_key=wrong))
    msg = str(e.value)
    assert creds.api_url in msg and "401" in msg and "rejected" in msg
    assert wrong not in msg and "wrong-key" not in msg


def test_private_files_and_home(argilla_server):
    """(e) owner.json, state.json and setup.log are 0600, the data directory 0700 (the rest lives inside it)."""
    srv, _ = argilla_server
    assert stat.S_IMODE(os.stat(srv.home).st_mode) == 0o700
    for f in (srv.credentials_file, srv.state_file, srv.logs / "setup.log"):
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600, f


def test_secrets_not_in_logs_argv_or_environment(argilla_server):
    """Issue 4: ``ps`` shows every local user each process's argv; the logs outlive the processes."""
    srv, creds = argilla_server
    secrets = (creds.password, creds.api_key)
    logs = sorted(srv.logs.glob("*.log"))
    assert {p.name for p in logs} >= {"setup.log", "server.log", "worker.log", "redis.log"}
    assert "owner user 'owner': created" in (srv.logs / "setup.log").read_text()  # the owner was made here
    for log in logs:
        text = log.read_text(errors="replace")
        assert not any(s in text for s in secrets), f"a secret in {log}"
    for name in ("server_pid", "worker_pid", "redis_pid"):
        pid = srv.state()[name]
        for what in ("cmdline", "environ"):
            raw = Path(f"/proc/{pid}/{what}").read_bytes().decode(errors="replace")
            assert raw and not any(s in raw for s in secrets), f"a secret in /proc/{pid}/{what} ({name})"


def test_record_endpoint_shows_an_annotator_only_their_response(realm, argilla_server):
    """argilla-server 2.8 returned every response (and hidden metadata) of GET /api/v1/records/{id} to any member of
    the workspace: an annotator calling the REST API could read colleagues' ranks. The launcher's patch gives that
    endpoint the /me/ view for annotators; the owner still sees everything."""
    _, creds = argilla_server
    record = realm["sec-a"]["record_ids"][1]
    ranks = {"sec-ann-1": ["response_1", "response_2"], "sec-ann-2": ["response_2", "response_1"]}
    for who, order in ranks.items():
        _rank(realm, who, record, order)
    for who, order in ranks.items():
        with _as(realm, who) as http:
            seen = http.get(f"/api/v1/records/{record}")
        assert seen.status_code == 200, seen.text
        assert [r["user_id"] for r in seen.json()["responses"]] == [realm[who]["id"]]
        assert [v["value"] for v in seen.json()["responses"][0]["values"]["ranking"]["value"]] == order
        assert seen.json()["metadata"] == {"topic": "billing"}
        assert seen.json()["id"] == record and set(seen.json()["fields"]) == {"prompt", *RANKING_VALUES}
    with httpx.Client(base_url=realm["url"], headers={"X-Argilla-Api-Key": creds.api_key}) as owner:
        full = owner.get(f"/api/v1/records/{record}").json()
    assert sorted(r["user_id"] for r in full["responses"]) == sorted(realm[w]["id"] for w in ranks)
    assert full["metadata"] == {"topic": "billing", "model": "policy-v2"}


def test_record_endpoint_before_any_own_response(realm):
    """A colleague's response exists, the annotator's does not: an empty list, not the colleague's."""
    record = realm["sec-a"]["record_ids"][2]
    _rank(realm, "sec-ann-1", record, ["response_2", "response_1"])
    with _as(realm, "sec-ann-2") as http:
        assert http.get(f"/api/v1/records/{record}").json()["responses"] == []


def test_membership_is_checked_again_on_every_request(realm, client):
    """The launcher keeps User.is_member's answer for one request only: an annotator removed from a workspace is
    refused at their next request, not after a restart."""
    import argilla as rg

    password = "sec-ann-3-password-0123"
    user = rg.User(username="sec-ann-3", password=password, role="annotator", client=client).create()
    user.add_to_workspace(realm["sec-a"]["workspace"])
    realm["sec-ann-3"] = {"key": _api_key(realm["url"], "sec-ann-3", password)}
    ds, record = realm["sec-a"]["dataset"], realm["sec-a"]["record_ids"][0]
    with _as(realm, "sec-ann-3") as http:
        assert http.post(f"/api/v1/me/datasets/{ds.id}/records/search", json={}).status_code == 200
        assert http.get(f"/api/v1/records/{record}").status_code == 200
        user.remove_from_workspace(realm["sec-a"]["workspace"])
        assert http.post(f"/api/v1/me/datasets/{ds.id}/records/search", json={}).status_code == 403
        assert http.get(f"/api/v1/records/{record}").status_code == 403
