"""Tests for alignpipe.rewards.judges: order averaging, anchor judging, gold/reward judges, the policy as judge."""

import math
import re

import pytest
import torch

from alignpipe.evaluation.harness import Judge
from alignpipe.models.tiny import build_tiny_model, train_tokenizer
from alignpipe.rewards.judges import (
    DEFAULT_LABELS,
    GoldPairwiseJudge,
    PairwiseJudge,
    RewardJudge,
    SelfJudge,
    judge_against_anchor,
    judge_against_anchors,
    order_averaged,
)
from alignpipe.tasks.synthetic import GoldJudge, gold_reward, tokenizer_corpus

PROMPT = "sort: 3 1 4 1"


class FakeJudge:
    """P(a > b) = fn(prompt, a, b); records every call's pairs."""

    judge_id = "fake"

    def __init__(self, fn):
        self.fn = fn
        self.calls: list[list[tuple[str, str, str]]] = []

    def pairwise_probabilities(self, prompts, a, b):
        self.calls.append(list(zip(prompts, a, b)))
        return [self.fn(p, x, y) for p, x, y in zip(prompts, a, b)]


# ---------------------------------------------------------------------------------------------------------------------
# order averaging and anchors
# ---------------------------------------------------------------------------------------------------------------------

def test_order_averaging_cancels_position_bias():
    judge = FakeJudge(lambda p, a, b: 0.8)  # always prefers position A
    prompts, a, b = [PROMPT] * 3, ["1 1 3 4", "1 3", "9"], ["1 3", "1 1 3 4", "1 1 3 4 7"]
    assert order_averaged(judge, prompts, a, b) == [0.5, 0.5, 0.5]
    assert isinstance(judge, PairwiseJudge)
    assert len(judge.calls) == 2 and [c[:2] for c in judge.calls[1]] == [(p, y) for p, y in zip(prompts, b)]


def test_order_averaging_leaves_position_free_judge_unchanged():
    table = {("x", "y"): 0.9, ("y", "x"): 0.1, ("x", "z"): 0.3, ("z", "x"): 0.7}
    judge = FakeJudge(lambda p, a, b: table[a, b])
    got = order_averaged(judge, ["q", "q"], ["x", "x"], ["y", "z"])
    assert got == pytest.approx([0.9, 0.3], abs=1e-12)
    assert order_averaged(judge, [], [], []) == []
    with pytest.raises(ValueError, match="same length"):
        order_averaged(judge, ["q"], ["x", "x"], ["y"])


def test_order_averaging_rejects_non_probabilities():
    with pytest.raises(ValueError, match="probability"):
        order_averaged(FakeJudge(lambda p, a, b: 1.5), ["q"], ["x"], ["y"])


def test_judge_against_anchor_with_gold_orders_strengths():
    target = "1 1 3 4"
    # golds strictly decreasing: exact, one wrong position, truncated, garbage
    responses = [target, "1 1 3 5", "1 1", "x"]
    golds = [gold_reward(PROMPT, r) for r in responses]
    assert golds == sorted(golds, reverse=True) and len(set(golds)) == 4
    anchor = 2
    gold = GoldPairwiseJudge(temperature=0.2)
    counting = FakeJudge(lambda p, a, b: gold.pairwise_probabilities([p], [a], [b])[0])
    s = judge_against_anchor(counting, PROMPT, responses, anchor)
    assert s[anchor] == 0.5
    assert s == sorted(s, reverse=True) and s[0] > s[1] > 0.5 > s[3]
    assert s == judge_against_anchor(gold, PROMPT, responses, anchor)
    # K - 1 comparisons per order, anchor never judged against itself, second order swaps positions
    k = len(responses)
    assert [len(c) for c in counting.calls] == [k - 1, k - 1]
    assert all(b == responses[anchor] for _, _, b in counting.calls[0])
    assert all(a == responses[anchor] for _, a, _ in counting.calls[1])
    # hard gold: strict order collapses to 1 / 0.5 / 0
    assert judge_against_anchor(GoldPairwiseJudge(), PROMPT, responses, anchor) == [1.0, 1.0, 0.5, 0.0]


