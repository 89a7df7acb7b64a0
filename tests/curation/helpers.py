"""Shared by the step tests: run one step over records with a list as its rejects sink."""

from __future__ import annotations


def run_step(step, records=(), base=None, on_error="fail"):
    """``(kept, [(record, reason), ...])`` of ``step`` over ``records``. A step that does not create records must
    account for every input: kept + dropped == read."""
    if base is not None:
        step.base_dir = base
    step.on_error = on_error
    records = list(records)
    rejects = []
    step._sink = lambda record, label, reason: rejects.append((record, reason))
    kept = list(step.run(records))
    if not step.creates:
        assert len(kept) + len(rejects) == len(records)
    return kept, rejects
