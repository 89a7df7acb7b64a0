"""What every benchmark shares: the machine, versions and command that produced a figure, child processes measured
on their own (peak RSS, CPU seconds, wall seconds), the JSON report and its table in bench/README.md.

Why child processes: peak RSS is a high-water mark, so two contenders measured in one process would share it; and a
benchmark's import of torch must not count against the peer it is compared with. CPU seconds come from ``os.wait4``
(the child's own rusage). Peak RSS does not: Linux folds the pre-exec address space into the child's ru_maxrss
(``exec_mmap`` -> ``setmax_mm_hiwater_rss`` on the forked copy of the parent), so a child started from a big
process (pytest after the torch tests: 1.5 GB) reports the parent's size. The child's ``VmHWM`` in /proc (the
high-water mark of its own post-exec address space) is polled instead; ru_maxrss stays the fallback without /proc.

Why CPU seconds next to wall seconds: this project's machines are shared 2-core VMs; a contender's CPU time per item
is what does not depend on the neighbours, and "per core" figures divide by it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
README = BENCH / "README.md"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def gpu() -> dict[str, Any] | None:
    """The CUDA device, when torch is importable and sees one (imported here, not at module import: --help stays fast)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
            "cuda": torch.version.cuda}


def machine(with_gpu: bool = False) -> dict[str, Any]:
    """Where a figure was measured. ``load_avg`` at the start says how busy the (shared) machine was."""
    info: dict[str, Any] = {
        "host": platform.node(), "os": platform.platform(), "cpu": cpu_model(), "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": memory_gib(), "load_avg": [round(x, 2) for x in os.getloadavg()],
    }
    if with_gpu:
        info["gpu"] = gpu()
    return info


def versions(*packages: str) -> dict[str, str | None]:
    """Installed versions of the named distributions (None when missing) plus Python's."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def command() -> str:
    """The command line that ran this benchmark, as one would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_s = str(script.relative_to(ROOT))
    except ValueError:
        script_s = str(script)
    return shlex.join([".venv/bin/python", script_s, *sys.argv[1:]])


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


@dataclass
class ChildRun:
    """One contender, run as its own process."""

    result: Any  # the JSON object the child printed as its last stdout line
    wall_s: float
    cpu_s: float  # user + system CPU seconds of the child (and its own children it waited for)
    peak_rss_mib: float  # the child's maximum resident set size


def thread_env(threads: int) -> dict[str, str]:
    """Environment that holds a child to ``threads`` threads in every pool it may use (OpenMP/MKL under torch and
    NumPy, OpenBLAS under NumPy, the tokenizers' Rayon pool), so contenders compare at the same thread count."""
    n = str(threads)
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "TOKENIZERS_PARALLELISM": "false"}


