"""Tests for alignpipe.data.pairing: hand-computed strengths (ALGORITHMS.md §4b/§4e), pairing methods, bad input."""

import math

import pytest

from alignpipe.data.pairing import (
    PairingReport,
    PreferencePair,
    ScoredSet,
    anchor_strengths,
    build_pairs,
    harden,
    merge_repeated_responses,
    plain_text,
    rank_pairs,
    strength_from_probabilities,
    strength_from_rewards,
    to_trl_rows,
)


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# ------------------------------------------------------------------------------------------------ §4e hand case


def test_osp_ranked_pairing_hand_case():
    # s = [0.9, 0.7, 0.5 (anchor), 0.2]; sorted (0.9, 0.7, 0.5, 0.2): pairs (1st, 4th) and (2nd, 3rd).
    scored = anchor_strengths("p", ["a", "b", "anchor", "d"], anchor_index=2, win_probs=[0.9, 0.7, None, 0.2])
    assert scored.scores == (0.9, 0.7, 0.5, 0.2)
    assert rank_pairs(scored.scores, "anchor") == [(0, 3), (1, 2)]
    pairs, report = build_pairs([scored], method="anchor", strength="probability")
    assert [(p.chosen, p.rejected) for p in pairs] == [("a", "d"), ("b", "anchor")]
    # p_14 = sigma(logit .9 - logit .2) = sigma(ln 9 - ln .25) = sigma(2.1972 + 1.3863) = sigma(3.5835) = 0.9730
    assert pairs[0].strength == pytest.approx(sigmoid(math.log(9) + math.log(4)), abs=1e-12)
    assert round(pairs[0].strength, 3) == 0.973
    # p_23 = sigma(logit .7 - logit .5) = sigma(ln(7/3) - 0) = sigma(0.8473) = 0.7 exactly
    assert pairs[1].strength == pytest.approx(0.7, abs=1e-12)
    assert round(pairs[1].strength, 3) == 0.700
    assert report.pairs_out == 2 and report.sets_in == 1


def test_anchor_strengths_rejects_a_non_half_anchor_and_length_mismatch():
    with pytest.raises(ValueError, match="anchor's own win probability"):
        anchor_strengths("p", ["a", "b"], 0, [0.7, 0.3])
    with pytest.raises(ValueError, match="2 responses but 3"):
        anchor_strengths("p", ["a", "b"], 0, [None, 0.3, 0.1])


# ------------------------------------------------------------------------------------------------ strengths


def test_strength_from_probabilities_clips_scores_and_result():
    # s = 1 and 0 would be infinite logits: clipped to .99/.01, the result sigma(2 * logit .99) clipped to .99
    assert strength_from_probabilities(1.0, 0.0) == pytest.approx(0.99)
    assert strength_from_probabilities(0.0, 1.0) == pytest.approx(0.01)
    # both below the clip collapse to the same score: no preference left
    assert strength_from_probabilities(1e-3, 1e-5) == 0.5
    # a finer score clip keeps their order: logit(1e-3) - logit(1e-5) = ln(1e-3/.999) - ln(1e-5/.99999) ~ 4.604
    z = math.log(1e-3 / 0.999) - math.log(1e-5 / 0.99999)
    assert strength_from_probabilities(1e-3, 1e-5, score_clip=1e-6) == pytest.approx(min(sigmoid(z), 0.99))


@pytest.mark.parametrize(("s_i", "s_j"), [(0.9, 0.2), (0.3, 0.6), (0.5, 0.5), (0.999, 0.001)])
def test_probability_strength_symmetry(s_i, s_j):
    assert strength_from_probabilities(s_i, s_j) == pytest.approx(1.0 - strength_from_probabilities(s_j, s_i))


