"""alignment.models on the session's tiny Llama: build, reload, tokenizer, chat-template masks (trap 4), stopping at
eos (trap 5), pad token for reward models (trap 3), NF4 on CPU, run-folder resolution and ModelConfig validation."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from alignment.models import (PAD_TOKEN, ModelConfig, build_tiny_model, ensure_pad_token, load_causal_lm,
                              load_sequence_classifier, load_tokenizer, resolve_model_path, stop_token_ids,
                              template_end_of_turn)
from rlhf.config import ConfigError, build_dataclass

CHAT = [
    {"role": "system", "content": "You are Northwind's support assistant."},
    {"role": "user", "content": "Is roaming free in the EU?"},
    {"role": "assistant", "content": "Yes, EU roaming is included in every plan."},
    {"role": "user", "content": "And in Switzerland?"},
    {"role": "assistant", "content": "No: Switzerland costs 2 GBP a day."},
]


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    cfg = ModelConfig(name_or_path=str(tiny_model_dir))
    return cfg, load_tokenizer(cfg)


def test_tiny_model_builds_and_loads_back(tiny_model_dir, tiny):
    cfg, tokenizer = tiny
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (tiny_model_dir / name).is_file(), name
    model = load_causal_lm(cfg, tokenizer)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size) == (64, 2, 1024)
    assert len(tokenizer) == 1024 and tokenizer.model_max_length == 512
    # eos is the end-of-turn marker, in the tokenizer, the model config and the generation config alike (trap 5)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == model.config.eos_token_id == model.generation_config.eos_token_id == im_end
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.pad_token_id != im_end
    assert model.config.pad_token_id == model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_build_is_deterministic_given_seed(tmp_path, tiny_model_dir, tiny_corpus_files):
    again = build_tiny_model(tmp_path / "again", list(reversed(tiny_corpus_files)))  # file order does not matter
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert sha256(again / name) == sha256(tiny_model_dir / name), name
    other = build_tiny_model(tmp_path / "other", tiny_corpus_files, seed=1)
    assert sha256(other / "tokenizer.json") == sha256(tiny_model_dir / "tokenizer.json")
    assert sha256(other / "model.safetensors") != sha256(tiny_model_dir / "model.safetensors")


@pytest.mark.parametrize("text", [
    "My 5G hub drops Wi-Fi every night at 02:00 — why?",
    "Itinerancia en la UE: ¿cuánto cuesta?  Straße, Größe, naïve café.",
    "tabs\tand\nnewlines, emoji 📶 and symbols €£¥ <b>html</b>",
])
def test_tokenizer_round_trips_text(tiny, text):
    _, tokenizer = tiny
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids  # byte-level BPE: every byte has a token
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges learnt from the corpus actually compress


def test_chat_template_masks_exactly_assistant_content_and_end_token(tiny):
    """Trap 4 (huggingface/trl 4879, 4147): the assistant mask TRL's assistant_only_loss uses covers each answer plus
    its <|im_end|>, and nothing of the system/user turns or the role headers."""
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    _, tokenizer = tiny
    assert has_generation_markers(tokenizer.chat_template)
    assert is_chat_template_stop_token_trained(tokenizer)  # TRL's own check that the model is taught to stop
    out = tokenizer.apply_chat_template(CHAT, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    spans, start = [], None  # contiguous runs of masked tokens
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append(tokenizer.decode(ids[start:i]))
            start = None
    assert spans == [m["content"] + "<|im_end|>" for m in CHAT if m["role"] == "assistant"]
    unmasked = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    assert "roaming free" in unmasked and "Switzerland?" in unmasked and "EU roaming" not in unmasked

    prompt = tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_assistant_only_training_teaches_the_model_to_stop(tiny):
    """Trap 5 (hiyouga/LlamaFactory 7943, 7454): trained on assistant spans that include the eos, greedy generation
    ends with eos well inside max_new_tokens instead of running on."""
    cfg, tokenizer = tiny
    torch.manual_seed(0)
    model = load_causal_lm(cfg, tokenizer, training=True)
    chat = CHAT[1:3]
    enc = tokenizer.apply_chat_template(chat, return_assistant_tokens_mask=True, return_dict=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["assistant_masks"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(60):
        loss = model(input_ids=enc["input_ids"], labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10

    model.eval()
    prompt = tokenizer.apply_chat_template(chat[:1], add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=40, do_sample=False)
    new = out[0, prompt["input_ids"].shape[1]:].tolist()
    assert new[-1] == tokenizer.eos_token_id and len(new) < 40
    assert tokenizer.decode(new, skip_special_tokens=True) == chat[1]["content"]


def _end_of_turn_is_not_eos(tiny_model_dir):
    """The tiny model with Llama 3's split (eos <|end_of_text|>, end of turn <|eot_id|>): here eos is <|bos|> and the
    template still closes turns with <|im_end|>; the LM head only ever predicts <|im_end|> (final norm zeroed, a bias
    on that token), so every reply closes its turn at once."""
    tokenizer = load_tokenizer(ModelConfig(str(tiny_model_dir)))
    model = load_causal_lm(ModelConfig(str(tiny_model_dir)), tokenizer)
    tokenizer.eos_token = "<|bos|>"
    model.generation_config.eos_token_id = None
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[end_of_turn] = 10.0
    return model, tokenizer, end_of_turn


def test_the_template_end_of_turn_stops_even_when_eos_differs(tiny_model_dir):
    model, tokenizer, end_of_turn = _end_of_turn_is_not_eos(tiny_model_dir)
    assert template_end_of_turn(tokenizer) == end_of_turn
    assert stop_token_ids(tokenizer, model) == sorted([tokenizer.convert_tokens_to_ids("<|bos|>"), end_of_turn])


def test_evaluation_answers_and_ppo_rollouts_stop_at_the_end_of_turn(tiny_model_dir):
    """Trap 5 for every stage that generates, not only `rlhf feedback generate`: without the template's end-of-turn
    token among the stops, these replies would run to max_new_tokens and count as never ending."""
    import peft

    from alignment import measure, rollout
    from alignment.ppo import RolloutConfig
    from alignment.roles import POLICY, Roles

    model, tokenizer, end_of_turn = _end_of_turn_is_not_eos(tiny_model_dir)
    prompt_ids = [tokenizer.apply_chat_template(c[:i], add_generation_prompt=True, return_dict=True)["input_ids"]
                  for c, i in ((CHAT, 2), (CHAT, 4))]
    answers, ended = measure.generate(model, tokenizer, prompt_ids, max_new_tokens=8, temperature=0.0, batch_size=2,
                                      seed=0)
    assert answers == ["", ""] and ended == [True, True]

    policy = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name=POLICY)
    batch = rollout.generate(Roles(policy, tokenizer, value_head=None, reference=None), prompt_ids,
                             RolloutConfig(max_new_tokens=8), chunk=2, adapter=POLICY, greedy=True)
    assert batch.contain_eos.tolist() == [True, True] and batch.sequence_lengths.tolist() == [0, 0]
    assert batch.responses[:, 0].tolist() == [end_of_turn, end_of_turn]


def _word_level_tokenizer(vocab: dict[str, int], **special):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab, unk_token=special.get("unk_token")))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def test_pad_token_is_never_eos():
    """Trap 3 (huggingface/trl 1379, 937): no pad, or pad == eos, gets a distinct pad."""
    no_unk = _word_level_tokenizer({"hello": 0, "</s>": 1}, eos_token="</s>")
    ensure_pad_token(no_unk)
    assert no_unk.pad_token == PAD_TOKEN and no_unk.pad_token_id == 2 and len(no_unk) == 3

    pad_is_eos = _word_level_tokenizer({"hello": 0, "</s>": 1, "<unk>": 2}, eos_token="</s>", unk_token="<unk>",
                                       pad_token="</s>")
    ensure_pad_token(pad_is_eos)
    assert pad_is_eos.pad_token == "<unk>" and len(pad_is_eos) == 3  # unk reused: no new embedding row

    has_pad = _word_level_tokenizer({"hello": 0, "</s>": 1, "[PAD]": 2}, eos_token="</s>", pad_token="[PAD]")
    ensure_pad_token(has_pad)
    assert has_pad.pad_token == "[PAD]"


def test_loader_grows_embeddings_with_the_tokenizer(tiny):
    cfg, _ = tiny
    tokenizer = load_tokenizer(cfg)
    tokenizer.add_special_tokens({"pad_token": "<|new-pad|>"})  # as ensure_pad_token does for a model without one
    model = load_causal_lm(cfg, tokenizer)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == 1025
    assert model.config.pad_token_id == 1024
    logits = model(**tokenizer("<|new-pad|> hello", return_tensors="pt")).logits
    assert logits.shape[-1] == 1025 and torch.isfinite(logits).all()


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_loads_and_runs_on_cpu(tiny, double_quant):
    import bitsandbytes as bnb

    cfg, tokenizer = tiny
    full = load_causal_lm(cfg, tokenizer)
    quantised = load_causal_lm(ModelConfig(name_or_path=cfg.name_or_path, quantization="nf4",
                                           double_quant=double_quant), tokenizer)
    linear4 = [n for n, m in quantised.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers; the tied head stays full
    assert quantised.get_memory_footprint() < 0.6 * full.get_memory_footprint()
    inputs = tokenizer("My hub keeps dropping the connection", return_tensors="pt")
    with torch.no_grad():
        q, f = quantised(**inputs).logits, full(**inputs).logits
    assert torch.isfinite(q).all()
    assert torch.corrcoef(torch.stack([q.flatten(), f.flatten()]))[0, 1] > 0.9  # 4-bit stays close to the original

    trainable = load_causal_lm(ModelConfig(name_or_path=cfg.name_or_path, quantization="nf4"), tokenizer,
                               training=True)
    assert trainable.is_loaded_in_4bit and trainable.get_input_embeddings().weight.dtype == torch.float32


def test_reward_classifier_reads_the_last_non_pad_token(tiny):
    cfg, tokenizer = tiny
    torch.manual_seed(0)
    model = load_sequence_classifier(cfg, tokenizer, num_labels=1)
    assert model.config.num_labels == 1 and model.score.out_features == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None
    texts = [tokenizer.apply_chat_template(CHAT[1:3], tokenize=False), "a much longer text " * 8]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    assert (batch["input_ids"][0] == tokenizer.pad_token_id).any()  # the first row really is padded
    with torch.no_grad():
        scores = model(**batch).logits[:, 0]
        alone = tokenizer(texts[0], return_tensors="pt")
        by_hand = model.score(model.model(**alone).last_hidden_state[0, -1])[0]
    assert scores[0].item() == pytest.approx(by_hand.item(), abs=1e-5)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"name_or_path": ""}, "name_or_path"),
    ({"revision": ""}, "revision"),
    ({"dtype": "fp8"}, "dtype"),
    ({"trust_remote_code": "yes"}, "trust_remote_code"),
    ({"quantization": "nf8"}, "quantization"),
    ({"double_quant": True}, "double_quant"),
    ({"quantization": "int8", "double_quant": True}, "double_quant"),
    ({"attn_implementation": ""}, "attn_implementation"),
])
def test_model_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        ModelConfig(**{"name_or_path": "org/model", **kwargs})
    with pytest.raises(ConfigError, match=f"recipe.yaml: model: {field}:"):
        build_dataclass(ModelConfig, {"name_or_path": "org/model", **kwargs}, "recipe.yaml: model")


def test_model_config_accepts_a_qlora_recipe():
    cfg = build_dataclass(ModelConfig, {"name_or_path": "org/model", "revision": "main", "dtype": "bfloat16",
                                        "quantization": "nf4", "double_quant": True}, "recipe.yaml: model")
    assert (cfg.quantization, cfg.double_quant, cfg.trust_remote_code) == ("nf4", True, False)


def test_resolve_model_path(tmp_path):
    assert resolve_model_path("org/model") == ("org/model", None)
    run = tmp_path / "sft-run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"model": {"name_or_path": "org/base", "revision": "abc"}}))
    assert resolve_model_path(str(run)) == ("org/base", None)
    (run / "adapter").mkdir()
    assert resolve_model_path(str(run)) == ("org/base", str(run / "adapter"))

    chained = tmp_path / "dpo-run"
    chained.mkdir()
    (chained / "run.json").write_text(json.dumps({"model": {"name_or_path": str(run)}}))
    with pytest.raises(ConfigError, match="is itself a run folder"):
        resolve_model_path(str(chained))
    (chained / "run.json").write_text("{}")
    with pytest.raises(ConfigError, match="model.name_or_path"):
        resolve_model_path(str(chained))


def test_run_folder_loads_base_plus_adapter(tmp_path, tiny):
    from peft import LoraConfig, PeftModel, get_peft_model

    cfg, tokenizer = tiny
    torch.manual_seed(0)
    trained = get_peft_model(load_causal_lm(cfg, tokenizer),
                             LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    run = tmp_path / "run"
    trained.save_pretrained(run / "adapter")
    (run / "run.json").write_text(json.dumps({"model": {"name_or_path": cfg.name_or_path}}))

    loaded = load_causal_lm(ModelConfig(name_or_path=str(run)))
    assert isinstance(loaded, PeftModel)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference unless training=True
    inputs = tokenizer("Is roaming free?", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits, trained(**inputs).logits, atol=1e-6)
        with loaded.disable_adapter():
            assert not torch.allclose(loaded(**inputs).logits, trained(**inputs).logits, atol=1e-3)


def test_chat_stage_needs_a_chat_template(tmp_path, tiny_model_dir):
    plain = tmp_path / "base-model"
    shutil.copytree(tiny_model_dir, plain)
    (plain / "chat_template.jinja").unlink()
    cfg = ModelConfig(name_or_path=str(plain))
    assert load_tokenizer(cfg).chat_template is None  # fine for stages that do not format conversations
    with pytest.raises(ConfigError, match=f"model {plain}: its tokenizer has no chat template"):
        load_tokenizer(cfg, require_chat_template=True)
