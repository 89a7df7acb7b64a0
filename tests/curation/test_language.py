import pickle

import pytest

from curation.language import DEFAULT_CANDIDATES, LanguageFilter
from curation.steps import REGISTRY, CurationError

EN = "Your new SIM card arrives within three working days. Insert it, restart the phone and enter the PIN from the letter."
DE = "Ihre neue SIM-Karte kommt innerhalb von drei Werktagen an. Legen Sie sie ein und starten Sie das Telefon neu."
FR = "Votre nouvelle carte SIM arrive sous trois jours ouvrés. Insérez-la, redémarrez le téléphone et saisissez le code."


def run(step, records):
    dropped = []
    step._sink = lambda record, label, reason: dropped.append((record["id"], reason, record["meta"]["lang"]))
    kept = list(step.run(records))
    return kept, dropped


def test_registered():
    assert REGISTRY["language"] is LanguageFilter


@pytest.mark.parametrize("low_accuracy", [True, False])
def test_german_and_french_dropped_english_kept(low_accuracy):
    # Three candidates keep the high-accuracy model load under a second; the defaults load fourteen (~4 s).
    step = LanguageFilter(candidates=["de", "fr"], low_accuracy=low_accuracy)
    records = [{"id": "en", "text": EN, "meta": {"topic": "sim"}}, {"id": "de", "text": DE}, {"id": "fr", "text": FR}]
    kept, dropped = run(step, records)
    assert [r["id"] for r in kept] == ["en"]
    assert kept[0]["meta"] == {"topic": "sim", "lang": "en"}
    assert records[0]["meta"] == {"topic": "sim"}  # the input record is not mutated
    assert dropped == [("de", "language:de", "de"), ("fr", "language:fr", "fr")]
    assert dict(step.drops) == {"language:de": 1, "language:fr": 1}


def test_conversation_text_is_detected_and_several_languages_allowed():
    step = LanguageFilter(allow=["en", "de"], candidates=["fr"], low_accuracy=True)
    chat = {"id": "c", "messages": [{"role": "user", "content": DE}, {"role": "assistant", "content": DE}]}
    kept, dropped = run(step, [chat])
    assert kept[0]["meta"]["lang"] == "de" and dropped == []


def test_no_letters_is_unknown():
    step = LanguageFilter(candidates=["de"], low_accuracy=True)
    kept, dropped = run(step, [{"id": "n", "text": "1234 5678 ---"}])
    assert kept == [] and dropped == [("n", "language:unknown", "unknown")]


def test_min_confidence_decides_ambiguous_text():
    # lingua's low-accuracy confidences for "SIM" among en/de/fr: en 0.47, fr 0.42, de 0.11.
    assert LanguageFilter(candidates=["de", "fr"], low_accuracy=True, min_confidence=0.5).check({"text": "SIM"}) \
        == "language:unknown"
    assert LanguageFilter(candidates=["de", "fr"], low_accuracy=True, min_confidence=0.4).check({"text": "SIM"}) is None


def test_only_max_chars_are_read():
    step = LanguageFilter(candidates=["de"], low_accuracy=True, max_chars=len(DE))
    assert step.check({"text": DE + " " + EN * 5}) == "language:de"


def test_defaults_and_validation():
    step = LanguageFilter()
    assert step.allow == ["en"] and step.candidates == DEFAULT_CANDIDATES
    assert LanguageFilter(allow=["EN", "ja"], candidates=["de"]).candidates == ["de", "en", "ja"]
    with pytest.raises(CurationError, match="allow.*'xx'"):
        LanguageFilter(allow=["xx"])
    with pytest.raises(CurationError, match="at least two"):
        LanguageFilter(allow=["en"], candidates=["en"])
    with pytest.raises(CurationError, match="min_confidence.*1.5"):
        LanguageFilter(min_confidence=1.5)
    with pytest.raises(CurationError, match="min_confidence.*'high'"):
        LanguageFilter(min_confidence="high")
    assert LanguageFilter(allow="de", candidates="en").candidates == ["en", "de"]  # a lone code from YAML


def test_detector_is_not_pickled():
    step = LanguageFilter(candidates=["de"], low_accuracy=True)
    assert step.check({"text": EN}) is None
    clone = pickle.loads(pickle.dumps(step))
    assert "_detector" not in clone.__dict__
    assert clone.check({"text": DE}) == "language:de"
