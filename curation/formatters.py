"""Formatting: curated records -> exactly the dataset formats TRL trainers read.

TRL's formats (``trl.data_utils``; https://huggingface.co/docs/trl/dataset_formats):

- conversational language modeling (SFT): ``{"messages": [{"role", "content"}, ...]}``;
- prompt-completion, standard ``{"prompt": str, "completion": str}`` or conversational
  ``{"prompt": [messages], "completion": [{"role": "assistant", ...}]}``;
- conversational preference (DPO, reward modelling): ``{"prompt": [messages ending with a user turn],
  "chosen": [{"role": "assistant", ...}], "rejected": [{"role": "assistant", ...}]}``.

Rows keep our own ``id``/``source``/``lineage``/``meta`` next to TRL's keys; TRL only looks at its own keys. Every
record a step cannot format is dropped with a reason, never reshaped or lost silently.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import xxhash

from curation.records import Record, derive, message, normalize, prompt_text
from curation.steps import CurationError, InputError, Mapper, Step, register

STYLES = ("messages", "prompt_completion", "text_prompt_completion")
_CARRIED = ("split",)  # keys a derived pair inherits from its parent, so splitting before pairing still holds


def _trim_to_last_reply(messages: list[dict]) -> tuple[list[dict], int]:
    """The conversation up to its last assistant turn, and how many turns after it were cut. A trailing user turn
    has no reply to learn from; ``[]`` when there is no assistant turn at all."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    return messages[: last + 1], len(messages) - last - 1


def _conversation(record: Record) -> list[dict] | None:
    """A record's dialogue as messages, whether it is still ``messages`` or already prompt-completion."""
    if "messages" in record:
        return record["messages"]
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):
        return prompt + completion
    if isinstance(prompt, str) and isinstance(completion, str):
        return [message("user", prompt), message("assistant", completion)]
    return None


def _number(record: Record, field: str, value: Any) -> float:
    """A rank or score as a number (CSV gives strings); a bad value stops the run naming the input row and field."""
    if not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if math.isfinite(number):
            return int(number) if number.is_integer() else number
    lineage = record.get("lineage") or {}
    raise InputError(lineage.get("path") or record.get("id"), lineage.get("row"),
                     f"{field}: expected a number, got {value!r}")


def _carried(parent: Record) -> dict:
    return {k: parent[k] for k in _CARRIED if k in parent}


# --------------------------------------------------------------------------------------------- SFT rows


