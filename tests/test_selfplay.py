"""Self-play (SPPO, SPIN, DNO, INPO): hand values of ALGORITHMS.md §7e-§10e, the trainers against a direct
computation on the same batch, and the stages through the shared iterative loop."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
from conftest import TINY_RECIPE, write_recipe
from datasets import Dataset
from trl import DPOConfig

from alignpipe.data.selfplay import (
    INPODraw,
    INPOPair,
    SelfPlayPair,
    inpo_draw,
    inpo_pair,
    large_margin_pair,
    passes_margin,
    preference_matrix_from_scores,
    sppo_pair,
    win_rates,
)
from alignpipe.losses.preference import dpo_logits, ipo_loss, soft_preference_loss
from alignpipe.losses.selfplay import inpo_logits, inpo_loss, sppo_loss
from alignpipe.models.loading import activation_checkpointing_argument
from alignpipe.models.tiny import build_tiny_model
from alignpipe.pipeline.rundir import StageDir
from alignpipe.pipeline.runner import Runner
from alignpipe.recipe import RecipeError, load_recipe
from alignpipe.rewards.judges import GoldPairwiseJudge, preference_matrices
from alignpipe.tasks.synthetic import preference_pairs
from alignpipe.trainers.round_methods import inpo_pairs
from alignpipe.trainers.selfplay_trainers import INPOTrainer, SPPOTrainer

T = torch.tensor


# --------------------------------------------------------------------------------------------------------------------
# Pure maths (hand values)
# --------------------------------------------------------------------------------------------------------------------

def test_sppo_loss_hand_value():
    """§7e: η = 1, ρ_w = 2, P̂_w = 0.8, ρ_l = −1, P̂_l = 0.2 -> 0.5[(2 − 0.3)² + (−1 + 0.3)²] = 1.69."""
    loss = sppo_loss(T([2.0]), T([-1.0]), T([0.8]), T([0.2]), eta=1.0)
    assert loss.item() == pytest.approx(1.69, abs=1e-6)


def test_sppo_ties_pull_back_to_the_previous_iterate():
    """§7e limit: all-tie win rates give targets 0, so the minimiser is ρ = 0 (π_θ = π_t)."""
    rho = torch.tensor([0.7, -0.4], requires_grad=True)
    sppo_loss(rho[:1], rho[1:], T([0.5]), T([0.5]), eta=10.0).sum().backward()
    assert rho.grad.tolist() == pytest.approx([0.7, -0.4])  # d/dρ 0.5ρ² = ρ: gradient descent moves ρ to 0


def test_sppo_rejects_win_rates_outside_unit_interval():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sppo_loss(T([0.0]), T([0.0]), T([1.2]), T([0.2]), eta=1.0)


def test_win_rate_matrix_hand_values_and_constant_sum():
    """§7e: scores [2, 0, 0] -> P̂_0 = 0.7539, P̂_1 = P̂_2 = 0.3731; Σ P̂ = K/2."""
    matrix = preference_matrix_from_scores([2.0, 0.0, 0.0])
    assert matrix[0][1] == pytest.approx(0.8808, abs=1e-4) and matrix[1][1] == 0.5
    rates = win_rates(matrix)
    assert rates == pytest.approx([0.7539, 0.3731, 0.3731], abs=1e-4)
    assert sum(rates) == pytest.approx(3 / 2, abs=1e-12)
    random_scores = [random.Random(0).gauss(0, 3) for _ in range(7)]
    assert sum(win_rates(preference_matrix_from_scores(random_scores))) == pytest.approx(7 / 2, abs=1e-12)
    # a gap past exp's range (reward-model scores at a low temperature) is a sure preference, not an OverflowError
    assert preference_matrix_from_scores([0.0, 8.0], temperature=0.01) == [[0.5, 0.0], [1.0, 0.5]]


def test_judge_matrix_is_constant_sum_and_matches_the_judge():
    judge = GoldPairwiseJudge(temperature=0.5)
    prompt = "copy : 3 1 2"
    responses = ["3 1 2", "3 1", "9", "3 1 2 2"]
    (matrix,) = preference_matrices(judge, [prompt], [responses])
    for i, a in enumerate(responses):
        assert matrix[i][i] == 0.5
        for j, b in enumerate(responses):
            if i != j:
                assert matrix[i][j] == pytest.approx(judge.pairwise_probability(prompt, a, b), abs=1e-12)
                assert matrix[i][j] + matrix[j][i] == pytest.approx(1.0, abs=1e-12)
    assert sum(win_rates(matrix)) == pytest.approx(2.0, abs=1e-12)


def test_sppo_pair_takes_extremes_with_their_win_rates():
    responses = ["a", "b", "c"]
    pair = sppo_pair("x", responses, preference_matrix_from_scores([0.0, 2.0, -1.0]))
    rates = win_rates(preference_matrix_from_scores([0.0, 2.0, -1.0]))
    assert (pair.chosen, pair.rejected) == ("b", "c")
    assert (pair.chosen_win_rate, pair.rejected_win_rate) == (rates[1], rates[2])
    assert sppo_pair("x", responses, preference_matrix_from_scores([1.0, 1.0, 1.0])) is None  # all tie


class UnsteadyJudge:
    """Scores two copies of one text as not a tie, P(a ≻ a) ≠ ½, differently in each call, as a judge whose verdicts
    are not bit-reproducible does (batched GPU inference, a sampled verdict): order averaging does not cancel it."""

    judge_id = "unsteady"

    def __init__(self):
        self.calls = 0

    def pairwise_probabilities(self, prompts, a, b):
        self.calls += 1
        return [0.5 + 0.05 * self.calls if x == y else 0.9 if len(x) > len(y) else 0.1 for x, y in zip(a, b)]


@pytest.mark.parametrize("k", [2, 3, 5])
def test_sppo_and_dno_skip_a_prompt_whose_best_and_worst_are_the_same_text(k):
    """K copies of one sample got win rates apart and became a pair of one response with itself; the round now skips
    the prompt (counted as giving no pair), as OSP, SPIN and INPO do, and a prompt with two texts keeps its pair."""
    from alignpipe.trainers.round_methods import win_rate_pairs

    matrix = [[0.5] * k for _ in range(k)]
    matrix[0][1], matrix[1][0] = 0.6, 0.4  # the judge's P(a ≻ a) for two copies
    assert sppo_pair("x", ["a"] * k, matrix) is None
    assert large_margin_pair("x", ["a"] * k, matrix, 0.0) is None
    prompts, groups = ["reverse: 1 2 3", "copy: 1 2"], [["3 2 1"] * k, ["1 2", "1", "1 2"]]
    (pair,) = win_rate_pairs(UnsteadyJudge(), prompts, groups, None)
    assert (pair.prompt, pair.chosen, pair.rejected) == ("copy: 1 2", "1 2", "1")
    assert win_rate_pairs(UnsteadyJudge(), prompts, groups, 0.0) == [pair]  # DNO


def test_sppo_pair_breaks_win_rate_ties_towards_the_lowest_index():
    """Ties are common with hard judges: the same round must give the same pair on every run and rank."""
    matrix = [[0.5, 0.5, 1.0, 1.0], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5]]
    pair = sppo_pair("x", ["a", "b", "c", "d"], matrix)
    assert (pair.chosen, pair.rejected) == ("a", "c")


def test_self_play_pair_rows_carry_each_responses_own_win_rate():
    row = SelfPlayPair("x", "good", "bad", 0.75, 0.25).to_row()
    assert (row["chosen"][0]["content"], row["chosen_win_rate"]) == ("good", 0.75)
    assert (row["rejected"][0]["content"], row["rejected_win_rate"]) == ("bad", 0.25)


def test_self_play_inputs_outside_their_domain_are_refused():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        preference_matrix_from_scores([1.0, 0.0], temperature=0.0)
    with pytest.raises(ValueError, match="K >= 2"):
        win_rates([[0.5]])
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        large_margin_pair("x", ["a", "b"], preference_matrix_from_scores([3.0, 0.0]), 1.0)

def test_spin_is_dpo_with_the_previous_iterate_as_reference():
    """§8e: SPIN's logistic loss on λ·h with ref π_t equals DPO's hand value (h = 3, λ = 0.1 -> 0.554355)."""
    h = dpo_logits(T(-10.0), T(-15.0), T(-12.0), T(-14.0))  # logps under π_θ and π_t
    spin = torch.log1p(torch.exp(-0.1 * h))  # ℓ(z) = log(1 + e^{−z})
    assert spin.item() == pytest.approx(0.554355, abs=1e-6)
    assert soft_preference_loss(h, 1.0, 0.1).item() == pytest.approx(spin.item(), abs=1e-7)


@pytest.mark.parametrize("scores, kept", [((0.55, 0.45), False), ((0.9, 0.3), True), ((0.6, 0.4), True)])
def test_dno_margin_filter_cases(scores, kept):
    """§9e: threshold 0.2 on judge scores in [0, 1]: (0.55, 0.45) dropped, (0.9, 0.3) kept; the gap is inclusive."""
    assert passes_margin(*scores, threshold=0.2) is kept
    assert passes_margin(0.5995, 0.4, threshold=0.2) is False  # only float rounding is forgiven, not a shortfall


def test_dno_large_margin_pair_filters_on_the_win_rate_gap():
    near = preference_matrix_from_scores([0.1, 0.0])  # win rates 0.5125 / 0.4875: gap 0.025
    far = preference_matrix_from_scores([3.0, 0.0])  # gap 0.45
    assert large_margin_pair("x", ["a", "b"], near, 0.2) is None
    pair = large_margin_pair("x", ["a", "b"], far, 0.2)
    assert (pair.chosen, pair.rejected) == ("a", "b")


def test_inpo_reductions():
    """§10e: τ = 0 is online IPO against π_t; π_θ = π_t = π_ref gives h = 0 and loss η²/4."""
    g = torch.Generator().manual_seed(0)
    pc, pr, ac, ar, tc, tr = (torch.randn(5, generator=g) for _ in range(6))
    h0 = inpo_logits(pc, pr, ac, ar, tc, tr, mix=0.0)
    torch.testing.assert_close(h0, dpo_logits(pc, pr, tc, tr))
    eta = 4.0
    torch.testing.assert_close(inpo_loss(h0, eta), ipo_loss(h0, tau=1 / eta))  # target η/2 = 1/(2τ)
    same = inpo_logits(pc, pr, pc, pr, pc, pr, mix=0.3)
    torch.testing.assert_close(same, torch.zeros(5), atol=1e-6, rtol=0)  # float rounding of 0.3·x + 0.7·x − x
    torch.testing.assert_close(inpo_loss(same, eta), torch.full((5,), eta**2 / 4))
    h1 = inpo_logits(pc, pr, ac, ar, tc, tr, mix=1.0)  # mix = 1: against the fixed reference only
    torch.testing.assert_close(h1, dpo_logits(pc, pr, ac, ar))


def test_inpo_pair_labels_follow_the_preference_draw():
    rng = random.Random(0)

    def chosen(matrix):
        draw = inpo_draw(["a", "b"], rng)
        return inpo_pair("x", ["a", "b"], draw, matrix[draw.first][draw.second]).chosen

    sure = preference_matrix_from_scores([5.0, -5.0], temperature=1.0)  # P(a > b) = 0.99995
    assert [chosen(sure) for _ in range(200)].count("a") >= 199
    fair = preference_matrix_from_scores([0.0, 0.0])
    assert 0.45 < [chosen(fair) for _ in range(2000)].count("a") / 2000 < 0.55
    assert inpo_draw(["same", "same"], rng) is None
    against = inpo_pair("x", ["a", "b"], INPODraw(0, 1, uniform=0.7), 0.6)  # 0.7 >= P(a > b): b is chosen
    assert (against.chosen, against.rejected) == ("b", "a") and against.chosen_preference == pytest.approx(0.4)
    # a preference of 0: the first sample is never chosen, even by a uniform of exactly 0
    assert inpo_pair("x", ["a", "b"], INPODraw(0, 1, uniform=0.0), 0.0) == INPOPair("x", "b", "a", 1.0)


class CountingJudge:
    """Prefers the longer reply and, by 0.1, whichever is shown first (so both orders matter); counts evaluations."""

    judge_id = "counting"

    def __init__(self):
        self.evaluations = 0

    def pairwise_probabilities(self, prompts, a, b):
        self.evaluations += len(prompts)
        return [min(1.0, max(0.0, 0.6 + 0.15 * (len(x.split()) - len(y.split())))) for x, y in zip(a, b)]


def _inpo_from_the_full_matrix(judge, prompts, responses, rng):
    """INPO's pairs as the stage built them from a judged K×K matrix: draw two samples, label by P[i][j]."""
    pairs = []
    for prompt, group, matrix in zip(prompts, responses, preference_matrices(judge, prompts, responses)):
        i, j = rng.sample(range(len(group)), 2)
        if group[i] == group[j]:
            continue
        if rng.random() >= matrix[i][j]:
            i, j = j, i
        pairs.append((prompt, group[i], group[j], matrix[i][j]))
    return pairs


