"""Implicit-reward accuracy (alignpipe.evaluation.implicit_reward): hand values, the gold-ordered held-out pairs it is
measured on, and TRL's DPOTrainer's own implicit reward on the same pairs."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from alignpipe.evaluation.generation import token_logprobs
from alignpipe.evaluation.harness import pair_generations
from alignpipe.evaluation.implicit_reward import implicit_margins, implicit_reward_accuracy
from alignpipe.models.loading import activation_checkpointing_argument
from alignpipe.models.tiny import build_tiny_model, train_tokenizer
from alignpipe.tasks import TaskSpace, gold_reward, heldout_gold_pairs, parse_prompt, preference_pairs, tokenizer_corpus
from alignpipe.tasks.synthetic import is_heldout

# ------------------------------------------------------------------------------------------------------ pure maths


def test_margins_hand_values():
    # pair 0: [-10 - (-12)] - [-15 - (-14)] = 2 - (-1) = 3; pair 1: [-5 - (-4)] - [-6 - (-6)] = -1; pair 2: 0
    m = implicit_margins([-10.0, -5.0, -3.0], [-12.0, -4.0, -2.0], [-15.0, -6.0, -7.0], [-14.0, -6.0, -6.0])
    assert m.tolist() == [3.0, -1.0, 0.0]


def test_accuracy_is_strict_with_ties_counted_and_a_ci():
    acc = implicit_reward_accuracy([3.0, -1.0, 0.0, 0.5], resamples=200, seed=0)
    assert acc.value == 0.5  # 3 and 0.5 win; -1 loses; the tie at 0 counts as a loss (RewardBench's strict >)
    assert acc.n == 4 and acc.higher_is_better is True
    assert acc.extra["n_ties"] == 1 and acc.extra["mean_margin"] == pytest.approx(2.5 / 4)
    lo, hi = acc.ci95
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0
    assert implicit_reward_accuracy([0.0] * 5, resamples=100).value == 0.0  # never moved off the reference


def test_beta_does_not_change_the_accuracy():
    margins = [0.3, -0.2, 1.5, -0.01, 0.7]
    plain = implicit_reward_accuracy(margins, resamples=100)
    for beta in (0.01, 0.5, 10.0):
        assert implicit_reward_accuracy([beta * m for m in margins], resamples=100).value == plain.value == 0.6


def test_pairs_that_share_a_prompt_are_resampled_together():
    margins, groups = [1.0, 1.0, 1.0, -1.0, -1.0, -1.0], ["a", "a", "a", "b", "b", "b"]
    grouped = implicit_reward_accuracy(margins, resamples=400, seed=0, groups=groups)
    assert grouped.value == 0.5
    assert set(grouped.ci95) <= {0.0, 0.5, 1.0}  # resampling whole prompts gives only 0, 1/2 and 1


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="differ in length"):
        implicit_margins([0.0, 1.0], [0.0], [0.0], [0.0])
    with pytest.raises(ValueError, match="NaN"):
        implicit_reward_accuracy([float("nan")])


# ------------------------------------------------------------------------------------------------------ the pairs


def test_pairs_are_on_held_out_prompts_ordered_by_gold():
    """No training stage draws from the held-out split, so no checkpoint has seen these prompts."""
    pairs = heldout_gold_pairs(40, 4242)
    assert len(pairs) == 40 and all(gold_reward(p, c) > gold_reward(p, r) for p, c, r in pairs)
    assert len({p for p, _, _ in pairs}) == 40  # distinct prompts
    assert all(is_heldout(parse_prompt(p)) for p, _, _ in pairs)
    trained = {row["prompt"][0]["content"] for row in preference_pairs(3000, 0, noise=0.5, temperature=0.1)}
    assert not trained & {p for p, _, _ in pairs}  # a dpo stage's stream never has them
    assert heldout_gold_pairs(25, 4242) == pairs[:25]  # a smaller n is a prefix of the same pairs
    sort_only = heldout_gold_pairs(10, 4242, TaskSpace(families=("sort",)))
    assert all(p.startswith("sort:") for p, _, _ in sort_only)


# --------------------------------------------------------------------------------------------- against TRL's DPO

BETA = 0.5


@pytest.fixture(scope="module")
def tiny():
    """A tiny tokenizer, a policy, a reference with perturbed weights (so margins are not 0) and 6 held-out pairs."""
    tokenizer = train_tokenizer(tokenizer_corpus(n=400), 160)
    policy = build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                              max_position_embeddings=128, seed=0).eval()
    reference = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=g))
    return tokenizer, policy, reference, heldout_gold_pairs(6, 4242)


def _margins(tokenizer, policy, reference, pairs) -> list[float]:
    """Through the harness's path: the pairs as finished samples, scored per token under both models."""
    scored = pair_generations(tokenizer, pairs)
    lp = [sum(t) for t in token_logprobs(policy, tokenizer, scored, batch_size=4)]
    lr = [sum(t) for t in token_logprobs(reference, tokenizer, scored, batch_size=4)]
    n = len(pairs)
    return implicit_margins(lp[:n], lr[:n], lp[n:], lr[n:]).tolist()


# A generation prompt that is not the start of the rendered conversation (a marker added only when a reply is to be
# generated): DPO training scores replies after the prefix that prompt and conversations share.
MARKED_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
                   "{% if add_generation_prompt %}<|assistant|><|system|>{% endif %}")


# ... and one that differs from the first token on: nothing is shared, and the first reply token goes unscored
UNSHARED_TEMPLATE = ("{% if add_generation_prompt %}<|system|>{% endif %}"
                     "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.mark.parametrize("template", [None, MARKED_TEMPLATE, UNSHARED_TEMPLATE],
                         ids=["own-template", "marked-generation-prompt", "nothing-shared"])
