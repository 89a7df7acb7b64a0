"""SFT throughput and memory: our stage (``alignment.sft.run``) against a plain ``trl.SFTTrainer`` script with TRL's
defaults, on the same model, data, LoRA adapter, batch size, learning rate, seed and number of steps (issue 7).

Contenders, each in its own child process (``bench.common.run_child``: peak RSS and CPU seconds are the child's own):

- ``trl``: the script a TRL user writes: ``SFTTrainer(model=AutoModelForCausalLM.from_pretrained(...),
  args=SFTConfig(output_dir, per_device_train_batch_size, learning_rate, max_steps, seed, max_length,
  assistant_only_loss=True), peft_config=LoraConfig(...), train_dataset=...)``. Everything else is TRL 1.16's default:
  padded batches, gradient checkpointing on, bf16 on (on a CPU this needs ``use_cpu=True``, which TrainingArguments
  asks for), logging every 10 steps. ``assistant_only_loss`` is set because it defines the task (ours trains on
  assistant tokens by default); it costs nothing.
- ``ours (before)``: ``alignment.sft.run`` with ``padding_free: false``, i.e. padded batches as before this change.
- ``ours``: ``alignment.sft.run`` with its defaults (padding-free batches, attention per sequence; on CUDA also Liger
  kernels when installed and flash-attention when installed).

Both sides: LoRA r=16, alpha=32, dropout 0, all linear layers except the head; AdamW, linear schedule, no warm-up;
``torch.set_num_threads(--threads)`` and OMP/MKL threads equal in every child. Measured around ``Trainer.train`` only
(model loading, tokenisation and saving are outside): wall and CPU seconds, the tokens the collator handed to the
model (real ones and pad ones) and the logged loss curve. Throughput is real (non-pad) tokens per second; "per CPU
second" is the stable figure on a shared machine. ``--device cuda`` builds a ~0.5B random-init Llama with
Qwen2.5-0.5B's dimensions (bf16), reports ``torch.cuda.max_memory_allocated`` and MFU = 6 * params * tokens/s / peak
dense bf16 FLOP/s (table below, by device name; 6N counts the full backward, which LoRA partly skips).

Data: the curated telecom sample's conversations (``rlhf curate samples/telecom/curate.yaml``; 182 training
conversations of 137-280 tokens with the tiny tokenizer), repeated over epochs as ``--steps`` requires.

Run from the repository root (the final CPU figures in bench/README.md):

    .venv/bin/python bench/sft_vs_trl.py --steps 150
    .venv/bin/python bench/sft_vs_trl.py --device cuda --steps 100 --batch-size 32   # on a CUDA machine
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/sft_vs_trl.py` from the root

from bench.common import (  # noqa: E402
    ROOT, markdown_table, provenance_line, run_child, thread_env, update_readme, write_results,
)

NAME = "sft_vs_trl"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
LOGGING_STEPS = 10  # TRL's default; ours is told the same so both curves have the same points
# Peak dense bf16 tensor FLOP/s by device-name fragment, first match wins (vendor datasheets, no sparsity).
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
             ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10", 125e12)]
# Qwen2.5-0.5B's shape as a LlamaConfig (no attention biases): ~494M parameters with its vocabulary, embeddings tied.
GPU_MODEL = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, max_position_embeddings=2048, tie_word_embeddings=True)


# --- worker side: one contender, inside its own process --------------------------------------------------------------

def _instrument(stats: dict[str, Any], cuda: bool) -> None:
    """Count what each training batch holds and time Trainer.train; the same wrappers for every contender."""
    from transformers import Trainer
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collate = DataCollatorForLanguageModeling.torch_call

    def counted(self, examples):
        out = collate(self, examples)
        if stats["on"]:
            real = out["attention_mask"].sum() if "attention_mask" in out else out["position_ids"].numel()
            stats["batches"].append((out["input_ids"].numel(), int(real), int((out["labels"] != -100).sum())))
        return out

    compute_loss = SFTTrainer.compute_loss

    def recorded(self, model, inputs, *args, **kwargs):
        out = compute_loss(self, model, inputs, *args, **kwargs)
        if stats["on"] and model.training:  # every micro-step's loss: a curve finer than the logged averages
            stats["step_losses"].append(round((out[0] if isinstance(out, tuple) else out).item(), 5))
        return out

    train = Trainer.train

    def timed(self, *args, **kwargs):
        import torch

        stats["trainer"], stats["on"] = self, True
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return train(self, *args, **kwargs)
        finally:
            if cuda:
                torch.cuda.synchronize()
                stats["max_memory_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            stats["train_wall_s"] = round(time.perf_counter() - wall, 3)
            stats["train_cpu_s"] = round(time.process_time() - cpu, 3)
            stats["on"] = False

    DataCollatorForLanguageModeling.torch_call = counted
    SFTTrainer.compute_loss = recorded
    Trainer.train = timed


def _peer(a: argparse.Namespace) -> None:
    """The plain TRL script: only the shared essentials are set."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(a.seed)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model)
    dataset = datasets.load_dataset("json", data_files=a.data, split="train")
    args = SFTConfig(output_dir=a.out, per_device_train_batch_size=a.batch_size, learning_rate=a.lr,
                     max_steps=a.steps, seed=a.seed, max_length=a.max_length, assistant_only_loss=True,
                     **({} if torch.cuda.is_available() else {"use_cpu": True}))
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, peft_config=peft_config, train_dataset=dataset,
                         processing_class=tokenizer)
    trainer.train()


