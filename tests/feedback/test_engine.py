"""The embedded server's SQL search engine (feedback/server/engine.py, sql_query.py) through the real REST API
and SDK.

One prepared dataset of six records (metadata, suggestions, responses of two annotators) and one of twenty records
with 2-d vectors; every expected id list below was worked out by hand from the tables in this file. Owner searches
(POST /api/v1/datasets/{id}/records/search) without a sort return insertion order, so lists compare exactly.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import pytest

# ------------------------------------------------------------------------------------------ the prepared data
# id: (prompt, response_1, response_2, metadata, suggestions as (question, value, score, agent))
MAIN = {
    "r1": ("How do I reset my router?", "Hold the reset button.", "Unplug the router.",
           {"source": "faq", "n": 1, "x": 0.5}, [("rating", 4, 0.9, "m1"), ("label", "good", 0.8, "m1")]),
    "r2": ("What is roaming?", "Using your phone abroad.", "A fee.",
           {"source": "chat", "n": 5, "x": 2.5}, [("rating", 2, 0.4, "m2"), ("tags", ["x", "y"], [0.3, 0.6], "m2")]),
    "r3": ("Lights blinking red", "Call support.", "Reset the ROUTER.",
           {"source": "faq", "n": 3, "x": 1.5}, [("rating", 5, 0.7, "m1")]),
    "r4": ("Cancel my contract", "Send a letter.", "Call us.", {"source": "email", "n": 10}, []),
    "r5": ("Café opening hours", "Über den Tag.", "Nine to five.", {"source": ["chat", "faq"], "n": 7, "x": 0.1}, []),
    "r6": ("Data limit 100% exceeded", "Buy more.", "Wait a month.", {}, []),
}
RANKED = {"ranking": {"value": [{"value": "response_1", "rank": 1}, {"value": "response_2", "rank": 2}]}}
# annotator -> record -> (status, rating or None, label or None); submitted ones also carry RANKED (required)
ANSWERS = {
    "ann1": {"r1": ("submitted", 5, None), "r2": ("submitted", 2, None), "r3": ("draft", 4, None),
             "r4": ("discarded", None, None)},
    "ann2": {"r1": ("submitted", 3, None), "r3": ("submitted", 1, None), "r5": ("submitted", 4, "bad")},
}
# records completed (min_submitted=1): r1 r2 r3 r5; average rating per record: r1 4, r2 2, r3 2.5, r5 4


def angle(k: int) -> float:
    """Similarity dataset: record s<k> points at 17k degrees, so its distances to s0 are all different."""
    return math.radians(17 * k % 360)


@dataclass
class Server:
    url: str
    keys: dict  # "owner" / "ann1" / "ann2" -> API key
    ids: dict = field(default_factory=dict)  # dataset name -> {external id: record uuid}
    datasets: dict = field(default_factory=dict)  # dataset name -> dataset uuid

    def post(self, who: str, path: str, body: dict, **params):
        import httpx

        return httpx.post(f"{self.url}/api/v1{path}", json=body, params=params,
                          headers={"X-Argilla-Api-Key": self.keys[who]}, timeout=30)

    def get(self, who: str, path: str) -> dict:
        import httpx

        r = httpx.get(f"{self.url}/api/v1{path}", headers={"X-Argilla-Api-Key": self.keys[who]}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def search(self, who: str, body: dict, ds: str = "main", **params) -> tuple[int, list[str]]:
        """(total, external ids in order): /me/ search for annotators, the all-responses search for the owner."""
        path = f"/datasets/{self.datasets[ds]}/records/search"
        r = self.post(who, path if who == "owner" else "/me" + path, body, **params)
        assert r.status_code == 200, r.text
        return r.json()["total"], [it["record"]["external_id"] for it in r.json()["items"]]

    def scored(self, body: dict, **params) -> list[tuple[str, float]]:
        r = self.post("owner", f"/datasets/{self.datasets['sim']}/records/search", body, **params)
        assert r.status_code == 200, r.text
        return [(it["record"]["external_id"], it["query_score"]) for it in r.json()["items"]]


def _create_annotators(client, rest) -> dict:
    import argilla as rg

    keys = {}
    for name in ("ann1", "ann2"):
        user = rg.User(username=f"engine-{name}", password=secrets.token_urlsafe(12), role="annotator",
                       client=client).create()
        client.workspaces("argilla").add_user(user)
        keys[name] = rest.get(f"/api/v1/users/{user.id}")["api_key"]
    return keys


def _main_dataset(client):
    import argilla as rg

    settings = rg.Settings(
        fields=[rg.TextField(name="prompt"), rg.TextField(name="response_1"), rg.TextField(name="response_2")],
        questions=[rg.RankingQuestion(name="ranking", values=["response_1", "response_2"]),
                   rg.RatingQuestion(name="rating", values=[1, 2, 3, 4, 5], required=False),
                   rg.LabelQuestion(name="label", labels=["good", "bad"], required=False),
                   rg.MultiLabelQuestion(name="tags", labels=["x", "y", "z"], required=False)],
        metadata=[rg.TermsMetadataProperty(name="source"), rg.IntegerMetadataProperty(name="n"),
                  rg.FloatMetadataProperty(name="x")],
    )
    ds = rg.Dataset(name="engine-main", workspace="argilla", settings=settings, client=client).create()
    ds.records.log([
        rg.Record(id=rid, fields={"prompt": p, "response_1": a, "response_2": b}, metadata=meta,
                  suggestions=[rg.Suggestion(q, v, score=s, agent=ag) for q, v, s, ag in sugg])
        for rid, (p, a, b, meta, sugg) in MAIN.items()])
    return ds


def _sim_dataset(client):
    import argilla as rg

    settings = rg.Settings(fields=[rg.TextField(name="prompt")],
                           questions=[rg.LabelQuestion(name="ok", labels=["y", "n"])],
                           metadata=[rg.TermsMetadataProperty(name="half")],
                           vectors=[rg.VectorField(name="emb", dimensions=2)])
    ds = rg.Dataset(name="engine-sim", workspace="argilla", settings=settings, client=client).create()
    ds.records.log([rg.Record(id=f"s{k}", fields={"prompt": f"point {k}"},
                              metadata={"half": "odd" if k % 2 else "even"},
                              vectors={"emb": [math.cos(angle(k)), math.sin(angle(k))]}) for k in range(20)])
    return ds


def _answer(server: Server) -> None:
    """Responses over REST as each annotator (the SDK drops ranking ranks, argilla-io/argilla#5712)."""
    for who, answers in ANSWERS.items():
        for rid, (status, rating, label) in answers.items():
            values = dict(RANKED) if status == "submitted" else {}
            values.update({"rating": {"value": rating}} if rating else {})
            values.update({"label": {"value": label}} if label else {})
            body = {"status": status, **({"values": values} if values else {})}
            r = server.post(who, f"/records/{server.ids['main'][rid]}/responses", body)
            assert r.status_code == 201, r.text


@pytest.fixture(scope="module")
def server(argilla_server, client) -> Server:
    from feedback.client import Rest

    _, creds = argilla_server
    srv = Server(url=creds.api_url, keys={"owner": creds.api_key, **_create_annotators(client, Rest(client))})
    for name, ds in (("main", _main_dataset(client)), ("sim", _sim_dataset(client))):
        srv.datasets[name] = str(ds.id)
        srv.ids[name] = {r.id: str(r._server_id) for r in ds.records}
    _answer(srv)
    return srv


# --------------------------------------------------------------------------------------------- body builders
def terms(scope: dict, *values) -> dict:
    return {"type": "terms", "scope": scope, "values": list(values)}


def between(scope: dict, ge=None, le=None) -> dict:
    bounds = {k: v for k, v in (("ge", ge), ("le", le)) if v is not None}
    return {"type": "range", "scope": scope, **bounds}


def where(*filters) -> dict:
    return {"filters": {"and": list(filters)}}


def sort(*orders) -> dict:
    return {"sort": [{"scope": scope, "order": order} for scope, order in orders]}


STATUS = {"entity": "response", "property": "status"}
RECORD_STATUS = {"entity": "record", "property": "status"}


def response(question: str) -> dict:
    return {"entity": "response", "question": question}


def suggestion(question: str, prop: str = "value") -> dict:
    return {"entity": "suggestion", "question": question, "property": prop}


def meta(name: str) -> dict:
    return {"entity": "metadata", "metadata_property": name}


def record(prop: str) -> dict:
    return {"entity": "record", "property": prop}


# ----------------------------------------------------------------------------------------------------- filters
@pytest.mark.parametrize("body, expected", [
    (where(terms(STATUS, "pending")), ["r6"]),  # no response from anybody
    (where(terms(STATUS, "submitted")), ["r1", "r2", "r3", "r5"]),
    (where(terms(STATUS, "draft")), ["r3"]),
    (where(terms(STATUS, "pending", "discarded")), ["r4", "r6"]),
    (where(terms(response("rating"), "5")), ["r1"]),
    (where(between(response("rating"), ge=4)), ["r1", "r3", "r5"]),  # any user's answer: r3 has ann1's draft 4
    (where(terms(response("label"), "bad")), ["r5"]),
    (where(terms(suggestion("rating"), "4")), ["r1"]),
    (where(between(suggestion("rating"), ge=4)), ["r1", "r3"]),
    (where(between(suggestion("rating", "score"), ge=0.5)), ["r1", "r3"]),
    (where(terms(suggestion("rating", "agent"), "m2")), ["r2"]),
    (where(terms(suggestion("tags"), "y")), ["r2"]),
    (where(between(suggestion("tags", "score"), le=0.35)), ["r2"]),  # any item of the list [0.3, 0.6]
    (where(terms(meta("source"), "faq")), ["r1", "r3", "r5"]),  # r5's source is a list
    (where(terms(meta("source"), "chat", "email")), ["r2", "r4", "r5"]),
    (where(between(meta("n"), ge=3, le=7)), ["r2", "r3", "r5"]),
    (where(between(meta("x"), le=1.0)), ["r1", "r5"]),
    (where(terms(RECORD_STATUS, "completed")), ["r1", "r2", "r3", "r5"]),
    (where(terms(record("external_id"), "r2", "r4")), ["r2", "r4"]),
    (where(terms(meta("source"), "faq"), between(suggestion("rating"), ge=4.5)), ["r3"]),  # and
])
def test_owner_filters(server, body, expected):
    assert server.search("owner", body) == (len(expected), expected)


def test_record_id_and_date_filters(server):
    ids = server.ids["main"]
    assert server.search("owner", where(terms(record("id"), ids["r3"], "not-a-uuid"))) == (1, ["r3"])
    listed = server.get("owner", f"/datasets/{server.datasets['main']}/records")["items"]
    stamps = {it["external_id"]: it["inserted_at"] for it in listed}
    assert server.search("owner", where(between(record("inserted_at"), ge=stamps["r4"])))[1] == ["r4", "r5", "r6"]
    assert server.search("owner", where(between(record("inserted_at"), le=stamps["r2"])))[1] == ["r1", "r2"]


@pytest.mark.parametrize("who, body, expected", [
    ("ann1", where(terms(STATUS, "pending")), ["r5", "r6"]),  # pending = no response of mine
    ("ann1", where(terms(STATUS, "submitted")), ["r1", "r2"]),
    ("ann1", where(terms(STATUS, "pending", "draft")), ["r3", "r5", "r6"]),
    ("ann2", where(terms(STATUS, "pending")), ["r2", "r4", "r6"]),
    ("ann1", where(between(response("rating"), ge=4)), ["r1", "r3"]),  # my own answers only
    ("ann2", where(between(response("rating"), ge=4)), ["r5"]),
    # the web UI's queue: my pending records that nobody has completed yet
    ("ann1", where(terms(STATUS, "pending"), terms(RECORD_STATUS, "pending")), ["r6"]),
    ("ann2", where(terms(STATUS, "pending"), terms(RECORD_STATUS, "pending")), ["r4", "r6"]),
])
def test_me_filters_are_scoped_to_the_user(server, who, body, expected):
    total, ids = server.search(who, body)
    assert (total, sorted(ids)) == (len(expected), expected)


# -------------------------------------------------------------------------------------------------------- text
@pytest.mark.parametrize("text, expected", [
    ({"q": "router"}, ["r1", "r3"]),  # r3 has it as ROUTER in response_2
    ({"q": "ROUTER reset"}, ["r1", "r3"]),  # every word, any field, any ASCII case
    ({"q": "reset roaming"}, []),
    ({"q": "router", "field": "prompt"}, ["r1"]),
    ({"q": "café"}, ["r5"]),  # stored JSON-escaped (\u00e9): matched on the decoded text
    ({"q": "100%"}, ["r6"]),
    ({"q": "%"}, ["r6"]),  # LIKE wildcards are matched literally
    ({"q": "_"}, []),
])
def test_text_query(server, text, expected):
    assert server.search("owner", {"query": {"text": text}}) == (len(expected), expected)


# -------------------------------------------------------------------------------------------------------- sort
@pytest.mark.parametrize("body, expected", [
    (sort((meta("n"), "asc")), ["r1", "r3", "r2", "r5", "r4", "r6"]),  # r6 has no n: last
    (sort((meta("n"), "desc")), ["r4", "r5", "r2", "r3", "r1", "r6"]),  # ... in both directions
    (sort((meta("x"), "asc")), ["r5", "r1", "r3", "r2", "r4", "r6"]),
    (sort((meta("x"), "desc")), ["r2", "r3", "r1", "r5", "r4", "r6"]),
    (sort((suggestion("rating", "score"), "desc")), ["r1", "r3", "r2", "r4", "r5", "r6"]),
    (sort((suggestion("rating"), "asc")), ["r2", "r1", "r3", "r4", "r5", "r6"]),
    (sort((suggestion("tags", "score"), "desc")), ["r2", "r1", "r3", "r4", "r5", "r6"]),
    (sort((response("rating"), "asc")), ["r2", "r3", "r1", "r5", "r4", "r6"]),  # averages 2, 2.5, 4, 4
    (sort((response("rating"), "desc")), ["r1", "r5", "r3", "r2", "r4", "r6"]),
    (sort((record("inserted_at"), "desc")), ["r6", "r5", "r4", "r3", "r2", "r1"]),
    (sort((record("external_id"), "desc")), ["r6", "r5", "r4", "r3", "r2", "r1"]),
    (sort((suggestion("rating", "agent"), "asc"), (meta("n"), "desc")), ["r3", "r1", "r2", "r4", "r5", "r6"]),
])
def test_owner_sorts(server, body, expected):
    assert server.search("owner", body) == (6, expected)


def test_updated_at_sort_follows_the_records_timestamps(server):
    items = server.get("owner", f"/datasets/{server.datasets['main']}/records")["items"]
    expected = [it["external_id"] for it in sorted(items, key=lambda it: it["updated_at"], reverse=True)]
    assert server.search("owner", sort((record("updated_at"), "desc")))[1] == expected


def test_me_sort_by_my_ratings(server):
    total, ids = server.search("ann1", sort((response("rating"), "asc")))
    assert total == 6 and ids[:3] == ["r2", "r3", "r1"] and sorted(ids[3:]) == ["r4", "r5", "r6"]


def test_page_and_total(server):
    assert server.search("owner", sort((meta("n"), "asc")), offset=2, limit=2) == (6, ["r2", "r5"])
    assert server.search("owner", sort((meta("n"), "asc")), offset=6, limit=2) == (6, [])
    assert server.search("ann1", where(terms(STATUS, "pending")), limit=1)[0] == 2


@pytest.mark.parametrize("body, reason", [
    (sort((response("ranking"), "asc")), "ranking"),
    (sort((suggestion("tags"), "asc")), "multi_label_selection"),
    (sort(({"entity": "response", "property": "status"}, "asc")), "response status"),
    (where(terms(response("ranking"), "response_1")), "ranking"),
    (where(between(record("status"), ge=1)), "range filter on record status"),
])
def test_unsupported_shapes_are_clear_422s(server, body, reason):
    r = server.post("owner", f"/datasets/{server.datasets['main']}/records/search", body)
    assert r.status_code == 422 and reason in r.json()["detail"], r.text


# ------------------------------------------------------------------------------------------------ user order
def test_order_without_sort_is_per_user_and_stable(server):
    everyone = [f"s{k}" for k in range(20)]
    assert server.search("owner", {}, ds="sim", limit=20) == (20, everyone)  # no user: insertion order
    first = server.search("ann1", {}, ds="sim", limit=20)[1]
    assert server.search("ann1", {}, ds="sim", limit=20)[1] == first and sorted(first) == sorted(everyone)
    pages = [server.search("ann1", {}, ds="sim", offset=o, limit=7)[1] for o in (0, 7, 14)]
    assert [i for page in pages for i in page] == first
    second = server.search("ann2", {}, ds="sim", limit=20)[1]
    assert second != first and first != everyone  # 20! orders: equal only by a bug


# ---------------------------------------------------------------------------------------- progress and metrics
def test_dataset_and_user_progress(server):
    progress = server.get("owner", f"/datasets/{server.datasets['main']}/progress")
    assert (progress["total"], progress["completed"], progress["pending"]) == (6, 4, 2)
    ann1 = server.get("ann1", f"/me/datasets/{server.datasets['main']}/metrics")["responses"]
    assert ann1 == {"total": 6, "submitted": 2, "discarded": 1, "draft": 1, "pending": 2}
    ann2 = server.get("ann2", f"/me/datasets/{server.datasets['main']}/metrics")["responses"]
    assert ann2 == {"total": 6, "submitted": 3, "discarded": 0, "draft": 0, "pending": 3}


def test_metadata_metrics(server):
    props = server.get("owner", f"/me/datasets/{server.datasets['main']}/metadata-properties")["items"]
    metrics = {p["name"]: server.get("owner", f"/metadata-properties/{p['id']}/metrics") for p in props}
    assert metrics["source"]["values"] == [
        {"term": "faq", "count": 3}, {"term": "chat", "count": 2}, {"term": "email", "count": 1}]
    assert metrics["source"]["total"] == 6  # values counted, like ES's value_count (r5 has two)
    assert (metrics["n"]["min"], metrics["n"]["max"]) == (1, 10)
    assert (metrics["x"]["min"], metrics["x"]["max"]) == (0.1, 2.5)


# -------------------------------------------------------------------------------------------------- similarity
def vector(by: dict, order: str = "most_similar", **extra) -> dict:
    return {"query": {"vector": {"name": "emb", "order": order, **by}, **extra}}


def test_similar_to_a_record(server):
    s0 = {"record_id": server.ids["sim"]["s0"]}
    hits = server.scored(vector(s0), limit=5)  # s0 itself is left out; distances 17, 34, 37, 51, 54 degrees
    assert [i for i, _ in hits] == ["s1", "s2", "s19", "s3", "s18"]
    assert hits[0][1] == pytest.approx((1 + math.cos(math.radians(17))) / 2)
    least = server.scored(vector(s0, "least_similar"), limit=3)  # 173, 170, 156 degrees
    assert [i for i, _ in least] == ["s11", "s10", "s12"]
    assert least[0][1] == pytest.approx((1 + math.cos(math.radians(173))) / 2)


def test_similarity_with_filter_text_and_value(server):
    s0 = {"record_id": server.ids["sim"]["s0"]}
    even = vector(s0) | where(terms(meta("half"), "even"))
    assert [i for i, _ in server.scored(even, limit=3)] == ["s2", "s18", "s4"]
    text = vector(s0, text={"q": "point 1"})  # s1 and s10..s19
    assert [i for i, _ in server.scored(text, limit=3)] == ["s1", "s19", "s18"]
    up = vector({"value": [0.0, 1.0]})  # 90 degrees: s5 at 85, s6 at 102, s4 at 68
    assert [i for i, _ in server.scored(up, limit=3)] == ["s5", "s6", "s4"]
    total = server.post("owner", f"/datasets/{server.datasets['sim']}/records/search", vector(s0), limit=5)
    assert total.json()["total"] == 5
