"""Tests for alignpipe.tasks.synthetic: hand-computed gold rewards, prompt parsing, and the seeded generators."""


import random

import pytest

import alignpipe.tasks.synthetic as synthetic
from alignpipe.tasks.synthetic import (
    FAMILIES,
    FORMAT_BONUS,
    GoldJudge,
    Task,
    TaskSpace,
    corrupt,
    gold_reward,
    heldout_tasks,
    parse_prompt,
    preference_pairs,
    preference_probability,
    sample_tasks,
    scored_response_sets,
    sft_demonstrations,
)

LIST_ONLY = TaskSpace(families=("copy", "reverse", "sort"))

# ------------------------------------------------------------------------------------------------ gold_reward


@pytest.mark.parametrize(
    ("prompt", "response", "expected"),
    [
        # target 4 1 3: 3/3 correct = 1.0, all integers +0.2 -> 1.2
        ("reverse: 3 1 4", "4 1 3", 1.2),
        # 2 of 3 target positions correct = 2/3, +0.2 format, no excess
        ("reverse: 3 1 4", "4 1", 2 / 3 + 0.2),
        # fully correct 1.0 + 0.2, one token beyond the 3-token target -> -0.15 => 1.05
        ("reverse: 3 1 4", "4 1 3 9", 1.2 - 0.15),
        # two tokens beyond the target: 1.0 + 0.2 - 2 * 0.15 = 0.9
        ("reverse: 3 1 4", "4 1 3 9 9", 0.9),
        # truth 5, |7 - 5| = 2 -> 1 - 2/5 = 0.6, +0.2 -> 0.8
        ("sum: 2 3", "7", 0.8),
        # truth 5, exact -> 1.0 + 0.2
        ("sum: 2 3", "5", 1.2),
        # truth 5, |9 - 5| = 4 -> 1 - 4/5 = 0.2, +0.2 -> 0.4
        ("sum: 2 3", "9", 0.4),
        # truth 5, |12 - 5| = 7 > 5 -> credit clamps at 0, +0.2 format -> 0.2
        ("sum: 2 3", "12", 0.2),
        # overlong numeric answer: first token 5 exact = 1.0, +0.2, one extra token -0.15 -> 1.05
        ("sum: 2 3", "5 9", 1.05),
        # overlong and wrong: |9 - 5| = 4 -> 0.2, +0.2, -0.15 (one extra) -> 0.25
        ("sum: 2 3", "9 5", 0.25),
        # two 3s in "3 1 3" -> truth 2; exact -> 1.2
        ("count 3: 3 1 3", "2", 1.2),
        # truth 2, answer 0: |0 - 2| = 2 -> 0.6, +0.2 -> 0.8
        ("count 3: 3 1 3", "0", 0.8),
        # queried digit absent -> truth 0; exact -> 1.2
        ("count 5: 1 2", "0", 1.2),
        # sort target 1 3 4; "3 1 4" matches only position 3 -> 1/3, +0.2
        ("sort: 3 1 4", "3 1 4", 1 / 3 + 0.2),
        # sort target 1 3 4; "4 3 1" matches only position 2 -> 1/3, +0.2
        ("sort: 3 1 4", "4 3 1", 1 / 3 + 0.2),
        # sort exact
        ("sort: 3 1 4", "1 3 4", 1.2),
        # copy with repeated zeros, exact
        ("copy: 0 0 7", "0 0 7", 1.2),
        # non-numeric response: list correctness 0 (no position matches), no format bonus
        ("reverse: 3 1 4", "four one three", 0.0),
        # partially numeric list response: positions 1, 2 correct = 2/3, but not well-formed -> no bonus
        ("reverse: 3 1 4", "4 1 x", 2 / 3),
        # non-numeric numeric-family answer: correctness 0 and no bonus
        ("sum: 2 3", "five", 0.0),
        # negative numbers are not non-negative integers: no credit, no bonus
        ("sum: 2 3", "-5", 0.0),
        # first token non-numeric -> correctness 0; no bonus; 1 token beyond the 1-token target -> -0.15
        ("sum: 2 3", "x 5", -0.15),
        # empty responses score exactly 0 (no correctness, no bonus, no excess)
        ("reverse: 3 1 4", "", 0.0),
        ("sum: 2 3", "", 0.0),
        ("count 3: 3 1 3", "   ", 0.0),
    ],
)
def test_gold_reward_hand_cases(prompt, response, expected):
    assert gold_reward(prompt, response) == pytest.approx(expected, abs=1e-12)