def test_inpo_judges_only_its_drawn_pair_and_keeps_the_matrix_path_labels():
    """One judged pair per prompt (both orders: 2 evaluations, not K(K-1) = 20), and for the same seed the same
    pairs and labels as drawing from the full matrix."""
    data = random.Random(7)
    prompts = [f"copy: {n}" for n in range(40)]
    responses = [[" ".join(data.choice("12") for _ in range(data.randint(1, 3))) for _ in range(5)] for _ in prompts]
    matrix_judge, pair_judge = CountingJudge(), CountingJudge()
    expected = _inpo_from_the_full_matrix(matrix_judge, prompts, responses, random.Random("inpo:0:0"))
    pairs = inpo_pairs(pair_judge, prompts, responses, random.Random("inpo:0:0"))
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [e[:3] for e in expected]
    assert [p.chosen_preference for p in pairs] == pytest.approx([e[3] for e in expected], abs=1e-12)
    assert [p.to_row() for p in pairs] == [{"prompt": [{"role": "user", "content": prompt}],
                                            "chosen": [{"role": "assistant", "content": chosen}],
                                            "rejected": [{"role": "assistant", "content": rejected}]}
                                           for prompt, chosen, rejected, _ in expected]
    assert matrix_judge.evaluations == len(prompts) * 5 * 4
    assert pair_judge.evaluations == 2 * len(pairs)
    assert len(pairs) < len(prompts)  # some draws were one text twice: no pair, no judge call
    assert any(p.chosen_preference < 0.5 for p in pairs) and any(p.chosen_preference > 0.5 for p in pairs)