def run_child(argv: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None,
              timeout: float | None = None) -> ChildRun:
    """Run ``argv``; its stdout's last line must be JSON. stderr passes through (progress stays visible).

    CPU seconds come from ``os.wait4`` on that child alone, peak RSS from its own VmHWM (see the module docstring)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env={**os.environ, **(env or {})}, cwd=cwd, text=True)
    hwm = _HighWaterMark(proc.pid)
    hwm.start()
    deadline = None if timeout is None else start + timeout
    out_chunks = []
    assert proc.stdout is not None
    for line in proc.stdout:  # read as it comes so a chatty child never blocks on a full pipe
        out_chunks.append(line)
        if deadline is not None and time.perf_counter() > deadline:
            proc.kill()
            break
    hwm.finish()  # a last read while the exited child is not yet reaped (VmHWM can still be there) or is gone
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited with {proc.returncode}; last output: {''.join(out_chunks)[-2000:]}")
    lines = [line for line in "".join(out_chunks).splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"{shlex.join(argv)} printed nothing; expected a JSON line")
    try:
        result = json.loads(lines[-1])
    except ValueError as err:
        raise RuntimeError(f"{shlex.join(argv)}: last stdout line is not JSON: {lines[-1][:200]!r}") from err
    peak_kib = hwm.peak_kib if hwm.peak_kib is not None else usage.ru_maxrss  # ru_maxrss is KiB on Linux
    return ChildRun(result=result, wall_s=round(wall, 3), cpu_s=round(usage.ru_utime + usage.ru_stime, 3),
                    peak_rss_mib=round(peak_kib / 1024, 1))


def proc_status_kib(field: str, pid: int | str = "self") -> int | None:
    """A KiB field of /proc/PID/status (VmRSS: resident now, VmHWM: its high-water mark); None when absent (no /proc,
    the process is gone, or a zombie whose memory is already released)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def smaps_rollup_mib(pid: int | str) -> dict[str, float]:
    """Rss, Pss (shared pages divided among the processes mapping them) and their anonymous / file parts, MiB; empty
    when the process is gone."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return {}
    return {line.split(":")[0]: round(int(line.split()[1]) / 1024, 1) for line in lines
            if line.split(":")[0] in ChildMemorySampler.FIELDS}


class ChildMemorySampler(threading.Thread):
    """Peak Pss (and Rss, anonymous memory) of the children this process starts inside the ``with`` block (around
    ``run_child``), sampled from here every ``interval`` s. Children already alive at entry (a server a test session
    or a driver started earlier) are not the measured work and are left out.

    Why Pss beside the RSS peak: transformers 5 memory-maps safetensors on CPU, and a file mapped twice (two
    from_pretrained of one folder) counts twice in RSS but once in Pss, which is what the machine holds until a model
    writes its weights. The kernel keeps a high-water mark for RSS only, so Pss is sampled, and from the parent: the
    page-table walk (~15-20 ms of CPU per GB) is not charged to the measured child. A shorter peak can be missed."""

    FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Anonymous")

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval = interval
        self.peaks: dict[str, float] = {}  # each field's own maximum over every sample of every child
        self.at_peak_pss: dict[str, float] = {}  # the one sample with the highest Pss, all its fields
        self._done = threading.Event()
        self._before: set[str] = set()

    @staticmethod
    def children() -> list[str]:
        return [pid for task in Path("/proc/self/task").glob("*/children") for pid in task.read_text().split()]

    def run(self) -> None:
        while True:
            for pid in self.children():
                if pid in self._before:
                    continue
                sample = smaps_rollup_mib(pid)
                for key, value in sample.items():
                    self.peaks[key] = max(self.peaks.get(key, 0.0), value)
                if sample.get("Pss", 0.0) > self.at_peak_pss.get("Pss", -1.0):
                    self.at_peak_pss = sample
            if self._done.wait(self.interval):
                return

    def __enter__(self) -> ChildMemorySampler:
        self._before = set(self.children())
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self.join()


class _HighWaterMark(threading.Thread):
    """Polls /proc/PID/status VmHWM every 20 ms. VmHWM only grows, so the last read before the child exits is its peak
    up to growth in those last milliseconds (a process about to exit frees memory rather than takes it)."""

    def __init__(self, pid: int, interval: float = 0.02):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_kib: int | None = None
        self._done = threading.Event()

    def read(self) -> None:
        hwm = proc_status_kib("VmHWM", self.pid)
        if hwm is not None:
            self.peak_kib = max(self.peak_kib or 0, hwm)

    def run(self) -> None:
        while not self._done.is_set():
            self.read()
            self._done.wait(self.interval)

    def finish(self) -> None:
        self._done.set()
        self.join()
        self.read()


def write_results(name: str, results: Any, packages: tuple[str, ...] = (), with_gpu: bool = False,
                  notes: list[str] | None = None, out: Path | None = None) -> Path:
    """bench/results/<name>.json: the figures plus what produced them (machine, versions, command, commit, date)."""
    payload = {
        "benchmark": name,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command(),
        "git_commit": git_commit(),
        "machine": machine(with_gpu=with_gpu),
        "versions": versions("torch", *packages),
        "results": results,
        "notes": notes or [],
    }
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return path


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """``columns`` = [(key, header)]; numbers right-aligned, floats to 3 significant figures past the point."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return "" if value is None else str(value)

    header = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "|" + "|".join("---:" if any(isinstance(r.get(k), (int, float)) for r in rows) else "---"
                          for k, _ in columns) + "|"
    body = ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([header, rule, *body])


def provenance_line(payload: dict[str, Any]) -> str:
    """One line naming machine, versions and command, to sit under a table in bench/README.md."""
    m = payload["machine"]
    where = f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, load {m['load_avg'][0]}"
    if m.get("gpu"):
        where = f"{m['gpu']['name']} ({m['gpu']['memory_gib']} GiB); host {where}"
    vers = ", ".join(f"{k} {v}" for k, v in payload["versions"].items() if v)
    return (f"Measured {payload['date']} at commit {payload['git_commit']} on {where}; {vers}. "
            f"Command: `{payload['command']}`")


def update_readme(section: str, markdown: str, readme: Path = README) -> None:
    """Replace the block between ``<!-- bench:SECTION -->`` and ``<!-- /bench:SECTION -->`` in bench/README.md
    (appended at the end when missing), so each benchmark refreshes its own table and leaves the prose alone."""
    start, end = f"<!-- bench:{section} -->", f"<!-- /bench:{section} -->"
    text = readme.read_text(encoding="utf-8") if readme.exists() else "# Benchmarks\n"
    block = f"{start}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    readme.write_text(text, encoding="utf-8")
