import pickle

import pytest

from curation.chunking import ChunkSentences, pack, paragraphs, split_at_whitespace
from curation.records import make_lineage
from curation.steps import REGISTRY, CurationError

SENTENCES = [
    "Roaming charges apply when you use your phone abroad.",
    "Within the European Union, calls cost the same as at home.",
    "Data is different: a fair use limit applies.",
    "Once it is reached, a small surcharge per gigabyte may be added.",
    "Check the limit in the app before you travel.",
    "Switch off data roaming if you want to be sure.",
    "Mr. Smith from support can explain the details.",
    "Calls to satellite networks are never included!",
    "Do you need a travel add-on?",
    "Ask in any shop or in the app.",
]
DOC = " ".join(SENTENCES[:5]) + "\n\n" + " ".join(SENTENCES[5:])  # 473 characters, two paragraphs


def parent(text, **extra):
    return {"id": "p1", "source": "docs:faq", "lineage": make_lineage("faq.jsonl", 3), "text": text,
            "meta": {"topic": "roaming"}, **extra}


def squash(text):
    return "".join(text.split())


def test_registered():
    assert REGISTRY["chunk_sentences"] is ChunkSentences and ChunkSentences.creates


def test_long_document_becomes_chunks_of_whole_sentences():
    step = ChunkSentences(target_chars=150, max_chars=200)
    chunks = list(step.run([parent(DOC, score=4.5)]))
    texts = [c["text"] for c in chunks]
    assert len(chunks) == 4  # 112, 109, 142 and 107 characters
    assert all(len(t) <= 150 for t in texts)  # every sentence here is shorter than the target
    assert all(t.endswith((".", "!", "?")) for t in texts)  # no chunk ends mid-sentence
    assert all(any(t.startswith(s) for s in SENTENCES) for t in texts)  # nor starts mid-sentence
    assert "Mr. Smith from support can explain the details." in "\n".join(texts)  # "Mr." is no sentence end
    assert squash("".join(texts)) == squash(DOC)  # nothing lost, nothing repeated
    for i, c in enumerate(chunks):
        assert c["lineage"] == {"path": "faq.jsonl", "row": 3, "parent": "p1", "chunk": i}
        assert c["source"] == "docs:faq" and c["meta"] == {"topic": "roaming"} and c["score"] == 4.5
    assert len({c["id"] for c in chunks}) == len(chunks) and "p1" not in {c["id"] for c in chunks}
    assert step.counters == {"documents_chunked": 1, "chunks_created": len(chunks)}


def test_chunk_keeps_original_spacing_inside():
    assert ChunkSentences(target_chars=600).chunk(DOC) == [DOC]  # the paragraph break stays inside the passage


def test_document_that_is_one_sentence_passes_through():
    sentence = " ".join(["word"] * 50) + "."  # 250 characters: over the target, under max_chars
    record = parent(sentence)
    step = ChunkSentences(target_chars=200, max_chars=300)
    assert list(step.run([record])) == [record]
    assert step.counters == {}


def test_heading_without_punctuation_is_not_glued_to_next_sentence():
    text = "Roaming in Europe\n\n" + " ".join(SENTENCES)
    units = ChunkSentences().sentences(text)
    assert text[units[0][0]:units[0][1]] == "Roaming in Europe"


def test_overlong_sentence_is_cut_at_whitespace_and_counted():
    long_sentence = " ".join(["word"] * 150) + "."  # 750 characters, no sentence end inside
    step = ChunkSentences(target_chars=200, max_chars=300)
    chunks = list(step.run([parent(SENTENCES[0] + " " + long_sentence)]))
    texts = [c["text"] for c in chunks]
    assert all(len(t) <= 300 for t in texts)
    assert all(not t.startswith(" ") and not t.endswith(" ") for t in texts)
    assert squash("".join(texts)) == squash(SENTENCES[0] + long_sentence)
    assert step.counters["sentences_split_hard"] == 1


def test_overlap_repeats_the_last_sentence():
    chunks = ChunkSentences(target_chars=150, max_chars=200, overlap_sentences=1).chunk(" ".join(SENTENCES))
    for before, after in zip(chunks, chunks[1:]):
        last = next(s for s in SENTENCES if before.endswith(s))
        assert after.startswith(last)


def test_short_documents_and_other_records_pass_through_unchanged():
    step = ChunkSentences(target_chars=1000)
    chat = {"id": "c", "messages": [{"role": "user", "content": DOC * 5}]}
    short = parent(DOC)
    assert list(step.run([short, chat])) == [short, chat]
    assert step.counters == {}


def test_helpers_by_hand():
    assert paragraphs("  a b \n \n\n c\n\n") == [(2, 5), (11, 12)]
    assert split_at_whitespace("aaa bbb ccc", 0, 11, 7) == [(0, 7), (8, 11)]
    assert split_at_whitespace("abcdefgh", 0, 8, 3) == [(0, 3), (3, 6), (6, 8)]  # no whitespace: cut in the word
    units = [(0, 10), (11, 20), (21, 30), (31, 40)]
    assert pack(units, 20, 0) == [(0, 2), (2, 4)]
    assert pack(units, 20, 1) == [(0, 2), (1, 3), (2, 4)]
    assert pack(units, 5, 3) == [(0, 1), (1, 2), (2, 3), (3, 4)]  # overlap never stalls


def test_trained_pipeline_loaded_by_path_relative_to_recipe(tmp_path):
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    nlp.to_disk(tmp_path / "sent_model")
    step = ChunkSentences(target_chars=150, max_chars=200, model="sent_model")
    step.base_dir = tmp_path
    assert step.chunk(DOC) == ChunkSentences(target_chars=150, max_chars=200).chunk(DOC)


def test_pipeline_without_sentence_component_is_a_clear_error(tmp_path):
    import spacy

    spacy.blank("en").to_disk(tmp_path / "bare")
    step = ChunkSentences(model=str(tmp_path / "bare"))
    with pytest.raises(CurationError, match="no parser, senter or sentencizer"):
        step.chunk(DOC)


def test_bad_options_are_clear_errors():
    with pytest.raises(CurationError, match="max_chars.*target_chars"):
        ChunkSentences(target_chars=500, max_chars=100)
    with pytest.raises(CurationError, match="overlap_sentences.*-1"):
        ChunkSentences(overlap_sentences=-1)
    with pytest.raises(CurationError, match="target_chars.*'big'"):
        ChunkSentences(target_chars="big")
    with pytest.raises(CurationError, match="language 'klingon'"):
        ChunkSentences(language="klingon").chunk(DOC * 10)
    with pytest.raises(CurationError, match="cannot load spaCy model 'no_such_model'"):
        ChunkSentences(model="no_such_model").chunk(DOC)


def test_nlp_is_not_pickled():
    step = ChunkSentences(target_chars=150, max_chars=200)
    step.chunk(DOC)
    clone = pickle.loads(pickle.dumps(step))
    assert "_nlp" not in clone.__dict__ and clone.chunk(DOC) == step.chunk(DOC)