# --------------------------------------------------------------------------------------------------------------------
# Trainers: the loss TRL's loop optimises equals the pure function on the same batch
# --------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tokenizer):
    policy = build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                              max_position_embeddings=128, seed=0)

    def perturbed(seed):
        model = copy.deepcopy(policy)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.3 * torch.randn(param.shape, generator=g))
        return model

    return policy, perturbed(1), perturbed(2)


def _rows(n=8):
    rows = preference_pairs(n, 0, noise=0.5, temperature=0.1)
    rng = random.Random(0)
    for row in rows:
        row["chosen_win_rate"] = rng.uniform(0.5, 1.0)
        row["rejected_win_rate"] = rng.uniform(0.0, 0.5)
    return rows


def _make(cls, tokenizer, models, tmp_path, rows, config=None, **kwargs):
    policy, previous, _ = models
    args = DPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to=[], per_device_train_batch_size=4,
                     max_length=48, beta=0.5, **activation_checkpointing_argument(False), **(config or {}))
    return cls(model=copy.deepcopy(policy), ref_model=copy.deepcopy(previous), args=args,
               train_dataset=Dataset.from_list(rows), processing_class=tokenizer, **kwargs)


def _batch(trainer, n=4):
    dataset = trainer._remove_unused_columns(trainer.train_dataset)
    return trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(n)]))


