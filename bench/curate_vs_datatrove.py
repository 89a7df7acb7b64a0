r"""Gopher quality filter + MinHash near-dedup: our `rlhf curate` against datatrove, on one seeded corpus (issue 7).

    .venv/bin/python bench/curate_vs_datatrove.py --docs 5000 --before HEAD     # all contenders, ~3 minutes

The figures in bench/README.md come from four parts at 100k documents (each datatrove run takes 8-15 minutes here;
--merge keeps the saved rows that a part does not measure):

    .venv/bin/python bench/curate_vs_datatrove.py --docs 100000 --before HEAD \
        --contenders ours ours_transitive ours_before datatrove
    .venv/bin/python bench/curate_vs_datatrove.py --docs 100000 --contenders datatrove_matched --merge
    .venv/bin/python bench/curate_vs_datatrove.py --docs 100000 --before 63762b4 \
        --contenders ours ours_transitive ours_before --repeats 3 --merge
    .venv/bin/python bench/curate_vs_datatrove.py --docs 100000 --rules full --before 63762b4 \
        --contenders ours ours_before datatrove --repeats 3 --merge

What is measured. The corpus (bench/corpus.py, cached in a temporary folder) has near-duplicate groups, hard
negatives and low-quality documents with a known ground truth. Every contender does the same work as its own child
process with one worker, reading the same JSONL and writing the kept documents as JSONL:

- ours: the real runner, ``rlhf curate RECIPE`` (read_jsonl -> gopher_quality -> minhash_dedup; rejects.jsonl on,
  as by default); ``ours_transitive`` adds minhash_dedup's ``transitive: true``; ``ours_before`` runs
  curation/quality.py and curation/dedup.py of the ``--before`` commit (the code before this benchmark's changes);
- datatrove 0.10.1: LocalPipelineExecutor(workers=1) over JsonlReader -> GopherQualityFilter -> JsonlWriter (the
  filtered documents, uncompressed) -> MinhashDedupSignature, then MinhashDedupBuckets (14 tasks, one at a time),
  MinhashDedupCluster, and JsonlReader -> MinhashDedupFilter -> JsonlWriter: its documented 4-stage recipe.

Rule sets (``--rules``): ``quality`` = Gopher's quality rules only (datatrove's GopherQualityFilter; ours with its
repetition rules switched off); ``full`` = quality + repetition rules (datatrove adds GopherRepetitionFilter).
MinHash: word 5-grams, 14 bands x 9 rows on both sides (datatrove: num_buckets=14, hashes_per_bucket=9, its default
64-bit xxhash), which is what our minhash_dedup picks itself for threshold 0.8 and 128 permutations. Ours then
confirms each LSH candidate on the signatures' Jaccard estimate (>= 0.8); datatrove merges every band collision, so
its effective threshold is the S-curve's midpoint, 0.714 at 14 x 9; ``datatrove_matched`` uses 14 x 14 (midpoint
0.805) to compare at the same effective threshold.

Throughput is documents in / CPU seconds of the child (user + system, os.wait4): "docs/s per core"; wall seconds
are reported too (the machine is shared). Quality agreement and dedup precision/recall against the ground truth are
computed afterwards from the outputs (not timed); bench/curate_eval.py defines them. To profile ours, run a worker:
``bench/curate_vs_datatrove.py --worker ours --corpus-docs DOCS.jsonl --out DIR --rules quality --profile F.prof``.

Datatrove's English word tokenizer in 0.10.1 is spaCy's blank "en" tokenizer (tokenizer_assignment.csv:
eng -> SpaCyTokenizer), not NLTK punkt, so it runs offline with the spaCy already installed; nothing is replaced.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parent.parent

NGRAM, BANDS, ROWS, NUM_PERM, THRESHOLD, SEED = 5, 14, 9, 128, 0.8, 1
REPETITION_OFF = ("max_dup_lines", "max_dup_paragraphs", "max_dup_line_chars", "max_dup_paragraph_chars",
                  "max_top_ngram_chars", "max_dup_ngram_chars")


def s_curve_midpoint(bands: int, rows: int) -> float:
    """The Jaccard at which a pair shares a band with probability 1/2: 1 - (1 - s^rows)^bands = 0.5."""
    return (1 - 0.5 ** (1 / bands)) ** (1 / rows)


# datatrove merges every band collision, so its effective threshold is the S-curve's midpoint: 0.714 at 14 x 9,
# below the 0.8 that ours confirms. "datatrove_matched" uses the rows whose midpoint is nearest 0.8 (14 x 14: 0.805).
MATCHED_ROWS = min(range(1, 33), key=lambda r: abs(s_curve_midpoint(BANDS, r) - THRESHOLD))
CONTENDERS = {  # name -> (side, options)
    "ours": ("ours", {}),
    "ours_transitive": ("ours", {"transitive": True}),
    "ours_before": ("ours", {"before": True}),
    "datatrove": ("datatrove", {"rows": ROWS}),
    "datatrove_matched": ("datatrove", {"rows": MATCHED_ROWS}),
}


def recipe_yaml(docs: Path, out: Path, rules: str, transitive: bool) -> str:
    off = "".join(f"\n    {name}: null" for name in REPETITION_OFF) if rules == "quality" else ""
    return f"""name: bench-curate-{rules}
