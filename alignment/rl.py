"""The arithmetic of PPO for language models, as small pure-torch functions over padded ``(batch, response_length)``
tensors, named the way cleanrl and summarize_from_feedback_details name them:

- ``responses``: sampled token ids; ``padding_mask``: True where a position lies *after* the response's last token
  (its EOS is kept), so ``~padding_mask`` selects the tokens that count;
- ``logprobs`` / ``ref_logprobs``: log pi(token) under the policy that sampled it and under the reference policy;
- ``values``: the value model's estimate before each token; ``scores``: one reward-model score per response;
- ``rewards``: per-token rewards (KL penalty + score), ``advantages`` and ``returns`` from GAE.

The PPO stage (alignment/ppo.py) imports this module inside ``run`` (it needs torch at import time; recipes and
``rlhf --help`` never load it). Every function here is checked against numbers worked out by hand in
tests/alignment/test_rl.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EPS = 1e-8


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is True (over everything, or along ``dim``)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` where ``mask`` is True; unbiased (Bessel's n/(n-1)) by default, as in TRL's PPO."""
    centred = values - masked_mean(values, mask)
    variance = masked_mean(centred**2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError("masked_var: the unbiased variance needs at least two unmasked values")
        variance = variance * n / (n - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(values - mean) / std`` over the unmasked entries; ``shift_mean=False`` only rescales (keeps the mean)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + EPS)
    return whitened if shift_mean else whitened + mean


def truncate_after_eos(responses: torch.Tensor, eos_token_ids: list[int],
                       pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(responses, padding_mask, sequence_lengths)``: every token after the first EOS (any of ``eos_token_ids``)
    replaced by pad, the mask of those positions, and the index of each response's last token (its EOS, or the
    last position when it has none).

    Huang et al. 2024 (arXiv 2403.17031), sec. 7, "truncate after EOS": whatever a sampler emits after EOS is not
    part of the response, and must neither be scored nor trained on. The mask is built from the EOS position, not
    from ``responses == pad``: a pad token sampled mid-response is a real (if odd) token."""
    length = responses.shape[1]
    is_eos = torch.isin(responses, torch.tensor(eos_token_ids, device=responses.device))
    positions = torch.arange(length, device=responses.device).expand_as(responses)
    first_eos = torch.where(is_eos, positions, length).min(dim=1).values
    sequence_lengths = first_eos.clamp(max=length - 1)
    padding_mask = positions > sequence_lengths.unsqueeze(1)
    return responses.masked_fill(padding_mask, pad_token_id), padding_mask, sequence_lengths


def kl_penalised_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         padding_mask: torch.Tensor, sequence_lengths: torch.Tensor,
                         kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rewards, kl)``: the per-token reward ``-kl_coef * kl`` with the sequence's score added at its last token,
    and the per-token ``kl`` (zero on padding).

    Ziegler et al. 2019 (eq. 2) and Stiennon et al. 2020 penalise the policy per token for leaving the reference
    (Huang et al. 2024, sec. 7, "per-token KL penalty"); the KL is the k1 estimator ``logprob - ref_logprob``, an
    unbiased sample of KL(pi || ref) because the tokens were sampled from pi (Schulman 2020, "Approximating KL
    divergence"). The score arrives once, at the token that ends the episode (the EOS the reward model reads)."""
    kl = (logprobs - ref_logprobs).masked_fill(padding_mask, 0.0)
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, sequence_lengths] += scores
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages, returns)`` by generalised advantage estimation (Schulman et al. 2016, eq. 16):
    ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lam * A_{t+1}``, ``returns = A + V``.

    Values on padding are zeroed first, so the step after a response's last token bootstraps from 0: the episode
    ends there (at EOS, or at max_new_tokens, where the missing-EOS penalty is the verdict). summarize_from_feedback
    _details keeps one value past the end (``padding_mask_p1``), which bootstraps the terminal step from a padding
    position; we do not. Padded positions come out as 0."""
    values = values.masked_fill(padding_mask, 0.0)
    rewards = rewards.masked_fill(padding_mask, 0.0)
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages.masked_fill(padding_mask, 0.0)
    return advantages, (advantages + values).masked_fill(padding_mask, 0.0)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                padding_mask: torch.Tensor, cliprange: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), negated for minimisation, averaged over response
    tokens; with the clip fraction, the approximate KL ``0.5 * mean((log ratio)^2)`` (the k2 estimator cleanrl
    logs) and the mean ratio."""
    keep = ~padding_mask
    log_ratio = (logprobs - old_logprobs).masked_fill(padding_mask, 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), keep)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), keep),
                 "approxkl": 0.5 * masked_mean(log_ratio**2, keep), "ratio": masked_mean(ratio, keep)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, padding_mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2)`` over response tokens, with its clip fraction.

    Value clipping (Huang et al. 2024, sec. 7, "value function loss clipping"; the 2019 lm-human-preferences code):
    a value estimate moves at most ``cliprange_value`` from the one the rollout recorded, per update."""
    keep = ~padding_mask
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped_loss, clipped_loss = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_loss, clipped_loss), keep)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped_loss > unclipped_loss).float(), keep)}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, padding_mask: torch.Tensor) -> float:
    """``1 - Var(returns - values) / Var(returns)`` over response tokens: 1 is a perfect critic, 0 no better than a
    constant, negative worse (cleanrl logs it to tell a learning value head from a useless one)."""
    keep = ~padding_mask
    var_returns = masked_var(returns, keep, unbiased=False)
    if var_returns.item() == 0:
        return float("nan")
    return (1.0 - masked_var(returns - values, keep, unbiased=False) / var_returns).item()


@dataclass
class KLController:
    """The KL coefficient: fixed, or adaptive (Ziegler et al. 2019, sec. 2.2) when ``target`` is set. The adaptive
    controller moves the coefficient in proportion to how far the measured KL is from the target, the error clipped
    to +-20%, at a rate of ``n_steps / horizon`` per update (episodes seen over the horizon in episodes)."""

    value: float  # the current coefficient (beta)
    target: float | None = None  # KL (nats per sequence) to steer towards; None keeps the coefficient fixed
    horizon: int = 10000  # episodes over which a 20% error changes the coefficient by about e^0.2

    def update(self, kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


@dataclass
class RunningMoments:
    """Running mean and variance of everything seen so far (Chan et al. 1979's pairwise update), to normalise
    reward-model scores across rollouts (Huang et al. 2023 blog, "reward normalization"; TRL's RunningMoments)."""

    mean: float = 0.0
    var: float = 1.0  # population variance of the values seen
    count: float = 0.0

    def update(self, values: torch.Tensor) -> None:
        n = values.numel()
        batch_mean, batch_var = values.float().mean().item(), values.float().var(unbiased=False).item()
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    def normalise(self, values: torch.Tensor) -> torch.Tensor:
        return (values - self.mean) / math.sqrt(self.var + EPS)
