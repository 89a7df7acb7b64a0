"""A seeded near-duplicate corpus with ground truth, for bench/curate_vs_datatrove.py (issue 7, curation benchmark).

    .venv/bin/python bench/corpus.py --docs 100000          # writes (or reuses) the cached corpus and prints its stats

Every document is built from sentences of the bundled sample (samples/telecom/raw and samples/general/general.txt):

- a *base* document is 5-15 sentences (at least 60 words) drawn at random from that pool, in 1-4 paragraphs, a
  third of them with a site header and footer (boilerplate); two bases share almost no word 5-gram;
- a *near-duplicate group* is a base plus variants made by realistic edits (typos, word swaps, insertions and
  deletions, boilerplate header/footer changes, whitespace and case changes, sentence reorder). A variant is kept
  only when its word 5-gram Jaccard similarity with EVERY member already in the group is >= the threshold (0.8), so
  a perfect deduplicator at that threshold keeps exactly one document per group whatever order it sees them in;
- *hard negatives* ("revised" articles) replace 20-50% of a base's sentences: their own group, and their Jaccard
  with every member of the source group must stay below 0.7 (measured; they must not be merged);
- *low-quality* documents (each its own group) break one Gopher rule on purpose: too short, hashtag or ellipsis
  spam, bullet-only lists, number tables, keyword lists without stop words, over-long "words", and repeated lines
  (the last only Gopher's *repetition* rules catch).

Documents are shuffled, so a group's base is not necessarily its first member. Jaccard is measured on lower-cased
word 5-grams with the word pattern of curation.records.words (runs of letters and digits), computed here
independently of the product code. The corpus lives in a temporary folder (never the repository), keyed by size,
seed and generator version, and is reused when it is already there.
"""

from __future__ import annotations

import argparse
import html
import json
import random
import re
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERSION = 1  # bump when the generator changes: the cache key includes it
THRESHOLD = 0.8  # near-duplicate Jaccard threshold the groups are built for
HARD_NEG_MAX = 0.7  # a revised article's Jaccard with its source group stays below this
NGRAM = 5
_WORD_RE = re.compile(r"\w+(?:['’]\w+)*")
_SENT_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
NON_ENGLISH = {"5g-erklaert.md", "guia-itinerancia.md", "symbols-table.md", "links.txt"}
HEADERS = ["Northwind Mobile Help Centre | Support articles", "Home > Help > Articles", "Skip to main content",
           "Northwind Community Forum - Questions and answers", "Posted by the Northwind support team",
           "Printer-friendly version of this article", "Menu Plans Phones Broadband Roaming Help Log in"]
FOOTERS = ["© 2026 Northwind Mobile. All rights reserved.", "Was this article helpful? Yes No",
           "Share this page: Facebook Twitter Email", "Terms and conditions apply. Prices include VAT.",
           "Related articles: billing, roaming, broadband", "Cookie settings | Privacy policy | Accessibility"]
FILLERS = ["also", "really", "just", "usually", "now", "still", "often", "simply", "then", "only"]
KEYWORDS = ("cheap sim deals unlimited data 5g phones best price offer discount broadband fibre router hotspot esim "
            "roaming travel pass contract upgrade iphone android samsung pixel tablet smartwatch bundle family plan "
            "student gigabyte prepaid topup voucher coupon sale free delivery refurbished unlocked trade trending "
            "review ranking compare switch fast signal coverage mast network outage wifi calling speed test").split()