def test_strength_from_rewards_hand_value_and_stability():
    # diff 0.5 / T 0.5 = 1 -> sigma(1) = 1 / (1 + e^-1) = 0.7310585786
    assert strength_from_rewards(1.0, 0.5, 0.5) == pytest.approx(0.7310585786, abs=1e-10)
    assert strength_from_rewards(0.5, 1.0, 0.5) == pytest.approx(1 - 0.7310585786, abs=1e-10)
    for r_i, r_j in [(1e6, -1e6), (1e308, -1e308), (-1e308, 1e308), (800.0, 0.0), (0.0, 800.0)]:
        p = strength_from_rewards(r_i, r_j, 1e-3)
        assert math.isfinite(p) and 0.0 <= p <= 1.0
        assert p == (1.0 if r_i > r_j else 0.0)


@pytest.mark.parametrize(("r_i", "r_j", "t"), [(2.0, -1.0, 1.0), (0.1, 0.3, 0.2), (5.0, 5.0, 3.0)])
def test_reward_strength_symmetry(r_i, r_j, t):
    assert strength_from_rewards(r_i, r_j, t) == pytest.approx(1.0 - strength_from_rewards(r_j, r_i, t))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: strength_from_rewards(1.0, 0.0, 0.0), "temperature"),
        (lambda: strength_from_rewards(1.0, 0.0, -1.0), "temperature"),
        (lambda: strength_from_rewards(math.nan, 0.0, 1.0), "r_i must be finite"),
        (lambda: strength_from_probabilities(0.5, 0.2, clip=0.0), "clip must be in"),
        (lambda: strength_from_probabilities(0.5, 0.2, clip=0.5), "clip must be in"),
        (lambda: strength_from_probabilities(1.5, 0.2), "not a probability"),
    ],
)
def test_strength_validation(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ------------------------------------------------------------------------------------------------ rank_pairs


def test_rank_pairs_methods_hand_case():
    scores = [0.2, 0.9, 0.5, 0.7, 0.1]  # descending order: idx 1, 3, 2, 0, 4
    assert rank_pairs(scores, "anchor") == [(1, 4), (3, 0)]  # median (idx 2) left out with odd K
    assert rank_pairs(scores, "best_worst") == [(1, 4)]
    pairs = rank_pairs(scores, "all_pairs")
    assert len(pairs) == 5 * 4 // 2
    assert len({frozenset(p) for p in pairs}) == 10
    assert all(scores[b] > scores[w] for b, w in pairs)
    assert rank_pairs([0.3], "anchor") == [] and rank_pairs([], "all_pairs") == []


def test_rank_pairs_rejects_typos_and_nonfinite():
    with pytest.raises(ValueError, match="unknown pairing method 'ancor'"):
        rank_pairs([1.0, 0.0], "ancor")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-finite"):
        rank_pairs([1.0, math.nan], "anchor")


def test_build_pairs_best_worst_and_all_pairs_strengths():
    scored = ScoredSet("q", ["a", "b", "c"], [2.0, 0.0, 1.0])
    pairs, _ = build_pairs([scored], method="best_worst", strength="reward", temperature=2.0)
    assert [(p.chosen, p.rejected) for p in pairs] == [("a", "b")]
    assert pairs[0].strength == pytest.approx(sigmoid(1.0))  # (2 - 0) / 2
    pairs, report = build_pairs([scored], method="all_pairs", strength="hard")
    assert {(p.chosen, p.rejected) for p in pairs} == {("a", "b"), ("a", "c"), ("c", "b")}
    assert all(p.strength == 1.0 for p in pairs) and report.pairs_out == 3


def test_build_pairs_reward_strength_is_clipped_soft():
    pairs, _ = build_pairs([ScoredSet("q", ["a", "b"], [100.0, 0.0])], method="anchor", strength="reward")
    assert pairs[0].strength == pytest.approx(0.99)


# ------------------------------------------------------------------------------------------------ drops and reports


def test_tie_dropping_with_min_gap():
    # p(a, d) = sigma(logit .55 - logit .45) = sigma(0.4014) = 0.599; p(b, c) = sigma(logit .51 - logit .49) = 0.51
    scored = ScoredSet("q", ["a", "b", "c", "d"], [0.55, 0.51, 0.49, 0.45])
    pairs, report = build_pairs([scored], method="anchor", strength="probability")
    assert len(pairs) == 2 and report.pairs_dropped_ties == 0
    pairs, report = build_pairs([scored], method="anchor", strength="probability", min_gap=0.05)
    assert [(p.chosen, p.rejected) for p in pairs] == [("a", "d")]
    assert report.pairs_dropped_ties == 1 and report.pairs_out == 1


def test_min_score_gap_is_the_dno_margin_filter():
    # ALGORITHMS.md §9e: threshold 0.2 drops (0.55, 0.45) and keeps (0.9, 0.3)
    sets = [ScoredSet("x", ["a", "b"], [0.55, 0.45]), ScoredSet("y", ["c", "d"], [0.9, 0.3])]
    pairs, report = build_pairs(sets, method="best_worst", strength="hard", min_score_gap=0.2)
    assert [(p.prompt, p.chosen) for p in pairs] == [("y", "c")]
    assert report.pairs_dropped_ties == 1 and report.sets_without_pairs == 1


def test_hard_ties_and_min_gap_with_hard_is_refused():
    pairs, report = build_pairs([ScoredSet("q", ["a", "b", "c"], [1.0, 1.0, 0.0])], method="all_pairs",
                                strength="hard")
    assert {(p.chosen, p.rejected) for p in pairs} == {("a", "c"), ("b", "c")}
    assert report.pairs_dropped_ties == 1
    with pytest.warns(UserWarning, match="harden"):
        again, _ = build_pairs([ScoredSet("q", ["a", "b", "c"], [1.0, 1.0, 0.0])], method="all_pairs",
                               strength="hard", min_gap=0.1)
    assert again == pairs  # min_gap has no meaning for hard labels


def test_harden_keeps_the_same_pairs():
    scored = ScoredSet("q", ["a", "b", "c", "d"], [0.55, 0.51, 0.49, 0.45])
    soft, _ = build_pairs([scored], method="anchor", strength="probability", min_gap=0.05)
    hard = harden(soft)
    assert [(p.chosen, p.rejected) for p in hard] == [(p.chosen, p.rejected) for p in soft]
    assert all(p.strength == 1.0 for p in hard)


def test_bad_input_is_dropped_and_counted():
    sets = [
        ScoredSet("all equal", ["a", "b", "c", "d"], [0.3, 0.3, 0.3, 0.3]),
        ScoredSet("one response", ["a"], [0.9]),
        ScoredSet("no responses", [], []),
        ScoredSet("nan", ["a", "b", "c"], [0.9, math.nan, 0.1]),
        ScoredSet("nan leaves one", ["a", "b"], [math.inf, 0.4]),
        ScoredSet("identical", ["same", "same", "other"], [0.9, 0.1, 0.5]),
    ]
    pairs, report = build_pairs(sets, method="anchor", strength="probability")
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("nan", "a", "c")]
    assert report == PairingReport(
        sets_in=6, sets_skipped_too_few=3, responses_dropped_nonfinite=2, pairs_dropped_ties=2,
        pairs_dropped_identical=1, pairs_out=1, sets_without_pairs=2,
    )
    summary = report.summary()
    assert "6 sets -> 1 pairs" in summary and "2 tied" in summary and "\n" not in summary