seed: {SEED}
steps:
  - type: read_jsonl
    paths: {docs}
    columns: {{text: text, id: id}}
  - type: gopher_quality{off}
  - type: minhash_dedup
    ngram: {NGRAM}
    num_perm: {NUM_PERM}
    threshold: {THRESHOLD}
    bands: {BANDS}
    rows: {ROWS}{chr(10) + "    transitive: true" if transitive else ""}
output:
  dir: {out}
  formats: [jsonl]
"""


def worker_ours(args: argparse.Namespace) -> dict:
    """`rlhf curate` in this process (the CLI's own entry point); ``--before-dir`` swaps in older curation modules."""
    if args.before_dir is not None:
        _install_before(args.before_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    recipe = args.out / "recipe.yaml"
    recipe.write_text(recipe_yaml(args.corpus_docs, args.out / "result", args.rules, args.transitive), encoding="utf-8")
    from rlhf.cli import main

    argv = ["curate", str(recipe), "-q"]
    if args.profile is not None:
        import cProfile

        ns = {"main": main, "argv": argv}
        cProfile.runctx("rc = main(argv)", ns, ns, str(args.profile))
        rc = ns["rc"]
    else:
        rc = main(argv)
    if rc != 0:
        raise SystemExit(rc)
    return {"ok": True}


def _install_before(folder: Path) -> None:
    """Load ``folder/<name>.py`` as ``curation.<name>`` before the recipe imports its step modules, so the run uses
    the saved ("before") code of those modules and the current code of everything else."""
    import importlib.util

    import curation

    for path in sorted(folder.glob("*.py")):
        name = f"curation.{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        setattr(curation, path.stem, module)


def worker_datatrove(args: argparse.Namespace) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    docs, out = args.corpus_docs, args.out
    config = MinhashConfig(n_grams=NGRAM, num_buckets=BANDS, hashes_per_bucket=args.rows, seed=SEED)
    filters = [GopherRepetitionFilter(), GopherQualityFilter()] if args.rules == "full" else [GopherQualityFilter()]
    stages = {
        "1_filter_signatures": ([JsonlReader(str(docs.parent), glob_pattern=docs.name), *filters,
                                 JsonlWriter(str(out / "filtered"), compression=None),
                                 MinhashDedupSignature(str(out / "signatures"), config=config)], 1),
        "2_buckets": ([MinhashDedupBuckets(str(out / "signatures"), str(out / "buckets"), config=config)], BANDS),
        "3_cluster": ([MinhashDedupCluster(str(out / "buckets"), str(out / "remove_ids"), config=config)], 1),
        "4_filter": ([JsonlReader(str(out / "filtered")), MinhashDedupFilter(str(out / "remove_ids")),
                      JsonlWriter(str(out / "deduped"), compression=None)], 1),
    }
    cpu = {}
    for name, (pipeline, tasks) in stages.items():
        start = time.process_time()
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, logging_dir=str(out / "logs" / name)).run()
        cpu[name] = round(time.process_time() - start, 2)
    return {"ok": True, "stage_cpu_s": cpu}


# datatrove's own extras, missing from the shared venv: JsonlReader needs orjson (extra "io"), and its MinHash hashes
# str n-grams with xxhash.xxh64_intdigest, which xxhash 4 refuses ("Strings must be encoded"): its "processing" extra
# pins xxhash<4. They go to a side folder on the datatrove child's PYTHONPATH only; ours keeps the venv's xxhash.
PEER_PACKAGES = ("xxhash<4", "orjson")


def peer_versions(site: Path) -> dict[str, str]:
    from importlib import metadata

    return {d.metadata["Name"]: d.version for d in metadata.distributions(path=[str(site)])}


def peer_site(work: Path) -> Path:
    import subprocess

    site = work / "peer-site"
    if not (site / "orjson").exists() or not (site / "xxhash").exists():
        print(f"# pip install --target {site} {' '.join(PEER_PACKAGES)}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(site), *PEER_PACKAGES],
                       check=True)
    return site


def run_contender(name: str, docs: Path, out: Path, rules: str, site: Path, before: Path | None):
    """One contender as its own child process (this script in --worker mode); returns common.ChildRun."""
    from common import run_child, thread_env

    side, options = CONTENDERS[name]
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--corpus-docs", str(docs),
            "--out", str(out), "--rules", rules]
    # One thread for NumPy/BLAS in both (datatrove's signatures and ours are NumPy); torch is not used here.
    env = thread_env(1)
    if side == "datatrove":
        argv += ["--rows", str(options["rows"])]
        env["PYTHONPATH"] = str(site)
    if options.get("transitive"):
        argv.append("--transitive")
    if options.get("before"):
        argv += ["--before-dir", str(before)]
    print(f"# {name} ({rules}) ...", file=sys.stderr, flush=True)
    return run_child(argv, env=env)


