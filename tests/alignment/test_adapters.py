"""The adapter menu on real PEFT: every method trains (loss falls) and changes only what it should.

Models are tiny random-init Llama (vocab 128, hidden 32, 2 blocks, 4 heads) built here; the batch is fixed token ids.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, Trainer,
                          TrainingArguments)

from alignment.adapters import (ADAPTER_METHODS, METHODS, AdapterConfig, adapter_callbacks, apply_freeze,
                                decoder_layers, ia3_modules, peft_config, prepare, trainable_summary,
                                update_and_allocate, wants_4bit)
from rlhf.config import ConfigError, build_dataclass

STEPS = 6


def tiny_config(**kw) -> LlamaConfig:
    return LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=False,
                       **kw)


def causal_lm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config())


def reward_model() -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    return LlamaForSequenceClassification(tiny_config(num_labels=1))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from intra-op threads, and on a shared 2-core CI runner the spinning OpenMP workers
    made this file ten times slower (84 s against 9 s measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randint(1, 128, (4, 16), generator=torch.Generator().manual_seed(1))  # no pad id (0) inside


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def pairwise_loss(model, ids):
    """Bradley-Terry loss with rows 0-1 as chosen and rows 2-3 as rejected, as the reward stage computes it."""
    reward = model(input_ids=ids).logits.squeeze(-1)
    return -torch.nn.functional.logsigmoid(reward[:2] - reward[2:]).mean()


def eval_loss(model, ids, loss_fn, eval_mode=True) -> float:
    model.train(not eval_mode)
    with torch.no_grad():
        return loss_fn(model, ids).item()


def train(model, ids, loss_fn, lr=1e-2, after_step=None) -> set[str]:
    """A few AdamW steps on one batch; returns the names of parameters that received a nonzero gradient."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for _, p in named], lr=lr)
    model.train()
    got_grad = set()
    for step in range(STEPS):
        loss_fn(model, ids).backward()
        got_grad |= {n for n, p in named if p.grad is not None and p.grad.abs().sum() > 0}
        optimizer.step()
        if after_step:
            after_step(model, step)
        optimizer.zero_grad()
    return got_grad


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {n for n in before if not torch.equal(before[n].float(), after[n].float())}