def _logps(trainer, model, batch):
    inputs = {k: v for k, v in batch.items() if k not in ("chosen_win_rate", "rejected_win_rate")}
    return trainer.compute_ref_log_probs(model, inputs)


def test_sppo_trainer_loss_is_the_sppo_loss_on_the_batch(tokenizer, models, tmp_path):
    trainer = _make(SPPOTrainer, tokenizer, models, tmp_path, _rows())
    batch = _batch(trainer)
    rows = _rows()[:4]
    assert batch["chosen_win_rate"].tolist() == pytest.approx([r["chosen_win_rate"] for r in rows])
    pc, pr = _logps(trainer, trainer.model, batch)
    tc, tr = _logps(trainer, trainer.ref_model, batch)
    expected = sppo_loss(pc - tc, pr - tr, batch["chosen_win_rate"], batch["rejected_win_rate"], eta=2.0).mean()
    loss = trainer.compute_loss(trainer.model, batch)
    assert expected.item() > 1e-3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.parameters())


def test_sppo_trainer_requires_the_win_rate_columns(tokenizer, models, tmp_path):
    rows = [{k: v for k, v in r.items() if k not in ("chosen_win_rate", "rejected_win_rate")} for r in _rows()]
    trainer = _make(SPPOTrainer, tokenizer, models, tmp_path, rows)
    with pytest.raises(ValueError, match="chosen_win_rate"):
        trainer.compute_loss(trainer.model, _batch(trainer))


