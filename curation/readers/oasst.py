"""OpenAssistant message trees (oasst2 trees, or oasst1 flat messages rebuilt into trees) -> ranked records.

Every prompter message whose assistant replies carry ranks becomes one record: ``prompt`` is the conversation from
the root down to it, ``candidates`` its ranked replies (rank 1 = best), so deeper ranked sets are found too. The
shared loop and conversation rules are :class:`curation.readers.public.PublicReader`'s.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curation.readers.public import (Malformed, PublicReader, Turns, Unusable, get, items, raw_json, role_of, text)
from curation.readers.rows import iter_rows, require_columns
from curation.records import Record, new_record
from curation.steps import CurationError, register

@register("read_oasst")
@dataclass
class ReadOASST(PublicReader):
    """OpenAssistant message trees (oasst2 trees, or oasst1 flat messages rebuilt into trees) as ranked records:
    one per prompter message whose assistant replies carry ranks; rank 1 = best."""

    id_field: str = "message_id"  # message field holding its id, kept as meta.source_id
    lang: list[str] = field(default_factory=list)  # keep only prompts in these languages (e.g. ["en"]); [] = all

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.lang, str):
            self.lang = [self.lang]
        if not isinstance(self.lang, list) or not all(isinstance(x, str) and x for x in self.lang):
            raise CurationError(f"read_oasst: option 'lang' must be a list of language codes, got {self.lang!r}")

    def read_file(self, path: Path) -> Iterator[Record]:
        messages: dict[Any, tuple[int, dict]] = {}  # oasst1: every message of the file, by id, with its row
        for row_no, row in iter_rows(self, path):
            if "prompt" in row:  # oasst2 trees: one whole tree per row, quarantined whole if any message is bad
                try:
                    check_tree(row["prompt"], "prompt")
                except Malformed as e:
                    self.quarantine(path, row_no, raw_json(row), str(e), "malformed_row")
                    continue
                yield from self._records(path, row, row["prompt"], lambda node: row_no)
                continue
            require_columns(path, row_no, row, [self.id_field, "parent_id", "role", "text"])
            try:
                check_message(row, "message")
            except Malformed as e:
                self.quarantine(path, row_no, raw_json(row), str(e), "malformed_row")
                continue
            if row[self.id_field] in messages:
                self.counters["duplicate_messages"] += 1  # the later row wins, as in a dict built from the file
            messages[row[self.id_field]] = (row_no, {**row, "replies": []})
        for root in self._rebuild(messages):
            yield from self._records(path, root, root, lambda node: messages[node[self.id_field]][0])

    def _rebuild(self, messages: dict[Any, tuple[int, dict]]) -> list[dict]:
        """oasst1's flat messages linked into trees by ``parent_id`` (a reply may come before its parent)."""
        roots = []
        for _, node in messages.values():
            parent = node["parent_id"]
            if parent is None:
                roots.append(node)
            elif parent in messages:
                messages[parent][1]["replies"].append(node)
            else:
                self.counters["orphan_messages"] += 1  # its parent is not in this file: nothing to attach it to
        return roots

    def _records(self, path: Path, tree: dict, root: dict, row_of: Callable[[dict], int]) -> Iterator[Record]:
        """One record per ranked sibling set in a checked tree; ``row_of`` gives the row a message was read from."""
        for node, turns, ranked in ranked_sets(root, [], self.counters):
            row_no, node_id = row_of(node), node.get(self.id_field)
            try:
                prompt = self.conversation(turns)
                if any(not r["text"].strip() for r in ranked):
                    raise Unusable("empty_turn", "a ranked reply is empty")
            except Unusable as e:
                self.reject(path, row_no, {k: v for k, v in node.items() if k != "replies"}, e, key=node_id)
                continue
            lang = node.get("lang") or tree.get("lang")
            record = new_record(
                self.source, self.where(path), row_no, node_id, prompt=prompt,
                candidates=[{"content": r["text"], "rank": _rank(r) + 1, "score": None} for r in ranked],
                meta={"source_id": node_id, "message_tree_id": node.get("message_tree_id") or tree.get("message_tree_id"),
                      "lang": lang, "candidate_ids": [r.get(self.id_field) for r in ranked]})
            if self.lang and lang not in self.lang:
                self.drop(record, "language_not_selected")
                continue
            yield record


def ranked_sets(node: dict, above: Turns, counters: Counter) -> Iterator[tuple[dict, Turns, list[dict]]]:
    """``(prompter message, conversation down to it, its ranked replies best first)`` for every prompter message at
    or below ``node`` with at least two ranked replies. Ranked prompter replies (OASST ranks those too) are not
    records (a prompt must end with a user turn) but are walked into, so deeper ranked sets are found."""
    if node.get("deleted"):
        counters["deleted_messages"] += 1  # removed by OpenAssistant moderators: not training data
        return
    turns = above + [(node["role"], node["text"])]
    replies = node.get("replies") or []
    if role_of(node["role"]) == "user":
        live = [r for r in replies if not r.get("deleted")]
        ranked = sorted((r for r in live if r.get("rank") is not None), key=_rank)
        counters["unranked_replies"] += len(live) - len(ranked)
        if len(ranked) >= 2:
            yield node, turns, ranked
    for reply in replies:
        yield from ranked_sets(reply, turns, counters)


def check_message(node: Any, where: str) -> None:
    """The fields the tree walk relies on: a string role and text, a whole-number rank or null, a list of replies."""
    text(get(node, "role", where), f"{where}.role")
    text(get(node, "text", where), f"{where}.text")
    if node.get("rank") is not None:
        _rank(node)
    items(node.get("replies") or [], f"{where}.replies")


def check_tree(node: Any, where: str) -> None:
    check_message(node, where)
    for i, reply in enumerate(node.get("replies") or []):
        check_tree(reply, f"{where}.replies[{i}]")


def _rank(msg: dict) -> int:
    """OASST ranks are 0-based ints (floats once a null has passed through pandas)."""
    rank = msg["rank"]
    if isinstance(rank, float) and rank.is_integer():
        rank = int(rank)
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise Malformed(f"rank {rank!r} of message {msg.get('message_id')!r} is not a whole number")
    return rank