def test_a_text_repeated_in_a_set_is_one_response_with_its_mean_score():
    """Two models can write the same text (the loaders merge it before pairing). Kept twice, it gave all_pairs the
    same pair twice, or (its two scores either side of another's) both orientations of one pair, and anchor could
    pair it with itself and lose the pair. Merged, it is one response scored with the mean of its scores."""
    def merged(scored):
        responses, scores, _ = merge_repeated_responses(scored.responses, scored.scores)
        return ScoredSet(scored.prompt, tuple(responses), tuple(scores))

    both_sides = ScoredSet("q", ("A", "B", "A"), (0.3, 0.2, 0.1))  # A's scores either side of B's: no order
    assert {(p.chosen, p.rejected) for p in build_pairs([both_sides], method="all_pairs", strength="hard")[0]} == \
        {("A", "B"), ("B", "A")}  # what a set from two sources gave unmerged
    for method in ("all_pairs", "anchor"):
        pairs, report = build_pairs([merged(both_sides)], method=method, strength="hard")
        assert pairs == [] and report.pairs_dropped_ties == 1
    above = merged(ScoredSet("q", ("A", "B", "A"), (0.4, 0.2, 0.1)))  # A's mean 0.25 is above B's 0.2
    for method in ("all_pairs", "anchor", "best_worst"):
        pairs, _ = build_pairs([above], method=method, strength="probability")
        assert [(p.chosen, p.rejected) for p in pairs] == [("A", "B")]
        assert pairs[0].strength == pytest.approx(strength_from_probabilities(0.25, 0.2))


