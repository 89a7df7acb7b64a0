"""Readers for public instruction and preference formats: Alpaca, ShareGPT, OpenAI chat, TRL preference and Anthropic
HH-RLHF (OpenAssistant trees are in :mod:`curation.readers.oasst`, on the same base).

All of them share one loop (files -> rows -> ``convert(row)`` -> record, :class:`PublicReader`) and one set of
conversation rules (:meth:`PublicReader.conversation`): upstream role names map to ``system``/``user``/``assistant``,
consecutive turns of one role are merged, and the result must be an optional leading system message followed by
user/assistant turns that alternate, starting with the user. Two kinds of bad row are told apart:

- *malformed* (a field missing or of the wrong type inside a row): the file is not in the format the reader expects,
  so the row goes through :meth:`Reader.quarantine` (the run stops naming file and line; ``on_error: skip`` sends it
  to rejects);
- *unusable* (well-formed, but a tool call, an image, two identical responses): dropped with a named reason, counted
  and kept in rejects. Public datasets are full of these, so they never stop a run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from curation.readers.files import PathReader
from curation.readers.rows import TABULAR_SUFFIXES, iter_rows, require_columns
from curation.records import Record, message, new_record
from curation.steps import CurationError, register

# Upstream role names -> ours. ShareGPT scrapes say human/gpt (chatgpt/bard for other models), Gemini says "model",
# OpenAssistant "prompter", and OpenAI's newer models take the system prompt as "developer". Anything else (tool,
# function, observation...) has no place in a user/assistant conversation.
ROLES = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant", "model": "assistant",
}

Turns = list[tuple[str, str]]  # (upstream role, text)


def role_of(raw: str) -> str | None:
    """Our role for an upstream role name; ``None`` when it has no place in a user/assistant conversation."""
    return ROLES.get(raw.strip().lower())


class Malformed(Exception):
    """A row not in the reader's format: quarantined (the run stops unless ``on_error: skip``)."""


