"""Soft-preference (DPO / cDPO / OSP-SPCE) and IPO losses: hand values (ALGORITHMS.md §4e, §5), their calculus,
and the trainer's equality with TRL's own sigmoid DPO loss on real batches."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer

from alignpipe.losses.preference import (
    dpo_logits,
    ipo_loss,
    margin_gap,
    soft_preference_loss,
)
from alignpipe.models.loading import activation_checkpointing_argument
from alignpipe.models.tiny import build_tiny_model, train_tokenizer
from alignpipe.tasks.synthetic import preference_pairs, tokenizer_corpus
from alignpipe.trainers.soft_dpo import (
    PreferenceTargetCollator,
    SoftPreferenceDPOTrainer,
)

BETA = 0.1
# §4e: logp_θ(y_w) = −10, logp_ref(y_w) = −12, logp_θ(y_l) = −15, logp_ref(y_l) = −14  ->  h = 2 − (−1) = 3
HAND_H = dpo_logits(torch.tensor(-10.0), torch.tensor(-15.0), torch.tensor(-12.0), torch.tensor(-14.0))


# --------------------------------------------------------------------------------------------------------------------
# Pure maths
# --------------------------------------------------------------------------------------------------------------------

def test_dpo_logit_hand_value():
    assert HAND_H.item() == 3.0


@pytest.mark.parametrize("p, expected", [(1.0, 0.554355), (0.7, 0.644355), (0.5, 0.704355)])
def test_soft_preference_loss_hand_values(p, expected):
    assert soft_preference_loss(HAND_H, p, BETA).item() == pytest.approx(expected, abs=1e-6)


def test_cdpo_is_soft_loss_with_p_one_minus_eps():
    eps = 0.1
    cdpo = -(1 - eps) * torch.nn.functional.logsigmoid(BETA * HAND_H) - eps * torch.nn.functional.logsigmoid(
        -BETA * HAND_H)
    assert soft_preference_loss(HAND_H, 1 - eps, BETA).item() == pytest.approx(0.584355, abs=1e-6)
    assert soft_preference_loss(HAND_H, 1 - eps, BETA).item() == pytest.approx(cdpo.item(), abs=1e-7)


def test_p_one_is_bit_identical_to_dpo():
    h = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 50
    assert torch.equal(soft_preference_loss(h, torch.ones(64), BETA), -torch.nn.functional.logsigmoid(BETA * h))


def test_ipo_hand_value():
    assert ipo_loss(HAND_H, 0.1).item() == pytest.approx(4.0, abs=1e-6)  # (3 − 1/(2·0.1))² = (3 − 5)²


def test_gradient_vanishes_at_logit_p_and_points_toward_it():
    p = 0.7
    optimum = math.log(p / (1 - p)) / BETA
    assert optimum == pytest.approx(8.473, abs=1e-3)
    for h0 in (optimum, optimum - 5.0, optimum + 5.0, -20.0, 40.0):
        h = torch.tensor(h0, dtype=torch.float64, requires_grad=True)
        soft_preference_loss(h, p, BETA).backward()
        analytic = BETA * (torch.sigmoid(torch.tensor(BETA * h0, dtype=torch.float64)) - p)
        assert h.grad.item() == pytest.approx(analytic.item(), abs=1e-12)
        if h0 == optimum:
            assert abs(h.grad.item()) < 1e-12
        else:
            assert abs(h.grad.item()) > 1e-4
            # gradient descent (h -= lr * grad) moves h toward the optimum
            assert math.copysign(1.0, -h.grad.item()) == math.copysign(1.0, optimum - h0)


def test_swap_symmetry():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(1000, generator=g) * 20
    p = torch.rand(1000, generator=g)
    torch.testing.assert_close(soft_preference_loss(h, p, BETA), soft_preference_loss(-h, 1 - p, BETA),
                               atol=1e-6, rtol=0)


def test_equivalent_form_dpo_plus_linear_margin_penalty():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(1000, generator=g, dtype=torch.float64) * 20
    p = torch.rand(1000, generator=g, dtype=torch.float64)
    expected = -torch.nn.functional.logsigmoid(BETA * h) + (1 - p) * BETA * h
    torch.testing.assert_close(soft_preference_loss(h, p, BETA), expected)


def test_at_init_the_loss_is_log2_for_any_p():
    p = torch.rand(100, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(soft_preference_loss(torch.zeros(100), p, BETA), torch.full((100,), math.log(2)))


def test_stable_for_huge_margins():
    h = torch.tensor([-1e6, -1e3, 1e3, 1e6])
    loss = soft_preference_loss(h, torch.tensor([0.0, 0.3, 0.7, 1.0]), BETA)
    assert torch.isfinite(loss).all()
    assert loss[0].item() == 0.0 and loss[-1].item() == 0.0


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan")])
def test_target_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\]") as info:
        soft_preference_loss(torch.zeros(3), torch.tensor([0.5, bad, 1.0]), BETA)
    if not math.isnan(bad):
        assert f"{bad:.6g}" in str(info.value)


def test_margin_gap_clips_hard_targets():
    h = torch.tensor([0.0, 0.0, 10.0], dtype=torch.float64)
    gap = margin_gap(h, torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64), BETA)
    logit_hi = math.log((1 - 1e-6) / 1e-6)
    torch.testing.assert_close(gap, torch.tensor([0.0, logit_hi, 1.0 + logit_hi], dtype=torch.float64))
    # bf16 margins are measured in float32: 1 − 1e-6 would round to 1 (logit = inf) in bf16
    assert torch.isfinite(margin_gap(h.bfloat16(), torch.ones(3, dtype=torch.bfloat16), BETA)).all()


# --------------------------------------------------------------------------------------------------------------------
# Through the trainer, against TRL's own sigmoid DPO loss
# --------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    """A tiny tokenizer, policy, and a reference with perturbed weights (so h ≠ 0), plus 16 preference pairs."""
    tokenizer = train_tokenizer(tokenizer_corpus(n=400), 160)
    policy = build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                              max_position_embeddings=128, seed=0)
    reference = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=g))
    rows = preference_pairs(16, 0, noise=0.5, temperature=0.1)
    return tokenizer, policy, reference, Dataset.from_list(rows)


def _config(tmp_path, **overrides) -> DPOConfig:
    kwargs = {"output_dir": str(tmp_path), "bf16": False, "use_cpu": True, **activation_checkpointing_argument(False),
              "report_to": [], "per_device_train_batch_size": 4, "max_length": 48, "beta": BETA}
    return DPOConfig(**{**kwargs, **overrides})


def _trainer(cls, tiny, tmp_path, dataset=None, *, ref=True, peft=False, **config):
    tokenizer, policy, reference, pairs = tiny
    model = copy.deepcopy(policy)
    if peft:  # same seed inside the trainer -> same adapter init in both trainers
        trainer = cls(model=model, args=_config(tmp_path, **config), train_dataset=dataset or pairs,
                      processing_class=tokenizer,
                      peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "v_proj"]))
        g = torch.Generator().manual_seed(5)  # LoRA B starts at zero; perturb it so policy ≠ reference
        with torch.no_grad():
            for name, param in sorted(trainer.model.named_parameters()):
                if "lora_B" in name:
                    param.copy_(0.5 * torch.randn(param.shape, generator=g))
        return trainer
    return cls(model=model, ref_model=copy.deepcopy(reference) if ref else None, args=_config(tmp_path, **config),
               train_dataset=dataset or pairs, processing_class=tokenizer)


def _batch(trainer, n=4):
    """The first ``n`` rows, through the same column filtering and collator as the training dataloader."""
    dataset = trainer._remove_unused_columns(trainer.train_dataset)
    return trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(n)]))


def _h(trainer, batch):
    """Per-pair DPO logits of a batch, from the trainer's own log-prob function (policy and explicit reference)."""
    inputs = {k: v for k, v in batch.items() if k != "preference"}
    policy_c, policy_r = trainer.compute_ref_log_probs(trainer.model, inputs)
    ref_c, ref_r = trainer.compute_ref_log_probs(trainer.ref_model, inputs)
    return dpo_logits(policy_c, policy_r, ref_c, ref_r)