def test_gold_reward_rejects_non_task_prompt():
    with pytest.raises(ValueError, match="hello"):
        gold_reward("hello", "1 2 3")


def test_gold_reward_unicode_digit_does_not_crash():
    # '²' is not a non-negative integer in ASCII: no correctness, no format bonus.
    assert gold_reward("sum: 2 3", "²") == 0.0


@pytest.mark.parametrize("digits", [308, 309, 5000])
def test_gold_reward_long_numeric_answer_gets_no_credit(digits):
    # 309 nines overflow a float and 5000 exceed int()'s digit limit; the gap is far beyond the scale: credit 0, bonus
    assert gold_reward("sum: 1 2", "9" * digits) == pytest.approx(FORMAT_BONUS, abs=1e-12)
    assert gold_reward("sum: 1 2", "0" * digits + "4") == pytest.approx(0.8 + FORMAT_BONUS, abs=1e-12)  # 4 vs truth 3


def _reference_gold_reward(prompt: str, response: str) -> float:
    """The gold reward as first specified, for responses whose numbers are small."""
    target, tokens = parse_prompt(prompt).target(), response.split()
    is_int = [t.isascii() and t.isdigit() for t in tokens]
    if parse_prompt(prompt).family in ("copy", "reverse", "sort"):
        correctness = sum(a == b for a, b in zip(tokens, target)) / len(target)
    elif tokens and is_int[0]:
        correctness = max(0.0, 1.0 - abs(int(tokens[0]) - int(target[0])) / 5.0)
    else:
        correctness = 0.0
    return correctness + 0.2 * (bool(tokens) and all(is_int)) - 0.15 * max(0, len(tokens) - len(target))


def test_gold_reward_unchanged_on_the_tasks_normal_cases():
    rows = scored_response_sets(300, 0, k=4, noise=0.7)
    cases = [(row["prompt"], r) for row in rows for r in row["responses"]]
    cases += [(row["prompt"], str(n)) for row in rows[:60] for n in range(0, 40, 3)]  # numeric gaps across the scale
    assert {parse_prompt(p).family for p, _ in cases} == set(FAMILIES)
    assert [gold_reward(p, r) for p, r in cases] == [_reference_gold_reward(p, r) for p, r in cases]


# ------------------------------------------------------------------------------------------------ parse_prompt / Task


def test_parse_prompt_round_trips_every_family():
    tasks = [
        Task("copy", (3, 1, 4)),
        Task("reverse", (0, 9)),
        Task("sort", (5, 5, 1, 0)),
        Task("sum", (9, 9, 9, 9, 9, 9)),
        Task("count", (3, 1, 3), 3),
    ]
    assert {t.family for t in tasks} == set(FAMILIES)
    for task in tasks:
        assert parse_prompt(task.prompt) == task
    # sampled tasks too (every family appears among 200)
    sampled = sample_tasks(200, seed=3)
    assert {t.family for t in sampled} == set(FAMILIES)
    for task in sampled:
        assert parse_prompt(task.prompt) == task


def test_prompt_text_format():
    assert Task("sort", (3, 1, 4)).prompt == "sort: 3 1 4"
    assert Task("count", (3, 1, 3), 3).prompt == "count 3: 3 1 3"


@pytest.mark.parametrize("junk", ["hello", "sort:", "count: 1 2", "sort 3 1 4", "divide: 1 2", "sort: a b", ": 1 2",
                                  "count x: 1 2", "copy 2: 1 2", "count 3 4: 1 2"])
def test_parse_prompt_rejects_junk_naming_the_prompt(junk):
    with pytest.raises(ValueError) as info:
        parse_prompt(junk)
    assert repr(junk) in str(info.value)


@pytest.mark.parametrize("prompt", ["sum: -3 -4", "sort: -3 1", "copy: \u0663 1", "count -3: 1 2", "count \u0663: 3 1",
                                    "sum: 1 \u00b2", "sort: +3 1"])
def test_parse_prompt_rejects_items_the_gold_reward_cannot_credit(prompt):
    # the exact answer to 'sum: -3 -4' would be '-7', which is not a non-negative ASCII integer and scores 0
    with pytest.raises(ValueError, match="non-negative integers") as info:
        parse_prompt(prompt)
    assert repr(prompt) in str(info.value)
    with pytest.raises(ValueError):
        gold_reward(prompt, "0")


