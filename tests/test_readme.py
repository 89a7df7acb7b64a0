"""The README's set-up commands are the ones CI runs, and `rlhf --help` stays instant (no heavy imports)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readme_test_command():
    commands = _readme_commands()
    test_cmd = next(c for c in commands if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    for part in [p.strip() for p in test_cmd.split("&&")]:
        assert part in ci, f".ci/run does not run the README's `{part}`"
    assert "torch==2.13.0" in test_cmd, "the set-up must pin the CPU torch build"


def test_readme_main_job_names_a_shipped_recipe():
    main_cmd = next(c for c in _readme_commands() if "rlhf run" in c)
    assert "pip install -q torch==2.13.0 -e ." in main_cmd  # a fresh machine: set-up first, CPU torch
    recipe = re.search(r"rlhf run (\S+)", main_cmd).group(1)
    assert (ROOT / recipe).is_file()


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from rlhf.cli import main; rc = main(['--help']); "
            "heavy = [m for m in ('torch', 'transformers', 'spacy', 'datasets', 'lingua', 'trafilatura') if m in sys.modules]; "
            "print('HEAVY', heavy); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout
    assert "curate" in out.stdout
