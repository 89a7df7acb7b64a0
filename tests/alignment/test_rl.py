"""PPO's arithmetic (alignment/rl.py) against numbers worked out by hand in the comments: masking, whitening, EOS
truncation, the KL-penalised per-token reward, GAE, the clipped policy and value losses, explained variance, the
adaptive KL controller and running reward moments."""

from __future__ import annotations

import math

import pytest
import torch

from alignment import rl

T = torch.tensor


def close(actual: torch.Tensor, expected: list) -> bool:
    torch.testing.assert_close(actual, T(expected, dtype=actual.dtype), atol=1e-6, rtol=1e-5)
    return True


def test_masked_mean_var_and_whiten_ignore_padding():
    values = T([[1.0, 2.0, 3.0], [4.0, 100.0, -100.0]])
    keep = T([[True, True, True], [True, False, False]])
    # kept: 1, 2, 3, 4 -> mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5
    assert rl.masked_mean(values, keep).item() == pytest.approx(2.5)
    assert rl.masked_var(values, keep, unbiased=False).item() == pytest.approx(5 / 4)
    assert rl.masked_var(values, keep).item() == pytest.approx(5 / 3)  # Bessel: 5 / (4 - 1)
    # per row: (1 + 2 + 3) / 3 = 2 and 4 / 1 = 4
    assert rl.masked_mean(values, keep, dim=1).tolist() == pytest.approx([2.0, 4.0])
    # (v - 2.5) / sqrt(5/3): -1.5/1.29099 = -1.16190, -0.5/1.29099 = -0.38730, ...
    whitened = rl.masked_whiten(values, keep)
    assert whitened[keep].tolist() == pytest.approx([-1.16190, -0.38730, 0.38730, 1.16190], abs=1e-5)
    # without the shift the mean stays: whitened + 2.5
    assert rl.masked_whiten(values, keep, shift_mean=False)[keep].tolist() == pytest.approx(
        [1.33810, 2.11270, 2.88730, 3.66190], abs=1e-5)
    with pytest.raises(ValueError, match="two"):
        rl.masked_var(values, T([[True, False, False], [False, False, False]]))


def test_truncate_after_eos_keeps_the_eos_and_finds_the_last_token():
    eos, end_of_text, pad = 9, 8, 0  # chat models often stop at either of two tokens
    responses = T([[5, 9, 7, 7],    # EOS at 1: tokens after it become pad
                   [5, 6, 7, 4],    # no EOS: the last position is the last token
                   [9, 9, 3, 0],    # the first EOS counts
                   [5, 0, 6, 9],    # a pad sampled mid-response is a real token; EOS at 3
                   [5, 8, 9, 9]])   # the other stop token ends it at 1
    truncated, padding_mask, lengths = rl.truncate_after_eos(responses, [eos, end_of_text], pad)
    assert truncated.tolist() == [[5, 9, 0, 0], [5, 6, 7, 4], [9, 0, 0, 0], [5, 0, 6, 9], [5, 8, 0, 0]]
    assert lengths.tolist() == [1, 3, 0, 3, 1]
    assert padding_mask.tolist() == [[False, False, True, True], [False] * 4, [False, True, True, True], [False] * 4,
                                     [False, False, True, True]]


def test_kl_penalised_rewards_by_hand():
    logprobs, ref_logprobs = T([[-1.0, -2.0, -5.0]]), T([[-1.5, -1.0, -9.0]])
    padding_mask = T([[False, False, True]])
    # k1 per token: -1 - (-1.5) = 0.5, -2 - (-1) = -1, padding 0; reward -0.1 * kl, score 2 at the last token (1)
    rewards, kl = rl.kl_penalised_rewards(T([2.0]), logprobs, ref_logprobs, padding_mask, T([1]), kl_coef=0.1)
    assert close(kl, [[0.5, -1.0, 0.0]])
    assert close(rewards, [[-0.05, 0.1 + 2.0, 0.0]])


def test_gae_by_hand_with_padding():
    rewards = T([[0.0, 0.0, 1.0], [0.5, -1.0, 7.0]])
    values = T([[0.1, 0.2, 0.3], [1.0, 2.0, 9.0]])
    padding_mask = T([[False, False, False], [False, False, True]])  # row 2 ends at t=1; its 7 and 9 are padding
    advantages, returns = rl.gae(rewards, values, padding_mask, gamma=1.0, lam=0.5)
    # row 1: delta2 = 1 + 0 - 0.3 = 0.7             A2 = 0.7
    #        delta1 = 0 + 0.3 - 0.2 = 0.1            A1 = 0.1 + 0.5 * 0.7 = 0.45
    #        delta0 = 0 + 0.2 - 0.1 = 0.1            A0 = 0.1 + 0.5 * 0.45 = 0.325;  returns = A + V
    # row 2: delta1 = -1 + 0 - 2 = -3 (the padded value 9 is not bootstrapped)   A1 = -3
    #        delta0 = 0.5 + 2 - 1 = 1.5                                            A0 = 1.5 + 0.5 * -3 = 0
    assert close(advantages, [[0.325, 0.45, 0.7], [0.0, -3.0, 0.0]])
    assert close(returns, [[0.425, 0.65, 1.0], [1.0, -1.0, 0.0]])