def _with_preference(pairs, values):
    return pairs.add_column("preference", [float(v) for v in values])


@pytest.mark.parametrize("setup", ["ref_model", "precompute", "peft"])
def test_p_one_equals_trl_sigmoid_loss_and_gradients(tiny, tmp_path, setup):
    pairs = tiny[3]
    kwargs = {"ref_model": {}, "precompute": {"precompute_ref_log_probs": True}, "peft": {"ref": False, "peft": True}}
    stock = _trainer(DPOTrainer, tiny, tmp_path / "stock", **kwargs[setup])
    soft = _trainer(SoftPreferenceDPOTrainer, tiny, tmp_path / "soft", _with_preference(pairs, [1.0] * len(pairs)),
                    **kwargs[setup])
    stock_batch, soft_batch = _batch(stock), _batch(soft)
    assert torch.equal(soft_batch["preference"], torch.ones(4))
    assert torch.equal(stock_batch["input_ids"], soft_batch["input_ids"])

    stock_loss = stock.compute_loss(stock.model, stock_batch)
    soft_loss = soft.compute_loss(soft.model, soft_batch)
    assert abs(stock_loss.item() - math.log(2)) > 1e-3  # policy ≠ reference: a real comparison
    assert soft_loss.item() == pytest.approx(stock_loss.item(), abs=1e-6)

    stock_loss.backward()
    soft_loss.backward()
    stock_grads = {n: p.grad for n, p in stock.model.named_parameters() if p.grad is not None}
    soft_grads = {n: p.grad for n, p in soft.model.named_parameters() if p.grad is not None}
    assert stock_grads and stock_grads.keys() == soft_grads.keys()
    for name, grad in stock_grads.items():
        torch.testing.assert_close(soft_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)

    for key in ("rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert soft._metrics["train"][key] == pytest.approx(stock._metrics["train"][key], abs=1e-6)


def test_p_07_is_trl_sigmoid_plus_linear_margin_penalty(tiny, tmp_path):
    """§4a: L_SPCE = −log σ(βh) + (1−p)βh, with h from the same real batch."""
    pairs = tiny[3]
    stock = _trainer(DPOTrainer, tiny, tmp_path / "stock")
    soft = _trainer(SoftPreferenceDPOTrainer, tiny, tmp_path / "soft", _with_preference(pairs, [0.7] * len(pairs)))
    stock_batch, soft_batch = _batch(stock), _batch(soft)
    h = _h(soft, soft_batch)
    torch.testing.assert_close(h, _h(stock, stock_batch), atol=0, rtol=0)
    assert h.abs().max() > 1.0

    stock_loss = stock.compute_loss(stock.model, stock_batch).item()
    soft_loss = soft.compute_loss(soft.model, soft_batch).item()
    assert soft_loss == pytest.approx(stock_loss + 0.3 * BETA * h.mean().item(), abs=1e-6)

    expected_gap = margin_gap(h, 0.7, BETA).mean().item()
    assert soft._metrics["train"]["soft/margin_gap"] == [pytest.approx(expected_gap, abs=1e-5)]
    assert soft._metrics["train"]["soft/preference"] == [pytest.approx(0.7)]
    assert soft._metrics["train"]["rewards/margins"] == [pytest.approx(BETA * h.mean().item(), abs=1e-5)]


def test_soft_loss_keeps_trls_nll_anchor_term(tiny, tmp_path):
    """loss_type [sigmoid, sft]: only the sigmoid term becomes soft; TRL's NLL term on the chosen response stays."""
    pairs = tiny[3]
    config = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}
    stock = _trainer(DPOTrainer, tiny, tmp_path / "stock", **config)
    soft = _trainer(SoftPreferenceDPOTrainer, tiny, tmp_path / "soft", _with_preference(pairs, [0.7] * len(pairs)),
                    **config)
    stock_batch, soft_batch = _batch(stock), _batch(soft)
    h = _h(soft, soft_batch)
    stock_loss = stock.compute_loss(stock.model, stock_batch).item()
    soft_loss = soft.compute_loss(soft.model, soft_batch).item()
    assert soft_loss == pytest.approx(stock_loss + 1.0 * 0.3 * BETA * h.mean().item(), abs=1e-6)