@register("format_instructions")
@dataclass
class FormatInstructions(Step):
    """Conversations (``messages``) -> SFT rows: TRL messages, conversational or plain prompt-completion."""

    # Not a Mapper: the plain-string style must *refuse* a multi-turn conversation (drop with ``multi_turn``) rather
    # than flatten it, so this step keeps or drops like a Filter and reshapes like a Mapper. One row in gives one row
    # out or one drop, so it stays per-record and non-creating (the ledger checks in == out + dropped).
    style: str = "messages"  # messages | prompt_completion (conversational) | text_prompt_completion (plain strings)
    system_prompt: str | None = None  # prepended as a system turn to conversations that have none

    def _with_system_prompt(self, record: Record) -> Record:
        """Preference and ranking prompts get the same system prompt as the SFT conversations: a policy tuned with
        it and then preference-trained without it would learn from prompts it is never served."""
        prompt = record.get("prompt")
        if not self.system_prompt or not isinstance(prompt, list) or any(m["role"] == "system" for m in prompt):
            return record
        self.counters["system_prompt_added"] += 1
        return {**record, "prompt": [message("system", self.system_prompt), *prompt]}

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise CurationError(f"style: expected one of {', '.join(STYLES)}, got {self.style!r}")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise CurationError(f"system_prompt: expected a string, got {self.system_prompt!r}")
        if self.system_prompt and self.style == "text_prompt_completion":
            # A plain-string prompt has no place for a system turn: gluing it onto the prompt text would teach the
            # model a different prompt than the one it will be served with, so refuse the combination up front.
            raise CurationError("system_prompt: plain-string prompts (style text_prompt_completion) cannot carry a "
                                "system prompt; use style prompt_completion or messages")

    def run(self, records: Iterable[Record]) -> Iterator[Record]:
        for record in records:
            if "messages" not in record:  # documents, preference rows, rankings, ready prompt-completion rows
                yield self._with_system_prompt(record)
                continue
            out = self.format(record)
            if isinstance(out, str):
                self.drop(record, out)
            else:
                yield out

    def format(self, record: Record) -> Record | str:
        """The formatted row, or the reason it cannot be formatted."""
        turns, trimmed = _trim_to_last_reply(record["messages"])
        if not turns:
            return "no_assistant_turn"
        if not any(m["role"] == "user" for m in turns[:-1]):
            return "no_user_turn"  # a reply to nothing: TRL cannot render a prompt without a user turn
        if self.style == "text_prompt_completion":
            if sum(m["role"] != "system" for m in turns) > 2:
                return "multi_turn"
            if any(m["role"] == "system" for m in turns):
                return "system_turn"  # see __post_init__: a plain-string prompt cannot carry it
        if self.system_prompt and not any(m["role"] == "system" for m in turns):
            turns = [message("system", self.system_prompt), *turns]
            self.counters["system_prompt_added"] += 1
        self.counters["trailing_user_turns_trimmed"] += trimmed
        out = {k: v for k, v in record.items() if k != "messages"}  # id, source, lineage, meta, score, split...
        if self.style == "messages":
            out["messages"] = turns
        elif self.style == "prompt_completion":
            out["prompt"], out["completion"] = turns[:-1], turns[-1:]
        else:
            out["prompt"], out["completion"] = turns[0]["content"], turns[1]["content"]
        return out


# --------------------------------------------------------------------------------------------- rankings -> pairs


def _all_pairs(levels: Sequence[float]) -> list[tuple[int, int]]:
    return list(combinations(range(len(levels)), 2))


def _best_vs_rest(levels: Sequence[float]) -> list[tuple[int, int]]:
    # Every top-ranked candidate against every other one: when annotators tie two answers for best, both are
    # equally good evidence against the worse ones. Pairs inside the top group are ties and get skipped.
    best = min(levels)
    return [(i, j) for i, j in combinations(range(len(levels)), 2) if best in (levels[i], levels[j])]


def _best_vs_worst(levels: Sequence[float]) -> list[tuple[int, int]]:
    # One pair per prompt: the first top-ranked against the first bottom-ranked (by candidate order). When all are
    # tied the "pair" is a tie and gets skipped like any other.
    if len(levels) < 2:
        return []
    top = levels.index(min(levels))
    bottom = next(i for i, lv in enumerate(levels) if lv == max(levels) and i != top)
    return [(top, bottom)]


STRATEGIES: dict[str, Callable[[Sequence[float]], list[tuple[int, int]]]] = {
    "all_pairs": _all_pairs,
    "best_vs_rest": _best_vs_rest,
    "best_vs_worst": _best_vs_worst,
}


def _levels(record: Record) -> list[float] | None:
    """Each candidate's rank (1 = best): the annotated ranks, else a dense ranking of the scores (highest = 1),
    else None when neither is given for every candidate."""
    candidates = record["candidates"]
    if candidates and all(c.get("rank") is not None for c in candidates):
        return [_number(record, "candidates.rank", c["rank"]) for c in candidates]
    if candidates and all(c.get("score") is not None for c in candidates):
        scores = [_number(record, "candidates.score", c["score"]) for c in candidates]
        dense = {s: r for r, s in enumerate(sorted(set(scores), reverse=True), start=1)}
        return [dense[s] for s in scores]
    return None


def _as_prompt(value: Any) -> list[dict] | None:
    """A prompt as TRL conversational messages ending with a user turn, or None when it cannot be one."""
    if isinstance(value, str) and value.strip():
        return [message("user", value)]
    if isinstance(value, list) and value and value[-1].get("role") == "user":
        return list(value)
    return None


