"""The embedded Argilla server as datasets grow: how long the web UI waits for a record search at 1k, 10k and 50k
records (issue 4's target: < 100 ms at 10k; issue 7), and how fast the benchmark's data goes in.

    .venv/bin/python bench/argilla_search.py --sizes 1000,10000,50000 --before HEAD --before-sizes 10000

Each server version runs in its own child process (``--worker``, bench/common.run_child) that starts an
EmbeddedServer in a temporary home on free ports (or measures a running one: ``--home DIR``, or ``--url URL`` with
the owner's key in $ARGILLA_API_KEY; keys never go on the command line), makes one ranking dataset per size (the
product's layout: prompt/response_1/response_2, the ranking question, terms metadata, plus an integer "words"
metadata; annotator A has ranked 30% of the records, B 20%) and loads it through the bulk REST endpoint, 500
records per request (REST, not ``ds.records.log``: the SDK drops the ranks, argilla-io/argilla#5712). Load: wall
seconds, records/s, and the server process's CPU per record. Search: as annotator A, the queries the web UI sends
(copied from its RecordRepository.getRecordsByAdvanceSearch: POST /api/v1/me/datasets/{id}/records/search?
include=responses&include=suggestions with a response-status and a record-status filter), 2 warm-up calls then
``--repeats`` timed calls each: median and p90 wall time (what the UI waits) and the server's CPU time per call
(read from /proc/PID/stat: on a shared machine the wall time also counts waiting for a core, the CPU time does not;
it can exceed the wall time because SQLite runs in a second thread).

``--before REV``: the same in a second child with ``feedback/server/*.py`` of git revision REV (extracted to a temp
folder whose launcher.py the server runs), so a change to the server code is measured against the old one in the
same results. Datasets of an earlier run on a ``--home`` server are reused (no load time).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, when run as a script
import argilla_report  # noqa: E402  (the README section; imports nothing heavy)
from common import ROOT, run_child, write_results  # noqa: E402

sys.path.insert(0, str(ROOT))  # the feedback package

VOCAB = ("router reset roaming bill plan data limit signal tower outage refund invoice sim card pin puk modem fibre "
         "speed upgrade contract cancel fee charge abroad europe call text voicemail number port transfer account "
         "password login app update network coverage antenna wifi ethernet cable install technician appointment "
         "delivery order tracking payment direct debit credit balance top-up bundle minutes gigabytes").split()
SOURCES = ("faq", "chat", "email", "forum")
BATCH = 500  # the bulk endpoint's maximum items per request (RecordsBulkCreate)
PENDING = [{"type": "terms", "scope": {"entity": "response", "property": "status"}, "values": ["pending"]},
           {"type": "terms", "scope": {"entity": "record", "property": "status"}, "values": ["pending"]}]


def ui_queries() -> dict[str, tuple[dict, dict]]:
    """name -> (query params, body): the UI's queue (focus view: pages of 10; bulk view: up to 100) and its common
    refinements."""
    def body(**extra) -> dict:
        return {"query": extra.pop("query", {}), "filters": {"and": PENDING + extra.pop("filters", [])}, **extra}

    return {
        "pending, limit 1": ({"limit": 1}, body()),
        "pending, limit 10 (the UI's default page)": ({"limit": 10}, body()),
        "pending, limit 50": ({"limit": 50}, body()),
        "pending + text 'router reset', limit 50": ({"limit": 50}, body(query={"text": {"q": "router reset"}})),
        "pending + metadata source=chat, limit 50": ({"limit": 50}, body(filters=[
            {"type": "terms", "scope": {"entity": "metadata", "metadata_property": "source"}, "values": ["chat"]}])),
        "pending, sort metadata words desc, limit 50": ({"limit": 50}, body(sort=[
            {"scope": {"entity": "metadata", "metadata_property": "words"}, "order": "desc"}])),
    }


# --------------------------------------------------------------------------------------------- the data
def _record(i: int, rng: random.Random, annotators: list[dict]) -> dict:
    """One bulk-API record; annotator A ranked it with probability 0.3, B with 0.2."""
    def words(n: int) -> str:
        return " ".join(rng.choice(VOCAB) for _ in range(n))

    item = {"external_id": f"rec-{i}", "fields": {"prompt": words(12), "response_1": words(20),
                                                   "response_2": words(20)},
            "metadata": {"source": rng.choice(SOURCES), "model": "m1", "run": "r0", "words": rng.randint(5, 200)}}
    responses = []
    for user, share in zip(annotators, (0.3, 0.2)):
        if rng.random() < share:
            order = rng.sample(["response_1", "response_2"], 2)
            responses.append({"user_id": user["id"], "status": "submitted", "values": {"ranking": {"value": [
                {"value": v, "rank": r} for r, v in enumerate(order, start=1)]}}})
    if responses:
        item["responses"] = responses
    return item


def create_annotators(client, rest) -> list[dict]:
    """Two annotators in the workspace; returns [{id, api_key}] (keys stay in memory)."""
    import argilla as rg

    ws = client.workspaces("argilla")
    out = []
    for name in ("bench-a", "bench-b"):
        with warnings.catch_warnings():  # the SDK warns when the name is free
            warnings.simplefilter("ignore")
            user = client.users(name) or rg.User(username=name, password=secrets.token_urlsafe(12),
                                                 role="annotator", client=client).create()  # API key only
        if name not in {u.username for u in ws.users}:
            ws.add_user(user)
        out.append({"id": str(user.id), "api_key": rest.get(f"/api/v1/users/{user.id}")["api_key"]})
    return out


def create_dataset(client, rest, size: int, annotators: list[dict], pid: Optional[int]) -> tuple[str, Optional[dict]]:
    """A ranking dataset of ``size`` records: (id, load figures). One made by an earlier run with the same size is
    reused (load figures None), so before/after runs on one ``--home`` time the same data."""
    import argilla as rg

    from feedback.dataset import DatasetSpec, build_settings

    name = f"bench-{size}-0"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = client.datasets(name, workspace="argilla")
    if old is not None:
        if rest.get(f"/api/v1/datasets/{old.id}/progress")["total"] == size:
            return str(old.id), None
        old.delete()
    settings = build_settings(DatasetSpec(name=name, k=2))
    settings.metadata.add(rg.IntegerMetadataProperty(name="words"))
    ds = rg.Dataset(name=name, workspace="argilla", settings=settings, client=client).create()
    rng = random.Random(0)
    items = [_record(i, rng, annotators) for i in range(size)]  # built before the clock starts
    t0, cpu0 = time.perf_counter(), _cpu_ms(pid)
    for start in range(0, size, BATCH):
        rest.post(f"/api/v1/datasets/{ds.id}/records/bulk", json={"items": items[start:start + BATCH]})
    wall = time.perf_counter() - t0
    cpu = None if cpu0 is None else (_cpu_ms(pid) - cpu0) / 1000
    return str(ds.id), {"records": size, "load_s": round(wall, 1), "records_per_s": round(size / wall),
                        "server_cpu_s": cpu and round(cpu, 1),
                        "server_cpu_ms_per_record": cpu and round(cpu / size * 1000, 2)}


# ------------------------------------------------------------------------------------------- the timing
def _cpu_ms(pid: Optional[int]) -> Optional[float]:
    """CPU time (user + system, all threads) the server process has used so far, in ms; None when not local."""
    if not pid:
        return None
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")  # utime, stime (man 5 proc)


def time_query(http, url: str, params: dict, body: dict, repeats: int, server_pid: Optional[int]) -> dict:
    """Wall time per call as the UI sees it (median, p90) and the server's CPU time per call."""
    params = [("include", "responses"), ("include", "suggestions"), ("offset", 0), *params.items()]
    for _ in range(2):  # warm-up: first touch of SQLite pages and of sqlalchemy's statement cache
        http.post(url, params=params, json=body).raise_for_status()
    times, cpu0 = [], _cpu_ms(server_pid)
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = http.post(url, params=params, json=body)
        times.append((time.perf_counter() - t0) * 1000)
        r.raise_for_status()
    cpu = None if cpu0 is None else round((_cpu_ms(server_pid) - cpu0) / repeats, 1)
    return {"median_ms": round(statistics.median(times), 1), "p90_ms": round(statistics.quantiles(times, n=10)[-1], 1),
            "server_cpu_ms": cpu, "calls": repeats, "total": r.json()["total"]}