def test_per_pair_targets_follow_their_rows(tiny, tmp_path):
    pairs = tiny[3]
    targets = torch.rand(len(pairs), generator=torch.Generator().manual_seed(4))
    soft = _trainer(SoftPreferenceDPOTrainer, tiny, tmp_path, _with_preference(pairs, targets.tolist()))
    batch = _batch(soft, n=8)
    torch.testing.assert_close(batch["preference"], targets[:8])
    h = _h(soft, batch)
    expected = soft_preference_loss(h, targets[:8], BETA).mean()
    assert soft.compute_loss(soft.model, batch).item() == pytest.approx(expected.item(), abs=1e-6)


def test_at_init_the_trainer_loss_is_log2_for_any_p(tiny, tmp_path):
    pairs = tiny[3]
    targets = torch.rand(len(pairs), generator=torch.Generator().manual_seed(6)).tolist()
    soft = _trainer(SoftPreferenceDPOTrainer, tiny, tmp_path, _with_preference(pairs, targets),
                    precompute_ref_log_probs=True, ref=False)  # reference = the initial policy
    assert soft.compute_loss(soft.model, _batch(soft)).item() == pytest.approx(math.log(2), abs=1e-6)


def test_label_smoothing_is_cdpo_where_trl_sigmoid_ignores_it(tiny, tmp_path):
    pairs = tiny[3]
    ignored = _trainer(DPOTrainer, tiny, tmp_path / "a", label_smoothing=0.1)
    plain = _trainer(DPOTrainer, tiny, tmp_path / "b")
    cdpo = _trainer(SoftPreferenceDPOTrainer, tiny, tmp_path / "c", label_smoothing=0.1)
    column = _trainer(SoftPreferenceDPOTrainer, tiny, tmp_path / "d", _with_preference(pairs, [0.9] * len(pairs)))
    losses = [t.compute_loss(t.model, _batch(t)).item() for t in (ignored, plain, cdpo, column)]
    assert losses[0] == losses[1]  # TRL 1.16: sigmoid + label_smoothing is plain DPO
    assert losses[2] == pytest.approx(losses[3], abs=1e-6)
    assert abs(losses[2] - losses[1]) > 1e-4


