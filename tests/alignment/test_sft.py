"""The SFT stage on the tiny model: assistant-only loss, every adapter method, run records, re-runs, the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from alignment import sft
from alignment.models import ModelConfig, load_causal_lm, load_tokenizer
from alignment.runs import RunError, load_run
from rlhf.cli import main

QA = [("How do I top up?", "Open the app and tap Top up."),
      ("Is roaming free in Spain?", "Yes, Spain is in Roam Zone 1."),
      ("How do I get a PAC code?", "Text PAC to 65075."),
      ("Why is my bill higher?", "Roaming charges from May.")]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _conversations(tmp_path: Path, n: int = 32) -> Path:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in (QA * n)[:n]]
    return _write(tmp_path / "conv.jsonl", rows)


def _cfg(model_dir, data, out, **over) -> sft.Config:
    train = {"max_steps": 12, "batch_size": 4, "max_length": 64, "learning_rate": 1e-2, "logging_steps": 1,
             "save_steps": 100, **over.pop("train", {})}
    model = over.pop("model", {"name_or_path": str(model_dir)})
    return sft.Config(model=model, data=[{"path": str(data)}], output_dir=str(out),
                      peft=over.pop("peft", {"method": "lora", "r": 8}), train=train, **over)


def test_assistant_only_loss_masks_exactly_the_assistant_spans(tiny_model_dir, tmp_path):
    """Field notes trap 4: the labels TRL trains on are the assistant replies and their end token, nothing else."""
    from trl import SFTConfig, SFTTrainer

    tokenizer = load_tokenizer(ModelConfig(str(tiny_model_dir)), require_chat_template=True)
    model = load_causal_lm(ModelConfig(str(tiny_model_dir)), tokenizer)
    import datasets

    ds = datasets.load_dataset("json", data_files=str(_conversations(tmp_path, 4)), split="train")
    trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path / "o"), assistant_only_loss=True,
                                                     max_length=64, report_to="none", bf16=False),
                         train_dataset=ds, processing_class=tokenizer)
    # the batches the trainer builds (TRL 1.16 applies the template and folds the mask into labels in its collator)
    for (question, answer), row in zip(QA, trainer.train_dataset):
        batch = trainer.data_collator([row])
        trained = batch["input_ids"][0][batch["labels"][0] != -100].tolist()
        assert tokenizer.decode(trained) == answer + tokenizer.eos_token
        assert question in tokenizer.decode(batch["input_ids"][0].tolist())


def test_sft_learns_records_the_run_and_skips_identical_reruns(tiny_model_dir, tmp_path):
    data = _conversations(tmp_path)
    cfg = _cfg(tiny_model_dir, data, tmp_path / "run", train={"max_steps": 40})
    run_dir = sft.run(cfg)
    record = load_run(run_dir)
    assert record["status"] == "finished" and record["stage"] == "sft"
    metrics = record["metrics"]
    # LoRA on a random-init base learns slowly (its head and embeddings are frozen and random): measured 6.93 -> 5.98
    # in 40 steps, where a full fine-tune reaches 1.4; a drop of half a nat per token is far outside noise
    assert metrics["train_loss_last"] < metrics["train_loss_first"] - 0.5
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "adapter" / "tokenizer.json").is_file()
    assert list((run_dir / "logs").glob("events.out.tfevents.*"))
    # history.json keeps every logged step for the report's curves; its ends are run.json's first/last values
    history = [h for h in json.loads((run_dir / "history.json").read_text()) if "loss" in h]
    assert len(history) >= 4 and [h["step"] for h in history] == sorted(h["step"] for h in history)
    assert history[0]["loss"] == pytest.approx(metrics["train_loss_first"])
    assert history[-1]["loss"] == pytest.approx(metrics["train_loss_last"])
    assert record["datasets"][0]["fingerprint"]
    # the trained adapter reloads through the run directory and answers better than the base
    tokenizer = load_tokenizer(ModelConfig(str(run_dir)))
    tuned = load_causal_lm(ModelConfig(str(run_dir)), tokenizer)
    base = load_causal_lm(ModelConfig(str(tiny_model_dir)), tokenizer)
    assert _answer_logprob(tuned, tokenizer, *QA[1]) > _answer_logprob(base, tokenizer, *QA[1]) + 1.0
    stamp = (run_dir / "run.json").stat().st_mtime_ns
    assert sft.run(cfg) == run_dir and (run_dir / "run.json").stat().st_mtime_ns == stamp  # finished: no-op
    with pytest.raises(RunError, match="learning_rate"):
        sft.run(_cfg(tiny_model_dir, data, tmp_path / "run", train={"max_steps": 40, "learning_rate": 3e-3}))


def _answer_logprob(model, tokenizer, question: str, answer: str) -> float:
    import torch

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt + answer, return_tensors="pt", add_special_tokens=False).input_ids
    n_prompt = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    return logprobs[n_prompt - 1:].gather(1, targets[n_prompt - 1:, None]).sum().item()


@pytest.mark.parametrize("method", ["lora", "qlora", "dora", "rslora", "adalora", "ia3", "loha", "lokr", "full",
                                    "freeze"])
def test_every_adapter_method_trains_through_the_stage(tiny_model_dir, tmp_path, method):
    from safetensors.torch import load_file

    data = _conversations(tmp_path, 16)
    run_dir = sft.run(_cfg(tiny_model_dir, data, tmp_path / method, peft={"method": method, "r": 4},
                           train={"max_steps": 6, "learning_rate": 5e-3}))
    record = load_run(run_dir)
    assert record["status"] == "finished"
    assert record["metrics"]["train_loss_last"] < record["metrics"]["train_loss_first"]
    assert 0 < record["metrics"]["trainable_params"] <= record["metrics"]["total_params"]
    weights = run_dir / ("model" if method in ("full", "freeze") else "adapter")
    saved = load_file(str(next(weights.glob("*.safetensors"))))
    assert saved, f"{method}: nothing saved"
    if method == "qlora":
        assert record["config"]["model"]["quantization"] == "nf4"
    if method in ("full", "freeze"):  # the run folder loads its trained weights, not the base it started from
        import torch

        tokenizer = load_tokenizer(ModelConfig(str(run_dir)))
        tuned = load_causal_lm(ModelConfig(str(run_dir)), tokenizer)
        base = load_causal_lm(ModelConfig(str(tiny_model_dir)), tokenizer)
        ids = tokenizer("Is roaming free?", return_tensors="pt").input_ids
        with torch.no_grad():
            assert not torch.allclose(tuned(ids).logits, base(ids).logits)


def test_prompt_completion_rows_train_on_the_completion(tiny_model_dir, tmp_path):
    data = _write(tmp_path / "pc.jsonl", [{"prompt": q + "\n", "completion": a} for q, a in QA * 8])
    run_dir = sft.run(_cfg(tiny_model_dir, data, tmp_path / "pc", train={"max_steps": 8}))
    assert load_run(run_dir)["metrics"]["train_loss_last"] < load_run(run_dir)["metrics"]["train_loss_first"]


def test_cli_runs_a_recipe_and_reports_bad_keys(tiny_model_dir, tmp_path, capsys):
    data = _conversations(tmp_path, 8)
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"model:\n  name_or_path: {tiny_model_dir}\ndata:\n  path: {data}\n"
                      f"output_dir: {tmp_path / 'cli-run'}\ntrain:\n  max_steps: 2\n  batch_size: 2\n"
                      f"  max_length: 64\n")
    assert main(["align", "sft", "--config", str(recipe), "--set", "peft.r=4"]) == 0
    assert load_run(tmp_path / "cli-run")["config"]["peft"]["r"] == 4
    assert main(["align", "sft", "--config", str(recipe), "--set", "train.lr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) lr; known keys:" in err and "learning_rate" in err


def test_packing_fills_blocks_and_trains(tiny_model_dir, tmp_path):
    """packing: short conversations share max_length blocks (fewer, fuller sequences, no padding waste)."""
    data = _conversations(tmp_path, 32)
    run_dir = sft.run(_cfg(tiny_model_dir, data, tmp_path / "packed", packing=True,
                           train={"max_steps": 4, "max_length": 128}))
    record = load_run(run_dir)
    assert record["status"] == "finished"
    assert record["metrics"]["train_loss_last"] < record["metrics"]["train_loss_first"]
    # 32 conversations of ~25 tokens fit in ~7 blocks of 128: one step of 4 packed rows covers > 4 conversations
    assert record["metrics"]["epoch"] > 4 * 4 / 32


def test_a_model_that_cannot_be_loaded_is_one_clear_line(tmp_path, capsys):
    data = _conversations(tmp_path, 4)
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"model:\n  name_or_path: {tmp_path / 'no-such-model'}\ndata:\n  path: {data}\n"
                      f"output_dir: {tmp_path / 'run'}\n")
    assert main(["align", "sft", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"error: model folder not found: {tmp_path / 'no-such-model'}"
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before a run folder was made: fixing the recipe just works


def _batch_loss_and_grads(trainer, batch):
    """The stage's loss on one collated batch (TRL's own compute_loss) and the LoRA gradients it produces."""
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.item(), grads


@pytest.mark.parametrize("attention", ["sdpa_varlen", "sdpa", "eager"])
def test_padding_free_batch_has_the_padded_loss_and_gradients(tiny_model_dir, tmp_path, attention):
    """One batch of conversations of different lengths: concatenated without padding (position_ids restart per
    sequence) it gives the loss and LoRA gradients of the padded batch. sdpa_varlen is what the stage uses (attention
    per sequence); sdpa and eager get transformers' block-diagonal mask from the position_ids (masking_utils)."""
    import datasets
    from trl import SFTTrainer

    from alignment.adapters import prepare
    from alignment.training import padding_free_attention

    rows = [{"messages": [{"role": "user", "content": q * (i + 1)}, {"role": "assistant", "content": a * (3 - i % 3)}]}
            for i, (q, a) in enumerate(QA * 2)]  # lengths from ~20 to ~80 tokens: the padded batch is half padding
    ds = datasets.Dataset.from_list(rows)
    cfg = _cfg(tiny_model_dir, _write(tmp_path / "c.jsonl", rows), tmp_path / "run", train={"max_length": 256},
               model={"name_or_path": str(tiny_model_dir), "attn_implementation": None if attention == "sdpa_varlen"
                      else attention})
    tokenizer = load_tokenizer(cfg.model, require_chat_template=True)
    model = load_causal_lm(cfg.model, tokenizer, training=True)
    if attention == "sdpa_varlen":
        assert padding_free_attention(model, None) == "sdpa_varlen"
    model = prepare(model, cfg.peft, "CAUSAL_LM")
    for _, param in model.named_parameters():  # LoRA B starts at zero: give the adapters a non-trivial gradient path
        if param.requires_grad:
            param.data.normal_(0, 0.05)
    trainer = SFTTrainer(model=model, args=sft._sft_args(cfg, tmp_path / "run", False, True), train_dataset=ds,
                         processing_class=tokenizer, data_collator=sft.data_collator(cfg, tokenizer))
    trainer.model.eval()  # LoRA dropout off: the two batches must see the same function
    examples = [trainer.train_dataset[i] for i in range(len(rows))]
    assert len(trainer.train_dataset) == len(rows)  # nothing truncated away
    free = trainer.data_collator(examples)
    assert free["input_ids"].shape[0] == 1 and "attention_mask" not in free and (free["input_ids"] != 0).all()
    assert sft.data_collator(dataclasses.replace(cfg, padding_free=False), tokenizer) is None  # TRL's own padding
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(examples)
    assert padded["input_ids"].numel() > 1.3 * free["input_ids"].numel()  # the padding that is no longer computed
    loss_free, grads_free = _batch_loss_and_grads(trainer, free)
    loss_padded, grads_padded = _batch_loss_and_grads(trainer, padded)
    assert loss_free == pytest.approx(loss_padded, abs=1e-5)
    for name, grad in grads_padded.items():
        assert torch_allclose(grads_free[name], grad), name


