"""Golden tests for alignpipe.evaluation.length_control: closed-form fits, exact parameter recovery, a simulated
verbose model, and pinned fixed-seed values."""

import json
import math

import numpy as np
import pytest

from alignpipe.evaluation.length_control import (
    DEFAULT_L2,
    LengthGLM,
    fit_length_glm,
    lc_gap_warning,
    length_controlled_win_rate,
)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _tanh_std(delta):
    return np.tanh(delta / np.std(delta, ddof=1))


# ------------------------------------------------------------------------------------------- closed-form fits


def test_two_length_groups_closed_form():
    # Five prompts where the model is 100 chars longer and all win with soft preference 0.9, and five where it is
    # 100 chars shorter and all are ties (0.5). With two groups the GLM is saturated: σ(θ + φc) = 0.9 and
    # σ(θ − φc) = 0.5, so θ = (logit 0.9 + logit 0.5)/2 = ln(9)/2 = ln 3 and LC = σ(ln 3) = 3/4. Raw = 0.7.
    prefs = [0.9] * 5 + [0.5] * 5
    ref = [300.0] * 10
    model = [400.0] * 5 + [200.0] * 5
    m = length_controlled_win_rate(prefs, model, ref, l2=0.0, resamples=200)
    assert m.value == pytest.approx(0.75, abs=1e-9)
    assert m.extra["raw_win_rate"] == pytest.approx(0.7)
    assert m.extra["theta"] == pytest.approx(math.log(3.0), abs=1e-9)
    sd = 100.0 * math.sqrt(10 / 9)  # sample sd (ddof=1) of five +100 and five −100; no centring
    assert m.extra["length_scale"] == pytest.approx(sd)
    assert m.extra["phi"] * math.tanh(100.0 / sd) == pytest.approx(math.log(3.0), abs=1e-9)
    assert m.extra["length_collinearity"] == pytest.approx(0.0, abs=1e-12)  # balanced ±Δ: orthogonal to θ
    assert m.extra["prediction_sem"] == 0.0 and "psi" not in m.extra
    assert m.higher_is_better is True and m.n == 10 and m.extra["converged"] == 1


def test_identical_lengths_lc_equals_raw():
    # Δlen ≡ 0: sd = 0, the length term is dropped, and the unpenalised fit gives σ(θ) = mean preference.
    prefs = [1.0, 0.0, 0.5, 1.0, 0.75, 0.25, 1.0, 0.9]
    lens = [120, 40, 300, 80, 95, 10, 500, 33]
    exact = length_controlled_win_rate(prefs, lens, lens, l2=0.0, resamples=200)
    assert exact.value == pytest.approx(np.mean(prefs), abs=1e-12)
    assert exact.extra["phi"] == 0.0 and exact.extra["length_scale"] == 0.0
    assert exact.extra["length_collinearity"] == 0.0
    default = length_controlled_win_rate(prefs, lens, lens, resamples=200)
    assert default.value == pytest.approx(np.mean(prefs), abs=1e-3)  # L2 shrinkage only


def test_exact_recovery_when_soft_labels_follow_the_glm():
    # If every preference equals the GLM's own probability, the true parameters solve the score equations
    # exactly, so the unpenalised fit must return them. This includes the difficulty term.
    rng = np.random.default_rng(3)
    n = 300
    delta = rng.normal(80.0, 150.0, n)
    diff = rng.normal(0.0, 1.0, n)
    theta, phi, psi = 0.3, 1.2, -0.8
    p = _sigmoid(theta + phi * _tanh_std(delta) + psi * diff)
    glm = fit_length_glm(p, delta, diff, l2=0.0)
    assert isinstance(glm, LengthGLM) and glm.converged
    assert (glm.theta, glm.phi, glm.psi) == pytest.approx((theta, phi, psi), abs=1e-8)
    np.testing.assert_allclose(glm.predict(delta, diff), p, atol=1e-9)

    ref = rng.uniform(600.0, 900.0, n)
    m = length_controlled_win_rate(p, ref + delta, ref, diff, l2=0.0, resamples=200)
    assert m.value == pytest.approx(np.mean(_sigmoid(theta + psi * diff)), abs=1e-8)
    assert m.extra["psi"] == pytest.approx(psi, abs=1e-8)
    assert m.extra["prediction_sem"] == pytest.approx(
        np.std(_sigmoid(theta + psi * diff), ddof=1) / math.sqrt(n), rel=1e-6
    )


