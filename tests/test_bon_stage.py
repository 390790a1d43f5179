"""The best-of-n stage on the tiny recipe: one sampling pass, the unbiased curve for n = 1..N, Gao's fit."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import TINY_RECIPE, write_recipe

from alignpipe.evaluation.best_of_n import kl_best_of_n, n_for_kl_best_of_n
from alignpipe.pipeline.rundir import StageDir
from alignpipe.pipeline.runner import Runner
from alignpipe.recipe import load_recipe
from alignpipe.trainers.bon import best_of_n_grid, selection_curve

REWARD = {"name": "rm", "type": "reward", "inputs": ["sft"], "members": 2, "top_layers": 1, "learning_rate": 3e-3,
          "num_train_epochs": 1, "per_device_train_batch_size": 16, "max_length": 48, "logging_steps": 4,
          "heldout_fraction": 0.25}
BON = {"type": "bon", "n_samples": 8, "n_prompts": 12, "max_new_tokens": 10, "batch_size": 12}


def test_grid_is_powers_of_two_plus_n():
    assert best_of_n_grid(8) == [1, 2, 4, 8]
    assert best_of_n_grid(12) == [1, 2, 4, 8, 12]
    assert best_of_n_grid(2) == [1, 2]


@pytest.mark.parametrize("n", [1, 2, 4, 16, 64, 1000])
def test_n_for_kl_inverts_kl_best_of_n(n):
    assert n_for_kl_best_of_n(kl_best_of_n(n)) == pytest.approx(n, rel=1e-9)


def test_n_for_kl_limits():
    assert n_for_kl_best_of_n(0.0) == 1.0 and n_for_kl_best_of_n(math.inf) == math.inf
    with pytest.raises(ValueError):
        n_for_kl_best_of_n(-0.1)


def test_a_curve_is_fitted_only_from_three_n_above_one():
    """N = 4 measures n = 2 and 4 beyond n = 1: two points, which any two-coefficient form matches exactly, so
    bon.json stores no fit (as the report draws none); N = 8 adds n = 8 and the fit recovers Gao's form."""
    rng = np.random.default_rng(0)
    for n_samples, fitted in ((4, False), (8, True)):
        proxy = rng.normal(size=(6, n_samples))
        ns = best_of_n_grid(n_samples)
        d = np.sqrt(kl_best_of_n(ns))
        curve = selection_curve(proxy, {"gold": proxy, "proxy": proxy}, ns, d, seed=0)
        assert (curve["fit"] is not None) == fitted, (n_samples, curve["fit"])


@pytest.fixture(scope="module")
def bon_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bon")
    recipe = {**TINY_RECIPE, "stages": [
        TINY_RECIPE["stages"][0], REWARD,
        {"name": "bon-gold", **BON, "inputs": ["sft"], "reward": {"source": "gold"}},
        {"name": "bon-rm", **BON, "inputs": ["sft", "rm"],
         "reward": {"source": "model", "penalty": "mean_minus_std", "penalty_coef": 1.0}},
    ]}
    runner = Runner(load_recipe(write_recipe(directory, recipe)), runs_dir=directory / "runs", in_process=True)
    return runner, {o.name: o.action for o in runner.run()}


def _read(runner, name):
    stage = StageDir(runner.run_dir / name)
    report = json.loads((stage.root / "bon.json").read_text())
    samples = [json.loads(line) for line in (stage.root / "samples.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in stage.metrics.read_text().splitlines()]
    return stage, report, samples, metrics


@pytest.mark.parametrize("name", ["bon-gold", "bon-rm"])
def test_curve_files_and_estimator_invariants(bon_run, name):
    runner, outcomes = bon_run
    assert outcomes[name] == "ran"
    stage, report, samples, metrics = _read(runner, name)
    assert report["ns"] == [1, 2, 4, 8] and len(samples) == 12 * 8
    assert [m["n"] for m in metrics] == report["ns"]
    assert report["kl_bon"][0] == 0 and report["kl_bon"][1] == pytest.approx(0.19315, abs=1e-5)
    mean_gold = float(np.mean([s["gold"] for s in samples]))
    for curve in report["curves"].values():
        assert curve["gold"][0] == pytest.approx(mean_gold, abs=1e-9)  # n = 1 is a uniformly random sample
        for value, (lo, hi) in zip(curve["gold"], curve["gold_ci95"]):
            assert lo - 1e-12 <= value <= hi + 1e-12
    by_mean = report["curves"]["mean"]["proxy"]  # selecting by the proxy can only raise the expected proxy
    assert all(b >= a - 1e-12 for a, b in zip(by_mean, by_mean[1:]))
    assert by_mean[-1] > by_mean[0]
    fit = report["curves"][report["selection"]]["fit"]
    assert set(fit) >= {"alpha", "beta", "peak_d", "peak_n"}
    manifest = stage.read_manifest()
    assert manifest["status"] == "complete" and manifest["output_sha256"] is None  # no checkpoint
    assert manifest["summary"]["gold_n1"] == pytest.approx(mean_gold, abs=1e-9)
    assert manifest["summary"]["best_n"] in report["ns"]


def test_gold_source_selects_by_gold_itself(bon_run):
    runner, _ = bon_run
    _, report, samples, metrics = _read(runner, "bon-gold")
    assert report["selection"] == "mean" and list(report["curves"]) == ["mean"]
    curve = report["curves"]["mean"]
    assert curve["gold"] == pytest.approx(curve["proxy"], abs=1e-6)  # the plug-in scores in float32
    assert report["mean_ensemble_std"] is None
    assert curve["gold"][-1] >= curve["gold"][0]  # with the exact gold reward, more samples never hurt
    assert "by_mean/gold" not in metrics[0]


def test_penalised_selection_is_recorded_beside_the_raw_mean(bon_run):
    runner, _ = bon_run
    _, report, samples, metrics = _read(runner, "bon-rm")
    assert report["selection"] == "penalised" and set(report["curves"]) == {"penalised", "mean"}
    assert report["mean_ensemble_std"] > 0 and all(s["ensemble_std"] >= 0 for s in samples)
    penalised = report["curves"]["penalised"]["penalised"]  # selecting by the penalised reward raises it
    assert all(b >= a - 1e-12 for a, b in zip(penalised, penalised[1:]))
    assert {"gold", "proxy", "penalised", "by_mean/gold", "by_mean/proxy"} <= set(metrics[-1])
    assert metrics[-1]["selection"] == "penalised"