def test_judge_against_anchor_edge_cases_and_batched_form():
    judge = FakeJudge(lambda p, a, b: 0.8)
    assert judge_against_anchor(judge, PROMPT, ["1"], 0) == [0.5] and judge.calls == []
    with pytest.raises(ValueError, match="anchor index 3"):
        judge_against_anchor(judge, PROMPT, ["1", "2"], 3)
    gold = GoldPairwiseJudge(temperature=0.5)
    groups = [["1 1 3 4", "1", "1 1 3"], ["6", "9 9"]]
    prompts = [PROMPT, "sum: 1 2 3"]
    batched = judge_against_anchors(gold, prompts, groups, [1, 0])
    assert batched == [judge_against_anchor(gold, p, g, i) for p, g, i in zip(prompts, groups, [1, 0])]


# ---------------------------------------------------------------------------------------------------------------------
# gold and reward judges
# ---------------------------------------------------------------------------------------------------------------------

def test_reward_judge_hand_value_and_symmetry():
    rewards = {"good": 1.0, "ok": 0.5}
    judge = RewardJudge(lambda ps, rs: [rewards[r] for r in rs], judge_id="toy-rm", temperature=0.5)
    assert judge.judge_id == "toy-rm"
    p_ab = judge.pairwise_probabilities(["q"], ["good"], ["ok"])[0]
    p_ba = judge.pairwise_probabilities(["q"], ["ok"], ["good"])[0]
    assert p_ab == pytest.approx(0.7310585786, abs=1e-10)
    assert p_ab == pytest.approx(1 - p_ba, abs=1e-12)
    assert order_averaged(judge, ["q"], ["good"], ["ok"])[0] == pytest.approx(p_ab, abs=1e-12)
    # also the evaluation harness's per-pair Judge protocol
    assert judge.score(["q", "q"], ["good", "ok"]) == [1.0, 0.5]
    assert judge.pairwise_probability("q", "good", "ok") == p_ab
    with pytest.raises(ValueError, match="temperature"):
        RewardJudge(lambda ps, rs: [0.0] * len(rs), judge_id="x", temperature=-1)


@pytest.mark.parametrize(("returned", "named"), [
    ({1.0: "a", 2.0: "b"}, "returned a dict"), (["1.5", "2.5"], "returned a str ('1.5') at position 0"),
    (torch.ones(2, 1), "returned a 2-D Tensor"), (0.5, "returned a float")])
def test_reward_judge_refuses_rewards_that_are_not_one_number_per_response(returned, named):
    judge = RewardJudge(lambda ps, rs: returned, judge_id="toy-rm")
    with pytest.raises(ValueError, match=f"judge 'toy-rm' {re.escape(named)}"):
        judge.score(["q", "q"], ["good", "ok"])


def test_gold_pairwise_judge_matches_gold_judge():
    responses = ["1 1 3 4", "1 1 3", "4 3 1 1", "1 1 3 4 4", "", "x y"]
    pairs = [(x, y) for x in responses for y in responses]
    for temperature in (0.0, 0.3):
        gold, batched = GoldJudge(temperature), GoldPairwiseJudge(temperature)
        got = batched.pairwise_probabilities([PROMPT] * len(pairs), [x for x, _ in pairs], [y for _, y in pairs])
        assert got == [gold.pairwise_probability(PROMPT, x, y) for x, y in pairs]
    assert GoldPairwiseJudge().judge_id == GoldJudge.judge_id
    assert GoldPairwiseJudge(0.3).judge_id != GoldJudge.judge_id
    harness_judge: Judge = GoldPairwiseJudge()  # also the evaluation harness's per-pair protocol
    assert harness_judge.score([PROMPT], ["1 1 3 4"]) == GoldJudge().score([PROMPT], ["1 1 3 4"])
    assert harness_judge.pairwise_probability(PROMPT, "1 1 3 4", "1") == 1.0