def words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def shingles(text: str, n: int = NGRAM) -> frozenset:
    """Word n-grams as hashed tuples (fewer than n words: one n-gram of all of them, as the dedup steps do)."""
    ws = words(text)
    if len(ws) < n:
        return frozenset([hash(tuple(ws))])
    return frozenset(hash(tuple(ws[i:i + n])) for i in range(len(ws) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


# --- the sentence pool -------------------------------------------------------------------------------------------

def _html_text(raw: str) -> str:
    raw = re.sub(r"(?is)<(script|style|header|nav|aside|footer)\b.*?</\1>", " ", raw)
    raw = re.sub(r"(?is)<div id=\"cookie-banner\".*?</div>", " ", raw)
    return html.unescape(re.sub(r"<[^>]+>", "\n", raw))


def _markdown_text(raw: str) -> str:
    raw = re.sub(r"(?m)^\s*(#+|[-*]|\d+\.|\|.*\|)\s*", "", raw)
    return raw.replace("**", "").replace("*", "").replace("`", "")


def sentence_pool() -> list[str]:
    """Unique English sentences of 6-60 words from the bundled sample, in a fixed order."""
    raw = ROOT / "samples" / "telecom" / "raw"
    blocks: list[str] = []
    for path in sorted((raw / "docs").iterdir()) + sorted((raw / "faq").iterdir()):
        if path.name in NON_ENGLISH:
            continue
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:  # the sample has one Windows-1252 file on purpose (a cleaning test case)
            text = data.decode("cp1252")
        blocks.append(_html_text(text) if path.suffix == ".html" else _markdown_text(text))
    for line in (raw / "chats" / "transcripts.jsonl").read_text(encoding="utf-8").splitlines():
        blocks.extend(turn["text"] for turn in json.loads(line)["turns"])
    blocks.append((ROOT / "samples" / "general" / "general.txt").read_text(encoding="utf-8"))
    seen: dict[str, None] = {}
    for block in blocks:
        for para in re.split(r"\n\s*\n", block):
            for sent in _SENT_RE.split(" ".join(para.split())):
                n = len(words(sent))
                if 6 <= n <= 60 and sent[-1] in ".!?" and sum(c.isalpha() for c in sent) > 0.7 * len(sent):
                    seen.setdefault(sent, None)
    return list(seen)


# --- documents: a structure (header, paragraphs of sentences, footer) rendered to text -------------------------

def render(doc: dict) -> str:
    body = "\n\n".join(" ".join(p) for p in doc["paras"] if p)
    parts = [doc["header"], body, doc["footer"]]
    return doc.get("sep", "\n\n").join(p for p in parts if p)


def new_base(rng: random.Random, pool: list[str]) -> dict:
    sents = rng.sample(pool, rng.randint(5, 15))
    while sum(len(words(x)) for x in sents) < 60:  # well above Gopher's 50 words: a base is good data
        sents.append(rng.choice(pool))
    cuts = sorted(rng.sample(range(1, len(sents)), min(len(sents) - 1, rng.randint(0, 3))))
    paras = [sents[a:b] for a, b in zip([0, *cuts], [*cuts, len(sents)])]
    boiler = rng.random() < 0.35
    return {"header": rng.choice(HEADERS) if boiler else "", "footer": rng.choice(FOOTERS) if boiler else "",
            "paras": paras}


def _copy(doc: dict) -> dict:
    return {**doc, "paras": [list(p) for p in doc["paras"]]}


def _pick(rng: random.Random, doc: dict) -> tuple[int, int]:
    cells = [(i, j) for i, p in enumerate(doc["paras"]) for j in range(len(p))]
    return rng.choice(cells)


def _edit_words(rng: random.Random, doc: dict, fn) -> None:
    i, j = _pick(rng, doc)
    toks = doc["paras"][i][j].split(" ")
    doc["paras"][i][j] = " ".join(fn(toks))


def _typo(rng: random.Random, doc: dict) -> None:
    def fn(toks):
        k = rng.randrange(len(toks))
        w = toks[k]
        if len(w) >= 4:
            p = rng.randrange(1, len(w) - 2)
            kind = rng.randrange(3)
            toks[k] = (w[:p] + w[p + 1] + w[p] + w[p + 2:], w[:p] + w[p + 1:], w[:p] + w[p] + w[p:])[kind]
        return toks
    _edit_words(rng, doc, fn)


def _swap(rng: random.Random, doc: dict) -> None:
    def fn(toks):
        if len(toks) > 2:
            k = rng.randrange(len(toks) - 1)
            toks[k], toks[k + 1] = toks[k + 1], toks[k]
        return toks
    _edit_words(rng, doc, fn)


def _insert(rng: random.Random, doc: dict) -> None:
    _edit_words(rng, doc, lambda toks: toks[:(k := rng.randrange(1, len(toks)))] + [rng.choice(FILLERS)] + toks[k:])


def _delete(rng: random.Random, doc: dict) -> None:
    _edit_words(rng, doc, lambda toks: toks[:(k := rng.randrange(len(toks)))] + toks[k + 1:] if len(toks) > 3 else toks)


def _boilerplate(rng: random.Random, doc: dict) -> None:
    key = rng.choice(("header", "footer"))
    doc[key] = rng.choice(("", *(HEADERS if key == "header" else FOOTERS)))


def _layout(rng: random.Random, doc: dict) -> None:
    """Whitespace and case only: invisible to word n-grams, visible to exact hashing."""
    choice = rng.randrange(4)
    if choice == 0:
        doc["sep"] = rng.choice(("\n", "\n\n\n", "\n \n"))
    elif choice == 1:
        i, j = _pick(rng, doc)
        doc["paras"][i][j] = doc["paras"][i][j].upper() if rng.random() < 0.3 else doc["paras"][i][j].lower()
    elif choice == 2:
        i, j = _pick(rng, doc)
        doc["paras"][i][j] = "  " + doc["paras"][i][j].replace(" ", "  ", 2) + " "
    else:
        doc["header"] = doc["header"].upper()


def _reorder(rng: random.Random, doc: dict) -> None:
    paras = doc["paras"]
    if len(paras) > 1 and rng.random() < 0.5:
        k = rng.randrange(len(paras) - 1)
        paras[k], paras[k + 1] = paras[k + 1], paras[k]
        return
    i = max(range(len(paras)), key=lambda x: len(paras[x]))
    if len(paras[i]) > 1:
        k = rng.randrange(len(paras[i]) - 1)
        paras[i][k], paras[i][k + 1] = paras[i][k + 1], paras[i][k]


EDITS = {"typo": _typo, "word_swap": _swap, "insert": _insert, "delete": _delete, "boilerplate": _boilerplate,
         "layout": _layout, "reorder": _reorder}


def variant(rng: random.Random, parent: dict, strength: int) -> tuple[dict, list[str]]:
    doc, ops = _copy(parent), []
    for _ in range(strength):
        name = rng.choice(list(EDITS))
        EDITS[name](rng, doc)
        ops.append(name)
    return doc, ops


def revised(rng: random.Random, base: dict, pool: list[str]) -> dict:
    """A hard negative: the same article with 20-50% of its sentences replaced by others."""
    doc = _copy(base)
    cells = [(i, j) for i, p in enumerate(doc["paras"]) for j in range(len(p))]
    for i, j in rng.sample(cells, max(1, round(len(cells) * rng.uniform(0.2, 0.5)))):
        doc["paras"][i][j] = rng.choice(pool)
    return doc


# --- low-quality documents: each breaks one Gopher rule ----------------------------------------------------------

def _lowq_short(rng, pool):
    return " ".join(rng.sample(pool, rng.randint(1, 2)))


def _lowq_hashtags(rng, pool):
    text = " ".join(rng.sample(pool, rng.randint(4, 7)))
    tags = " ".join("#" + rng.choice(KEYWORDS) for _ in range(len(text.split()) // 5))
    return text + "\n" + tags


def _lowq_ellipsis(rng, pool):
    lines = [" ".join(s.split()[:rng.randint(5, 9)]) + rng.choice(("...", "…")) for s in rng.sample(pool, 10)]
    return "\n".join(lines)


def _lowq_bullets(rng, pool):
    return "\n".join(rng.choice(("- ", "• ")) + s for s in rng.sample(pool, rng.randint(6, 12)))


def _lowq_numbers(rng, pool):
    rows = [" | ".join(f"{rng.uniform(0, 999):.2f}" for _ in range(6)) for _ in range(rng.randint(12, 20))]
    return rng.choice(pool) + "\n" + "\n".join(rows)


def _lowq_keywords(rng, pool):
    return " ".join(rng.choice(KEYWORDS) for _ in range(rng.randint(60, 140)))


def _lowq_long_words(rng, pool):
    junk = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(14, 24)))
            for _ in range(rng.randint(50, 90))]
    return " ".join(junk[:10]) + " the end of the " + " ".join(junk[10:]) + " and that is all."


def _lowq_repeated(rng, pool):
    line = rng.choice(pool)
    return "\n".join([line] * rng.randint(8, 12) + rng.sample(pool, 2))


LOW_QUALITY = {"short": _lowq_short, "hashtags": _lowq_hashtags, "ellipsis": _lowq_ellipsis,
               "bullets": _lowq_bullets, "numbers": _lowq_numbers, "keywords": _lowq_keywords,
               "long_words": _lowq_long_words, "repeated_lines": _lowq_repeated}


# --- the corpus ----------------------------------------------------------------------------------------------------

def _group(rng: random.Random, pool: list[str], size: int) -> tuple[list[dict], list[frozenset], list[list[str]]]:
    """A base and ``size - 1`` variants, each at Jaccard >= THRESHOLD with every member made before it."""
    docs, sets, ops = [new_base(rng, pool)], [], [[]]
    sets.append(shingles(render(docs[0])))
    while len(docs) < size:
        parent = rng.randrange(len(docs))
        for attempt in range(8):
            doc, names = variant(rng, docs[parent], rng.choice((1, 1, 2, 2, 3, 4)) if attempt < 4 else 1)
            s = shingles(render(doc))
            if all(jaccard(s, other) >= THRESHOLD for other in sets):
                break
        else:  # strong edits kept failing: a whitespace/case copy of the parent is always within the threshold
            doc, names = _copy(docs[parent]), ["layout"]
            _layout(rng, doc)
            s = shingles(render(doc))
        docs.append(doc), sets.append(s), ops.append(names)
    return docs, sets, ops


def generate(n: int, seed: int = 0, lowq_share: float = 0.08, hard_neg_share: float = 0.04) -> tuple[list, list]:
    """``(docs, truth)``: ``docs`` are ``{"id", "text"}`` in corpus order, ``truth`` one row per doc with its group."""
    rng = random.Random(seed)
    pool = sentence_pool()
    items: list[tuple[str, dict]] = []  # (text, truth without id)
    n_lowq, n_hard = round(n * lowq_share), round(n * hard_neg_share)
    kinds = list(LOW_QUALITY)
    for i in range(n_lowq):
        kind = kinds[i % len(kinds)]
        items.append((LOW_QUALITY[kind](rng, pool), {"group": f"q{i}", "role": "low_quality", "low_quality": kind}))
    sources: list[tuple[str, dict, list[frozenset]]] = []  # group id, base, shingle sets of everything derived from it
    n_group_docs, g = n - n_lowq - n_hard, 0
    while n_group_docs > 0:
        size = 1 if rng.random() < 0.55 else min(2 + int(rng.expovariate(0.6)), 12)
        size = min(size, n_group_docs)
        docs, sets, ops = _group(rng, pool, size)
        for doc, names in zip(docs, ops):
            items.append((render(doc), {"group": f"g{g}", "role": "variant" if names else "base", "ops": names}))
        sources.append((f"g{g}", docs[0], sets))
        n_group_docs -= size
        g += 1
    for h in range(n_hard):
        while True:  # a revision of some base, at Jaccard < HARD_NEG_MAX with everything made from that base
            gid, base, sets = rng.choice(sources)
            for _ in range(20):
                doc = revised(rng, base, pool)
                s = shingles(render(doc))
                j = max(jaccard(s, other) for other in sets)
                if j < HARD_NEG_MAX:
                    break
            else:
                continue  # this base's revisions stay too close (a short base): another base
            break
        sets.append(s)
        items.append((render(doc), {"group": f"h{h}", "role": "hard_negative", "source_group": gid,
                                    "max_jaccard_to_source": round(j, 4)}))
    rng.shuffle(items)
    docs_out, truth = [], []
    for i, (text, row) in enumerate(items):
        doc_id = f"doc-{i:07d}"
        docs_out.append({"id": doc_id, "text": text})
        truth.append({"id": doc_id, **row})
    return docs_out, truth


def _histogram(values: list[float], edges: list[float]) -> dict[str, int]:
    out = {f"[{lo:.2f},{hi:.2f})": 0 for lo, hi in zip(edges, edges[1:])}
    out["1.00"] = 0
    for v in values:
        if v >= 1.0:
            out["1.00"] += 1
            continue
        for lo, hi in zip(edges, edges[1:]):
            if lo <= v < hi:
                out[f"[{lo:.2f},{hi:.2f})"] += 1
                break
    return out


def _quantiles(values: list[float]) -> dict[str, float]:
    s = sorted(values)
    return {q: round(s[min(len(s) - 1, int(p * len(s)))], 4) for q, p in
            (("min", 0), ("p05", 0.05), ("p25", 0.25), ("median", 0.5), ("p75", 0.75), ("max", 1.0))} if s else {}


def measure_truth(docs: list[dict], truth: list[dict], seed: int = 0, random_pairs: int = 20_000) -> dict:
    """The real Jaccard of the ground truth: every pair inside a group, each hard negative against its source group,
    and random pairs of different groups. Also stores each grouped doc's ``min_jaccard_in_group`` in ``truth``."""
    sets = [shingles(d["text"]) for d in docs]
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(truth):
        groups.setdefault(row["group"], []).append(i)
    pair_j: list[float] = []
    for members in groups.values():
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                j = jaccard(sets[members[a]], sets[members[b]])
                pair_j.append(j)
                for x in (members[a], members[b]):
                    truth[x]["min_jaccard_in_group"] = round(min(j, truth[x].get("min_jaccard_in_group", 1.0)), 4)
    rng = random.Random(seed)
    grouped = [i for i, r in enumerate(truth) if r["role"] != "low_quality"]
    cross = []
    for _ in range(random_pairs):
        a, b = rng.sample(grouped, 2)
        if truth[a]["group"] != truth[b]["group"]:
            cross.append(jaccard(sets[a], sets[b]))
    hard = [r["max_jaccard_to_source"] for r in truth if r["role"] == "hard_negative"]
    sizes = [len(m) for g, m in groups.items() if g.startswith("g")]
    return {
        "docs": len(docs), "roles": {role: sum(r["role"] == role for r in truth) for role in
                                     ("base", "variant", "hard_negative", "low_quality")},
        "low_quality_kinds": {k: sum(r.get("low_quality") == k for r in truth) for k in LOW_QUALITY},
        "groups": len(sizes), "groups_with_duplicates": sum(s > 1 for s in sizes), "largest_group": max(sizes),
        "within_group_pairs": len(pair_j), "within_group_jaccard": _quantiles(pair_j),
        "within_group_histogram": _histogram(pair_j, [0.8, 0.85, 0.9, 0.95, 1.0]),
        "hard_negative_max_jaccard": _quantiles(hard),
        "hard_negative_histogram": _histogram(hard, [0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]),
        "random_pairs_jaccard": _quantiles(cross),
        "ngram": NGRAM, "threshold": THRESHOLD,
    }


def cache_dir(n: int, seed: int, work: Path | None = None) -> Path:
    return (work or Path(tempfile.gettempdir()) / "rlhf-bench-curation") / f"corpus-v{VERSION}-n{n}-s{seed}"


def ensure_corpus(n: int, seed: int = 0, work: Path | None = None) -> Path:
    """The cached corpus folder (docs.jsonl, truth.jsonl, stats.json), generated on first use."""
    folder = cache_dir(n, seed, work)
    if (folder / "stats.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    docs, truth = generate(n, seed)
    stats = measure_truth(docs, truth, seed)
    for name, rows in (("docs.jsonl", docs), ("truth.jsonl", truth)):
        with (folder / name).open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (folder / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")  # written last: complete
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="cache folder (default: a temporary folder)")
    args = parser.parse_args()
    folder = ensure_corpus(args.docs, args.seed, args.work)
    print(folder)
    print((folder / "stats.json").read_text())


if __name__ == "__main__":
    main()