def test_margins_are_trls_dpo_implicit_reward_over_beta(tiny, tmp_path, template):
    """TRL's DPOTrainer logs rewards/chosen = β(log π(c) − log π_ref(c)) and rewards/accuracies with a strict >: on
    the same pairs, its per-pair log-ratios (its own tokenization, chat template and log-prob pass) are our margins,
    also where the template renders the prompt alone differently than before a reply."""
    tokenizer, policy, reference, pairs = tiny
    if template is not None:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.chat_template = template
        assert any(g.context_ids is not None for g in pair_generations(tokenizer, pairs))  # the case is exercised
    rows = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for p, c, r in pairs]
    args = DPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to=[], max_length=48, beta=BETA,
                     per_device_train_batch_size=len(rows), **activation_checkpointing_argument(False))
    trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    dataset = trainer._remove_unused_columns(trainer.train_dataset)
    batch = trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(len(rows))]))
    policy_c, policy_r = trainer.compute_ref_log_probs(trainer.model, batch)
    ref_c, ref_r = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    trl_margins = ((policy_c - ref_c) - (policy_r - ref_r)).tolist()

    ours = _margins(tokenizer, policy, reference, pairs)
    assert ours == pytest.approx(trl_margins, abs=1e-4)
    assert any(abs(m) > 0.1 for m in ours)  # a real comparison
    with torch.no_grad():
        trainer.compute_loss(trainer.model, batch)
    logged = trainer._metrics["eval"]  # the policy is in eval mode
    assert logged["rewards/margins"][-1] == pytest.approx(BETA * sum(ours) / len(ours), abs=1e-4)
    assert logged["rewards/accuracies"][-1] == pytest.approx(implicit_reward_accuracy(ours, resamples=100).value)


@pytest.mark.parametrize("eos, pre_tokenizer", [("<|im_end|>", "bytelevel"), ("<|endoftext|>", "bytelevel"),
                                                ("<|im_end|>", "metaspace")])
def test_pair_tokens_are_the_completion_tokens_trl_scores(eos, pre_tokenizer):
    """With ChatML, the reply ends with the template's <|im_end|> and newline, whatever the tokenizer's EOS; with a
    SentencePiece-style pre-tokenizer, a reply tokenized alone would gain a word-start marker. The pair tokens are
    TRL 1.16's: the full conversation's tokens after its common prefix with the rendered prompt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from trl.data_utils import _tokenize, common_prefix_length

    from alignpipe.models.chat_templates import CHATML_TEMPLATE

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    if pre_tokenizer == "bytelevel":
        core.pre_tokenizer, core.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        core.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        core.decoder, alphabet = decoders.Metaspace(prepend_scheme="first"), []
    core.train_from_iterator(tokenizer_corpus(n=300) + ["user assistant system"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=alphabet, show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos, pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    pairs = heldout_gold_pairs(8, 4242)
    ours = pair_generations(tokenizer, pairs)
    for generation, (prompt, response) in zip(ours, [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]):
        turn = [{"role": "user", "content": prompt}]
        prompt_ids = _tokenize(tokenizer, turn, add_generation_prompt=True)["input_ids"]
        full = _tokenize(tokenizer, turn + [{"role": "assistant", "content": response}])["input_ids"]
        assert generation.response_ids == tuple(full[common_prefix_length(prompt_ids, full):])
    assert tokenizer.convert_ids_to_tokens(list(ours[0].response_ids))[-2] == "<|im_end|>"


def test_pair_tokens_warn_when_the_template_renders_the_prompt_differently_before_a_reply(caplog):
    """A template whose generation prompt is not the start of the rendered conversation: the scored context is not
    the prompt a generation sees (TRL's, as the test above shows), and the log says so."""
    from alignpipe.models.tiny import train_tokenizer

    tokenizer = train_tokenizer(tokenizer_corpus(n=200), vocab_size=120)
    tokenizer.chat_template = MARKED_TEMPLATE
    pairs = heldout_gold_pairs(3, 4242)
    with caplog.at_level("WARNING", logger="alignpipe"):
        pair_generations(tokenizer, pairs)
    assert "3 of 3 pairs have a rendered prompt that is not a prefix of their conversations" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="alignpipe"):
        pair_generations(train_tokenizer(tokenizer_corpus(n=200), vocab_size=120), pairs)  # its own template
    assert "not a prefix" not in caplog.text


def test_a_scoring_context_survives_the_generation_cache(tmp_path):
    from alignpipe.evaluation.cache import EvalCache
    from alignpipe.evaluation.generation import Generation

    cache = EvalCache(tmp_path)
    generations = [Generation("p", "r", (1, 2), False), Generation("p", "r", (1, 2), False, (5, 6)),
                   Generation("p", "r", (1, 2), False, ())]
    cache.put_generations("k", generations)
    assert cache.get_generations("k") == generations
    keys = {EvalCache.token_logprob_key("w", [g], dtype="float32") for g in generations}
    assert len(keys) == 3  # the context is part of what was scored


def test_rows_with_nothing_to_score_get_no_log_probs(tiny):
    """A row with no context and no reply has no token to score, whether or not others share its batch."""
    from alignpipe.evaluation.generation import Generation

    tokenizer, policy, _, _ = tiny
    empty, some = Generation("p", "", (), False, ()), Generation("q", "x", (5, 6, 7), False)
    values = token_logprobs(policy, tokenizer, [empty, some, empty, some, empty], batch_size=2)
    assert [len(v) for v in values] == [0, 3, 0, 3, 0]