# ------------------------------------------------------------------------------------------- the worker
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def extract_server_code(rev: str, into: Path) -> str:
    """feedback/server/*.py of git revision ``rev`` into ``into``; returns the revision's short hash."""
    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", rev, "feedback/server/"],
                           capture_output=True, text=True, check=True).stdout.split()
    for name in (n for n in names if n.endswith(".py")):
        code = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{name}"], capture_output=True, check=True)
        (into / Path(name).name).write_bytes(code.stdout)
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], capture_output=True, text=True,
                          check=True).stdout.strip()


@contextlib.contextmanager
def server(home: Optional[str], url: Optional[str], launcher: Optional[Path]):
    """(url, owner key, server pid or None): a running embedded server's home, a URL, or a temporary server."""
    from feedback import server_ctl

    if url:
        yield url.rstrip("/"), os.environ["ARGILLA_API_KEY"], None
        return
    if home:
        srv = server_ctl.EmbeddedServer(home=Path(home))
        if not srv.running():
            raise SystemExit(f"error: no embedded server running in {home}")
        yield srv.state()["url"], srv.credentials().api_key, srv.state()["server_pid"]
        return
    if launcher:
        server_ctl.LAUNCHER = launcher  # what EmbeddedServer runs (its siblings: that revision's engine)
    with tempfile.TemporaryDirectory(prefix="argilla-bench-") as tmp:
        srv = server_ctl.EmbeddedServer(home=Path(tmp))
        creds = srv.start(port=free_port(), redis_port=free_port(), log=lambda m: print(m, file=sys.stderr))
        try:
            yield creds.api_url, creds.api_key, srv.state()["server_pid"]
        finally:
            srv.stop(quiet=True)


