"""Preference pairs and inter-annotator agreement from human rankings (issue 4, `rlhf feedback pull`).

Pure computation, no Argilla import: `feedback pull` reads the ranks from Argilla's REST API and hands
them here. Argilla itself has no agreement metrics (argilla-io/argilla#4175, #3467), so we compute them.

Data shapes
-----------
* ``ranks``: one annotator's ranking of one record, ``{candidate_id: rank}``; rank 1 = best, equal ranks =
  a tie. Only the *order* of the ranks matters (``{a: 1, b: 3}`` means the same as ``{a: 1, b: 2}``).
* ``record_rankings``: every annotator's ranking of one record, ``{annotator: ranks}``.
* ``all_rankings``: ``{record_id: record_rankings}``. An annotator may skip a record (absent key) and may
  leave candidates out of a ranking (absent candidate = missing, not "worst").

Libraries do the statistics: ``krippendorff`` (PyPI) computes alpha, ``choix`` (PyPI) fits
Bradley-Terry. What is here is the bookkeeping around them.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

Ranks = Mapping[Any, int]
RecordRankings = Mapping[Any, Ranks]
AllRankings = Mapping[Any, RecordRankings]


# --------------------------------------------------------------------------------------------- pairs
def ranking_pairs(ranks: Ranks) -> list[tuple[Any, Any]]:
    """All ``(winner, loser)`` pairs implied by one ranking; tied candidates give no pair.

    WHY all pairs rather than adjacent ones or best-vs-rest: a ranking of K candidates states
    K*(K-1)/2 preferences, and a preference dataset / reward model (Bradley-Terry loss) uses every one
    of them (InstructGPT trains on all K-choose-2 comparisons of a ranking). WHY ties are dropped: a
    chosen/rejected pair needs a strict preference; a tie says nothing about which one to prefer.
    Pairs come out best-first (by rank, then by the ranking's own candidate order) so output is stable.
    """
    ordered = sorted(ranks, key=lambda c: ranks[c])  # sorted() is stable: equal ranks keep input order
    return [(a, b) for a, b in itertools.combinations(ordered, 2) if ranks[a] < ranks[b]]


def _outcome(ranks: Ranks, a: Any, b: Any) -> int:
    """-1 if ``a`` is preferred, 1 if ``b`` is, 0 for a tie (lower rank = better)."""
    return (ranks[a] > ranks[b]) - (ranks[a] < ranks[b])


def _candidates(record_rankings: RecordRankings) -> list[Any]:
    """Candidates of one record in first-seen order (deterministic, no need for them to be sortable)."""
    return list(dict.fromkeys(c for ranks in record_rankings.values() for c in ranks))


# ------------------------------------------------------------------------------------- aggregation
def majority(record_rankings: RecordRankings, min_votes: int = 1) -> list[tuple[Any, Any, int, int]]:
    """Majority vote per candidate pair of one record: ``(winner, loser, votes_for, votes_against)``.

    For every pair, count the annotators who strictly prefer each side (an annotator who tied the two,
    or did not rank both, casts no vote). The pair is kept when one side has strictly more votes and at
    least ``min_votes`` of them. WHY drop equal votes (e.g. a 1-1 split): the annotators disagree, so
    neither direction is a trustworthy training label. WHY ``min_votes``: with overlap N you may want
    e.g. 2 agreeing annotators before you train on a pair. The vote counts are returned so the caller
    can weight or filter by margin later.
    """
    cands = _candidates(record_rankings)
    out: list[tuple[Any, Any, int, int]] = []
    for a, b in itertools.combinations(cands, 2):
        votes = Counter(
            _outcome(r, a, b) for r in record_rankings.values() if a in r and b in r
        )
        for_a, for_b = votes[-1], votes[1]
        if for_a == for_b:
            continue
        win, lose, vf, va = (a, b, for_a, for_b) if for_a > for_b else (b, a, for_b, for_a)
        if vf >= min_votes:
            out.append((win, lose, vf, va))
    out.sort(key=lambda t: (-(t[2] - t[3]), -t[2]))  # clearest majorities first (stable otherwise)
    return out


def bradley_terry(record_rankings: RecordRankings, alpha: float = 0.01) -> dict[Any, float]:
    """Bradley-Terry strength per candidate of one record, fitted with ``choix.ilsr_pairwise``.

    Every annotator's strict pairs (:func:`ranking_pairs`) are the comparisons; ties are dropped
    because plain BT (and choix) has no tie outcome. Scores are log-strengths, centred at 0 by choix;
    P(i beats j) = 1 / (1 + exp(s_j - s_i)). A candidate that appears in no strict pair gets 0.

    WHY BT rather than majority: it pools all comparisons, so a cycle or a split vote is resolved by
    the other comparisons instead of being dropped, and the score gap is a calibrated confidence.

    WHY ``alpha > 0`` (regularisation): when the data are unanimous (everyone ranks A > B > C) the
    maximum-likelihood estimate does not exist - A's strength goes to infinity; ILSR's Markov chain has
    an absorbing state and choix raises "stationary distribution could not be computed". Likewise when
    the comparison graph is disconnected. A small ``alpha`` adds a weak uniform prior (a pseudo-count of
    ``alpha`` on every transition of the LSR chain), which makes the estimate finite and unique while
    barely moving items that real comparisons already separate. 0.01 is small against even one real
    comparison.
    """
    import choix  # local: only needed when BT aggregation is requested

    cands = _candidates(record_rankings)
    index = {c: i for i, c in enumerate(cands)}
    data = [
        (index[w], index[lo]) for ranks in record_rankings.values() for w, lo in ranking_pairs(ranks)
    ]
    if not data:
        return {c: 0.0 for c in cands}
    params = choix.ilsr_pairwise(len(cands), data, alpha=alpha)
    return {c: float(params[index[c]]) for c in cands}


def bt_pairs(
    record_rankings: RecordRankings, alpha: float = 0.01, margin: float = 0.0,
    scores: Mapping[Any, float] | None = None,
) -> list[tuple[Any, Any, float]]:
    """Pairs ordered by Bradley-Terry score: ``(winner, loser, score_gap)`` with ``score_gap > margin``.

    WHY a margin: near-equal scores (a contested or cyclic pair) are noise as training labels; a gap of
    ``m`` means the model gives the winner probability ``1 / (1 + exp(-m))`` (e.g. m = 1.1 -> 0.75).
    With the default ``margin=0`` only equal scores (all ties, or a perfect cycle; equality up to 1e-6,
    ILSR's convergence tolerance being 1e-8) are dropped.
    Largest gaps first. ``scores``: a :func:`bradley_terry` result for these rankings, when the caller
    already has it (``feedback pull`` reports the strengths too), so the model is not fitted twice.
    """
    if scores is None:
        scores = bradley_terry(record_rankings, alpha=alpha)
    out = []
    for a, b in itertools.combinations(scores, 2):
        gap = scores[a] - scores[b]
        if abs(gap) > margin and not math.isclose(gap, 0.0, abs_tol=1e-6):
            out.append((a, b, gap) if gap > 0 else (b, a, -gap))
    out.sort(key=lambda t: -t[2])
    return out


# --------------------------------------------------------------------------------------- agreement
def _dense(ranks: Ranks) -> dict[Any, int]:
    """Re-number ranks densely (1, 1, 3 -> 1, 1, 2): only the order of an annotator's ranks means
    anything, and the ordinal metric must not see a gap as a disagreement."""
    levels = {r: i + 1 for i, r in enumerate(sorted(set(ranks.values())))}
    return {c: levels[r] for c, r in ranks.items()}


def krippendorff_alpha(all_rankings: AllRankings) -> float | None:
    """Krippendorff's alpha, ordinal level, over the ranks annotators gave; ``None`` when undefined.

    Layout of ``krippendorff.alpha``'s ``reliability_data``: one row per annotator (coder), one column
    per (record, candidate) (unit), the value is that annotator's rank for that candidate, ``nan`` where
    the annotator skipped the record or the candidate. WHY the candidate is the unit: alpha measures
    whether coders assign the same value to the same thing; here the thing being judged is a candidate
    response and the value assigned is its rank position, which is an ordered category (1st better than
    2nd better than 3rd, but the distance 1st-2nd is not known to equal 2nd-3rd - hence "ordinal", not
    "interval"). Putting candidates of *all* records into one matrix lets records with different
    annotators and different K share one alpha, and ``nan`` handles sparse overlap exactly as alpha is
    defined (only units coded by >= 2 coders are pairable). The alternative unit - a candidate pair with
    nominal value "a better / b better / tie" - is what :func:`pairwise_agreement` reports. Caveat:
    ranks within one ranking are not independent (a ranking is a permutation), so read alpha as a
    descriptive figure, not as a test statistic.

    Ranks are made dense per ranking first (:func:`_dense`). Returns ``None`` when no unit was ranked by
    at least two annotators (nothing to compare), or when alpha is undefined because every rank given
    on the overlapping units is the same value (zero expected disagreement, e.g. everything tied).
    """
    import krippendorff  # local: only needed for the report

    annotators = list(dict.fromkeys(a for rr in all_rankings.values() for a in rr))
    units = [
        (rid, c) for rid, rr in all_rankings.items() for c in _candidates(rr)
    ]
    if len(annotators) < 2 or not units:
        return None
    row = {a: i for i, a in enumerate(annotators)}
    col = {u: j for j, u in enumerate(units)}
    data = np.full((len(annotators), len(units)), np.nan)
    for rid, rr in all_rankings.items():
        for ann, ranks in rr.items():
            for c, r in _dense(ranks).items():
                data[row[ann], col[(rid, c)]] = r
    pairable = (~np.isnan(data)).sum(axis=0) >= 2
    if not pairable.any():
        return None
    data = data[:, pairable]  # unpairable values do not enter alpha anyway; dropping them avoids
    # a value domain that exists only in unpaired units
    if len(np.unique(data[~np.isnan(data)])) < 2:
        return None
    value = float(krippendorff.alpha(reliability_data=data, level_of_measurement="ordinal"))
    return None if math.isnan(value) else value


def _comparisons(all_rankings: AllRankings):
    """Yield ``(outcome_1, outcome_2)`` for every annotator pair x candidate pair they both ranked."""
    for rr in all_rankings.values():
        for (_, r1), (_, r2) in itertools.combinations(rr.items(), 2):
            shared = [c for c in r1 if c in r2]
            for a, b in itertools.combinations(shared, 2):
                yield _outcome(r1, a, b), _outcome(r2, a, b)


def pairwise_agreement(all_rankings: AllRankings) -> float | None:
    """Share of (annotator pair x candidate pair) comparisons on which the two annotators agree.

    For every record, every two annotators who both ranked it, and every two candidates both of them
    ranked, each annotator's outcome is one of three: "a better", "b better", or "tie". They agree when
    the outcomes are equal. WHY ties are a third outcome rather than dropped: a tie is a judgment (the
    annotator saw no difference); dropping it would report perfect agreement between one annotator who
    ties everything and one who does not. WHY report this next to alpha: it is directly the chance that
    two annotators would produce the same training pair, which is what the preference dataset depends
    on. Chance level with three outcomes is not 0.5, so compare against alpha, which is chance-corrected.
    Returns ``None`` when there is no such comparison (no overlap).
    """
    agree = total = 0
    for o1, o2 in _comparisons(all_rankings):
        total += 1
        agree += o1 == o2
    return agree / total if total else None


def annotator_counts(all_rankings: AllRankings) -> dict[Any, dict[str, int]]:
    """Per annotator: ``records`` ranked and strict preference ``pairs`` produced (ties excluded).

    WHY both: records measures workload / coverage of the overlap target; pairs measures how much
    training signal each annotator contributed (an annotator who ties a lot gives fewer pairs).
    """
    counts: dict[Any, dict[str, int]] = {}
    for rr in all_rankings.values():
        for ann, ranks in rr.items():
            c = counts.setdefault(ann, {"records": 0, "pairs": 0})
            c["records"] += 1
            c["pairs"] += len(ranking_pairs(ranks))
    return counts


def agreement_report(all_rankings: AllRankings) -> dict[str, Any]:
    """Everything `feedback pull` writes as its agreement report (JSON-serialisable when ids are str).

    ``records_with_overlap`` says how many records at least two annotators ranked - alpha and pairwise
    agreement are computed from those alone.
    """
    return {
        "krippendorff_alpha_ordinal": krippendorff_alpha(all_rankings),
        "pairwise_agreement": pairwise_agreement(all_rankings),
        "comparisons": sum(1 for _ in _comparisons(all_rankings)),
        "records": len(all_rankings),
        "records_with_overlap": sum(1 for rr in all_rankings.values() if len(rr) >= 2),
        "annotators": annotator_counts(all_rankings),
    }