def test_unpenalised_fit_reproduces_the_raw_win_rate_in_sample():
    # The score equation for the constant column says mean fitted p = mean preference (with l2 = 0).
    rng = np.random.default_rng(4)
    delta = rng.normal(50.0, 100.0, 200)
    prefs = rng.choice([0.0, 0.5, 1.0], size=200, p=[0.3, 0.1, 0.6])
    glm = fit_length_glm(prefs, delta, l2=0.0)
    assert glm.predict(delta).mean() == pytest.approx(prefs.mean(), abs=1e-10)


def test_penalised_fit_matches_scipy_on_the_same_objective():
    optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(5)
    n = 120
    delta = rng.normal(30.0, 80.0, n)
    diff = rng.normal(0.0, 1.0, n)
    prefs = np.clip(_sigmoid(0.5 + 0.7 * _tanh_std(delta) - 0.4 * diff) + rng.normal(0, 0.15, n), 0, 1)
    X = np.column_stack([np.ones(n), _tanh_std(delta), diff])
    l2 = 0.05

    def objective(b):
        z = X @ b
        return np.mean(np.logaddexp(0.0, z) - prefs * z) + 0.5 * l2 * b @ b

    def gradient(b):
        return X.T @ (_sigmoid(X @ b) - prefs) / n + l2 * b

    ref = optimize.minimize(objective, np.zeros(3), jac=gradient, method="BFGS", options={"gtol": 1e-12})
    glm = fit_length_glm(prefs, delta, diff, l2=l2)
    assert (glm.theta, glm.phi, glm.psi) == pytest.approx(tuple(ref.x), abs=1e-7)


def test_default_penalty_keeps_a_clean_sweep_finite():
    # The model wins every prompt (separable data): the MLE does not exist, and the default L2 keeps the fit finite.
    rng = np.random.default_rng(6)
    ref = rng.uniform(100, 300, 50)
    model = ref + rng.normal(50, 60, 50)
    m = length_controlled_win_rate(np.ones(50), model, ref, resamples=100)
    assert DEFAULT_L2 == 1e-4
    assert m.extra["converged"] == 1 and m.extra["n_unconverged_resamples"] == 0
    assert 0.99 < m.value < 1.0 and math.isfinite(m.extra["theta"])
    assert m.ci95[1] <= 1.0


# ------------------------------------------------------------------------------------- simulated verbose model


def _verbose_model_data(seed=0, n=800, theta=0.2, phi=1.5):
    # The reference writes about 800 chars. The policy is usually ~300 chars longer, but the gap varies from
    # prompt to prompt (so the GLM can separate length from skill). The judge's logit = small quality edge θ
    # plus a strong length effect φ·tanh(Δ/sd). Verdicts are hard 0/1 draws.
    rng = np.random.default_rng(seed)
    ref = rng.normal(800.0, 200.0, n).clip(50.0)
    model = (ref + rng.normal(300.0, 300.0, n)).clip(0.0)
    p_true = _sigmoid(theta + phi * _tanh_std(model - ref))
    prefs = (rng.random(n) < p_true).astype(float)
    return prefs, model, ref


