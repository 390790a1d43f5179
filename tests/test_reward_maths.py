"""Reward-model maths: Bradley–Terry losses, UP-RLHF's nuclear/Frobenius diversity term (ALGORITHMS.md §3a, §3e),
and ensemble reward penalties (UP-RLHF's running-mean-centred std, Coste et al.'s WCO / UWO, §16). Hand values."""

from __future__ import annotations

import math

import pytest
import torch

from alignpipe.losses.reward import (
    bradley_terry_loss,
    diversity_loss,
    ensemble_bradley_terry_loss,
    nuclear_frobenius_ratio,
    stack_lora_down_projections,
)
from alignpipe.rewards.penalties import EnsembleRewards, RunningMean, penalised_rewards

LOG2 = math.log(2.0)  # −log σ(0)
NEG_LOGSIG_1 = 0.313262  # −log σ(1) = log(1 + e^{−1})
SQRT2 = math.sqrt(2.0)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------------------------
# Bradley–Terry
# --------------------------------------------------------------------------------------------------------------------

def test_bt_hand_values():
    assert bradley_terry_loss(t(0.5), t(0.5)).item() == pytest.approx(LOG2, abs=1e-12)
    assert bradley_terry_loss(t(2.0), t(1.0)).item() == pytest.approx(NEG_LOGSIG_1, abs=1e-6)
    # mean over pairs: Δ = [0, 1]
    assert bradley_terry_loss(t(0.0, 1.0), t(0.0, 0.0)).item() == pytest.approx((LOG2 + NEG_LOGSIG_1) / 2, abs=1e-6)


def test_bt_is_stable_for_huge_margins():
    loss = bradley_terry_loss(torch.tensor([-500.0]), torch.tensor([500.0]))
    assert torch.isfinite(loss) and loss.item() == pytest.approx(1000.0)


def test_bt_margin_shifts_the_logit():
    # Δ = 1 minus margin 1 → log 2; Δ = 1.5 minus margin 0.5 → −log σ(1)
    assert bradley_terry_loss(t(1.0), t(0.0), margin=t(1.0)).item() == pytest.approx(LOG2, abs=1e-12)
    assert bradley_terry_loss(t(1.5, 1.5), t(0.0, 0.0), margin=t(0.5)).item() == pytest.approx(NEG_LOGSIG_1, abs=1e-6)
    # per-pair margins
    loss = bradley_terry_loss(t(1.0, 1.0), t(0.0, 0.0), margin=t(1.0, 0.0))
    assert loss.item() == pytest.approx((LOG2 + NEG_LOGSIG_1) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="margin"):
        bradley_terry_loss(t(1.0, 1.0), t(0.0, 0.0), margin=t(1.0, 0.0, 2.0))


def test_bt_weights_are_normalised():
    chosen, rejected = t(0.0, 1.0), t(0.0, 0.0)
    # (3·log 2 + 1·0.313262) / 4
    assert bradley_terry_loss(chosen, rejected, weight=t(3.0, 1.0)).item() == pytest.approx(0.598176, abs=1e-6)
    assert bradley_terry_loss(chosen, rejected, weight=t(1.0, 0.0)).item() == pytest.approx(LOG2, abs=1e-12)
    # scale of the weights does not matter; equal weights = unweighted
    assert bradley_terry_loss(chosen, rejected, weight=t(7.0, 7.0)).item() == pytest.approx(
        bradley_terry_loss(chosen, rejected).item(), abs=1e-12)
    for bad in (t(-1.0, 2.0), t(0.0, 0.0), t(1.0), t(float("nan"), 1.0)):
        with pytest.raises(ValueError):
            bradley_terry_loss(chosen, rejected, weight=bad)


def test_bt_gradient_sign_and_value():
    chosen = t(1.0, 3.0).requires_grad_()
    rejected = t(0.0, 0.0).requires_grad_()
    bradley_terry_loss(chosen, rejected).backward()
    expected = torch.sigmoid(-t(1.0, 3.0)) / 2  # ∂L/∂r_c = −σ(−Δ)/N
    assert torch.allclose(chosen.grad, -expected)
    assert torch.allclose(rejected.grad, expected)
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # descent raises r_c, lowers r_r


