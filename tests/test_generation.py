"""Tests for alignpipe.evaluation.generation (pinned sampling, sequence log-probs) and evaluation.harness."""

import dataclasses
import json
import math
import shutil

import pytest
import torch
from conftest import ending_turns_with

from alignpipe.evaluation.cache import EvalCache
from alignpipe.evaluation.generation import (
    Generation,
    GenerationSettings,
    generate,
    render_prompts,
    sequence_logprobs,
    token_logprobs,
)
from alignpipe.evaluation.harness import (
    DIVERSITY_SEED_OFFSET,
    Checkpoint,
    CheckpointSamples,
    DiversitySampling,
    checkpoint_metrics,
    diversity_rows,
    evaluate_checkpoints,
    implicit_rows,
    sample_rows,
)
from alignpipe.models.loading import load_causal_lm, load_tokenizer
from alignpipe.models.tiny import (
    build_tiny_model,
    save_tiny_checkpoint,
    train_tokenizer,
)
from alignpipe.pipeline.rundir import directory_hash
from alignpipe.tasks.synthetic import (
    GoldJudge,
    gold_reward,
    heldout_tasks,
    tokenizer_corpus,
)

SHAPE = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=128)
SPECIAL_STRINGS = ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<pad>", "<unk>")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(tokenizer_corpus(n=400), vocab_size=160)


@pytest.fixture(scope="module")
def model(tokenizer):
    m = build_tiny_model(tokenizer, **SHAPE, seed=0)
    m.eval()
    return m


@pytest.fixture(scope="module")
def prompts():
    # held-out prompts have 3..6 items, so rendered prompt lengths differ and batches are left padded
    return [t.prompt for t in heldout_tasks(12, 0)]


@pytest.fixture(scope="module")
def eos_model(tokenizer):
    """The seed-0 model with +3.5 on the EOS logit: P(EOS) ~ 0.17 per step, so with 6 new tokens some samples stop
    early (at different lengths) and some are truncated. The plain random model almost never emits EOS."""
    m = build_tiny_model(tokenizer, **SHAPE, seed=0).eval()
    boost = 3.5 * torch.nn.functional.one_hot(torch.tensor(tokenizer.eos_token_id), len(tokenizer)).float()
    m.lm_head.register_forward_hook(lambda mod, inp, out: out + boost.to(out.dtype))
    return m


@pytest.fixture(scope="module")
def generations(eos_model, tokenizer, prompts):
    return generate(eos_model, tokenizer, prompts, GenerationSettings(max_new_tokens=6, batch_size=5, seed=7))


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory, model, tokenizer):
    return save_tiny_checkpoint(model, tokenizer, tmp_path_factory.mktemp("gen") / "ref")


def _hand_token_logprobs(model, tokenizer, prompt: str, response_ids) -> list[float]:
    """log p(y_t | prompt, y_<t) of each response token from one unpadded forward pass."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + list(response_ids)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    # the response token at position pos is predicted by the logits one step earlier
    return [float(logp[len(prompt_ids) + j - 1, token]) for j, token in enumerate(response_ids)]


def _hand_logprob(model, tokenizer, prompt: str, response_ids) -> float:
    """log p(response | prompt): the sum of its tokens' log-probs."""
    return sum(_hand_token_logprobs(model, tokenizer, prompt, response_ids))


# ------------------------------------------------------------------------------------------------ generate


def test_render_prompts(tokenizer):
    assert render_prompts(tokenizer, ["sort: 3 1 4"]) == ["<|user|>sort: 3 1 4<|end|><|assistant|>"]


def test_generate_is_reproducible(eos_model, tokenizer, prompts, generations):
    again = generate(eos_model, tokenizer, prompts, GenerationSettings(max_new_tokens=6, batch_size=5, seed=7))
    assert again == generations
    assert [g.prompt for g in generations] == prompts
    other = generate(eos_model, tokenizer, prompts, GenerationSettings(max_new_tokens=6, batch_size=5, seed=8))
    assert [g.response_ids for g in other] != [g.response_ids for g in generations]


def test_generate_samples_alone_under_zero3_with_several_processes(zero3_run, eos_model, tokenizer, prompts,
                                                                   generations, monkeypatch):
    """A ZeRO-3 run on several GPUs: transformers would sync every token step with the other ranks (synced_gpus), so
    rank 0 sampling alone (a GRPO / RLOO stage's evaluation) waited in a collective forever. Each rank's model is
    whole, so sampling needs no other rank: here no process group exists, and the result is the plain one."""
    import transformers.generation.utils as generation_utils

    monkeypatch.setattr(generation_utils, "_get_torch_distributed_world_size", lambda: 2)
    again = generate(eos_model, tokenizer, prompts, GenerationSettings(max_new_tokens=6, batch_size=5, seed=7))
    assert again == generations