@pytest.mark.parametrize(
    ("task", "target"),
    [
        (Task("copy", (3, 1, 4)), ["3", "1", "4"]),
        (Task("reverse", (3, 1, 4)), ["4", "1", "3"]),
        (Task("sort", (3, 1, 4, 1)), ["1", "1", "3", "4"]),
        (Task("sum", (3, 1, 4)), ["8"]),  # 3 + 1 + 4
        (Task("sum", (9, 9, 9)), ["27"]),
        (Task("count", (3, 1, 3), 3), ["2"]),
        (Task("count", (3, 1, 3), 7), ["0"]),
    ],
)
def test_task_target_per_family(task, target):
    assert task.target() == target


def test_task_target_unknown_family_raises():
    with pytest.raises(ValueError, match="divide"):
        Task("divide", (1, 2)).target()


# ------------------------------------------------------------------------------------------------ preference / judge


def test_preference_probability_hard_comparison():
    assert preference_probability(1.0, 0.5, 0) == 1.0
    assert preference_probability(0.5, 1.0, 0) == 0.0
    assert preference_probability(0.7, 0.7, 0) == 0.5
    # round-off-sized differences still count as ties
    assert preference_probability(2 / 3 + 0.2, 0.2 + 2 / 3, 0) == 0.5


def test_preference_probability_bradley_terry():
    # diff 0.1 / temperature 0.1 = 1 -> sigmoid(1) = 1 / (1 + e^-1) = 0.7310585786
    assert preference_probability(0.3, 0.2, 0.1) == pytest.approx(0.7310585786, abs=1e-9)
    assert preference_probability(0.2, 0.3, 0.1) == pytest.approx(1 - 0.7310585786, abs=1e-9)
    assert preference_probability(0.4, 0.4, 0.1) == 0.5
    # diff 1.2 / temperature 1 -> sigmoid(1.2) = 0.7685247835
    assert preference_probability(1.2, 0.0, 1.0) == pytest.approx(0.7685247835, abs=1e-9)


def test_preference_probability_low_temperature_does_not_overflow():
    assert preference_probability(0.0, 1.2, 1e-3) == pytest.approx(0.0, abs=1e-12)
    assert preference_probability(1.2, 0.0, 1e-3) == pytest.approx(1.0, abs=1e-12)


def test_gold_judge():
    judge = GoldJudge()
    assert judge.pairwise_probability("sort: 3 1 4", "1 3", "1 3") == 0.5
    assert GoldJudge(temperature=1.0).pairwise_probability("sort: 3 1 4", "1 3", "1 3") == 0.5
    # 1.2 ("1 3 4") vs 1/3 + 0.2 ("3 1 4"): hard comparison
    assert judge.pairwise_probability("sort: 3 1 4", "1 3 4", "3 1 4") == 1.0
    assert judge.pairwise_probability("sort: 3 1 4", "3 1 4", "1 3 4") == 0.0
    # soft: 1.2 - 0.8 = 0.4, at temperature 0.4 -> sigmoid(1) = 0.7310585786
    assert GoldJudge(temperature=0.4).pairwise_probability("sum: 2 3", "5", "7") == pytest.approx(0.7310585786)
    scores = judge.score(["reverse: 3 1 4", "sum: 2 3", "count 3: 3 1 3"], ["4 1", "7", "2"])
    assert scores == pytest.approx([2 / 3 + 0.2, 0.8, 1.2], abs=1e-12)
    with pytest.raises(ValueError):
        judge.score(["sum: 2 3", "sum: 2 3"], ["5"])  # lengths must match
    with pytest.raises(ValueError, match="temperature"):
        GoldJudge(temperature=-0.1)


# ------------------------------------------------------------------------------------------------ generators


def _is_target(prompt: str, reply: str) -> bool:
    return reply == " ".join(parse_prompt(prompt).target())


def test_generators_are_deterministic_given_seed():
    assert sft_demonstrations(100, 1, 0.5) == sft_demonstrations(100, 1, 0.5)
    assert sft_demonstrations(100, 1, 0.5) != sft_demonstrations(100, 2, 0.5)
    kw = dict(noise=0.5, temperature=0.1, label_noise=0.1)
    assert preference_pairs(100, 1, **kw) == preference_pairs(100, 1, **kw)
    assert preference_pairs(100, 1, **kw) != preference_pairs(100, 2, **kw)
    assert scored_response_sets(50, 1, k=3, noise=0.5) == scored_response_sets(50, 1, k=3, noise=0.5)
    assert scored_response_sets(50, 1, k=3, noise=0.5) != scored_response_sets(50, 2, k=3, noise=0.5)
    assert heldout_tasks(50, 1) == heldout_tasks(50, 1)
    assert heldout_tasks(50, 1) != heldout_tasks(50, 2)
    assert sample_tasks(50, 1) == sample_tasks(50, 1)
    assert sample_tasks(50, 1) != sample_tasks(50, 2)


