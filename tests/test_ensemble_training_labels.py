"""Soft labels and Iterative Data Smoothing (ALGORITHMS.md §14) in alignpipe.rewards.ensemble_training."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from alignpipe.losses.preference import soft_preference_loss
from alignpipe.rewards.ensemble import EnsembleSpec, RewardEnsemble
from alignpipe.rewards.ensemble_encoding import collate_features, encode_examples
from alignpipe.rewards.ensemble_training import (
    EnsembleTrainingConfig,
    EnsembleTrainingHistory,
    train_ensemble,
)
from alignpipe.tasks import preference_pairs

MAX_LEN = 64


@pytest.fixture(scope="module")
def pairs():
    rows = preference_pairs(64, seed=0, noise=0.5, temperature=0.05)
    return [(r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows]


def _ensemble(path: str, members: int = 2, perturb: bool = True) -> RewardEnsemble:
    ensemble = RewardEnsemble.create(EnsembleSpec(backbone=path, members=members, lora_r=4, lora_alpha=8,
                                                  top_layers=2, seed=0))
    if perturb:  # LoRA B starts at zero; make the adapters matter
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in ensemble.trainable_parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return ensemble


def _config(**kw) -> EnsembleTrainingConfig:
    base = {"learning_rate": 1e-2, "batch_size": 8, "max_length": MAX_LEN, "logging_steps": 1, "seed": 0,
            "progress_bar": False}
    base.update(kw)
    return EnsembleTrainingConfig(**base)


@torch.no_grad()
def _rewards(ensemble: RewardEnsemble, tokenizer, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-member rewards ``[n, K]`` of chosen and rejected, from one forward (as a full-batch training step)."""
    prompts = [p[0] for p in pairs]
    chosen = encode_examples(tokenizer, prompts, [p[1] for p in pairs], max_length=MAX_LEN)
    rejected = encode_examples(tokenizer, prompts, [p[2] for p in pairs], max_length=MAX_LEN)
    was_training = ensemble.training
    ensemble.eval()
    try:
        rewards = ensemble(**collate_features(tokenizer, chosen + rejected)).float()
    finally:
        ensemble.train(was_training)
    return rewards[:len(pairs)], rewards[len(pairs):]


def _mean_margin(ensemble, tokenizer, pairs) -> torch.Tensor:
    chosen, rejected = _rewards(ensemble, tokenizer, pairs)
    return chosen.mean(dim=1) - rejected.mean(dim=1)


# ------------------------------------------------------------------------------------------------ soft labels


@pytest.mark.parametrize("objective, bootstrap", [("members", True), ("mean", False)])
def test_all_one_labels_are_bitwise_the_default_loss(llama_path, tokenizer, pairs, objective, bootstrap):
    small = pairs[:16]
    config = _config(epochs=2, objective=objective, bootstrap=bootstrap)
    extra = {"margins": [0.25 * (i % 3) for i in range(16)], "weights": [1.0 + (i % 2) for i in range(16)]}
    runs = []
    for labels in (None, [1.0] * 16):
        ensemble = _ensemble(llama_path)
        logs = train_ensemble(ensemble, tokenizer, small, config, labels=labels, **extra)
        runs.append((logs, [p.detach().clone() for p in ensemble.trainable_parameters()]))
    (base_logs, base_params), (soft_logs, soft_params) = runs
    assert len(base_logs) == 4
    assert [r["bt_loss"] for r in soft_logs] == [r["bt_loss"] for r in base_logs]
    assert [r["loss"] for r in soft_logs] == [r["loss"] for r in base_logs]
    assert [r["grad_norm"] for r in soft_logs] == [r["grad_norm"] for r in base_logs]
    for a, b in zip(base_params, soft_params, strict=True):
        assert torch.equal(a, b)
    assert isinstance(soft_logs, list) and isinstance(soft_logs, EnsembleTrainingHistory)
    assert soft_logs.labels == [1.0] * 16 and base_logs.labels == [1.0] * 16
    assert not any(k.startswith("ids/") for r in soft_logs for k in r)  # IDS off: records unchanged
    json.dumps(soft_logs)  # still a plain JSON-able list of dicts