class Unusable(Exception):
    """A well-formed row that cannot become a record: dropped under ``reason``; the message says what was seen."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


# --- checked access to the JSON inside a row -------------------------------------------------------------------------

def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def get(obj: Any, key: str, where: str) -> Any:
    """``obj[key]`` for a JSON object nested in a row; ``where`` names it in the error (``conversations[2]``)."""
    if not isinstance(obj, dict):
        raise Malformed(f"{where} is {_kind(obj)}, expected an object")
    if key not in obj:
        raise Malformed(f"{where} has no {key!r} (it has {', '.join(map(repr, obj)) or 'no keys'})")
    return obj[key]


def text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise Malformed(f"{where} is {_kind(value)}, expected a string")
    return value


def items(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise Malformed(f"{where} is {_kind(value)}, expected a list")
    return value


def message_turns(messages: Any, where: str) -> Turns:
    """OpenAI-style ``[{role, content}]`` as turns. Content may be a list of parts (the multimodal form); text parts
    are joined one per line, any other part (image, audio, file) makes the conversation unusable as text."""
    turns = []
    for i, m in enumerate(items(messages, where)):
        at = f"{where}[{i}]"
        role = text(get(m, "role", at), f"{at}.role")
        if m.get("tool_calls") or m.get("function_call"):
            raise Unusable("tool_call", f"{at} calls a tool")
        content = get(m, "content", at)
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                kind = get(part, "type", f"{at}.content[{j}]")
                if kind != "text":
                    raise Unusable("non_text_content", f"{at}.content[{j}] is a {kind!r} part")
                parts.append(text(get(part, "text", f"{at}.content[{j}]"), f"{at}.content[{j}].text"))
            content = "\n".join(parts)
        turns.append((role, text(content, f"{at}.content")))
    return turns


def split_pair(chosen: list[dict], rejected: list[dict]) -> dict:
    """``prompt``/``chosen``/``rejected`` from two whole conversations that differ only in the final assistant reply.

    The prompt is their longest shared prefix of turns, as in TRL's ``extract_prompt`` (trl/data_utils.py), but
    stricter: TRL keeps whatever tails are left, while a preference pair here needs a prompt ending with a user turn
    and exactly one assistant reply on each side. (Importing TRL for its five-line loop would also cost seconds.)"""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    prompt, tail_c, tail_r = chosen[:k], chosen[k:], rejected[k:]
    if not tail_c and not tail_r:
        raise Unusable("identical_responses", "chosen and rejected are the same conversation")
    if not (prompt and prompt[-1]["role"] == "user" and len(tail_c) == len(tail_r) == 1):
        raise Unusable("no_shared_prompt", f"chosen and rejected share {k} turn(s), then have {len(tail_c)} and "
                                           f"{len(tail_r)} more; expected a shared prompt ending with a user turn "
                                           "and one assistant reply each")
    if tail_c[0]["content"].strip() == tail_r[0]["content"].strip():
        raise Unusable("identical_responses", "chosen and rejected replies differ only in white space")
    return {"prompt": prompt, "chosen": tail_c, "rejected": tail_r}


# --- the shared reader ------------------------------------------------------------------------------------------------

@dataclass
class PublicReader(PathReader):
    """Rows of JSONL/JSON/CSV/Parquet files, one record per row. Subclasses set ``columns`` and write ``convert``."""

    id_field: str = "id"  # row field holding the upstream id, kept as meta.source_id (ignored where absent)

    suffixes: ClassVar[tuple[str, ...]] = TABULAR_SUFFIXES
    columns: ClassVar[tuple[str, ...]] = ()  # columns every row must have

    def __post_init__(self) -> None:
        super().__post_init__()
        for f in fields(self):  # every option with a string default (id_field, column, system) must be a string
            value = getattr(self, f.name)
            if f.name != "paths" and isinstance(f.default, str) and not isinstance(value, str):
                raise CurationError(f"{self.type_name}: option {f.name!r} must be a string, got {value!r}")

    def required(self) -> list[str]:
        return list(self.columns)

    def convert(self, row: dict) -> dict:
        """The record's fields (``messages``, or ``prompt``/``chosen``/``rejected``, optional ``meta``) for one row."""
        raise NotImplementedError

    def read_file(self, path: Path) -> Iterator[Record]:
        for row_no, row in iter_rows(self, path):
            require_columns(path, row_no, row, self.required())
            try:
                fields = self.convert(row)
            except Malformed as e:
                self.quarantine(path, row_no, raw_json(row), str(e), "malformed_row")
                continue
            except Unusable as e:
                self.reject(path, row_no, row, e)
                continue
            meta = fields.pop("meta", {})
            if row.get(self.id_field) is not None:
                meta = {"source_id": row[self.id_field], **meta}
            yield new_record(self.source, self.where(path), row_no, **fields, meta=meta)

    def reject(self, path: Path, row_no: int, row: dict, error: Unusable, key: object = None) -> None:
        """An unusable row goes to rejects whole, with what was wrong, so nothing disappears unexplained."""
        self.drop(new_record(self.source, self.where(path), row_no, key, raw=raw_json(row), error=str(error)), error.reason)

    def conversation(self, turns: Turns) -> list[dict]:
        """Turns as our messages: roles mapped, runs of one role merged, order checked (see the module docstring)."""
        out: list[dict] = []
        for i, (raw_role, content) in enumerate(turns, start=1):
            role = role_of(raw_role)
            if role is None:
                raise Unusable("unsupported_role", f"turn {i} has role {raw_role!r}")
            if not content.strip():
                raise Unusable("empty_turn", f"turn {i} ({raw_role}) is empty")
            if out and out[-1]["role"] == role:
                # A user who splits a question over two messages (or a scrape that split one reply) still says one
                # thing; merging keeps the text and the alternation chat templates require.
                out[-1]["content"] += "\n\n" + content
                self.counters["merged_turns"] += 1
            elif role == "system" and out:
                raise Unusable("system_not_first", f"turn {i} is a system message after the conversation started")
            elif role == "assistant" and (not out or out[-1]["role"] == "system"):
                raise Unusable("assistant_first", f"turn {i}: the conversation opens with an assistant turn")
            else:
                out.append(message(role, content))
        return out

    def dialogue(self, turns: Turns) -> list[dict]:
        """A conversation for SFT ``messages``: it must end with an assistant reply. Trailing user turns (scraped
        chats are often cut after a question) carry no training signal, so they are trimmed and counted."""
        messages = self.conversation(turns)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise Unusable("no_assistant_turn", "the conversation has no assistant reply")
        self.counters["trailing_turns_trimmed"] += len(messages) - last - 1
        return messages[:last + 1]


def raw_json(row: dict) -> str:
    return json.dumps(row, ensure_ascii=False, default=str)


# --- the six formats ---------------------------------------------------------------------------------------------------