def test_inpo_trainer_loss_mixes_the_anchor_and_previous_iterate(tokenizer, models, tmp_path):
    anchor = copy.deepcopy(models[2])
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in _rows()]
    trainer = _make(INPOTrainer, tokenizer, models, tmp_path, rows, anchor_model=anchor, mix=0.3)
    batch = _batch(trainer)
    pc, pr = _logps(trainer, trainer.model, batch)
    tc, tr = _logps(trainer, trainer.ref_model, batch)
    ac, ar = _logps(trainer, trainer.anchor_model, batch)
    expected = inpo_loss(inpo_logits(pc, pr, ac, ar, tc, tr, mix=0.3), eta=2.0).mean()
    assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("option", [{"use_weighting": True}, {"f_divergence_type": "js_divergence"},
                                    {"ld_alpha": 0.5}, {"loss_type": ["sigmoid", "hinge"]}])
@pytest.mark.parametrize("cls", [SPPOTrainer, INPOTrainer])
def test_selfplay_trainers_refuse_options_that_change_trls_sigmoid_term(tokenizer, models, tmp_path, cls, option):
    """Their loss replaces TRL's sigmoid term assuming it is −log σ(βh); these options change that term (or add
    others), so the loss trained would be neither TRL's nor the method's: refused when the trainer is built."""
    extra = {"anchor_model": copy.deepcopy(models[2]), "mix": 0.3} if cls is INPOTrainer else {}
    (name, value), = option.items()
    with pytest.raises(ValueError, match=rf"{cls.__name__} (does not support|requires) DPOConfig {name}") as error:
        _make(cls, tokenizer, models, tmp_path, _rows(), config=option, **extra)
    assert "leave it at" in str(error.value) or "Use loss_type=['sigmoid']" in str(error.value)


# --------------------------------------------------------------------------------------------------------------------
# Stages through the shared loop
# --------------------------------------------------------------------------------------------------------------------