def _ours(a: argparse.Namespace) -> None:
    from alignment import sft

    cfg = sft.Config(model={"name_or_path": a.model}, data=[{"path": a.data}], output_dir=a.out,
                     peft={"method": "lora", **LORA},
                     train={"learning_rate": a.lr, "max_steps": a.steps, "batch_size": a.batch_size,
                            "max_length": a.max_length, "seed": a.seed, "logging_steps": LOGGING_STEPS,
                            "save_steps": a.steps + 1},
                     padding_free=a.worker == "ours", assistant_only_loss=True, overwrite=True)
    sft.run(cfg)


def worker(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available()
    stats: dict[str, Any] = {"on": False, "batches": [], "step_losses": []}
    _instrument(stats, cuda)
    (_peer if a.worker == "trl" else _ours)(a)
    trainer = stats.pop("trainer")
    # the dataloader collates one batch ahead (accelerate looks ahead to find the last batch): count trained ones only
    trained = stats.pop("batches")[:trainer.state.global_step * trainer.args.gradient_accumulation_steps]
    for i, key in enumerate(("computed_tokens", "real_tokens", "loss_tokens")):
        stats[key] = sum(batch[i] for batch in trained)
    model = trainer.accelerator.unwrap_model(trainer.model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    stats.pop("on")
    stats.update(
        loss_curve=[[h["step"], round(h["loss"], 5)] for h in trainer.state.log_history if "loss" in h],
        trl_num_tokens=next((h["num_tokens"] for h in reversed(trainer.state.log_history) if "num_tokens" in h), None),
        base_params=sum(p.numel() for p in base.parameters()),
        attention=base.config._attn_implementation, bf16=bool(trainer.args.bf16),
        gradient_checkpointing=bool(trainer.args.activation_checkpointing or trainer.args.gradient_checkpointing),
        liger=bool(trainer.args.use_liger_kernel), torch_threads=torch.get_num_threads(),
        device=torch.cuda.get_device_name(0) if cuda else "cpu")
    print(json.dumps(stats))


# --- parent side: inputs, the three runs, the report -----------------------------------------------------------------

def _rlhf(*argv: str) -> None:
    code = "import sys; from rlhf.cli import main; sys.exit(main(sys.argv[1:]))"
    subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def prepare_inputs(work: Path, device: str) -> tuple[Path, Path]:
    """The curated sample's training conversations as one JSONL of ``messages``, and the model folder."""
    curated, tiny = work / "telecom", work / "tiny-model"
    if not (curated / "instruction" / "train.jsonl").is_file():
        _rlhf("curate", "samples/telecom/curate.yaml", "--out", str(curated), "--quiet")
    if not (tiny / "config.json").is_file():
        _rlhf("model", "tiny", "--out", str(tiny))
    data = work / "conversations.jsonl"
    with open(curated / "instruction" / "train.jsonl", encoding="utf-8") as src, open(data, "w") as dst:
        for line in src:
            if line.strip():
                dst.write(json.dumps({"messages": json.loads(line)["messages"]}) + "\n")
    return data, (tiny if device == "cpu" else build_gpu_model(work / "llama-0.5b", tiny))


def build_gpu_model(out: Path, tokenizer_dir: Path) -> Path:
    """A random-init Llama with Qwen2.5-0.5B's dimensions, saved in bf16 with the tiny model's tokenizer (ids past
    the tokenizer's are never seen; the LM head still costs its full vocabulary, as in the real model)."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(**GPU_MODEL, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, dtype="bfloat16")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def peak_flops(device_name: str) -> tuple[str, float] | None:
    for fragment, flops in PEAK_BF16:
        if fragment.lower() in device_name.lower():
            return fragment, flops
    return None


CONTENDERS = [("trl", "TRL SFTTrainer, defaults"), ("ours-before", "ours before (padded batches)"),
              ("ours", "ours (padding-free)")]


def summarise(name: str, label: str, children: list[Any]) -> dict[str, Any]:
    """One row per contender: the median of its repeats for times (runs interleave with the other contenders, so
    a burst of load from the machine's neighbours hits all of them alike), counts and losses from the first run
    (they are deterministic: checked), the highest peak RSS."""
    from statistics import median

    r = dict(children[0].result)
    for other in children[1:]:
        if other.result["real_tokens"] != r["real_tokens"] or other.result["step_losses"] != r["step_losses"]:
            raise RuntimeError(f"{name}: repeats differ in tokens or losses; the runs are not comparable")
    for key in ("train_wall_s", "train_cpu_s", "max_memory_allocated_mib"):
        if key in r:
            r[f"{key}_runs"] = [c.result[key] for c in children]
            r[key] = median(r[f"{key}_runs"])
    row = {"contender": name, "label": label, **r, "child_wall_s": median(c.wall_s for c in children),
           "child_cpu_s": median(c.cpu_s for c in children), "peak_rss_mib": max(c.peak_rss_mib for c in children),
           "repeats": len(children)}
    row["pad_share"] = round(1 - r["real_tokens"] / r["computed_tokens"], 3)
    row["tokens_per_s"] = round(r["real_tokens"] / r["train_wall_s"], 1)
    row["tokens_per_cpu_s"] = round(r["real_tokens"] / r["train_cpu_s"], 1)
    peak = peak_flops(r["device"]) if r["device"] != "cpu" else None
    if peak:
        row["peak_bf16_flops"], row["peak_from"] = peak[1], peak[0]
        row["mfu"] = round(6 * r["base_params"] * row["tokens_per_s"] / peak[1], 4)
    return row


def compare(rows: list[dict[str, Any]]) -> None:
    """Speed-ups against TRL and against our own before, and how far apart the loss curves are."""
    by = {r["contender"]: r for r in rows}
    for r in rows:
        for other in ("trl", "ours-before"):
            ref = by[other]
            r[f"speedup_cpu_vs_{other}"] = round(r["tokens_per_cpu_s"] / ref["tokens_per_cpu_s"], 2)
            r[f"speedup_wall_vs_{other}"] = round(r["tokens_per_s"] / ref["tokens_per_s"], 2)
            # per optimizer step: the logged averages cover different windows (ours also logs step 1)
            pairs = list(zip(r["step_losses"], ref["step_losses"], strict=True))
            r[f"loss_max_abs_diff_vs_{other}"] = round(max(abs(x - y) for x, y in pairs), 5)
        last = r["step_losses"][-LOGGING_STEPS:]
        r["final_loss"] = round(sum(last) / len(last), 4)  # mean of the last logging window


def readme(payload: dict[str, Any], device: str) -> str:
    rows = payload["results"]["contenders"]
    cols = [("label", "contender"), ("tokens_per_cpu_s", "real tok / CPU s"), ("tokens_per_s", "real tok / s (wall)"),
            ("speedup_cpu_vs_trl", "x TRL (CPU)"), ("speedup_wall_vs_trl", "x TRL (wall)"),
            ("pad_share", "pad share"), ("computed_tokens", "tokens computed"), ("real_tokens", "real tokens"),
            ("peak_rss_mib", "peak RSS MiB"), ("final_loss", "final loss"),
            ("loss_max_abs_diff_vs_trl", "max per-step loss diff vs TRL"),
            ("loss_max_abs_diff_vs_ours-before", "max per-step loss diff vs before")]
    if device == "cuda":
        cols[1:1] = [("max_memory_allocated_mib", "max CUDA MiB"), ("mfu", "MFU")]
    s = payload["results"]["settings"]
    head = (f"## SFT: ours vs TRL's SFTTrainer ({device})\n\n`bench/sft_vs_trl.py`: {s['model']}, LoRA r={LORA['r']} "
            f"alpha={LORA['alpha']} all-linear, batch {s['batch_size']}, max_length {s['max_length']}, lr {s['lr']}, "
            f"{s['steps']} steps, seed {s['seed']}, {s['threads']} torch thread(s) in each child, median of "
            f"{s['repeats']} interleaved runs each. Timed around `Trainer.train`; real tokens exclude padding; loss curves logged every {LOGGING_STEPS} steps.\n")
    notes = "\n".join(f"- {n}" for n in payload["notes"])
    return f"{head}\n{markdown_table(rows, cols)}\n\n{notes}\n\n{provenance_line(payload)}\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per contender")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3, help="LoRA on a random-init base needs a high rate to move")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--threads", type=int, default=1, help="torch / OMP threads in every child")
    p.add_argument("--repeats", type=int, default=3, help="runs per contender, interleaved; medians reported")
    p.add_argument("--work", type=Path, help="keep inputs and runs here (default: a temporary folder)")
    p.add_argument("--no-readme", action="store_true", help="write the JSON only")
    p.add_argument("--render", action="store_true", help="redo the notes and README section from the saved JSON")
    p.add_argument("--worker", choices=[c for c, _ in CONTENDERS], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    if a.render:
        return render(a.device)
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("error: --device cuda needs a CUDA GPU that torch can see (torch.cuda.is_available() is False)",
                  file=sys.stderr)
            return 2
    work = a.work or Path(tempfile.mkdtemp(prefix="sft-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        data, model = prepare_inputs(work, a.device)
        env = thread_env(a.threads)
        runs: dict[str, list[Any]] = {name: [] for name, _ in CONTENDERS}
        for repeat in range(a.repeats):  # round-robin, so slow spells of the shared machine are spread over all
            for name, label in CONTENDERS:
                argv_ = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--model", str(model),
                         "--data", str(data), "--out", str(work / f"run-{name}"), "--steps", str(a.steps),
                         "--batch-size", str(a.batch_size), "--max-length", str(a.max_length), "--lr", str(a.lr),
                         "--seed", str(a.seed), "--threads", str(a.threads)]
                print(f"[{NAME}] {label}, run {repeat + 1}/{a.repeats} ...", file=sys.stderr, flush=True)
                runs[name].append(run_child(argv_, env=env, cwd=ROOT))
        rows = [summarise(name, label, runs[name]) for name, label in CONTENDERS]
        compare(rows)
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    settings = {"device": a.device, "model": "tiny random-init Llama (hidden 64, 2 layers, vocab 1028)"
                if a.device == "cpu" else "random-init Llama, Qwen2.5-0.5B dimensions, bf16", "steps": a.steps,
                "batch_size": a.batch_size, "max_length": a.max_length, "lr": a.lr, "seed": a.seed,
                "threads": a.threads, "repeats": a.repeats, "lora": LORA, "logging_steps": LOGGING_STEPS}
    notes = notes_for(rows, a.device)
    path = write_results(NAME if a.device == "cpu" else f"{NAME}_cuda", {"settings": settings, "contenders": rows},
                         packages=("transformers", "trl", "peft", "accelerate", "liger-kernel", "flash-attn"),
                         with_gpu=a.device == "cuda", notes=notes)
    payload = json.loads(path.read_text())
    if not a.no_readme:
        update_readme("sft" if a.device == "cpu" else "sft-cuda", readme(payload, a.device))
    print(markdown_table(rows, [("label", "contender"), ("tokens_per_cpu_s", "tok/CPU s"), ("tokens_per_s", "tok/s"),
                                ("speedup_cpu_vs_trl", "x TRL"), ("peak_rss_mib", "RSS MiB"),
                                ("loss_max_abs_diff_vs_trl", "loss diff")]))
    print(f"wrote {path}")
    return 0


def render(device: str) -> int:
    """Re-derive notes and the README section from bench/results (figures untouched), after a wording change."""
    from bench.common import RESULTS

    path = RESULTS / f"{NAME if device == 'cpu' else NAME + '_cuda'}.json"
    payload = json.loads(path.read_text())
    payload["notes"] = notes_for(payload["results"]["contenders"], device)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    update_readme("sft" if device == "cpu" else "sft-cuda", readme(payload, device))
    return 0


def notes_for(rows: list[dict[str, Any]], device: str) -> list[str]:
    by = {r["contender"]: r for r in rows}
    setup = "; ".join(f"{r['label']}: attention {r['attention']}, bf16 {r['bf16']}, gradient checkpointing "
                      f"{r['gradient_checkpointing']}, liger {r['liger']}" for r in rows)
    return [
        f"What each side ran: {setup}.",
        f"Speed-up of ours over our own before (padding-free alone): {by['ours']['speedup_cpu_vs_ours-before']}x per "
        f"CPU second; the rest of the gap to TRL comes from TRL's defaults (gradient checkpointing recomputes the "
        f"forward{', bf16 autocast on a CPU' if device == 'cpu' else ''}).",
        "Same loss curve: the loss diff columns are the largest absolute difference in training loss at any optimizer "
        "step (recorded around SFTTrainer.compute_loss; all three see the same sequences in the same steps). Ours and "
        "before differ by float rounding; TRL by its bf16 autocast. The logged curves (every 10 steps) are in the "
        "JSON; final loss = mean of the last 10 steps (LoRA on a random-init base moves the loss little).",
        f"Issue 7 target (>= 1.5x TRL's tokens/s, same loss curve, memory no higher): "
        f"{by['ours']['speedup_cpu_vs_trl']}x per CPU second, {by['ours']['speedup_wall_vs_trl']}x wall; "
        f"{_memory_line(by, device)}.",
        *([] if device == "cuda" else [
            "Not run here: `--device cuda` (no GPU on this machine). There, ours also turns on Liger kernels when "
            "liger-kernel is installed and flash_attention_2 when flash-attn is installed (alignment/training.py)."]),
    ]


def _memory_line(by: dict[str, dict[str, Any]], device: str) -> str:
    key, unit = ("max_memory_allocated_mib", "CUDA MiB") if device == "cuda" else ("peak_rss_mib", "MiB peak RSS")
    return f"memory {by['ours'][key]:,.0f} {unit} for ours vs {by['trl'][key]:,.0f} for TRL"


if __name__ == "__main__":
    sys.exit(main())
