"""The pipeline engine: counting, reconciliation, rejects, and the --num-proc path through datasets."""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import pytest

from curation.pipeline import Pipeline
from curation.records import derive, new_record
from curation.steps import Filter, Mapper, Reader, Step


@dataclass
class Numbers(Reader):
    n: int = 10

    def read(self):
        for i in range(self.n):
            yield new_record("numbers", "mem", i + 1, text=f"record {i}", meta={"i": i})


@dataclass
class DropOdd(Filter):
    def check(self, record):
        return "odd" if record["meta"]["i"] % 2 else None


@dataclass
class Shout(Mapper):
    def apply(self, record):
        self.counters["shouted"] += 1
        return {**record, "text": record["text"].upper()}


@dataclass
class Twice(Step):
    creates = True

    def run(self, records):
        for r in records:
            yield r
            yield derive(r, "copy", text=r["text"] + " again")


@dataclass
class Leaky(Step):
    """A buggy step that loses every third record without saying why."""

    def run(self, records):
        for i, r in enumerate(records):
            if i % 3:
                yield r


def _run(steps, num_proc=1, tmp_path=None):
    rejects = []
    pipe = Pipeline(steps, sink=lambda rec, step, reason: rejects.append((step, reason, rec["id"])),
                    num_proc=num_proc, workdir=tmp_path)
    kept = list(pipe.run())
    return kept, rejects, pipe.ledger


def test_counts_reconcile_and_every_drop_reaches_the_sink():
    kept, rejects, ledger = _run([Numbers(n=10), DropOdd(), Shout(), Twice()])
    ledger.check()
    assert len(kept) == 10  # 5 even records, each twice
    assert [r["text"] for r in kept[:2]] == ["RECORD 0", "RECORD 0 again"]
    assert kept[1]["lineage"]["parent"] == kept[0]["id"]
    assert [reason for _, reason, _ in rejects] == ["odd"] * 5
    assert ledger.read == 10 and ledger.dropped == 5 and ledger.kept == 10
    assert ledger.created == 15 == ledger.kept + ledger.dropped
    drop_report = ledger.steps[1]
    assert (drop_report.n_in, drop_report.n_out, dict(drop_report.drops)) == (10, 5, {"odd": 5})
    assert ledger.steps[2].counters["shouted"] == 5
    assert ledger.drops_by_reason() == {"01_step:odd": 5}


def test_a_step_that_loses_records_silently_is_named():
    kept, _, ledger = _run([Numbers(n=9), Leaky()])
    assert len(kept) == 6
    with pytest.raises(RuntimeError, match=r"01_step.*3 records unaccounted"):
        ledger.check()


def test_parallel_matches_serial(tmp_path):
    serial = _run([Numbers(n=2500), DropOdd(), Shout(), Twice()])
    parallel = _run([Numbers(n=2500), DropOdd(), Shout(), Twice()], num_proc=2, tmp_path=tmp_path)
    assert [r["id"] for r in parallel[0]] == [r["id"] for r in serial[0]]
    assert parallel[0] == serial[0]
    assert sorted(parallel[1]) == sorted(serial[1])
    parallel[2].check()
    assert parallel[2].as_dict() == serial[2].as_dict()
    assert parallel[2].steps[2].counters["shouted"] == 1250


def test_workers_get_options_not_sinks_or_cached_models():
    step = DropOdd()
    step.label = "03_drop"
    step._sink = lambda *a: None
    step.__dict__["_model"] = object()
    step.drop(new_record("x", "mem", 1, text="t"), "why")
    clone = pickle.loads(pickle.dumps(step))
    assert clone.label == "03_drop"
    assert "_model" not in clone.__dict__ and clone._sink is None
    assert clone.drops == {}