def test_bt_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        bradley_terry_loss(t(1.0, 2.0), t(1.0))
    with pytest.raises(ValueError, match="empty"):
        bradley_terry_loss(torch.zeros(0), torch.zeros(0))


def test_bt_upcasts_bf16():
    loss = bradley_terry_loss(torch.tensor([2.0], dtype=torch.bfloat16), torch.tensor([1.0], dtype=torch.bfloat16))
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(NEG_LOGSIG_1, abs=1e-6)


def test_ensemble_bt_uses_member_mean():
    # members' means: chosen 2, rejected 1 → Δ = 1 → −log σ(1). Averaging the per-member losses instead
    # would give (−log σ(−1) − log σ(3)) / 2 = 0.680924.
    chosen, rejected = t(1.0, 3.0).reshape(1, 2), t(2.0, 0.0).reshape(1, 2)
    loss = ensemble_bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx(NEG_LOGSIG_1, abs=1e-6)
    per_member_mean = bradley_terry_loss(chosen, rejected).item()
    assert per_member_mean == pytest.approx(0.680924, abs=1e-6)
    # K = 1 reduces to plain BT
    c, r = torch.randn(5, 1, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    assert ensemble_bradley_terry_loss(c, r).item() == pytest.approx(bradley_terry_loss(c[:, 0], r[:, 0]).item())
    with pytest.raises(ValueError, match=r"\[N pairs, K members\]"):
        ensemble_bradley_terry_loss(t(1.0, 2.0), t(1.0, 2.0))


def test_ensemble_bt_gradient_is_shared_equally_by_members():
    chosen = t(1.0, 3.0).reshape(1, 2).requires_grad_()
    ensemble_bradley_terry_loss(chosen, t(2.0, 0.0).reshape(1, 2)).backward()
    expected = -torch.sigmoid(torch.tensor(-1.0, dtype=torch.float64)) / 2  # ∂r̄/∂r_k = 1/K
    assert torch.allclose(chosen.grad, torch.full((1, 2), expected.item(), dtype=torch.float64))


# --------------------------------------------------------------------------------------------------------------------
# Nuclear / Frobenius diversity (§3e)
# --------------------------------------------------------------------------------------------------------------------

def test_ratio_hand_cases():
    same = stack_lora_down_projections([t(1.0, 0.0).reshape(1, 2), t(1.0, 0.0).reshape(1, 2)])
    assert same.tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert nuclear_frobenius_ratio(same).item() == pytest.approx(1.0, abs=1e-6)
    orth = stack_lora_down_projections([t(1.0, 0.0).reshape(1, 2), t(0.0, 1.0).reshape(1, 2)])
    assert orth.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert nuclear_frobenius_ratio(orth).item() == pytest.approx(SQRT2, abs=1e-6)


def test_ratio_scale_invariant_and_float32():
    a = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
    base = nuclear_frobenius_ratio(a)
    for c in (1e-3, 0.5, 7.0, 1e3):
        assert nuclear_frobenius_ratio(c * a).item() == pytest.approx(base.item(), rel=1e-5)
    assert nuclear_frobenius_ratio(a.to(torch.bfloat16)).dtype == torch.float32


@pytest.mark.parametrize("seed", range(5))
def test_ratio_bounds_on_random_matrices(seed):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(8, 5, generator=g, dtype=torch.float64)
    low_rank = torch.randn(12, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 9, generator=g,
                                                                                   dtype=torch.float64)
    for a in (full, low_rank, full.T):
        rank = torch.linalg.matrix_rank(a).item()
        ratio = nuclear_frobenius_ratio(a).item()
        assert 1.0 - 1e-9 <= ratio <= math.sqrt(rank) + 1e-9
        assert ratio > 1.0 + 1e-3  # random matrices are far from rank one
    assert torch.linalg.matrix_rank(low_rank).item() == 3


def test_ratio_rejects_zero_and_malformed():
    with pytest.raises(ValueError, match="all zeros"):
        nuclear_frobenius_ratio(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="non-finite"):
        nuclear_frobenius_ratio(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="2-D"):
        nuclear_frobenius_ratio(torch.ones(3))


def test_stack_checks_shapes():
    with pytest.raises(ValueError, match="share one"):
        stack_lora_down_projections([torch.ones(2, 4), torch.ones(2, 5)])
    with pytest.raises(ValueError, match="share one"):
        stack_lora_down_projections([torch.ones(2, 4), torch.ones(3, 4)])
    with pytest.raises(ValueError, match="none"):
        stack_lora_down_projections([])
    assert stack_lora_down_projections([torch.ones(2, 4)] * 3).shape == (6, 4)


def test_diversity_loss_hand_value():
    e1, e2 = t(1.0, 0.0).reshape(1, 2), t(0.0, 1.0).reshape(1, 2)
    # matrix 1: identical members (ratio 1); matrix 2: orthogonal members (ratio √2); λ = 0.5
    loss = diversity_loss([[e1, e1], [e1, e2]], 0.5)
    assert loss.item() == pytest.approx(-0.5 * (1.0 + SQRT2) / 2, abs=1e-6)  # −0.603553


def test_diversity_gradient_flows_to_a_only_and_increases_the_ratio():
    g = torch.Generator().manual_seed(0)
    n_members, r, d, d_out = 3, 2, 8, 4
    a_mats = [torch.nn.Parameter(0.3 * torch.randn(r, d, generator=g)) for _ in range(n_members)]
    b_mats = [torch.nn.Parameter(0.1 * torch.randn(d_out, r, generator=g)) for _ in range(n_members)]
    head = torch.randn(d_out, generator=g)
    x_c, x_r = torch.randn(5, d, generator=g), torch.randn(5, d, generator=g)

    def member_rewards(x):  # each member's toy LoRA reward: head · B_n A_n x
        return torch.stack([(x @ a.T @ b.T) @ head for a, b in zip(a_mats, b_mats)], dim=1)

    def grads(lam):
        for p in (*a_mats, *b_mats):
            p.grad = None
        loss = ensemble_bradley_terry_loss(member_rewards(x_c), member_rewards(x_r)) + diversity_loss([a_mats], lam)
        loss.backward()
        return [a.grad.clone() for a in a_mats], [b.grad.clone() for b in b_mats]

    a_plain, b_plain = grads(0.0)
    a_div, b_div = grads(1.0)
    for bp, bd in zip(b_plain, b_div):  # the diversity term never reaches B
        assert torch.equal(bp, bd)
    assert any(not torch.allclose(ap, ad) for ap, ad in zip(a_plain, a_div))

    # the diversity gradient alone: nonzero, orthogonal to A (scale invariance: the Frobenius norm is not
    # detached), and a descent step raises the ratio.
    for a in a_mats:
        a.grad = None
    loss = diversity_loss([a_mats], 1.0)
    loss.backward()
    stacked_grad = torch.cat([a.grad for a in a_mats])
    stacked = torch.cat([a.detach() for a in a_mats])
    assert stacked_grad.norm() > 1e-3
    assert abs(torch.sum(stacked_grad * stacked).item()) < 1e-5 * stacked_grad.norm().item() * stacked.norm().item()
    before = nuclear_frobenius_ratio(stacked).item()
    after = nuclear_frobenius_ratio(stacked - 0.05 * stacked_grad).item()
    assert after > before


def test_nnm_form_hand_values_and_gradient_grows_a():
    """form="nnm": ||A||_* / sg(||A||_F) · sqrt(max(shape)). Hand values on the §3e matrices, λ = 0.5.

    I_2 (orthogonal members): 2 / √2 · √2 = 2, and the gradient of ||A||_* is U Vᵀ = I_2, scaled by
    sqrt(max shape) / ||A||_F = 1. (Rank-deficient stacks are avoided: there ||A||_* has only a subgradient.)"""
    e1 = torch.tensor([[1.0, 0.0]], requires_grad=True)
    e2 = torch.tensor([[0.0, 1.0]], requires_grad=True)
    loss = diversity_loss([[e1, e2]], 0.5, form="nnm")
    assert loss.item() == pytest.approx(-1.0, abs=1e-6)
    loss.backward()
    assert torch.allclose(e1.grad, torch.tensor([[-0.5, 0.0]]), atol=1e-6)
    assert torch.allclose(e2.grad, torch.tensor([[0.0, -0.5]]), atol=1e-6)

    a1 = torch.tensor([[2.0, 0.0]], requires_grad=True)  # diag(2, 1): ||A||_* = 3, ||A||_F = √5
    a2 = torch.tensor([[0.0, 1.0]], requires_grad=True)
    loss = diversity_loss([[a1, a2]], 0.5, form="nnm")
    assert loss.item() == pytest.approx(-0.5 * 3 / math.sqrt(5) * SQRT2, abs=1e-6)  # −0.948683
    loss.backward()  # U Vᵀ = I, times √2/√5: the same push on both members' directions whatever their size
    assert torch.allclose(a1.grad, torch.tensor([[-0.5 * math.sqrt(0.4), 0.0]]), atol=1e-6)
    assert torch.allclose(a2.grad, torch.tensor([[0.0, -0.5 * math.sqrt(0.4)]]), atol=1e-6)

    # unlike the ratio, a descent step grows A (the gradient has a component along A), and both forms agree on the
    # value up to the sqrt(max shape) factor
    g = torch.Generator().manual_seed(0)
    mats = [torch.nn.Parameter(torch.randn(2, 8, generator=g)) for _ in range(3)]
    ratio = diversity_loss([mats], 1.0, form="ratio").item()
    nnm = diversity_loss([mats], 1.0, form="nnm")
    assert nnm.item() == pytest.approx(ratio * math.sqrt(8), rel=1e-5)
    nnm.backward()
    stacked = torch.cat([m.detach() for m in mats])
    stepped = stacked - 0.05 * torch.cat([m.grad for m in mats])
    assert stepped.norm() > stacked.norm() * 1.001
    with pytest.raises(ValueError, match="diversity form"):
        diversity_loss([mats], 1.0, form="nuclear")


def test_diversity_lambda_zero_is_exact_zero_without_svd(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("no SVD at lambda = 0")

    monkeypatch.setattr(torch.linalg, "svdvals", boom)
    a = torch.zeros(2, 4, requires_grad=True)  # would be 0/0 if the ratio were evaluated
    loss = diversity_loss([[a, a]], 0.0)
    assert loss.item() == 0.0 and not loss.requires_grad and loss.dtype == torch.float32
    with pytest.raises(ValueError, match="share one"):  # shapes still checked
        diversity_loss([[torch.ones(2, 4), torch.ones(2, 5)]], 0.0)


def test_diversity_bad_arguments():
    with pytest.raises(ValueError, match="lambda"):
        diversity_loss([[torch.ones(1, 2)]], -0.1)
    with pytest.raises(ValueError, match="M >= 1"):
        diversity_loss([], 0.1)


# --------------------------------------------------------------------------------------------------------------------
# Running mean
# --------------------------------------------------------------------------------------------------------------------

def test_running_mean_is_incremental_not_ema():
    rm = RunningMean()
    assert rm.update([0.1]) == pytest.approx(0.1)
    assert rm.update(torch.tensor([0.3])) == pytest.approx(0.2)
    assert rm.count == 2
    assert rm.update([0.2, 0.2, 0.2, 0.2]) == pytest.approx(0.2)  # an EMA would not land on the exact mean
    assert rm.update([]) == pytest.approx(0.2) and rm.count == 6


def test_running_mean_batched_equals_one_at_a_time():
    values = torch.randn(50, generator=torch.Generator().manual_seed(3), dtype=torch.float64).abs()
    one, batched = RunningMean(), RunningMean()
    for v in values.tolist():
        one.update([v])
    for chunk in values.split([7, 1, 20, 22]):
        batched.update(chunk)
    assert one.count == batched.count == 50
    assert one.mean == pytest.approx(batched.mean, abs=1e-12)
    assert batched.mean == pytest.approx(values.mean().item(), abs=1e-12)


def test_running_mean_merges_the_moments_of_other_shares():
    """Ranks pool a step's uncertainties as (count, mean): merging them equals updating with all the values."""
    merged, direct = RunningMean(count=2, mean=0.2), RunningMean(count=2, mean=0.2)
    assert merged.merge(RunningMean(count=3, mean=0.4)) == pytest.approx(0.32)  # (2·0.2 + 3·0.4) / 5
    direct.update([0.3, 0.4, 0.5])
    assert (merged.count, merged.mean) == (direct.count, pytest.approx(direct.mean, abs=1e-15))
    assert merged.merge(RunningMean()) == pytest.approx(0.32) and merged.count == 5  # an empty share changes nothing


def test_running_mean_state_round_trip_and_validation():
    rm = RunningMean()
    rm.update([0.1, 0.3, 0.5])
    restored = RunningMean.from_state_dict(rm.state_dict())
    assert restored == rm
    assert restored.update([0.7]) == rm.update([0.7]) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="missing"):
        RunningMean.from_state_dict({"mean": 0.1})
    with pytest.raises(ValueError):
        RunningMean(count=-1)
    with pytest.raises(ValueError, match="non-finite"):
        RunningMean().update([float("nan")])


# --------------------------------------------------------------------------------------------------------------------
# Penalised rewards (UP-RLHF §3e, WCO / UWO §16)
# --------------------------------------------------------------------------------------------------------------------

UP_RLHF_ROW = [[1.0, 1.2, 0.8, 1.1, 0.9]]


def test_ensemble_statistics_use_population_std():
    ens = EnsembleRewards.from_members(torch.tensor(UP_RLHF_ROW, dtype=torch.float64))
    assert ens.mean.item() == pytest.approx(1.0, abs=1e-12)
    assert ens.std.item() == pytest.approx(math.sqrt(0.02), abs=1e-12)  # 0.14142, not the unbiased 0.15811
    single = EnsembleRewards.from_members(torch.tensor([[3.0], [-1.0]]))  # one member → u ≡ 0
    assert single.std.tolist() == [0.0, 0.0]


def test_up_rlhf_hand_value():
    ens = EnsembleRewards.from_members(torch.tensor(UP_RLHF_ROW, dtype=torch.float64))
    out = penalised_rewards(ens, "mean_minus_std", coef=1.0, u_bar=0.1)  # ū = 0.1 from earlier samples
    assert out.item() == pytest.approx(0.95858, abs=1e-5)  # 1.0 − (0.14142 − 0.1)


def test_up_rlhf_identical_members_get_a_bonus_and_single_member_has_no_uncertainty():
    ens = EnsembleRewards.from_members(torch.full((2, 4), 2.0, dtype=torch.float64))
    out = penalised_rewards(ens, "mean_minus_std", coef=0.5, u_bar=0.1)
    assert out.tolist() == pytest.approx([2.05, 2.05], abs=1e-12)  # r + β_2 ū
    one = EnsembleRewards.from_members(torch.tensor([[1.5], [0.5]], dtype=torch.float64))
    out = penalised_rewards(one, "mean_minus_std", coef=3.0, u_bar=0.2)
    assert out.tolist() == pytest.approx([2.1, 1.1], abs=1e-12)  # u ≡ 0, only the ū offset remains


def test_up_rlhf_needs_a_finite_u_bar():
    ens = EnsembleRewards.from_members(torch.tensor(UP_RLHF_ROW, dtype=torch.float64))
    for bad in (None, math.nan, math.inf):
        with pytest.raises(ValueError, match="finite u_bar"):
            penalised_rewards(ens, "mean_minus_std", coef=1.0, u_bar=bad)


def test_up_rlhf_centre_is_the_mean_of_earlier_values_or_the_first_batch_own():
    running = RunningMean()
    first = torch.tensor([0.0, 1.0], dtype=torch.float64)
    # nothing seen: the batch's own mean, not the initial 0
    assert running.centre(RunningMean.of(first)) == pytest.approx(0.5)
    assert running.count == 0  # centre changes nothing
    running.update(first)
    # later batches: ū from EARLIER values only (0.5), not including this batch's u = 0 (update-first gives 1/3)
    assert running.centre(RunningMean.of(torch.tensor([0.0], dtype=torch.float64))) == pytest.approx(0.5)


def test_up_rlhf_reward_does_not_depend_on_batch_mates():
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 5, generator=g, dtype=torch.float64)
    others = 10 * torch.randn(7, 5, generator=g, dtype=torch.float64)
    alone = penalised_rewards(EnsembleRewards.from_members(sample), "mean_minus_std", coef=2.0,
                              u_bar=0.4)
    batched = penalised_rewards(EnsembleRewards.from_members(torch.cat([sample, others])), "mean_minus_std",
                                coef=2.0, u_bar=0.4)
    assert batched[0].item() == pytest.approx(alone.item(), abs=1e-12)