@pytest.mark.parametrize("loss_type, weights", [
    (["sigmoid", "robust"], [1.0, 1.0]),
    (["robust", "sigmoid"], [0.5, 2.0]),  # sigmoid anywhere in the list, at its own weight
    (["hinge", "sft", "sigmoid"], [0.5, 0.25, 1.5]),
])
def test_label_smoothing_makes_the_sigmoid_entry_cdpo_beside_other_losses(tiny, tmp_path, loss_type, weights):
    """label_smoothing ε is conservative DPO for the sigmoid entry wherever it sits (TRL's sigmoid ignores ε, so it
    stayed hard DPO beside robust), while the other entries stay TRL's own; hand-computed from the same batch's h."""
    eps = 0.2
    config = {"loss_type": loss_type, "loss_weights": weights, "label_smoothing": eps}
    stock = _trainer(DPOTrainer, tiny, tmp_path / "stock", **config)
    ours = _trainer(SoftPreferenceDPOTrainer, tiny, tmp_path / "ours", **config)
    stock_batch, batch = _batch(stock), _batch(ours)
    h = _h(ours, batch)
    with torch.no_grad():
        stock_loss = stock.compute_loss(stock.model, stock_batch).item()
        loss = ours.compute_loss(ours.model, batch).item()

    z = BETA * h
    hard = -F.logsigmoid(z)
    cdpo = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)  # §5 cDPO
    w_sigmoid = weights[loss_type.index("sigmoid")]
    assert abs(cdpo.mean().item() - hard.mean().item()) > 1e-3  # a real difference to find
    assert loss == pytest.approx(stock_loss + w_sigmoid * (cdpo.mean() - hard.mean()).item(), abs=1e-6)
    if loss_type[:2] == ["sigmoid", "robust"]:  # every term by hand: cDPO + TRL's robust loss
        robust = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
        assert loss == pytest.approx((cdpo.mean() + robust.mean()).item(), abs=1e-6)


