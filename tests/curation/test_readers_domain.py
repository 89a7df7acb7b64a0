"""read_faq and read_transcripts on tiny hand-written pages and chats; expected pairs and turns checked by hand."""

from __future__ import annotations

import json

import pytest

from curation.readers.domain import ReadFaq, ReadTranscripts, shape_conversation
from curation.steps import CurationError, InputError
from tests.curation.helpers import run_step


def run(step, base, on_error="fail"):
    return run_step(step, base=base, on_error=on_error)


def qa(records):
    return [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in records]


FAQ_HTML = """<!DOCTYPE html>
<html><head><title>Help centre - FAQ</title></head>
<body>
<nav><a href="/">Home</a> <a href="/faq">Is this the FAQ?</a></nav>
<div id="cookie-notice"><h3>Do you accept cookies?</h3><p>We use cookies.</p></div>
<main>
<h1>Frequently asked questions</h1>
<h2>How do I top up my prepaid SIM?</h2>
<p>Dial *100# from your phone.</p>
<p>You can also top   up in the app.</p>
<h2>Billing</h2>
<p>Bills are issued monthly.</p>
<h3>Why is my bill higher this month?</h3>
<ul><li>Roaming charges</li><li>Premium numbers</li></ul>
<dl>
  <dt>Can I keep my number?</dt><dd>Yes, ask for a PAC code.</dd>
  <dt>Data allowance</dt><dd>See your plan.</dd>
</dl>
<details><summary>What is eSIM?</summary><p>A SIM built into your phone.</p></details>
<div class="faq-item"><div class="q"><h4>How do I reset my voicemail PIN?</h4></div>
  <div class="a"><p>Call 121 and press 3.</p></div></div>
<div class="faq-item"><div class="q"><h4>Is there an unanswered question?</h4></div></div>
<article><header><h3>Can I pause my contract?</h3></header><p>Yes, for up to 3 months.</p></article>
</main>
<footer><h3>Need more help?</h3><p>Copyright 2024 Acme Telecom</p></footer>
</body></html>"""


def test_faq_html_pairs(tmp_path):
    (tmp_path / "faq.html").write_text(FAQ_HTML)
    step = ReadFaq(paths="faq.html")

    records, rejects = run(step, tmp_path)

    assert rejects == []
    assert qa(records) == [
        ("How do I top up my prepaid SIM?", "Dial *100# from your phone.\nYou can also top up in the app."),
        ("Why is my bill higher this month?", "Roaming charges\nPremium numbers"),  # stops at the <dl>
        ("Can I keep my number?", "Yes, ask for a PAC code."),  # "Data allowance" is no question
        ("What is eSIM?", "A SIM built into your phone."),
        ("How do I reset my voicemail PIN?", "Call 121 and press 3."),  # answer beside the heading's wrapper
        ("Can I pause my contract?", "Yes, for up to 3 months."),
    ]  # nav, cookie banner and footer questions are not pairs; "Billing" text belongs to no question
    assert [r["lineage"]["row"] for r in records] == [8, 13, 16, 19, 20, 23]  # the question's line
    assert records[0]["meta"] == {"title": "Help centre - FAQ", "page": "faq.html"}
    assert step.counters["questions_without_answer"] == 1
    assert len({r["id"] for r in records}) == 6


FAQ_MD = """---
layout: faq
---
# Billing FAQ

Intro text that answers nothing.

## How do I pay my bill?

Pay online or by direct debit.

Direct debit saves 2 EUR a month.

### **Can I get a paper bill?**
Yes, for 1 EUR per bill.

## Contact us
Call 121.

```
## Is this code?
```

**Q:** What is a PUK code? **A:** It unlocks a blocked SIM.

**Q:** How long does a
number transfer take?
**A:** One working day.
Sometimes two.

**Q:** Nobody answered this?
"""


def test_faq_markdown_pairs(tmp_path):
    (tmp_path / "faq").mkdir()
    (tmp_path / "faq" / "billing.md").write_text(FAQ_MD)
    step = ReadFaq(paths="faq", source="faq_md")

    records, _ = run(step, tmp_path)

    assert qa(records) == [
        ("How do I pay my bill?", "Pay online or by direct debit.\nDirect debit saves 2 EUR a month."),
        ("Can I get a paper bill?", "Yes, for 1 EUR per bill."),  # stops at "## Contact us"
        ("What is a PUK code?", "It unlocks a blocked SIM."),
        ("How long does a number transfer take?", "One working day.\nSometimes two."),
    ]  # the heading inside the code fence is not a question
    assert [r["lineage"]["row"] for r in records] == [8, 14, 24, 26]  # lines of the file, front matter included
    assert records[0]["meta"] == {"title": "Billing FAQ", "page": "faq/billing.md"}
    assert records[0]["source"] == "faq_md"
    assert step.counters["questions_without_answer"] == 1


def test_faq_page_without_pairs_is_dropped_and_counted(tmp_path):
    (tmp_path / "about.md").write_text("# About us\n\nWe sell phones. " + "x" * 600)
    (tmp_path / "faq.md").write_text("## Why?\nBecause.\n")
    step = ReadFaq(paths=["about.md", "faq.md"])

    records, rejects = run(step, tmp_path)

    assert qa(records) == [("Why?", "Because.")]
    assert step.counters["pages_without_pairs"] == 1
    (rec, reason), = rejects
    assert reason == "no_faq_pairs"
    assert rec["lineage"]["path"] == "about.md"
    assert rec["text"].startswith("# About us") and len(rec["text"]) == 500


