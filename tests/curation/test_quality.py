import random

import pytest

from curation.quality import (
    GOPHER_STOP_WORDS,
    GopherQuality,
    LengthFilter,
    alpha_word_count,
    duplicate_ngram_chars,
    duplicate_stats,
    stop_word_count,
    top_ngram_chars,
)
from curation.steps import REGISTRY, CurationError

GOOD = (
    "Roaming charges apply when you use your phone outside the country where your contract was signed.\n"
    "Since 2017, calls and texts within the European Union cost the same as at home, so most customers pay "
    "nothing extra on holiday.\n"
    "Data is different: a fair use limit applies, and once it is reached the operator may add a small surcharge "
    "per gigabyte.\n"
    "Check the limit in the app before you travel.\n"
    "Switch off data roaming if you want to be sure that nothing is charged."
)

# Every rule off; the n-gram options as a whole (null), since per-n entries merge over Gopher's other sizes.
NO_RULES = dict(min_words=None, max_words=None, min_mean_word_length=None, max_mean_word_length=None,
                max_symbol_ratio=None, max_bullet_lines=None, max_ellipsis_lines=None, min_alpha_words=None,
                min_stop_words=None, max_dup_lines=None, max_dup_paragraphs=None, max_dup_line_chars=None,
                max_dup_paragraph_chars=None, max_top_ngram_chars=None, max_dup_ngram_chars=None)


def only(**rule):
    """A filter with every rule off except the ones given, so each test exercises one rule (an n-gram option also
    brings Gopher's other sizes back, which the short texts below pass)."""
    return GopherQuality(**{**NO_RULES, **rule})


def doc(text):
    return {"id": "d", "text": text}


def test_registered():
    assert REGISTRY["gopher_quality"] is GopherQuality and REGISTRY["length"] is LengthFilter


def test_helpers_by_hand():
    assert duplicate_stats(["x", "yy", "x", "x"]) == (0.5, 0.4)  # 2 of 4 items repeat; 2 of 5 characters
    ws = ("a", "b", "a", "b", "a")
    assert duplicate_ngram_chars(ws, 2) == 3  # "a b" at 2 and "b a" at 3 repeat: words 2..4 covered once each
    assert top_ngram_chars(ws, 2) == 4  # "a b" occurs at 0 and 2: words 0..3
    assert top_ngram_chars(("a", "b", "c"), 2) == 0  # nothing occurs twice


def test_good_document_kept_with_defaults():
    assert GopherQuality().check(doc(GOOD)) is None


def test_repeated_lines_dropped_with_defaults():
    text = GOOD + "\nContact our support team for more help.\n" * 4
    assert GopherQuality().check(doc(text)) == "dup_lines"  # 3 of 9 lines repeat an earlier one: 0.33 > 0.3


def test_short_and_empty_with_defaults():
    assert GopherQuality().check(doc("Restart the router and wait.")) == "too_few_words"
    assert GopherQuality().check(doc("  \n ... ")) == "empty"
    assert only().check(doc("")) == "empty"  # even with every rule off


@pytest.mark.parametrize("text, rule, reason, passing", [
    ("one two three", {"min_words": 4}, "too_few_words", {"min_words": 3}),
    ("one two three", {"max_words": 2}, "too_many_words", {"max_words": 3}),
    ("a bb c", {"min_mean_word_length": 3}, "mean_word_length", {"min_mean_word_length": 1}),
    ("internationalisation", {"max_mean_word_length": 10}, "mean_word_length", {"max_mean_word_length": 20}),
    ("# one # two three four", {"max_symbol_ratio": 0.1}, "symbol_ratio", {"max_symbol_ratio": 0.5}),
    ("wait... what… ok", {"max_symbol_ratio": 0.5}, "symbol_ratio", {"max_symbol_ratio": 2 / 3}),
    ("- a\n\n- b\n* c\nd", {"max_bullet_lines": 0.7}, "bullet_lines", {"max_bullet_lines": 0.75}),
    ("a...\nb\nc\nd", {"max_ellipsis_lines": 0.2}, "ellipsis_lines", {"max_ellipsis_lines": 0.25}),
    ("call 0800 123 456", {"min_alpha_words": 0.8}, "alpha_words", {"min_alpha_words": 0.25}),
    ("Routers reboot nightly", {"min_stop_words": 1}, "stop_words", {"min_stop_words": 0}),
    ("a\nb\na\na", {"max_dup_lines": 0.3}, "dup_lines", {"max_dup_lines": 0.5}),
    ("p one\n\np two\n \np one", {"max_dup_paragraphs": 0.3}, "dup_paragraphs", {"max_dup_paragraphs": 0.34}),
    ("a long line here\nx\ny\nz\na long line here", {"max_dup_line_chars": 0.2}, "dup_line_chars",
     {"max_dup_line_chars": 0.5}),
    ("alpha beta\n\ngamma\n\nalpha beta", {"max_dup_paragraph_chars": 0.2}, "dup_paragraph_chars",
     {"max_dup_paragraph_chars": 0.5}),
    # "to be" occurs twice: 8 of the 13 word characters (0.62).
    ("to be or not to be", {"max_top_ngram_chars": {2: 0.6}}, "top_2gram", {"max_top_ngram_chars": {2: 0.62}}),
    # The second "x y z w v" repeats the first: 5 of 13 one-letter words (0.38).
    ("x y z w v q r s x y z w v", {"max_dup_ngram_chars": {5: 0.15}}, "dup_5gram",
     {"max_dup_ngram_chars": {5: 0.4}}),
])
def test_each_rule_alone(text, rule, reason, passing):
    assert only(**rule).check(doc(text)) == reason
    assert only(**passing).check(doc(text)) is None


