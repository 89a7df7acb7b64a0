"""Runs a list of steps over a stream of records and keeps the books.

Every step is wrapped so that what goes in and comes out is counted; drops are counted by the step itself. A step that
is not allowed to create records (``creates = False``) must satisfy ``in == out + dropped``: a step that loses records
silently is a bug, and :meth:`Ledger.check` says which one. Over the whole run:
``created (read by readers + made by expanding steps) == kept + dropped``.

With ``num_proc > 1`` each run of consecutive per-record steps goes through ``datasets.Dataset.map(num_proc=N)``:
records travel as JSON strings in one Arrow column (so heterogeneous records need no common schema), and the workers
send back kept records, drops and their counters as rows, which this process folds into the same ledger. The Arrow
files live on disk, so memory stays flat for inputs larger than RAM.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from curation.records import Record
from curation.steps import CurationError, Reader, RejectSink, Step


@dataclass
class StepReport:
    label: str
    type: str
    creates: bool
    reader: bool = False
    n_in: int = 0
    n_out: int = 0
    drops: Counter = field(default_factory=Counter)
    counters: Counter = field(default_factory=Counter)

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())

    @property
    def created(self) -> int:
        """Records this step added to the stream (reads for a reader, chunks or pairs for an expanding step)."""
        return self.n_out - self.n_in + self.dropped

    def as_dict(self) -> dict:
        return {"step": self.label, "type": self.type, "in": self.n_in, "out": self.n_out, "created": self.created,
                "dropped": dict(self.drops), "counters": dict(self.counters)}


@dataclass
class Ledger:
    steps: list[StepReport]

    @property
    def read(self) -> int:
        return sum(r.created for r in self.steps if r.reader)

    @property
    def created(self) -> int:
        return sum(r.created for r in self.steps)

    @property
    def dropped(self) -> int:
        return sum(r.dropped for r in self.steps)

    @property
    def kept(self) -> int:
        return self.steps[-1].n_out if self.steps else 0

    def drops_by_reason(self) -> Counter:
        total: Counter = Counter()
        for r in self.steps:
            for reason, n in r.drops.items():
                total[f"{r.label}:{reason}"] += n
        return total

    def check(self) -> None:
        """Counts reconcile, or the run fails loudly naming the step that lost records."""
        for r in self.steps:
            if not r.creates and r.created != 0:
                raise RuntimeError(f"step {r.label!r} took {r.n_in} records, kept {r.n_out} and dropped {r.dropped}: "
                                   f"{abs(r.created)} records unaccounted for")
        if self.created != self.kept + self.dropped:
            raise RuntimeError(f"counts do not reconcile: created {self.created} != kept {self.kept} + dropped {self.dropped}")

    def as_dict(self) -> dict:
        return {"read": self.read, "created": self.created, "kept": self.kept, "dropped": self.dropped,
                "drops_by_reason": dict(self.drops_by_reason()), "steps": [r.as_dict() for r in self.steps]}


class _Tally:
    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


def _tallied(records: Iterable[Record], tally: _Tally) -> Iterator[Record]:
    for record in records:
        tally.n += 1
        yield record


def _chain(steps: list[Step], records: Iterable[Record], tallies: list[tuple[_Tally, _Tally]]) -> Iterator[Record]:
    stream: Iterable[Record] = records
    for step, (t_in, t_out) in zip(steps, tallies):
        stream = _tallied(step.run(_tallied(stream, t_in)), t_out)
    return iter(stream)


def _segments(steps: list[Step], num_proc: int) -> list[tuple[bool, list[Step]]]:
    """Split the step list into runs: (True, steps) for runs that may go to workers, (False, steps) for the rest."""
    out: list[tuple[bool, list[Step]]] = []
    for step in steps:
        parallel = num_proc > 1 and step.per_record
        if out and out[-1][0] == parallel:
            out[-1][1].append(step)
        else:
            out.append((parallel, [step]))
    return out


def _work_batch(batch: dict, steps: list[Step]) -> dict:
    """Runs in a worker: the steps over one batch; returns kept records, drops and counters as rows."""
    rows_kind: list[str] = []
    rows_payload: list[str] = []

    def sink(record: Record, label: str, reason: str) -> None:
        rows_kind.append("drop")
        rows_payload.append(json.dumps({"step": label, "reason": reason, "record": record}, ensure_ascii=False))

    for step in steps:
        step.reset_stats()
        step._sink = sink
    tallies = [(_Tally(), _Tally()) for _ in steps]
    for record in _chain(steps, (json.loads(p) for p in batch["payload"]), tallies):
        rows_kind.append("keep")
        rows_payload.append(json.dumps(record, ensure_ascii=False))
    stats = [{"in": t_in.n, "out": t_out.n, "drops": dict(s.drops), "counters": dict(s.counters)}
             for s, (t_in, t_out) in zip(steps, tallies)]
    rows_kind.append("stats")
    rows_payload.append(json.dumps(stats))
    return {"kind": rows_kind, "payload": rows_payload}


class Pipeline:
    """A list of steps, a rejects sink, and the ledger that reconciles them."""

    def __init__(self, steps: list[Step], sink: RejectSink | None = None, num_proc: int = 1,
                 workdir: Path | None = None, batch_size: int = 1000):
        if not steps:
            raise CurationError("the recipe has no steps")
        self.steps = steps
        self.num_proc = max(1, int(num_proc))
        self.workdir = workdir
        self.batch_size = batch_size
        self.sink = sink
        self.reports: list[StepReport] = []
        for i, step in enumerate(steps):
            step.label = step.label or f"{i:02d}_{step.type_name}"
            step._sink = self._sink
            self.reports.append(StepReport(step.label, step.type_name, step.creates, isinstance(step, Reader)))

    @property
    def ledger(self) -> Ledger:
        for step, report in zip(self.steps, self.reports):
            if self.num_proc == 1 or not step.per_record:
                report.drops, report.counters = Counter(step.drops), Counter(step.counters)
        return Ledger(self.reports)

    def _sink(self, record: Record, label: str, reason: str) -> None:
        if self.sink is not None:
            self.sink(record, label, reason)

    def run(self, records: Iterable[Record] = ()) -> Iterator[Record]:
        """The kept records, streamed; the ledger is complete once the iterator is exhausted."""
        stream: Iterable[Record] = records
        offset = 0
        for parallel, steps in _segments(self.steps, self.num_proc):
            reports = self.reports[offset:offset + len(steps)]
            offset += len(steps)
            stream = self._parallel(steps, reports, stream) if parallel else self._serial(steps, reports, stream)
        return iter(stream)

    def _serial(self, steps: list[Step], reports: list[StepReport], stream: Iterable[Record]) -> Iterator[Record]:
        tallies = [(_Tally(), _Tally()) for _ in steps]
        try:
            yield from _chain(steps, stream, tallies)
        finally:
            for report, (t_in, t_out) in zip(reports, tallies):
                report.n_in, report.n_out = t_in.n, t_out.n

    def _parallel(self, steps: list[Step], reports: list[StepReport], stream: Iterable[Record]) -> Iterator[Record]:
        import datasets  # lazy: heavy import, only needed with --num-proc

        with tempfile.TemporaryDirectory(dir=self.workdir, prefix="curate-") as tmp:
            spool = Path(tmp) / "in.jsonl"
            with spool.open("w", encoding="utf-8") as f:
                for record in stream:
                    f.write(json.dumps({"payload": json.dumps(record, ensure_ascii=False)}, ensure_ascii=False) + "\n")
            if spool.stat().st_size == 0:
                return
            ds = datasets.load_dataset("json", data_files=str(spool), split="train", cache_dir=str(Path(tmp) / "cache"))
            out = ds.map(_work_batch, batched=True, batch_size=self.batch_size, num_proc=min(self.num_proc, len(ds)),
                         fn_kwargs={"steps": steps}, remove_columns=ds.column_names,
                         new_fingerprint=uuid.uuid4().hex, desc=f"{steps[0].label}..{steps[-1].label}")
            for row in out:
                if row["kind"] == "keep":
                    yield json.loads(row["payload"])
                elif row["kind"] == "drop":
                    drop = json.loads(row["payload"])
                    self._sink(drop["record"], drop["step"], drop["reason"])
                else:
                    for report, stats in zip(reports, json.loads(row["payload"])):
                        report.n_in += stats["in"]
                        report.n_out += stats["out"]
                        report.drops.update(stats["drops"])
                        report.counters.update(stats["counters"])
