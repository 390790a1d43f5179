"""Local Hugging Face ``evaluate`` metric modules under ``eval/metrics/`` (thin wrappers over
``alignpipe.evaluation.*``): each is loaded by path with ``evaluate.load``, offline, with every evaluate cache inside
tmp, and must return exactly what the underlying alignpipe function returns on the same inputs."""

from __future__ import annotations

import json
import math
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from alignpipe.evaluation.best_of_n import best_of_n_curve, kl_best_of_n
from alignpipe.evaluation.diversity import distinct_n, mean_repetition_rate, within_prompt_diversity
from alignpipe.evaluation.length_control import lc_gap_warning, length_controlled_win_rate
from alignpipe.evaluation.metrics import win_rate
from alignpipe.evaluation.reward_metrics import (
    brier_score,
    expected_calibration_error,
    negative_log_likelihood,
)

METRICS_DIR = REPO / "eval" / "metrics"
NAMES = ["win_rate", "lc_win_rate", "distinct_n", "self_bleu", "reward_calibration", "best_of_n"]
R = 200  # bootstrap resamples: enough to exercise the CI path, cheap on a shared CPU

_EVALUATE_CONFIG_PATHS = ("HF_MODULES_CACHE", "HF_METRICS_CACHE", "HF_EVALUATE_CACHE")


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    """Offline ``evaluate`` whose module, metric and download caches all live in a tmp dir; no TCP connects.

    ``evaluate.config`` reads its env vars once, at import, so the env is set before the first import AND the
    already-evaluated config constants are patched (another test may have imported evaluate first). ``evaluate``
    appends its module cache to ``sys.path`` and imports the copied scripts as the ``evaluate_modules`` package, so
    both are isolated here and restored afterwards: a later test must not find a package in a deleted tmp dir.
    """
    root = tmp_path_factory.mktemp("hf_home")
    real_connect = socket.socket.connect

    def no_network(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"network access attempted in an offline test: {address!r}")
        return real_connect(self, address)

    saved = {k: v for k, v in sys.modules.items() if k == "evaluate_modules" or k.startswith("evaluate_modules.")}
    with pytest.MonkeyPatch.context() as mp:
        for var in ("HF_HUB_OFFLINE", "HF_EVALUATE_OFFLINE", "HF_DATASETS_OFFLINE"):
            mp.setenv(var, "1")
        mp.setenv("HF_UPDATE_DOWNLOAD_COUNTS", "0")
        mp.setenv("HF_HOME", str(root))
        for var in _EVALUATE_CONFIG_PATHS:
            mp.setenv(var, str(root / var.lower()))
        mp.setattr(socket.socket, "connect", no_network)
        mp.setattr(sys, "path", list(sys.path))
        # evaluate only appends its module cache to sys.path, so a cache used earlier in this process would shadow
        # ours when `evaluate_modules` is re-imported: put ours first.
        (root / "hf_modules_cache").mkdir()
        mp.syspath_prepend(str(root / "hf_modules_cache"))
        for k in saved:
            mp.delitem(sys.modules, k)

        import evaluate

        for var in _EVALUATE_CONFIG_PATHS:
            mp.setattr(evaluate.config, var, root / var.lower())
        mp.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
        mp.setattr(evaluate.config, "HF_UPDATE_DOWNLOAD_COUNTS", False)
        try:
            yield root
        finally:
            for k in [k for k in sys.modules if k == "evaluate_modules" or k.startswith("evaluate_modules.")]:
                del sys.modules[k]
    # MonkeyPatch restored sys.path, the env, socket and the evaluate config; put back what was imported before.
    sys.modules.update(saved)


@pytest.fixture(scope="module")
def load(hf_cache):
    import evaluate

    loaded: dict = {}

    def _load(name: str):
        if name not in loaded:
            loaded[name] = evaluate.load(str(METRICS_DIR / name))
        return loaded[name]

    return _load


def _assert_flat_json(result: dict) -> None:
    for k, v in result.items():
        assert isinstance(k, str)
        assert v is None or isinstance(v, (int, float, str)), f"{k}={v!r} is not a flat JSON scalar"
    json.dumps(result, allow_nan=False)