def test_stop_words_are_case_insensitive_and_configurable():
    assert only(min_stop_words=2).check(doc("The router and modem")) is None
    assert only(min_stop_words=2, stop_words=["der", "die"]).check(doc("Der Router und die Box")) is None
    assert only(min_stop_words=2, stop_words=["der", "die"]).check(doc("The router and the modem")) == "stop_words"


def test_conversation_is_judged_on_all_its_text():
    chat = {"id": "c", "messages": [{"role": "user", "content": "Is roaming free?"},
                                    {"role": "assistant", "content": "Is roaming free?"}]}
    assert only(max_dup_lines=0.3).check(chat) == "dup_lines"


def test_ngram_options_merge_over_defaults():
    step = GopherQuality(max_top_ngram_chars={"2": 0.25, "3": None}, max_dup_ngram_chars=None)
    assert step.max_top_ngram_chars == {2: 0.25, 3: None, 4: 0.16}  # string keys from YAML/JSON; 4 kept
    assert step.max_dup_ngram_chars == {}  # null: the whole rule off
    assert GopherQuality(max_dup_ngram_chars={11: 0.05}).max_dup_ngram_chars[11] == 0.05


def test_validation_names_the_field():
    with pytest.raises(CurationError, match="max_dup_lines.*1.5"):
        GopherQuality(max_dup_lines=1.5)
    with pytest.raises(CurationError, match="max_dup_ngram_chars.*'zero'"):
        GopherQuality(max_dup_ngram_chars={"zero": 0.1})
    with pytest.raises(CurationError, match="min_words.*-1"):
        GopherQuality(min_words=-1)


CHAT = {"id": "i", "messages": [{"role": "system", "content": "You are a helpful telecom assistant."},
                                {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello! How can I help with your plan today?"}]}


def test_length_checks_the_chosen_side():
    assert LengthFilter(min_words=2).check(CHAT) is None  # only the assistant reply is checked by default
    assert LengthFilter(part="prompt", min_words=2).check(CHAT) == "too_short"  # "Hi"
    assert LengthFilter(part="all", max_words=6).check(CHAT) == "too_long"  # the 9-word reply
    assert LengthFilter(max_chars=20).check(CHAT) == "too_long"
    assert LengthFilter(part="prompt", min_chars=3).check(CHAT) == "too_short"


def test_length_on_preference_rows_and_documents():
    pair = {"id": "p", "prompt": [{"role": "user", "content": "Cancel my contract"}],
            "chosen": [{"role": "assistant", "content": "I can help you cancel it."}],
            "rejected": [{"role": "assistant", "content": "  "}]}
    assert LengthFilter().check(pair) == "too_short"  # the empty rejected reply (default min_words 1)
    assert LengthFilter(part="prompt").check(pair) is None
    assert LengthFilter(part="prompt", min_words=5).check(doc("short")) is None  # a document has no prompt side
    assert LengthFilter(min_words=5).check(doc("short")) == "too_short"


def test_length_drops_through_run_with_reason():
    step = LengthFilter(min_words=3)
    step._sink = lambda record, label, reason: dropped.append((record["id"], reason))
    dropped = []
    kept = list(step.run([doc("one two three") | {"id": "a"}, doc("one two") | {"id": "b"}]))
    assert [r["id"] for r in kept] == ["a"] and dropped == [("b", "too_short")]


def test_length_validation():
    with pytest.raises(CurationError, match="part.*'answers'"):
        LengthFilter(part="answers")
    with pytest.raises(CurationError, match="min_words.*max_words"):
        LengthFilter(min_words=10, max_words=5)


def test_kinds_limits_the_rules_to_some_record_kinds():
    chat = {"messages": [{"role": "user", "content": "Is roaming free in Spain?"},
                         {"role": "assistant", "content": "It depends."}]}
    article = {"text": "A short article."}
    only_documents = GopherQuality(kinds=["document"])
    assert only_documents.check(chat) is None
    assert only_documents.check(article) == "too_few_words"
    assert GopherQuality().check(chat) == "too_few_words"
    with pytest.raises(CurationError, match="kinds must be a list of"):
        GopherQuality(kinds=["chats"])


def test_alpha_and_stop_word_counts_match_the_word_by_word_rules():
    # The counts run in C over the common case; they must equal Gopher's word-by-word definitions exactly,
    # including numbers, underscores, apostrophes, other scripts and numeric characters that are not digits.
    pieces = ["the", "The", "THE", "and", "router", "5G", "2026", "don't", "it’s", "x_1", "__", "²", "½", "Ⅻ",
              "café", "naïve", "日本", "١٢٣", "42nd", "with", "With", "ΤΗΕ", "ǅ"]
    stops = frozenset(GOPHER_STOP_WORDS)
    rng = random.Random(0)
    for _ in range(300):
        ws = tuple(rng.choice(pieces) for _ in range(rng.randint(1, 30)))
        assert alpha_word_count(ws) == sum(any(c.isalpha() for c in w) for w in ws)
        assert stop_word_count(ws, stops) == sum(w.lower() in stops for w in ws)