@register("ranked_to_pairs")
@dataclass
class RankedToPairs(Step):
    """Ranked or rated candidates for one prompt -> conversational preference pairs (chosen beats rejected)."""

    creates = True  # one ranking gives several pairs
    strategy: str = "all_pairs"  # all_pairs | best_vs_rest | best_vs_worst: which pairs a ranking gives

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise CurationError(f"strategy: expected one of {', '.join(STRATEGIES)}, got {self.strategy!r}")

    def run(self, records: Iterable[Record]) -> Iterator[Record]:
        for record in records:
            if "candidates" not in record:
                yield record
                continue
            prompt = _as_prompt(record.get("prompt"))
            if prompt is None:
                self.drop(record, "prompt_not_ending_with_user")
                continue
            levels = _levels(record)
            if levels is None:
                self.drop(record, "unranked_candidates")
                continue
            pairs = list(self._pairs(record, prompt, levels))
            if not pairs:
                self.drop(record, "no_pairs")  # fewer than two candidates, or all tied / identical
            self.counters["pairs"] += len(pairs)
            yield from pairs

    def _pairs(self, record: Record, prompt: list[dict], levels: list[float]) -> Iterator[Record]:
        candidates = record["candidates"]
        for i, j in STRATEGIES[self.strategy](levels):
            if levels[i] == levels[j]:
                self.counters["tie_pairs_skipped"] += 1
                continue
            if levels[j] < levels[i]:
                i, j = j, i
            chosen, rejected = candidates[i], candidates[j]
            if chosen["content"].strip() == rejected["content"].strip():
                self.counters["identical_pairs_skipped"] += 1  # no signal, and DPO's loss is 0 on it anyway
                continue
            meta = {**record.get("meta", {}), "chosen_rank": levels[i], "rejected_rank": levels[j]}
            if chosen.get("score") is not None and rejected.get("score") is not None:
                meta.update(chosen_score=chosen["score"], rejected_score=rejected["score"])
            yield derive(record, key=(i, j), prompt=prompt, chosen=[message("assistant", chosen["content"])],
                         rejected=[message("assistant", rejected["content"])], meta=meta, **_carried(record))


# --------------------------------------------------------------------------------------------- ratings -> pairs


@dataclass
class _Rated:
    record: Record
    prompt: list[dict]
    reply: dict
    score: float