# ---------------------------------------------------------------------------------------------------------------------
# the policy as its own judge
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    tok = train_tokenizer(tokenizer_corpus(n=400), 160)
    model = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                             max_position_embeddings=256, seed=0)
    return model, tok


TRIPLES = (
    [PROMPT, "reverse: 5 2", "count 3: 3 1 3 3 0 3", PROMPT, "sum: 9 9 9 9 9 9"],
    ["1 1 3 4", "2 5", "4", "1", "54 1 2 3"],
    ["1 3", "2 5 5 5 5", "3", "1 1 3 4 4 4", "54"],
)


def test_self_judge_probabilities_and_batching(tiny):
    model, tok = tiny
    judge = SelfJudge(model, tok, batch_size=32)
    assert judge.labels == DEFAULT_LABELS and judge.judge_id.startswith("self:") and len(judge.judge_id) == 13
    batched = judge.pairwise_probabilities(*TRIPLES)
    assert len(batched) == 5 and all(0.0 < p < 1.0 for p in batched)
    lengths = {len(tok(t, add_special_tokens=False)["input_ids"]) for t in judge.judge_texts(*TRIPLES)}
    assert len(lengths) > 1  # the batch really is padded
    one_by_one = SelfJudge(model, tok, batch_size=1).pairwise_probabilities(*TRIPLES)
    assert batched == pytest.approx(one_by_one, abs=1e-5)
    assert judge.pairwise_probabilities([], [], []) == []


def test_self_judge_matches_hand_computation(tiny):
    model, tok = tiny
    judge = SelfJudge(model, tok)
    text = judge.judge_texts([PROMPT], ["1 1 3 4"], ["1 3"])[0]
    assert text.endswith("<|assistant|>") and "1 1 3 4" in text and PROMPT in text
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    label_ids = [tok(text + x, add_special_tokens=False)["input_ids"][-1] for x in DEFAULT_LABELS]
    assert tok.convert_ids_to_tokens(label_ids) == ["▁1", "▁2"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1, label_ids]
    expected = torch.softmax(logits.double(), dim=-1)[0].item()
    assert judge.pairwise_probabilities([PROMPT], ["1 1 3 4"], ["1 3"])[0] == pytest.approx(expected, abs=1e-6)


def test_self_judge_position_bias_cancels_when_order_averaged(tiny):
    model, tok = tiny
    judge = SelfJudge(model, tok)
    first = judge.label_token_ids[0]

    def favour_first_label(module, inputs, output):
        output = output.clone()
        output[..., first] += 20.0
        return output

    model.train()  # the judge must restore the caller's mode
    handle = model.lm_head.register_forward_hook(favour_first_label)
    try:
        one_order = judge.pairwise_probabilities(*TRIPLES)
        averaged = order_averaged(judge, *TRIPLES)
    finally:
        handle.remove()
    assert model.training
    model.eval()
    assert all(p > 0.9 for p in one_order)
    assert averaged == pytest.approx([0.5] * len(averaged), abs=0.05)


def test_self_judge_rejects_bad_labels_and_templates(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="'A'"):  # not in the tiny vocabulary: ['▁', '<unk>']
        SelfJudge(model, tok, labels=("A", "B"))
    with pytest.raises(ValueError, match="'sort: 1'"):  # several tokens
        SelfJudge(model, tok, labels=("sort: 1", "2"))
    with pytest.raises(ValueError, match="distinct"):
        SelfJudge(model, tok, labels=("1", "1"))
    with pytest.raises(ValueError, match="response_b"):
        SelfJudge(model, tok, template="{instruction} {response_a}")
    other = SelfJudge(model, tok, template="Q {instruction}\n{label_a} {response_a}\n{label_b} {response_b}\nBest?")
    assert other.judge_id != SelfJudge(model, tok).judge_id
    assert math.isfinite(other.pairwise_probabilities([PROMPT], ["1"], ["2"])[0])
