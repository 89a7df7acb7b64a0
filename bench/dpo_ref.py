"""DPO's reference model (issue 7): ours (the reference is the same base with the LoRA adapter switched off) against a
plain TRL script that passes a separate full copy as ``ref_model``; peak memory and step time.

    .venv/bin/python bench/dpo_ref.py                      # tiny + 118M model; writes results and the README block
    .venv/bin/python bench/dpo_ref.py --models tiny --steps-tiny 10 --no-write   # a quick check

Ours is ``alignment.dpo.run(Config)`` starting from a full-weights SFT run (what samples/telecom/sft.yaml makes), so
the stage trains a fresh LoRA and the reference is that base with the adapter disabled: one copy of the weights. The
peer is what TRL's docs show for an explicit reference: ``DPOTrainer(model=base, ref_model=<a second
AutoModelForCausalLM.from_pretrained of the same folder>, peft_config=LoraConfig(...), args=DPOConfig(...))``.

Both sides get the same weights (the SFT run's ``model/`` folder), the same tokenizer, the same pairs (the curated
telecom sample's preference train split, ``rlhf curate samples/telecom/curate.yaml``, repeated so it lasts), the same
LoRA (rank, alpha, dropout, all linear layers), batch size, max_length, learning rate, beta, seed, max_steps and torch
threads. Settings where TRL's DPOConfig defaults differ from our recipe defaults are pinned to ours on the peer, since
they change memory and speed on their own: fp32 (DPOConfig defaults bf16=True) and no activation checkpointing
(DPOConfig defaults gradient_checkpointing=True). Neither side evaluates; ours writes its usual final checkpoint.
Two more runs of the peer's script explain what is measured: ``peer-private`` loads both copies with
``disable_mmap=True`` (every copy in its own memory, as on a GPU), ``trl-peft`` passes no ref_model (TRL's own
adapter-off reference, to tell TRL/PEFT's share of a step-time gap from our stage's).

Two models: the tiny random-init Llama of ``rlhf model tiny`` (so small that a second copy is lost in the RSS of
Python + torch) and a 118M-parameter random-init Llama (LlamaConfig + the tiny tokenizer, save_pretrained), where one
extra copy of the fp32 weights is ~450 MiB. Every contender runs in its own child process (bench/common.run_child):
peak RSS and CPU seconds come from that child alone. Step time is timed by a Trainer callback (the interval between
consecutive ``on_step_end``, wall and process CPU), averaged over steps 2..N (step 1 pays one-off warm-up).
Sanity: with the adapter at its zero init (LoRA's B = 0) the policy equals the reference, so the first logged DPO
loss must be ln 2 = 0.693 on both sides. bench/dpo_ref_report.py turns the runs into the comparison and README block
(``--render`` redoes that from bench/results/dpo_ref.json without measuring).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py, when run as a script
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the product packages, from any working directory

from common import ROOT, ChildMemorySampler, proc_status_kib, run_child, thread_env, update_readme, write_results
from dpo_ref_report import comparisons, notes_for, per_contender, readme_block, render

# ~118M parameters: 12 blocks of hidden 896 (14 heads of 64) and SwiGLU 2432, vocab 1024 tied. fp32: ~450 MiB.
BIG = {"hidden_size": 896, "num_hidden_layers": 12, "num_attention_heads": 14, "num_key_value_heads": 14,
       "intermediate_size": 2432, "max_position_embeddings": 512}
CONTENDERS = ("ours", "peer", "peer-private", "trl-peft")
PACKAGES = ("transformers", "trl", "peft", "accelerate", "datasets")


# --------------------------------------------------------------------------------------------------- preparation
def build_big_model(tiny_dir: Path, out: Path, seed: int) -> Path:
    """A random-init Llama of size BIG with the tiny model's tokenizer, saved with save_pretrained."""
    import torch
    from transformers import (
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    config = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **BIG)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_pairs(curated: Path, out: Path, repeat: int) -> int:
    """The curated preference train split, TRL columns only, ``repeat`` times over: one file both sides read."""
    rows = [json.loads(line) for line in (curated / "preference" / "train.jsonl").read_text().splitlines() if line]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "train.jsonl").open("w") as f:
        for _ in range(repeat):
            for row in rows:
                f.write(json.dumps({k: row[k] for k in ("prompt", "chosen", "rejected")}) + "\n")
    return len(rows) * repeat