def test_generate_eos_and_truncation(tokenizer, generations):
    eos = tokenizer.eos_token_id
    # the fixture really exercises both branches, with EOS at several positions
    assert any(g.truncated for g in generations) and not all(g.truncated for g in generations)
    assert len({len(g.response_ids) for g in generations if not g.truncated}) > 1
    for g in generations:
        assert isinstance(g, Generation)
        assert g.truncated == (eos not in g.response_ids)
        if g.truncated:
            assert len(g.response_ids) == 6  # ran to max_new_tokens
        else:
            assert g.response_ids[-1] == eos  # stops at the first EOS, EOS kept
            assert eos not in g.response_ids[:-1]
            assert 1 <= len(g.response_ids) <= 6
        assert not any(s in g.response for s in SPECIAL_STRINGS)
        assert g.response == g.response.strip()


def test_generate_stops_at_first_eos_when_model_always_emits_eos(tokenizer):
    # A model whose EOS logit is boosted by +100 samples EOS first: exactly [EOS], empty text, not truncated.
    model = build_tiny_model(tokenizer, **SHAPE, seed=0)
    boost = 100.0 * torch.nn.functional.one_hot(torch.tensor(tokenizer.eos_token_id), len(tokenizer)).float()
    handle = model.lm_head.register_forward_hook(lambda mod, inp, out: out + boost.to(out.dtype))
    try:
        gens = generate(model, tokenizer, ["sort: 3 1 4", "count 3: 3 1 3 3 3 3"],
                        GenerationSettings(max_new_tokens=5, seed=0))
    finally:
        handle.remove()
    for g in gens:
        assert g.response_ids == (tokenizer.eos_token_id,)
        assert g.response == ""
        assert g.truncated is False


def test_generate_ends_a_reply_at_every_end_token_the_model_declares(tokenizer, prompts):
    """A chat model may end its turn with a token other than the tokenizer's EOS (``generation_config.eos_token_id``
    lists it, as TRL's GRPO/RLOO read it). A reply ends at the first of them, is not truncated, and keeps it."""
    model = build_tiny_model(tokenizer, **SHAPE, seed=0).eval()
    settings = GenerationSettings(max_new_tokens=6, batch_size=5, seed=7)
    plain = generate(model, tokenizer, prompts, settings)
    assert all(g.truncated for g in plain[:2])
    end_of_turn = plain[0].response_ids[2]  # a token the first reply writes third
    assert end_of_turn != tokenizer.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    ended = generate(model, tokenizer, prompts, settings)
    assert ended[0].response_ids == plain[0].response_ids[:3] and not ended[0].truncated
    # the text leaves the end token out, though it is no special token decoding would skip
    assert ended[0].response == tokenizer.decode(plain[0].response_ids[:2], skip_special_tokens=True).strip()
    for before, after in zip(plain, ended):  # the same draws, each cut at its first end token
        ends = [i for i, t in enumerate(before.response_ids) if t in (tokenizer.eos_token_id, end_of_turn)]
        assert after.response_ids == (before.response_ids[:ends[0] + 1] if ends else before.response_ids)
        assert after.truncated == (not ends)


def test_the_chat_templates_end_of_turn_is_an_end_token_when_it_is_special(tokenizer):
    from alignpipe.models.chat_templates import template_turn_end

    assert template_turn_end(tokenizer) == tokenizer.eos_token_id
    system = tokenizer.convert_tokens_to_ids("<|system|>")
    assert template_turn_end(ending_turns_with(tokenizer, "<|system|>\n")) == system
    assert template_turn_end(ending_turns_with(tokenizer, "\n")) is None  # a newline must not end a reply
    assert template_turn_end(ending_turns_with(tokenizer, "")) is None
    unflagged = ending_turns_with(tokenizer, "<|im_end|>")
    unflagged.add_tokens(["<|im_end|>"])  # one token, but not flagged special: decoding would keep it as text
    assert template_turn_end(unflagged) is None
    refusing = ending_turns_with(tokenizer, "<|system|>")
    refusing.chat_template = ("{%- for m in messages -%}{%- if m['role'] == 'assistant' -%}"
                              "{{ raise_exception('no assistant turns') }}{%- endif -%}{{ m['content'] }}"
                              "{%- endfor -%}{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}")
    assert template_turn_end(refusing) is None  # the tokenizer's EOS and the declared ids still end replies