@pytest.mark.parametrize("objective", ["members", "mean"])
@pytest.mark.parametrize("with_margins_weights", [False, True])
def test_soft_label_loss_matches_hand_computation(llama_path, tokenizer, pairs, objective, with_margins_weights):
    small = pairs[:16]
    labels = [0.7] * 8 + [0.0, 0.3, 0.5, 1.0, 0.9, 0.1, 0.7, 0.6]
    margins = [0.5 * (i % 2) for i in range(16)] if with_margins_weights else None
    weights = [float(1 + i % 3) for i in range(16)] if with_margins_weights else None
    ensemble = _ensemble(llama_path)
    chosen, rejected = _rewards(ensemble, tokenizer, small)  # the weights the (single, full-batch) step sees
    # one step on one batch holding every pair: the logged bt_loss is that batch's loss
    logs = train_ensemble(ensemble, tokenizer, small, _config(epochs=1, batch_size=16, objective=objective),
                          labels=labels, margins=margins, weights=weights)
    assert len(logs) == 1 and logs[0]["step"] == 1

    y = torch.tensor(labels)
    m = torch.zeros(16) if margins is None else torch.tensor(margins)
    w = torch.ones(16) if weights is None else torch.tensor(weights)

    def reduce(delta):  # weighted mean of the soft loss, and the identity −log σ(Δ) + (1 − y)Δ
        soft = soft_preference_loss(delta, y, beta=1.0)
        torch.testing.assert_close(soft, -F.logsigmoid(delta) + (1 - y) * delta, atol=1e-6, rtol=1e-6)
        return float((w * soft).sum() / w.sum())

    if objective == "mean":
        expected = reduce(chosen.mean(dim=1) - rejected.mean(dim=1) - m)
    else:
        expected = sum(reduce(chosen[:, k] - rejected[:, k] - m) for k in range(chosen.shape[1])) / chosen.shape[1]
    assert logs[0]["bt_loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # and it is not the hard-label loss
    hard = float(-F.logsigmoid(chosen.mean(dim=1) - rejected.mean(dim=1) - m).mul(w).sum() / w.sum())
    if objective == "mean":
        assert abs(logs[0]["bt_loss"] - hard) > 1e-3
    assert logs.labels == pytest.approx(labels)  # IDS off: labels unchanged


# ------------------------------------------------------------------------------------------------ IDS


def test_ids_update_uses_the_ensemble_mean_prediction(llama_path, tokenizer, pairs):
    small = pairs[:16]
    labels = [1.0] * 8 + [0.6] * 8
    margins = [0.2] * 8 + [0.0] * 8
    ensemble = _ensemble(llama_path)
    logs = train_ensemble(ensemble, tokenizer, small, _config(epochs=1, ids_rate=0.3), labels=labels,
                          margins=margins)
    # one epoch = 2 steps; the single update happens after the last one, so the final model is the one that scored
    h = _mean_margin(ensemble, tokenizer, small) - torch.tensor(margins)
    expected = 0.7 * torch.tensor(labels) + 0.3 * torch.sigmoid(h)
    assert logs.labels == pytest.approx(expected.tolist(), abs=1e-5)
    last = logs[-1]
    assert last["step"] == 2
    assert last["ids/mean_label"] == pytest.approx(float(expected.mean()), abs=1e-6)
    assert last["ids/final_mean_label"] == pytest.approx(last["ids/mean_label"])
    assert last["ids/mean_probability"] == pytest.approx(float(torch.sigmoid(h).mean()), abs=1e-5)
    assert last["ids/mean_margin"] == pytest.approx(float((h + torch.tensor(margins)).mean()), abs=1e-5)
    assert "ids/mean_label" not in logs[0]
    assert not ensemble.training


def test_ids_fractional_epochs_update_at_full_epoch_boundaries_only(llama_path, tokenizer, pairs):
    small = pairs[:16]
    seen: list[dict] = []
    # 2 steps per epoch, 2.5 epochs = 5 steps; logging_steps=4 would log at 4 and 5 only, IDS forces step 2 too
    logs = train_ensemble(_ensemble(llama_path), tokenizer, small,
                          _config(epochs=2.5, ids_rate=0.5, logging_steps=4), on_log=seen.append)
    assert seen == logs
    assert [r["step"] for r in logs] == [2, 4, 5]
    assert [r["step"] for r in logs if "ids/mean_label" in r] == [2, 4]
    assert logs[-1]["ids/final_mean_label"] == pytest.approx(logs[1]["ids/mean_label"])
    assert sum(logs.labels) / 16 == pytest.approx(logs[-1]["ids/final_mean_label"], abs=1e-6)
    assert all(0.0 <= y < 1.0 for y in logs.labels)


def test_ids_lowers_labels_monotonically_and_shrinks_margins(llama_path, tokenizer, pairs):
    runs = {}
    for rate in (0.0, 0.3):
        ensemble = _ensemble(llama_path, members=3, perturb=False)
        config = _config(epochs=3, batch_size=16, ids_rate=rate, logging_steps=4)
        runs[rate] = (train_ensemble(ensemble, tokenizer, pairs, config), _mean_margin(ensemble, tokenizer, pairs))
    (mle, mle_margin), (ids, ids_margin) = runs[0.0], runs[0.3]
    assert [r["step"] for r in ids] == [4, 8, 12] == [r["step"] for r in mle]
    # epoch 1 trains on y = 1 in both runs (soft path vs Bradley-Terry path): identical
    assert ids[0]["bt_loss"] == mle[0]["bt_loss"] and ids[0]["loss"] == mle[0]["loss"]
    means = [r["ids/mean_label"] for r in ids]
    assert 1.0 > means[0] > means[1] > means[2] > 0.5
    assert ids[-1]["ids/final_mean_label"] == pytest.approx(means[-1])
    assert sum(ids.labels) / len(pairs) == pytest.approx(means[-1], abs=1e-6)
    assert ids[-1]["ids/mean_margin"] == pytest.approx(float(ids_margin.mean()), abs=1e-5)
    assert mle.labels == [1.0] * len(pairs)
    assert float(ids_margin.mean()) < float(mle_margin.mean())


# ------------------------------------------------------------------------------------------------ validation


def test_invalid_labels_and_rate_raise(llama_path, tokenizer, pairs):
    small = pairs[:4]
    ensemble = _ensemble(llama_path, perturb=False)
    config = _config(epochs=1)
    for bad, match in (([1.0, 0.5, 0.2, 1.5], r"labels\[3\].*1\.5"), ([1.0, -0.1, 0.2, 0.3], r"labels\[1\]"),
                       ([1.0, 1.0, math.nan, 1.0], r"labels\[2\]"), ([1.0] * 3, r"labels.*one value per pair \(4\)"),
                       ([1.0, "x", 1.0, 1.0], r"labels\[1\]")):
        with pytest.raises(ValueError, match=match):
            train_ensemble(ensemble, tokenizer, small, config, labels=bad)
    for rate in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="ids_rate"):
            EnsembleTrainingConfig(ids_rate=rate)
    assert EnsembleTrainingConfig(ids_rate=1.0).to_dict()["ids_rate"] == 1.0


def test_a_nan_loss_stops_ensemble_training_before_the_step(llama_path, tokenizer, pairs, monkeypatch):
    import alignpipe.rewards.ensemble_training as training

    ensemble = _ensemble(llama_path)
    before = [p.detach().clone() for p in ensemble.trainable_parameters()]
    monkeypatch.setattr(training, "ensemble_rank_loss", lambda chosen, *a, **k: chosen.sum() * float("nan"))
    with pytest.raises(FloatingPointError, match="reward ensemble loss is nan at step 1"):
        train_ensemble(ensemble, tokenizer, pairs[:8], _config(epochs=1, batch_size=8))
    assert all(torch.equal(a, b) for a, b in zip(before, ensemble.trainable_parameters()))  # no step was taken
