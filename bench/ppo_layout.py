"""PPO: rollout and update time per 1k samples and peak memory, one shared base (ours) vs separate models (TRL's
PPOTrainer), issue 7.

    .venv/bin/python bench/ppo_layout.py --sizes tiny   # ~3 min on the shared 2-core VM
    .venv/bin/python bench/ppo_layout.py --sizes big    # ~13 min; the rows of the other size are kept
    .venv/bin/python bench/ppo_layout.py --sizes tiny --updates 2 --contenders ours,trl-peft --no-write  # a check

Ours is ``alignment/ppo.py``'s real ``run(config)``: the policy, reference, value and reward are adapters on one
copy of the SFT weights (alignment/roles.py). The peer is TRL 1.12.0's ``PPOTrainer`` (``trl.experimental.ppo``,
the last release that ships it; TRL 1.13 removed it, huggingface/trl 7020) in a virtualenv of its own built on first
use (bench/ppo_trl.py says how, and which layouts ``trl-full``, ``trl-peft`` and ``trl-peft-lora-value`` are).

The same work for every contender, per model size: the project's random-init Llama-family model (``tiny``: the
tests' 2-layer hidden-64 model; ``big``: 8 layers, hidden 1024, 104M parameters, for the memory figure), saved with
save_pretrained so both sides load it with from_pretrained; a finished SFT run on it (``alignment.sft.run``, full
weights, one step at a negligible learning rate: PPO needs a parent run, and the still-random policy runs every
response to the token budget on both sides); a LoRA reward run on those SFT weights (``alignment.reward.run``, one
step; merged into a full checkpoint for TRL, whose example script loads its value and reward models from one);
prompts from the synthetic product task (alignment/synthetic.py) through the chat template; the same response
length, sampling temperature, rollout of 16 prompts (micro-batches of 8, grad_accum 2, 1 mini-batch: both make the
same optimizer steps), PPO epochs, LoRA shape, learning rate, fp32, no gradient checkpointing, and torch threads.

Measured, each contender in its own child process (bench/common.run_child): the rollout phase (sampling, the policy /
reference log-probs, values, reward scores, GAE) and the update phase (the PPO epochs' forward/backward and optimizer
steps), wall and CPU seconds per 1k samples, timed inside the worker (bench/ppo_phases.py); the whole child's wall
and CPU seconds (loading included), its peak RSS (common.run_child) and its peak PSS (sampled from here, see
common.ChildMemorySampler: RSS counts weights memory-mapped twice from one file twice), and the weights each layout
holds. Our side is timed by wrapping ``alignment.rollout.make_rollout`` and ``alignment.ppo.ppo_update`` from
outside, the same calls whose times ppo.py now writes to history.json (time/rollout_s, time/update_s); the wrappers
also time the code before that change.
Writes bench/results/ppo_layout.json and the ``ppo`` table in bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    RESULTS,
    ROOT,
    ChildMemorySampler,
    command,
    git_commit,
    markdown_table,
    provenance_line,
    run_child,
    thread_env,
    update_readme,
    write_results,
)

CONTENDERS = ("ours", "trl-full", "trl-peft", "trl-peft-lora-value")
# The random-init models: build_tiny_model's arguments. big: 8 x (4 x 1024^2 + 3 x 1024 x 2816) + 1M embeddings,
# 104M parameters. Per size, what differs: the model, the PPO updates and the response length (the big model's
# run is there for the memory figure, and must stay within ~15 minutes on the shared 2-core machine).
SIZES = {"tiny": {"model": {}, "updates": 16, "max_new_tokens": 64},
         "big": {"model": {"hidden_size": 1024, "num_layers": 8, "num_heads": 16, "intermediate_size": 2816},
                 "updates": 1, "max_new_tokens": 32}}
# What both sides are told: samples/telecom/ppo.yaml's values, except that its rollout of 16 is 1 mini-batch of 2
# micro-batches here, not 2 mini-batches of 1: TRL's Accelerator accumulates over grad_accum * mini_batches
# micro-batches, so with 2 mini-batches it would step once per PPO epoch where ours steps twice.
WORK = {"temperature": 0.7, "missing_eos_penalty": 1.0, "batch_size": 8, "grad_accum": 2,
        "mini_batches": 1, "chunk": 16, "learning_rate": 1e-3, "seed": 13, "max_prompt_tokens": 128,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "ppo": {"epochs": 4, "kl_coef": 0.1, "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1, "gamma": 1.0,
                "lam": 0.95}}
LAYOUTS = {"ours": "1 base + 3 LoRA", "trl-full": "4 bases, full", "trl-peft": "3 bases, LoRA policy",
           "trl-peft-lora-value": "3 bases, LoRA policy+value"}
COLUMNS = [("size", "model"), ("contender", "contender"), ("layout", "layout"),
           ("rollout_cpu_s_per_1k", "rollout CPU s / 1k"), ("update_cpu_s_per_1k", "update CPU s / 1k"),
           ("rollout_wall_s_per_1k", "rollout wall s / 1k"), ("update_wall_s_per_1k", "update wall s / 1k"),
           ("wall_s", "total wall s"), ("cpu_s", "total CPU s"), ("weights_mib", "weights held MiB"),
           ("peak_rss_mib", "peak RSS MiB"), ("peak_pss_mib", "peak PSS MiB"),
           ("trainable_params_m", "trained (M)"), ("episodes", "samples"), ("response_length", "resp. tokens")]


# ---- setup (a child of its own, in the project's .venv) ----

def ppo_config(spec: dict[str, Any], out_dir: str) -> Any:
    """Our PPO recipe for ``spec``: the same numbers the TRL side gets."""
    from alignment import ppo

    return ppo.Config(
        parent=spec["sft_run"], reward_model=spec["rm_run"], data={"path": spec["task"], "eval_split": None},
        output_dir=out_dir, peft={"method": "lora", **spec["lora"]},
        rollout={"max_new_tokens": spec["max_new_tokens"], "temperature": spec["temperature"],
                 "missing_eos_penalty": spec["missing_eos_penalty"]},
        ppo={**spec["ppo"], "mini_batches": spec["mini_batches"]},
        train={"max_steps": spec["updates"], "batch_size": spec["batch_size"], "grad_accum": spec["grad_accum"],
               "eval_batch_size": spec["chunk"], "max_length": spec["max_prompt_tokens"],
               "learning_rate": spec["learning_rate"], "seed": spec["seed"], "logging_steps": 1,
               "save_steps": 10_000, "precision": "fp32"})


def save_merged_reward(sft_model: Path, adapter: Path, out: Path) -> Path:
    """The reward run as the full checkpoint TRL's PPO example loads from ``--reward_model_path`` (its value model
    and its reward model both): the LoRA and the trained score head merged into the SFT weights."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = AutoModelForSequenceClassification.from_pretrained(sft_model, num_labels=1, dtype="float32")
    PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().save_pretrained(out)
    AutoTokenizer.from_pretrained(sft_model).save_pretrained(out)
    return out