@pytest.mark.parametrize("seed", [0, 5])
def test_heldout_tasks_disjoint_from_train_and_distinct(seed):
    train = {t.prompt for t in sample_tasks(2000, seed)}
    heldout = [t.prompt for t in heldout_tasks(300, seed)]
    assert len(heldout) == 300
    assert len(set(heldout)) == 300
    assert train.isdisjoint(heldout)
    # held-out membership depends on the prompt only, so other seeds' training prompts are disjoint too
    assert {t.prompt for t in sample_tasks(2000, seed + 1)}.isdisjoint(heldout)


def test_the_heldout_split_is_pinned():
    """Evaluation prompt sets are compared across runs and alignpipe versions (their id carries a hash of the prompts):
    the same seed must keep drawing the same held-out and training tasks."""
    assert [t.prompt for t in heldout_tasks(4, 0)] == ["sum: 6 5 7 2 2", "copy: 2 2 1 2 4", "copy: 7 3 6",
                                                       "sort: 8 0 6 6 3 8"]
    assert [t.prompt for t in sample_tasks(4, 0)] == ["sort: 7 5 6 8 0 6", "sum: 3 5 9 2 6", "sort: 5 0 4 7",
                                                      "copy: 3 5 7"]


def test_count_tasks_mostly_ask_for_a_digit_that_is_present():
    """Otherwise most count answers would be 0 and a policy could score well by always answering 0."""
    counts = [t for t in sample_tasks(2000, 0) if t.family == "count"]
    assert len(counts) > 300 and sum(t.query in t.items for t in counts) / len(counts) > 0.75


def test_train_tasks_may_repeat_where_the_space_is_small():
    prompts = [t.prompt for t in sample_tasks(60, 0, TaskSpace(families=("sum",), min_items=1, max_items=1))]
    assert len(prompts) == 60 and len(set(prompts)) <= 10


def test_an_off_by_mistake_may_land_on_zero():
    """Numeric mistakes stay non-negative but reach 0: for truth 1, "0" comes from off-by-one as well as "empty_ish"."""
    rng = random.Random(0)
    answers = [corrupt(Task("sum", (1,)), rng) for _ in range(4000)]
    assert 0.2 < answers.count("0") / len(answers) < 0.35  # 0.7 x 1/4 (off by -1) + 0.1 (empty_ish)


def test_preference_pairs_drop_a_prompt_whose_responses_cannot_be_made_distinct(monkeypatch):
    monkeypatch.setattr(synthetic, "corrupt", lambda task, rng: "7")
    assert preference_pairs(20, 0, noise=1.0, temperature=1.0) == []


def test_preference_pairs_are_drawn_on_other_prompts_than_the_sft_demonstrations():
    """A preference stage should not only see the prompts its SFT input was trained on."""
    sft = [r["messages"][0]["content"] for r in sft_demonstrations(200, 0, 0.5)]
    pairs = [r["prompt"][0]["content"] for r in preference_pairs(200, 0, noise=0.5, temperature=0.1)]
    assert len(set(sft) & set(pairs)) < 20

def test_heldout_disjoint_from_generator_rows():
    heldout = {t.prompt for t in heldout_tasks(300, 0)}
    sft_prompts = {r["messages"][0]["content"] for r in sft_demonstrations(1000, 0, 0.3)}
    pair_prompts = {r["prompt"][0]["content"] for r in preference_pairs(1000, 0, noise=0.5, temperature=0.1)}
    set_prompts = {r["prompt"] for r in scored_response_sets(500, 0, k=2, noise=0.5)}
    assert heldout.isdisjoint(sft_prompts | pair_prompts | set_prompts)


def test_sft_demonstrations_noise_zero_gives_targets():
    rows = sft_demonstrations(500, 4, noise=0.0)
    assert len(rows) == 500
    for row in rows:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert set(user) == {"role", "content"} and set(assistant) == {"role", "content"}
        assert _is_target(user["content"], assistant["content"])


def test_sft_demonstrations_noise_one_never_gives_target_for_list_families():
    rows = sft_demonstrations(1000, 4, noise=1.0, space=LIST_ONLY)
    assert not [r for r in rows if _is_target(r["messages"][0]["content"], r["messages"][1]["content"])]


def test_sft_demonstrations_noise_one_never_gives_target_all_families():
    rows = sft_demonstrations(2000, 0, noise=1.0)
    assert not [r for r in rows if _is_target(r["messages"][0]["content"], r["messages"][1]["content"])]