ROUND = {"inputs": ["sft"], "rounds": 2, "prompts_per_round": 16, "learning_rate": 2e-3,
         "per_device_train_batch_size": 8, "max_length": 48, "logging_steps": 2, "max_new_tokens": 10,
         "eval_prompts": 16, "save_steps": 1000}
JUDGED = {**ROUND, "judge": "gold", "samples_per_prompt": 4}


def _records(stage_dir):
    lines = [json.loads(line) for line in StageDir(stage_dir).metrics.read_text().splitlines()]
    return [r for r in lines if "round" in r]


@pytest.fixture(scope="module")
def selfplay_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("selfplay")
    recipe = {**TINY_RECIPE, "stages": [
        TINY_RECIPE["stages"][0],
        {"name": "sppo", "type": "sppo", **JUDGED},
        {"name": "spin", "type": "spin", **ROUND, "inputs": ["sppo"]},
        {"name": "dno", "type": "dno", **JUDGED, "margin_threshold": 0.1},
        {"name": "inpo", "type": "inpo", **JUDGED},
    ]}
    runner = Runner(load_recipe(write_recipe(directory, recipe)), runs_dir=directory / "runs", in_process=True)
    return runner, {o.name: o for o in runner.run()}


@pytest.mark.parametrize("name", ["sppo", "spin", "dno", "inpo"])
def test_each_method_runs_rounds_with_per_round_evaluation(selfplay_run, name):
    runner, outcomes = selfplay_run
    assert outcomes[name].action == "ran"
    records = _records(runner.run_dir / name)
    assert [r["round"] for r in records] == [0, 1]
    for r in records:
        assert r["pairs"] > 0
        for key in ("gold_reward", "win_rate_vs_initial"):
            lo, hi = r[f"{key}_ci95"]
            assert lo <= r[key] <= hi
        assert r["kl_initial_k3"] >= 0
    assert (StageDir(runner.run_dir / name).checkpoint / "model.safetensors").exists()


def test_sppo_records_win_rates_and_gold_judged_pairs_agree_with_gold(selfplay_run):
    runner, _ = selfplay_run
    for r in _records(runner.run_dir / "sppo"):
        assert 0.5 < r["mean_chosen_win_rate"] <= 1.0 and 0.0 <= r["mean_rejected_win_rate"] < 0.5
        assert r["judge_gold_agreement"] == 1.0  # the gold judge ranks by gold itself
        assert "train/round_mean/sppo/chosen_logratio" in r and "train/last_logged/sppo/chosen_logratio" in r
    dno = _records(runner.run_dir / "dno")
    assert all(r["mean_chosen_win_rate"] - r["mean_rejected_win_rate"] >= 0.1 for r in dno)


def test_inpo_records_the_judged_preference_of_its_pairs_not_win_rates(selfplay_run):
    runner, _ = selfplay_run
    for r in _records(runner.run_dir / "inpo"):
        assert 0.0 <= r["mean_chosen_preference"] <= 1.0
        assert "mean_chosen_win_rate" not in r and "mean_rejected_win_rate" not in r


def test_previous_iterate_is_the_reference_of_round_one(selfplay_run, monkeypatch):
    """Round 1 trains against round 0's checkpoint (π_t), not the stage's input."""
    import alignpipe.trainers.iterative as iterative
    from alignpipe.trainers.round_methods import SelfPlayRule

    runner, _ = selfplay_run
    seen = []
    monkeypatch.setattr(iterative, "_train_round",
                        lambda ctx, method, r, model, tok, rows, ref: seen.append(ref) or {})
    monkeypatch.setattr(iterative, "_evaluate_round", lambda ctx, checkpoint, r: {
        "gold_reward": 0.0, "gold_reward_ci95": [0, 0], "win_rate_vs_initial": 0.5,
        "win_rate_vs_initial_ci95": [0.5, 0.5], "kl_initial_k3": 0.0})
    from alignpipe.pipeline.stage import load_context

    ctx = load_context(runner.run_dir / "sppo", resume=False)
    rounds = runner.run_dir / "sppo" / "rounds"
    iterative._run_round(ctx, SelfPlayRule("sppo"), 1, str(rounds / "round-0" / "checkpoint"),
                         str(rounds / "round-0" / "checkpoint"))
    assert seen == [None]  # policy == reference: TRL's own frozen copy of π_t
    iterative._run_round(ctx, SelfPlayRule("sppo"), 1, str(rounds / "round-0" / "checkpoint"),
                         ctx.start_model)
    assert seen[-1] == ctx.start_model


