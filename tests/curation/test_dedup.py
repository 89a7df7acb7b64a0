import random

import numpy as np
import pytest

from curation.dedup import (
    ExactDedup,
    MinhashDedup,
    MinHasher,
    optimal_bands,
    shingle_hashes,
)
from curation.records import words
from curation.steps import CurationError
from tests.curation.helpers import run_step as run

VOCAB = [f"word{i}" for i in range(3000)]


def doc(rng, n=200):
    return [rng.choice(VOCAB) for _ in range(n)]


def mutate(tokens, positions, rng):
    out = list(tokens)
    for p in positions:
        out[p] = f"changed{rng.randrange(10**9)}"
    return out


def true_jaccard(a, b, n=5):
    sa = set(zip(*(a[i:] for i in range(n))))
    sb = set(zip(*(b[i:] for i in range(n))))
    return len(sa & sb) / len(sa | sb)


def rec(i, tokens_or_text):
    text = tokens_or_text if isinstance(tokens_or_text, str) else " ".join(tokens_or_text)
    return {"id": f"r{i}", "text": text}


# --- exact_dedup -------------------------------------------------------------------------------------------------


def test_exact_dedup_catches_case_punctuation_and_space_variants():
    records = [rec(0, "Hello, World! How are you?"), rec(1, "hello world how are you"),
               rec(2, "HELLO   world -- how are you??"), rec(3, "Hello world, how are they?"),
               {"id": "c1", "messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hey."}]},
               {"id": "c2", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "HEY"}]}]
    step = ExactDedup()
    kept, rejects = run(step, records)
    assert [r["id"] for r in kept] == ["r0", "r3", "c1"]
    assert [(r["id"], r["meta"]["duplicate_of"], why) for r, why in rejects] == [
        ("r1", "r0", "exact_duplicate"), ("r2", "r0", "exact_duplicate"), ("c2", "c1", "exact_duplicate")]
    assert step.counters["clusters"] == 2
    assert "meta" not in records[1]  # the rejects get a copy; the input record is untouched


def test_exact_dedup_keeps_existing_meta():
    records = [rec(0, "same text"), {**rec(1, "Same text."), "meta": {"lang": "en"}}]
    _, rejects = run(ExactDedup(), records)
    assert rejects[0][0]["meta"] == {"lang": "en", "duplicate_of": "r0"}
    assert records[1]["meta"] == {"lang": "en"}


# --- minhash_dedup -----------------------------------------------------------------------------------------------


def test_near_duplicates_dropped_pointing_at_first_and_unrelated_kept():
    rng = random.Random(7)
    base = doc(rng)
    variants = [mutate(base, [10 + 40 * k, 30 + 40 * k], rng) for k in range(4)]  # two words changed in each
    for v in variants:
        assert 0.88 < true_jaccard(base, v) < 0.92
    unrelated = [doc(rng) for _ in range(3)]
    far = mutate(base, range(3, 200, 8), rng)  # every 8th word changed: shares almost no 5-gram with base
    assert true_jaccard(base, far) < 0.3
    records = [rec(0, base)] + [rec(i + 1, v) for i, v in enumerate(variants)] + \
              [rec(10 + i, u) for i, u in enumerate(unrelated)] + [rec(20, far)]
    step = MinhashDedup(hash_seed=1)
    kept, rejects = run(step, records)
    assert [r["id"] for r in kept] == ["r0", "r10", "r11", "r12", "r20"]
    assert [(r["id"], r["meta"]["duplicate_of"], why) for r, why in rejects] == [
        (f"r{i}", "r0", "near_duplicate") for i in range(1, 5)]
    assert all(r["meta"]["jaccard_estimate"] >= 0.8 for r, _ in rejects)
    assert step.counters["clusters"] == 1


def test_pair_below_threshold_kept_even_when_lsh_proposes_it():
    rng = random.Random(3)
    base = doc(rng)
    half = mutate(base, range(0, 200, 12), rng)
    assert 0.35 < true_jaccard(base, half) < 0.65
    # One row per band: any shared minimum makes a candidate, so only the Jaccard check can keep this pair apart.
    step = MinhashDedup(bands=128, rows=1, hash_seed=0)
    kept, rejects = run(step, [rec(0, base), rec(1, half)])
    assert [r["id"] for r in kept] == ["r0", "r1"] and rejects == []
    assert step.counters["candidates_checked"] == 1 and step.counters["false_candidates"] == 1


def test_signature_estimates_true_jaccard():
    rng = random.Random(11)
    base = doc(rng)
    hasher = MinHasher(128, seed=5)
    sig = hasher.signature(shingle_hashes(words(" ".join(base)), 5))
    for every in (40, 20, 12, 8):
        other = mutate(base, range(1, 200, every), rng)
        other_sig = hasher.signature(shingle_hashes(words(" ".join(other)), 5))
        estimate = float(np.mean(sig == other_sig))
        assert abs(estimate - true_jaccard(base, other)) < 0.1, (every, estimate, true_jaccard(base, other))


