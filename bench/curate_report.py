"""The `curation` block of bench/README.md, rendered from bench/results/curate_vs_datatrove.json.

    .venv/bin/python bench/curate_report.py      # re-render the block from the saved results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, markdown_table, provenance_line, update_readme  # noqa: E402

LABELS = {"ours": "ours (`rlhf curate`)", "ours_transitive": "ours, `transitive: true`",
          "ours_before": "ours, before (base commit's quality.py, dedup.py)", "datatrove": "datatrove 0.10.1",
          "datatrove_matched": "datatrove 0.10.1, matched threshold"}
RULES = {"quality": "quality rules", "full": "quality + repetition"}


def _rows(payload: dict) -> tuple[list[dict], list[dict]]:
    speed, accuracy = [], []
    for r in payload["results"]["runs"]:
        d, q = r["dedup"], r["quality"]
        m = r["minhash"]
        who = {"rules": RULES[r["rules"]], "contender": LABELS.get(r["contender"], r["contender"])}
        speed.append({**who, "lsh": f"{m['bands']}x{m['rows']} ({m['s_curve_midpoint']})"
                      + (f", confirm >= {m['confirm_threshold']}" if m["confirm_threshold"] else ""), "cpu": r["cpu_s"], "wall": r["wall_s"], "per_core": r["docs_per_cpu_s"],
                      "per_wall": r["docs_per_wall_s"], "rss": r["peak_rss_mib"],
                      "x": "" if r["speedup_vs_datatrove"] is None else f"{r['speedup_vs_datatrove']:.2f}x"})
        accuracy.append({**who, "passed": q["passed"], "lowq": f"{q['low_quality_dropped_share']:.1%}",
                         "good": q["good_docs_dropped"], "dropped": f"{d['dropped']:,} / {d['should_drop']:,}",
                         "precision": f"{d['precision']:.4f}", "recall": f"{d['recall']:.4f}",
                         "r80": _pct(d["recall_by_min_jaccard"].get("[0.80,0.85)")),
                         "r85": _pct(d["recall_by_min_jaccard"].get("[0.85,0.90)")),
                         "lost": d["groups_lost"], "hard": f"{d['hard_negatives_dropped']} / {d['hard_negatives_in']}"})
    return speed, accuracy


def _curve(cfg: dict, rows: int) -> str:
    return ", ".join(f"{p:.0%} at J={s}" for s, p in cfg["candidate_probability"][str(rows)].items())


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:.1%}"


def render(payload: dict) -> str:
    res = payload["results"]
    c, cfg = res["corpus"], res["config"]
    speed, accuracy = _rows(payload)
    hist = ", ".join(f"{k}: {v:,}" for k, v in c["within_group_histogram"].items())
    lines = [
        "## Curation: Gopher quality filter + MinHash near-dedup, `rlhf curate` vs datatrove",
        "",
        "`bench/curate_vs_datatrove.py` runs the same work through our real runner (`rlhf curate`: read_jsonl -> "
        "gopher_quality -> minhash_dedup) and through datatrove's LocalPipelineExecutor (JsonlReader -> "
        "[GopherRepetitionFilter] -> GopherQualityFilter -> MinhashDedupSignature / Buckets / Cluster / Filter), each "
        "as its own child process with one worker, on a seeded corpus with a known ground truth (`bench/corpus.py`). "
        "docs/s per core = documents in / CPU seconds of that child.",
        "",
        f"MinHash: word {cfg['ngram']}-grams, {cfg['bands']} bands x {cfg['rows']} rows on both sides (what ours "
        f"picks itself for threshold 0.8 and 128 permutations; datatrove `MinhashConfig(n_grams={cfg['ngram']}, "
        f"num_buckets={cfg['bands']}, hashes_per_bucket={cfg['rows']})`, its default 64-bit xxhash). A pair becomes "
        f"an LSH candidate with probability {_curve(cfg, cfg['rows'])}. Same bands x rows is not the same "
        "threshold, though: ours then confirms every candidate on the signatures' Jaccard estimate (>= 0.8, 128 "
        "permutations), so pairs below 0.8 are kept apart, while datatrove drops every band collision and clusters "
        "transitively, so its effective threshold is the S-curve's midpoint (the MinHash column gives it). "
        f"\"matched threshold\" runs datatrove with {cfg['bands']} x {cfg['matched_rows']} rows, whose midpoint is "
        f"nearest 0.8 (candidate probability {_curve(cfg, cfg['matched_rows'])}). `transitive: true` (new option of "
        "minhash_dedup) also compares each record with earlier dropped ones, so it joins a cluster through any "
        "member, as datatrove's clustering does; the default compares with kept records only.",
        "",
        markdown_table(speed, [("rules", "Gopher rules"), ("contender", "contender"),
                               ("lsh", "MinHash bands x rows (S-curve midpoint)"), ("cpu", "CPU s"),
                               ("wall", "wall s"), ("per_core", "docs/s per core"), ("per_wall", "docs/s wall"),
                               ("rss", "peak RSS MiB"), ("x", "per core vs datatrove")]),
        "",
        markdown_table(accuracy, [("rules", "Gopher rules"), ("contender", "contender"), ("passed", "passed quality"),
                                  ("lowq", "low-quality dropped"), ("good", "good docs dropped"),
                                  ("dropped", "dedup dropped / should drop"), ("precision", "dedup precision"),
                                  ("recall", "dedup recall"), ("r80", "recall, groups J 0.80-0.85"),
                                  ("r85", "recall, J 0.85-0.90"), ("lost", "groups lost"),
                                  ("hard", "hard negatives dropped")]),
        "",
    ]
    lines += _verdict(res["runs"])
    for rules, a in res["quality_agreement"].items():
        lines.append(f"- Quality filters agree ({RULES[rules]}): kept by both {a['kept_by_both']:,}, only ours "
                     f"{a['kept_only_by_ours']:,} ({_kinds(a['only_ours_kinds'])}), only datatrove "
                     f"{a['kept_only_by_datatrove']:,} ({_kinds(a['only_datatrove_kinds'])}), dropped by both "
                     f"{a['dropped_by_both']:,}; {a['agreement']:.2%} of documents get the same verdict.")
    lines += [
        f"- Corpus: {c['docs']:,} documents from the bundled sample's sentences: {c['roles']['base']:,} groups "
        f"({c['groups_with_duplicates']:,} with near duplicates, largest {c['largest_group']}), "
        f"{c['roles']['variant']:,} variants, {c['roles']['hard_negative']:,} hard negatives (revised articles, "
        f"Jaccard to their source median {c['hard_negative_max_jaccard']['median']}, max "
        f"{c['hard_negative_max_jaccard']['max']}), {c['roles']['low_quality']:,} low-quality documents. Word "
        f"5-gram Jaccard of all {c['within_group_pairs']:,} within-group pairs: {hist} (every pair >= 0.8 by "
        f"construction; median {c['within_group_jaccard']['median']}).",
        "- Why the quality filters disagree: datatrove's alpha-words rule counts spaCy tokens, punctuation "
        "included, so punctuation-rich prose falls under 80% words with a letter; its stop-word rule needs 2 "
        "*distinct*, case-sensitive stop words, ours 2 occurrences of lower-cased words; and its word count splits "
        "\"don't\" in two, so a few short documents reach 50 words there and not here. Documents of repeated lines "
        "break only the repetition rules: under the quality rules alone both filters keep most of them (datatrove "
        "drops more of them, through its two rules above); under `full` both drop them.",
        "- Precision/recall (see `bench/curate_eval.py`): over the documents a contender's own quality filter "
        "passed; a dropped document is a true positive when some member of its ground-truth group survives; "
        "recall = true positives / (passed group members beyond one per group). Groups lost = groups with no "
        "survivor (merged into another).",
        *[f"- {n}" for n in payload["notes"]],
        "- datatrove child's side packages: " + ", ".join(f"{k} {v}" for k, v in
                                                         res.get("datatrove_side_packages", {}).items()) + ".",
        "",
        provenance_line(payload),
        "",
        "The rows were measured by these commands, in this order (`--merge` keeps the rows of the earlier ones):",
        "",
        "```bash",
        *res.get("commands", [payload["command"]]),
        "```",
    ]
    return "\n".join(lines)


def _verdict(runs: list[dict]) -> list[str]:
    """The issue's target (>= 2x datatrove's docs/s per core at equal or better recall), stated from the figures."""
    by = {(r["rules"], r["contender"]): r for r in runs}
    out = []
    for rules in dict.fromkeys(r["rules"] for r in runs):
        dt, dtm = by.get((rules, "datatrove")), by.get((rules, "datatrove_matched"))
        if dt is None:
            continue
        for name in ("ours", "ours_transitive"):
            ours = by.get((rules, name))
            if ours is None:
                continue
            rec, d = ours["dedup"]["recall"], dt["dedup"]
            text = (f"- Target ({RULES[rules]}, {LABELS[name]}): {ours['speedup_vs_datatrove']:.1f}x datatrove's "
                    f"docs/s per core. Recall {rec:.4f} vs {d['recall']:.4f} at the same bands x rows "
                    f"({'met' if rec >= d['recall'] else 'not met'}: there datatrove's effective threshold is "
                    f"{dt['minhash']['s_curve_midpoint']}, and it drops {d['hard_negatives_dropped']} hard negatives "
                    f"and loses {d['groups_lost']} groups, precision {d['precision']:.4f} vs "
                    f"{ours['dedup']['precision']:.4f})")
            if dtm is not None:
                m = dtm["dedup"]
                text += (f"; {rec:.4f} vs {m['recall']:.4f} at the same effective threshold "
                         f"({'met' if rec >= m['recall'] else 'not met'}; precision {ours['dedup']['precision']:.4f}"
                         f" vs {m['precision']:.4f}, {ours['speedup_vs_datatrove'] * dt['docs_per_cpu_s'] / dtm['docs_per_cpu_s']:.1f}x its docs/s)")
            out.append(text + ".")
        stages = dt["child"].get("stage_cpu_s")
        if stages:
            out.append(f"- Where datatrove's CPU goes ({RULES[rules]}): " + ", ".join(
                f"{k} {v:.0f} s" for k, v in stages.items()) + ".")
        before, ours = by.get((rules, "ours_before")), by.get((rules, "ours"))
        if before is not None and ours is not None:
            out.append(f"- Ours before -> after ({RULES[rules]}): {before['docs_per_cpu_s']:,.0f} -> "
                       f"{ours['docs_per_cpu_s']:,.0f} docs/s per core; the kept and rejected files are "
                       "byte-identical.")
    out.append("- Why: datatrove's stage 1 tokenizes every document with spaCy twice (the quality filter's words, "
               "then the MinHash shingles of the normalised text) and hashes each shingle in Python; ours tokenizes "
               "once with one regex, shared by both steps, and computes each signature as one NumPy matrix "
               "operation. Before -> after: gopher_quality now counts words with a letter and stop words in C "
               "(`filterfalse(str.isalpha)`, `map` over a frozenset built once) instead of a Python generator per "
               "word, and skips the line and paragraph statistics when the rules that read them are off. With the "
               "repetition rules on, their n-gram statistics (Python loops over every 2- to 10-gram) take about half "
               "of our time.")
    out.append("- Recall near the threshold: ours drops a pair only when its Jaccard *estimate* (128 permutations, "
               "standard error about 0.035 at J = 0.8) is >= 0.8, so a pair at exactly 0.80 is caught half the "
               "time; its misses are in groups whose closest pair sits at 0.80-0.85 (a quarter of the corpus's "
               "within-group pairs, by construction of the generator, which keeps every variant at >= 0.8 with "
               "every member). Datatrove at 14 x 9 catches those by merging everything above ~0.71, hard negatives "
               "included.")
    return out


def _kinds(kinds: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in kinds.items()) or "none"


def refresh_readme(payload: dict) -> None:
    update_readme("curation", render(payload))


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    refresh_readme(json.loads((RESULTS / "curate_vs_datatrove.json").read_text()))