def sft_parent(model_dir: Path, curated: Path, out: Path, seed: int) -> Path:
    """A finished full-weights SFT run (one step): what ``rlhf align dpo`` starts from. Its ``model/`` folder is the
    base both contenders load."""
    from alignment import sft

    train = {"max_steps": 1, "batch_size": 2, "max_length": 128, "learning_rate": 1e-5, "save_steps": 100, "seed": seed}
    return sft.run(sft.Config(model={"name_or_path": str(model_dir)},
                              data=[{"path": str(curated), "eval_split": None}], output_dir=str(out),
                              peft={"method": "full"}, train=train))


def prepare(work: Path, models: list[str], repeat: int, seed: int) -> None:
    """Tiny model, curated sample, big model, pairs and one SFT parent per model, under ``work``."""
    rlhf = [sys.executable, "-m", "rlhf.cli"] if not (ROOT / ".venv/bin/rlhf").exists() else [str(ROOT / ".venv/bin/rlhf")]
    if not (work / "tiny").exists():
        subprocess.run([*rlhf, "model", "tiny", "--out", str(work / "tiny")], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
    if not (work / "telecom").exists():
        subprocess.run([*rlhf, "curate", "samples/telecom/curate.yaml", "--out", str(work / "telecom"), "-q"],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    if "big" in models and not (work / "big").exists():
        build_big_model(work / "tiny", work / "big", seed)
    write_pairs(work / "telecom", work / "pairs", repeat)
    for name in models:
        if not (work / "sft" / name / "model").exists():
            sft_parent(work / name, work / "telecom", work / "sft" / name, seed)


# ------------------------------------------------------------------------------------------------ measurement
def step_timer():
    """A Trainer callback recording wall and process-CPU time at the end of every optimizer step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[float, float]] = []
            self.memory: dict[str, dict[str, float]] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [(time.perf_counter(), time.process_time())]
            self.memory["train_begin"] = memory_now()  # everything loaded and wrapped; its HWM covers loading

        def on_train_end(self, args, state, control, **kwargs):
            self.memory["train_end"] = memory_now()

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append((time.perf_counter(), time.process_time()))

    return StepTimer()


def memory_now() -> dict[str, float]:
    """This process's resident set now (VmRSS) and its high-water mark so far (VmHWM), MiB."""
    return {field.lower(): round(proc_status_kib(field) / 1024, 1) for field in ("VmRSS", "VmHWM")}


def weight_bytes(*models) -> int:
    """Bytes of distinct parameter and buffer storage held by ``models`` (tied weights counted once)."""
    seen, total = set(), 0
    for model in models:
        if model is None:
            continue
        for t in [*model.parameters(), *model.buffers()]:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
    return total


def summarise(timer, log_history: list[dict], trainer) -> dict:
    """Per-step figures (steps 2..N), the DPO losses and the weights the trainer holds."""
    marks = timer.marks
    walls = [b[0] - a[0] for a, b in itertools.pairwise(marks)]
    cpus = [b[1] - a[1] for a, b in itertools.pairwise(marks)]
    losses = [e["loss"] for e in log_history if "loss" in e and "step" in e]
    base_params = sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" not in n)
    return {
        "steps": len(walls), "first_step_s": round(walls[0], 3) if walls else None,
        "step_s": round(sum(walls[1:]) / len(walls[1:]), 4) if len(walls) > 1 else None,
        "step_cpu_s": round(sum(cpus[1:]) / len(cpus[1:]), 4) if len(cpus) > 1 else None,
        "step_s_median": round(statistics.median(walls[1:]), 4) if len(walls) > 1 else None,
        "step_cpu_s_median": round(statistics.median(cpus[1:]), 4) if len(cpus) > 1 else None,
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "loss_last5_mean": round(sum(losses[-5:]) / len(losses[-5:]), 4) if losses else None,
        "losses": losses, "base_params": base_params,
        "ref_model": type(trainer.ref_model).__name__ if trainer.ref_model is not None else None,
        "weights_held_mib": round(weight_bytes(trainer.model, trainer.ref_model) / 2**20, 1),
        "threads": __import__("torch").get_num_threads(), "memory": timer.memory,
        "checkpointing": {"args.gradient_checkpointing": trainer.args.gradient_checkpointing,
                          "model": bool(getattr(trainer.model, "is_activation_checkpointing", False))},
    }


def worker_ours(a: argparse.Namespace) -> dict:
    """``alignment.dpo.run(Config)`` as a user runs it; the step timer is attached to the trainer it builds."""
    from alignment import dpo

    timer, built = step_timer(), {}
    product_build = dpo.build_trainer

    def build_and_time(cfg, run_dir):  # measurement only: the product's trainer, plus a callback that reads clocks
        trainer = product_build(cfg, run_dir)
        trainer.add_callback(timer)
        built["trainer"] = trainer
        return trainer

    dpo.build_trainer = build_and_time
    cfg = dpo.Config(parent=a.parent, data=[{"path": a.pairs, "eval_split": None}], output_dir=a.out, beta=a.beta,
                     loss_type="sigmoid", peft={"method": "lora", "r": a.r, "alpha": a.alpha, "dropout": a.dropout},
                     train={"learning_rate": a.lr, "max_steps": a.steps, "batch_size": a.batch_size,
                            "max_length": a.max_length, "logging_steps": 1, "save_steps": a.steps + 1000,
                            "seed": a.seed, "precision": "fp32"})
    run_dir = dpo.run(cfg)
    trainer = built["trainer"]
    record = json.loads((Path(run_dir) / "run.json").read_text())
    return {**summarise(timer, trainer.state.log_history, trainer), "reference": record["reference"]["kind"]}


def worker_peer(a: argparse.Namespace) -> dict:
    """Plain TRL with an explicit reference: a second full copy from from_pretrained."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import DPOConfig, DPOTrainer

    set_seed(a.seed)
    base = str(Path(a.parent) / "model")
    tok = AutoTokenizer.from_pretrained(base)
    # transformers memory-maps safetensors on CPU, so the two copies share one page cache unless mmap is off (the
    # "private" variant: every copy in its own memory, as after a dtype cast or on a GPU)
    load = {"disable_mmap": True} if a.worker == "peer-private" else {}
    model = AutoModelForCausalLM.from_pretrained(base, **load)
    # "trl-peft": TRL's own layout for a PEFT run without ref_model (the reference is the adapter switched off, as
    # in ours): tells what is TRL/PEFT's and what is our stage's
    ref_model = None if a.worker == "trl-peft" else AutoModelForCausalLM.from_pretrained(base, **load)
    train_ds = datasets.load_dataset("json", data_files=str(Path(a.pairs) / "train.jsonl"), split="train")
    args = DPOConfig(output_dir=str(Path(a.out) / "checkpoints"), learning_rate=a.lr, max_steps=a.steps,
                     per_device_train_batch_size=a.batch_size, max_length=a.max_length, beta=a.beta,
                     loss_type=["sigmoid"], seed=a.seed, logging_steps=1, logging_first_step=True,
                     save_strategy="no", report_to="none",
                     bf16=False, gradient_checkpointing=False)  # our recipe defaults; DPOConfig's are True/True
    peft_config = LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    timer = step_timer()
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train_ds, processing_class=tok,
                         peft_config=peft_config, callbacks=[timer])
    trainer.train()
    trainer.save_model(str(Path(a.out) / "adapter"))  # ours saves its adapter too
    return {**summarise(timer, trainer.state.log_history, trainer),
            "reference": "adapter_disabled" if ref_model is None else "separate_copy"}


def worker(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    if a.worker == "prepare":
        prepare(Path(a.work), a.models.split(","), a.repeat, a.seed)
        result: dict = {"prepared": a.work}
    else:
        result = (worker_ours if a.worker == "ours" else worker_peer)(a)
    print(json.dumps(result))


# ------------------------------------------------------------------------------------------------ orchestration
def contender_argv(a: argparse.Namespace, who: str, model: str, work: Path, steps: int, max_length: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", who, "--work", str(work), "--threads",
            str(a.threads), "--parent", str(work / "sft" / model), "--pairs", str(work / "pairs"),
            "--out", str(work / "runs" / f"{who}-{model}"), "--steps", str(steps), "--max-length", str(max_length),
            "--batch-size", str(a.batch_size), "--lr", str(a.lr), "--beta", str(a.beta), "--r", str(a.r),
            "--alpha", str(a.alpha), "--dropout", str(a.dropout), "--seed", str(a.seed)]


def measure(a: argparse.Namespace, work: Path) -> list[dict]:
    """Every contender on every model, ``rounds`` times; each round starts one contender later in the order, so no
    contender always runs first (the neighbours' load on this shared machine changes over minutes)."""
    env = thread_env(a.threads)
    contenders, rows = a.contenders.split(","), []
    for model in a.models.split(","):
        steps, max_length, rounds = ((a.steps_tiny, a.max_length_tiny, a.rounds_tiny) if model == "tiny"
                                     else (a.steps_big, a.max_length_big, a.rounds_big))
        for round_ in range(rounds):
            for who in contenders[round_ % len(contenders):] + contenders[:round_ % len(contenders)]:
                shutil.rmtree(work / "runs" / f"{who}-{model}", ignore_errors=True)  # train from scratch, never skip
                print(f"[dpo_ref] {model} round {round_ + 1}/{rounds}: {who} ({steps} steps, max_length "
                      f"{max_length})", file=sys.stderr, flush=True)
                with ChildMemorySampler() as sampler:
                    child = run_child(contender_argv(a, who, model, work, steps, max_length), env=env, cwd=ROOT)
                r = child.result
                rows.append({"model": model, "contender": who, "round": round_ + 1, **r,
                             "peak_rss_mib": child.peak_rss_mib, "wall_s": child.wall_s, "cpu_s": child.cpu_s,
                             **{f"sampled_peak_{k.lower()}_mib": sampler.peaks.get(k, 0.0)
                                for k in ("Rss", "Pss", "Anonymous")},
                             "max_length": max_length, "batch_size": a.batch_size, "lr": a.lr, "lora_r": a.r})
    return rows


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="tiny,big", help="comma list of tiny, big (default: both)")
    p.add_argument("--steps-tiny", type=int, default=30)
    p.add_argument("--steps-big", type=int, default=8)
    p.add_argument("--max-length-tiny", type=int, default=512, help="samples/telecom/dpo.yaml's")
    p.add_argument("--max-length-big", type=int, default=128, help="short, to keep CPU run time sane")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step (samples/telecom/dpo.yaml's)")
    p.add_argument("--lr", type=float, default=1e-3, help="samples/telecom/dpo.yaml's (random-init model)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--r", type=int, default=16, help="LoRA rank (AdapterConfig's default)")
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--rounds-tiny", type=int, default=3, help="repeats on the tiny model (medians reported)")
    p.add_argument("--rounds-big", type=int, default=1)
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="comma list, run in this order")
    p.add_argument("--threads", type=int, default=1, help="torch threads, the same for both contenders")
    p.add_argument("--repeat", type=int, default=3, help="copies of the curated pairs (84 each) in the training file")
    p.add_argument("--workdir", help="reuse this folder for models, data and parents (default: a temp dir, removed)")
    p.add_argument("--no-write", action="store_true", help="print only; leave results/README alone")
    p.add_argument("--render", action="store_true", help="re-render the comparison and README block from "
                   "bench/results/dpo_ref.json without measuring")
    # worker mode (internal)
    p.add_argument("--worker", choices=("prepare", *CONTENDERS), help=argparse.SUPPRESS)
    for name in ("--work", "--parent", "--pairs", "--out"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--max-length", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.worker:
        worker(a)
        return 0
    if a.render:
        return render(a)
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="dpo-ref-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run_child([sys.executable, str(Path(__file__).resolve()), "--worker", "prepare", "--work", str(work),
                   "--models", a.models, "--repeat", str(a.repeat), "--seed", str(a.seed), "--threads",
                   str(a.threads)], cwd=ROOT)
        runs = measure(a, work)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    contenders = per_contender(runs)
    results = {"contenders": contenders, "comparison": comparisons(contenders), "ln2": round(math.log(2), 6),
               "runs": runs}
    print(json.dumps(results["comparison"], indent=2))
    if a.no_write:
        return 0
    path = write_results("dpo_ref", results, packages=PACKAGES, notes=notes_for(a))
    update_readme("dpo", readme_block(json.loads(path.read_text())))
    print(f"wrote {path} and the dpo block of bench/README.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
