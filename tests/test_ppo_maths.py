"""PPO maths (ALGORITHMS.md §6, UP-RLHF's KL loss §3a/§3e): hand values for KL rewards, GAE, clipped losses and the
KL controllers, so alignpipe's hand-written PPO loop rests on tested pieces."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alignpipe.losses.ppo import (
    KL_PENALTY_KINDS,
    AdaptiveKLController,
    FixedKLController,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty_rewards,
    masked_mean,
    masked_moments,
    masked_var,
    masked_whiten,
    squared_log_ratio_loss,
    token_rewards,
    whiten_from_moments,
)

torch.set_num_threads(1)


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def close(actual: torch.Tensor, expected, atol: float = 1e-9) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# --------------------------------------------------------------------------------------------------------------------
# Masked reductions
# --------------------------------------------------------------------------------------------------------------------

def test_masked_mean_ignores_padding_and_rejects_empty_masks():
    x = t([1.0, 2.0, 100.0], [3.0, -50.0, -50.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    close(masked_mean(x, mask), 2.0)  # (1 + 2 + 3) / 3: every token counts once
    close(masked_mean(x, mask, dim=1), [1.5, 3.0])
    with pytest.raises(ValueError, match="empty mask"):
        masked_mean(x, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="some rows are all padding"):
        masked_mean(x, torch.tensor([[1, 1, 0], [0, 0, 0]]), dim=1)
    with pytest.raises(ValueError, match="does not match"):
        masked_mean(x, mask[:, :2])


def test_masked_var_and_whiten():
    x = t([1.0, 2.0, 3.0, 1e6])
    mask = t([1, 1, 1, 0])
    close(masked_var(x, mask), 1.0)  # unbiased (trl/trlx whiten)
    close(masked_var(x, mask, unbiased=False), 2.0 / 3.0)
    w = masked_whiten(x, mask)
    close(w, [[-1.0, 0.0, 1.0, 0.0]], atol=1e-7)  # masked position is 0, not a huge negative number
    w = masked_whiten(x, mask, shift_mean=False)
    close(w, [[1.0, 2.0, 3.0, 0.0]], atol=1e-7)  # scale normalised (var was 1), mean kept
    close(masked_whiten(t(5.0, 5.0, 5.0), t(1, 1, 1)), [0.0, 0.0, 0.0])  # constant batch: finite, 0
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(t(1.0, 2.0), t(1, 0))


def test_whiten_from_moments_hand_values_with_and_without_the_mean():
    x = t([1.0, 2.0, 3.0], [4.0, 100.0, 6.0])
    mask = t([1, 1, 1], [1, 0, 1])
    # unmasked 1, 2, 3, 4, 6: mean 3.2, Σ dev² = 14.8, unbiased var 14.8 / 4 = 3.7, sd 1.92354
    expected = [[-1.14373, -0.62385, -0.10398], [0.41590, 0.0, 1.45565]]  # (x − 3.2) / 1.92354; masked -> 0
    w = whiten_from_moments(x, mask, masked_moments(x, mask))
    close(w, expected, atol=1e-5)
    close(w, masked_whiten(x, mask), atol=1e-12)
    # shift_mean=False adds the mean back: (x − 3.2) / 1.92354 + 3.2; the masked position stays 0
    w = whiten_from_moments(x, mask, masked_moments(x, mask), shift_mean=False)
    close(w, [[2.05627, 2.57615, 3.09602], [3.61590, 0.0, 4.65565]], atol=1e-5)
    close(w, masked_whiten(x, mask, shift_mean=False), atol=1e-12)


def test_the_global_batch_statistics_of_float32_data_far_from_zero_whiten_as_one_process_does():
    """Float32 scores around 100 with spread 0.01 (a reward model's offset is arbitrary): the data-parallel path
    (moments summed over ranks) must whiten as the one-process path does. Summed in float32, Σx²/n − mean² cancelled
    away and the whitened values were off by about 2."""
    generator = torch.Generator().manual_seed(0)
    x = (100 + 0.01 * torch.randn(4, 64, generator=generator)).float()
    mask = torch.ones_like(x)
    mask[:, 50:] = 0
    halves = masked_moments(x[:2], mask[:2]) + masked_moments(x[2:], mask[2:])  # two ranks' moments, all-reduced
    assert halves.dtype == torch.float64
    one_process = masked_whiten(x.double(), mask.double())
    close(whiten_from_moments(x, mask, halves), one_process, atol=1e-3)


def test_a_non_finite_value_in_a_padding_slot_never_reaches_a_real_token():
    """inf * 0 is NaN: masking by multiplication let a padding slot's inf (an overflowed value, a k3 estimate of a
    log-ratio below -88) turn every real token's advantage into NaN through GAE's backward pass."""
    mask = t([1, 1, 0])
    rewards, finite = t([0.0, 1.0, 0.0]), t([0.2, 0.5, 0.0])
    expected = gae(rewards, finite, mask, 1.0, 0.95)
    for bad in (math.inf, -math.inf, math.nan):
        advantages, returns = gae(rewards, t([0.2, 0.5, bad]), mask, 1.0, 0.95)
        close(advantages, expected[0], atol=0)
        close(returns, expected[1], atol=0)
        assert masked_mean(t([1.0, 3.0, bad]), mask).item() == 2.0
        close(token_rewards(t(1.0), t([0.0, 0.0, bad]), mask), [[0.0, 1.0, 0.0]], atol=0)
    kl = kl_penalty_rewards(t([-1.0, -1.0, -100.0]).float(), t([-1.0, -1.2, 0.0]).float(), mask.float(), 0.1,
                            kind="k3")  # padding: expm1(100) overflows float32
    assert torch.isfinite(kl).all() and kl[0, 2] == 0
    advantages, _ = gae(token_rewards(torch.tensor([1.0]), kl, mask.float()), torch.zeros(1, 3), mask.float(), 1.0,
                        0.95)
    assert torch.isfinite(advantages).all()


# --------------------------------------------------------------------------------------------------------------------
# KL rewards and token rewards
# --------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KL_PENALTY_KINDS)
def test_kl_reward_is_zero_when_policy_equals_reference(kind):
    logp = -torch.rand(3, 5, dtype=torch.float64) * 4
    mask = torch.ones(3, 5)
    out = kl_penalty_rewards(logp, logp.clone(), mask, kl_coef=0.1, kind=kind)
    assert torch.equal(out, torch.zeros_like(out))


def test_kl_reward_hand_values():
    logp_old = t([-1.0, -2.0, -3.0])
    logp_ref = t([-1.5, -1.0, 7.0])  # last token is padding
    mask = t([1, 1, 0])
    # l = log π_old − log π_ref = [0.5, −1.0]; β = 0.1
    close(kl_penalty_rewards(logp_old, logp_ref, mask, 0.1), [[-0.05, 0.1, 0.0]])  # k1 = l: can be a bonus
    k3 = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0]  # (e^{−l} − 1) + l = [0.10653066, 0.71828183]
    close(kl_penalty_rewards(logp_old, logp_ref, mask, 0.1, kind="k3"), [[-0.1 * k3[0], -0.1 * k3[1], 0.0]])
    assert k3[0] == pytest.approx(0.10653066) and k3[1] == pytest.approx(0.71828183)
    close(kl_penalty_rewards(logp_old, logp_ref, mask, 0.1, kind="abs"), [[-0.05, -0.1, 0.0]])
    close(kl_penalty_rewards(logp_old, logp_ref, mask, 0.1, kind="mse"), [[-0.0125, -0.05, 0.0]])
    with pytest.raises(ValueError, match="unknown KL penalty kind"):
        kl_penalty_rewards(logp_old, logp_ref, mask, 0.1, kind="k2")
    with pytest.raises(ValueError, match="kl_coef"):
        kl_penalty_rewards(logp_old, logp_ref, mask, -0.1)


def test_token_rewards_put_the_score_on_the_last_unmasked_token():
    kl = t([0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [0.0, 0.5, 0.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 1, 0]])
    out = token_rewards(t(2.0, 3.0, -1.0), kl, mask)
    close(out, [[0.1, 0.2, 2.3], [0.1, 3.2, 0.0], [0.0, -0.5, 0.0]])
    with pytest.raises(ValueError, match=r"rows \[1\] have no unmasked token"):
        token_rewards(t(2.0, 3.0), kl[:2], torch.tensor([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match="scores must have shape"):
        token_rewards(t(2.0), kl, mask)


# --------------------------------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------------------------------

def test_gae_hand_values():
    # §6e: δ = [0.1, 0.1, 0.3]; A_2 = 0.3, A_1 = 0.1 + 0.95·0.3, A_0 = 0.1 + 0.95·0.385
    adv, ret = gae(t([0.0, 0.0, 1.0]), t([0.5, 0.6, 0.7]), t([1, 1, 1]), gamma=1.0, lam=0.95)
    close(adv, [[0.46575, 0.385, 0.3]], atol=1e-12)
    close(ret, [[0.96575, 0.985, 1.0]], atol=1e-12)


def test_gae_padded_batch_matches_unpadded_rows():
    rewards = t([0.0, 0.0, 1.0], [0.0, 1.0, 5.0], [9.0, 0.0, 1.0])
    values = t([0.5, 0.6, 0.7], [0.5, 0.6, 9.9], [9.9, 0.6, 0.7])  # padding holds garbage
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)  # right- and left-padded rows
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 1: δ = [0.1, 1 − 0.6], V after its last token = 0 (not the padding's 9.9)
    close(adv[1], [0.1 + 0.95 * 0.4, 0.4, 0.0], atol=1e-12)
    close(ret[1], [0.98, 1.0, 0.0], atol=1e-12)
    # row 2 is rows 0's last two steps
    close(adv[2], [0.0, 0.385, 0.3], atol=1e-12)
    close(ret[2], [0.0, 0.985, 1.0], atol=1e-12)
    close(adv[0], [0.46575, 0.385, 0.3], atol=1e-12)


def test_gae_matches_the_definition_for_gamma_below_one():
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(1, 6, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 6, generator=gen, dtype=torch.float64)
    gamma, lam = 0.9, 0.8
    adv, ret = gae(r, v, torch.ones(1, 6), gamma, lam)
    v_next = torch.cat([v[0, 1:], torch.zeros(1, dtype=torch.float64)])
    delta = r[0] + gamma * v_next - v[0]
    expected = [sum((gamma * lam) ** k * delta[s + k] for k in range(6 - s)) for s in range(6)]
    close(adv[0], torch.stack(expected), atol=1e-12)
    close(ret, adv + v, atol=1e-12)


def test_gae_rejects_masks_with_holes_and_bad_discounts():
    with pytest.raises(ValueError, match=r"rows \[0\] have holes"):
        gae(t([1.0, 0.0, 1.0]), t([0.0, 0.0, 0.0]), t([1, 0, 1]), 1.0, 0.95)
    with pytest.raises(ValueError, match="gamma"):
        gae(t([1.0]), t([0.0]), t([1]), 1.5, 0.95)
    with pytest.raises(ValueError, match="shapes must match"):
        gae(t([1.0, 2.0]), t([0.0]), t([1]), 1.0, 0.95)


# --------------------------------------------------------------------------------------------------------------------
# Clipped losses
# --------------------------------------------------------------------------------------------------------------------

def _policy_case(ratio: float, advantage: float):
    logp_old = t([-1.0])
    logp = (logp_old + math.log(ratio)).clone().requires_grad_(True)
    loss, stats = clipped_policy_loss(logp, logp_old, t([advantage]), t([1]), clip_eps=0.2)
    loss.backward()
    return loss.item(), logp.grad.item(), stats


def test_policy_loss_clipped_side_has_zero_gradient():
    loss, grad, stats = _policy_case(1.5, +1.0)  # §6e: min(1.5, 1.2)·1 → −1.2, and the clip kills the gradient
    assert loss == pytest.approx(-1.2, abs=1e-12)
    assert grad == 0.0
    assert stats["clip_fraction"].item() == 1.0
    assert stats["approx_kl"].item() == pytest.approx(0.5 - math.log(1.5), abs=1e-12)  # k3 = (ρ − 1) − log ρ
    loss, grad, _ = _policy_case(0.5, -1.0)  # mirror image: clip(0.5) = 0.8 is worse for A < 0 → taken, no gradient
    assert loss == pytest.approx(0.8, abs=1e-12) and grad == 0.0


def test_policy_loss_unclipped_side_keeps_its_gradient():
    loss, grad, stats = _policy_case(0.5, +1.0)  # §6e: min(0.5, 0.8) = 0.5 → −0.5, gradient −A·ρ = −0.5
    assert loss == pytest.approx(-0.5, abs=1e-12)
    assert grad == pytest.approx(-0.5, abs=1e-12)
    assert stats["clip_fraction"].item() == 0.0
    loss, grad, _ = _policy_case(1.5, -1.0)
    assert loss == pytest.approx(1.5, abs=1e-12) and grad == pytest.approx(1.5, abs=1e-12)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage_and_ignores_padding():
    logp = t([-1.0, -2.0, -3.0])
    loss, stats = clipped_policy_loss(logp, logp.clone(), t([1.0, 3.0, 100.0]), t([1, 1, 0]), clip_eps=0.2)
    close(loss, -2.0)
    assert stats["approx_kl"].item() == 0.0 and stats["ratio_mean"].item() == 1.0
    assert stats["clip_fraction"].item() == 0.0  # clipped == unclipped at ratio 1: not counted as clipped
    with pytest.raises(ValueError, match="clip_eps"):
        clipped_policy_loss(logp, logp, logp, t([1, 1, 1]), clip_eps=0.0)


def test_value_loss_hand_values():
    values = t([1.0, 1.0, 3.0]).requires_grad_(True)
    values_old = t([0.5, 0.5, 0.0])
    returns = t([2.0, 0.0, 0.0])
    # pos 0: (1 − 2)² = 1 vs clip → 0.7: (0.7 − 2)² = 1.69 → 1.69 (clipped branch, no gradient)
    # pos 1: (1 − 0)² = 1 vs (0.7 − 0)² = 0.49 → 1 (unclipped, gradient 2·(1 − 0))
    loss, stats = clipped_value_loss(values, values_old, returns, t([1, 1, 0]), clip_eps_value=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0) / 2, abs=1e-12)  # 0.6725
    assert stats["clip_fraction"].item() == 0.5
    loss.backward()
    close(values.grad, [[0.0, 0.5, 0.0]], atol=1e-12)  # 0.5 · (1/2) · 2(V − G)


# --------------------------------------------------------------------------------------------------------------------
# UP-RLHF squared-log-ratio KL loss (§3a eq. 15, §3e)
# --------------------------------------------------------------------------------------------------------------------

def test_squared_log_ratio_is_zero_with_zero_gradient_at_the_reference():
    logp_ref = -torch.rand(2, 4, dtype=torch.float64)
    logp = logp_ref.clone().requires_grad_(True)
    for level in ("sequence", "token"):
        loss = squared_log_ratio_loss(logp, logp_ref, torch.ones(2, 4), level=level)
        (grad,) = torch.autograd.grad(loss, logp)
        assert loss.item() == 0.0
        assert torch.equal(grad, torch.zeros_like(grad))


def test_squared_log_ratio_hand_values_and_gradient_two_delta():
    logp_ref = t([-1.0, -1.0], [-1.0, -1.0])
    logp = (logp_ref + t([0.5, 0.25], [0.1, 9.0])).requires_grad_(True)  # [1, 1] is padding
    mask = t([1, 1], [1, 0])
    # sequence level: Δ = [0.75, 0.1]; mean of Δ² over the 2 sequences; ∂/∂logp_t = 2Δ/B on each of its tokens
    loss = squared_log_ratio_loss(logp, logp_ref, mask)
    assert loss.item() == pytest.approx((0.75**2 + 0.1**2) / 2, abs=1e-12)  # 0.28625
    (grad,) = torch.autograd.grad(loss, logp)
    close(grad, [[0.75, 0.75], [0.1, 0.0]], atol=1e-12)
    # token level: masked mean of Δ_t² over 3 tokens; ∂/∂logp_t = 2Δ_t/3
    loss = squared_log_ratio_loss(logp, logp_ref, mask, level="token")
    assert loss.item() == pytest.approx((0.25 + 0.0625 + 0.01) / 3, abs=1e-12)  # 0.1075
    (grad,) = torch.autograd.grad(loss, logp)
    close(grad, [[1.0 / 3, 0.5 / 3], [0.2 / 3, 0.0]], atol=1e-12)
    with pytest.raises(ValueError, match="unknown level"):
        squared_log_ratio_loss(logp, logp_ref, mask, level="batch")


# --------------------------------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------------------------------

def test_entropy_from_logits():
    logits = torch.zeros(1, 3, 4)
    logits[0, 1] = torch.tensor([0.0, float("-inf"), float("-inf"), float("-inf")])  # deterministic, banned tokens
    logits[0, 2] = 1e4  # padding position, ignored
    mask = torch.tensor([[1, 1, 0]])
    ent = entropy_from_logits(logits, mask)
    assert torch.isfinite(ent)
    assert ent.item() == pytest.approx(math.log(4) / 2, abs=1e-6)  # uniform: log 4; one-hot: 0
    assert entropy_from_logits(logits.bfloat16(), mask).dtype == torch.float32
    with pytest.raises(ValueError, match="vocab dim"):
        entropy_from_logits(logits, mask[:, :2])


def test_explained_variance():
    returns = t([1.0, 2.0, 3.0, 50.0])
    mask = t([1, 1, 1, 0])
    close(explained_variance(returns.clone(), returns, mask), 1.0)
    close(explained_variance(torch.full_like(returns, 2.0), returns, mask), 0.0)  # predicting the mean
    close(explained_variance(t([3.0, 2.0, 1.0, 0.0]), returns, mask), -3.0)  # residual var 8/3 vs 2/3
    assert math.isnan(explained_variance(returns, t([2.0, 2.0, 2.0, 0.0]), mask).item())


# --------------------------------------------------------------------------------------------------------------------
# KL controllers
# --------------------------------------------------------------------------------------------------------------------

def test_adaptive_kl_controller_hand_values():
    ctl = AdaptiveKLController(0.1, target=6, horizon=10000)
    assert ctl.update(9.0, n_steps=256) == pytest.approx(0.100512, abs=1e-12)  # e = clip(0.5) = 0.2
    ctl = AdaptiveKLController(0.1, target=6, horizon=10000)
    assert ctl.update(6.0, n_steps=256) == 0.1  # KL = target: unchanged
    assert ctl.update(3.0, n_steps=256) == pytest.approx(0.1 * (1 - 0.2 * 256 / 10000), abs=1e-12)  # e = −0.2
    assert ctl.update(6.3, n_steps=0) == ctl.value  # no samples, no step
    with pytest.raises(ValueError, match="finite"):
        ctl.update(float("nan"), 256)
    with pytest.raises(ValueError, match="n_steps"):
        ctl.update(6.0, -1)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0, horizon=10000)


def test_kl_controllers_resume_from_state_dict():
    ctl = AdaptiveKLController(0.1, target=6, horizon=10000)
    for kl in (9.0, 12.0, 4.0):
        ctl.update(kl, 256)
    state = json.loads(json.dumps(ctl.state_dict()))  # plain, JSON-friendly
    resumed = AdaptiveKLController(0.1, target=6, horizon=10000)
    resumed.load_state_dict(state)
    assert resumed.value == ctl.value
    assert resumed.update(7.0, 256) == ctl.update(7.0, 256)
    with pytest.raises(ValueError, match="target=6"):
        AdaptiveKLController(0.1, target=3, horizon=10000).load_state_dict(state)
    with pytest.raises(ValueError, match="'fixed'"):
        FixedKLController(0.05).load_state_dict(state)

    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 256) == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({"type": "fixed"})


def test_sequence_scores_penalise_normalise_then_clip():
    """§6a: clip(R) with R optionally whitened; the missing-EOS penalty is part of R, so the clip bounds it too."""
    from alignpipe.losses.ppo import sequence_scores

    reward, truncated = torch.tensor([12.0, 0.5, -9.5]), torch.tensor([0.0, 1.0, 1.0])
    plain = sequence_scores(reward, truncated, clip=10.0, missing_eos_penalty=1.0)
    assert plain.tolist() == [10.0, -0.5, -10.0]  # -9.5 - 1 is clipped, not left at -10.5
    assert sequence_scores(reward, truncated, clip=10.0).tolist() == [10.0, 0.5, -9.5]
    seen = []

    def normalise(x):
        seen.append(x.clone())
        return x * 4.0

    scaled = sequence_scores(reward, truncated, clip=10.0, missing_eos_penalty=1.0, normalise=normalise)
    assert seen[0].tolist() == [12.0, -0.5, -10.5]  # normalised before clipping: it sees the unclipped scores
    assert scaled.tolist() == [10.0, -2.0, -10.0]  # and whatever it returns is bounded by the clip


def test_value_loss_at_unchanged_values_clips_nothing():
    # V = V_old = [1, 2], G = [0, 0]: both branches equal -> clip_fraction 0; loss 0.5·(1² + 2²)/2 = 1.25
    values = t(1.0, 2.0)
    loss, stats = clipped_value_loss(values, values.clone(), t(0.0, 0.0), t(1, 1), 0.2)
    close(loss, 1.25)
    assert stats["clip_fraction"].item() == 0.0