def test_verbose_model_lc_removes_most_of_the_length_inflation():
    prefs, model, ref = _verbose_model_data()
    truth = _sigmoid(0.2)  # the win rate at equal length: 0.5498
    m = length_controlled_win_rate(prefs, model, ref, resamples=1000, seed=0)
    raw = m.extra["raw_win_rate"]
    inflation = raw - truth
    assert inflation > 0.15  # raw ≈ 0.75: verbosity buys ~20 points
    assert abs(m.value - truth) < 0.25 * inflation  # LC takes back more than 3/4 of it
    assert m.ci95[0] < truth < m.ci95[1]
    assert raw > m.ci95[1]  # and the raw rate lies outside LC's interval
    assert m.extra["phi"] == pytest.approx(1.5, abs=0.4)
    # the doc's |LC − raw| rule: a 17-point drop from 75% is under max(10, 75/4 = 18.8) points, so no flag
    assert lc_gap_warning(raw, m.value) is None
    assert lc_gap_warning(raw, m.value, abs_diff=0.1, rel_diff=8.0) is not None


def test_lengths_differ_but_judge_ignores_length_lc_close_to_raw():
    rng = np.random.default_rng(1)
    n = 800
    ref = rng.normal(800.0, 200.0, n).clip(50.0)
    model = (ref + rng.normal(300.0, 300.0, n)).clip(0.0)
    prefs = (rng.random(n) < 0.6).astype(float)
    m = length_controlled_win_rate(prefs, model, ref, resamples=300)
    assert abs(m.value - m.extra["raw_win_rate"]) < 0.02
    assert abs(m.extra["phi"]) < 0.3


def test_lc_is_invariant_to_length_units_and_common_offsets():
    prefs, model, ref = _verbose_model_data(seed=2, n=200)
    base = length_controlled_win_rate(prefs, model, ref, resamples=200, seed=1)
    tokens = length_controlled_win_rate(prefs, model / 4.0, ref / 4.0, resamples=200, seed=1)  # chars -> tokens
    shifted = length_controlled_win_rate(prefs, model + 1000.0, ref + 1000.0, resamples=200, seed=1)
    for other in (tokens, shifted):
        assert other.value == pytest.approx(base.value, abs=1e-9)
        assert other.ci95 == pytest.approx(base.ci95, abs=1e-9)


# ---------------------------------------------------------------------------------------- fixed-seed values


def test_fixed_seed_values_are_pinned():
    # A regression anchor from this implementation (numpy PCG64 stream). The point estimate does not depend on
    # the seed and is checked independently above (closed forms, scipy). The CI pins the resampling scheme.
    prefs, model, ref = _verbose_model_data(seed=7, n=60)
    m = length_controlled_win_rate(prefs, model, ref, resamples=500, seed=123)
    assert m.value == pytest.approx(PINNED_VALUE, abs=1e-8)
    assert m.ci95 == pytest.approx(PINNED_CI, abs=1e-8)
    assert m.extra["raw_win_rate"] == pytest.approx(PINNED_RAW, abs=1e-12)
    again = length_controlled_win_rate(prefs, model, ref, resamples=500, seed=123)
    assert again == m
    other = length_controlled_win_rate(prefs, model, ref, resamples=500, seed=124)
    assert other.value == m.value and other.ci95 != m.ci95
    assert m.extra["stderr"] == pytest.approx((m.ci95[1] - m.ci95[0]) / 3.92, rel=0.25)
    json.dumps(m.to_dict())


PINNED_VALUE = 0.6377511616623223
PINNED_CI = (0.360609416326595, 0.8267737175843548)
PINNED_RAW = 43 / 60


# -------------------------------------------------------------------------------------------- gap warning


def test_gap_warning_follows_alpacaeval_thresholds():
    # raw 50%: either direction is flagged beyond max(10, 50/4 = 12.5) points.
    assert lc_gap_warning(0.5, 0.62) is None
    msg = lc_gap_warning(0.5, 0.63)
    assert msg is not None and "63.0%" in msg and "50.0%" in msg and "+13.0 points" in msg
    assert lc_gap_warning(0.5, 0.37) is not None
    # raw 20%: a drop beyond max(10, 5) = 10 points is flagged; a rise beyond max(10, 80/4 = 20) points.
    assert lc_gap_warning(0.2, 0.09) is not None
    assert lc_gap_warning(0.2, 0.11) is None
    assert lc_gap_warning(0.2, 0.39) is None
    assert lc_gap_warning(0.2, 0.41) is not None
    # AlpacaEval's NullModel (76.9 -> 86.5) passes the default rule and is caught by a 5-point floor.
    assert lc_gap_warning(0.769, 0.865) is None
    assert lc_gap_warning(0.769, 0.865, abs_diff=0.05) is not None


