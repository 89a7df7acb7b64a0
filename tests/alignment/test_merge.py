"""``rlhf align merge``: merged weights give the adapter model's logits (LoRA, DoRA, QLoRA against its
full-precision base: field notes trap 6), reward heads survive the merge, lineage is recorded, and runs with nothing
to merge say so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignment import merge, sft
from alignment.models import ModelConfig, load_causal_lm, load_sequence_classifier, load_tokenizer
from alignment.runs import Run, RunError, fingerprint_path
from rlhf.cli import main

QA = [("How do I top up?", "Open the app and tap Top up."),
      ("Is roaming free in Spain?", "Yes, Spain is in Roam Zone 1."),
      ("How do I get a PAC code?", "Text PAC to 65075."),
      ("Why is my bill higher?", "Roaming charges from May.")]
TEXTS = ["<|im_start|>user\nHow do I top up?<|im_end|>\n<|im_start|>assistant\n",
         "Roaming in Spain is free with Roam Zone 1, and a PAC code comes by text."]
# fp32 on CPU: merging only reorders the same float32 arithmetic (x(W + s*BA) vs xW + s*xBA); measured max |logit
# difference| 3e-7 (LoRA), 2e-7 (DoRA), 5e-7 (QLoRA against its fp32 base) with logits spanning about 1.3
TIGHT = 1e-5


def _sft_run(model_dir: Path, tmp_path: Path, method: str) -> Path:
    data = tmp_path / "conv.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n" for q, a in QA * 4))
    return sft.run(sft.Config(model={"name_or_path": str(model_dir)}, data=[{"path": str(data)}],
                              output_dir=str(tmp_path / method), peft={"method": method, "r": 8},
                              train={"max_steps": 6, "batch_size": 4, "max_length": 64, "learning_rate": 3e-2,
                                     "logging_steps": 1, "save_steps": 100}))


def _logits(model, tokenizer):
    import torch

    batch = tokenizer(TEXTS, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        return model(**batch).logits.float()


def _merged(out: Path, classifier: bool = False):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    return auto.from_pretrained(str(out)), AutoTokenizer.from_pretrained(str(out))


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_merged_model_gives_the_adapter_models_logits(tiny_model_dir, tmp_path, method):
    import torch
    from safetensors.torch import load_file

    run_dir = _sft_run(tiny_model_dir, tmp_path, method)
    out = tmp_path / "merged"
    assert main(["align", "merge", str(run_dir), "--out", str(out)]) == 0

    tokenizer = load_tokenizer(ModelConfig(str(run_dir)))
    adapted = _logits(load_causal_lm(ModelConfig(str(run_dir)), tokenizer), tokenizer)
    base = _logits(load_causal_lm(ModelConfig(str(tiny_model_dir)), tokenizer), tokenizer)
    merged_model, merged_tok = _merged(out)
    merged = _logits(merged_model, merged_tok)
    assert (merged - adapted).abs().max().item() < TIGHT
    assert (merged - base).abs().max().item() > 0.1  # the adapter did something, so the match means something

    weights = load_file(str(out / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in weights), "PEFT wrappers leaked into the merged weights"
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    assert merged_tok.pad_token == tokenizer.pad_token and merged_model.config.pad_token_id == tokenizer.pad_token_id
    record = json.loads((out / "merge.json").read_text())
    assert record["merged_from"] == {"path": str(run_dir), "stage": "sft",
                                     "fingerprint": fingerprint_path(run_dir / "run.json")}
    assert record["base"]["name_or_path"] == str(tiny_model_dir) and record["method"] == method
    # the same merge again is a no-op; a folder that is not a merge output is never overwritten
    stamp = (out / "merge.json").stat().st_mtime_ns
    assert merge.run(merge.Config(str(run_dir), str(out))) == out and (out / "merge.json").stat().st_mtime_ns == stamp
    # another dtype is another merge: refused over the earlier one unless asked, then it replaces it
    with pytest.raises(RunError, match="pass --overwrite"):
        merge.run(merge.Config(str(run_dir), str(out), dtype="bfloat16"))
    merge.run(merge.Config(str(run_dir), str(out), dtype="bfloat16", overwrite=True))
    assert _merged(out)[0].dtype == torch.bfloat16
    assert json.loads((out / "merge.json").read_text())["dtype"] == "bfloat16"
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="not a merge output"):
        merge.run(merge.Config(str(run_dir), str(tmp_path / "busy"), overwrite=True))


def test_qlora_merges_into_the_full_precision_base(tiny_model_dir, tmp_path):
    """Trap 6: the adapter was trained on NF4 weights, but the merge goes into the base in its own dtype (fp32 here),
    so the merged model equals the adapter on the full-precision base. The 4-bit adapter model differs from both by
    the NF4 rounding of the base, which merging into 4-bit weights would have baked in."""
    import torch

    run_dir = _sft_run(tiny_model_dir, tmp_path, "qlora")
    out = merge.run(merge.Config(str(run_dir), str(tmp_path / "merged")))
    merged_model, tokenizer = _merged(out)
    assert merged_model.dtype == torch.float32 and getattr(merged_model.config, "quantization_config", None) is None
    merged = _logits(merged_model, tokenizer)
    full_precision = _logits(load_causal_lm(ModelConfig(str(run_dir)), tokenizer), tokenizer)
    four_bit_model = load_causal_lm(ModelConfig(str(run_dir), quantization="nf4"), tokenizer)
    four_bit = _logits(four_bit_model, tokenizer)
    assert (merged - full_precision).abs().max().item() < TIGHT
    # measured on the tiny model: max |logit diff| 0.05, mean 0.002 between the 4-bit adapter model and the merge
    # (logits span about 1.3): the NF4 rounding of the base, which the fp32 merge does not carry
    gap = (merged - four_bit).abs()
    assert gap.max().item() > 100 * TIGHT and gap.mean().item() < 0.05
    # the trap itself: merging into the 4-bit weights re-quantises W + BA, so that model is not even the 4-bit adapter
    # model it came from (measured max 0.09) and is further still from the fp32 merge (0.14)
    naive = _logits(four_bit_model.merge_and_unload(), tokenizer)
    assert (naive - four_bit).abs().max().item() > 100 * TIGHT
    assert json.loads((out / "merge.json").read_text())["dtype"] == "float32"


def test_reward_model_merge_keeps_the_trained_score_head(tiny_model_dir, tmp_path):
    """A reward run (stage rm) merges as a sequence classifier; its score head comes from the adapter's
    modules_to_save copy (trap 3), not from the fresh random head a classifier gets when loaded from a causal LM."""
    import peft
    import torch

    run = Run.start(tmp_path / "rm", "rm", {"peft": {"method": "lora"}, "num_labels": 1},
                    model={"name_or_path": str(tiny_model_dir), "dtype": "auto"})
    tokenizer = load_tokenizer(ModelConfig(str(tiny_model_dir)))
    torch.manual_seed(0)
    base = load_sequence_classifier(ModelConfig(str(tiny_model_dir)), tokenizer)
    # init_lora_weights=False draws B at random, so the adapter changes the scores without training
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules="all-linear",
                                                      init_lora_weights=False))
    with torch.no_grad():
        model.base_model.model.score.modules_to_save["default"].weight.mul_(3.0)  # the "trained" head
    model.save_pretrained(str(run.adapter_dir))
    tokenizer.save_pretrained(str(run.adapter_dir))
    run.finish()

    out = merge.run(merge.Config(str(run.dir), str(tmp_path / "merged")))
    merged_model, merged_tok = _merged(out, classifier=True)
    model.eval()
    expected, merged = _logits(model, tokenizer), _logits(merged_model, merged_tok)
    assert merged.shape == (len(TEXTS), 1)
    assert (merged - expected).abs().max().item() < TIGHT
    assert json.loads((out / "merge.json").read_text())["architecture"] == "LlamaForSequenceClassification"


def test_runs_with_nothing_to_merge_say_why(tiny_model_dir, tmp_path, capsys):
    full = _sft_run(tiny_model_dir, tmp_path, "full")
    with pytest.raises(RunError, match="full or partial fine-tune .method full.*no adapter to merge"):
        merge.run(merge.Config(str(full), str(tmp_path / "m1")))

    unfinished = Run.start(tmp_path / "unfinished", "sft", {"peft": {"method": "lora"}},
                           model={"name_or_path": str(tiny_model_dir)})
    with pytest.raises(RunError, match="running sft run; only a finished run"):
        merge.run(merge.Config(str(unfinished.dir), str(tmp_path / "m2")))

    assert main(["align", "merge", str(tiny_model_dir), "--out", str(tmp_path / "m3")]) == 2
    assert "run.json: not found (not a run directory)" in capsys.readouterr().err
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m3").exists()

    with pytest.raises(ValueError, match="dtype"):
        merge.Config(str(full), str(tmp_path / "m4"), dtype="int4")
