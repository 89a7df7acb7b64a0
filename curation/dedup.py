"""Duplicate removal over the whole stream, keep-first: the first record of a cluster is kept, later ones are dropped.

- ``exact_dedup``: records whose normalised text (case, punctuation, whitespace) is identical.
- ``minhash_dedup``: near duplicates, records whose word n-gram sets have a Jaccard similarity at or above a
  threshold, found with MinHash signatures (Broder 1997) and LSH banding (Leskovec, Rajaraman & Ullman, "Mining of
  Massive Datasets", ch. 3), then confirmed on the signatures.

Both look at :func:`document_text` (for a conversation, all its turns). A dropped record goes to the rejects file as
a copy whose ``meta.duplicate_of`` names the kept record, so every cluster can be read back from the rejects (with
``transitive: true`` a record may match a dropped member of a cluster: ``meta.matched`` then names that member).

MinHash is vectorised per document: each word is hashed once, all shingle hashes come from one rolling NumPy
combination, and all hash functions are applied at once as a (num_perm x shingles) matrix.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import xxhash

from curation.records import Record, document_text, normalize, words
from curation.steps import CurationError, Step, register

if TYPE_CHECKING:
    import numpy as np

# Odd 64-bit multiplier for the rolling n-gram combination (the 64-bit golden-ratio constant of Fibonacci hashing).
_ROLL = 0x9E3779B97F4A7C15
_BLOCK = 4096  # signatures per block of the store: growing by whole blocks never copies what is stored


def mark_duplicate(record: Record, kept_id: object, **extra: object) -> Record:
    """A copy of ``record`` whose meta names the kept record it duplicates (the input record is not mutated)."""
    return {**record, "meta": {**(record.get("meta") or {}), "duplicate_of": kept_id, **extra}}


@register("exact_dedup")
@dataclass
class ExactDedup(Step):
    """Drops records whose normalised text was already seen; keeps 128-bit digests, not texts, to stay small."""

    per_record = False

    def run(self, records: Iterable[Record]) -> Iterator[Record]:
        kept: dict[int, object] = {}  # xxh3-128 digest of the normalised text -> id of the record kept for it
        clustered: set[int] = set()
        for record in records:
            digest = xxhash.xxh3_128_intdigest(normalize(document_text(record)).encode())
            if digest not in kept:
                kept[digest] = record.get("id")
                yield record
                continue
            if digest not in clustered:
                clustered.add(digest)
                self.counters["clusters"] += 1
            self.drop(mark_duplicate(record, kept[digest]), "exact_duplicate")


def shingle_hashes(tokens: tuple[str, ...], ngram: int) -> np.ndarray:
    """64-bit hashes of every lower-cased word n-gram of ``tokens``, as a uint64 array (empty when no tokens).

    Each word is hashed once (xxh3); an n-gram's hash is the polynomial ``h0*P^(n-1) + ... + h(n-1)`` mod 2^64 of
    its word hashes, computed for all positions at once with n-1 vectorised steps instead of hashing each n-gram
    string. Fewer than ``ngram`` words give one n-gram of all of them, so short texts still have a fingerprint."""
    import numpy as np

    if not tokens:
        return np.zeros(0, dtype=np.uint64)
    # Tokens hold no spaces, so one lower() and encode() over the joined text replace one call per word.
    lowered = " ".join(tokens).lower().encode().split(b" ")
    h = np.fromiter(map(xxhash.xxh3_64_intdigest, lowered), dtype=np.uint64, count=len(lowered))
    n = min(ngram, len(h))
    m = len(h) - n + 1
    out = h[:m].copy()
    for j in range(1, n):
        out *= np.uint64(_ROLL)  # uint64 arithmetic wraps: this is the mod 2^64 of the polynomial
        out += h[j:j + m]
    return out


def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """The ``(bands, rows)`` with ``bands * rows <= num_perm`` minimising the weighted areas under the LSH
    S-curve ``P(s) = 1 - (1 - s^rows)^bands`` below the threshold (false positives) and of ``1 - P`` above it
    (false negatives), as datasketch's ``MinHashLSH._optimal_param`` does; the integrals use the trapezoid rule
    over all pairs at once rather than scipy's ``quad`` pair by pair. Ties go to the fewest bands, as there."""
    import numpy as np

    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)], dtype=np.float64)
    b, r = pairs[:, :1], pairs[:, 1:]

    def area(lo: float, hi: float, miss: bool) -> np.ndarray:
        s = np.linspace(lo, hi, 513)
        p = 1.0 - (1.0 - s ** r) ** b  # probability that a pair of similarity s shares at least one band
        y = 1.0 - p if miss else p
        return (y[:, 1:] + y[:, :-1]).sum(axis=1) * (s[1] - s[0]) / 2

    error = fp_weight * area(0.0, threshold, False) + fn_weight * area(threshold, 1.0, True)
    best = pairs[int(np.argmin(error))]  # argmin takes the first minimum, in the same (bands, rows) order
    return int(best[0]), int(best[1])


