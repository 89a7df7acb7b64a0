"""Models and tokenizers for every alignment stage: the recipe's ``model:`` section, loading through
``from_pretrained`` (Hub id, local folder or an earlier run's folder), 4-/8-bit quantisation for QLoRA, the pad and
chat-template fixes each stage relies on, and a tiny random-init model built offline for tests and smoke runs.

Two traps from the field notes are settled here once for all stages:

- trap 3 (pad token; huggingface/trl 1379, 937): reward models read the score at the last non-pad token, so a model
  without a pad token, or with pad == eos, mis-reads or fails; we give every tokenizer a pad distinct from eos.
- traps 4 and 5 (huggingface/trl 4879, 4147; hiyouga/LlamaFactory 7943): the tiny model's chat template marks each
  assistant turn *including its end-of-turn token* with ``{% generation %}``, and that token is its eos, so
  assistant-only loss trains exactly the answers and the model learns to stop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf.config import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

DTYPES = ("auto", "bfloat16", "float16", "float32")
QUANTIZATIONS = (None, "nf4", "int8")
PAD_TOKEN = "<|pad|>"  # added only when a tokenizer has neither a pad nor an unk token distinct from eos

# ChatML (as in Qwen2.5) with TRL's generation markers. The span closes *after* <|im_end|> so the end-of-turn token,
# which is also eos, is trained (trl.chat_template_utils.is_chat_template_stop_token_trained); the newline after it
# stays outside so the mask is exactly content + end token.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
# The tiny tokenizer's special tokens; eos is the end-of-turn marker so generation stops at the end of a turn (trap 5).
TINY_SPECIAL_TOKENS = {"pad_token": PAD_TOKEN, "unk_token": "<|unk|>", "bos_token": "<|bos|>",
                       "eos_token": "<|im_end|>"}
TURN_START = "<|im_start|>"


@dataclass
class ModelConfig:
    """The recipe's ``model:`` section: which model to load and how."""

    name_or_path: str  # Hub id, local folder, or an alignment run folder (its run.json names the base model)
    revision: str | None = None  # Hub branch, tag or commit to pin; recorded in run records
    dtype: str = "auto"  # auto (the checkpoint's own dtype) | bfloat16 | float16 | float32
    trust_remote_code: bool = False  # run Python shipped in the model repository; off unless the recipe sets it
    quantization: str | None = None  # None | nf4 (QLoRA, Dettmers et al. 2023) | int8 (LLM.int8(), Dettmers 2022)
    double_quant: bool = False  # nf4 only: quantise the quantisation constants too (QLoRA sec. 3, ~0.37 bit/param)
    attn_implementation: str | None = None  # eager | sdpa | flash_attention_2 ...; None lets transformers choose

    def __post_init__(self) -> None:
        if not isinstance(self.name_or_path, str) or not self.name_or_path.strip():
            raise ValueError(f"name_or_path: expected a Hub id or a folder, got {self.name_or_path!r}")
        if self.revision is not None and (not isinstance(self.revision, str) or not self.revision.strip()):
            raise ValueError(f"revision: expected a branch, tag or commit, got {self.revision!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.trust_remote_code, bool):
            raise ValueError(f"trust_remote_code: expected true or false, got {self.trust_remote_code!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization: expected nf4, int8 or null, got {self.quantization!r}")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant: expected true or false, got {self.double_quant!r}")
        if self.double_quant and self.quantization != "nf4":
            raise ValueError("double_quant: only applies with quantization: nf4")
        if self.attn_implementation is not None and (
                not isinstance(self.attn_implementation, str) or not self.attn_implementation.strip()):
            raise ValueError(f"attn_implementation: expected a name such as sdpa, got {self.attn_implementation!r}")


def resolve_model_path(name_or_path: str) -> tuple[str, str | None]:
    """``(base model, adapter folder or None)`` for a run folder (it holds ``run.json``); anything else unchanged.

    A run's ``run.json`` must record the resolved base (a Hub id or a model folder) as ``model.name_or_path``, and its
    adapter was trained on that base: a base that is itself a run folder is refused rather than silently dropping the
    earlier run's adapter."""
    run_json = Path(name_or_path) / "run.json"
    if not run_json.is_file():
        local = Path(name_or_path).expanduser()
        if (local.is_absolute() or name_or_path.startswith((".", "~"))) and not local.exists():
            # only a folder can look like this, so don't let from_pretrained report it as a bad Hub repo id
            raise ConfigError(f"model folder not found: {name_or_path}")
        return name_or_path, None
    full = Path(name_or_path) / "model"
    if full.is_dir() and not (Path(name_or_path) / "adapter").is_dir():
        return str(full), None  # a full or partly frozen fine-tune: its trained weights, not the base it started from
    try:
        base = json.loads(run_json.read_text(encoding="utf-8"))["model"]["name_or_path"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ConfigError(f"{run_json}: expected a run record with model.name_or_path") from None
    if (Path(base) / "run.json").is_file():
        raise ConfigError(f"{run_json}: model.name_or_path {base!r} is itself a run folder; record the base model")
    adapter = Path(name_or_path) / "adapter"
    return base, str(adapter) if adapter.is_dir() else None


def load_tokenizer(cfg: ModelConfig, *, require_chat_template: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer with a pad token distinct from eos; an adapter folder's own tokenizer wins when saved."""
    from transformers import AutoTokenizer

    base, adapter = resolve_model_path(cfg.name_or_path)
    source = adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else base
    tokenizer = AutoTokenizer.from_pretrained(source, revision=None if source == adapter else cfg.revision,
                                              trust_remote_code=cfg.trust_remote_code)
    ensure_pad_token(tokenizer)
    if require_chat_template and not tokenizer.chat_template:
        raise ConfigError(f"model {cfg.name_or_path}: its tokenizer has no chat template, but this stage formats "
                          "conversations; use an instruct/chat model or a tokenizer folder that ships one")
    return tokenizer


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give ``tokenizer`` a pad token distinct from eos (trap 3; huggingface/trl 1379, 937).

    pad == eos is the common shortcut and it is wrong for us twice: a sequence classifier scores the rightmost
    non-pad token, so the closing eos would be skipped as padding, and collators that mask ``labels == pad`` drop eos
    from the loss, so the model never learns to stop (trap 5). We reuse unk when the tokenizer has one (Llama 2,
    Mistral: no new row, adapters stay shape-compatible with the base), else add ``<|pad|>``; loaders then resize the
    embeddings (:func:`_align_with_tokenizer`)."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is not None and pad != eos:
        return
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != eos:
        tokenizer.pad_token = tokenizer.unk_token
    else:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})


def template_end_of_turn(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The token the chat template closes an assistant reply with, when that is a special token (None when the
    template cannot render a plain user/assistant/user exchange, or leaves the reply open)."""
    from jinja2 import TemplateError

    probe = "Certainly"
    try:  # the reply is followed by a user turn: some templates never close the final assistant turn
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"},
                                              {"role": "assistant", "content": probe},
                                              {"role": "user", "content": "Thanks"}], tokenize=False)
        tail = tokenizer.encode(text[text.rindex(probe) + len(probe):], add_special_tokens=False)
    except (TemplateError, TypeError, ValueError):
        return None
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    first = next((t for t in tail if tokenizer.decode([t]).strip()), None)  # skip whitespace tokens
    return first if first in special else None


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> list[int]:
    """Every id that ends a reply: the tokenizer's eos, the generation config's, and the template's end-of-turn
    token. Templates whose end of turn is not the tokenizer's eos (Llama 3's <|eot_id|>) otherwise generate past the
    answer until max_new_tokens (trap 5; hiyouga/LlamaFactory 7943, 7454). Every stage that generates (candidates
    for ranking, PPO rollouts, evaluation answers) stops on these."""
    configured = model.generation_config.eos_token_id
    ids = {tokenizer.eos_token_id, template_end_of_turn(tokenizer),
           *(configured if isinstance(configured, list) else [configured])}
    return sorted(i for i in ids if i is not None)


def _from_pretrained_kwargs(cfg: ModelConfig) -> dict:
    """Shared ``from_pretrained`` arguments; ``dtype`` is the transformers >= 4.56 name of ``torch_dtype``."""
    import torch

    kwargs = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code,
              "dtype": "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.quantization:
        kwargs["quantization_config"] = _bnb_config(cfg)
        if torch.cuda.is_available():
            # bitsandbytes quantises on the device the weights land on: put each process's copy on its own GPU
            # (what accelerate/TRL examples do); on CPU the default placement works and no device_map is needed.
            from accelerate import PartialState

            kwargs["device_map"] = {"": PartialState().local_process_index}
    return kwargs


def _bnb_config(cfg: ModelConfig) -> BitsAndBytesConfig:
    import torch
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    # Matmuls run in the compute dtype: the recipe's half dtype, else bf16 on a GPU that has it (QLoRA's choice),
    # else fp32 (CPU).
    if cfg.dtype in ("bfloat16", "float16"):
        compute = getattr(torch, cfg.dtype)
    elif torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        compute = torch.bfloat16
    else:
        compute = torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=cfg.double_quant, bnb_4bit_compute_dtype=compute)


def _align_with_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the embeddings when the tokenizer gained tokens (a pad) and tell the config which id pads."""
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        # New rows are drawn around the mean of the old ones (transformers' mean_resizing, after J. Hewitt 2021,
        # "Initializing new word embeddings"), so an unseen pad does not skew the output distribution.
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id  # what sequence classifiers read
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _keep_4bit_weights_unpacked(model: PreTrainedModel) -> None:
    """Stop bitsandbytes from repacking 4-bit weights in place for its CPU inference-only kernel.

    bitsandbytes 0.50 (``Linear4bit.forward``), on a CPU with AVX512-BF16, repacks a layer's weight *in place* the
    first time it runs in eval mode on an input without grad, which is exactly ``Trainer.evaluate()`` mid-training.
    The packed kernel (``gemv_4bit``) has no backward: from then on gradients through every 4-bit layer are silently
    wrong (one UserWarning) and its outputs shift by ~6e-3, so QLoRA with an eval split stopped learning correctly
    after the first evaluation (tests/alignment/test_qlora_eval.py). The repack is gated on the per-layer flag
    ``support_avx512bf16_for_cpu``; clearing it keeps the dequantise-and-matmul path, in train and eval mode alike.
    Frozen 4-bit models (a reward model scoring, a parent policy compared with its continuation) take the same path,
    so their numbers match the trained model's exactly (the packed kernel's differ by ~2e-3 in a reply's log-prob)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _prepare(model: PreTrainedModel, cfg: ModelConfig, adapter: str | None, training: bool) -> PreTrainedModel:
    """Make a quantised model trainable, then put the run's adapter (if any) on top, frozen unless training."""
    if cfg.quantization and training:
        # Casts the unquantised weights (norms, embeddings) to fp32 and enables input grads so gradient
        # checkpointing works through frozen 4-bit layers (the QLoRA recipe; peft docs). Whether checkpointing is on
        # is the recipe's train.gradient_checkpointing, applied by the trainer, not PEFT's default (on).
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.quantization:
        _keep_4bit_weights_unpacked(model)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=training)
    return model