def _stage_recipe(stage: dict) -> dict:
    return {**TINY_RECIPE, "stages": [TINY_RECIPE["stages"][0], stage]}


@pytest.fixture
def load_recipe_dict(tmp_path):
    return lambda recipe: load_recipe(write_recipe(tmp_path, recipe))


def test_reward_judge_needs_a_reward_stage_as_second_input(load_recipe_dict):
    reward = {"name": "rm", "type": "reward", "inputs": ["sft"], "members": 2}
    ok = {**TINY_RECIPE, "stages": [TINY_RECIPE["stages"][0], reward,
                                    {"name": "sppo", "type": "sppo", **JUDGED, "judge": "reward",
                                     "inputs": ["sft", "rm"]}]}
    assert load_recipe_dict(ok).stage("sppo").judge == "reward"
    with pytest.raises(RecipeError, match="judge: reward needs 2 inputs"):
        load_recipe_dict(_stage_recipe({"name": "sppo", "type": "sppo", **JUDGED, "judge": "reward"}))
    with pytest.raises(RecipeError, match="only read with judge: reward"):
        load_recipe_dict({**ok, "stages": [*ok["stages"][:2], {**ok["stages"][2], "judge": "gold"}]})
    with pytest.raises(RecipeError, match="not a reward stage"):
        load_recipe_dict({**ok, "stages": [*ok["stages"][:2], {**ok["stages"][2], "inputs": ["sft", "sft"]}]})
    with pytest.raises(RecipeError, match="is a reward stage"):
        load_recipe_dict({**ok, "stages": [*ok["stages"][:2], {**ok["stages"][2], "inputs": ["rm", "sft"]}]})


def test_spin_has_no_judge_options(load_recipe_dict):
    with pytest.raises(RecipeError, match="samples_per_prompt"):
        load_recipe_dict(_stage_recipe({"name": "spin", "type": "spin", **JUDGED}))


def test_self_play_defaults_use_the_previous_iterate(load_recipe_dict):
    for kind in ("sppo", "spin", "dno", "inpo"):
        stage = load_recipe_dict(_stage_recipe({"name": kind, "type": kind, "inputs": ["sft"]})).stage(kind)
        assert stage.reference == "previous"
    assert math.isclose(load_recipe_dict(_stage_recipe({"name": "i", "type": "inpo", "inputs": ["sft"]}))
                        .stage("i").reference_mix, 0.1)


def test_inpo_reference_mix_needs_two_references(load_recipe_dict):
    """With reference: initial, INPO's anchor and TRL's reference are both the stage's input, so the mix is moot."""
    inpo = {"name": "i", "type": "inpo", "inputs": ["sft"], "reference": "initial"}
    assert load_recipe_dict(_stage_recipe(inpo)).stage("i").reference == "initial"  # the default mix is fine
    with pytest.raises(RecipeError, match=r"stages\.i\.reference_mix: mixes .* both references are the input"):
        load_recipe_dict(_stage_recipe({**inpo, "reference_mix": 0.5}))
    assert load_recipe_dict(_stage_recipe({**inpo, "reference": "previous", "reference_mix": 0.5}))


@pytest.mark.parametrize(("kind", "judge"), [("sppo", "self"), ("dno", "reward"), ("osp", "reward"),
                                             ("online_dpo", "self")])
