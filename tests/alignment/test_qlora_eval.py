"""QLoRA keeps learning correctly after an evaluation (a trap the PPO work found).

bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks a 4-bit weight in place for an inference-only kernel the first
time the layer runs in eval mode, which ``Trainer.evaluate()`` does mid-training; after that the gradient through
every 4-bit layer is silently wrong (alignment/models.py keeps trained 4-bit layers off that path). A QLoRA SFT run
evaluating every 2 steps keeps moving its adapter after each evaluation, and gradients after ``evaluate()`` equal those before it.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from alignment import sft
from alignment.models import ModelConfig, load_causal_lm

QA = [("How do I top up?", "Open the app and tap Top up."),
      ("Is roaming free in Spain?", "Yes, Spain is in Roam Zone 1."),
      ("How do I get a PAC code?", "Text PAC to 65075.")]


def _data(folder: Path) -> Path:
    folder.mkdir()
    for split, n in (("train", 24), ("test", 4)):
        rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                for q, a in (QA * n)[:n]]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _lora_grads(model, batch) -> dict:
    import torch

    torch.manual_seed(0)  # the same LoRA dropout masks each time
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def test_gradients_through_4bit_layers_are_the_same_after_an_evaluation(tiny_model_dir, tmp_path):
    """The model the stages train (load_causal_lm(training=True) + a QLoRA adapter) back-propagates the same after
    ``Trainer.evaluate()`` as before it, to every LoRA weight; and no 4-bit weight was repacked."""
    import bitsandbytes as bnb
    import datasets
    import torch
    from trl import SFTConfig, SFTTrainer

    from alignment.adapters import AdapterConfig, prepare
    from alignment.models import load_tokenizer

    cfg = ModelConfig(str(tiny_model_dir), quantization="nf4")
    tokenizer = load_tokenizer(cfg, require_chat_template=True)
    model = prepare(load_causal_lm(cfg, tokenizer, training=True), AdapterConfig(method="qlora", r=8), "CAUSAL_LM")
    ds = datasets.load_dataset("json", data_files=str(_data(tmp_path / "data") / "test.jsonl"), split="train")
    trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path / "o"), max_length=64, report_to="none",
                                                     per_device_eval_batch_size=4, use_cpu=True, bf16=False),
                         train_dataset=ds, eval_dataset=ds, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():  # lora_B starts at zero, which would leave lora_A without gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    model.train()
    before = _lora_grads(model, batch)
    trainer.evaluate()  # switches to eval mode and runs every 4-bit layer without grad
    model.train()
    after = _lora_grads(model, batch)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14 and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                                         for m in layers)
    assert len(before) == 28 and before.keys() == after.keys()  # lora_A and lora_B of 14 projections
    # without the fix: the first layer's gradients are wrong after evaluate() (the packed kernel has no backward)
    assert max((before[n] - after[n]).abs().max().item() for n in before) <= 1e-6
    assert all(g.abs().max() > 0 for g in after.values())


def test_qlora_sft_keeps_learning_after_each_evaluation(tiny_model_dir, tmp_path):
    """End to end: a QLoRA SFT run evaluating every 2 steps; the adapter checkpointed after each evaluation keeps
    moving and the held-out loss keeps falling (the gradient test above is the one that catches the repack)."""
    from safetensors.torch import load_file

    cfg = sft.Config(model={"name_or_path": str(tiny_model_dir)}, data=[{"path": str(_data(tmp_path / "data"))}],
                     output_dir=str(tmp_path / "run"), peft={"method": "qlora", "r": 8},
                     train={"max_steps": 6, "batch_size": 4, "max_length": 64, "learning_rate": 1e-2,
                            "logging_steps": 1, "eval_steps": 2, "save_steps": 2, "save_total_limit": 5})
    run_dir = sft.run(cfg)
    weights = [load_file(str(run_dir / "checkpoints" / f"checkpoint-{step}" / "adapter_model.safetensors"))
               for step in (2, 4, 6)]
    for earlier, later in itertools.pairwise(weights):  # every LoRA weight moved between evaluations
        assert all((later[k] - earlier[k]).abs().max() > 0 for k in earlier)
    history = json.loads((run_dir / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    assert len(eval_losses) == 3 and eval_losses[-1] < eval_losses[0]
