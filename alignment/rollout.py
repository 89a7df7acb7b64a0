"""PPO's experience: sample responses from the policy, read their log-probs under the policy and the reference, the
value model's estimates and the reward's scores, and turn them into per-token rewards, advantages and returns
(alignment/rl.py does the arithmetic, alignment/roles.py the forward passes). Also the held-out evaluation that
compares the trained policy with the SFT policy it started from, and which prompts each update rolls out.
Everything here runs without gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from alignment.ppo import Config, RolloutConfig
    from alignment.rl import RunningMoments
    from alignment.roles import Roles


@dataclass
class Rollout:
    """One rollout batch; ``(batch, response_length)`` tensors unless said otherwise."""

    query_responses: torch.Tensor  # (batch, context_length + response_length): left-padded prompt + response
    attention_mask: torch.Tensor  # same shape: real prompt tokens and response tokens up to their EOS
    context_length: int  # prompt width (the response starts here)
    responses: torch.Tensor  # sampled ids, pad after the EOS
    padding_mask: torch.Tensor  # True after each response's last token
    sequence_lengths: torch.Tensor  # (batch,) index of each response's last token
    contain_eos: torch.Tensor  # (batch,) whether the response ended by itself
    texts: list[str]  # the decoded responses the reward read
    logprobs: torch.Tensor | None = None  # under the policy that sampled them (logits / temperature)
    ref_logprobs: torch.Tensor | None = None  # under the reference
    entropy: torch.Tensor | None = None  # of the policy's (temperature-scaled) next-token distribution
    values: torch.Tensor | None = None
    raw_scores: torch.Tensor | None = None  # (batch,) as the reward gave them
    scores: torch.Tensor | None = None  # (batch,) normalised and penalised: what the policy is paid
    rewards: torch.Tensor | None = None
    kl: torch.Tensor | None = None  # per-token k1 estimate
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None


def load_prompts(cfg: Config, tokenizer: PreTrainedTokenizerBase,
                 eval: bool = False) -> tuple[list[Any], list[list[int]]]:
    """``(prompts, token ids)``: each prompt as the dataset holds it (what the reward reads) and its ids with the
    generation prompt; prompts over ``train.max_length`` tokens are skipped."""
    from alignment.data import load_mixture
    from rlhf.config import ConfigError

    ds = load_mixture(cfg.data, "prompts", cfg.train.seed, eval=eval)
    if ds is None:
        return [], []
    column = ds["prompt"] if "prompt" in ds.column_names else ds["messages"]
    prompts = [p[:-1] if isinstance(p, list) and p and p[-1]["role"] == "assistant" else p for p in column]
    kept, ids = [], []
    for prompt in prompts:
        tokens = (tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
                  if isinstance(prompt, list) else tokenizer(prompt)["input_ids"])
        if len(tokens) <= cfg.train.max_length:
            kept.append(prompt)
            ids.append(tokens)
    if not eval and not kept:
        raise ConfigError(f"data: no training prompt fits train.max_length ({cfg.train.max_length} tokens)")
    return kept, ids


def batch_indices(update: int, size: int, n_prompts: int, seed: int) -> list[int]:
    """The prompts of one update: consecutive slices of a fresh permutation per epoch, a pure function of the update
    number, so a resumed run draws exactly the prompts an uninterrupted one would."""
    import torch

    indices: list[int] = []
    while len(indices) < size:
        epoch, offset = divmod(update * size + len(indices), n_prompts)
        order = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed + epoch))
        indices += order[offset:offset + size - len(indices)].tolist()
    return indices


def generate(roles: Roles, prompt_ids: list[list[int]], settings: RolloutConfig, chunk: int, adapter: str | None,
             greedy: bool = False) -> Rollout:
    """Responses to ``prompt_ids`` from the model under ``adapter`` (None: every adapter off), sampled with
    ``settings`` or greedy, in chunks of ``chunk`` prompts; truncated after EOS."""
    import torch
    from transformers import GenerationConfig

    from alignment.models import stop_token_ids
    from alignment.rl import truncate_after_eos
    from alignment.roles import active, autocast

    tokenizer, stops = roles.tokenizer, stop_token_ids(roles.tokenizer, roles.model)
    pad = tokenizer.pad_token_id
    # Huang et al. 2024, sec. 7, "left padding": generation appends to the right end of every row
    width = max(len(ids) for ids in prompt_ids)
    queries = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompt_ids], device=roles.model.device)
    query_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids],
                              device=roles.model.device)
    sampling = {} if greedy else {"temperature": settings.temperature, "top_k": settings.top_k,
                                  "top_p": settings.top_p}
    config = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=not greedy, eos_token_id=stops,
                              pad_token_id=pad, **sampling)
    outputs = []
    # The model stays in train mode (dropout is off anyway). eval() would let bitsandbytes (0.50, Linear4bit.forward)
    # repack every 4-bit weight in place into its CPU inference layout on AVX512-BF16 machines, whose kernel has no
    # backward: every later training pass would then back-propagate through it silently wrong (tested).
    base = roles.model.get_base_model()
    checkpointing = base.is_activation_checkpointing
    if checkpointing:  # in train mode it would also switch the KV cache off
        base.activation_checkpointing_disable()
    with torch.no_grad(), active(roles.model, adapter), autocast(roles):
        for start in range(0, len(prompt_ids), chunk):
            out = roles.model.generate(input_ids=queries[start:start + chunk],
                                       attention_mask=query_mask[start:start + chunk], generation_config=config)
            outputs.append(out[:, width:])
    if checkpointing:
        base.activation_checkpointing_enable({"use_reentrant": False})
    length = max(o.shape[1] for o in outputs)
    responses = torch.cat([torch.nn.functional.pad(o, (0, length - o.shape[1]), value=pad) for o in outputs])
    responses, padding_mask, sequence_lengths = truncate_after_eos(responses, stops, pad)
    texts = tokenizer.batch_decode([r[:n + 1] for r, n in zip(responses, sequence_lengths.tolist())],
                                   skip_special_tokens=True)
    return Rollout(query_responses=torch.cat([queries, responses], 1),
                   attention_mask=torch.cat([query_mask, (~padding_mask).long()], 1), context_length=width,
                   responses=responses, padding_mask=padding_mask, sequence_lengths=sequence_lengths,
                   contain_eos=torch.isin(responses, torch.tensor(stops, device=responses.device)).any(1),
                   texts=texts)


def response_logprobs(roles: Roles, batch: Rollout, rows: Any, adapter: str | None, temperature: float,
                      with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the sampled tokens for ``rows`` of ``batch`` under ``adapter``, and (``with_entropy``) the
    entropy of each next-token distribution, which only the logs need (no gradient flows through it).

    The logits are divided by the sampling temperature before the softmax (Huang et al. 2023 blog, "scale the
    logits by the temperature"; 2024 paper, sec. 7): otherwise the log-probs are those of another distribution than
    the one sampled, and the KL and the PPO ratio are wrong from the first step."""
    from trl.trainer.utils import selective_log_softmax, selective_log_softmax_and_entropy

    from alignment.roles import policy_logits

    logits = policy_logits(roles, adapter, batch.query_responses[rows], batch.attention_mask[rows],
                           batch.responses.shape[1])
    if with_entropy:
        return selective_log_softmax_and_entropy(logits, batch.responses[rows], entropy_requires_grad=False,
                                                 temperature=temperature)
    return selective_log_softmax(logits, batch.responses[rows], temperature=temperature), None