CHATS = [
    {"conversation_id": "c1", "csat": 4, "escalated": False, "topic": "roaming", "turns": [
        {"speaker": "Agent", "text": "Hi, how can I help?"},
        {"speaker": "Customer", "text": "My data stopped working in Spain."},
        {"speaker": "customer", "text": "I have a travel pass."},
        {"speaker": "Agent Maria", "text": "Let me check."},
        {"speaker": "Supervisor", "text": "I re-enabled roaming on your line."},
        {"speaker": "Customer", "text": "   "},
    ]},
    {"conversation_id": "c2", "turns": [{"speaker": "client", "text": "Hello?"}]},
    {"conversation_id": "c3", "turns": [{"speaker": "operator", "text": "Anyone there?"}]},
]


def test_transcripts_jsonl_merge_strip_score_meta(tmp_path):
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    step = ReadTranscripts(paths="chats.jsonl", meta_fields=["escalated", "topic", "channel"])

    records, rejects = run(step, tmp_path)

    (rec,) = records
    assert rec["messages"] == [
        {"role": "user", "content": "My data stopped working in Spain.\n\nI have a travel pass."},
        {"role": "assistant", "content": "Let me check.\n\nI re-enabled roaming on your line."},
    ]
    assert rec["score"] == 4.0
    assert rec["meta"] == {"escalated": False, "topic": "roaming", "channel": None, "source_id": "c1"}
    assert rec["lineage"]["row"] == 1
    assert step.counters["leading_agent_turns_dropped"] == 1
    assert step.counters["merged_turns"] == 2
    assert step.counters["meta_fields_missing"] == 7  # channel in c1, all three in c2 and in c3
    assert [(r["meta"]["source_id"], reason) for r, reason in rejects] == [
        ("c2", "no_assistant_turn"), ("c3", "starts_with_assistant")]
    assert rejects[1][0]["messages"] == [{"role": "assistant", "content": "Anyone there?"}]  # kept for review
    assert rejects[0][0]["score"] is None  # no csat field


TXT_CHAT = """Chat 2024-03-01 14:02
Agent: Welcome to Acme support!
Customer (John): hi, my bill is wrong
it shows 40 EUR instead of 25
as my last invoice says: 25 EUR
Agent Maria: Sorry about that. See https://acme.example/bill
Customer: thanks
Customer: bye
"""


def test_transcripts_txt(tmp_path):
    (tmp_path / "chat1.txt").write_text(TXT_CHAT)
    step = ReadTranscripts(paths="chat1.txt")

    records, _ = run(step, tmp_path)

    assert records[0]["messages"] == [
        # lines without a label continue the turn; "as my last invoice says:" is too long to be a speaker
        {"role": "user", "content": "hi, my bill is wrong\nit shows 40 EUR instead of 25\nas my last invoice says: 25 EUR"},
        {"role": "assistant", "content": "Sorry about that. See https://acme.example/bill"},
        {"role": "user", "content": "thanks\n\nbye"},
    ]
    assert records[0]["score"] is None
    assert records[0]["lineage"] == {"path": "chat1.txt", "row": None, "parent": None, "chunk": None}
    assert step.counters["header_lines_skipped"] == 1
    assert step.counters["leading_agent_turns_dropped"] == 1


def test_unknown_speaker_is_an_error_or_quarantined(tmp_path):
    (tmp_path / "a.txt").write_text("Customer: hi\nBot: hello\n")
    with pytest.raises(InputError) as err:
        run(ReadTranscripts(paths="a.txt"), tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'a.txt'}:2: unknown speaker 'Bot'")
    assert "user: customer, client, user, caller" in message and "assistant: agent, support" in message

    (tmp_path / "b.jsonl").write_text(json.dumps({"turns": [{"speaker": "user", "text": "hi"},
                                                            {"speaker": "bot", "text": "hey"}]}) + "\n")
    step = ReadTranscripts(paths=["a.txt", "b.jsonl"], assistant_speakers=["agent"])
    with pytest.raises(CurationError, match="no records read"):  # both conversations quarantined
        run(step, tmp_path, on_error="skip")
    assert step.drops == {"unknown_speaker": 2}

    step = ReadTranscripts(paths="b.jsonl", assistant_speakers=["bot"])
    records, _ = run(step, tmp_path)
    assert records[0]["messages"][1] == {"role": "assistant", "content": "hey"}


def test_bad_turns_name_the_turn(tmp_path):
    turns = [{"speaker": "user", "text": "hi"}, {"who": "agent"}]
    (tmp_path / "c.jsonl").write_text(json.dumps({"turns": turns}) + "\n")
    with pytest.raises(InputError, match=r"c.jsonl:1: turn 2 needs string fields 'speaker' and 'text'"):
        run(ReadTranscripts(paths="c.jsonl"), tmp_path)
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": []}) + "\n")
    with pytest.raises(CurationError, match="missing column.*'turns'.*exist are: 'messages'"):
        run(ReadTranscripts(paths="d.jsonl"), tmp_path)


def test_speaker_options_validation():
    with pytest.raises(CurationError, match="speaker 'agent' is listed as both user and assistant"):
        ReadTranscripts(paths="x", user_speakers=["customer", "Agent"])
    with pytest.raises(CurationError, match="'user_speakers'"):
        ReadTranscripts(paths="x", user_speakers="customer")


def test_shape_conversation_keeps_a_leading_system_turn():
    turns = [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes?"}]
    messages, stripped, reason = shape_conversation(turns)
    assert (messages, stripped, reason) == ([turns[0], turns[2], turns[3]], 1, None)
    assert shape_conversation([])[2] == "empty_conversation"
