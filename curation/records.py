"""The record vocabulary shared by every stage.

A record is a plain ``dict`` (cheap, picklable, Arrow-friendly). Its keys come from one vocabulary, end to end:

- ``id``: stable identifier (a hash of where the record came from, so re-reading gives the same id);
- ``source``: the reader that produced it and a short source label, e.g. ``"faq_html:samples/telecom/raw/faq"``;
- ``lineage``: where it came from: ``{"path", "row", "parent", "chunk"}`` (``row`` is the 1-based line or row number
  in ``path``, ``parent`` the id of the record it was derived from, ``chunk`` its index when a document was split);
- ``text``: a raw document (before formatting);
- ``messages``: a conversation, a list of ``{"role", "content"}`` (roles ``system``/``user``/``assistant``);
- ``prompt`` / ``completion``: plain strings (TRL "standard" prompt-completion);
- ``prompt`` / ``chosen`` / ``rejected``: TRL conversational preference: ``prompt`` a list of messages ending with a
  user turn, ``chosen`` and ``rejected`` one-message lists with the assistant reply;
- ``candidates``: a ranked or rated set for one prompt: a list of ``{"content", "rank", "score"}`` where rank 1 is best
  (equal ranks are ties) and ``score`` is a rating (higher is better); either may be ``None``;
- ``score``: a rating of the whole record (e.g. a CSAT score on a support chat);
- ``meta``: free-form provenance (language, topic, annotator...). Never put secrets here.

Helpers below let steps touch every piece of text without knowing the record's shape.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any

import xxhash

Record = dict[str, Any]

# Keys that hold text, in the order they are read for a record's "document text".
_MESSAGE_LIST_KEYS = ("messages", "chosen", "rejected")


def stable_id(*parts: object) -> str:
    """A short deterministic id from where a record came from (no process-salted ``hash()``)."""
    return xxhash.xxh3_64_hexdigest("\x1f".join(str(p) for p in parts).encode("utf-8"))


def make_lineage(path: object, row: int | None, parent: str | None = None, chunk: int | None = None) -> dict:
    """Every record's pointer back to its input; all four keys are always present so Arrow sees one schema."""
    return {"path": str(path) if path is not None else None, "row": row, "parent": parent, "chunk": chunk}


def new_record(source: str, path: object, row: int | None, key: object = None, **fields: Any) -> Record:
    """A record with ``id``/``source``/``lineage`` filled in; ``key`` disambiguates several records per row."""
    record: Record = {
        "id": stable_id(source, path, row, key),
        "source": source,
        "lineage": make_lineage(path, row),
    }
    record.update(fields)
    return record


def derive(parent: Record, key: object, chunk: int | None = None, **fields: Any) -> Record:
    """A child record (a chunk, a formatted pair) that points back at ``parent``."""
    lineage = dict(parent.get("lineage") or make_lineage(None, None))
    lineage["parent"] = parent.get("id")
    if chunk is not None:
        lineage["chunk"] = chunk
    child: Record = {"id": stable_id(parent.get("id"), key), "source": parent.get("source"), "lineage": lineage}
    if "meta" in parent:
        child["meta"] = dict(parent["meta"])
    child.update(fields)
    return child


def message(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _prompt_texts(prompt: Any) -> Iterator[str]:
    if isinstance(prompt, str):
        yield prompt
    elif isinstance(prompt, list):
        for m in prompt:
            yield m["content"]


def iter_texts(record: Record) -> Iterator[str]:
    """Every piece of human-readable text in a record, whatever its shape."""
    if isinstance(record.get("text"), str):
        yield record["text"]
    if "prompt" in record:
        yield from _prompt_texts(record["prompt"])
    if isinstance(record.get("completion"), str):
        yield record["completion"]
    elif isinstance(record.get("completion"), list):
        yield from _prompt_texts(record["completion"])
    for key in _MESSAGE_LIST_KEYS:
        for m in record.get(key) or ():
            yield m["content"]
    for c in record.get("candidates") or ():
        yield c["content"]


def map_texts(record: Record, fn: Callable[[str], str]) -> Record:
    """A copy of ``record`` with ``fn`` applied to every text field (used by cleaning and PII redaction)."""
    out = dict(record)
    if isinstance(out.get("text"), str):
        out["text"] = fn(out["text"])
    for key in ("prompt", "completion"):
        value = out.get(key)
        if isinstance(value, str):
            out[key] = fn(value)
        elif isinstance(value, list):
            out[key] = [{**m, "content": fn(m["content"])} for m in value]
    for key in _MESSAGE_LIST_KEYS:
        if out.get(key):
            out[key] = [{**m, "content": fn(m["content"])} for m in out[key]]
    if out.get("candidates"):
        out["candidates"] = [{**c, "content": fn(c["content"])} for c in out["candidates"]]
    return out


def document_text(record: Record) -> str:
    """All of a record's text joined: what quality filters, language id and dedup look at."""
    return "\n".join(iter_texts(record))


def prompt_text(record: Record) -> str:
    """The prompt side of a record, for grouping by prompt (splits, rating groups): every turn before the final
    assistant reply, without system turns (a system prompt added to every row must not make all prompts equal).
    A record with no prompt side (a raw document) is its own prompt."""
    if "prompt" in record:
        prompt = record["prompt"]
        turns = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt if m["role"] != "system"]
        return "\n".join(turns)
    if record.get("messages"):
        msgs = record["messages"]
        end = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
        return "\n".join(m["content"] for m in msgs[:end] if m["role"] != "system")
    return document_text(record)


KINDS = ("instruction", "prompt_completion", "preference", "ranking", "document")


def record_kind(record: Record) -> str:
    """Which output dataset a record belongs to (one TRL format each): ``instruction`` (``messages``),
    ``prompt_completion``, ``preference`` (``prompt``/``chosen``/``rejected``), ``ranking`` (``prompt``/``candidates``)
    or ``document`` (raw ``text``)."""
    if "chosen" in record and "rejected" in record:
        return "preference"
    if "candidates" in record:
        return "ranking"
    if "completion" in record:
        return "prompt_completion"
    if "messages" in record:
        return "instruction"
    return "document"


_WORD_RE = re.compile(r"\w+(?:['’]\w+)*", re.UNICODE)


@lru_cache(maxsize=8192)
def words(text: str) -> tuple[str, ...]:
    """Words of a text, tokenised once and shared by every step that needs them (quality rules, n-grams,
    MinHash shingles, decontamination): peers re-tokenise the same text in each step. Cached by the text itself."""
    return tuple(_WORD_RE.findall(text))


_WS_RE = re.compile(r"\s+")
_PUNCT_RE = re.compile(r"[^\w\s]", re.UNICODE)


def normalize(text: str) -> str:
    """Lower-cased, punctuation-free, single-spaced text: the key for exact duplicates and prompt grouping."""
    return _WS_RE.sub(" ", _PUNCT_RE.sub(" ", text.lower())).strip()
