"""The dataset card (README.md in the output folder): how the data was made, in numbers a data owner can check.

It holds the Hub's YAML header (one config per record kind, with its split files), the exact command and recipe
(secrets redacted), the funnel per step, drop reasons, PII counts, duplicate clusters, split sizes and the files
with their SHA-256, so anyone can tell this card belongs to these files.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import yaml

from curation.writers import COMMON_COLUMNS, TRL_COLUMNS

KIND_TEXT = {
    "instruction": "conversations for SFT (TRL conversational language-modelling format: `messages`)",
    "prompt_completion": "prompt-completion pairs for SFT (TRL prompt-completion format)",
    "preference": "preference pairs for reward modelling and DPO (TRL conversational preference format)",
    "ranking": "ranked candidate sets (`prompt` + `candidates` with rank 1 = best)",
    "document": "cleaned raw documents (`text`), e.g. for continued pre-training",
}


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _front_matter(name: str, outputs: dict[str, Any], formats: list[str]) -> str:
    configs = []
    for kind, info in outputs.items():
        suffix = ".parquet" if "parquet" in formats else ".jsonl"
        configs.append({"config_name": kind,
                        "data_files": [{"split": s, "path": f"{kind}/{s}{suffix}"} for s in info["splits"]]})
    header = {"pretty_name": name, "language": ["en"], "tags": ["rlhf-pipeline", "curated"], "configs": configs}
    return "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n"


def _counter_rows(ledger: dict[str, Any], prefix: str) -> Counter:
    total: Counter = Counter()
    for step in ledger["steps"]:
        for key, n in step["counters"].items():
            if key.startswith(prefix):
                total[key[len(prefix):]] += n
    return total


def render_card(name: str, description: str, command: str, recipe_yaml: str, ledger: dict[str, Any],
                outputs: dict[str, Any], formats: list[str], versions: dict[str, str], rejects: int) -> str:
    parts = [_front_matter(name, outputs, formats), f"# {name}\n", description.strip() + "\n" if description else ""]
    parts.append("Made with [rlhf-pipeline](https://pypi.org/project/rlhf-pipeline/) `rlhf curate`.\n")

    parts.append("## Contents\n")
    rows = [[kind, KIND_TEXT[kind], *(info["splits"].get(s, 0) for s in ("train", "test"))]
            for kind, info in outputs.items()]
    parts.append(_table(["dataset", "what it is", "train", "test"], rows) + "\n")
    parts.append("Columns: each dataset's TRL columns, then " + ", ".join(f"`{c}`" for c in COMMON_COLUMNS)
                 + ". `lineage` points back to the input file and row (`path`, `row`), the record it was derived from"
                 " (`parent`) and the chunk index; `meta` is a JSON string (provenance such as language, topic, "
                 "duplicate cluster). The train/test split is grouped by prompt: no prompt is in both.\n")
    for kind in outputs:
        parts.append(f"- `{kind}`: " + ", ".join(f"`{c}`" for c in TRL_COLUMNS[kind]))
    parts.append("")

    parts.append("## Funnel\n")
    parts.append(f"Read **{ledger['read']}** records; steps created {ledger['created'] - ledger['read']} more "
                 f"(chunks, pairs); kept **{ledger['kept']}**, dropped **{ledger['dropped']}** "
                 f"({ledger['read']} + {ledger['created'] - ledger['read']} = {ledger['kept']} + {ledger['dropped']}). "
                 f"Every dropped record is in `rejects.jsonl` ({rejects} lines) with its step and reason.\n")
    rows = [[s["step"], s["type"], s["in"], s["out"], sum(s["dropped"].values()), max(s["created"], 0)]
            for s in ledger["steps"]]
    parts.append(_table(["step", "type", "in", "out", "dropped", "created"], rows) + "\n")

    parts.append("## Drop reasons\n")
    drops = sorted(ledger["drops_by_reason"].items(), key=lambda kv: -kv[1])
    parts.append(_table(["step:reason", "records"], [[k, v] for k, v in drops]) + "\n" if drops else "Nothing was dropped.\n")

    pii = _counter_rows(ledger, "pii:")
    parts.append("## PII redacted\n")
    parts.append(_table(["type", "replaced"], [[f"`<{k}>`", v] for k, v in sorted(pii.items())]) + "\n"
                 if pii else "No PII step ran, or it found nothing.\n")

    parts.append("## Duplicates\n")
    dup_rows = [[s["step"], sum(s["dropped"].values()), s["counters"].get("clusters", 0)]
                for s in ledger["steps"] if s["type"] in ("exact_dedup", "minhash_dedup")]
    parts.append(_table(["step", "records dropped", "clusters (kept records with duplicates)"], dup_rows) + "\n"
                 if dup_rows else "No dedup step ran.\n")
    parts.append("Each dropped duplicate's `meta.duplicate_of` in `rejects.jsonl` names the record that was kept.\n")
    decontam = [[s["step"], sum(s["dropped"].values()), s["counters"].get("eval_ngrams", 0)]
                for s in ledger["steps"] if s["type"] == "decontaminate"]
    if decontam:
        parts.append("## Decontamination\n")
        parts.append(_table(["step", "records dropped (share n-grams with the evaluation set)", "evaluation n-grams"],
                            decontam) + "\n")

    other = [[s["step"], k, v] for s in ledger["steps"] for k, v in sorted(s["counters"].items())
             if not k.startswith("pii:") and k != "clusters"]
    if other:
        parts.append("## Other counts\n")
        parts.append(_table(["step", "counter", "value"], other) + "\n")

    parts.append("## Files\n")
    files = [[f"`{path}`", f"`{digest[:16]}…`"] for info in outputs.values() for path, digest in info["files"].items()]
    parts.append(_table(["file", "sha256"], files) + "\n")

    parts.append("## How it was made\n")
    parts.append(f"```\n{command}\n```\n")
    parts.append("Recipe (secrets redacted):\n")
    parts.append(f"```yaml\n{recipe_yaml.rstrip()}\n```\n")
    parts.append("Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + "\n")
    return "\n".join(parts)
