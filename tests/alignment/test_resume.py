"""``--resume`` (field notes trap 8; huggingface/transformers 35850, 28531, huggingface/peft 574): a real ``rlhf align
sft`` process is killed with SIGKILL after some checkpoints, refuses to restart silently, resumes from its newest
complete checkpoint (optimizer, scheduler, RNG, data position) and ends with the adapter an uninterrupted run makes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignment.runs import load_run
from alignment.training import last_checkpoint
from rlhf.cli import main

QA = [("How do I top up?", "Open the app and tap Top up."),
      ("Is roaming free in Spain?", "Yes, Spain is in Roam Zone 1."),
      ("How do I get a PAC code?", "Text PAC to 65075."),
      ("Why is my bill higher?", "Roaming charges from May.")]
SAVE_STEPS = 5
KILL_AFTER = 10  # kill once checkpoint-10 is complete: two checkpoints exist, so the newest can be torn below
STARTUP_S = 180  # importing torch/transformers/TRL in a fresh process takes ~15 s on a busy 2-core box
# Same seed, same single-threaded CPU kernels on both sides: a correct resume repeats the uninterrupted run's
# arithmetic, so the weights agree to float32 rounding (measured: identical). A resume that lost the optimizer
# moments, the scheduler position, the RNG (LoRA dropout) or the data position is off by about the learning rate
# times the remaining steps (the assertion on `moved` below shows the scale).
ATOL = 1e-6


def _recipe(tmp_path: Path, model_dir: Path, max_steps: int) -> Path:
    data = tmp_path / "conv.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n" for q, a in QA * 8))
    recipe = tmp_path / f"sft-{max_steps}.yaml"
    recipe.write_text(f"model:\n  name_or_path: {model_dir}\ndata:\n  path: {data}\n"
                      f"output_dir: {tmp_path / f'interrupted-{max_steps}'}\npeft:\n  method: lora\n  r: 4\n"
                      f"train:\n  max_steps: {max_steps}\n  batch_size: 4\n  max_length: 64\n  learning_rate: 0.01\n"
                      f"  save_steps: {SAVE_STEPS}\n  save_total_limit: 2\n  logging_steps: 5\n")
    return recipe


def _complete(run_dir: Path) -> list[Path]:
    """Checkpoints whose trainer_state.json (written last) is there, oldest first."""
    return sorted((p for p in (run_dir / "checkpoints").glob("checkpoint-*") if (p / "trainer_state.json").is_file()),
                  key=lambda p: int(p.name.split("-")[1]))


def _kill_after_checkpoint(recipe: Path, run_dir: Path, log: Path) -> bool:
    """Run ``rlhf align sft`` in its own process and SIGKILL it once checkpoint-KILL_AFTER is complete; False when
    it finished first (nothing left to interrupt)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "align", "sft", "--config", str(recipe)],
                                cwd=recipe.parent, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_S
    try:
        while proc.poll() is None:
            if any(int(p.name.split("-")[1]) >= KILL_AFTER for p in _complete(run_dir)):
                proc.send_signal(signal.SIGKILL)  # no handler runs: what a preempted job or an OOM kill leaves
                proc.wait()
                # the poller may have been starved long enough for the run to end between seeing and killing
                return load_run(run_dir)["status"] == "running"
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint-{KILL_AFTER} within {STARTUP_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"training process failed (rc {proc.returncode}):\n{log.read_text()[-3000:]}"
    return False


def _adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _logged_steps(run_dir: Path) -> list[list[int]]:
    """The steps each attempt logged a training loss at (one TensorBoard events file per attempt), first step first."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    attempts = []
    for events in run_dir.glob("logs/events.out.tfevents.*"):
        scalars = EventAccumulator(str(events)).Reload()
        if "train/loss" in scalars.Tags()["scalars"]:
            attempts.append(sorted(e.step for e in scalars.Scalars("train/loss")))
    return sorted(attempts)


def test_killed_run_resumes_and_matches_an_uninterrupted_run(tiny_model_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    for max_steps in (40, 120):  # a longer run if the first one finished before it could be killed
        recipe = _recipe(tmp_path, tiny_model_dir, max_steps)
        run_dir = tmp_path / f"interrupted-{max_steps}"
        if _kill_after_checkpoint(recipe, run_dir, tmp_path / f"train-{max_steps}.log"):
            break
    else:
        pytest.skip(f"the training process finished twice before checkpoint-{KILL_AFTER} could be seen and killed "
                    "(polling starved on an overloaded machine?); nothing was interrupted")

    record = load_run(run_dir)
    assert record["status"] == "running"  # SIGKILL: the run never got to mark itself failed
    complete = _complete(run_dir)
    assert len(complete) >= 2 and not (run_dir / "adapter").exists()
    # A kill during a save leaves checkpoint-N with its weights but a missing or half-written trainer_state.json
    # (transformers writes checkpoints in place, state last). Make the newest one torn: resume must skip it.
    state = complete[-1] / "trainer_state.json"
    state.write_text(state.read_text()[:40])
    expected = complete[-2]
    assert last_checkpoint(run_dir) == str(expected)
    at_checkpoint = load_file(str(expected / "adapter_model.safetensors"))  # rotated away once training goes on

    # again without --resume: a clear refusal naming the flag and the checkpoint it would continue from
    assert main(["align", "sft", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and expected.name in err and "Traceback" not in err
    assert main(["align", "sft", "--config", str(recipe), "--resume"]) == 0
    record = load_run(run_dir)
    assert record["status"] == "finished" and record["attempts"] >= 2  # the killed attempt and this one (stage.py
    # currently also counts the refused attempt in between, and marks the run failed while refusing)
    assert record["metrics"]["global_step"] == max_steps
    # a restart from step 0 would also reproduce the uninterrupted weights (same seed), so check where this attempt
    # began: its TensorBoard file starts after the checkpoint, the killed one at step 1
    step = int(expected.name.split("-")[1])
    killed, resumed_steps = _logged_steps(run_dir)
    assert killed[0] == 1 and resumed_steps[0] > step and resumed_steps[-1] == max_steps

    straight = tmp_path / "straight"
    assert main(["align", "sft", "--config", str(recipe), "--set", f"output_dir={straight}"]) == 0
    resumed, reference = _adapter(run_dir), _adapter(straight)
    assert resumed.keys() == reference.keys()
    worst = max((resumed[k] - reference[k]).abs().max().item() for k in reference)
    print(f"resumed from {expected.name} of {max_steps}: max |resumed - uninterrupted| = {worst:.3g}")
    assert worst <= ATOL, f"resumed adapter differs from the uninterrupted one by {worst:.3g}"
    # the steps after the checkpoint moved the weights far more than the tolerance, so the match is meaningful
    moved = max((reference[k] - at_checkpoint[k]).abs().max().item() for k in reference)
    print(f"max |uninterrupted - {expected.name}| = {moved:.3g}")
    assert moved > 1000 * ATOL
    assert load_run(straight)["metrics"]["train_loss_last"] == pytest.approx(record["metrics"]["train_loss_last"],
                                                                            abs=1e-4)


def test_last_checkpoint_skips_torn_checkpoints(tmp_path):
    """A checkpoint folder counts only once its trainer_state.json (written last) parses; the step number, not the
    name's string order, decides which is newest."""
    folder = tmp_path / "checkpoints"
    assert last_checkpoint(tmp_path) is None
    for step, state in ((5, "{}"), (40, "{}"), (200, None), (300, '{"global_st')):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        if state is not None:
            (folder / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (folder / "checkpoint-tmp").mkdir()
    assert last_checkpoint(tmp_path) == str(folder / "checkpoint-40")
