"""feedback.agreement: rankings -> preference pairs, aggregation and agreement, hand-computed values."""

import math

import pytest

from feedback.agreement import (
    agreement_report,
    annotator_counts,
    bradley_terry,
    bt_pairs,
    krippendorff_alpha,
    majority,
    pairwise_agreement,
    ranking_pairs,
)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# ------------------------------------------------------------------------------------------ pairs
def test_ranking_pairs_k3_with_tie():
    # a and b share rank 1, c is last: a>c and b>c, the a~b tie gives no pair
    assert ranking_pairs({"a": 1, "b": 1, "c": 2}) == [("a", "c"), ("b", "c")]
    # strict ranking of 3 gives all 3 pairs, best first whatever the input order
    assert ranking_pairs({"c": 3, "a": 1, "b": 2}) == [("a", "b"), ("a", "c"), ("b", "c")]
    assert ranking_pairs({"a": 1, "b": 1, "c": 1}) == []


# ----------------------------------------------------------------------------------- aggregation
MAJ = {
    "ann1": {"a": 1, "b": 2, "c": 3},  # a>b, a>c, b>c
    "ann2": {"a": 1, "c": 2, "b": 3},  # a>c, a>b, c>b
    "ann3": {"b": 1, "c": 1, "a": 2},  # b>a, c>a, b~c
}


def test_majority_three_annotators_split_dropped():
    # a-b: a,a,b -> 2:1 ; a-c: a,a,c -> 2:1 ; b-c: b,c,tie -> 1:1, dropped
    assert majority(MAJ) == [("a", "b", 2, 1), ("a", "c", 2, 1)]
    assert majority(MAJ, min_votes=3) == []
    # an annotator who skipped the record casts no vote
    assert majority({"ann1": {"a": 1, "b": 2}, "ann2": {}}) == [("a", "b", 1, 0)]


UNANIMOUS = {f"ann{i}": {"A": 1, "B": 2, "C": 3} for i in range(3)}
CYCLE = {
    "ann1": {"A": 1, "B": 2, "C": 3},
    "ann2": {"B": 1, "C": 2, "A": 3},
    "ann3": {"C": 1, "A": 2, "B": 3},
}
# Contested: A>B>C, A>C>B, B>A>C. Each pair is compared 3 times (round robin), wins A=5, B=3, C=1.
# In a balanced round robin the BT MLE orders items by total wins (its likelihood equations are
# wins_i = sum_j n_ij * sigmoid(s_i - s_j) with equal n_ij), so s_A > s_B > s_C.
CONTESTED = {
    "ann1": {"A": 1, "B": 2, "C": 3},
    "ann2": {"A": 1, "C": 2, "B": 3},
    "ann3": {"B": 1, "A": 2, "C": 3},
}


def test_bradley_terry_unanimous_order():
    # unregularised ML diverges here (A never loses); alpha=0.01 keeps it finite
    s = bradley_terry(UNANIMOUS)
    assert s["A"] > s["B"] > s["C"]
    assert all(math.isfinite(v) for v in s.values())
    pairs = bt_pairs(UNANIMOUS)
    assert pairs[0][:2] == ("A", "C")  # largest gap first
    assert {p[:2] for p in pairs[1:]} == {("A", "B"), ("B", "C")}
    # (not asserted: gap(A,B) == gap(B,C). The data are symmetric under A<->C, but ILSR's alpha
    #  pseudo-counts are not a symmetric prior, so the two gaps differ: ~3.9 vs ~4.6)


def test_bradley_terry_cycle_is_a_draw():
    # a perfect cycle is symmetric: every candidate wins 3 of 6 comparisons -> equal strengths
    s = bradley_terry(CYCLE)
    assert s["A"] == pytest.approx(s["B"], abs=1e-6) == pytest.approx(s["C"], abs=1e-6)
    assert bt_pairs(CYCLE) == []
    # majority, by contrast, keeps the intransitive set A>B, C>A, B>C (each 2:1), a cycle that a
    # reward model cannot fit; BT resolves it to "no preference"
    assert {(w, lo) for w, lo, _, _ in majority(CYCLE)} == {("A", "B"), ("C", "A"), ("B", "C")}


def test_bradley_terry_contested_order_and_likelihood_equations():
    s = bradley_terry(CONTESTED)
    assert s["A"] > s["B"] > s["C"]
    # ML equations, hand-written: wins_A = 3*sig(sA-sB) + 3*sig(sA-sC) = 5, wins_C = 1
    # (alpha=0.01 regularisation moves them slightly)
    assert 3 * sigmoid(s["A"] - s["B"]) + 3 * sigmoid(s["A"] - s["C"]) == pytest.approx(5, abs=0.05)
    assert 3 * sigmoid(s["C"] - s["A"]) + 3 * sigmoid(s["C"] - s["B"]) == pytest.approx(1, abs=0.05)
    gaps = {(w, lo): g for w, lo, g in bt_pairs(CONTESTED)}
    assert set(gaps) == {("A", "B"), ("A", "C"), ("B", "C")}
    # margin filters the closest pair out: A-B gap is the smallest (2:1 and A also beats C more)
    small = min(gaps.values())
    assert [(w, lo) for w, lo, _ in bt_pairs(CONTESTED, margin=small + 1e-9)] == [
        p for p in gaps if gaps[p] > small
    ]


