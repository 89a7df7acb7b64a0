"""bench/common.py: the measuring and reporting that every benchmark's figures rest on (the benchmarks themselves are
not run here: CI has no budget for them and their figures belong in bench/results/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402


def test_run_child_reports_the_childs_own_peak_memory_and_result():
    small = common.run_child([sys.executable, "-c", "import json; print('progress'); print(json.dumps({'n': 1}))"])
    big = common.run_child([sys.executable, "-c",
                            "import json; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
                            "print(json.dumps({'n': 2}))"])
    assert small.result == {"n": 1} and big.result == {"n": 2}
    # 300 MiB touched in the second child only: the first one's figure is not inflated by it, nor by this process
    assert big.peak_rss_mib - small.peak_rss_mib > 250
    assert small.peak_rss_mib < 200
    assert big.cpu_s >= 0 and big.wall_s > 0


def test_a_big_parent_does_not_inflate_the_childs_peak():
    """Linux folds the forked copy of the parent into a child's ru_maxrss; the figure must be the child's own."""
    ballast = bytearray(600 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touched: resident in this process
    small = common.run_child([sys.executable, "-c", "import json; print(json.dumps({}))"])
    assert small.peak_rss_mib < 200, small
    del ballast


def test_run_child_names_the_command_when_it_fails():
    with pytest.raises(RuntimeError, match="exited with 3"):
        common.run_child([sys.executable, "-c", "import sys; sys.exit(3)"])
    with pytest.raises(RuntimeError, match="not JSON"):
        common.run_child([sys.executable, "-c", "print('done')"])


def test_update_readme_replaces_only_its_own_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nProse that stays.\n", encoding="utf-8")
    common.update_readme("sft", "| a |\n|---|\n| 1 |", readme)
    common.update_readme("dpo", "dpo table", readme)
    common.update_readme("sft", "| a |\n|---|\n| 2 |", readme)
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("# Benchmarks\n\nProse that stays.\n")
    assert "| 2 |" in text and "| 1 |" not in text
    assert text.count("<!-- bench:sft -->") == 1 and text.index("bench:sft") < text.index("bench:dpo")


def test_results_name_machine_versions_and_command(tmp_path):
    path = common.write_results("probe", {"docs_per_s": 12.5}, packages=("trl",), out=tmp_path / "probe.json")
    payload = json.loads(path.read_text())
    assert payload["results"] == {"docs_per_s": 12.5}
    assert payload["machine"]["cores"] >= 1 and payload["machine"]["cpu"]
    assert payload["versions"]["trl"] and payload["versions"]["python"]
    assert payload["command"].startswith(".venv/bin/python ")
    line = common.provenance_line(payload)
    assert payload["command"] in line and "trl" in line


def test_markdown_table_aligns_numbers():
    table = common.markdown_table([{"tool": "ours", "docs/s": 1234.5}, {"tool": "peer", "docs/s": 0.5}],
                                  [("tool", "tool"), ("docs/s", "docs/s")])
    assert table.splitlines()[1] == "|---|---:|"
    assert "| ours | 1,234 |" in table and "| peer | 0.5 |" in table


SCRIPTS = sorted(p.name for p in (ROOT / "bench").glob("*.py") if 'if __name__ == "__main__"' in p.read_text())


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_explains_itself_without_heavy_imports(script):
    """--help must answer without importing torch/datatrove (benchmarks import them in their workers)."""
    out = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "bench" / script), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage" in out.stdout.lower()
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "transformers", "trl", "datatrove"}, "heavy import at --help"


def test_child_memory_sampler_sees_the_childs_peak_from_outside():
    hold = ("import json, time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.6); "
            "print(json.dumps({}))")
    # A child alive before the block (as the session's Argilla server is in the full suite) is not measured.
    bystander = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        with common.ChildMemorySampler(interval=0.05) as idle:  # no child started inside: nothing sampled
            time.sleep(0.2)
        with common.ChildMemorySampler(interval=0.05) as sampler:
            common.run_child([sys.executable, "-c", hold])
    finally:
        bystander.wait()
    assert sampler.peaks["Pss"] > 250 and sampler.peaks["Rss"] >= sampler.peaks["Pss"]
    assert sampler.at_peak_pss["Pss"] == sampler.peaks["Pss"]
    assert idle.peaks == {} and idle.at_peak_pss == {}


def test_thread_env_holds_a_child_to_the_thread_count():
    code = "import json, torch; print(json.dumps({'torch_threads': torch.get_num_threads()}))"
    assert common.run_child([sys.executable, "-c", code], env=common.thread_env(1)).result == {"torch_threads": 1}
    if (os.cpu_count() or 1) > 1:  # and the count is what it says, not a constant 1
        assert common.run_child([sys.executable, "-c", code], env=common.thread_env(2)).result == {"torch_threads": 2}


def test_phase_clock_times_each_call_of_a_wrapped_function_even_when_it_raises():
    import ppo_phases

    clock = ppo_phases.PhaseClock()
    work = clock.timed("update", lambda n: sum(range(n)))
    assert work(10_000) == sum(range(10_000)) and work(10) == 45

    def broken():
        raise ValueError("boom")

    with pytest.raises(ValueError):
        clock.timed("rollout", broken)()
    report = clock.report(episodes=2)
    assert clock.current is None
    assert report["update_calls"] == 2 and report["rollout_calls"] == 1
    assert report["update_cpu_s"] >= 0 and report["update_wall_s_per_1k"] >= 0