@register("read_alpaca")
@dataclass
class ReadAlpaca(PublicReader):
    """Alpaca rows (instruction, input, output) as `messages`; a non-empty input follows the instruction."""

    system: str = ""  # column holding a per-row system prompt (e.g. "system"); "" = no system message

    columns: ClassVar[tuple[str, ...]] = ("instruction", "output")

    def required(self) -> list[str]:
        return list(self.columns) + ([self.system] if self.system else [])

    def convert(self, row: dict) -> dict:
        user = text(row["instruction"], "instruction")
        extra = text(row.get("input") or "", "input")  # absent or null in Alpaca-style sets without inputs
        if extra.strip():
            user += "\n\n" + extra
        turns = [("user", user), ("assistant", text(row["output"], "output"))]
        system = text(row[self.system] or "", self.system) if self.system else ""
        if system.strip():
            turns.insert(0, ("system", system))
        return {"messages": self.dialogue(turns)}


@register("read_sharegpt")
@dataclass
class ReadShareGPT(PublicReader):
    """ShareGPT conversations ([{from, value}]) as `messages`; tool/function turns make a row unusable."""

    column: str = "conversations"  # row field holding the list of {from, value} turns

    def required(self) -> list[str]:
        return [self.column]

    def convert(self, row: dict) -> dict:
        turns = [(text(get(t, "from", f"{self.column}[{i}]"), f"{self.column}[{i}].from"),
                  text(get(t, "value", f"{self.column}[{i}]"), f"{self.column}[{i}].value"))
                 for i, t in enumerate(items(row[self.column], self.column))]
        return {"messages": self.dialogue(turns)}


@register("read_openai_chat")
@dataclass
class ReadOpenAIChat(PublicReader):
    """OpenAI chat fine-tuning rows ({messages: [{role, content}]}) as `messages`; text content parts are joined."""

    columns: ClassVar[tuple[str, ...]] = ("messages",)

    def convert(self, row: dict) -> dict:
        return {"messages": self.dialogue(message_turns(row["messages"], "messages"))}


@register("read_trl_preference")
@dataclass
class ReadTRLPreference(PublicReader):
    """TRL preference rows (plain or conversational, explicit or implicit prompt) as conversational prompt/chosen/
    rejected; score_chosen/score_rejected, when present, go to meta."""

    columns: ClassVar[tuple[str, ...]] = ("chosen", "rejected")

    def convert(self, row: dict) -> dict:
        prompt = row.get("prompt")
        sides = []
        for key in ("chosen", "rejected"):
            value = row[key]
            if isinstance(value, str):
                if prompt is None:
                    raise Malformed(f"{key!r} is plain text and there is no 'prompt': the prompt cannot be told from "
                                    "the reply (for 'Human:'/'Assistant:' dialogues use read_hh_rlhf)")
                sides.append([("assistant", value)])
            else:
                sides.append(message_turns(value, key))
        head = self._prompt_turns(prompt, sides[0])
        fields = split_pair(self.conversation(head + sides[0]), self.conversation(head + sides[1]))
        scores = {k: row[k] for k in ("score_chosen", "score_rejected") if row.get(k) is not None}
        if scores:
            fields["meta"] = scores
        return fields

    @staticmethod
    def _prompt_turns(prompt: Any, chosen: Turns) -> Turns:
        if prompt is None:
            return []  # implicit prompt: it is the shared start of chosen and rejected
        if isinstance(prompt, list):
            return message_turns(prompt, "prompt")
        text(prompt, "prompt")
        # A plain prompt beside conversations that already open with it is a copy (UltraFeedback-binarized ships
        # both); TRL's maybe_extract_prompt ignores it in that case too.
        if any(role_of(role) == "user" for role, _ in chosen):
            return []
        return [("user", prompt)]


# A turn starts where a line break pair (or the text) is followed by a speaker tag; paragraphs inside a reply stay.
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


def hh_turns(dialogue: Any, where: str) -> Turns:
    """``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` (Anthropic/hh-rlhf; Bai et al. 2022,
    arXiv:2204.05862) as turns."""
    parts = _HH_TURN.split(text(dialogue, where))
    if len(parts) < 3 or parts[0].strip():
        raise Malformed(f"{where} does not start with a 'Human:' turn")
    return [(role, body.strip()) for role, body in zip(parts[1::2], parts[2::2])]


@register("read_hh_rlhf")
@dataclass
class ReadHHRLHF(PublicReader):
    """Anthropic HH-RLHF rows (two whole Human/Assistant dialogues) as prompt/chosen/rejected: the shared turns
    are the prompt, the diverging final assistant replies the pair."""

    columns: ClassVar[tuple[str, ...]] = ("chosen", "rejected")

    def convert(self, row: dict) -> dict:
        return split_pair(self.conversation(hh_turns(row["chosen"], "chosen")),
                          self.conversation(hh_turns(row["rejected"], "rejected")))
