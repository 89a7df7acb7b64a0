"""What ``rlhf align eval`` measures on one model: held-out and general perplexity, the answers to held-out prompts, and
the pairwise win rate between two models' scored answers (the stage itself, its config and run.json are
alignment/evaluate.py).

- Held-out perplexity is taken on the tokens the SFT policy was trained on: :func:`sft_example` rebuilds each row as
  ``trl.SFTTrainer`` did (the chat template's ``{% generation %}`` assistant mask; the completion for prompt-completion
  rows), so the number is exp of the SFT loss on unseen rows, comparable across base, SFT and policy (one tokenizer).
- General perplexity (:func:`text_windows`) is the same on plain general-domain prose, without a template: aligning a
  model can cost general ability (the "alignment tax", Ouyang et al. 2022, sec. 4.3), and this is the cheap check.
- :func:`perplexity` sums the negative log-likelihood over tokens (not a mean of batch means), so batch size does
  not change it.
- :func:`prompt_rows` takes each held-out row's prompt and reference answer; :func:`generate` restarts sampling from
  the same seed for every model, so answers differ only because the models do.
- :func:`win_rate` is the pairwise win rate of InstructGPT (Ouyang et al. 2022) and AlpacaFarm (Dubois et al. 2023),
  ties counting ½; the judge here is the reward model, so it says how well a policy exploits *this* reward, not that
  humans prefer it.

Everything takes a loaded model / tokenizer and plain lists; torch, transformers and TRL are imported inside the
functions so that importing this module (and ``rlhf --help``) stays instant.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from rlhf.config import ConfigError

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Example = tuple[list[int], list[int]]  # (input_ids, labels with -100 where no loss is taken)


def sft_example(tokenizer: PreTrainedTokenizerBase, row: dict[str, Any], max_length: int) -> Example:
    """``(input_ids, labels)`` of one SFT row as ``trl.SFTTrainer`` (1.16, ``_prepare_dataset``) builds them for
    training: ``messages`` through the chat template with its assistant mask (``{% generation %}``), prompt-completion
    rows with the completion after the prompt's common prefix (an eos appended to plain text), truncated at the end."""
    from trl.data_utils import common_prefix_length

    if "messages" in row:
        out = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = out["input_ids"], out["assistant_masks"]
        if 1 not in mask:  # TRL refuses this too: the loss would cover no token
            raise ConfigError("the SFT tokenizer's chat template has no {% generation %} markers, so assistant tokens "
                              "cannot be told apart (the SFT stage needs them too)")
    else:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list):
            prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True,
                                                       return_dict=True)["input_ids"]
            ids = tokenizer.apply_chat_template(prompt + completion, return_dict=True)["input_ids"]
        else:
            eos = tokenizer.eos_token
            prompt_ids = tokenizer(prompt)["input_ids"]
            ids = tokenizer(prompt + (completion if completion.endswith(eos) else completion + eos))["input_ids"]
        start = common_prefix_length(prompt_ids, ids)
        mask = [0] * start + [1] * (len(ids) - start)
    return ids[:max_length], [t if m else -100 for t, m in zip(ids, mask)][:max_length]


def text_windows(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> list[Example]:
    """A plain text as consecutive windows of ``max_length`` tokens, every token but each window's first predicted
    (non-overlapping windows: a little pessimistic at each window's start, and one pass over the text)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # long on purpose: windowed below
    return [(w, w) for w in (ids[i:i + max_length] for i in range(0, len(ids), max_length)) if len(w) > 1]


def perplexity(model: PreTrainedModel, examples: list[Example], pad_token_id: int,
               batch_size: int) -> tuple[float | None, int]:
    """``(exp(total NLL / tokens), tokens)`` over every label that is not -100 (each predicted from the tokens
    before it), summed over tokens, not averaged per batch, so batch size does not change the number."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.tensor([i + [pad_token_id] * (width - len(i)) for i, _ in chunk], device=device)
            labels = torch.tensor([l + [-100] * (width - len(l)) for _, l in chunk], device=device)
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in chunk], device=device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            targets = labels[:, 1:]
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                                                       reduction="sum").item()
            count += int((targets != -100).sum())
    return (math.exp(total / count) if count else None), count


def prompt_rows(rows: datasets.Dataset) -> list[tuple[Any, str]]:
    """``(prompt, reference answer)`` per held-out row: a conversation up to its last assistant turn, or a
    prompt-completion row's prompt."""
    out = []
    for row in rows:
        if "messages" in row:
            messages = row["messages"]
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
            if last:  # an assistant turn with something before it
                out.append((messages[:last], messages[last]["content"]))
        else:
            completion = row["completion"]
            out.append((row["prompt"], completion if isinstance(completion, str) else completion[-1]["content"]))
    return out


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[list[int]],
             max_new_tokens: int, temperature: float, batch_size: int, seed: int) -> tuple[list[str], list[bool]]:
    """``(answers, ended)``: each prompt's answer (cut at its first end-of-turn / eos token, decoded without special
    tokens) and whether it ended by itself. Prompts are left-padded in batches of ``batch_size``; with
    ``temperature > 0`` sampling restarts from ``seed`` so every model sees the same random stream."""
    import torch
    from transformers import GenerationConfig

    from alignment.models import stop_token_ids
    from alignment.rl import truncate_after_eos

    stops = stop_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id
    # sampling from the plain distribution (no top-k/top-p truncation), as PPO's rollouts do by default
    sampling = ({"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0
                else {"do_sample": False})
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad, **sampling)
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    answers, ended = [], []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start:start + batch_size]
        width = max(len(ids) for ids in chunk)
        queries = torch.tensor([[pad] * (width - len(ids)) + ids for ids in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=queries, attention_mask=mask, generation_config=config)[:, width:]
        out, _, lengths = truncate_after_eos(out, stops, pad)
        answers += tokenizer.batch_decode([r[:n + 1] for r, n in zip(out, lengths.tolist())], skip_special_tokens=True)
        ended += torch.isin(out, torch.tensor(stops, device=out.device)).any(1).tolist()
    return answers, ended


def win_rate(scores: list[float], others: list[float]) -> float:
    """Share of prompts where ``scores`` beats ``others``; ties count ½."""
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, others)) / len(scores)
