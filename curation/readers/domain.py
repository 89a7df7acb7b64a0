"""Domain readers: FAQ pages become question/answer conversations (``read_faq``), support chat transcripts become
conversations in TRL's ``messages`` shape (``read_transcripts``)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from curation.readers.files import PathReader, markdown_lines, markdown_title, split_front_matter
from curation.readers.rows import iter_rows, require_columns
from curation.readers.tabular import to_score
from curation.records import Record, message, new_record
from curation.steps import CurationError, read_text_file, register

Pair = tuple[int | None, str, str]  # (line of the question, question, answer)

# --- FAQ pages -------------------------------------------------------------------------------------------------------

_HEADINGS = ("h1", "h2", "h3", "h4", "h5", "h6")
_QUESTION_TAGS = ("h2", "h3", "h4", "dt", "summary")
_BOUNDARY_TAGS = (*_HEADINGS, "dt", "summary")  # an answer runs up to the next of these
# Page furniture. Not <header>: semantic pages put each question in an <article><header>.
_NOISE_TAGS = ("script", "style", "noscript", "template", "nav", "footer", "aside", "form")
_BLOCK_TAGS = ("p", "div", "li", "dt", "dd", "tr", "td", "th", "section", "article", "blockquote", "pre", "details",
               "summary", "br", *_HEADINGS)
_COOKIE_XPATH = "//*[contains(translate(concat(@id, ' ', @class), 'COKIE', 'cokie'), 'cookie')]"
_MAX_CLIMB = 3  # wrappers like <div class="faq-q"><h3>Q?</h3></div> put the answer beside the wrapper, not the heading

# "**Q:** question" and "**A:** answer" (also "**Q**:" / "**Q.**"), in Markdown FAQ pages.
_MD_Q_RE = re.compile(r"^\s*\*\*Q[:.]?\*\*[:.]?\s*(.*)$", re.I)
_MD_A_RE = re.compile(r"\*\*A[:.]?\*\*[:.]?\s*", re.I)


def _lines(text: str) -> str:
    """Whitespace collapsed within lines, blank lines removed: one paragraph per line."""
    return "\n".join(" ".join(line.split()) for line in text.splitlines() if line.strip())


def _parse_html(html: str):
    import lxml.html
    from lxml import etree

    try:
        # Encoded back to bytes: lxml refuses str input that carries an <?xml encoding=...?> declaration.
        doc = lxml.html.document_fromstring(html.encode("utf-8"), parser=lxml.html.HTMLParser(encoding="utf-8"))
    except etree.ParserError:  # an empty document
        return None
    etree.strip_elements(doc, etree.Comment, *_NOISE_TAGS, with_tail=False)
    for banner in doc.xpath(_COOKIE_XPATH):
        banner.drop_tree()
    for el in doc.iter(*_BLOCK_TAGS):  # block boundaries become line breaks in text_content()
        el.tail = "\n" + (el.tail or "")
        if el.tag != "br":
            el.text = "\n" + (el.text or "")
    return doc


def html_faq(html: str) -> tuple[str | None, list[Pair], int]:
    """``(title, pairs, questions without an answer)`` of an HTML FAQ page."""
    doc = _parse_html(html)
    if doc is None:
        return None, [], 0
    title = _lines(doc.findtext(".//title") or "") or next((_lines(h.text_content()) for h in doc.iter("h1")), None)
    pairs, unanswered = [], 0
    for el in doc.iter(*_QUESTION_TAGS):
        question = " ".join(el.text_content().split())
        if not question.endswith("?"):
            continue
        answer = _html_answer(el)
        if answer:
            pairs.append((el.sourceline, question, answer))
        else:
            unanswered += 1
    return title or None, pairs, unanswered


def _html_answer(question) -> str:
    """The text after ``question`` up to the next heading or question, climbing out of wrappers that hold only it."""
    node = question
    for _ in range(_MAX_CLIMB + 1):
        parts = [node.tail or ""]
        for sibling in node.itersiblings():
            if next(sibling.iter(*_BOUNDARY_TAGS), None) is not None:
                break
            parts += [sibling.text_content(), sibling.tail or ""]
        answer = _lines("".join(parts))
        if answer:
            return answer
        parent = node.getparent()
        if parent is None or list(parent.iter(*_BOUNDARY_TAGS)) != [question]:
            return ""
        node = parent
    return ""


def markdown_faq(body: str, first_line: int = 1) -> tuple[list[Pair], int]:
    """``(pairs, questions without an answer)``: ``## Question?`` headings (any level) with the paragraphs below
    them, and ``**Q:** ... **A:** ...`` blocks. Line numbers start at ``first_line`` (after front matter)."""
    pairs: list[Pair] = []
    unanswered = 0
    current: list | None = None  # [line, question lines, answer lines or None before "**A:**"]

    def close() -> None:
        nonlocal unanswered
        if current is None:
            return
        question = " ".join(" ".join(current[1]).split())
        answer = "\n".join(line.rstrip() for line in current[2] or () if line.strip())
        if question and answer:
            pairs.append((current[0], question, answer))
        else:
            unanswered += 1

    for line_no, line, heading in markdown_lines(body):
        line_no += first_line - 1
        q_marker = _MD_Q_RE.match(line) if heading is None else None
        if heading is not None or q_marker:
            close()
            current = None
        if heading is not None:
            question = heading.strip("*_ ")
            if question.endswith("?"):
                current = [line_no, [question], []]
        elif q_marker:
            question, *answer = _MD_A_RE.split(q_marker.group(1), maxsplit=1)
            current = [line_no, [question], answer or None]
        elif current is not None:
            a_marker = _MD_A_RE.match(line.lstrip()) if current[2] is None else None
            if a_marker:
                current[2] = [line.lstrip()[a_marker.end():]]
            else:
                current[1 if current[2] is None else 2].append(line)
    close()
    return pairs, unanswered


@register("read_faq")
@dataclass
class ReadFaq(PathReader):
    """FAQ pages (HTML or Markdown), one record per question/answer pair: ``messages`` = [user: question,
    assistant: answer], ``meta`` = {title, page}. Questions are headings/<dt>/<summary> that end with '?'."""

    suffixes: ClassVar[tuple[str, ...]] = (".html", ".htm", ".md", ".markdown")

    def read_file(self, path: Path) -> Iterator[Record]:
        text = read_text_file(path, self.counters)
        if path.suffix.lower() in (".html", ".htm"):
            title, pairs, unanswered = html_faq(text)
        else:
            front_matter, body = split_front_matter(text)
            title = markdown_title(front_matter, body, skip_questions=True)
            pairs, unanswered = markdown_faq(body, first_line=text[:len(text) - len(body)].count("\n") + 1)
        if unanswered:
            self.counters["questions_without_answer"] += unanswered
        if not pairs:
            self.counters["pages_without_pairs"] += 1
            self.drop_file(path, text, "no_faq_pairs")
            return
        page = self.where(path)
        meta = {"title": title or path.stem, "page": page}
        for i, (line, question, answer) in enumerate(pairs):
            yield new_record(self.source, page, line, key=i, meta=dict(meta),
                             messages=[message("user", question), message("assistant", answer)])


# --- Support transcripts ---------------------------------------------------------------------------------------------

# "Speaker: text". The label starts with a letter (so "10:30" is not one) and the colon is followed by a space or the
# line end (so "https://..." is not one); a line without a label continues the previous turn.
_SPEAKER_RE = re.compile(r"^\s*([^\W\d_][\w .'()&-]{0,39}?)\s*:(?:\s+|$)(.*)$")
_MAX_LABEL_WORDS = 3  # "Agent Maria Lopez:" is a label, "As noted in your contract:" is text

_ROLES = ("user", "assistant", "system")
Turn = tuple[int, int | None, str, str]  # (line in the file, turn number in a JSONL row or None, speaker, text)


def shape_conversation(turns: list[dict[str, str]]) -> tuple[list[dict[str, str]], int, str | None]:
    """``(messages, leading assistant turns stripped, drop reason or None)``.

    Chat templates used with TRL (Llama 2, Mistral) raise "Conversation roles must alternate user/assistant/..."
    otherwise: leading assistant turns (an agent's greeting before the customer speaks) are stripped, and
    consecutive turns of one role are merged."""
    start = 0
    while start < len(turns) and turns[start]["role"] == "system":
        start += 1
    end = start
    while end < len(turns) and turns[end]["role"] == "assistant":
        end += 1
    merged: list[dict[str, str]] = []
    for turn in turns[:start] + turns[end:]:
        if merged and merged[-1]["role"] == turn["role"]:
            merged[-1] = message(turn["role"], merged[-1]["content"] + "\n\n" + turn["content"])
        else:
            merged.append(message(turn["role"], turn["content"]))
    body = [m for m in merged if m["role"] != "system"]
    if not body:
        return merged, end - start, "starts_with_assistant" if end > start else "empty_conversation"
    if not any(m["role"] == "assistant" for m in body):
        return merged, end - start, "no_assistant_turn"
    return merged, end - start, None


def _speaker_list(value: Any, option: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(s, str) and s.strip() for s in value):
        raise CurationError(f"read_transcripts: option '{option}' must be a list of speaker names, got {value!r}")
    return value


@register("read_transcripts")
@dataclass
class ReadTranscripts(PathReader):
    """Support chats -> ``messages``: JSONL (one conversation per line) or .txt files ("Speaker: text" lines, one
    conversation per file). Speakers map to roles by name, case-insensitively; "Agent Maria" matches "agent"."""

    turns_field: str = "turns"  # JSONL: the field holding the list of turns
    speaker_field: str = "speaker"  # JSONL: the speaker's key in each turn
    text_field: str = "text"  # JSONL: the text's key in each turn
    score_field: str = "csat"  # JSONL: field whose value becomes the record's `score` (None if absent)
    id_field: str = "conversation_id"  # JSONL: the conversation's own id (kept in meta.source_id, part of our id)
    meta_fields: list[str] = field(default_factory=list)  # JSONL: fields copied into meta (escalated, topic...)
    user_speakers: list[str] = field(default_factory=lambda: ["customer", "client", "user", "caller"])  # -> user
    assistant_speakers: list[str] = field(  # -> assistant
        default_factory=lambda: ["agent", "support", "assistant", "operator", "supervisor"])
    system_speakers: list[str] = field(default_factory=lambda: ["system"])  # -> system

    suffixes: ClassVar[tuple[str, ...]] = (".jsonl", ".json", ".txt")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("turns_field", "speaker_field", "text_field", "score_field", "id_field"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise CurationError(f"read_transcripts: option '{name}' must be a field name, "
                                    f"got {getattr(self, name)!r}")
        if not isinstance(self.meta_fields, list) or not all(isinstance(f, str) for f in self.meta_fields):
            raise CurationError(f"read_transcripts: option 'meta_fields' must be a list of field names, "
                                f"got {self.meta_fields!r}")
        # speaker (case-folded) -> role; not "_"-prefixed, so it travels with the step when pickled
        self.speaker_roles: dict[str, str] = {}
        for role in _ROLES:
            option = f"{role}_speakers"
            for speaker in _speaker_list(getattr(self, option), option):
                key = speaker.strip().casefold()
                if self.speaker_roles.get(key, role) != role:
                    raise CurationError(f"read_transcripts: speaker {speaker!r} is listed as both "
                                        f"{self.speaker_roles[key]} and {role}")
                self.speaker_roles[key] = role

    def role(self, speaker: str) -> str | None:
        key = speaker.strip().casefold()
        if key in self.speaker_roles:
            return self.speaker_roles[key]
        first = re.split(r"[\s(\[#-]", key, maxsplit=1)[0]  # "Agent Maria", "Customer (John)", "agent-2"
        return self.speaker_roles.get(first)

    def read_file(self, path: Path) -> Iterator[Record]:
        if path.suffix.lower() == ".txt":
            yield from self._read_txt(path)
        else:
            yield from self._read_rows(path)

    def _read_txt(self, path: Path) -> Iterator[Record]:
        text = read_text_file(path, self.counters)
        turns: list[list] = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            m = _SPEAKER_RE.match(line)
            if m and len(m.group(1).split()) <= _MAX_LABEL_WORDS:
                turns.append([line_no, None, m.group(1).strip(), m.group(2).strip()])
            elif turns:
                turns[-1][3] += "\n" + line.strip()
            else:  # a title or date line above the first turn
                self.counters["header_lines_skipped"] += 1
        yield from self._conversation(path, None, text, [tuple(t) for t in turns], None, None, {})

    def _read_rows(self, path: Path) -> Iterator[Record]:
        for row_no, row in iter_rows(self, path):
            require_columns(path, row_no, row, [self.turns_field])
            raw = json.dumps(row, ensure_ascii=False, default=str)
            turns = self._row_turns(path, row_no, raw, row[self.turns_field])
            if turns is None:
                continue
            try:
                score = to_score(self.score_field, row.get(self.score_field))
            except ValueError as e:
                self.quarantine(path, row_no, raw, str(e), "bad_value")
                continue
            meta = {f: row.get(f) for f in self.meta_fields}
            missing = sum(f not in row for f in self.meta_fields)
            if missing:  # kept as None (one schema for every record), counted so a misspelt field shows in the report
                self.counters["meta_fields_missing"] += missing
            source_id = row.get(self.id_field)
            if source_id is not None:
                meta["source_id"] = source_id
            yield from self._conversation(path, row_no, raw, turns, source_id, score, meta)

    def _row_turns(self, path: Path, row_no: int, raw: str, value: Any) -> list[Turn] | None:
        if not isinstance(value, list):
            self.quarantine(path, row_no, raw, f"{self.turns_field!r} is not a list of turns", "bad_turns")
            return None
        turns = []
        for i, turn in enumerate(value, start=1):
            if not (isinstance(turn, dict) and isinstance(turn.get(self.speaker_field), str)
                    and isinstance(turn.get(self.text_field), str)):
                self.quarantine(path, row_no, raw, f"turn {i} needs string fields {self.speaker_field!r} and "
                                f"{self.text_field!r}, got {turn!r:.120}", "bad_turns")
                return None
            turns.append((row_no, i, turn[self.speaker_field], turn[self.text_field]))
        return turns

    def _conversation(self, path: Path, row: int | None, raw: str, turns: list[Turn], source_id: Any,
                      score: float | None, meta: dict) -> Iterator[Record]:
        mapped = []
        for line_no, turn_no, speaker, text in turns:
            role = self.role(speaker)
            if role is None:
                known = "; ".join(f"{r}: {', '.join(getattr(self, r + '_speakers'))}" for r in _ROLES)
                where = f"turn {turn_no}: " if turn_no else ""
                self.quarantine(path, line_no, raw, f"{where}unknown speaker {speaker!r} (known speakers - {known}; "
                                f"add it to user_speakers or assistant_speakers)", "unknown_speaker")
                return
            if text.strip():
                mapped.append(message(role, text.strip()))
        record = new_record(self.source, self.where(path), row, key=source_id, messages=mapped, score=score, meta=meta)
        messages, stripped, reason = shape_conversation(mapped)
        if reason is not None:
            self.drop(record, reason)  # the turns as read, so a reviewer sees the whole conversation
            return
        merged = len(mapped) - stripped - len(messages)
        if stripped:
            self.counters["leading_agent_turns_dropped"] += stripped
        if merged:
            self.counters["merged_turns"] += merged
        record["messages"] = messages
        yield record