def test_beta_zero_is_the_mean_reward():
    ens = EnsembleRewards.from_members(torch.randn(6, 5, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(penalised_rewards(ens, "mean_minus_std", coef=0.0, u_bar=0.3), ens.mean)
    assert torch.equal(penalised_rewards(ens, "mean"), ens.mean)


def test_wco_and_uwo_hand_values():
    ens = EnsembleRewards.from_members(torch.tensor([[1.0, 1.2, 0.8], [2.0, 0.0, 1.0]], dtype=torch.float64))
    assert penalised_rewards(ens, "min").tolist() == pytest.approx([0.8, 0.0], abs=1e-12)
    # population variance (np.var, Coste et al.'s BoN code): 0.08/3 = 0.026667 and 2/3
    assert penalised_rewards(ens, "mean_minus_var", coef=1.0).tolist() == pytest.approx(
        [1.0 - 0.08 / 3, 1.0 - 2 / 3], abs=1e-12)
    assert penalised_rewards(ens, "mean_minus_var", coef=0.5).tolist() == pytest.approx([0.986667, 0.666667],
                                                                                        abs=1e-6)
    # ALGORITHMS.md §16's number uses the unbiased variance (torch.var, their PPO code): 1.0 − 0.04 = 0.96
    assert penalised_rewards(ens, "mean_minus_var", coef=1.0, unbiased_var=True)[0].item() == pytest.approx(0.96)


def test_penalty_errors():
    ens = EnsembleRewards.from_members(torch.tensor(UP_RLHF_ROW))
    with pytest.raises(ValueError, match="unknown penalty mode"):
        penalised_rewards(ens, "max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="coef"):
        penalised_rewards(ens, "mean_minus_var", coef=-1.0)
    with pytest.raises(ValueError, match="2 ensemble members"):
        penalised_rewards(EnsembleRewards.from_members(torch.ones(3, 1)), "mean_minus_var", coef=1.0,
                          unbiased_var=True)
    for bad in (torch.ones(3), torch.ones(0, 3), torch.ones(2, 3, dtype=torch.long),
                torch.tensor([[1.0, float("nan")]])):
        with pytest.raises(ValueError):
            EnsembleRewards.from_members(bad)
    with pytest.raises(ValueError, match="shape"):
        EnsembleRewards(per_member=torch.ones(2, 3), mean=torch.ones(3), std=torch.ones(2))


def test_margin_that_would_grow_the_rewards_shape_is_refused():
    # a (2, 1) margin broadcasts with (2,) rewards to (2, 2): not the rewards' shape
    with pytest.raises(ValueError, match="does not broadcast"):
        bradley_terry_loss(t(1.0, 0.0), t(0.0, 0.0), margin=torch.tensor([[0.0], [0.0]], dtype=torch.float64))
