"""Prompts to answer, for ``rlhf feedback generate``: from an ``rlhf curate`` output folder (its instruction
conversations cut before the reply, and its preference prompts) or from JSONL/JSON/Parquet files and ``save_to_disk``
folders with a ``prompt`` or ``messages`` column. One prompt per distinct question, in file order."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from curation.records import message, normalize, prompt_text, stable_id
from feedback.client import FeedbackError

KINDS = ("instruction", "preference")  # the kinds of a curated folder that hold prompts, in the order they are read


@dataclass(frozen=True)
class Prompt:
    id: str  # the prompt record's id: the parent of the ranking record
    messages: list[dict]  # chat messages ending with a user turn (a system turn kept)
    path: str  # the file (or save_to_disk split folder) it was read from
    row: int  # 1-based line or row in that file


def prompt_roots(paths: list[Path], kind: str | None = None) -> list[Path]:
    """The files and kind folders that hold the prompts (what the manifest fingerprints): a curated folder
    contributes its ``kind`` folder, or both of :data:`KINDS` that it has when ``kind`` is None."""
    wanted = [kind] if kind else list(KINDS)
    roots = []
    for path in paths:
        if not path.exists():
            raise FeedbackError(f"prompts: not found: {path}")
        if (path / "curation.json").is_file():  # a whole `rlhf curate` output
            kinds = [k for k in wanted if (path / k).is_dir()]
            if not kinds:
                raise FeedbackError(f"prompts: {path} has no {' or '.join(wanted)} dataset to take prompts from")
            roots += [path / k for k in kinds]
        else:
            roots.append(path)
    return roots


def split_source(root: Path, split: str) -> Path:
    """The file or ``save_to_disk`` folder that holds ``split`` of a dataset folder (a file is its own source)."""
    if root.is_file():
        return root
    for suffix in (".jsonl", ".json", ".parquet"):
        if (root / f"{split}{suffix}").is_file():
            return root / f"{split}{suffix}"
    hf = root / "hf" if (root / "hf").is_dir() else root
    if (hf / split / "state.json").is_file():  # one split of a DatasetDict loads on its own
        return hf / split
    if (hf / "state.json").is_file() and split == "train":
        return hf
    raise FeedbackError(f"prompts: {root} has no '{split}' split")


def read_rows(source: Path) -> Iterator[tuple[int, dict]]:
    """``(1-based row, row)``; JSONL is read line by line so a bad line is named by its number."""
    if source.suffix == ".jsonl":
        with source.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield number, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise FeedbackError(f"{source}:{number}: malformed JSON ({e.msg})") from None
        return
    import datasets

    if source.is_dir():
        ds = datasets.load_from_disk(str(source))
    elif source.suffix in (".json", ".parquet"):
        ds = datasets.load_dataset(source.suffix[1:], data_files=str(source), split="train")
    else:
        raise FeedbackError(f"prompts: cannot read {source} (use .jsonl, .json, .parquet or a curated folder)")
    yield from enumerate(ds, 1)


def chat_prompt(row: dict, where: str) -> list[dict]:
    """A row's prompt as chat messages ending with its last user turn: a ``prompt`` string or list, or the
    ``messages`` of a conversation cut before the reply."""
    turns = row.get("prompt") if row.get("prompt") is not None else row.get("messages")
    if isinstance(turns, str):
        return [message("user", turns)]
    if not isinstance(turns, list):
        raise FeedbackError(f"{where}: expected a 'prompt' or 'messages' column, found {', '.join(sorted(row))}")
    last_user = max((i for i, m in enumerate(turns) if m.get("role") == "user"), default=None)
    if last_user is None:
        raise FeedbackError(f"{where}: the conversation has no user turn to answer")
    return [message(m["role"], m["content"]) for m in turns[:last_user + 1]]


def load_prompts(roots: list[Path], split: str = "train", max_prompts: int | None = None) -> list[Prompt]:
    """Distinct prompts in file order, at most ``max_prompts``. Two rows share a prompt when their turns match after
    normalisation, system turns aside: the grouping ``rlhf curate`` splits by, so a question asked in several
    preference pairs is answered once."""
    seen: set[str] = set()
    prompts: list[Prompt] = []
    for root in roots:
        source = split_source(root, split)
        for number, row in read_rows(source):
            messages = chat_prompt(row, f"{source}:{number}")
            key = normalize(prompt_text({"prompt": messages}))
            if key in seen:
                continue
            seen.add(key)
            prompts.append(Prompt(row.get("id") or stable_id(source, number), messages, str(source), number))
            if len(prompts) == max_prompts:
                return prompts
    if not prompts:
        raise FeedbackError(f"prompts: no rows in {', '.join(map(str, roots))} (split {split})")
    return prompts