def test_gap_warning_at_its_limit_and_at_the_ends_of_the_scale():
    assert lc_gap_warning(0.5, 0.375) is None  # a drop of exactly the limit, max(10, 50/4 = 12.5) points
    assert lc_gap_warning(0.5, 0.37) is not None
    assert lc_gap_warning(0.0, 0.0) is None and lc_gap_warning(1.0, 1.0) is None  # 0 and 1 are win rates too


def test_a_fit_that_runs_out_of_iterations_says_it_did_not_converge():
    preferences, delta = [1.0, 0.0, 1.0, 1.0, 0.5], [3.0, -2.0, 1.0, 5.0, 0.0]
    assert fit_length_glm(preferences, delta).converged and not fit_length_glm(preferences, delta, max_iter=1).converged
    lc = length_controlled_win_rate(preferences, [4, 1, 2, 6, 1], [1, 3, 1, 1, 1], resamples=20, max_iter=1)
    assert lc.extra["converged"] == 0 and lc.extra["n_unconverged_resamples"] > 0


def test_a_constant_length_difference_is_no_length_column_even_after_round_off():
    """Three copies of 0.1 have a sample sd of ~1.7e-17, not 0: read as a length signal, tanh(0.1 / 1.7e-17) = 1 would
    be a second constant column and take half of theta's weight."""
    glm = fit_length_glm([1.0, 0.0, 1.0], [0.1, 0.1, 0.1])
    assert glm.length_scale == 0.0 and glm.phi == 0.0
    shifted = length_controlled_win_rate([1.0, 0.0, 1.0], [0.1] * 3, [0.0] * 3, resamples=20)
    assert shifted.value == length_controlled_win_rate([1.0, 0.0, 1.0], [0.0] * 3, [0.0] * 3, resamples=20).value


def test_length_collinearity_does_not_depend_on_which_answer_is_longer():
    """1 = the length column is constant (indistinguishable from theta), whichever of model and reference is longer."""
    preferences, model, reference = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0], [5, 6, 7, 8, 9, 10], [20, 21, 22, 23, 24, 24]
    shorter = length_controlled_win_rate(preferences, model, reference, resamples=20)
    longer = length_controlled_win_rate(preferences, reference, model, resamples=20)
    assert shorter.extra["length_collinearity"] == pytest.approx(longer.extra["length_collinearity"])
    assert shorter.extra["length_collinearity"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ bad input


_OK = {"preferences": [0.5, 1.0], "model_lengths": [1, 2], "reference_lengths": [1, 1]}


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"preferences": [0.5, 1.2]}, "lie in"),
        ({"model_lengths": [1, 2, 3]}, "differ in shape"),
        ({"preferences": [0.5], "model_lengths": [1], "reference_lengths": [1]}, "at least 2"),
        ({"model_lengths": [-1, 2]}, ">= 0"),
        ({"preferences": [0.5, float("nan")]}, "NaN"),
        ({"difficulty": [0.0]}, "difficulty"),
        ({"l2": -1.0}, "l2"),
        ({"resamples": 0}, "resamples"),
        ({"alpha": 1.0}, "alpha"),
    ],
)
def test_bad_input_raises(override, match):
    with pytest.raises(ValueError, match=match):
        length_controlled_win_rate(**{**_OK, **override})


def test_predict_checks_difficulty_matches_the_fit():
    glm = fit_length_glm([0.2, 0.9, 0.6], [-10.0, 30.0, 5.0])
    with pytest.raises(ValueError, match="difficulty"):
        glm.predict([0.0, 0.0, 0.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="rate must be in"):
        lc_gap_warning(1.5, 0.5)
