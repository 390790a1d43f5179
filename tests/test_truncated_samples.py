"""Truncated online samples (no end-of-sequence token within max_new_tokens): dropped before judging by default,
trained on as they are with ``truncated_samples: keep``, and counted in every round's record either way."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from conftest import TINY_RECIPE, write_recipe

import alignpipe.trainers.iterative as iterative
import alignpipe.trainers.round_methods as round_methods
from alignpipe.data.pairing import PreferencePair
from alignpipe.data.truncation import RoundSamples, cut_at_budget, no_pairs_advice, penalise_unfinished
from alignpipe.evaluation.generation import Generation
from alignpipe.recipe import RecipeError, load_recipe

PROMPTS, K = 8, 4
# Sample j of prompt n is "1 2 ... j+1"; the last sample of every prompt and all but the first of prompt 0 hit the
# budget ("cut" marks them). The fake judge prefers the longer reply, so a truncated sample is always the best.
TRUNCATED = PROMPTS + 2  # 10 of 32


def _truncated(n: int, j: int, k: int) -> bool:
    return j == k - 1 if k > 1 else n % 2 == 0  # SPIN samples one generation: every other one is cut


def _fake_generate(k: int):
    def generate(model, tokenizer, prompts, settings, *, desc="", across_ranks=False):
        out = []
        for i, prompt in enumerate(prompts):
            n, j = divmod(i, k)
            cut = _truncated(n, j, k) or (k > 1 and n == 0 and j >= 1)
            text = " ".join(str(x) for x in range(1, j + 2)) + (" cut" if cut else "")
            out.append(Generation(prompt, text, tuple(range(len(text.split()))), cut))
        return out
    return generate


class LongerIsBetter:
    judge_id = "longer"

    def pairwise_probabilities(self, prompts, a, b):
        return [0.5 if len(x) == len(y) else 0.9 if len(x) > len(y) else 0.1 for x, y in zip(a, b)]


def _round(tmp_path, monkeypatch, kind, truncated_samples, **extra):
    stage = {"name": kind, "type": kind, "inputs": ["sft"], "prompts_per_round": PROMPTS,
             "truncated_samples": truncated_samples, **extra}
    if kind != "spin":
        stage |= {"samples_per_prompt": K, "judge": "gold"}
    recipe = load_recipe(write_recipe(tmp_path, {**TINY_RECIPE, "stages": [TINY_RECIPE["stages"][0], stage]}))
    ctx = SimpleNamespace(recipe=recipe, stage=recipe.stage(kind), dir=SimpleNamespace(name=kind))
    monkeypatch.setattr(round_methods, "generate", _fake_generate(1 if kind == "spin" else K))
    monkeypatch.setattr(round_methods, "_make_judge", lambda ctx, model, tokenizer: LongerIsBetter())
    rule = {"osp": round_methods.PairingRule("anchor", hard_labels=False),
            "online_dpo": round_methods.PairingRule("best_worst", hard_labels=True),
            "spin": round_methods.SPINRule()}.get(kind) or round_methods.SelfPlayRule(kind)
    return rule.round_data(ctx, 0, None, None)


def _texts(rows):
    return [turn["content"] for row in rows for key in ("chosen", "rejected") for turn in row[key]]


def test_round_samples_drop_truncated_responses_and_count_them():
    generations = [[Generation("p", "a", (1,), False), Generation("p", "b", (1, 2), True)],
                   [Generation("q", "c", (1,), False), Generation("q", "d", (1,), False)]]
    drop = RoundSamples(["p", "q"], generations, "drop")
    assert drop.responses == [["a"], ["c", "d"]]
    assert drop.with_at_least(2) == (["q"], [["c", "d"]], 1)
    assert drop.stats() == {"samples": 4, "truncated_samples": 1, "truncated_fraction": 0.25,
                            "truncated_samples_policy": "drop"}
    keep = RoundSamples(["p", "q"], generations, "keep")
    assert keep.responses == [["a", "b"], ["c", "d"]]
    assert keep.with_at_least(2) == (["p", "q"], [["a", "b"], ["c", "d"]], 0)
    assert keep.stats()["truncated_samples"] == 1


def test_reject_judges_truncated_samples_but_keeps_only_the_pairs_they_lose():
    generations = [[Generation("p", "a", (1,), False), Generation("p", "b", (1, 2), True),
                    Generation("p", "c", (1,), False)],
                   [Generation("q", "b", (1,), False), Generation("q", "b", (1, 2), True)]]
    reject = RoundSamples(["p", "q"], generations, "reject")
    assert reject.responses == [["a", "b", "c"], ["b", "b"]]
    pairs = [PreferencePair("p", "b", "a"), PreferencePair("p", "a", "b"), PreferencePair("p", "c", "a"),
             PreferencePair("q", "b", "b x")]
    # p's truncated "b" may lose but not win; q's "b" is also a finished sample of q, so it counts as finished
    assert reject.without_cut_chosen(pairs) == (pairs[1:], 1)
    assert RoundSamples(["p", "q"], generations, "keep").without_cut_chosen(pairs) == (pairs, 0)
    assert reject.summary().endswith("judged, and trained on only as the rejected reply)")


def test_round_samples_summary_gives_the_truncated_share_and_a_group_per_prompt_is_required():
    """The log line a round writes states the share in percent; prompts and sample groups must pair up one to one."""
    groups = [[Generation("p", "a", (1,), False), Generation("p", "b", (1, 2), True)]]
    assert RoundSamples(["p"], groups, "drop").summary() == (
        "1 of 2 samples hit max_new_tokens without an end token (50.0%, dropped before judging)")
    assert RoundSamples(["p"], groups, "keep").summary().endswith("(50.0%, kept as finished replies)")
    with pytest.raises(ValueError, match="2 prompts but 1 sample groups"):
        RoundSamples(["p", "q"], groups, "drop")


@pytest.mark.parametrize("kind", ["osp", "online_dpo", "sppo", "dno", "inpo"])
def test_a_truncated_sample_never_reaches_the_rows_unless_kept(tmp_path, monkeypatch, caplog, kind):
    extra = {"margin_threshold": 0.1} if kind == "dno" else {}
    with caplog.at_level(logging.INFO, logger="alignpipe"):
        dropped = _round(tmp_path, monkeypatch, kind, "drop", **extra)
    assert dropped.rows and not any("cut" in text for text in _texts(dropped.rows))
    # Prompt 0 kept one finished sample: no pair. The other 7 keep "1", "1 2", "1 2 3": one pair each.
    assert len(dropped.rows) == PROMPTS - 1
    assert {key: dropped.stats[key] for key in ("samples", "truncated_samples", "truncated_fraction",
                                                "truncated_samples_policy", "prompts_short_of_samples",
                                                "prompts_without_pair")} == {
        "samples": PROMPTS * K, "truncated_samples": TRUNCATED, "truncated_fraction": TRUNCATED / (PROMPTS * K),
        "truncated_samples_policy": "drop", "prompts_short_of_samples": 1, "prompts_without_pair": 1}
    assert f"{TRUNCATED} of {PROMPTS * K} samples hit max_new_tokens" in caplog.text
    assert "dropped before judging" in caplog.text

    kept = _round(tmp_path, monkeypatch, kind, "keep", **extra)
    assert any("cut" in text for text in _texts(kept.rows))  # the longest sample wins: a truncated one
    assert kept.stats["truncated_samples"] == TRUNCATED and kept.stats["truncated_samples_policy"] == "keep"
    assert kept.stats["prompts_short_of_samples"] == 0 and kept.stats["prompts_without_pair"] == 0
    assert "pairs_dropped_cut_chosen" not in kept.stats

    # reject: every sample is judged, and a truncated one appears only as a rejected reply
    rejected = _round(tmp_path, monkeypatch, kind, "reject", **extra)
    chosen = [turn["content"] for row in rejected.rows for turn in row["chosen"]]
    assert not any("cut" in text for text in chosen) and rejected.stats["prompts_short_of_samples"] == 0
    assert rejected.stats["pairs_dropped_cut_chosen"] > 0
    assert rejected.stats["prompts_without_pair"] == PROMPTS - len({row["prompt"][0]["content"]
                                                                     for row in rejected.rows})


def test_spin_gives_no_pair_for_a_truncated_generation_unless_kept(tmp_path, monkeypatch):
    dropped = _round(tmp_path, monkeypatch, "spin", "drop")
    assert len(dropped.rows) == PROMPTS // 2 and not any("cut" in text for text in _texts(dropped.rows))
    assert dropped.stats["truncated_samples"] == PROMPTS // 2 == dropped.stats["prompts_short_of_samples"]
    assert dropped.stats["prompts_without_pair"] == PROMPTS // 2
    kept = _round(tmp_path, monkeypatch, "spin", "keep")
    assert len(kept.rows) == PROMPTS and sum("cut" in text for text in _texts(kept.rows)) == PROMPTS // 2
    rejected = _round(tmp_path, monkeypatch, "spin", "reject")  # the generation is SPIN's rejected reply
    assert [row["rejected"] for row in rejected.rows] == [row["rejected"] for row in kept.rows]


def test_no_pairs_error_names_truncation_when_it_left_prompts_without_pairs(monkeypatch):
    stats = {"samples": 32, "truncated_samples": 30, "truncated_fraction": 30 / 32, "truncated_samples_policy": "drop",
             "prompts_short_of_samples": 8, "prompts_without_pair": 8}
    monkeypatch.setattr(iterative, "load_tokenizer", lambda path: None)
    monkeypatch.setattr(iterative, "load_policy", lambda ctx, path, on_device: None)
    monkeypatch.setattr(iterative, "_round_data", lambda ctx, method, r, model, tok: round_methods.RoundData([], stats))
    ctx = SimpleNamespace(stage=SimpleNamespace(max_new_tokens=12), dir=SimpleNamespace(name="osp"))
    with pytest.raises(RuntimeError, match=r"produced no training pairs .* 30 of 32 samples hit max_new_tokens=12 "
                                           r".*dropped \(truncated_samples: drop\).* 8 prompts .*raise max_new_tokens, "
                                           r"or set truncated_samples: keep"):
        iterative._run_round(ctx, None, 0, "policy", "policy")
    for other in ({**stats, "truncated_samples_policy": "keep", "prompts_short_of_samples": 0},
                  {**stats, "truncated_samples": 0, "prompts_short_of_samples": 0}, {}):
        assert "truncated_samples" not in no_pairs_advice(other, 12, ["prompts_per_round"])
        assert no_pairs_advice(other, 12, ["prompts_per_round"]).startswith("raise prompts_per_round")


@pytest.mark.parametrize("kind, extra, advice", [
    ("osp", {}, "raise prompts_per_round, samples_per_prompt or sampling_temperature"),
    ("online_dpo", {"min_gap": 0.1}, "raise prompts_per_round, samples_per_prompt or sampling_temperature, or lower "
                                     "min_gap"),
    ("sppo", {}, "raise prompts_per_round, samples_per_prompt or sampling_temperature"),
    ("inpo", {}, "raise prompts_per_round, samples_per_prompt or sampling_temperature"),
    ("dno", {}, "raise prompts_per_round, samples_per_prompt or sampling_temperature, or lower margin_threshold"),
    ("spin", {}, "raise prompts_per_round or sampling_temperature"),
])
def test_no_pairs_error_names_only_settings_the_stage_has(tmp_path, monkeypatch, kind, extra, advice):
    """SPIN has no samples_per_prompt and no pair filter; only a filter that is on (min_gap > 0) is worth lowering."""
    stage = {"name": kind, "type": kind, "inputs": ["sft"], **extra}
    recipe = load_recipe(write_recipe(tmp_path, {**TINY_RECIPE, "stages": [TINY_RECIPE["stages"][0], stage]}))
    monkeypatch.setattr(iterative, "load_tokenizer", lambda path: None)
    monkeypatch.setattr(iterative, "load_policy", lambda ctx, path, on_device: None)
    monkeypatch.setattr(iterative, "_round_data", lambda ctx, method, r, model, tok: round_methods.RoundData([], {}))
    ctx = SimpleNamespace(stage=recipe.stage(kind), dir=SimpleNamespace(name=kind))
    with pytest.raises(RuntimeError) as error:
        iterative._run_round(ctx, None, 0, "policy", "policy")
    assert str(error.value).endswith(advice)


def test_truncated_samples_is_a_typed_option_of_every_online_stage(tmp_path):
    for kind in ("osp", "online_dpo", "sppo", "spin", "dno", "inpo"):
        stage = {"name": kind, "type": kind, "inputs": ["sft"]}
        recipe = {**TINY_RECIPE, "stages": [TINY_RECIPE["stages"][0], stage]}
        assert load_recipe(write_recipe(tmp_path, recipe)).stage(kind).truncated_samples == "drop"
        recipe["stages"][1] = {**stage, "truncated_samples": "penalise"}
        message = rf"stages\.{kind}\.truncated_samples: 'penalise' is not a valid truncated_samples \(valid: drop, keep"
        with pytest.raises(RecipeError, match=message):
            load_recipe(write_recipe(tmp_path, recipe))


def test_a_trl_completion_is_cut_when_its_last_token_neither_ends_nor_pads():
    """TRL's rule (``completions/clipped_ratio``): eos 2 and an end-of-turn 7 end a completion, padding 0 too; any
    other last token means the budget cut it. An empty completion was not cut (nothing ran past a budget)."""
    completions = [[5, 6, 2], [5, 6, 9], [7], [5, 0], [], [2, 5]]
    assert cut_at_budget(completions, {2, 7, 0}) == [False, True, False, False, False, True]


def test_the_missing_eos_penalty_lowers_only_unfinished_rewards():
    assert penalise_unfinished([0.5, 1.0, -0.25], [False, True, True], 0.5) == [0.5, 0.5, -0.75]
    assert penalise_unfinished([0.5], [True], 0.0) == [0.5]
    with pytest.raises(ValueError, match="2 rewards but 1 completions"):
        penalise_unfinished([0.5, 1.0], [True], 1.0)