def setup(spec: dict[str, Any]) -> dict[str, Any]:
    """The model, the task, the SFT parent and the reward run for one size; the prompts' token ids for TRL."""
    import torch
    from transformers import AutoConfig

    from alignment import reward, sft
    from alignment.models import ModelConfig, build_tiny_model, load_tokenizer
    from alignment.rollout import load_prompts
    from alignment.synthetic import make_preference_task

    torch.set_num_threads(spec["threads"])
    work = Path(spec["work"])
    raw = ROOT / "samples" / "telecom" / "raw"
    corpus = [*sorted(p for p in (raw / "docs").iterdir() if p.suffix in (".md", ".txt")),
              raw / "chats" / "transcripts.jsonl"]
    model_dir = build_tiny_model(work / "base", corpus, **SIZES[spec["size"]]["model"])
    task = make_preference_task(work / "task", n_train=512, n_test=8)
    # One step at a negligible learning rate: a finished SFT run (the parent PPO needs) whose policy is still the
    # random model, which almost never samples its EOS, so every response runs to max_new_tokens on both sides
    # and the work per sample is the same (a real SFT step made the ~100M model stop after ~16 tokens, at random)
    common = {"batch_size": 8, "max_length": spec["max_prompt_tokens"], "save_steps": 1000, "max_steps": 1,
              "learning_rate": 1e-7, "precision": "fp32"}
    sft_run = sft.run(sft.Config(model={"name_or_path": str(model_dir)}, data={"path": str(task)},
                                 output_dir=str(work / "sft"), peft={"method": "full"}, train=common))
    lora = {"method": "lora", **spec["lora"]}
    rm_run = reward.run(reward.Config(model={"name_or_path": str(sft_run / "model")}, parent=str(sft_run),
                                      data={"path": str(task)}, output_dir=str(work / "rm"), peft=lora,
                                      train=common))
    spec = {**spec, "task": str(task), "sft_run": str(sft_run), "rm_run": str(rm_run)}
    merged_rm = save_merged_reward(sft_run / "model", rm_run / "adapter", work / "rm-merged")
    cfg = ppo_config(spec, str(work / "unused"))
    _, ids = load_prompts(cfg, load_tokenizer(ModelConfig(str(sft_run / "model"))))
    (work / "prompts.json").write_text(json.dumps(ids))
    config = AutoConfig.from_pretrained(model_dir)
    return {"model_dir": str(sft_run / "model"), "reward_model_dir": str(merged_rm), "task": str(task),
            "sft_run": str(sft_run), "rm_run": str(rm_run), "prompts_file": str(work / "prompts.json"),
            "prompts": len(ids), "prompt_tokens_mean": round(sum(map(len, ids)) / len(ids), 1),
            "model": {"hidden_size": config.hidden_size, "layers": config.num_hidden_layers,
                      "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size}}


# ---- our contender (a child of its own, in the project's .venv) ----

def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """``alignment.ppo.run`` unchanged; its two phases timed by wrapping the functions train_loop calls."""
    import torch

    from alignment import ppo, rollout
    from bench.ppo_phases import PhaseClock

    torch.set_num_threads(spec["threads"])
    clock = PhaseClock()
    # train_loop imports make_rollout from alignment.rollout when it runs, and calls ppo_update as a module global
    rollout.make_rollout = clock.timed("rollout", rollout.make_rollout)
    ppo.ppo_update = clock.timed("update", ppo.ppo_update)
    run_dir = ppo.run(ppo_config(spec, str(Path(spec["work"]) / "ours")))
    record = json.loads((run_dir / "run.json").read_text())
    history = json.loads((run_dir / "history.json").read_text())
    metrics = record["metrics"]
    return {**clock.report(metrics["episodes"]), "total_params": metrics["total_params"],
            "trainable_params": metrics["trainable_params"], "updates": metrics["updates"],
            "base_copies": record["roles"]["base_copies"], "roles": record["roles"],
            "trains": "policy LoRA + value LoRA + value head",
            "response_length": round(sum(h["response/length"] for h in history) / len(history), 2),
            "no_eos_rate": round(sum(h["response/no_eos_rate"] for h in history) / len(history), 3),
            "kl_last": history[-1]["objective/kl"], "score_first": history[0]["objective/score"],
            "score_last": history[-1]["objective/score"]}


# ---- the driver ----

def child_env(threads: int) -> dict[str, str]:
    return {**thread_env(threads), "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONPATH": str(ROOT)}


def measure_size(size: str, args: argparse.Namespace, peer_python: Path | None) -> list[dict[str, Any]]:
    work = args.work / size
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    spec = {**WORK, "size": size, "work": str(work), "threads": args.threads,
            "updates": args.updates or SIZES[size]["updates"], "max_new_tokens": SIZES[size]["max_new_tokens"]}
    spec_file = work / "spec.json"
    spec_file.write_text(json.dumps(spec))
    env = child_env(args.threads)
    measured = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "command": command(),
                "git_commit": git_commit()}
    print(f"# {size}: setup", file=sys.stderr, flush=True)
    spec.update(run_child([sys.executable, __file__, "--worker", "setup", str(spec_file)], env=env).result)
    spec_file.write_text(json.dumps(spec, indent=1))
    rows = []
    for contender in args.contenders:
        print(f"# {size}: {contender}", file=sys.stderr, flush=True)
        if contender == "ours":
            argv = [sys.executable, __file__, "--worker", "ours", str(spec_file)]
        else:
            argv = [str(peer_python), str(Path(__file__).with_name("ppo_trl.py")), str(spec_file),
                    contender.removeprefix("trl-")]
        load_before = [round(x, 2) for x in os.getloadavg()]
        with ChildMemorySampler(interval=1.0) as pss:
            child = run_child(argv, env=env, cwd=ROOT)
        result = child.result
        rows.append({"size": size, "contender": contender, "layout": LAYOUTS[contender],
                     **result, "wall_s": child.wall_s, "cpu_s": child.cpu_s, "peak_rss_mib": child.peak_rss_mib,
                     "peak_pss_mib": pss.at_peak_pss.get("Pss"), "pss_at_peak": pss.at_peak_pss,
                     "weights_mib": round(result["total_params"] * 4 / 2**20),  # fp32
                     "total_params_m": round(result["total_params"] / 1e6, 2),
                     "trainable_params_m": round(result["trainable_params"] / 1e6, 3),
                     "setup": {k: spec[k] for k in ("prompts", "prompt_tokens_mean", "model", "updates",
                                                     "max_new_tokens")},
                     "measured": {**measured, "load_avg_before": load_before,
                                  "load_avg_after": [round(x, 2) for x in os.getloadavg()]}})
        print(json.dumps({k: rows[-1].get(k) for k, _ in COLUMNS}), file=sys.stderr, flush=True)
    return rows


def merged(rows: list[dict[str, Any]], fresh: bool) -> list[dict[str, Any]]:
    """This run's rows, plus the rows of sizes it did not measure from the results file (each row keeps its own
    command, date and commit under ``measured``), so the sizes can be measured by separate invocations."""
    old = RESULTS / "ppo_layout.json"
    measured = {(r["size"], r["contender"]) for r in rows}
    if not fresh and old.exists():
        rows = rows + [r for r in json.loads(old.read_text())["results"]["rows"]
                       if (r["size"], r["contender"]) not in measured]
    order = {name: i for i, name in enumerate(SIZES)}
    return sorted(rows, key=lambda r: (order[r["size"]], CONTENDERS.index(r["contender"])))


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    """One line per size: each peer's figures as multiples of ours."""
    lines = []
    for size in SIZES:
        ours = next((r for r in rows if r["size"] == size and r["contender"] == "ours"), None)
        if ours is None:
            continue
        parts = [f"{r['contender']} x{r['peak_pss_mib'] / ours['peak_pss_mib']:.2f} PSS, "
                 f"x{r['peak_rss_mib'] / ours['peak_rss_mib']:.2f} RSS, "
                 f"x{r['rollout_cpu_s_per_1k'] / ours['rollout_cpu_s_per_1k']:.2f} rollout CPU, "
                 f"x{r['update_cpu_s_per_1k'] / ours['update_cpu_s_per_1k']:.2f} update CPU"
                 for r in rows if r["size"] == size and r["contender"] != "ours"]
        if parts:
            lines.append(f"{size}, the peer relative to ours (above 1: ours uses less): " + "; ".join(parts) + ".")
    return lines


def notes_for(rows: list[dict[str, Any]], peer: dict[str, str] | None, threads: int) -> list[str]:
    sizes = "; ".join(f"{name}: {cfg['updates']} update(s), {cfg['max_new_tokens']}-token responses"
                      for name, cfg in SIZES.items())
    return [
        *ratios(rows),
        (f"Peer: TRL {peer['trl'] if peer else '?'} `trl.experimental.ppo.PPOTrainer` (the last TRL release with a "
         "PPOTrainer; 1.13 removed it, huggingface/trl 7020), in ~/.cache/rlhf-pipeline/bench-venvs/trl-ppo with the "
         f"same torch/transformers/peft/accelerate as ours: {peer}."),
        ("Layouts: ours = one base, LoRA adapters for policy, value (+ head) and reward (+ head), reference = "
         "adapters off. trl-full = TRL's example script without --use_peft: policy and value trained in full, a "
         "reference copy, a reward model (4 bases). trl-peft = with --use_peft: LoRA policy (reference = adapter "
         "off), value still trained in full (the old API has no PEFT option for it), separate reward (3 bases). "
         "trl-peft-lora-value = the closest the old API allows to ours: the value model also wrapped in the same "
         "LoRA by hand (3 bases, the same trained parameters as ours)."),
        (f"Same work: prompts of the synthetic product task through the chat template; rollout of 16 prompts "
         f"(micro-batches of 8, grad_accum 2, 1 mini-batch), 4 PPO epochs, LoRA r16/alpha32 on all linear layers, "
         f"lr 1e-3, temperature 0.7, fp32, no gradient checkpointing, {threads} torch thread(s) "
         f"(torch.set_num_threads and OMP_NUM_THREADS) in every child; {sizes}. The SFT parent is one step at "
         "lr 1e-7, so responses run to the token budget on both sides (see resp. tokens)."),
        ("Rollout: TRL reads the policy's log-probs from the sampler's scores; ours runs one more forward pass of "
         "the policy (with the entropy) and decodes each response and re-tokenises it through the chat template for "
         "the reward model (TRL scores the sampled ids as they are): on the 104M model that is why our rollout "
         "takes more CPU than TRL's; on the tiny one per-call overheads dominate instead. Update: TRL runs policy and value forward in "
         "one graph and back-propagates once (both sets of activations alive together); ours back-propagates the "
         "policy loss before the value forward pass; TRL does not clip gradients."),
        ("Memory: peak RSS is the child's own (common.run_child); peak PSS sampled each second from the parent. "
         "transformers 5 memory-maps safetensors on CPU, and RSS counts a file page once per mapping: TRL's frozen copies loaded "
         "from the same file count once each in RSS but share physical pages until written (PSS). 'weights held' "
         "is every distinct parameter x 4 bytes, what a GPU would hold, where every model is a copy of its own. "
         "On the tiny model the Python libraries dominate (ours imports the whole alignment stack), and PSS "
         "splits shared-library pages among every process that maps them, so it moves with whatever else runs "
         "on the machine (ours, tiny: 547 and 675 MiB in two runs on 2026-11-24); RSS does not."),
        ("Phases are timed inside each worker: ours by wrapping alignment.rollout.make_rollout and "
         "alignment.ppo.ppo_update from outside (these runs predate the time/rollout_s and time/update_s that "
         "ppo.py now writes to history.json; the wrappers time the same calls); TRL by wrapping its module's "
         "batch_generation and forward plus an on_step_end callback. total wall/CPU = the whole child process, "
         "loading included.")]


def readme_section(payload: dict[str, Any]) -> str:
    rows = payload["results"]["rows"]
    return "\n".join([
        "## PPO: one shared base vs separate models", "",
        ("`bench/ppo_layout.py` runs our PPO (`alignment/ppo.py`: policy, reference, value and reward as adapters on "
         "one copy of the SFT weights) and TRL 1.12.0's `PPOTrainer` (the last TRL with one; a virtualenv of its own, "
         "same torch/transformers/peft) on the same work, each in its own child process. Per-1k figures are per "
         "1,000 prompt/response samples; CPU seconds are the primary throughput figure on this shared machine, wall "
         "seconds depend on its load. tiny = the tests' 2-layer random-init Llama (0.2M parameters); big = a "
         "random-init 8-layer hidden-1024 Llama (104M), for the memory figure."), "",
        "```bash",
        ".venv/bin/python bench/ppo_layout.py --sizes tiny   # ~3 min",
        ".venv/bin/python bench/ppo_layout.py --sizes big    # ~13 min; keeps the other size's rows",
        "```", "",
        markdown_table(rows, COLUMNS), "",
        *[f"- {note}" for note in payload["notes"]], "",
        provenance_line(payload), "",
        *[provenance_of(size, [r for r in rows if r["size"] == size]) for size in SIZES
          if any(r["size"] == size for r in rows)]])


def provenance_of(size: str, rows: list[dict[str, Any]]) -> str:
    """Which command measured one size's rows, when, and how busy the machine was before each contender."""
    dates = sorted(r["measured"]["date"] for r in rows)
    loads = sorted(r["measured"]["load_avg_before"][0] for r in rows)
    commands = sorted({f"`{r['measured']['command']}` at commit {r['measured']['git_commit']}" for r in rows})
    when = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
    return (f"- {size} rows: {', '.join(commands)}, {when}; 1-minute load average before each contender "
            f"{loads[0]}-{loads[-1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,big", help="comma list of: " + ", ".join(SIZES))
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma list of: " + ", ".join(CONTENDERS))
    parser.add_argument("--updates", type=int, default=None, help="PPO updates per run (default: tiny 16, big 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for every contender")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work-ppo", help="scratch folder (deleted)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--no-write", action="store_true", help="print, do not write results or README")
    parser.add_argument("--worker", nargs=2, metavar=("ROLE", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        role, spec = args.worker[0], json.loads(Path(args.worker[1]).read_text())
        print(json.dumps({"setup": setup, "ours": run_ours}[role](spec)), flush=True)
        return
    args.contenders = args.contenders.split(",")
    unknown = set(args.contenders) - set(CONTENDERS) | set(args.sizes.split(",")) - set(SIZES)
    if unknown:
        parser.error(f"unknown: {', '.join(sorted(unknown))}")
    from bench import ppo_trl

    peer_python = ppo_trl.ensure_venv() if any(c != "ours" for c in args.contenders) else None
    peer = ppo_trl.peer_versions(peer_python) if peer_python else None
    try:
        rows = [row for size in args.sizes.split(",") for row in measure_size(size, args, peer_python)]
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    rows = merged(rows, args.no_write)
    results = {"work": WORK, "sizes": SIZES, "peer_versions": peer, "threads": args.threads, "rows": rows}
    notes = notes_for(rows, peer, args.threads)
    if args.no_write:
        print(json.dumps(results, indent=1))
        return
    path = write_results("ppo_layout", results, packages=("transformers", "peft", "trl", "accelerate"), notes=notes)
    update_readme("ppo", readme_section(json.loads(path.read_text())))
    print(f"wrote {path.relative_to(ROOT)} and the ppo section of bench/README.md", file=sys.stderr)


if __name__ == "__main__":
    main()
