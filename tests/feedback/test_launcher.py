"""The launcher's speed-ups of argilla-server 2.8's bulk record path (feedback/server/launcher.py) change nothing a
client sees: the same settings objects, the same 422s, the same stored records.

``_settings_adapters_built_once``: argilla-server built a pydantic TypeAdapter on every read of a question's or
metadata property's ``parsed_settings`` (once per metadata value of every record, once per question of every
response), half of the server's CPU in a bulk insert (bench/argilla_search.py). Checked in the server venv itself
(nothing in the main venv imports argilla_server) and through the session's real server (conftest).
"""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest

RANKING_VALUES = ["response_1", "response_2"]

# Run with the server venv's Python: parsed_settings of each kind of settings, with argilla-server's own property
# and then with the launcher's, and how many TypeAdapters the patched properties build.
_IN_SERVER_VENV = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import launcher
from argilla_server.models import database

QUESTIONS = [
    {"type": "ranking", "options": [{"value": "a", "text": "A"}, {"value": "b", "text": "B"}]},
    {"type": "rating", "options": [{"value": 1}, {"value": 2}, {"value": 3}]},
    {"type": "label_selection", "options": [{"value": "yes", "text": "Yes"}, {"value": "no", "text": "No"}]},
    {"type": "text", "use_markdown": True},
]
METADATA = [{"type": "terms", "values": ["faq", "chat"]}, {"type": "integer", "min": 0, "max": 10},
            {"type": "float", "min": None, "max": 1.5}]
BROKEN = [(database.Question, {"type": "rating", "options": "not a list"}), (database.MetadataProperty, {"type": "?"})]


def parsed():
    out = [repr(database.Question(settings=s).parsed_settings) for s in QUESTIONS]
    out += [repr(database.MetadataProperty(settings=s).parsed_settings) for s in METADATA]
    for model, settings in BROKEN:  # invalid settings still raise pydantic's error
        try:
            model(settings=settings).parsed_settings
            out.append("no error")
        except Exception as e:
            out.append(type(e).__name__)
    return out


stock = parsed()
launcher._settings_adapters_built_once()
built, TypeAdapter = [], database.TypeAdapter
database.TypeAdapter = lambda *args, **kwargs: built.append(args) or TypeAdapter(*args, **kwargs)
patched = [parsed() for _ in range(3)]
print(json.dumps({"stock": stock, "patched": patched, "adapters_built": len(built)}))
"""


def test_settings_adapters_are_built_once_and_parse_the_same():
    from feedback.server_venv import LAUNCHER, default_venv, install, venv_python

    install(default_venv())  # a no-op when the pinned venv is there (the session's server needs it anyway)
    run = subprocess.run([str(venv_python(default_venv())), "-c", _IN_SERVER_VENV, str(LAUNCHER.parent)],
                         capture_output=True, text=True, cwd="/", check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["stock"][-2:] == ["ValidationError", "ValidationError"]
    assert "RankingQuestionSettings" in got["stock"][0] and "IntegerMetadataPropertySettings" in got["stock"][5]
    assert all(p == got["stock"] for p in got["patched"])  # the same objects, the same errors
    assert got["adapters_built"] == 0  # 27 reads of parsed_settings, no new adapter


@pytest.fixture(scope="module")
def bulk(argilla_server, client):
    """A ranking dataset with terms metadata limited to two values and an integer in 0..10; returns a function
    that POSTs a bulk of records and gives the response, and the owner's user id."""
    import argilla as rg

    _, creds = argilla_server
    settings = rg.Settings(
        fields=[rg.TextField(name="prompt"), *(rg.TextField(name=v) for v in RANKING_VALUES)],
        questions=[rg.RankingQuestion(name="ranking", values=RANKING_VALUES)],
        metadata=[rg.TermsMetadataProperty(name="source", options=["faq", "chat"]),
                  rg.IntegerMetadataProperty(name="words", min=0, max=10)],
    )
    ds = rg.Dataset(name="launcher-bulk", workspace="argilla", settings=settings, client=client).create()
    http = httpx.Client(base_url=creds.api_url, headers={"X-Argilla-Api-Key": creds.api_key})
    owner = http.get("/api/v1/me").json()["id"]

    def post(*items):
        return http.post(f"/api/v1/datasets/{ds.id}/records/bulk", json={"items": list(items)})

    yield post, owner, ds
    http.close()


def _item(i: int, metadata: dict, responses: list | None = None) -> dict:
    item = {"external_id": f"b{i}", "fields": {"prompt": f"q{i}", "response_1": "yes", "response_2": "no"},
            "metadata": metadata}
    return {**item, "responses": responses} if responses else item


def _ranking(user: str, order: list[str]) -> dict:
    return {"user_id": user, "status": "submitted",
            "values": {"ranking": {"value": [{"value": v, "rank": r} for r, v in enumerate(order, start=1)]}}}


@pytest.mark.parametrize("metadata, responses, reason", [
    ({"source": "email"}, None, "'source' metadata property validation failed because 'email' is not an allowed"),
    ({"words": 11}, None, "'words' metadata property validation failed because '11' is greater than the maximum"),
    ({"words": "many"}, None, "'words' metadata property validation failed"),
    ({"source": "faq"}, ["response_1", "response_3"], "record does not have valid responses"),
])
def test_bulk_still_rejects_what_the_settings_forbid(bulk, metadata, responses, reason):
    post, owner, _ = bulk
    r = post(_item(90, {"source": "faq"}), _item(91, metadata, responses and [_ranking(owner, responses)]))
    assert r.status_code == 422, r.text
    assert reason in r.text
    assert "Record at position 1" in r.text  # the whole bulk is refused, naming the bad record


def test_bulk_stores_valid_records_with_their_responses(bulk):
    post, owner, ds = bulk
    items = [_item(i, {"source": ("faq", "chat")[i % 2], "words": i}, [_ranking(owner, RANKING_VALUES[::-1])]
                   if i % 3 == 0 else None) for i in range(10)]
    r = post(*items)
    assert r.status_code == 201, r.text
    assert ds.progress() == {"total": 10, "completed": 4, "pending": 6}  # min_submitted 1: records 0, 3, 6, 9
    stored = {rec.metadata["words"]: rec for rec in ds.records(with_responses=True)}
    assert sorted(stored) == list(range(10))
    assert stored[3].metadata["source"] == "chat" and len(stored[3].responses) == 1 and not stored[4].responses