def torch_allclose(a, b) -> bool:
    import torch

    return torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_padding_free_training_follows_the_padded_loss_curve_with_assistant_only_loss(tiny_model_dir, tmp_path):
    """The stage's default (padding-free) and padded batches train the same steps on the same assistant tokens: the
    logged loss curves agree, and the padding-free run computed fewer tokens for them."""
    rows = [{"messages": [{"role": "user", "content": q * (1 + i % 4)}, {"role": "assistant", "content": a}]}
            for i, (q, a) in enumerate(QA * 8)]
    data = _write(tmp_path / "conv.jsonl", rows)
    histories = {}
    for padding_free in (True, False):
        # no LoRA dropout: its random masks are drawn per tensor shape, which differs between the two layouts
        run_dir = sft.run(_cfg(tiny_model_dir, data, tmp_path / f"pf-{padding_free}", padding_free=padding_free,
                               peft={"method": "lora", "r": 8, "dropout": 0.0}, train={"max_steps": 10}))
        record = load_run(run_dir)
        assert record["status"] == "finished" and record["config"]["padding_free"] is padding_free
        assert record["config"]["assistant_only_loss"] is True
        histories[padding_free] = [h for h in json.loads((run_dir / "history.json").read_text()) if "loss" in h]
    free, padded = histories[True], histories[False]
    assert [h["step"] for h in free] == [h["step"] for h in padded] and len(free) == 10
    for a, b in zip(free, padded):
        assert a["loss"] == pytest.approx(b["loss"], abs=5e-4)
        assert a["num_tokens"] == b["num_tokens"]  # TRL counts real tokens either way: the same data was seen
    assert free[-1]["loss"] < free[0]["loss"] - 0.3


def test_padding_free_must_be_a_bool(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="padding_free: expected true or false"):
        _cfg(tiny_model_dir, _conversations(tmp_path, 4), tmp_path / "run", padding_free="yes")