def test_shingles_are_case_insensitive_and_short_documents_get_one_shingle():
    assert len(shingle_hashes(tuple("a b c d e f".split()), 5)) == 2
    assert list(shingle_hashes(("The", "Cat"), 5)) == list(shingle_hashes(("the", "cAT"), 5))
    assert len(shingle_hashes(("the", "cat"), 5)) == 1
    assert list(shingle_hashes(("cat", "the"), 5)) != list(shingle_hashes(("the", "cat"), 5))
    step = MinhashDedup(hash_seed=0)
    kept, rejects = run(step, [rec(0, "The cat sat."), rec(1, "the CAT, sat"), rec(2, "the cat stood"), rec(3, "")])
    assert [r["id"] for r in kept] == ["r0", "r2", "r3"]
    assert rejects[0][0]["meta"]["duplicate_of"] == "r0"
    assert step.counters["no_words"] == 1


def test_same_seed_same_result_and_seed_matters():
    rng = random.Random(5)
    base = doc(rng)
    records = [rec(0, base)] + [rec(i, mutate(base, range(i, 200, 15 + i), rng)) for i in range(1, 8)]
    results = []
    for _ in range(2):
        kept, rejects = run(MinhashDedup(hash_seed=42), records)
        results.append(([r["id"] for r in kept], [(r["id"], r["meta"]) for r, _ in rejects]))
    assert results[0] == results[1]
    tokens = words(" ".join(base))
    assert not np.array_equal(MinHasher(128, 1).signature(shingle_hashes(tokens, 5)),
                              MinHasher(128, 2).signature(shingle_hashes(tokens, 5)))


def test_recipe_seed_is_the_default_hash_seed():
    rng = random.Random(2)
    base = doc(rng)
    records = [rec(0, base), rec(1, mutate(base, [20, 100], rng))]

    def estimate(recipe_seed, hash_seed=None):
        step = MinhashDedup(hash_seed=hash_seed)
        step.seed = recipe_seed
        return run(step, records)[1][0][0]["meta"]["jaccard_estimate"]

    assert estimate(9) == estimate(0, hash_seed=9) == estimate(3, hash_seed=9)
    assert estimate(9) != estimate(10)


def test_band_choice_matches_datasketch_and_options_are_validated():
    assert optimal_bands(0.8, 128) == (9, 13)  # what datasketch's MinHashLSH(threshold=0.8, num_perm=128) picks
    assert (MinhashDedup().bands, MinhashDedup().rows) == (14, 9)  # the step weighs false negatives 9:1
    b, r = optimal_bands(0.5, 64)
    assert b * r <= 64 and b > 9  # a lower threshold needs more, shorter bands
    with pytest.raises(CurationError, match=r"bands \* rows must be <= num_perm \(128\), got 20 \* 10 = 200"):
        MinhashDedup(bands=20, rows=10)
    with pytest.raises(CurationError, match="give both bands and rows"):
        MinhashDedup(bands=20)
    with pytest.raises(CurationError, match=r"threshold must be a number in \(0, 1\], got 1.5"):
        MinhashDedup(threshold=1.5)
    with pytest.raises(CurationError, match="ngram must be a positive integer, got 0"):
        MinhashDedup(ngram=0)


def test_transitive_joins_a_cluster_through_a_dropped_member():
    # a -> b -> c: b is a near duplicate of a, c of b, but c and a are too far apart to be matched directly.
    rng = random.Random(4)
    a = doc(rng)
    b = mutate(a, [20, 80, 140], rng)
    c = mutate(b, [50, 110, 170], rng)
    assert true_jaccard(a, b) > 0.85 and true_jaccard(b, c) > 0.85 and true_jaccard(a, c) < 0.75
    records = [rec(0, a), rec(1, b), rec(2, c)]

    kept, rejects = run(MinhashDedup(hash_seed=1), records)  # default: only kept records are compared
    assert [r["id"] for r in kept] == ["r0", "r2"]
    assert [(r["id"], r["meta"]["duplicate_of"]) for r, _ in rejects] == [("r1", "r0")]
    assert "matched" not in rejects[0][0]["meta"]

    step = MinhashDedup(hash_seed=1, transitive=True)
    kept, rejects = run(step, records)
    assert [r["id"] for r in kept] == ["r0"]
    assert [(r["id"], r["meta"]["duplicate_of"], r["meta"].get("matched")) for r, _ in rejects] == [
        ("r1", "r0", None), ("r2", "r0", "r1")]  # c names the kept record of its cluster, and whom it matched
    assert step.counters["clusters"] == 1
    with pytest.raises(CurationError, match="transitive must be true or false"):
        MinhashDedup(transitive="yes")
