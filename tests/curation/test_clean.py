import pickle

import pytest

from curation.clean import DropBoilerplateLines, FixText
from curation.steps import REGISTRY, CurationError


def test_registered_names():
    assert REGISTRY["fix_text"] is FixText
    assert REGISTRY["drop_boilerplate_lines"] is DropBoilerplateLines


def test_mojibake_repaired_exactly_and_counted():
    step = FixText()
    out = step.apply({"id": "a", "text": "The cafÃ© doesnâ€™t open on Sundays."})
    assert out["text"] == "The café doesn’t open on Sundays."  # curly apostrophe kept: uncurl_quotes is off
    assert step.counters == {"texts_changed": 1, "mojibake_fixed": 1}


def test_uncurl_quotes_option():
    assert FixText(uncurl_quotes=True).fix("doesnâ€™t") == "doesn't"


def test_nfc_control_characters_and_whitespace():
    step = FixText()
    text = "  indented  line   with\u00a0\u00a0gaps \t \r\nbell\x07 and\x0cform\x00feed\t(tab kept)\n\n\n\n\nCafe\u0301\n"
    assert step.fix(text) == "  indented line with gaps\nbell andformfeed\t(tab kept)\n\nCafé"


def test_clean_text_is_left_alone():
    step = FixText()
    text = "Reset the router.\n\n  - hold the button\n  - wait 10 s"
    assert step.fix(text) == text
    assert step.counters == {}


def test_every_text_field_is_fixed_and_input_not_mutated():
    record = {
        "id": "p1",
        "prompt": [{"role": "user", "content": "Ã¼ber  uns?"}],
        "chosen": [{"role": "assistant", "content": "Wir sind   ein Team.  "}],
        "rejected": [{"role": "assistant", "content": "Keine Ahnung"}],
        "candidates": [{"content": "caf\u0065\u0301", "rank": 1, "score": None}],
    }
    out = FixText().apply(record)
    assert out["prompt"][0]["content"] == "über uns?"
    assert out["chosen"][0]["content"] == "Wir sind ein Team."
    assert out["rejected"][0]["content"] == "Keine Ahnung"
    assert out["candidates"][0]["content"] == "café"
    assert record["prompt"][0]["content"] == "Ã¼ber  uns?"


def test_bad_normalization_is_a_clear_error():
    with pytest.raises(CurationError, match="normalization.*'NFX'"):
        FixText(normalization="NFX")


PAGE = """Home > Support > Billing
How to read your bill

Your bill lists every call you made this month.
We use cookies to improve your experience. Accept all cookies

Click here to subscribe to our newsletter!
To check roaming charges, open the app and tap Usage; click here only if the link in the app does not work, and our support team will walk you through every line of the statement, whatever plan you are on.
Share on Facebook
© 2024 Acme Telecom. All rights reserved."""


def test_boilerplate_lines_removed_content_kept():
    step = DropBoilerplateLines()
    out = step.apply({"id": "d", "text": PAGE})
    assert out["text"] == (
        "How to read your bill\n\n"
        "Your bill lists every call you made this month.\n\n"
        "To check roaming charges, open the app and tap Usage; click here only if the link in the app does not "
        "work, and our support team will walk you through every line of the statement, whatever plan you are on.")
    assert step.counters == {"lines_removed": 5}


def test_breadcrumbs_without_home_and_false_friends():
    step = DropBoilerplateLines()
    assert step.is_boilerplate("Help › Mobile › Roaming")
    assert not step.is_boilerplate("Home/office setup guide")
    assert not step.is_boilerplate("Our privacy commitments are explained below.")


def test_custom_patterns_and_emptied_text_stays():
    step = DropBoilerplateLines(patterns=[], extra_patterns=[r"^advertisement$"])
    out = step.apply({"id": "m", "messages": [{"role": "user", "content": "Advertisement"},
                                              {"role": "assistant", "content": "Click here"}]})
    assert [m["content"] for m in out["messages"]] == ["", "Click here"]  # defaults replaced: "click here" stays
    assert step.counters == {"lines_removed": 1, "texts_emptied": 1}


def test_bad_pattern_is_a_clear_error():
    with pytest.raises(CurationError, match=r"extra_patterns.*'\(unclosed'"):
        DropBoilerplateLines(extra_patterns=["(unclosed"])


def test_survives_pickling_for_workers():
    step = pickle.loads(pickle.dumps(DropBoilerplateLines()))
    assert step.is_boilerplate("All rights reserved.")