def _chunked(fn, size: int, chunk: int) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``fn(slice)`` over consecutive slices of ``range(size)``, concatenated along the batch."""
    import torch

    parts = [fn(slice(start, start + chunk)) for start in range(0, size, chunk)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)


def make_rollout(cfg: Config, roles: Roles, prompts: list[Any], prompt_ids: list[list[int]], kl_coef: float,
                 moments: RunningMoments) -> Rollout:
    """Sample, score and value one rollout batch; rewards, advantages and returns filled in."""
    import torch

    from alignment import rl
    from alignment.roles import POLICY, response_values, score

    chunk = cfg.train.eval_batch_size or cfg.train.batch_size
    batch = generate(roles, prompt_ids, cfg.rollout, chunk, POLICY)
    size, temperature = len(prompt_ids), cfg.rollout.temperature
    with torch.no_grad():
        batch.logprobs, batch.entropy = _chunked(
            lambda rows: response_logprobs(roles, batch, rows, POLICY, temperature, with_entropy=True), size, chunk)
        batch.ref_logprobs = _chunked(
            lambda rows: response_logprobs(roles, batch, rows, roles.reference, temperature)[0], size, chunk)
        batch.values = _chunked(lambda rows: response_values(roles, batch.query_responses[rows],
                                                             batch.attention_mask[rows], batch.context_length),
                                size, chunk).float()
        batch.raw_scores = score(roles, prompts, batch.texts, chunk).to(batch.values.device)
    batch.scores = _normalised(batch.raw_scores, cfg.ppo.reward_norm, moments)
    if cfg.rollout.missing_eos_penalty is not None:
        # Huang et al. 2024, sec. 7, "EOS trick": a response cut off at max_new_tokens is scored as if it had ended
        # (the chat template closes the turn for the reward model), so it is paid a fixed penalty instead; otherwise
        # the policy learns to ramble (TRL's missing_eos_penalty, applied after normalisation: a fixed size)
        batch.scores = batch.scores - cfg.rollout.missing_eos_penalty * (~batch.contain_eos).float()
    batch.rewards, batch.kl = rl.kl_penalised_rewards(batch.scores, batch.logprobs.float(),
                                                      batch.ref_logprobs.float(), batch.padding_mask,
                                                      batch.sequence_lengths, kl_coef)
    batch.advantages, batch.returns = rl.gae(batch.rewards, batch.values, batch.padding_mask, cfg.ppo.gamma,
                                             cfg.ppo.lam)
    if cfg.ppo.whiten_advantages:
        # Huang et al. 2024, sec. 7, "advantage whitening": per rollout batch, over response tokens only
        batch.advantages = rl.masked_whiten(batch.advantages, ~batch.padding_mask).masked_fill(batch.padding_mask, 0)
    return batch


def _normalised(scores: torch.Tensor, how: str, moments: RunningMoments) -> torch.Tensor:
    """Scores on a stable scale (Huang et al. 2023 blog and 2024 paper, "reward normalisation/whitening"): whitened
    per rollout batch, or by the running mean and std of every score so far (updated with this batch first)."""
    import torch

    from alignment import rl

    if how == "batch":
        return rl.masked_whiten(scores, torch.ones_like(scores, dtype=torch.bool))
    if how == "running":
        moments.update(scores)
        return moments.normalise(scores)
    return scores


def rollout_stats(batch: Rollout, kl_coef: float) -> dict[str, float]:
    """What each update logs about its rollout (per response unless said otherwise)."""
    from alignment import rl

    keep = ~batch.padding_mask
    kl = batch.kl.sum(1)
    return {"objective/score": batch.raw_scores.mean().item(),  # the reward's own scale: what the test watches
            "objective/kl": kl.mean().item(),  # k1 sum over the response: nats away from the reference
            "objective/kl_coef": kl_coef,
            "objective/rlhf_reward": (batch.scores - kl_coef * kl).mean().item(),
            "policy/entropy": rl.masked_mean(batch.entropy, keep).item(),  # nats per token
            "value/explained_variance": rl.explained_variance(batch.values, batch.returns, batch.padding_mask),
            "response/length": (batch.sequence_lengths + 1).float().mean().item(),
            "response/no_eos_rate": (~batch.contain_eos).float().mean().item()}


def evaluate(cfg: Config, roles: Roles, prompts: list[Any], prompt_ids: list[list[int]]) -> dict[str, float]:
    """The held-out score of greedy answers from the trained policy and from the reference (the SFT policy), read
    by the training reward on its own scale (no normalisation, no penalty); nothing when there is no eval split."""
    from alignment.roles import POLICY, score

    if not prompts:
        return {}
    chunk = cfg.train.eval_batch_size or cfg.train.batch_size
    metrics = {"eval_prompts": len(prompts)}
    for name, adapter in (("eval_score", POLICY), ("eval_score_reference", roles.reference)):
        answers = generate(roles, prompt_ids, cfg.rollout, chunk, adapter, greedy=True)
        metrics[name] = score(roles, prompts, answers.texts, chunk).mean().item()
        metrics[name.replace("score", "no_eos_rate")] = (~answers.contain_eos).float().mean().item()
    return metrics