def test_short_soft_training_run_lowers_the_loss_and_logs_the_margin_gap(tiny, tmp_path):
    tokenizer, policy, _, pairs = tiny
    pairs = pairs.select(range(8))
    targets = torch.linspace(0.6, 0.9, 8).tolist()
    trainer = SoftPreferenceDPOTrainer(
        model=copy.deepcopy(policy), ref_model=copy.deepcopy(policy), processing_class=tokenizer,
        train_dataset=_with_preference(pairs, targets), eval_dataset=_with_preference(pairs, targets),
        args=_config(tmp_path, beta=0.5, learning_rate=1e-3, max_steps=10, per_device_train_batch_size=8,
                     logging_steps=1, save_strategy="no", lr_scheduler_type="constant"),
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 10
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.02, [entry["loss"] for entry in logs]
    assert all("soft/margin_gap" in entry for entry in logs)
    assert logs[-1]["soft/margin_gap"] < logs[0]["soft/margin_gap"]
    assert logs[-1]["rewards/margins"] > 0
    metrics = trainer.evaluate()  # the eval path (prediction_step) gets the soft loss and metrics too
    assert metrics["eval_soft/preference"] == pytest.approx(sum(targets) / len(targets))
    assert metrics["eval_loss"] < logs[0]["loss"]


@pytest.mark.parametrize("bad", [1.5, -0.25, float("nan")])
def test_dataset_preference_outside_unit_interval_is_rejected(tiny, tmp_path, bad):
    pairs = tiny[3]
    values = [0.5] * len(pairs)
    values[3] = bad
    with pytest.raises(ValueError, match="column 'preference'.*row 3"):
        _trainer(SoftPreferenceDPOTrainer, tiny, tmp_path, _with_preference(pairs, values))


@pytest.mark.parametrize("loss_type", [["ipo"], ["sft", "sigmoid"], ["hinge"], ["sigmoid", "ipo"]])
def test_preference_column_needs_sigmoid_loss(tiny, tmp_path, loss_type):
    pairs = tiny[3]
    with pytest.raises(ValueError, match=r"loss_type=\['sigmoid'\]"):
        _trainer(SoftPreferenceDPOTrainer, tiny, tmp_path, _with_preference(pairs, [0.8] * len(pairs)),
                 loss_type=loss_type)


def test_preference_column_with_label_smoothing_is_ambiguous(tiny, tmp_path):
    pairs = tiny[3]
    with pytest.raises(ValueError, match="label_smoothing"):
        _trainer(SoftPreferenceDPOTrainer, tiny, tmp_path, _with_preference(pairs, [0.8] * len(pairs)),
                 label_smoothing=0.1)


def test_without_the_column_other_loss_types_are_stock_trl(tiny, tmp_path):
    stock = _trainer(DPOTrainer, tiny, tmp_path / "a", loss_type=["ipo"])
    ours = _trainer(SoftPreferenceDPOTrainer, tiny, tmp_path / "b", loss_type=["ipo"])
    assert ours.compute_loss(ours.model, _batch(ours)).item() == stock.compute_loss(stock.model, _batch(stock)).item()


def test_collator_reads_null_preference_as_a_hard_label():
    def base(examples):
        assert all("preference" not in example for example in examples)
        return {"n": len(examples)}

    collator = PreferenceTargetCollator(base)
    batch = collator([{"preference": 0.25}, {"preference": None}, {}])
    assert batch["n"] == 3
    assert batch["preference"].tolist() == [0.25, 1.0, 1.0]
    assert collator([{"x": 1}]) == {"n": 1}


def test_ids_label_update_hand_value_and_mle_limit():
    from alignpipe.losses.preference import ids_label_update

    # §14e: label 1, model probability 0.6, rate 0.3 -> 0.7 * 1 + 0.3 * 0.6 = 0.88
    assert ids_label_update(torch.tensor([1.0]), torch.tensor([0.6]), 0.3).item() == pytest.approx(0.88)
    labels = torch.tensor([1.0, 0.0, 0.7])
    assert torch.equal(ids_label_update(labels, torch.tensor([0.2, 0.9, 0.1]), 0.0), labels)  # rate 0 = plain MLE
    with pytest.raises(ValueError, match="rate"):
        ids_label_update(labels, labels, 1.5)


def test_ids_keeps_a_single_comparison_bounded_where_mle_diverges():
    """§14e: a 2-arm bandit seen once; MLE drives |r1 − r2| up every epoch, IDS soft labels keep it bounded."""
    from alignpipe.losses.preference import ids_label_update, soft_preference_loss

    def train(rate, epochs=300):
        margin = torch.zeros(1, requires_grad=True)  # r1 − r2
        label = torch.ones(1)
        optimiser = torch.optim.SGD([margin], lr=1.0)
        for _ in range(epochs):
            optimiser.zero_grad()
            soft_preference_loss(margin, label, beta=1.0).sum().backward()
            optimiser.step()
            label = ids_label_update(label, torch.sigmoid(margin.detach()), rate)
        return margin.item()

    mle, ids = train(rate=0.0), train(rate=0.3)
    assert mle > 4.0  # keeps growing (≈ log of the step count)
    assert ids < 2.0 and ids < mle / 2


def test_lora_dropout_is_off_in_dpo_training_as_documented(tiny, tmp_path):
    """The dpo and online stages keep TRL's disable_dropout (standard for DPO: policy and reference log-probs are
    computed alike), which zeroes the LoRA dropout too; LoraSpec.dropout must say so, since the recipe's value is
    not what trains there."""
    from alignpipe.recipe import LoraSpec

    tokenizer, policy, _, pairs = tiny
    spec = LoraSpec()
    assert spec.dropout > 0 and "disable_dropout" in LoraSpec.model_fields["dropout"].description
    trainer = SoftPreferenceDPOTrainer(
        model=copy.deepcopy(policy), args=_config(tmp_path), train_dataset=pairs, processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=spec.dropout, task_type="CAUSAL_LM",
                               target_modules=["q_proj", "v_proj"]))
    rates = {m.p for name, m in trainer.model.named_modules() if "lora_dropout" in name
             and isinstance(m, torch.nn.Dropout)}
    assert trainer.args.disable_dropout and rates == {0.0}


