"""Run argilla_server's own CLI with our SQL-backed search engine registered, plus two small commands of ours.

Usage (with the server venv's python): ``python launcher.py COMMAND [ARGS] [++ COMMAND [ARGS] ...]``

* ``database migrate``, ``start ...``, ``worker ...``: argilla_server's CLI. Importing ``engine`` (next to this file)
  registers our engine under the name "rlhf-sql", which ARGILLA_SEARCH_ENGINE selects. ``start`` also patches three
  things of argilla-server 2.8 in its process: the membership check is asked once per request
  (``_remember_membership``), the record endpoint shows an annotator only their own response
  (``_own_responses_only``), and bulk upserts build no webhook events when no webhook is enabled
  (``_no_events_without_webhooks``). Every argilla_server command builds the pydantic validators of question and
  metadata settings once, not once per record (``_settings_adapters_built_once``).
* ``owner [--rotate]``: make sure the owner user exists with the credentials given as a JSON object on stdin
  (username, password, api_key, workspace); ``--rotate`` also sets a new password and API key on an existing owner
  (owner.json was lost but the database kept).
* ``alembic-head``: print the head revision of argilla_server's migrations (recorded in the venv's install marker,
  so a start can skip the migration when the database is already there).

Several commands can run in one process (saves the ~4 s import each): separate them with ``++``.

Secrets come on stdin, never in argv, which ``ps`` shows to every local user; argilla_server's own
``database users create`` wants them as options and echoes the API key, so we do not use it. Nothing here prints
a password or a key (the output goes to setup.log).
"""

import asyncio
import functools
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def alembic_head() -> int:
    # find_spec, not import: argilla_server/__init__ imports the whole web app (~4 s)
    import importlib.util

    from alembic.config import Config
    from alembic.script import ScriptDirectory

    ini = os.path.join(os.path.dirname(importlib.util.find_spec("argilla_server").origin), "alembic.ini")
    print(ScriptDirectory.from_config(Config(ini)).get_current_head())
    return 0


async def _ensure_owner(spec: dict, rotate: bool) -> str:
    from argilla_server.cli.database.users.utils import get_or_new_workspace
    from argilla_server.contexts import accounts
    from argilla_server.database import AsyncSessionLocal, async_engine
    from argilla_server.models import User, UserRole

    try:
        async with AsyncSessionLocal() as db:
            user = await accounts.get_user_by_username(db, spec["username"])
            if user is None:
                await User.create(
                    db, first_name="Owner", username=spec["username"], role=UserRole.owner,
                    password_hash=accounts.hash_password(spec["password"]), api_key=spec["api_key"],
                    workspaces=[await get_or_new_workspace(db, spec["workspace"])])
                return "created"
            if not rotate:
                return "exists, kept"
            await accounts.update_user(db, user, {"password": spec["password"], "api_key": spec["api_key"],
                                                  "role": UserRole.owner})
            return "new password and API key"
    finally:
        # the pool's aiosqlite connections belong to this event loop; a later command in this process has its own
        await async_engine.dispose()


