"""The reward-vs-KL Pareto frontier (alignpipe.evaluation.pareto): hand cases, negative k1 estimates, row shaping."""

from __future__ import annotations

import math

import pytest

from alignpipe.evaluation.pareto import KLPoint, gold_vs_kl, pareto_front, row_runs, zoomed


def _row(name, **metrics):
    return {"name": name, "results": {m: {"value": v, "ci95": [v - 0.1, v + 0.1]} for m, v in metrics.items()}}


@pytest.mark.parametrize("points, front", [
    ([], []),
    ([(0.7, 0.2)], [0]),  # a single point is its own frontier
    ([(0.0, 0.0), (1.0, 1.0), (2.0, 0.5)], [0, 1]),  # more KL for less reward is dominated
    ([(2.0, 3.0), (0.0, 1.0), (1.0, 2.0)], [1, 2, 0]),  # all on it, returned by increasing KL
    ([(1.0, 1.0), (1.0, 1.0)], [0, 1]),  # exact ties dominate neither way
    ([(1.0, 1.0), (1.0, 0.5)], [0]),  # same KL, less reward
    ([(0.0, 1.0), (1.0, 1.0)], [0]),  # same reward, more KL
    ([(1.0, 2.0), (0.5, 1.0), (1.0, 2.0), (3.0, 1.5)], [1, 0, 2]),
])
def test_pareto_front_hand_cases(points, front):
    assert pareto_front(points) == front


def test_negative_kl_estimates_count_as_zero():
    """k1 can come out below 0 by Monte-Carlo noise; true KL cannot, so such a point does not beat a KL-0 one on KL."""
    assert pareto_front([(-0.2, 0.0), (0.0, 0.0)]) == [0, 1]  # both at 0 with one reward: a tie
    assert pareto_front([(-0.3, 0.0), (0.0, 0.5)]) == [1]  # the noise buys no place on the frontier
    assert pareto_front([(-0.2, 0.1), (0.05, 0.0)]) == [0]
    assert KLPoint("x", -0.5, 0.0).d == 0.0 and KLPoint("x", 4.0, 0.0).d == 2.0


def test_non_finite_values_are_refused():
    with pytest.raises(ValueError, match="non-finite"):
        pareto_front([(0.0, math.nan)])


def test_rows_become_points_with_the_suites_reward_and_their_run():
    board = {"config": {"sources": [{"label": "a"}, {"label": "x/eval-out"}]}, "checkpoints": [
        _row("a/dpo", gold_reward=0.9, kl_ref_k1=2.0),
        _row("x/eval-out/b/sft", gold_reward=0.5, kl_ref_k1=-0.01),  # a label and a checkpoint name with "/"
        _row("a/base", gold_reward=0.1),  # no KL
        _row("x/eval-out/ppo", kl_ref_k1=1.0, judge_reward=3.0),  # judge_reward is not mixed into a gold board
    ]}
    shaped = gold_vs_kl(board)
    assert shaped.reward_metric == "gold_reward"
    assert [(p.name, p.run) for p in shaped.points] == [("a/dpo", "a"), ("x/eval-out/b/sft", "x/eval-out")]
    assert shaped.points[0].reward_ci == pytest.approx((0.8, 1.0)) and shaped.front == [1, 0]
    assert shaped.skipped == ["a/base", "x/eval-out/ppo"]
    assert shaped.note() == "Not placed (no value of gold_reward and kl_ref_k1): a/base, x/eval-out/ppo."

    judged = gold_vs_kl({"config": {}, "checkpoints": [_row("dpo", judge_reward=1.5, kl_ref_k1=3.0),
                                                       _row("sft", judge_reward=1.0, kl_ref_k1=0.0)]})
    assert judged.reward_metric == "judge_reward" and judged.front == [1, 0] and judged.note() is None
    assert {p.run for p in judged.points} == {None}  # not merged: no runs to colour by

    none = gold_vs_kl({"config": {}, "checkpoints": [_row("sft", kl_ref_k1=0.0)]})
    assert none.reward_metric is None and not none.points and "gold_reward or judge_reward" in none.note()


def test_run_labels_come_only_from_labelled_sources():
    """A source entry without a label (or not an entry at all) names no run: it must not break the plot's colouring."""
    board = {"config": {"sources": [{"label": "a"}, {"path": "b/leaderboard.json"}, {"label": ""}, "c"]}}
    assert row_runs(board) == ["a"]
    assert row_runs({"config": {"sources": "a"}}) == [] and row_runs({}) == []

def test_a_row_belongs_to_the_longest_label_that_prefixes_it_up_to_a_slash():
    """Labels of nested merges share leading parts: "a/b/sft" is run "a/b"'s sft, "a/bc/x" run "a"'s checkpoint bc/x."""
    board = {"config": {"sources": [{"label": "a"}, {"label": "a/b"}]},
             "checkpoints": [_row(name, gold_reward=1.0, kl_ref_k1=1.0) for name in ("a/b/sft", "a/bc/x")]}
    assert [(p.name, p.run) for p in gold_vs_kl(board).points] == [("a/b/sft", "a/b"), ("a/bc/x", "a")]

def test_a_reward_interval_with_a_missing_or_non_finite_bound_is_not_drawn():
    rows = [{"name": name, "results": {"gold_reward": {"value": 1.0, "ci95": ci}, "kl_ref_k1": {"value": 1.0}}}
            for name, ci in (("nan", [math.nan, 1.2]), ("inf", [0.8, math.inf]), ("none", [None, 1.2]),
                             ("short", [0.8]), ("ok", [0.8, 1.2]))]
    cis = {p.name: p.reward_ci for p in gold_vs_kl({"config": {}, "checkpoints": rows}).points}
    assert cis == {"nan": None, "inf": None, "none": None, "short": None, "ok": (0.8, 1.2)}

def test_zoom_keeps_the_checkpoints_near_the_median_kl_when_one_lies_far_out():
    """An untrained model at KL 107 beside policies below 1 nat (the quickstart): the zoom panel shows the policies."""
    points = [KLPoint("sft", 0.0, 0.85), KLPoint("dpo", 0.36, 0.96), KLPoint("osp", 0.41, 0.93),
              KLPoint("ppo", 0.82, 0.92), KLPoint("base", 107.0, -2.1)]
    assert [p.name for p in zoomed(points)] == ["sft", "dpo", "osp", "ppo"]  # median √KL 0.64: base is 16x out
    assert zoomed(points[:4]) is None  # nothing far out: one panel
    assert zoomed([KLPoint("a", 0.0, 1.0), KLPoint("b", 0.0, 2.0), KLPoint("c", 50.0, 0.0)]) is None  # median 0
    assert zoomed([KLPoint("a", 1.0, 1.0), KLPoint("b", 100.0, 2.0), KLPoint("c", 100.0, 0.0)]) is None  # one near
    assert zoomed([KLPoint("a", 1.0, 1.0), KLPoint("b", 1.0, 2.0), KLPoint("c", 9.0, 0.0)]) is None  # 3x: within
    assert zoomed([]) is None
