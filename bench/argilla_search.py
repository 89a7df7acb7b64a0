"""Latency of the UI's record searches on the embedded Argilla server as datasets grow (issue 4: < 100 ms at 10k).

    python bench/argilla_search.py --sizes 1000,10000 [--repeats 20] [--home DIR | --url URL] [--out F] [--label L]

Starts an EmbeddedServer in a temporary home (or uses a running one's --home, or --url with the owner's key in
$ARGILLA_API_KEY: keys never go on the command line), creates one ranking dataset per size (prompt/response_1/
response_2, the ranking question, terms metadata and an integer "words" metadata; annotator A has ranked 30% of the
records, B 20%), then times, as annotator A over HTTP, the queries the web UI sends (copied from its
RecordRepository.getRecordsByAdvanceSearch: POST /api/v1/me/datasets/{id}/records/search?include=responses&
include=suggestions with a response-status and a record-status filter). Wall time is what the UI waits; the server's
CPU time per call (local servers only) is the part that does not depend on how busy a shared machine is. Datasets of
an earlier run on the same server are reused, so a before/after comparison restarts the server on the same home
with the other engine and times the same data. Prints a Markdown table and writes machine, versions, command and
timings as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import secrets
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VOCAB = ("router reset roaming bill plan data limit signal tower outage refund invoice sim card pin puk modem fibre "
         "speed upgrade contract cancel fee charge abroad europe call text voicemail number port transfer account "
         "password login app update network coverage antenna wifi ethernet cable install technician appointment "
         "delivery order tracking payment direct debit credit balance top-up bundle minutes gigabytes").split()
SOURCES = ("faq", "chat", "email", "forum")
BATCH = 500  # the bulk endpoint's maximum items per request (RecordsBulkCreate)
PENDING = [{"type": "terms", "scope": {"entity": "response", "property": "status"}, "values": ["pending"]},
           {"type": "terms", "scope": {"entity": "record", "property": "status"}, "values": ["pending"]}]


@dataclass
class BenchConfig:
    """What to measure and where."""

    sizes: list[int] = field(default_factory=lambda: [1000, 10000])  # records per dataset, one dataset each
    repeats: int = 20  # timed calls per query (after 2 warm-up calls)
    home: Optional[str] = None  # a running embedded server's home (RLHF_ARGILLA_HOME); its datasets are reused
    url: Optional[str] = None  # or any running server (owner key from $ARGILLA_API_KEY); neither -> a temporary one
    out: str = "bench/results/argilla_search.json"  # where the JSON report goes
    label: str = "rlhf-sql"  # names the engine version measured (e.g. "before" / "after")
    seed: int = 0  # record contents and which records are annotated

    def __post_init__(self) -> None:
        if not self.sizes or any(n < 100 for n in self.sizes):
            raise ValueError(f"sizes: need sizes >= 100, got {self.sizes}")
        if self.repeats < 3:
            raise ValueError(f"repeats: need >= 3 for a p90, got {self.repeats}")
        if self.url and self.home:
            raise ValueError("url: give --url or --home, not both")
        if self.url and not os.environ.get("ARGILLA_API_KEY"):
            raise ValueError("url: set ARGILLA_API_KEY to the owner's key of that server")


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
        user = client.users(name) or rg.User(username=name, password=secrets.token_urlsafe(12), role="annotator",
                                             client=client).create()  # works through its API key only
        if name not in {u.username for u in ws.users}:
            ws.add_user(user)
        out.append({"id": str(user.id), "api_key": rest.get(f"/api/v1/users/{user.id}")["api_key"]})
    return out


def create_dataset(client, rest, size: int, annotators: list[dict], seed: int) -> tuple[str, Optional[float]]:
    """A ranking dataset of ``size`` records (the product's layout + "words"): (id, seconds to load it). One made
    by an earlier run with the same size and seed is reused (load time None), so before/after runs time the same
    data."""
    import argilla as rg

    from feedback.dataset import DatasetSpec, build_settings

    name = f"bench-{size}-{seed}"
    with warnings.catch_warnings():  # the SDK warns when the name is free
        warnings.simplefilter("ignore")
        old = client.datasets(name, workspace="argilla")
    if old is not None:
        if rest.get(f"/api/v1/datasets/{old.id}/progress")["total"] == size:
            return str(old.id), None
        old.delete()
    settings = build_settings(DatasetSpec(name=name, k=2))
    settings.metadata.add(rg.IntegerMetadataProperty(name="words"))
    ds = rg.Dataset(name=name, workspace="argilla", settings=settings, client=client).create()
    rng = random.Random(seed)
    t0 = time.perf_counter()
    for start in range(0, size, BATCH):  # REST, not ds.records.log: the SDK drops ranks (argilla-io/argilla#5712)
        items = [_record(i, rng, annotators) for i in range(start, min(size, start + BATCH))]
        rest.post(f"/api/v1/datasets/{ds.id}/records/bulk", json={"items": items})
    return str(ds.id), time.perf_counter() - t0


# ------------------------------------------------------------------------------------------- the timing
def _cpu_ms(pid: Optional[int]) -> Optional[float]:
    """CPU time (user + system, all threads) the server process has used so far, in ms; None when not local."""
    if not pid:
        return None
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")  # utime, stime (man 5 proc)


def time_query(http, url: str, params: dict, body: dict, repeats: int, server_pid: Optional[int]) -> dict:
    """Wall time per call as the UI sees it (median, p90) and the server's CPU time per call: on a shared machine
    the wall time also counts waiting for a core, the CPU time does not."""
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def versions(status: dict) -> dict:
    import argilla

    from feedback.server_venv import default_venv, venv_python

    probe = [str(venv_python(default_venv())), "-c", "import sqlite3; print(sqlite3.sqlite_version)"]
    return {"argilla_server": status.get("version"), "argilla_sdk": argilla.__version__,
            "python": platform.python_version(), "sqlite_in_server": subprocess.run(
                probe, capture_output=True, text=True, cwd="/", check=False).stdout.strip()}


@contextlib.contextmanager
def server(cfg: BenchConfig):
    """(url, owner key, server pid or None): a running embedded server's home, a URL, or a temporary server."""
    from feedback.server_ctl import EmbeddedServer

    if cfg.url:
        yield cfg.url.rstrip("/"), os.environ["ARGILLA_API_KEY"], None
        return
    if cfg.home:
        srv = EmbeddedServer(home=Path(cfg.home))
        if not srv.running():
            raise SystemExit(f"error: no embedded server running in {cfg.home}")
        yield srv.state()["url"], srv.credentials().api_key, srv.state()["server_pid"]
        return
    with tempfile.TemporaryDirectory(prefix="argilla-bench-") as home:
        srv = EmbeddedServer(home=Path(home))
        creds = srv.start(port=free_port(), redis_port=free_port(), log=lambda m: print(m, file=sys.stderr))
        try:
            yield creds.api_url, creds.api_key, srv.state()["server_pid"]
        finally:
            srv.stop(quiet=True)


def run(cfg: BenchConfig) -> dict:
    import argilla as rg
    import httpx

    from feedback.client import Rest

    report = {"label": cfg.label, "machine": machine(), "command": shlex.join([Path(sys.executable).name, *sys.argv]),
              "results": [], "load_seconds": {}}
    with server(cfg) as (url, key, pid):
        client = rg.Argilla(api_url=url, api_key=key, timeout=300)
        rest = Rest(client)
        report["versions"] = versions(rest.get("/api/v1/status"))
        annotators = create_annotators(client, rest)
        with httpx.Client(headers={"X-Argilla-Api-Key": annotators[0]["api_key"]}, timeout=120) as http:
            for size in cfg.sizes:
                ds_id, load_s = create_dataset(client, rest, size, annotators, cfg.seed)
                report["load_seconds"][str(size)] = load_s and round(load_s, 1)
                print(f"{size} records " + (f"loaded in {load_s:.0f} s" if load_s else "reused"), file=sys.stderr)
                search = f"{url}/api/v1/me/datasets/{ds_id}/records/search"
                for name, (params, body) in ui_queries().items():
                    res = time_query(http, search, params, body, cfg.repeats, pid)
                    report["results"].append({"records": size, "query": name, **res})
                    print(f"  {name}: {res['median_ms']} ms", file=sys.stderr)
    report["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def markdown(report: dict) -> str:
    lines = [f"engine: {report['label']}; {report['machine']['cpu']} ({report['machine']['cores']} cores)", "",
             "| records | query | median ms | p90 ms | server CPU ms | total |", "|---:|---|---:|---:|---:|---:|"]
    keys = ("records", "query", "median_ms", "p90_ms", "server_cpu_ms", "total")
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in report["results"]]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,10000", help="comma-separated record counts (e.g. 1000,10000,50000)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--home", help="a running embedded server's home directory (reuses its bench datasets)")
    p.add_argument("--url", help="a running Argilla server (owner key in $ARGILLA_API_KEY)")
    p.add_argument("--out", default=BenchConfig.out)
    p.add_argument("--label", default=BenchConfig.label)
    a = p.parse_args(argv)
    try:
        cfg = BenchConfig(sizes=[int(s) for s in a.sizes.split(",")], repeats=a.repeats, home=a.home, url=a.url,
                          out=a.out, label=a.label)
    except ValueError as e:
        p.error(str(e))
    report = run(cfg)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