# --------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("name", NAMES)
def test_module_loads_offline_from_a_tmp_cache(load, hf_cache, name):
    import evaluate

    metric = load(name)
    assert isinstance(metric, evaluate.Metric)
    assert metric.name == name  # evaluate names the module after its class, snake-cased
    assert metric.description.strip() and metric.citation.strip() and metric.inputs_description.strip()
    # evaluate copied the script into its module cache (ours, in tmp) and imported it from there
    module_file = Path(sys.modules[type(metric).__module__].__file__).resolve()
    assert module_file.is_relative_to(hf_cache.resolve())
    assert module_file.name == f"{name}.py"
    assert module_file.read_text() == (METRICS_DIR / name / f"{name}.py").read_text()


def test_metric_scratch_files_stay_in_tmp(load, hf_cache):
    load("win_rate").compute(preferences=[1.0, 0.0], resamples=R)  # default keep_in_memory=False: arrow + lock
    scratch = hf_cache / "hf_metrics_cache" / "win_rate" / "default"
    assert scratch.is_dir()
    assert not list(scratch.glob("*.arrow"))  # evaluate deletes the arrow file after compute (the .lock stays)


# --------------------------------------------------------------------------------------------- win rate


def test_win_rate_golden_and_equal_to_alignpipe(load):
    prefs = [1.0, 0.0, 0.5, 1.0]
    got = load("win_rate").compute(preferences=prefs, resamples=R, seed=3)
    m = win_rate(prefs, resamples=R, seed=3)
    assert got["win_rate"] == 0.625
    assert (got["n_wins"], got["n_losses"], got["n_ties"], got["n"]) == (2, 1, 1, 4)
    assert got == {"win_rate": m.value, "ci95_low": m.ci95[0], "ci95_high": m.ci95[1], "n": m.n, **m.extra}
    _assert_flat_json(got)


def test_win_rate_float64_inputs_round_trip_exactly(load):
    prefs = np.random.default_rng(0).uniform(size=50).tolist()  # not representable in float32
    got = load("win_rate").compute(preferences=prefs, resamples=R)
    assert got["win_rate"] == win_rate(prefs, resamples=R).value


def test_win_rate_rejects_out_of_range_preferences(load):
    with pytest.raises(ValueError, match="preferences must lie in"):
        load("win_rate").compute(preferences=[1.5, 0.0], resamples=R)


# ----------------------------------------------------------------------------------------- LC win rate


def _length_biased_judge(seed: int = 0, n: int = 40):
    rng = np.random.default_rng(seed)
    ref = np.full(n, 100.0)
    model = ref + rng.normal(80, 60, size=n)
    prefs = np.clip(0.5 + 0.3 * np.tanh((model - ref) / 50) + rng.normal(0, 0.1, n), 0, 1)
    return prefs.tolist(), model.tolist(), ref.tolist()


def test_lc_win_rate_equal_to_alignpipe_with_gap_warning(load):
    prefs, model, ref = _length_biased_judge()
    got = load("lc_win_rate").compute(
        preferences=prefs, model_lengths=model, reference_lengths=ref, resamples=R, seed=1
    )
    m = length_controlled_win_rate(prefs, model, ref, resamples=R, seed=1)
    warning = lc_gap_warning(m.extra["raw_win_rate"], m.value)
    assert warning is not None  # a judge that rewards length: LC ~0.54 vs raw ~0.76
    assert got == {
        "lc_win_rate": m.value,
        "ci95_low": m.ci95[0],
        "ci95_high": m.ci95[1],
        "n": m.n,
        **m.extra,
        "lc_gap_flagged": 1,
        "lc_gap_warning": warning,
    }
    assert got["raw_win_rate"] == pytest.approx(float(np.mean(prefs)), abs=1e-12)
    _assert_flat_json(got)


def test_lc_win_rate_passes_difficulty_and_gap_thresholds(load):
    prefs, model, ref = _length_biased_judge(seed=1)
    difficulty = np.random.default_rng(5).normal(size=len(prefs)).tolist()
    got = load("lc_win_rate").compute(
        preferences=prefs, model_lengths=model, reference_lengths=ref, difficulty=difficulty,
        resamples=R, abs_diff=1.0, rel_diff=1.0,
    )
    m = length_controlled_win_rate(prefs, model, ref, difficulty, resamples=R)
    assert got["lc_win_rate"] == m.value and got["psi"] == m.extra["psi"]
    assert got["lc_gap_flagged"] == 0 and got["lc_gap_warning"] is None  # abs_diff = 1 never fires