def test_generate_ends_a_reply_at_the_chat_templates_end_of_turn(tokenizer, prompts):
    """SFT teaches the template's end of turn; a sampler that stopped at the EOS alone ran past it into made-up turns
    and counted every reply truncated."""
    system = tokenizer.convert_tokens_to_ids("<|system|>")
    model = build_tiny_model(tokenizer, **SHAPE, seed=0).eval()
    boost = 3.5 * torch.nn.functional.one_hot(torch.tensor(system), len(tokenizer)).float()
    model.lm_head.register_forward_hook(lambda mod, inp, out: out + boost.to(out.dtype))
    settings = GenerationSettings(max_new_tokens=6, batch_size=5, seed=7)
    plain = generate(model, tokenizer, prompts, settings)
    assert any(system in g.response_ids[:-1] for g in plain)  # the EOS-ended template runs past it
    ended = generate(model, ending_turns_with(tokenizer, "<|system|>"), prompts, settings)
    assert any(not g.truncated and g.response_ids[-1] == system for g in ended)
    for g in ended:
        assert system not in g.response_ids[:-1] and tokenizer.eos_token_id not in g.response_ids[:-1]
        assert g.truncated == (g.response_ids[-1] not in (system, tokenizer.eos_token_id))


def test_untrained_model_mostly_truncates(model, tokenizer):
    # With ~160 tokens and random weights, P(EOS) per step is small: with 4 new tokens nearly all samples run out.
    prompts = [t.prompt for t in heldout_tasks(40, 1)]
    gens = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=4, batch_size=40, seed=0))
    rate = sum(g.truncated for g in gens) / len(gens)
    assert rate > 0.7


def test_generate_ignores_the_checkpoints_own_generation_config(tmp_path, checkpoint_dir, prompts):
    """Samples depend on the weights and our settings only: decoding options a checkpoint's generation_config.json
    carries (a repetition penalty, banned n-grams, a minimum length) change nothing, and stay in the model."""
    leaky = tmp_path / "leaky"
    shutil.copytree(checkpoint_dir, leaky)
    path = leaky / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**config, "repetition_penalty": 3.0, "no_repeat_ngram_size": 1, "min_new_tokens": 5}))
    settings = GenerationSettings(max_new_tokens=5, batch_size=8, seed=3)
    samples = []
    for directory in (checkpoint_dir, leaky):
        model = load_causal_lm(str(directory), dtype="float32")
        samples.append(generate(model, load_tokenizer(str(directory)), prompts, settings))
    assert samples[1] == samples[0]
    assert model.generation_config.repetition_penalty == 3.0


# ------------------------------------------------------------------------------------------------ sequence_logprobs


def test_sequence_logprobs_match_hand_computation_with_left_padding(eos_model, tokenizer, generations):
    model = eos_model
    eos = tokenizer.eos_token_id
    longest = max(generations, key=lambda g: len(g.prompt)).prompt
    shortest = min(generations, key=lambda g: len(g.prompt)).prompt
    handmade = [
        # short prompt, long response / long prompt, short response: padding both ways in one batch
        Generation(shortest, "", tuple(tokenizer("1 2 3 4 5 6 7", add_special_tokens=False)["input_ids"]) + (eos,),
                   False),
        Generation(longest, "", (eos,), False),
        Generation("count 3: 3 1 3", "2", tuple(tokenizer("2", add_special_tokens=False)["input_ids"]) + (eos,),
                   False),
    ]
    gens = list(generations) + handmade
    prompt_lengths = {len(p) for p in render_prompts(tokenizer, [g.prompt for g in gens])}
    assert len(prompt_lengths) > 1  # the batch really mixes prompt lengths
    got = sequence_logprobs(model, tokenizer, gens, batch_size=64)
    expected = [_hand_logprob(model, tokenizer, g.prompt, g.response_ids) for g in gens]
    assert got == pytest.approx(expected, abs=1e-4)
    assert all(v < 0 for v in got)
    # batch composition must not matter
    one_by_one = sequence_logprobs(model, tokenizer, gens, batch_size=1)
    assert one_by_one == pytest.approx(expected, abs=1e-4)
    # the per-token log-probs behind the sums, token by token
    tokens = token_logprobs(model, tokenizer, gens, batch_size=64)
    assert [len(t) for t in tokens] == [len(g.response_ids) for g in gens]
    for got_tokens, g in zip(tokens, gens):
        assert got_tokens == pytest.approx(_hand_token_logprobs(model, tokenizer, g.prompt, g.response_ids), abs=1e-4)