@register("ratings_to_pairs")
@dataclass
class RatingsToPairs(Step):
    """Rated conversations answering the same prompt (e.g. support chats with a CSAT score) -> preference pairs."""

    per_record = False  # pairs need every rated answer to a prompt
    creates = True
    margin: float = 1.0  # a pair needs score(chosen) - score(rejected) >= margin
    emit_source: bool = True  # also pass the rated conversations on (they can still become SFT rows)
    max_pairs_per_prompt: int | None = None  # keep at most this many pairs per prompt, largest margins first

    def __post_init__(self) -> None:
        if isinstance(self.margin, bool) or not isinstance(self.margin, (int, float)) or self.margin <= 0:
            # margin 0 would pair equal scores, where neither reply is better
            raise CurationError(f"margin: expected a number > 0, got {self.margin!r}")
        if not isinstance(self.emit_source, bool):
            raise CurationError(f"emit_source: expected true or false, got {self.emit_source!r}")
        cap = self.max_pairs_per_prompt
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise CurationError(f"max_pairs_per_prompt: expected an integer >= 1 or null, got {cap!r}")

    def run(self, records: Iterable[Record]) -> Iterator[Record]:
        # Rated records are buffered by prompt until the stream ends, so memory grows with the number of rated
        # records (not with the whole stream: everything else passes straight through).
        groups: dict[str, list[_Rated]] = {}
        for record in records:
            rated = self._rated(record)
            if rated is None:
                yield record
                continue
            key = normalize("\n".join(m["content"] for m in rated.prompt))
            groups.setdefault(key, []).append(rated)
            if self.emit_source:
                yield record
        self.counters["groups"] += len(groups)
        for members in groups.values():
            yield from self._group_pairs(members)

    @staticmethod
    def _rated(record: Record) -> _Rated | None:
        """The record as (prompt, final reply, score), or None when it is not a rated conversation."""
        conversation = _conversation(record)
        if record.get("score") is None or conversation is None:
            return None
        turns, _ = _trim_to_last_reply(conversation)
        prompt = _as_prompt(turns[:-1]) if turns else None
        if prompt is None:  # no reply, or no user turn right before it: format_instructions deals with those
            return None
        return _Rated(record, prompt, turns[-1], _number(record, "score", record["score"]))

    def _group_pairs(self, members: list[_Rated]) -> Iterator[Record]:
        found: list[tuple[float, int, int]] = []  # (margin, index of chosen, index of rejected), stream order
        for a, b in combinations(range(len(members)), 2):
            hi, lo = (a, b) if members[a].score >= members[b].score else (b, a)
            gap = members[hi].score - members[lo].score
            if gap < self.margin:
                self.counters["pairs_below_margin"] += 1
            elif members[hi].reply["content"].strip() == members[lo].reply["content"].strip():
                self.counters["identical_pairs_skipped"] += 1
            else:
                found.append((gap, hi, lo))
        found.sort(key=lambda t: (-t[0], min(t[1], t[2]), max(t[1], t[2])))  # largest margin first, then stream order
        if self.max_pairs_per_prompt is not None:
            self.counters["pairs_capped"] += max(0, len(found) - self.max_pairs_per_prompt)
            found = found[: self.max_pairs_per_prompt]
        self.counters["pairs"] += len(found)
        used: set[int] = set()
        prompt = members[0].prompt  # the group's prompt as its first record (by stream order) wrote it
        for gap, hi, lo in found:
            used.update((hi, lo))
            chosen, rejected = members[hi], members[lo]
            meta = {**chosen.record.get("meta", {}), "chosen_score": chosen.score, "rejected_score": rejected.score,
                    "rejected_id": rejected.record.get("id")}
            yield derive(chosen.record, key=("rated_pair", rejected.record.get("id")), prompt=list(prompt),
                         chosen=[message("assistant", chosen.reply["content"])],
                         rejected=[message("assistant", rejected.reply["content"])], meta=meta,
                         **_carried(chosen.record))
        if not self.emit_source:  # the sources were held back: account for each one
            for index, member in enumerate(members):
                if index in used:
                    self.counters["sources_consumed"] += 1
                else:
                    self.drop(member.record, "no_pairs")


# --------------------------------------------------------------------------------------------- train/test split


@register("split")
@dataclass
class Split(Mapper):
    """Train/test split grouped by prompt: sets ``split`` to "train" or "test"; no prompt lands in both."""

    # Why hashing rather than shuffling: a record's split depends only on its own prompt and the seed, so the step
    # streams with no global state, runs in worker processes, and keeps every record where it was when more data is
    # appended later (a shuffle would reshuffle the test set). The price: the test fraction is approximate, and
    # noticeably off on small sets (10 prompts at 0.1 can give 0 or 3 test prompts). A guaranteed minimum test size
    # would need the whole stream first, so there is none; check the counters in the report.
    test_size: float = 0.1  # fraction of prompts that go to test (approximate, see above)
    split_seed: int | None = None  # hash seed; null uses the recipe's seed (named so the recipe's `seed` is not shadowed)

    def __post_init__(self) -> None:
        if isinstance(self.test_size, bool) or not isinstance(self.test_size, (int, float)) \
                or not 0 < self.test_size < 1:
            raise CurationError(f"test_size: expected a fraction between 0 and 1, got {self.test_size!r}")
        if self.split_seed is not None and (isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int)):
            raise CurationError(f"split_seed: expected an integer or null, got {self.split_seed!r}")

    def apply(self, record: Record) -> Record:
        seed = (self.seed if self.split_seed is None else self.split_seed) & 0xFFFF_FFFF_FFFF_FFFF  # xxhash: u64
        position = xxhash.xxh3_64_intdigest(normalize(prompt_text(record)).encode("utf-8"), seed=seed) / 2**64  # uniform in [0, 1)
        split = "test" if position < self.test_size else "train"
        self.counters[split] += 1
        return {**record, "split": split}
