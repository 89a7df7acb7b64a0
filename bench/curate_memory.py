"""Peak memory of `rlhf curate` as the input grows: streaming steps should keep it flat.

    python bench/curate_memory.py --docs 200000 800000

Writes a synthetic JSONL corpus of N documents (sample-like support text, ~700 bytes each) per size, runs a
streaming recipe (read_jsonl -> fix_text -> gopher_quality -> exact_dedup -> split -> JSONL + Parquet) as a child
process, and prints its peak RSS. exact_dedup keeps one 16-byte digest per kept record, so it grows by design
(~16 MB per million documents plus dict overhead); everything else streams.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
from pathlib import Path

from common import run_child

WORDS = ("the customer asked about roaming charges and the agent explained that the plan includes calls texts and "
         "data in Europe with a fair usage limit of twenty gigabytes per month after which a small charge applies "
         "to every extra megabyte so it is worth checking the app before you travel").split()

RECIPE = """
name: memory-bench
steps:
  - type: read_jsonl
    paths: {data}
  - type: fix_text
  - type: gopher_quality
  - type: exact_dedup
  - type: split
output:
  dir: {out}
  formats: {formats}
"""


def write_corpus(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(120)) + f" ticket {i}."
            f.write(json.dumps({"id": i, "text": text}) + "\n")


def measure(n: int, work: Path, formats: str, dedup: bool) -> dict:
    data = work / f"docs-{n}.jsonl"
    write_corpus(data, n)
    recipe = work / f"recipe-{n}.yaml"
    text = RECIPE.format(data=data, out=work / f"out-{n}", formats=formats)
    recipe.write_text(text if dedup else text.replace("  - type: exact_dedup\n", ""))
    # the child's own peak (common.run_child polls its VmHWM): its ru_maxrss would carry this process's size too
    code = "import sys; from rlhf.cli import main; rc = main(['curate', sys.argv[1], '-q']); print('{}'); sys.exit(rc)"
    child = run_child([sys.executable, "-c", code, str(recipe)])
    return {"docs": n, "formats": formats, "exact_dedup": dedup, "input_mb": round(data.stat().st_size / 2**20, 1),
            "peak_rss_mb": child.peak_rss_mib, "wall_s": round(child.wall_s, 1), "cpu_s": round(child.cpu_s, 1),
            "docs_per_s": round(n / child.wall_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, nargs="+", default=[100_000, 400_000])
    parser.add_argument("--formats", default="[jsonl, parquet]", help="output formats, as YAML")
    parser.add_argument("--no-dedup", action="store_true", help="leave exact_dedup out of the recipe")
    args = parser.parse_args()
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.docs:
            print(json.dumps(measure(n, Path(tmp), args.formats, not args.no_dedup)), flush=True)


if __name__ == "__main__":
    main()
