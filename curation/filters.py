"""Generic keep/drop rules on a record's rating and metadata (e.g. only well-rated chats become SFT data)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from curation.records import Record, record_kind
from curation.steps import CurationError, Filter, register


@register("score_range")
@dataclass
class ScoreRange(Filter):
    """Drop records whose ``score`` is outside [min, max]; records without a score pass."""

    min: float | None = None  # lowest score kept (inclusive)
    max: float | None = None  # highest score kept (inclusive)
    kinds: list[str] = field(default_factory=lambda: ["instruction", "prompt_completion"])  # record kinds it applies to

    def __post_init__(self) -> None:
        if self.min is None and self.max is None:
            raise CurationError("score_range: set min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise CurationError(f"score_range: min ({self.min}) is above max ({self.max})")

    def check(self, record: Record) -> str | None:
        score = record.get("score")
        if score is None or record_kind(record) not in self.kinds:
            return None
        if self.min is not None and score < self.min:
            return "score_below_min"
        if self.max is not None and score > self.max:
            return "score_above_max"
        return None


@register("meta_filter")
@dataclass
class MetaFilter(Filter):
    """Drop records whose ``meta[key]`` is one of ``drop_values`` (e.g. escalated chats out of SFT data)."""

    key: str = ""  # the meta key to look at
    drop_values: list[Any] = field(default_factory=list)  # values that drop the record
    kinds: list[str] = field(default_factory=lambda: ["instruction", "prompt_completion"])  # record kinds it applies to

    def __post_init__(self) -> None:
        if not self.key:
            raise CurationError("meta_filter: set `key` to the meta key to test")
        if not self.drop_values:
            raise CurationError("meta_filter: set `drop_values` to the values that drop a record")

    def check(self, record: Record) -> str | None:
        if record_kind(record) not in self.kinds:
            return None
        value = (record.get("meta") or {}).get(self.key)
        return f"{self.key}={value}" if value in self.drop_values else None