def test_sequence_logprobs_single_eos_response_is_log_p_eos(model, tokenizer):
    # y = [EOS] only: log pi(y|x) is the log-softmax of EOS after the generation prompt.
    prompt = "sum: 2 3"
    g = Generation(prompt, "", (tokenizer.eos_token_id,), False)
    rendered = render_prompts(tokenizer, [prompt])[0]
    ids = torch.tensor([tokenizer(rendered, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        last = model(input_ids=ids).logits[0, -1].double()
    expected = float(last[tokenizer.eos_token_id] - torch.logsumexp(last, dim=-1))
    assert sequence_logprobs(model, tokenizer, [g])[0] == pytest.approx(expected, abs=1e-5)


# ------------------------------------------------------------------------------------------------ harness


def test_evaluate_checkpoint_against_itself(checkpoint_dir, prompts):
    ref = Checkpoint("base", str(checkpoint_dir))
    settings = GenerationSettings(max_new_tokens=5, batch_size=8, seed=3)
    results, samples = evaluate_checkpoints([ref], ref, prompts, GoldJudge(), settings, bootstrap_resamples=50)
    assert len(results) == 1 and len(samples) == 1
    m = results[0].metrics
    n = len(prompts)
    assert results[0].name == "base" and results[0].path == str(checkpoint_dir)
    assert m["kl_ref_k1"].value == 0.0 and m["kl_ref_k3"].value == 0.0
    assert m["kl_ref_k1"].ci95 == (0.0, 0.0)
    win = m["win_rate_vs_ref"]
    assert win.value == 0.5 and win.n == n
    assert win.extra["n_ties"] == n and win.extra["n_wins"] == 0 and win.extra["n_losses"] == 0
    gold = m["gold_reward"]
    assert gold.n == n and gold.higher_is_better is True
    lo, hi = gold.ci95
    assert lo <= gold.value <= hi
    s = samples[0]
    assert [g.prompt for g in s.generations] == prompts
    assert gold.value == pytest.approx(sum(gold_reward(g.prompt, g.response) for g in s.generations) / n)
    assert m["truncation_rate"].value == pytest.approx(sum(g.truncated for g in s.generations) / n)
    assert m["len_tokens_mean"].value == pytest.approx(sum(len(g.response_ids) for g in s.generations) / n)
    assert s.logp_policy == s.logp_reference
    rows = sample_rows(s)
    assert len(rows) == n and all(r["preference_vs_ref"] == 0.5 for r in rows)


def test_a_checkpoint_of_another_tokenizer_gets_judged_metrics_but_no_kl_or_implicit_reward(
        tmp_path, checkpoint_dir, tokenizer, prompts, caplog):
    """KL and the implicit reward need the reference's log-probs of the policy's tokens; ids of another vocabulary
    would give numbers without meaning, so they are left out for that checkpoint, with a warning, while its reward,
    win rate and lengths (judged on text) stand, and a policy that shares the reference's tokenizer keeps both."""
    from alignpipe.tasks import heldout_gold_pairs

    other_tokenizer = train_tokenizer(tokenizer_corpus(n=200, seed=5), vocab_size=150)
    assert other_tokenizer.get_vocab() != tokenizer.get_vocab()
    foreign_dir = save_tiny_checkpoint(build_tiny_model(other_tokenizer, **SHAPE, seed=1), other_tokenizer,
                                       tmp_path / "foreign")
    sibling_dir = save_tiny_checkpoint(build_tiny_model(tokenizer, **SHAPE, seed=1), tokenizer, tmp_path / "sibling")
    ref = Checkpoint("base", str(checkpoint_dir))
    checkpoints = [Checkpoint("foreign", str(foreign_dir)), Checkpoint("sibling", str(sibling_dir))]
    settings = GenerationSettings(max_new_tokens=5, batch_size=8, seed=3)
    results, samples = evaluate_checkpoints(checkpoints, ref, prompts, GoldJudge(), settings, bootstrap_resamples=50,
                                            pairs=heldout_gold_pairs(6, 4242))
    foreign, sibling = (r.metrics for r in results)
    assert {"gold_reward", "win_rate_vs_ref", "len_tokens_mean"} <= foreign.keys()
    assert not {"kl_ref_k1", "kl_ref_k3", "implicit_reward_accuracy"} & foreign.keys()
    assert {"kl_ref_k1", "kl_ref_k3", "implicit_reward_accuracy"} <= sibling.keys()
    assert samples[0].logp_reference is None and samples[0].implicit_margins is None
    assert all(row["logp_reference"] is None and row["logp_policy"] is not None for row in sample_rows(samples[0]))
    assert "checkpoint 'foreign' has another tokenizer than the reference 'base': no KL" in caplog.text
    assert "'sibling'" not in caplog.text


def test_evaluate_copy_and_different_checkpoint(tmp_path, checkpoint_dir, tokenizer, prompts):
    copy_dir = tmp_path / "copy"
    shutil.copytree(checkpoint_dir, copy_dir)
    other_dir = save_tiny_checkpoint(build_tiny_model(tokenizer, **SHAPE, seed=1), tokenizer, tmp_path / "other")
    ref = Checkpoint("base", str(checkpoint_dir))
    same = Checkpoint("copy", str(copy_dir))
    other = Checkpoint("other", str(other_dir))
    settings = GenerationSettings(max_new_tokens=5, batch_size=8, seed=3)
    results, samples = evaluate_checkpoints([same, other], ref, prompts, GoldJudge(), settings,
                                            bootstrap_resamples=50)
    copy_m, other_m = results[0].metrics, results[1].metrics
    # a byte-identical copy loaded from another path samples the same responses with the same seed
    assert copy_m["win_rate_vs_ref"].value == 0.5
    assert copy_m["kl_ref_k1"].value == pytest.approx(0.0, abs=1e-6)
    # a different model: its log-probs under the reference are those of a hand forward pass of the reference
    ref_model = build_tiny_model(tokenizer, **SHAPE, seed=0).eval()
    other_model = build_tiny_model(tokenizer, **SHAPE, seed=1).eval()
    s = samples[1]
    for g, lp, lr in zip(s.generations, s.logp_policy, s.logp_reference):
        assert lp == pytest.approx(_hand_logprob(other_model, tokenizer, g.prompt, g.response_ids), abs=1e-4)
        assert lr == pytest.approx(_hand_logprob(ref_model, tokenizer, g.prompt, g.response_ids), abs=1e-4)
    expected_k1 = sum(lp - lr for lp, lr in zip(s.logp_policy, s.logp_reference)) / len(prompts)
    assert other_m["kl_ref_k1"].value == pytest.approx(expected_k1)
    # k3 is summed per token (hand per-token log-probs of both models), not taken of the whole-sequence ratio
    per_sequence_k3 = []
    for g in s.generations:
        lp = _hand_token_logprobs(other_model, tokenizer, g.prompt, g.response_ids)
        lr = _hand_token_logprobs(ref_model, tokenizer, g.prompt, g.response_ids)
        per_sequence_k3.append(sum(math.expm1(b - a) - (b - a) for a, b in zip(lp, lr)))
    assert other_m["kl_ref_k3"].value == pytest.approx(sum(per_sequence_k3) / len(prompts), rel=1e-3)
    whole_ratio_k3 = sum(math.expm1(lr - lp) - (lr - lp) for lp, lr in zip(s.logp_policy, s.logp_reference))
    assert other_m["kl_ref_k3"].value != pytest.approx(whole_ratio_k3 / len(prompts), rel=1e-2)
    assert all(p in (0.0, 0.5, 1.0) for p in s.preferences)  # hard judge, both orders agree
    assert not math.isnan(other_m["win_rate_vs_ref"].value)


def test_gold_delta_entropy_and_within_prompt_diversity(tmp_path, checkpoint_dir, tokenizer, prompts):
    other_dir = save_tiny_checkpoint(build_tiny_model(tokenizer, **SHAPE, seed=1), tokenizer, tmp_path / "other")
    ref, other = Checkpoint("base", str(checkpoint_dir)), Checkpoint("other", str(other_dir))
    diversity = DiversitySampling(samples_per_prompt=3, prompts=5)

    def evaluated(temperature: float):
        settings = GenerationSettings(max_new_tokens=6, batch_size=8, seed=3, temperature=temperature)
        return evaluate_checkpoints([ref, other], ref, prompts, GoldJudge(), settings, bootstrap_resamples=50,
                                    diversity=diversity)

    results, samples = evaluated(1.0)
    base_m, other_m = results[0].metrics, results[1].metrics
    # gold reward relative to the reference's on the same prompts: 0 for the reference, a paired mean for the other
    assert base_m["gold_reward_delta_vs_ref"].value == 0.0 and base_m["gold_reward_delta_vs_ref"].ci95 == (0.0, 0.0)
    gains = [o - r for o, r in zip(samples[1].rewards, samples[0].rewards, strict=True)]
    assert other_m["gold_reward_delta_vs_ref"].value == pytest.approx(sum(gains) / len(prompts))
    assert other_m["gold_reward_delta_vs_ref"].value == pytest.approx(
        other_m["gold_reward"].value - base_m["gold_reward"].value)
    # the policy's entropy: mean -log pi of its own samples (drawn at temperature 1)
    assert other_m["policy_entropy"].value == pytest.approx(-sum(samples[1].logp_policy) / len(prompts))
    # 3 more samples of each of 5 prompts, in one call of their own, grouped by prompt
    groups = samples[1].diversity_groups
    assert len(groups) == 5 and all(len(group) == 3 for group in groups)
    assert other_m["self_bleu_4"].n == 5 and other_m["distinct_2_within"].extra["samples_per_prompt"] == 3
    assert [row["prompt"] for row in diversity_rows(samples[1])] == [prompts[i] for i in (0, 2, 4, 7, 9)]  # 5 of 12
    assert len({response for group in groups for response in group}) > 5  # temperature 1: they differ
    # tempered samples are not draws from the policy: no entropy, since it would be a cross-entropy
    cold_results, _ = evaluated(0.5)
    assert "policy_entropy" not in cold_results[1].metrics and "policy_entropy" in other_m


def test_diversity_samples_are_drawn_for_spread_out_prompts_with_their_own_seed(monkeypatch, checkpoint_dir, prompts):
    import alignpipe.evaluation.harness as harness

    calls = []
    generate = harness.generate

    def spy(model, tok, batch_prompts, settings, **kwargs):
        calls.append((list(batch_prompts), settings.seed))
        return generate(model, tok, batch_prompts, settings, **kwargs)

    monkeypatch.setattr(harness, "generate", spy)
    ref = Checkpoint("base", str(checkpoint_dir))
    settings = GenerationSettings(max_new_tokens=4, batch_size=8, seed=3)
    evaluate_checkpoints([ref], ref, prompts, GoldJudge(), settings, bootstrap_resamples=50,
                         diversity=DiversitySampling(samples_per_prompt=2, prompts=3))
    # 3 of the 12 prompts, evenly spaced (files are often ordered by source), each twice in a row, seeded apart
    assert calls == [(prompts, 3), ([prompts[0]] * 2 + [prompts[4]] * 2 + [prompts[8]] * 2, 3 + DIVERSITY_SEED_OFFSET)]
    with pytest.raises(ValueError, match="2\\+ samples per prompt"):
        DiversitySampling(samples_per_prompt=1)


def test_the_proxy_scores_every_checkpoint_once_after_the_models_are_released(monkeypatch, tmp_path, checkpoint_dir,
                                                                              tokenizer, prompts):
    """The reward model is the third model an evaluation needs: it scores only once the policies and the reference
    are released, and the reference's samples (also a checkpoint's here) are scored once."""
    import alignpipe.evaluation.harness as harness

    other_dir = save_tiny_checkpoint(build_tiny_model(tokenizer, **SHAPE, seed=1), tokenizer, tmp_path / "other")
    ref, other = Checkpoint("base", str(checkpoint_dir)), Checkpoint("other", str(other_dir))
    events = []
    release = harness.LazyModel.release

    def spy_release(self):
        events.append(("release", self.checkpoint.name))
        release(self)

    def proxy(batch_prompts, responses):
        events.append(("proxy", len(responses)))
        return [[float(len(r)), -float(len(r))] for r in responses]

    monkeypatch.setattr(harness.LazyModel, "release", spy_release)
    settings = GenerationSettings(max_new_tokens=4, batch_size=8, seed=3)
    results, samples = evaluate_checkpoints([ref, other], ref, prompts, GoldJudge(), settings, bootstrap_resamples=50,
                                            proxy=proxy)
    assert events == [("release", "other"), ("release", "base"), ("proxy", len(prompts)), ("proxy", len(prompts))]
    assert samples[0].proxy_members is samples[0].reference_proxy_members  # the reference: scored once, reused
    assert samples[1].proxy_members == [[float(len(g.response)), -float(len(g.response))]
                                        for g in samples[1].generations]
    lengths = [len(g.response) for g in samples[1].generations]
    assert results[1].metrics["proxy_reward"].value == 0.0  # the members cancel
    assert results[1].metrics["proxy_reward_min"].value == pytest.approx(-sum(lengths) / len(lengths))
    assert [row["proxy_members"] for row in sample_rows(samples[1])] == samples[1].proxy_members


def test_checkpoint_metrics_tell_a_collapsed_policy_from_a_varied_one():
    """Within-prompt diversity sees what diversity across prompts does not: a policy that gives each prompt one
    answer every time (but different answers to different prompts)."""
    collapsed = dataclasses.replace(_judged(4), diversity_groups=[[f"answer {i} is here"] * 3 for i in range(4)])
    varied = dataclasses.replace(_judged(4), diversity_groups=[[f"answer {i} is here", f"maybe {i} or so",
                                                                f"it could be {i}"] for i in range(4)])
    one, many = (checkpoint_metrics(s, bootstrap_resamples=50, seed=0) for s in (collapsed, varied))
    assert one["distinct_2"].value == many["distinct_2"].value  # across prompts: the same main samples
    assert one["self_bleu_4"].value == 1.0 and many["self_bleu_4"].value < 0.2
    assert one["distinct_2_within"].value == pytest.approx(1 / 3) and many["distinct_2_within"].value == 1.0
    assert "self_bleu_4" not in checkpoint_metrics(_judged(4), bootstrap_resamples=50, seed=0)  # none drawn
    assert one["policy_entropy"].value == 3.0  # three tokens of log-prob -1 each
    assert one["gold_reward_delta_vs_ref"].value == pytest.approx(0.7 - 0.2)


def test_a_shared_cache_keeps_float32_and_bfloat16_results_apart(tmp_path, checkpoint_dir, tokenizer, prompts):
    """The same weights sample and score differently in bfloat16: an evaluation in bfloat16 gets its own samples and
    log-probs, not the float32 ones an earlier evaluation left in the same cache."""
    other_dir = save_tiny_checkpoint(build_tiny_model(tokenizer, **SHAPE, seed=1), tokenizer, tmp_path / "other")
    ref = Checkpoint("base", str(checkpoint_dir), directory_hash(checkpoint_dir))
    other = Checkpoint("other", str(other_dir), directory_hash(other_dir))
    settings = GenerationSettings(max_new_tokens=5, batch_size=8, seed=3)

    def evaluated(dtype: str, cache: EvalCache | None) -> tuple:
        _, (samples,) = evaluate_checkpoints([other], ref, prompts, GoldJudge(), settings, dtype=dtype,
                                             bootstrap_resamples=50, cache=cache)
        return samples.generations, samples.logp_policy, samples.logp_reference

    cache = EvalCache(tmp_path / "cache")
    in_float32 = evaluated("float32", cache)
    in_bfloat16 = evaluated("bfloat16", None)
    assert in_bfloat16 != in_float32
    assert evaluated("bfloat16", cache) == in_bfloat16
    assert evaluated("float32", cache) == in_float32


PAIRS = [("sort: 3 1 2", "1 2 3", "3 1 2"), ("copy: 4 4 9", "4 4 9", "4 4"), ("sum: 2 5 1", "8", "7"),
         ("sort: 3 1 2", "1 2 3", "1 2")]  # the first prompt twice: its pairs are resampled together


def test_implicit_reward_accuracy_of_a_checkpoint_against_its_reference(tmp_path, checkpoint_dir, tokenizer, prompts):
    """A checkpoint's implicit reward margins on held-out pairs are those of hand forward passes of it and of the
    reference, on each response's tokens and EOS; the reference itself, or a copy of its weights, gets no metric (its
    margins are all 0), and a cache answers a second evaluation without changing a number."""
    other_model = build_tiny_model(tokenizer, **SHAPE, seed=1).eval()
    other_dir = save_tiny_checkpoint(other_model, tokenizer, tmp_path / "other")
    copy_dir = tmp_path / "copy"
    shutil.copytree(checkpoint_dir, copy_dir)
    ref = Checkpoint("base", str(checkpoint_dir), directory_hash(checkpoint_dir))
    other = Checkpoint("other", str(other_dir), directory_hash(other_dir))
    weights_copy = Checkpoint("copy", str(copy_dir), directory_hash(copy_dir))
    settings = GenerationSettings(max_new_tokens=3, batch_size=8, seed=3)

    def evaluated(cache=None):
        return evaluate_checkpoints([ref, other, weights_copy], ref, prompts[:2], GoldJudge(), settings,
                                    bootstrap_resamples=50, cache=cache, pairs=PAIRS)

    results, samples = evaluated()
    assert "implicit_reward_accuracy" not in results[0].metrics and samples[0].implicit_margins is None
    assert "implicit_reward_accuracy" not in results[2].metrics  # another path, the reference's weights
    ref_model = build_tiny_model(tokenizer, **SHAPE, seed=0).eval()

    def log_ratio(prompt: str, response: str) -> float:
        ids = [*tokenizer(response, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        return _hand_logprob(other_model, tokenizer, prompt, ids) - _hand_logprob(ref_model, tokenizer, prompt, ids)

    hand = [log_ratio(p, c) - log_ratio(p, r) for p, c, r in PAIRS]
    assert samples[1].implicit_margins == pytest.approx(hand, abs=1e-4)
    accuracy = results[1].metrics["implicit_reward_accuracy"]
    assert accuracy.value == sum(m > 0 for m in hand) / len(PAIRS) and accuracy.n == len(PAIRS)
    assert accuracy.higher_is_better is True and accuracy.extra["n_ties"] == 0
    assert [row["margin"] for row in implicit_rows(samples[1])] == samples[1].implicit_margins
    assert implicit_rows(samples[1])[1] == {"prompt": PAIRS[1][0], "chosen": PAIRS[1][1], "rejected": PAIRS[1][2],
                                            "margin": samples[1].implicit_margins[1]}
    cache = EvalCache(tmp_path / "cache")
    evaluated(cache)
    hits = cache.hits
    cached_results, cached_samples = evaluated(cache)
    assert cache.hits > hits and cached_samples[1].implicit_margins == samples[1].implicit_margins
    assert cached_results[1].metrics["implicit_reward_accuracy"] == accuracy


def _judged(n_prompts: int) -> CheckpointSamples:
    generations = [Generation(f"p{i}", "a b c", (1, 2, 3), False) for i in range(n_prompts)]
    return CheckpointSamples(Checkpoint("dpo", "x"), generations, [0.7] * n_prompts, [[-1.0, -1.0, -1.0]] * n_prompts,
                             [[-1.5, -1.0, -1.5]] * n_prompts, [1.0] * n_prompts, [5] * n_prompts,
                             reference_rewards=[0.2] * n_prompts)


def test_a_one_prompt_evaluation_leaves_out_the_lc_win_rate(caplog):
    """The length GLM needs two prompts: with one, the LC win rate is left out (saying why) and every other metric is
    kept, so the evaluation does not fail after all checkpoints were sampled and judged; its leaderboard renders."""
    from alignpipe.evaluation.leaderboard import CheckpointResult, build_leaderboard, render_csv, render_markdown

    with caplog.at_level("INFO", logger="alignpipe"):
        metrics = checkpoint_metrics(_judged(1), bootstrap_resamples=50, seed=0)
    assert "lc_win_rate_vs_ref" not in metrics and "needs at least 2 prompts, got 1" in caplog.text
    assert {"gold_reward", "win_rate_vs_ref", "kl_ref_k1", "kl_ref_k3", "distinct_2"} <= set(metrics)
    assert "lc_win_rate_vs_ref" in checkpoint_metrics(_judged(2), bootstrap_resamples=50, seed=0)
    assert metrics["len_tokens_delta_vs_ref"].value == 3 - 5  # 3 response tokens against the reference's 5
    board = build_leaderboard([CheckpointResult("dpo", "x", None, metrics)], run={}, config={}, env={}, suite="s",
                              primary_metric="gold_reward")
    assert "lc_win_rate" not in render_markdown(board) + render_csv(board)


@pytest.mark.parametrize("damaged", ["[1, 2", "{}", '"text"', '[{"prompt": 1}]', "[[1, \"x\"]]", "[[true]]"])
def test_an_eval_cache_entry_of_another_shape_is_a_miss(tmp_path, damaged):
    """An entry cut short was a miss, recomputed; one of another shape (a list where rows are, text where numbers
    are: edited, or written by something else) raised deep in the harness. Every kind is now a miss too."""
    from alignpipe.evaluation.generation import Generation

    cache = EvalCache(tmp_path)
    cache.put_generations("g", [Generation("p", "r", (1, 2), False)])
    cache.put_token_logprobs("t", [[-0.5, -1.0]])
    cache.put_member_scores("m", [[0.1, 0.2]])
    cache.put_floats("f", [0.25])
    assert cache.get_generations("g") == [Generation("p", "r", (1, 2), False)]
    assert (cache.get_token_logprobs("t"), cache.get_member_scores("m"), cache.get_floats("f")) == (
        [[-0.5, -1.0]], [[0.1, 0.2]], [0.25])
    for kind, key in (("generations", "g"), ("token_logprobs", "t"), ("member_scores", "m"), ("logprobs", "f")):
        cache._path(kind, key).write_text(damaged)
    misses = cache.misses
    assert [cache.get_generations("g"), cache.get_token_logprobs("t"), cache.get_member_scores("m"),
            cache.get_floats("f")] == [None] * 4
    assert cache.misses == misses + 4