def test_bradley_terry_all_tied_or_empty():
    assert bradley_terry({"x": {"a": 1, "b": 1}}) == {"a": 0.0, "b": 0.0}
    assert bt_pairs({"x": {"a": 1, "b": 1}}) == []


# -------------------------------------------------------------------------------------- agreement
def test_alpha_identical_rankings_is_one():
    data = {
        "r1": {"x": {"a": 1, "b": 2, "c": 3}, "y": {"a": 1, "b": 2, "c": 3}},
        "r2": {"x": {"d": 2, "e": 1}, "y": {"d": 2, "e": 1}, "z": {"d": 2, "e": 1}},
    }
    assert krippendorff_alpha(data) == pytest.approx(1.0)


DISAGREE = {"r1": {"x": {"a": 1, "b": 2, "c": 3}, "y": {"a": 1, "b": 3, "c": 2}}}


def test_alpha_hand_computed_ordinal():
    # Units a:(1,1) b:(2,3) c:(3,2). Coincidences (m_u = 2, weight 1/(m_u-1) = 1):
    #   o11 = 2, o23 = o32 = 2; n1 = n2 = n3 = 2, n = 6.
    # Ordinal distance d(c,k) = (sum_{g=c..k} n_g - (n_c + n_k)/2)^2:
    #   d12 = (4 - 2)^2 = 4, d23 = 4, d13 = (6 - 2)^2 = 16.
    # D_o = (1/n) sum o_ck d_ck = (2*4 + 2*4)/6 = 16/6
    # D_e = 1/(n(n-1)) sum n_c n_k d_ck = 2*(4*4 + 4*16 + 4*4)/30 = 192/30
    # alpha = 1 - D_o/D_e = 1 - 5/12 = 7/12
    assert krippendorff_alpha(DISAGREE) == pytest.approx(7 / 12)
    # a record only one annotator ranked adds no pairable unit: alpha unchanged
    more = {**DISAGREE, "r2": {"x": {"p": 1, "q": 2, "s": 5}}}
    assert krippendorff_alpha(more) == pytest.approx(7 / 12)
    # only the order of ranks matters (1,3,9 == 1,2,3)
    gaps = {"r1": {"x": {"a": 1, "b": 3, "c": 9}, "y": {"a": 1, "b": 3, "c": 2}}}
    assert krippendorff_alpha(gaps) == pytest.approx(7 / 12)


def test_alpha_none_without_overlap():
    assert krippendorff_alpha({"r1": {"x": {"a": 1, "b": 2}}}) is None  # one annotator
    # two annotators who never ranked the same record
    assert krippendorff_alpha({"r1": {"x": {"a": 1, "b": 2}}, "r2": {"y": {"c": 1, "d": 2}}}) is None
    assert krippendorff_alpha({}) is None
    # overlap, but every rank is a tie: expected disagreement 0, alpha undefined
    assert krippendorff_alpha({"r1": {"x": {"a": 1, "b": 1}, "y": {"a": 1, "b": 1}}}) is None


PW = {
    # x vs y: a-b agree (a), a-c agree (a), b-c disagree (b vs c) -> 2 of 3
    "r1": {"x": {"a": 1, "b": 2, "c": 3}, "y": {"a": 1, "b": 3, "c": 2}},
    # pair p-q: x tie, y p>q, z tie -> (x,y) disagree, (x,z) agree, (y,z) disagree -> 1 of 3
    "r2": {"x": {"p": 1, "q": 1}, "y": {"p": 1, "q": 2}, "z": {"p": 2, "q": 2}},
    # single annotator: no comparison
    "r3": {"z": {"u": 1, "v": 2}},
}


def test_pairwise_agreement_by_hand():
    assert pairwise_agreement(PW) == pytest.approx(3 / 6)
    assert pairwise_agreement(DISAGREE) == pytest.approx(2 / 3)
    assert pairwise_agreement({"r3": PW["r3"]}) is None
    # only candidates both annotators ranked are compared: just a-b here, and they agree
    partial = {"r": {"x": {"a": 1, "b": 2, "c": 3}, "y": {"a": 1, "b": 2}}}
    assert pairwise_agreement(partial) == 1.0


def test_annotator_counts():
    assert annotator_counts(PW) == {
        "x": {"records": 2, "pairs": 3 + 0},
        "y": {"records": 2, "pairs": 3 + 1},
        "z": {"records": 2, "pairs": 0 + 1},
    }


def test_agreement_report_bundles():
    rep = agreement_report(PW)
    assert rep["pairwise_agreement"] == pytest.approx(0.5)
    assert rep["comparisons"] == 6
    assert rep["records"] == 3 and rep["records_with_overlap"] == 2
    assert rep["annotators"] == annotator_counts(PW)
    assert isinstance(rep["krippendorff_alpha_ordinal"], float)
