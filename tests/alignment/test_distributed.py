"""The stages run unchanged on several processes (field notes trap 2): two CPU ranks under torchrun (gloo) share
the data, one rank writes the run record, and both take the same decision when the run already exists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignment.runs import load_run


def test_two_ranks_train_one_run(tiny_model_dir, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    data = tmp_path / "conv.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}?"},
                                                     {"role": "assistant", "content": f"answer {i}."}]}) + "\n"
                            for i in range(32)))
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"model:\n  name_or_path: {tiny_model_dir}\ndata:\n  path: {data}\n"
                      f"output_dir: {tmp_path / 'run'}\npeft:\n  r: 4\n"
                      f"train:\n  max_steps: 4\n  batch_size: 2\n  max_length: 64\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(torchrun), "--nproc_per_node", "2", "-m", "rlhf.cli", "align", "sft", "--config", str(recipe)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    record = load_run(tmp_path / "run")
    assert record["status"] == "finished" and record["attempts"] == 1
    # 32 rows, 2 per rank per step: 4 steps are half an epoch only when both ranks took their own share
    assert record["metrics"]["world_size"] == 2 and record["metrics"]["epoch"] == pytest.approx(0.5)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env)
    assert again.returncode == 0 and again.stdout.count("sft run:") == 2  # both ranks skip the finished run