def test_soft_preference_loss_refuses_beta_zero():
    with pytest.raises(ValueError, match="beta must be > 0"):
        soft_preference_loss(torch.tensor([1.0]), 1.0, beta=0.0)


def test_ids_rate_one_replaces_labels_with_model_probabilities():
    from alignpipe.losses.preference import ids_label_update

    # rate 1 (allowed edge): 0 * 1.0 + 1 * 0.6 = 0.6
    assert ids_label_update(torch.tensor([1.0]), torch.tensor([0.6]), 1.0).item() == pytest.approx(0.6)


def test_precomputed_reference_log_probs_are_trls_kept_in_memory(tiny, tmp_path):
    """TRL writes them to an Arrow file whose name, for a dataset with no file behind it, is a random one in each
    process's own temporary folder (a 2-process stage failed: tests/test_distributed.py). Here they are TRL's own
    numbers, row for row, with a last batch smaller than the others."""
    soft = _trainer(SoftPreferenceDPOTrainer, tiny, tmp_path, precompute_ref_log_probs=True, ref=False,
                    precompute_ref_batch_size=3)
    assert soft.train_dataset.cache_files == []  # nothing written
    prepared = soft.train_dataset.remove_columns(["ref_chosen_logps", "ref_rejected_logps"])
    assert len(prepared) % 3 != 0
    trls = DPOTrainer._precompute_ref_logps(soft, prepared, "train", 5)
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        ours, theirs = torch.tensor(soft.train_dataset[column]), torch.tensor(trls[column])
        assert ours.shape == (len(prepared),) and ours.std() > 0.1
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