def test_an_online_rounds_repeated_sample_is_paired_once_per_draw():
    """§4b pairs the K samples as drawn: a text the policy wrote twice is two samples (one judge, one score)."""
    pairs, report = build_pairs([ScoredSet("q", ("A", "A", "B", "C"), (0.9, 0.9, 0.5, 0.1))], method="all_pairs",
                                strength="hard")
    assert sorted((p.chosen, p.rejected) for p in pairs) == [("A", "B"), ("A", "B"), ("A", "C"), ("A", "C"), ("B", "C")]
    assert (report.pairs_dropped_identical, report.pairs_dropped_ties) == (1, 0)  # A with its copy


def test_merge_repeated_responses_keeps_first_appearances_and_averages_finite_scores():
    responses, scores, merged = merge_repeated_responses(["x", "y", "x", "z", "z", "y"],
                                                         [0.1, 0.5, 0.3, math.nan, math.nan, math.nan])
    assert responses == ["x", "y", "z"] and merged == 3
    assert scores[:2] == [pytest.approx(0.2), 0.5] and math.isnan(scores[2])


def test_validation_errors_are_clear():
    with pytest.raises(ValueError, match="3 responses but 2 scores"):
        ScoredSet("a prompt", ["a", "b", "c"], [0.1, 0.2])
    good = [ScoredSet("q", ["a", "b"], [1.0, 0.0])]
    with pytest.raises(ValueError, match="unknown strength mode 'probabilty'"):
        build_pairs(good, method="anchor", strength="probabilty")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown pairing method"):
        build_pairs(good, method="best-worst", strength="hard")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        build_pairs(good, method="anchor", strength="reward", temperature=0)
    with pytest.raises(ValueError, match="clip"):
        build_pairs(good, method="anchor", strength="probability", clip=0.6)
    long_prompt = "x" * 100
    with pytest.raises(ValueError, match=r"set 1 'x{60}…': score 3.0 is not a probability"):
        build_pairs([good[0], ScoredSet(long_prompt, ["a", "b"], [3.0, 0.0])], method="anchor",
                    strength="probability")
    with pytest.raises(ValueError, match=r"strength 0.3 is outside \[0.5, 1\]"):
        PreferencePair("q", "a", "b", 0.3)


# ------------------------------------------------------------------------------------------------ synthetic + TRL


def test_synthetic_scored_sets_pair_by_gold():
    from alignpipe.data.scored_sources import load_scored_sets_synthetic
    from alignpipe.tasks import gold_reward, scored_response_sets

    sets = load_scored_sets_synthetic(scored_response_sets(40, seed=3, k=4, noise=0.7))
    for method in ("anchor", "best_worst", "all_pairs"):
        pairs, report = build_pairs(sets, method=method, strength="reward", temperature=0.25)
        assert pairs and report.sets_in == 40
        for p in pairs:
            assert gold_reward(p.prompt, p.chosen) > gold_reward(p.prompt, p.rejected)
            assert 0.5 < p.strength <= 0.99