# ------------------------------------------------------------------------------------------- diversity


def test_distinct_n_golden_and_equal_to_alignpipe(load):
    preds = ["a b a b a b", "the cat sat", "x"]
    got = load("distinct_n").compute(predictions=preds, repetition_n=2, resamples=R)
    # unigrams: 6 + 3 + 1 = 10, unique {a, b, the, cat, sat, x} = 6; bigrams: 5 + 2 = 7, unique {ab, ba, tc, cs} = 4
    assert got["distinct_1"] == pytest.approx(6 / 10)
    assert got["distinct_2"] == pytest.approx(4 / 7)
    assert got["mean_repetition_rate"] == pytest.approx((0.6 + 0.0 + 0.0) / 3)  # "a b a b a b": 1 - 2/5
    assert got["n_too_short"] == 1 and got["n"] == 3 and got["repetition_n"] == 2
    d1, d2 = distinct_n(preds, 1), distinct_n(preds, 2)
    rep = mean_repetition_rate(preds, 2, resamples=R)
    assert (got["distinct_1"], got["distinct_2"], got["mean_repetition_rate"]) == (d1.value, d2.value, rep.value)
    assert (got["repetition_ci95_low"], got["repetition_ci95_high"]) == rep.ci95
    assert (got["n_ngrams_2"], got["n_unique_ngrams_2"]) == (7, 4)
    _assert_flat_json(got)


def test_self_bleu_golden_and_equal_to_alignpipe(load):
    groups = [["a b c d e", "a b c d e"], ["a b c d", "e f g h", "a b x y"]]
    got = load("self_bleu").compute(predictions=groups, resamples=R)
    expected = within_prompt_diversity(groups, resamples=R)
    assert got["self_bleu_4"] == expected["self_bleu_4"].value and got["n"] == 2 and got["samples_per_prompt"] == 2
    assert (got["self_bleu_4_ci95_low"], got["self_bleu_4_ci95_high"]) == expected["self_bleu_4"].ci95
    assert got["distinct_2_within"] == pytest.approx((4 / 8 + 8 / 9) / 2)  # 4 of 8 bigrams unique; 8 of 9
    assert got["distinct_2_within_n_too_short"] == 0 and got["distinct_1_within"] == expected["distinct_1_within"].value
    assert got["self_bleu_4"] > 0.5  # the first prompt's two samples are one text: BLEU 1
    _assert_flat_json(got)
    one_word = load("self_bleu").compute(predictions=[["42", "17"], ["42", "42"]], resamples=R)
    assert one_word["distinct_2_within"] is None and one_word["distinct_2_within_n_too_short"] == 2
    assert one_word["self_bleu_4"] == 0.5  # a collapse (1) and two different words (0)
    assert "samples_per_prompt_max" not in one_word  # two samples for every prompt, as in the library


def test_self_bleu_passes_the_most_samples_of_a_prompt_through(load):
    groups = [["a b", "a c", "b"], ["x y", "x y"]]
    got = load("self_bleu").compute(predictions=groups, resamples=R)
    extra = within_prompt_diversity(groups, resamples=R)["self_bleu_4"].extra
    assert (got["samples_per_prompt"], got["samples_per_prompt_max"]) == (2, 3)
    assert (extra["samples_per_prompt"], extra["samples_per_prompt_max"]) == (2, 3)
    _assert_flat_json(got)


# ----------------------------------------------------------------------------------------- calibration

HAND_P = [0.9, 0.9, 0.9, 0.9, 0.6, 0.6]
HAND_Y = [1, 1, 1, 0, 1, 1]