def owner(args: list[str]) -> int:
    spec = json.load(sys.stdin)
    missing = [k for k in ("username", "password", "api_key", "workspace") if not spec.get(k)]
    if missing:
        print(f"error in owner: stdin JSON lacks {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        outcome = asyncio.run(_ensure_owner(spec, rotate="--rotate" in args))
    except Exception as e:
        # SQLAlchemy quotes the statement's parameters (the new key) on the lines after the first
        line = str(e).splitlines()[0] if str(e) else ""
        for secret in (spec["password"], spec["api_key"]):
            line = line.replace(secret, "***")
        print(f"error in owner: {type(e).__name__}: {line}", file=sys.stderr)
        return 1
    print(f"owner user {spec['username']!r}: {outcome}")
    return 0


def _remember_membership() -> None:
    """One membership query per request instead of one per metadata key per record: argilla-server 2.8 asks
    User.is_member for every metadata key of every record an annotator's search returns (RecordPolicy.get_metadata ->
    MetadataPropertyPolicy.get -> User.is_member), 200 SQL queries for a page of 50 records with 4 keys. The User
    object lives for one request (get_current_user loads it in the request's session), so the answer is kept on it.
    Measured (bench/argilla_search.py, 10k records): an annotator's search 112 -> 51 ms at limit 10, 195 -> 71 ms at
    limit 50."""
    from argilla_server.models import User

    ask = User.is_member

    async def is_member(self, workspace_id):
        known = self.__dict__.setdefault("_rlhf_is_member", {})
        if workspace_id not in known:
            known[workspace_id] = await ask(self, workspace_id)
        return known[workspace_id]

    User.is_member = is_member


def _no_events_without_webhooks() -> None:
    """Bulk record upserts skip building webhook events when no webhook is enabled.

    argilla-server 2.8 builds a webhook event for every record a bulk request creates or updates (reloads the dataset
    with five relationships, serialises the record) and only then finds that no webhook listens: ~7 SQL queries and a
    pydantic dump per record, which made `rlhf feedback push` ingest ~20 records/s. Whether any webhook is enabled is
    asked once per database session (one request: a bulk of up to 500 records), not once per record (that query was
    5% of a bulk insert's CPU); with webhooks configured, events are built and sent exactly as before."""
    from argilla_server.bulk import records_bulk
    from argilla_server.contexts import webhooks

    original = records_bulk.notify_record_event_v1

    @functools.wraps(original)
    async def notify_record_event(db, record_event, record):
        enabled = db.info.get("rlhf_webhooks_enabled")
        if enabled is None:
            enabled = db.info["rlhf_webhooks_enabled"] = bool(await webhooks.list_enabled_webhooks(db))
        if not enabled:
            return []
        return await original(db, record_event, record)

    records_bulk.notify_record_event_v1 = notify_record_event


def _settings_adapters_built_once() -> None:
    """Question.parsed_settings and MetadataProperty.parsed_settings validate with one pydantic TypeAdapter each,
    built once per process instead of on every access.

    argilla-server 2.8 builds ``TypeAdapter(QuestionSettings)`` / ``TypeAdapter(MetadataPropertySettings)`` (a core
    schema for the whole discriminated union: 1.5 / 0.5 ms of CPU, where validating with it takes 4 us) every time
    the property is read, and a bulk insert reads it once per metadata value of every record
    (RecordValidatorBase._validate_metadata) and once per question of every response
    (ResponseValidator._validate_values). py-spy on bench/argilla_search.py's bulk loads: half of the server's CPU
    was building those adapters. An adapter holds no state between calls, so the settings objects and the 422s are
    the same (tests/feedback/test_launcher.py)."""
    from pydantic import TypeAdapter

    from argilla_server.models import database

    for model, settings_type in ((database.Question, database.QuestionSettings),
                                 (database.MetadataProperty, database.MetadataPropertySettings)):
        adapter = TypeAdapter(settings_type)
        model.parsed_settings = property(lambda self, _adapter=adapter: _adapter.validate_python(self.settings),
                                         doc=model.parsed_settings.__doc__)


def _own_responses_only() -> None:
    """GET /api/v1/records/{id} shows an annotator only their own response and the metadata they may see.

    argilla-server 2.8 (pinned; upstream is feature-frozen) returns that record with every response on it and all its
    metadata to any member of the workspace, so an annotator calling the REST API could read colleagues' rankings
    before giving their own, which defeats independent judgements and the agreement measured on them. Argilla's
    own /me/ search, which the web UI works in, already loads only the user's response and drops the metadata
    properties not visible to annotators; this gives the record endpoint the same view. Owners and admins (who may
    list every response anyway) get the handler's answer unchanged. The other endpoints that return records with
    responses (dataset record listings and the all-responses search) are for owners and admins only.

    FastAPI built the route from the handler's signature when argilla_server was imported; the handler is looked up
    as ``dependant.call`` at each request, so swapping that keeps the route's parameters, dependencies and schema."""
    from argilla_server.api.handlers.v1 import records as handlers
    from argilla_server.api.handlers.v1.datasets.records import _filter_record_metadata_for_user
    from argilla_server.api.routes import api_v1
    from argilla_server.api.schemas.v1.records import Record as RecordSchema

    original = handlers.get_record

    @functools.wraps(original)
    async def get_record(*, current_user, **kwargs):
        record = await original(current_user=current_user, **kwargs)  # authorises, loads the responses
        if not current_user.is_annotator:
            return record
        shown = RecordSchema.model_validate(record)  # a copy: the ORM record stays as loaded
        shown.responses = [r for r in shown.responses or [] if r.user_id == current_user.id]
        await record.dataset.awaitable_attrs.metadata_properties  # the filter reads them; no lazy IO under asyncio
        shown.metadata = await _filter_record_metadata_for_user(record, current_user)
        return shown

    routes = [r for r in api_v1.routes if getattr(r, "endpoint", None) is original]
    if len(routes) != 1:  # a changed argilla-server must not start silently without the fix
        raise RuntimeError(f"found {len(routes)} routes for argilla_server's get_record, expected 1")
    routes[0].endpoint = routes[0].dependant.call = get_record


def argilla_cli(args: list[str]) -> int:
    sys.path.insert(0, HERE)
    import engine  # noqa: F401  (registers the engine)
    from argilla_server.cli.__main__ import app  # imports argilla_server, which builds the web app

    _settings_adapters_built_once()  # the rq worker validates records too (datasets imported from the Hub)
    if args[:1] == ["start"]:  # the web server's process (the worker serves no requests)
        _remember_membership()
        _own_responses_only()
        _no_events_without_webhooks()
    try:
        app(args=args, prog_name="argilla_server", standalone_mode=False)
    except SystemExit as e:
        if e.code not in (0, None):
            return e.code if isinstance(e.code, int) else 1
    return 0


COMMANDS = {"owner": owner, "alembic-head": lambda args: alembic_head()}


def main(argv: list[str]) -> int:
    commands, current = [], []
    for arg in argv:
        if arg == "++":
            commands.append(current)
            current = []
        else:
            current.append(arg)
    commands.append(current)
    for args in commands:
        run = COMMANDS.get(args[0]) if args else None
        try:
            code = run(args[1:]) if run else argilla_cli(args)
        except Exception as e:  # click usage errors, failures inside a command
            print(f"error in {' '.join(args[:3])}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