def before_modules(ref: str, folder: Path) -> tuple[Path, str]:
    """Our curation/dedup.py and curation/quality.py as they were at git ``ref`` (for the "before" contender), and
    the commit that ref names."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout

    folder.mkdir(parents=True, exist_ok=True)
    commit = git("rev-parse", "--short", ref).strip()
    for name in ("dedup", "quality"):
        (folder / f"{name}.py").write_text(git("show", f"{commit}:curation/{name}.py"), encoding="utf-8")
    return folder, commit


def measure(name: str, rules: str, corpus: Path, runs: Path, truth: dict, site: Path, before: Path | None) -> dict:
    """One contender on one rule set: its child's CPU, wall and peak RSS, then its outputs scored (not timed)."""
    import shutil

    import curate_eval as ev

    out = runs / rules / name
    shutil.rmtree(out, ignore_errors=True)
    child = run_contender(name, corpus / "docs.jsonl", out, rules, site, before)
    side, options = CONTENDERS[name]
    outcome = ev.datatrove_outcome(out) if side == "datatrove" else ev.ours_outcome(out / "result")
    n = len(truth)
    rows = options.get("rows", ROWS)
    return {
        "rules": rules, "contender": name, "docs": n, "cpu_s": child.cpu_s, "wall_s": child.wall_s,
        "peak_rss_mib": child.peak_rss_mib, "docs_per_cpu_s": round(n / child.cpu_s, 1),
        "docs_per_wall_s": round(n / child.wall_s, 1), "child": child.result,
        "minhash": {"bands": BANDS, "rows": rows, "s_curve_midpoint": round(s_curve_midpoint(BANDS, rows), 3),
                    "confirm_threshold": THRESHOLD if side == "ours" else None,
                    "transitive": side == "datatrove" or bool(options.get("transitive"))},
        "quality": ev.quality_scores(truth, outcome["passed"]),
        "dedup": ev.dedup_scores(truth, outcome["passed"], outcome["kept"], outcome.get("pairs")),
        "_passed": outcome["passed"],
    }