def server_versions(status: dict) -> dict:
    from feedback.server_venv import default_venv, venv_python

    probe = [str(venv_python(default_venv())), "-c", "import sqlite3; print(sqlite3.sqlite_version)"]
    return {"argilla_server": status.get("version"), "sqlite_in_server": subprocess.run(
        probe, capture_output=True, text=True, cwd="/", check=False).stdout.strip()}


def worker(a: argparse.Namespace) -> dict:
    """One server version: load every size, time every query; the JSON line run_child reads."""
    import argilla as rg
    import httpx

    from feedback.client import Rest

    out = {"server_code": "working tree", "loads": [], "searches": []}
    with tempfile.TemporaryDirectory(prefix="argilla-code-") as code:
        launcher = None
        if a.server_code:
            out["server_code"] = f"{a.server_code} ({extract_server_code(a.server_code, Path(code))})"
            launcher = Path(code) / "launcher.py"
        with server(a.home, a.url, launcher) as (url, key, pid):
            client = rg.Argilla(api_url=url, api_key=key, timeout=300)
            rest = Rest(client)
            out["server"] = server_versions(rest.get("/api/v1/status"))
            annotators = create_annotators(client, rest)
            with httpx.Client(headers={"X-Argilla-Api-Key": annotators[0]["api_key"]}, timeout=300) as http:
                for size in [int(s) for s in a.sizes.split(",")]:
                    ds_id, load = create_dataset(client, rest, size, annotators, pid)
                    if load:
                        out["loads"].append(load)
                    print(f"[{out['server_code']}] {size} records: {load or 'reused'}", file=sys.stderr)
                    search = f"{url}/api/v1/me/datasets/{ds_id}/records/search"
                    for name, (params, body) in ui_queries().items():
                        res = time_query(http, search, params, body, a.repeats, pid)
                        out["searches"].append({"records": size, "query": name, **res})
                        print(f"  {name}: {res['median_ms']} ms, CPU {res['server_cpu_ms']} ms", file=sys.stderr)
    usage = resource.getrusage(resource.RUSAGE_SELF)  # the bench client alone, not the server it spawned
    out["client_cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)
    return out


# ------------------------------------------------------------------------------------------- the report
def contender(a: argparse.Namespace, sizes: str, rev: Optional[str]) -> dict:
    """A worker child for one server version; its figures plus the child's wall time and peak RSS."""
    argv = [sys.executable, __file__, "--worker", "--sizes", sizes, "--repeats", str(a.repeats)]
    if rev:
        argv += ["--server-code", rev]
    else:
        argv += (["--home", a.home] if a.home else []) + (["--url", a.url] if a.url else [])
    child = run_child(argv, cwd=ROOT)
    return {**child.result, "worker_wall_s": round(child.wall_s, 1), "worker_peak_rss_mib": child.peak_rss_mib}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,10000,50000", help="comma-separated record counts, one dataset each")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per query (after 2 warm-up calls)")
    p.add_argument("--home", help="a running embedded server's home directory (reuses its bench datasets)")
    p.add_argument("--url", help="a running Argilla server (owner key in $ARGILLA_API_KEY)")
    p.add_argument("--before", metavar="REV", help="also measure feedback/server/*.py of this git revision")
    p.add_argument("--before-sizes", default="10000", help="sizes for --before (default 10000)")
    p.add_argument("--out", help="results file (default bench/results/argilla_search.json)")
    p.add_argument("--no-readme", action="store_true", help="do not update bench/README.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--server-code", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    try:
        sizes = [int(s) for s in (a.sizes + "," + a.before_sizes).split(",")]
    except ValueError:
        p.error("sizes: expected comma-separated integers")
    if any(n < 100 for n in sizes) or a.repeats < 3:
        p.error("need sizes >= 100 and --repeats >= 3 (for a p90)")
    if a.url and a.home or a.url and not os.environ.get("ARGILLA_API_KEY"):
        p.error("--url needs $ARGILLA_API_KEY (the owner's key) and excludes --home")
    if a.worker:
        print(json.dumps(worker(a)))
        return 0
    results = {"repeats": a.repeats, "after": contender(a, a.sizes, None)}
    if a.before:
        results["before"] = contender(a, a.before_sizes, a.before)
    notes = ["after: feedback/server/*.py of the working tree at git_commit; before: of git revision --before",
             "server_cpu_*: CPU time of the argilla server process (/proc/PID/stat), all threads",
             f"machine load average at the end: {[round(x, 2) for x in os.getloadavg()]}"]
    out = write_results("argilla_search", results, packages=("argilla", "httpx"), notes=notes,
                        out=Path(a.out) if a.out else None)
    return argilla_report.main(["--results", str(out)] + (["--no-readme"] if a.no_readme else []))


if __name__ == "__main__":
    sys.exit(main())
