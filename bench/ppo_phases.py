"""Phase clocks for bench/ppo_layout.py: wall and CPU seconds of the rollout and update phases of every PPO
update, and the process's resident memory, measured inside a worker. Standard library only, because it is imported
both by our worker (the project's .venv) and by the TRL worker (its own virtualenv, see bench/ppo_trl.py).

CPU seconds are the process's (``time.process_time``: every thread), so a phase's CPU figure does not depend on how
busy the shared machine was, while its wall figure does.

Memory: the RSS high-water mark (VmHWM) when each phase first ends says which phase reaches the peak; the peak PSS
is sampled from outside, by ``common.ChildMemorySampler`` in the parent (reading it costs ~15 ms of CPU per GB,
which must not be charged to the worker).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from common import proc_status_kib  # stdlib only too; bench/ is on sys.path in both workers (their script's folder)


def rss_mib(field: str = "VmRSS") -> float | None:
    """``VmRSS`` (now) or ``VmHWM`` (peak so far) of this process in MiB."""
    kib = proc_status_kib(field)
    return None if kib is None else round(kib / 1024, 1)


class PhaseClock:
    """Accumulates wall and CPU seconds per named phase. ``start(name)`` closes the running phase (if any) and opens
    ``name``; ``stop()`` closes it. The RSS high-water mark when each phase first ends says where the peak was
    reached (not the RSS before the first phase: memory-mapped weights count only once a forward pass reads them)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.count: dict[str, int] = {}
        self.current: str | None = None
        self._since = (0.0, 0.0)
        self.peak_after_first: dict[str, float | None] = {}  # VmHWM when each phase first ended: where the peak is
        self.born = (time.perf_counter(), time.process_time())

    def start(self, name: str) -> None:
        self.stop()
        self.current, self._since = name, (time.perf_counter(), time.process_time())

    def timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` wrapped so that every call is a ``name`` phase."""
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.start(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stop()

        return wrapper

    def stop(self) -> None:
        if self.current is None:
            return
        wall, cpu = time.perf_counter() - self._since[0], time.process_time() - self._since[1]
        self.wall[self.current] = self.wall.get(self.current, 0.0) + wall
        self.cpu[self.current] = self.cpu.get(self.current, 0.0) + cpu
        self.count[self.current] = self.count.get(self.current, 0) + 1
        self.peak_after_first.setdefault(self.current, rss_mib("VmHWM"))
        self.current = None

    def report(self, episodes: int) -> dict[str, Any]:
        """Totals and per-1k-samples figures for each phase (``episodes``: prompt/response pairs rolled out)."""
        self.stop()
        out: dict[str, Any] = {"episodes": episodes,
                               "peak_rss_self_mib": rss_mib("VmHWM"),
                               "worker_wall_s": round(time.perf_counter() - self.born[0], 3),
                               "worker_cpu_s": round(time.process_time() - self.born[1], 3)}
        for name in self.wall:
            out[f"{name}_calls"] = self.count[name]
            out[f"{name}_wall_s"] = round(self.wall[name], 3)
            out[f"{name}_cpu_s"] = round(self.cpu[name], 3)
            out[f"peak_rss_after_first_{name}_mib"] = self.peak_after_first[name]
            if episodes:
                out[f"{name}_wall_s_per_1k"] = round(self.wall[name] * 1000 / episodes, 2)
                out[f"{name}_cpu_s_per_1k"] = round(self.cpu[name] * 1000 / episodes, 2)
        return out