def measure_repeated(names: list[str], repeats: int, rules: str, corpus: Path, runs: Path, truth: dict, site: Path,
                     before: Path | None) -> dict[str, dict]:
    """Each contender ``repeats`` times, interleaved so that a busy minute on the shared machine hits all of them;
    CPU and wall seconds are the medians, every sample is kept. datatrove runs once (minutes a run): its CPU time is
    an order of magnitude above ours, so run-to-run noise does not decide the comparison."""
    from statistics import median

    rows: dict[str, dict] = {}
    for rep in range(repeats):
        for name in names:
            if rep and CONTENDERS[name][0] == "datatrove":
                continue
            row = measure(name, rules, corpus, runs, truth, site, before)
            rows.setdefault(name, {**row, "cpu_s_samples": [], "wall_s_samples": []})
            rows[name]["cpu_s_samples"].append(row["cpu_s"])
            rows[name]["wall_s_samples"].append(row["wall_s"])
    for row in rows.values():
        row["cpu_s"], row["wall_s"] = median(row["cpu_s_samples"]), median(row["wall_s_samples"])
        row["docs_per_cpu_s"] = round(row["docs"] / row["cpu_s"], 1)
        row["docs_per_wall_s"] = round(row["docs"] / row["wall_s"], 1)
    return rows


def merged_runs(rows: list[dict], agreement: dict, corpus_stats: dict, seed: int) -> tuple[list[dict], dict]:
    """With --merge: the rows of the saved results that this invocation did not measure (same corpus only)."""
    from common import RESULTS

    path = RESULTS / "curate_vs_datatrove.json"
    if not path.exists():
        return rows, agreement
    old = json.loads(path.read_text())["results"]
    if old["corpus"] != corpus_stats or old.get("corpus_seed") != seed:
        raise SystemExit("--merge: the saved results were measured on another corpus")
    done = {(r["rules"], r["contender"]) for r in rows}
    kept = [r for r in old["runs"] if (r["rules"], r["contender"]) not in done]
    return kept + rows, {**old["quality_agreement"], **agreement}


def _saved(key: str) -> list[str]:
    """From the saved results: their notes, or the commands that measured their rows."""
    from common import RESULTS

    path = RESULTS / "curate_vs_datatrove.json"
    if not path.exists():
        return []
    saved = json.loads(path.read_text())
    return saved["notes"] if key == "notes" else saved["results"].get("commands", [saved["command"]])


def main(args: argparse.Namespace) -> None:
    import tempfile

    import curate_eval as ev
    from common import command, write_results
    from corpus import VERSION, ensure_corpus

    work = args.work or Path(tempfile.gettempdir()) / "rlhf-bench-curation"
    corpus = ensure_corpus(args.docs, args.seed, work)
    corpus_stats = json.loads((corpus / "stats.json").read_text())
    truth = ev.load_truth(corpus)
    site = peer_site(work)
    runs = work / f"runs-n{args.docs}-s{args.seed}"
    before, before_commit = before_modules(args.before, runs / "before-modules") if args.before else (None, None)
    names = [n for n in args.contenders if n != "ours_before" or before]
    rows, agreement = [], {}
    for rules in args.rules:
        measured = measure_repeated(names, args.repeats, rules, corpus, runs, truth, site, before)
        if "ours" in measured and "datatrove" in measured:
            agreement[rules] = ev.quality_agreement(truth, measured["ours"]["_passed"],
                                                    measured["datatrove"]["_passed"])
        for row in measured.values():
            row.pop("_passed")
            print(json.dumps({k: row[k] for k in ("rules", "contender", "cpu_s", "wall_s", "docs_per_cpu_s")}),
                  flush=True)
        rows += measured.values()
    if args.merge:
        rows, agreement = merged_runs(rows, agreement, corpus_stats, args.seed)
    order = {name: i for i, name in enumerate(CONTENDERS)}
    rows.sort(key=lambda r: (r["rules"] != "quality", order[r["contender"]]))
    base = {r["rules"]: r["docs_per_cpu_s"] for r in rows if r["contender"] == "datatrove"}
    for row in rows:
        row["speedup_vs_datatrove"] = round(row["docs_per_cpu_s"] / base[row["rules"]], 2) if row["rules"] in base \
            else None
    commands = [*(_saved("commands") if args.merge else []), command()]
    results = {"corpus": corpus_stats, "corpus_seed": args.seed, "corpus_generator_version": VERSION,
               "commands": list(dict.fromkeys(commands)), "datatrove_side_packages": peer_versions(site),
               "config": config_summary(), "runs": rows, "quality_agreement": agreement}
    notes = NOTES + ([f"ours_before: curation/dedup.py and curation/quality.py of commit {before_commit}, the "
                      "rest of the code current"] if before else [])
    if args.merge:  # the other rows' notes (an earlier part's "before" commit)
        notes += [n for n in _saved("notes") if n not in notes]
    path = write_results("curate_vs_datatrove", results, notes=notes,
                         packages=("rlhf-pipeline", "datatrove", "spacy", "numpy", "xxhash", "orjson"))
    import curate_report

    curate_report.refresh_readme(json.loads(path.read_text()))
    print(f"wrote {path}", file=sys.stderr)