def test_judge_temperature_is_read_by_the_gold_judge_only(load_recipe_dict, kind, judge):
    reward = {"name": "rm", "type": "reward", "inputs": ["sft"], "members": 2}
    stage = {"name": "s", "type": kind, "inputs": ["sft", "rm"] if judge == "reward" else ["sft"], "judge": judge}
    recipe = {**TINY_RECIPE, "stages": [TINY_RECIPE["stages"][0], reward, stage]}
    assert load_recipe_dict(recipe).stage("s").judge == judge  # the default temperature is fine
    with pytest.raises(RecipeError, match=rf"stages\.s\.judge_temperature: is the gold judge's temperature; "
                                          rf"judge '{judge}' .* never reads it"):
        load_recipe_dict({**recipe, "stages": [*recipe["stages"][:2], {**stage, "judge_temperature": 1.0}]})
    gold = {**stage, "inputs": ["sft"], "judge": "gold", "judge_temperature": 1.0}
    assert load_recipe_dict({**recipe, "stages": [*recipe["stages"][:2], gold]}).stage("s").judge_temperature == 1.0


def test_online_stages_after_real_data_stages_are_errors(load_recipe_dict):
    """Every online stage samples the built-in task's prompts (SPIN also its demonstrations): a policy or judge
    trained on a real dataset before it would be tuned on another task, wherever it sits upstream."""
    sft, dpo = TINY_RECIPE["stages"][0], {**TINY_RECIPE["stages"][1], "dataset": {"source": "trl", "path": "p.jsonl"}}
    rm = {"name": "rm", "type": "reward", "inputs": ["sft"], "members": 2,
          "dataset": {"source": "hh_rlhf", "path": "hh"}}
    cases = [([dpo, {"name": "s", "type": "sppo", "inputs": ["dpo"]}], "'dpo' trained on dataset.source 'trl'"),
             ([dpo, {"name": "s", "type": "spin", "inputs": ["dpo"]}], "prompts and demonstrations"),
             ([rm, {"name": "s", "type": "osp", "inputs": ["sft", "rm"], "judge": "reward"}], "'rm' trained on"),
             ([{**sft, "name": "sft2", "dataset": {"source": "hh_rlhf", "path": "hh"}},
               {**TINY_RECIPE["stages"][1], "inputs": ["sft2"]},
               {"name": "s", "type": "inpo", "inputs": ["dpo"]}], "'sft2' trained on dataset.source 'hh_rlhf'")]
    for stages, message in cases:
        with pytest.raises(RecipeError, match=rf"stages\.s\.inputs: \w+ stages draw their .*{message}"):
            load_recipe_dict({**TINY_RECIPE, "stages": [sft, *stages]})
    synthetic = [TINY_RECIPE["stages"][1], {"name": "s", "type": "spin", "inputs": ["dpo"]}]
    assert load_recipe_dict({**TINY_RECIPE, "stages": [sft, *synthetic]}).stage("s").type == "spin"


@pytest.mark.parametrize("bad", [1.2, float("nan")])
def test_sppo_rejects_rejected_win_rates_outside_unit_interval(bad):
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        sppo_loss(T([0.0]), T([0.0]), T([0.5]), T([bad]), eta=1.0)


def test_sppo_refuses_eta_zero():
    with pytest.raises(ValueError, match="eta must be > 0"):
        sppo_loss(T([0.0]), T([0.0]), T([0.5]), T([0.5]), eta=0.0)


def test_sppo_accepts_win_rates_at_the_edges_of_unit_interval():
    # η = 1, ρ_w = 1, P̂_w = 1, ρ_l = 0, P̂_l = 0 -> 0.5·[(1 − 0.5)² + (0 + 0.5)²] = 0.25
    loss = sppo_loss(T([1.0]), T([0.0]), T([1.0]), T([0.0]), eta=1.0)
    assert loss.item() == pytest.approx(0.25, abs=1e-12)