class MinHasher:
    """``num_perm`` hash functions from the multiply-add-shift family ``h(x) = ((a*x + b) mod 2^64) >> 32`` with
    ``a`` odd, for 32-bit keys (Dietzfelbinger et al. 1997): two uint64 NumPy operations per function and shingle,
    where the textbook ``(a*x + b) mod p`` needs 128-bit products or a slow modulo."""

    def __init__(self, num_perm: int, seed: int):
        import numpy as np

        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64) | np.uint64(1)
        self.b = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64)

    def signature(self, shingles: np.ndarray) -> np.ndarray:
        """The uint32 MinHash signature (one minimum per hash function) of a non-empty uint64 shingle array."""
        import numpy as np

        keys = shingles >> np.uint64(32)  # the high half of the rolling hash is its best-mixed half
        # All hash functions at once, laid out shingles x num_perm: NumPy's column-wise minimum over contiguous
        # rows is about a quarter faster than a row-wise one.
        values = keys[:, None] * self.a
        values += self.b
        # The shift is monotone, so the minimum is taken first and only num_perm values are shifted.
        return (values.min(axis=0) >> np.uint64(32)).astype(np.uint32)


class LshIndex:
    """Signatures of indexed documents in blocks of a uint32 array, and one dict per band from the band's hash to the
    documents (an int, or a list once a second one shares that band) that have it. Each document also names the
    kept document of its cluster (``reps``): itself when kept, the record it was dropped for otherwise."""

    def __init__(self, num_perm: int, bands: int, rows: int):
        self.num_perm, self.bands, self.rows = num_perm, bands, rows
        self.tables: list[dict[int, int | list[int]]] = [{} for _ in range(bands)]
        self.blocks: list[np.ndarray] = []
        self.ids: list[object] = []
        self.reps: list[int] = []

    def band_keys(self, signature: np.ndarray) -> list[int]:
        raw = signature.tobytes()
        step = self.rows * signature.itemsize
        return [xxhash.xxh3_64_intdigest(raw[i:i + step]) for i in range(0, self.bands * step, step)]

    def candidates(self, keys: list[int]) -> list[int]:
        """Kept documents sharing at least one band with ``keys``, earliest first."""
        found: set[int] = set()
        for table, key in zip(self.tables, keys):
            hit = table.get(key)
            if hit is not None:
                found.update(hit if isinstance(hit, list) else (hit,))
        return sorted(found)

    def similarity(self, index: int, signature: np.ndarray) -> float:
        """The Jaccard estimate: the share of hash functions on which both signatures agree."""
        import numpy as np

        stored = self.blocks[index // _BLOCK][index % _BLOCK]
        return int(np.count_nonzero(stored == signature)) / self.num_perm

    def add(self, signature: np.ndarray, keys: list[int], doc_id: object, rep: int | None = None) -> int:
        """Index a document; ``rep`` is the index of its cluster's kept document (None: it is kept itself)."""
        import numpy as np

        index = len(self.ids)
        if index % _BLOCK == 0:
            self.blocks.append(np.empty((_BLOCK, self.num_perm), dtype=np.uint32))
        self.blocks[-1][index % _BLOCK] = signature
        self.ids.append(doc_id)
        self.reps.append(index if rep is None else rep)
        for table, key in zip(self.tables, keys):
            hit = table.get(key)
            if hit is None:
                table[key] = index  # most band keys belong to one document: an int is far smaller than a list
            elif isinstance(hit, list):
                hit.append(index)
            else:
                table[key] = [hit, index]
        return index


@register("minhash_dedup")
@dataclass
class MinhashDedup(Step):
    """Drops near duplicates of earlier kept records (MinHash LSH, confirmed on the signatures' Jaccard estimate)."""

    ngram: int = 5  # words per shingle
    num_perm: int = 128  # hash functions per signature: more gives a finer Jaccard estimate but is slower
    threshold: float = 0.8  # Jaccard similarity of the shingle sets at or above which a record is a near duplicate
    bands: int | None = None  # LSH bands; None: bands and rows chosen from threshold and num_perm (recall-leaning)
    rows: int | None = None  # signature values per band (bands * rows <= num_perm); None: chosen with bands
    hash_seed: int | None = None  # seed of the hash functions; None: the recipe's seed
    # Also compare with earlier *dropped* records, each standing for the kept record of its cluster: a record joins a
    # cluster through any member it matches (single linkage, as datatrove's MinhashDedupCluster and Lee et al. 2022,
    # "Deduplicating Training Data Makes Language Models Better", cluster). More recall near the threshold, where
    # the first member's estimate may fall just short; the index then holds every record's signature.
    transitive: bool = False

    per_record = False

    def __post_init__(self) -> None:
        for name in ("ngram", "num_perm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CurationError(f"minhash_dedup: {name} must be a positive integer, got {value!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0 < self.threshold <= 1:
            raise CurationError(f"minhash_dedup: threshold must be a number in (0, 1], got {self.threshold!r}")
        if (self.bands is None) != (self.rows is None):
            raise CurationError(f"minhash_dedup: give both bands and rows or neither, got bands={self.bands!r}, "
                                f"rows={self.rows!r}")
        if self.bands is None:
            # Every candidate is confirmed on its signature, so a false positive costs one comparison while a
            # false negative keeps a duplicate for good: weigh misses 9:1 (0.8 and 128 give 14 bands of 9 rows,
            # 99.9% of pairs at Jaccard 0.9 become candidates, where datasketch's even weights give 93%).
            self.bands, self.rows = optimal_bands(self.threshold, self.num_perm, fp_weight=0.1, fn_weight=0.9)
        for name in ("bands", "rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CurationError(f"minhash_dedup: {name} must be a positive integer, got {value!r}")
        if self.bands * self.rows > self.num_perm:
            raise CurationError(f"minhash_dedup: bands * rows must be <= num_perm ({self.num_perm}), got "
                                f"{self.bands} * {self.rows} = {self.bands * self.rows}")
        if not isinstance(self.transitive, bool):
            raise CurationError(f"minhash_dedup: transitive must be true or false, got {self.transitive!r}")
        if self.hash_seed is not None and (isinstance(self.hash_seed, bool) or not isinstance(self.hash_seed, int)
                                           or self.hash_seed < 0):
            raise CurationError(f"minhash_dedup: hash_seed must be a non-negative integer, got {self.hash_seed!r}")

    def run(self, records: Iterable[Record]) -> Iterator[Record]:
        hasher = MinHasher(self.num_perm, self.seed if self.hash_seed is None else self.hash_seed)
        index = LshIndex(self.num_perm, self.bands, self.rows)
        clustered: set[int] = set()
        for record in records:
            tokens = words(document_text(record))
            if not tokens:
                self.counters["no_words"] += 1  # nothing to compare: kept as is (exact_dedup handles empty texts)
                yield record
                continue
            signature = hasher.signature(shingle_hashes(tokens, self.ngram))
            keys = index.band_keys(signature)
            match, jaccard = self._best_match(index, signature, keys)
            if match is None:
                index.add(signature, keys, record.get("id"))
                yield record
                continue
            kept = index.reps[match]
            if kept not in clustered:
                clustered.add(kept)
                self.counters["clusters"] += 1
            extra = {"matched": index.ids[match]} if match != kept else {}
            self.drop(mark_duplicate(record, index.ids[kept], jaccard_estimate=round(jaccard, 4), **extra),
                      "near_duplicate")
            if self.transitive:
                index.add(signature, keys, record.get("id"), rep=kept)

    def _best_match(self, index: LshIndex, signature: np.ndarray, keys: list[int]) -> tuple[int | None, float]:
        """The indexed candidate with the highest estimated Jaccard at or above the threshold (earliest on ties).
        Banding alone lets through pairs below the threshold (the S-curve is not a step); the estimate cuts them."""
        best, best_jaccard = None, -1.0
        for candidate in index.candidates(keys):
            self.counters["candidates_checked"] += 1
            jaccard = index.similarity(candidate, signature)
            if jaccard < self.threshold:
                self.counters["false_candidates"] += 1
            elif jaccard > best_jaccard:
                best, best_jaccard = candidate, jaccard
        return best, best_jaccard