def config_summary() -> dict:
    return {"ngram": NGRAM, "bands": BANDS, "rows": ROWS, "matched_rows": MATCHED_ROWS, "num_perm_ours": NUM_PERM,
            "threshold_ours": THRESHOLD, "workers": 1,
            "candidate_probability": {str(r): {str(s): round(1 - (1 - s ** r) ** BANDS, 3)
                                               for s in (0.6, 0.7, 0.75, 0.8, 0.85, 0.9)} for r in (ROWS, MATCHED_ROWS)}}


NOTES = [
    "docs/s per core = corpus documents / CPU seconds (user + system) of the contender's child process, one worker "
    "each; wall seconds are on a shared 2-core VM.",
    "datatrove's English word tokenizer in 0.10.1 is spaCy's blank 'en' tokenizer (tokenizer_assignment.csv: eng -> "
    "SpaCyTokenizer), not NLTK punkt: it runs offline as shipped, nothing replaced.",
    "datatrove child: orjson (its 'io' extra, for JsonlReader) and xxhash<4 (its 'processing' extra pins it: its "
    "MinHash hashes str, which xxhash 4 rejects) from a side folder on PYTHONPATH; the venv is unchanged.",
]


def worker_main(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    args.rules = args.rules[0]  # a worker runs one rule set
    result = worker_datatrove(args) if args.worker == "datatrove" else worker_ours(args)
    print(json.dumps({**result, "inner_wall_s": round(time.perf_counter() - start, 2)}))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=100_000, help="corpus size")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed")
    parser.add_argument("--rules", nargs="+", default=["quality"], choices=["quality", "full"],
                        help="Gopher rule sets: quality (GopherQualityFilter's rules), full (+ repetition rules)")
    parser.add_argument("--contenders", nargs="+", choices=list(CONTENDERS),
                        default=["ours", "ours_transitive", "ours_before", "datatrove", "datatrove_matched"],
                        help="ours_before runs only with --before")
    parser.add_argument("--before", default=None, metavar="GIT_REF",
                        help="ours_before: curation/dedup.py and quality.py from this git ref (e.g. HEAD)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each of our contenders (median CPU and wall reported); datatrove runs once")
    parser.add_argument("--merge", action="store_true",
                        help="keep the saved results' other rows (same corpus), to split a long run in parts")
    parser.add_argument("--work", type=Path, default=None, help="corpus cache and outputs (default: a temp folder)")
    # worker mode (one contender, run by run_contender as a child process)
    parser.add_argument("--worker", choices=["ours", "datatrove"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus-docs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--transitive", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--before-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--profile", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    _args = parse_args()
    if _args.worker:
        worker_main(_args)
    else:
        main(_args)