def test_sft_demonstrations_noise_one_single_item_lists():
    space = TaskSpace(families=("copy", "reverse", "sort"), min_items=1, max_items=3)
    rows = sft_demonstrations(500, 0, noise=1.0, space=space)
    assert not [r for r in rows if _is_target(r["messages"][0]["content"], r["messages"][1]["content"])]


def test_preference_pairs_format_and_distinct():
    rows = preference_pairs(300, 0, noise=0.5, temperature=0.1, label_noise=0.1)
    assert len(rows) > 250  # pairs whose two responses can't be made distinct are dropped; that's rare
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected", "chosen_gold", "rejected_gold"}
        assert len(row["prompt"]) == 1 and row["prompt"][0]["role"] == "user"
        assert len(row["chosen"]) == 1 and row["chosen"][0]["role"] == "assistant"
        assert len(row["rejected"]) == 1 and row["rejected"][0]["role"] == "assistant"
        prompt = row["prompt"][0]["content"]
        parse_prompt(prompt)
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen != rejected
        assert row["chosen_gold"] == gold_reward(prompt, chosen)
        assert row["rejected_gold"] == gold_reward(prompt, rejected)


def test_preference_pairs_hard_labels_follow_gold():
    # temperature 0 = hard comparison: unequal pairs are always ordered by gold
    rows = preference_pairs(1000, 0, noise=0.5, temperature=0, label_noise=0.0)
    assert all(r["chosen_gold"] >= r["rejected_gold"] for r in rows)
    assert sum(r["chosen_gold"] > r["rejected_gold"] for r in rows) > 800


def test_preference_pairs_low_temperature_labels_follow_gold():
    rows = preference_pairs(1000, 0, noise=0.5, temperature=1e-3, label_noise=0.0)
    assert all(r["chosen_gold"] >= r["rejected_gold"] for r in rows)


def test_preference_pairs_label_noise_rate():
    # Hard labels (temperature 0) flipped with probability 0.3: among pairs with unequal gold, the fraction whose
    # chosen response is worse should be 0.3 (binomial sd on ~1900 pairs is ~0.011, so ±0.05 is > 4 sd).
    rows = preference_pairs(2000, 11, noise=0.5, temperature=0, label_noise=0.3)
    unequal = [r for r in rows if r["chosen_gold"] != r["rejected_gold"]]
    assert len(unequal) > 1500
    flipped = sum(r["chosen_gold"] < r["rejected_gold"] for r in unequal) / len(unequal)
    assert abs(flipped - 0.3) < 0.05


def test_preference_pairs_bradley_terry_noise_is_present_at_moderate_temperature():
    # At temperature 0.1 a gold gap of 0.15 still loses with probability sigmoid(-1.5) ~ 0.18, so some pairs are
    # mis-ordered even without label noise, but clearly fewer than half.
    rows = preference_pairs(2000, 0, noise=0.5, temperature=0.1, label_noise=0.0)
    wrong = sum(r["chosen_gold"] < r["rejected_gold"] for r in rows) / len(rows)
    assert 0.0 < wrong < 0.2


def test_scored_response_sets():
    rows = scored_response_sets(40, 3, k=4, noise=0.5)
    assert len(rows) == 40
    for row in rows:
        assert len(row["responses"]) == 4 and len(row["scores"]) == 4
        assert row["scores"] == [gold_reward(row["prompt"], r) for r in row["responses"]]
    with pytest.raises(ValueError, match="k >= 2"):
        scored_response_sets(10, 0, k=1, noise=0.5)


def test_sample_tasks_respects_space():
    space = TaskSpace(families=("sum", "count"), min_items=2, max_items=4)
    tasks = sample_tasks(300, 0, space)
    assert {t.family for t in tasks} == {"sum", "count"}
    assert {len(t.items) for t in tasks} == {2, 3, 4}
    assert all(0 <= i <= 9 for t in tasks for i in t.items)
    assert all(t.query is not None and 0 <= t.query <= 9 for t in tasks if t.family == "count")


def test_sample_tasks_too_small_space_raises_clearly():
    # "sum: d" has only 10 prompts in total, about 1/8 of them held out: 50 distinct held-out tasks is impossible
    space = TaskSpace(families=("sum",), min_items=1, max_items=1)
    with pytest.raises(ValueError, match="too small") as info:
        heldout_tasks(50, 0, space)
    assert "50" in str(info.value) and "heldout" in str(info.value)