def load_causal_lm(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None, *,
                   training: bool = False) -> PreTrainedModel:
    """A causal LM (a ``PeftModel`` when ``cfg`` names a run folder with an adapter), matched to ``tokenizer``."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(cfg) if tokenizer is None else tokenizer
    base, adapter = resolve_model_path(cfg.name_or_path)
    model = AutoModelForCausalLM.from_pretrained(base, **_from_pretrained_kwargs(cfg))
    _align_with_tokenizer(model, tokenizer)
    return _prepare(model, cfg, adapter, training)


def load_sequence_classifier(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase | None = None,
                             num_labels: int = 1, *, training: bool = False) -> PreTrainedModel:
    """A sequence classifier (a reward model when ``num_labels=1``): the base LM with a fresh linear ``score`` head
    that reads the last non-pad token, so ``pad_token_id`` must be set (trap 3)."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(cfg) if tokenizer is None else tokenizer
    base, adapter = resolve_model_path(cfg.name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=num_labels,
                                                               **_from_pretrained_kwargs(cfg))
    _align_with_tokenizer(model, tokenizer)
    return _prepare(model, cfg, adapter, training)


def iter_corpus_texts(files: Iterable[str | Path]) -> Iterator[str]:
    """Texts of .txt/.md files whole, and every string value of each .jsonl line (nested ones too)."""
    for path in map(Path, files):
        if path.suffix == ".jsonl":
            for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    yield from _strings(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: malformed JSON ({e.msg})") from None
        else:
            yield path.read_text(encoding="utf-8", errors="replace")


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def train_tiny_tokenizer(corpus_files: Iterable[str | Path], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style: no unknown bytes) trained on ``corpus_files``, ChatML-ready."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(Path(f) for f in corpus_files)  # sorted: the same files give the same merges in any order
    if not files:
        raise ValueError("corpus_files: expected at least one .txt, .md or .jsonl file")
    specials = [*TINY_SPECIAL_TOKENS.values(), TURN_START]  # ids 0..4, pad first
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(iter_corpus_texts(files), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **TINY_SPECIAL_TOKENS,
                                        additional_special_tokens=[TURN_START])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(out_dir: str | Path, corpus_files: Iterable[str | Path], vocab_size: int = 1024,
                     hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, intermediate_size: int = 128,
                     max_position_embeddings: int = 512, seed: int = 0) -> Path:
    """Write a random-init Llama and its tokenizer to ``out_dir``, loadable with ``ModelConfig(name_or_path=out_dir)``.

    Deterministic: the same files and arguments give the same tokenizer and the same weights."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = train_tiny_tokenizer(corpus_files, vocab_size)
    tokenizer.model_max_length = max_position_embeddings
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_heads,
                         intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