def test_reward_calibration_golden_and_equal_to_alignpipe(load):
    got = load("reward_calibration").compute(probabilities=HAND_P, references=HAND_Y, resamples=R)
    # bins 0.9 (acc 3/4) and 0.6 (acc 1): ECE = 4/6 * 0.15 + 2/6 * 0.4; 0.9 and 0.6 fall in different 15-bins
    assert got["ece"] == pytest.approx(4 / 6 * 0.15 + 2 / 6 * 0.4, abs=1e-12)
    assert got["accuracy"] == pytest.approx(5 / 6)
    assert got["brier"] == pytest.approx((3 * 0.01 + 0.81 + 2 * 0.16) / 6)
    assert got["nll"] == pytest.approx(-(3 * math.log(0.9) + math.log(0.1) + 2 * math.log(0.6)) / 6)
    assert got["bins"] == 15 and got["n"] == 6
    ece = expected_calibration_error(HAND_P, HAND_Y, bins=15, resamples=R)
    brier = brier_score(HAND_P, HAND_Y, resamples=R)
    nll = negative_log_likelihood(HAND_P, HAND_Y, resamples=R)
    assert (got["ece"], got["ece_ci95_low"], got["ece_ci95_high"]) == (ece.value, *ece.ci95)
    assert (got["brier"], got["brier_ci95_low"], got["brier_ci95_high"]) == (brier.value, *brier.ci95)
    assert (got["nll"], got["nll_ci95_low"], got["nll_ci95_high"]) == (nll.value, *nll.ci95)
    assert (got["accuracy"], got["mce"]) == (ece.extra["accuracy"], ece.extra["mce"])
    _assert_flat_json(got)


def test_reward_calibration_tie_gets_half_credit_and_bins_pass_through(load):
    got = load("reward_calibration").compute(probabilities=[0.5, 0.5], references=[1, 1], bins=10, resamples=R)
    assert got["accuracy"] == 0.5 and got["ece"] == pytest.approx(0.0) and got["bins"] == 10


# ------------------------------------------------------------------------------------------- best-of-n


def test_best_of_n_golden_8_over_3(load):
    got = load("best_of_n").compute(proxy_scores=[[1, 2, 3]], gold_scores=[[1, 2, 3]], ns=[2])
    assert got["curve_n2"] == pytest.approx(8 / 3, abs=1e-12)  # (1/3)·2 + (2/3)·3, ALGORITHMS.md §15
    assert got["kl_bon_n2"] == pytest.approx(math.log(2) - 0.5, abs=1e-12)
    assert got["n_prompts"] == 1
    _assert_flat_json(got)


def test_best_of_n_ragged_prompts_equal_to_alignpipe(load):
    rng = np.random.default_rng(7)
    proxy = [rng.normal(size=k).tolist() for k in (8, 5, 6)]
    gold = [(np.asarray(p) + rng.normal(size=len(p))).tolist() for p in proxy]
    ns = [1, 2, 4, 5]
    got = load("best_of_n").compute(proxy_scores=proxy, gold_scores=gold, ns=ns)
    curve = best_of_n_curve(proxy, gold, ns)
    assert got == {
        **{k: v for n, c in zip(ns, curve) for k, v in ((f"curve_n{n}", float(c)), (f"kl_bon_n{n}", kl_best_of_n(n)))},
        "n_prompts": 3,
    }
    assert got["curve_n1"] == pytest.approx(np.mean([np.mean(g) for g in gold]), abs=1e-12)  # no selection
    assert got["kl_bon_n1"] == 0.0


def test_best_of_n_needs_integer_ns_within_every_prompt(load):
    bon = load("best_of_n")
    with pytest.raises(ValueError, match="needs ns"):
        bon.compute(proxy_scores=[[1.0, 2.0]], gold_scores=[[1.0, 2.0]])
    for ns in ([2.0], [1.5], [True]):  # the library's own error, not the module's conversion: 2.0 is no int either
        with pytest.raises(ValueError, match=r"prompt 0: best-of-n needs an int n"):
            bon.compute(proxy_scores=[[1.0, 2.0]], gold_scores=[[1.0, 2.0]], ns=ns)
        with pytest.raises(ValueError, match=r"prompt 0: best-of-n needs an int n"):
            best_of_n_curve([[1.0, 2.0]], [[1.0, 2.0]], ns)
    with pytest.raises(ValueError, match="prompt 1"):
        bon.compute(proxy_scores=[[1.0, 2.0, 3.0], [1.0]], gold_scores=[[1.0, 2.0, 3.0], [1.0]], ns=[2])
