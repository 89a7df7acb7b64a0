"""A synthetic preference task with a known rule, to prove that the alignment stages learn what the data says and to
score a policy without a learned reward model (the issue's "proof that training works").

The rule: a customer asks about one Northwind product by name; a good answer names *that* product, a bad answer is
the same sentence about a different product (a support bot confusing plans). Chosen and rejected differ only in the
product name, so a reward model or a DPO policy can only tell them apart by matching the answer to the prompt: no
length, style or wording shortcut (Singhal et al. 2023, "A long way to go", on reward models learning length instead
of the preference). Minimal pairs are also where plain DPO can lower the chosen answer's likelihood with the rejected
one's (Pal et al. 2024, "Smaug"); tests/alignment/test_proof.py measures it and trains with the fix. Product names
come from the telecom sample, so the tiny tokenizer trained on it splits them into few tokens.

Held-out prompts are disjoint from training prompts twice over: no prompt text is shared, and no (question, product)
combination either, so a model that passes on the test split has learned the rule rather than memorised which answer
goes with which question. ``make_preference_task`` writes the same layout as ``rlhf curate`` (``curation.json``,
``instruction/``, ``preference/``), so every stage reads it like real curated data.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from curation.records import new_record
from curation.writers import DatasetWriter
from rlhf.provenance import git_commit, versions

# No name is a substring of another, so "names product X" is unambiguous.
PRODUCTS = ("Gale Unlimited", "Breeze Lite", "Breeze 30GB", "Fibre 900", "Home 5G", "Travel Pass", "Spend Cap",
            "Flex Pay")
# (question, answer) templates; {p} is the product.
QUESTIONS = (
    ("How do I sign up for {p}?", "You can add {p} in the My Northwind app under Account."),
    ("Does {p} work abroad?", "{p} works in Roam Zone 1 at no extra cost."),
    ("Can I cancel {p} at any time?", "Yes, {p} can be cancelled in the app with 30 days notice."),
    ("What is {p}?", "{p} is one of our products; the app lists everything it includes."),
    ("Is {p} available where I live?", "Check {p} for your postcode on the coverage page."),
    ("How do I pay for {p}?", "{p} is charged on your monthly bill."),
    ("Can I move to {p}?", "Yes, you can move to {p} from the app at any time."),
    ("Where can I see my {p} usage?", "Your {p} usage is in the app under Usage."),
)
OPENERS = ("", "Hi.", "Hello!", "Quick question:", "Good morning.", "Sorry to bother you.", "Hey there.",
           "Help please.")
CLOSERS = ("", "Thanks.", "Cheers!", "Thank you so much.")
# A (question, product) cell is held out when (question index + product index) % HOLDOUT == seed % HOLDOUT: every
# question and every product still appears in training, only their combination is new at test time.
HOLDOUT = 4
SOURCE = "synthetic:product-rule"
RULE = "a good answer names the product the prompt asks about, and no other product"


def _mentions(text: str, name: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text, flags=re.IGNORECASE) is not None


def products_in(text: str) -> list[str]:
    """The known product names that ``text`` mentions, in ``PRODUCTS`` order."""
    return [name for name in PRODUCTS if _mentions(text, name)]


def rule_reward(prompt_text: str, response_text: str) -> float:
    """The known rule as a reward: 1.0 when the response names the product the prompt asks about and no other
    product, else 0.0 (also 0.0 for a prompt that names no known product). Naming every product scores 0, so a
    policy cannot game the rule by listing them all."""
    asked = products_in(prompt_text)
    return 1.0 if len(asked) == 1 and products_in(response_text) == asked else 0.0


def _cells(split: str, seed: int) -> list[tuple[int, int]]:
    held_out = seed % HOLDOUT
    return [(q, p) for q in range(len(QUESTIONS)) for p in range(len(PRODUCTS))
            if ((q + p) % HOLDOUT == held_out) == (split == "test")]


def _rows(split: str, n: int, seed: int) -> list[dict]:
    """``n`` preference records for one split: distinct prompts, a wrong product drawn for each rejected answer."""
    combos = [(q, p, o, c) for q, p in _cells(split, seed) for o in range(len(OPENERS)) for c in range(len(CLOSERS))]
    if n > len(combos):
        raise ValueError(f"n_{split}: at most {len(combos)} distinct prompts exist for this split, got {n}")
    rng = random.Random(f"{seed}:{split}")  # a string seed: stable across Python versions and processes
    records = []
    for row, (q, p, o, c) in enumerate(rng.sample(combos, n)):
        question, answer = QUESTIONS[q]
        product, wrong = PRODUCTS[p], rng.choice([x for x in PRODUCTS if x != PRODUCTS[p]])
        prompt = " ".join(part for part in (OPENERS[o], question.format(p=product), CLOSERS[c]) if part)
        records.append(new_record(
            SOURCE, None, row, split, split=split,
            prompt=[{"role": "user", "content": prompt}],
            chosen=[{"role": "assistant", "content": answer.format(p=product)}],
            rejected=[{"role": "assistant", "content": answer.format(p=wrong)}],
            meta={"product": product, "wrong_product": wrong, "question": q}))
    return records


def _instruction(record: dict) -> dict:
    """The SFT view of a preference record: the prompt and its correct answer as one conversation."""
    kept = {k: v for k, v in record.items() if k not in ("prompt", "chosen", "rejected", "meta")}
    meta = {k: v for k, v in record["meta"].items() if k != "wrong_product"}
    return {**kept, "meta": meta, "messages": record["prompt"] + record["chosen"]}


def make_preference_task(out_dir: str | Path, n_train: int = 1024, n_test: int = 128, seed: int = 0) -> Path:
    """Write the task to ``out_dir`` as a curated folder; returns it. ``n_train`` (at most 1536) and ``n_test`` (at
    most 512) rows go into both ``preference/`` and ``instruction/``. Deterministic: the same arguments give
    byte-identical data files."""
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    records = _rows("train", n_train, seed) + _rows("test", n_test, seed)  # checks the sizes before writing
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = DatasetWriter(out, ["jsonl"])  # curation's own writer: identical columns and file hashes
    for record in records:
        writer.write(record)
        writer.write(_instruction(record))
    manifest = {
        "name": "synthetic-product-rule",
        "command": None,
        "recipe": {"generator": f"{__name__}.make_preference_task", "n_train": n_train, "n_test": n_test,
                   "seed": seed, "rule": RULE},
        "outputs": writer.close(),
        "versions": versions(("rlhf-pipeline",)),
        "git_commit": git_commit(),
    }
    (out / "curation.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    return out