def test_to_trl_rows_conversational_with_preference():
    rows = to_trl_rows([PreferencePair("sort: 3 1", "1 3", "3 1", 0.8)])
    assert rows == [{
        "prompt": [{"role": "user", "content": "sort: 3 1"}],
        "chosen": [{"role": "assistant", "content": "1 3"}],
        "rejected": [{"role": "assistant", "content": "3 1"}],
        "preference": 0.8,
    }]


# ------------------------------------------------------------------------------------------- plain text for scoring


def test_plain_text_keeps_every_turn_of_a_multi_message_prompt() -> None:
    cat = [{"role": "system", "content": "You are a cat"}, {"role": "user", "content": "What do you say?"}]
    dog = [{"role": "system", "content": "You are a dog"}, {"role": "user", "content": "What do you say?"}]
    assert plain_text(cat) == "\n\nSystem: You are a cat\n\nHuman: What do you say?\n\nAssistant:"
    assert plain_text(cat) != plain_text(dog)  # the last message alone would make them one prompt
    earlier = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
               {"role": "user", "content": "sort: 3 1"}]
    assert plain_text(earlier) == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: sort: 3 1\n\nAssistant:"


def test_plain_text_leaves_strings_and_single_messages_as_their_text() -> None:
    assert plain_text("sort: 3 1") == "sort: 3 1"
    assert plain_text([{"role": "user", "content": "sort: 3 1"}]) == "sort: 3 1"
    assert plain_text([{"role": "assistant", "content": "1 3"}]) == "1 3"
    row = to_trl_rows([PreferencePair("\n\nHuman: q\n\nAssistant:", "a", "b", 1.0)])[0]  # HH: one raw message
    assert plain_text(row["prompt"]) == "\n\nHuman: q\n\nAssistant:"


def test_rank_pairs_breaks_score_ties_by_index():
    assert rank_pairs([0.9, 0.9, 0.1], "best_worst") == [(0, 2)]  # first of the tied best
    assert rank_pairs([0.5, 0.9, 0.9, 0.1], "anchor") == [(1, 3), (2, 0)]  # order 1, 2, 0, 3


def test_plain_text_ending_on_an_assistant_turn_gets_no_assistant_prompt():
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert plain_text(turns) == "\n\nHuman: hi\n\nAssistant: hello"


def test_identical_texts_are_counted_as_identical_before_ties():
    pairs, report = build_pairs([ScoredSet("q", ("a", "a"), (0.5, 0.5))], method="best_worst", strength="hard")
    assert pairs == []
    assert report.pairs_dropped_identical == 1 and report.pairs_dropped_ties == 0


def test_gaps_exactly_at_the_thresholds_are_kept():
    # score gap 1.0 − 0.5 = 0.5 == min_score_gap: kept
    pairs, report = build_pairs([ScoredSet("q", ("a", "b"), (1.0, 0.5))], method="best_worst", strength="hard",
                                min_score_gap=0.5)
    assert len(pairs) == 1 and report.pairs_dropped_ties == 0
    # strength exactly min_gap away from 0.5: kept
    p = strength_from_probabilities(0.75, 0.5)
    pairs, report = build_pairs([ScoredSet("q", ("a", "b"), (0.75, 0.5))], method="best_worst",
                                strength="probability", min_gap=abs(p - 0.5))
    assert len(pairs) == 1 and report.pairs_dropped_ties == 0


def test_min_gap_of_one_half_is_refused():
    with pytest.raises(ValueError, match=r"min_gap must be in \[0, 0\.5\)"):
        build_pairs([], method="anchor", strength="probability", min_gap=0.5)