def test_gae_discounts_and_reduces_to_monte_carlo_returns():
    # lam = 1, values 0: advantages are the discounted returns 0.5^2, 0.5, 1
    rewards, values, no_padding = T([[0.0, 0.0, 1.0]]), torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.bool)
    advantages, returns = rl.gae(rewards, values, no_padding, gamma=0.5, lam=1.0)
    assert close(advantages, [[0.25, 0.5, 1.0]]) and returns.tolist() == advantages.tolist()
    # lam = 0: one-step TD errors r_t + gamma V_{t+1} - V_t
    advantages, _ = rl.gae(rewards, T([[1.0, 2.0, 3.0]]), no_padding, gamma=0.5, lam=0.0)
    assert close(advantages, [[0 + 1.0 - 1.0, 0 + 1.5 - 2.0, 1 + 0 - 3.0]])


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(T([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    advantages = T([[1.0, -1.0, 2.0]])
    padding_mask = torch.zeros(1, 3, dtype=torch.bool)
    loss, stats = rl.policy_loss(new, old, advantages, padding_mask, cliprange=0.2)
    # token 0: A=1,  max(-1 * 1.5, -1 * 1.2) = -1.2 (clipped)
    # token 1: A=-1, max(0.5, 0.8) = 0.8 (clipped: lowering a bad token's ratio below 0.8 earns nothing)
    # token 2: A=2,  max(-2.2, -2.2) = -2.2 (inside the range)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    log_ratios = [math.log(1.5), math.log(0.5), math.log(1.1)]
    assert stats["approxkl"].item() == pytest.approx(0.5 * sum(x * x for x in log_ratios) / 3)
    assert stats["ratio"].item() == pytest.approx((1.5 + 0.5 + 1.1) / 3)
    # the gradient reaches only tokens inside the clip range: d/dlogp of -A * ratio at token 2 = -2 * 1.1 / 3
    new.requires_grad_(True)
    rl.policy_loss(new, old, advantages, padding_mask, 0.2)[0].backward()
    assert close(new.grad, [[0.0, 0.0, -2 * 1.1 / 3]])
    # padding counts for nothing, whatever its values
    loss_padded, _ = rl.policy_loss(torch.log(T([[1.5, 0.5, 1.1, 9.0]])), torch.zeros(1, 4),
                                    T([[1.0, -1.0, 2.0, 100.0]]), T([[False, False, False, True]]), 0.2)
    assert loss_padded.item() == pytest.approx(loss.item())


def test_clipped_value_loss_by_hand():
    old, new, returns = T([[0.0, 0.0]]), T([[0.5, -0.1]]), T([[1.0, 1.0]])
    loss, stats = rl.value_loss(new, old, returns, torch.zeros(1, 2, dtype=torch.bool), cliprange_value=0.2)
    # token 0: clip(0.5) = 0.2: max((0.5-1)^2 = 0.25, (0.2-1)^2 = 0.64) = 0.64 (clipped loss wins)
    # token 1: -0.1 is inside +-0.2: (-1.1)^2 = 1.21 both ways
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21) / 2)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_explained_variance():
    returns = T([[1.0, 2.0, 3.0, 4.0]])
    keep_all = torch.zeros(1, 4, dtype=torch.bool)
    assert rl.explained_variance(returns, returns, keep_all) == pytest.approx(1.0)
    # a constant critic at the mean explains nothing
    assert rl.explained_variance(torch.full((1, 4), 2.5), returns, keep_all) == pytest.approx(0.0)
    # residuals 1, 0, 0, -1: Var = 0.5 vs Var(returns) = 1.25 -> 1 - 0.4 = 0.6
    assert rl.explained_variance(T([[0.0, 2.0, 3.0, 5.0]]), returns, keep_all) == pytest.approx(0.6)


def test_adaptive_kl_controller_follows_ziegler():
    fixed = rl.KLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.value == 0.1
    ctl = rl.KLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 64)  # error 12/6 - 1 = 1, clipped to 0.2: x (1 + 0.2 * 64 / 10000)
    assert ctl.value == pytest.approx(0.1 * 1.00128)
    ctl.update(5.4, 1000)  # error 5.4/6 - 1 = -0.1: x (1 - 0.1 * 0.1)
    assert ctl.value == pytest.approx(0.1 * 1.00128 * 0.99)


def test_running_moments_match_the_moments_of_everything_seen():
    moments = rl.RunningMoments()
    moments.update(T([1.0, 2.0, 3.0]))
    moments.update(T([4.0, 5.0]))
    # 1..5: mean 3, population variance (4 + 1 + 0 + 1 + 4) / 5 = 2
    assert (moments.mean, moments.var, moments.count) == pytest.approx((3.0, 2.0, 5))
    assert moments.normalise(T([3.0, 5.0])).tolist() == pytest.approx([0.0, 2 / math.sqrt(2)], abs=1e-6)