def base_name(peft_name: str) -> str:
    """A PEFT parameter name -> the wrapped base model's name for it (non-base names come back unchanged)."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".original_module", "")


def method_config(method: str, **kw) -> AdapterConfig:
    return AdapterConfig(method=method, r=4, alpha=8, dropout=0.0, init_r=6, target_r=2, freeze_trainable_layers=1,
                         adalora_total_steps=STEPS, **kw)


def train_adapter(cfg: AdapterConfig, base, ids, loss_fn, task_type: str, after_step=None, eval_mode=True):
    """Prepare and train; assert the loss fell, every base weight stayed bit-identical (compared with before `prepare`,
    so wrapping must not touch them either), only adapter parameters train and nothing frozen moved.
    Returns the model, the trainable names and the names that changed."""
    base_before = snapshot(base)
    model = prepare(base, cfg, task_type)
    start, wrapped_before = eval_loss(model, ids, loss_fn, eval_mode), snapshot(model)
    train(model, ids, loss_fn, after_step=after_step)
    assert eval_loss(model, ids, loss_fn, eval_mode) < start
    after = snapshot(model)
    base_after = {base_name(n): p for n, p in after.items() if base_name(n) in base_before}
    assert set(base_after) == set(base_before)
    assert changed(base_before, base_after) == set()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable <= {n for n in after if base_name(n) not in base_before}
    moved = changed(wrapped_before, after)
    assert moved <= trainable  # e.g. AdaLoRA's frozen `ranknum` stays put
    return model, trainable, moved


PLAIN_ADAPTERS = [m for m in ADAPTER_METHODS if m not in ("qlora", "adalora")]  # those two have their own tests


@pytest.mark.parametrize("method", PLAIN_ADAPTERS)
def test_adapter_method_trains_only_the_adapter(method, batch):
    _, trainable, moved = train_adapter(method_config(method), causal_lm(), batch, lm_loss, "CAUSAL_LM")
    assert moved == trainable


def test_adalora_allocates_rank_budget_in_the_loop(batch):
    # AdaLoRA only prunes ranks when update_and_allocate runs after optimizer.step() and before zero_grad().
    cfg = method_config("adalora")
    model, trainable, moved = train_adapter(cfg, causal_lm(), batch, lm_loss, "CAUSAL_LM",
                                            after_step=update_and_allocate)
    assert moved and moved <= trainable
    assert all(n in moved for n in trainable if "lora_A" in n or "lora_B" in n)
    kept = [sum(mask) for mask in model.peft_config["default"].rank_pattern.values()]
    assert len(kept) == 14  # 7 linear layers x 2 blocks
    assert sum(kept) < cfg.init_r * len(kept)  # the budget shrank toward target_r per layer


@pytest.mark.parametrize("with_callback", [True, False])
def test_adalora_needs_our_callback_under_a_trainer(with_callback, batch, tmp_path):
    """transformers' Trainer (and so every TRL trainer) never calls update_and_allocate: without the callback
    AdaLoRA silently trains as a fixed-rank adapter (huggingface/peft 1327)."""
    cfg = method_config("adalora")
    model = prepare(causal_lm(), cfg, "CAUSAL_LM")
    rows = [{"input_ids": ids, "labels": ids} for ids in batch]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no",
                             disable_tqdm=True, use_cpu=True)
    Trainer(model=model, args=args, train_dataset=rows,
            callbacks=adapter_callbacks(cfg) if with_callback else None).train()
    assert (model.peft_config["default"].rank_pattern is not None) == with_callback


def test_qlora_trains_lora_on_a_frozen_4bit_base(batch, tmp_path):
    causal_lm().save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    assert type(base.model.layers[0].mlp.down_proj.weight).__name__ == "Params4bit"
    # Losses are measured in train mode (dropout is 0): in eval mode bitsandbytes repacks 4-bit weights in place for
    # its CPU kernel, which needs in_features >= 64 (the quantisation block) and would also rewrite the base bytes.
    model, trainable, moved = train_adapter(method_config("qlora"), base, batch, lm_loss, "CAUSAL_LM",
                                            eval_mode=False)
    assert moved == trainable and all("lora_" in n for n in trainable)
    summary = trainable_summary(model)  # 4-bit weights counted as the full-precision model had them
    assert summary["total_params"] == sum(p.numel() for p in causal_lm().parameters()) + summary["trainable_params"]


def test_qlora_refuses_a_full_precision_base():
    with pytest.raises(ValueError, match="4-bit"):
        prepare(causal_lm(), method_config("qlora"), "CAUSAL_LM")


def test_full_trains_everything_that_gets_a_gradient(batch):
    model = prepare(causal_lm(), method_config("full"), "CAUSAL_LM")
    before, start = snapshot(model), eval_loss(model, batch, lm_loss)
    got_grad = train(model, batch, lm_loss)
    assert eval_loss(model, batch, lm_loss) < start
    assert changed(before, snapshot(model)) == got_grad == set(before)


@pytest.mark.parametrize("make, loss_fn, task_type, head", [(causal_lm, lm_loss, "CAUSAL_LM", "lm_head.weight"),
                                                           (reward_model, pairwise_loss, "SEQ_CLS", "score.weight")])
def test_freeze_trains_last_blocks_norm_and_head(make, loss_fn, task_type, head, batch):
    model = prepare(make(), method_config("freeze"), task_type)  # freeze_trainable_layers=1
    before, start = snapshot(model), eval_loss(model, batch, loss_fn)
    train(model, batch, loss_fn)
    assert eval_loss(model, batch, loss_fn) < start
    expected = {n for n in before if n.startswith("model.layers.1.")} | {"model.norm.weight", head}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert changed(before, snapshot(model)) == expected


def test_freeze_blocks_get_gradients_under_gradient_checkpointing(batch):
    """TRL turns gradient checkpointing on by default; with reentrant checkpointing a block whose input does not
    require grad (frozen embeddings) would return no gradient to its trainable weights."""
    model = apply_freeze(causal_lm(), 1)
    model.gradient_checkpointing_enable()
    model.train()
    lm_loss(model, batch).backward()
    assert all(p.grad is not None for p in model.model.layers[1].parameters())


def test_reward_lora_trains_saves_and_reloads_the_score_head(batch, tmp_path):
    """Trap 3 (huggingface/trl 1379): under LoRA the randomly initialised score head must train and be saved."""
    reward_model().save_pretrained(tmp_path / "base")
    base = LlamaForSequenceClassification.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        base_logits = base(input_ids=batch).logits
    cfg = method_config("lora", modules_to_save=["score"])
    model, _, moved = train_adapter(cfg, base, batch, pairwise_loss, "SEQ_CLS")
    assert cfg.modules_to_save == ["score"]  # PEFT extends the list it is given; the recipe's own must not change
    assert {n for n in moved if ".score." in n} == {"base_model.model.score.modules_to_save.default.weight"}
    with torch.no_grad():
        trained_logits = model.eval()(input_ids=batch).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(k.startswith("base_model.model.score.") for k in saved)

    from peft import PeftModel

    fresh = LlamaForSequenceClassification.from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=batch).logits, trained_logits, rtol=0, atol=1e-6)
    assert not torch.allclose(trained_logits, base_logits, atol=1e-3)


def test_peft_config_per_method():
    model = causal_lm()
    assert peft_config(method_config("full"), "CAUSAL_LM", model) is None
    assert peft_config(method_config("freeze"), "CAUSAL_LM", model) is None
    rs, dora = (peft_config(method_config(m), "CAUSAL_LM", model) for m in ("rslora", "dora"))
    assert rs.use_rslora and not rs.use_dora and dora.use_dora and not dora.use_rslora
    reward = peft_config(method_config("lora", modules_to_save=["score"]), "SEQ_CLS", model)
    assert reward.task_type == "SEQ_CLS" and reward.modules_to_save == ["score"]
    with pytest.raises(ValueError, match="task_type"):
        peft_config(method_config("lora"), "TOKEN_CLS", model)
    with pytest.raises(ValueError, match="adalora_total_steps"):
        peft_config(AdapterConfig(method="adalora"), "CAUSAL_LM", model)
    assert [wants_4bit(AdapterConfig(method=m)) for m in METHODS].count(True) == 1
    assert wants_4bit(AdapterConfig(method="qlora"))


def test_ia3_modules_come_from_the_architecture():
    model = causal_lm()
    ia3 = peft_config(method_config("ia3"), "CAUSAL_LM", model)
    assert ia3.target_modules == {"k_proj", "v_proj", "down_proj"} and ia3.feedforward_modules == {"down_proj"}
    assert ia3_modules(model, ["q_proj", "down_proj"]) == (["q_proj", "down_proj"], ["down_proj"])
    assert ia3_modules(model, ["q_proj"]) == (["q_proj"], [])
    model.config.model_type = "unknown_arch"
    with pytest.raises(ValueError, match="target_modules"):
        ia3_modules(model, "all-linear")


class NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)


class GPTLike(nn.Module):
    """Blocks under another name (transformer.h) and a final norm called ln_f: found by the generic fallback."""

    def __init__(self):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.heads = nn.ModuleList([nn.Linear(4, 1)])  # a smaller ModuleList that must not win
        self.transformer.h = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.transformer.ln_f = nn.LayerNorm(4)
        self.classifier = nn.Linear(4, 2)


def test_freeze_finds_blocks_generically_and_names_what_is_missing():
    model = GPTLike()
    assert decoder_layers(model) is model.transformer.h
    apply_freeze(model, 1)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "transformer.h.2.weight", "transformer.h.2.bias", "transformer.ln_f.weight", "transformer.ln_f.bias",
        "classifier.weight", "classifier.bias"}
    with pytest.raises(ValueError, match=r"`model\.layers`"):
        apply_freeze(NoBlocks(), 1)
    with pytest.raises(ValueError, match="freeze_trainable_layers"):
        apply_freeze(causal_lm(), 3)


def test_trainable_summary_counts_by_hand():
    model = apply_freeze(causal_lm(), 1)
    block = sum(p.numel() for p in model.model.layers[1].parameters())
    expected = block + 32 + 32 * 128  # last block, final RMSNorm weight, untied lm_head
    total = sum(p.numel() for p in model.parameters())
    assert trainable_summary(model) == {"trainable_params": expected, "total_params": total,
                                        "trainable_percent": round(100 * expected / total, 4)}
    lora = prepare(causal_lm(), method_config("lora"), "CAUSAL_LM")
    # r=4 on 7 linear layers x 2 blocks: q,k,v,o are 32->32, gate/up 32->64, down 64->32; A is r x in, B is out x r
    per_block = 4 * 4 * (32 + 32) + 2 * 4 * (32 + 64) + 4 * (64 + 32)
    assert trainable_summary(lora)["trainable_params"] == 2 * per_block


@pytest.mark.parametrize("field, value", [("method", "prefix"), ("r", 0), ("alpha", -1), ("dropout", 1.0),
                                          ("target_modules", []), ("modules_to_save", [""]),
                                          ("dropout", "high"), ("freeze_trainable_layers", -1),
                                          ("adalora_total_steps", 0), ("adalora_total_steps", 2.5),
                                          ("target_r", 64)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        AdapterConfig(**{field: value})
    with pytest.raises(ConfigError, match=rf"recipe.yaml: peft: .*{field}"):
        build_dataclass(AdapterConfig, {field: value}, "recipe.yaml: peft")


def test_recipe_section_builds_the_config():
    cfg = build_dataclass(AdapterConfig, {"method": "dora", "r": 8, "target_modules": ["q_proj", "v_proj"]}, "peft")
    assert dataclasses.asdict(cfg)["target_modules"] == ["q_proj", "v_proj"] and cfg.alpha == 32
