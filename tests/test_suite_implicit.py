"""Implicit-reward accuracy in the evaluation suites: which suites may draw the pairs, that the pairs are unseen by
every policy stage (synthetic: the task's held-out split; HH-RLHF: the adapter's held-out split), that a pair too long
for a model is refused, and that run_suite reports the metric for every checkpoint but the reference, as the eval
stage does, with the pairs recorded for merges."""

from __future__ import annotations

import gzip
import json

import pytest
import yaml
from conftest import REPO, SHARED

from alignpipe.data.hh_rlhf import HH_HELDOUT_FRACTION, hh_is_heldout
from alignpipe.data.pairing import plain_text
from alignpipe.data.preference import preference_pairs_for
from alignpipe.data.sft_sources import load_sft_source
from alignpipe.evaluation.cache import EvalCache, content_key
from alignpipe.evaluation.harness import IMPLICIT_PAIR_SEED, Checkpoint, pair_generations
from alignpipe.evaluation.leaderboard import load_leaderboard, merge_leaderboards, write_leaderboard
from alignpipe.evaluation.suites import (
    ImplicitRewardPairs,
    SuiteSpec,
    fit_pairs,
    load_implicit_pairs,
    load_suite,
    run_suite,
)
from alignpipe.models.tiny import build_tiny_model, save_tiny_checkpoint, train_tokenizer
from alignpipe.recipe import DataSpec, PreferenceDataSpec
from alignpipe.tasks import gold_reward, heldout_gold_pairs, parse_prompt
from alignpipe.tasks.synthetic import is_heldout

POLICY_SUITE = {"name": "mini", "prompts": {"source": "synthetic", "n": 8}, "reference": "checkpoint",
                "judge": "gold", "primary_metric": "gold_reward"}

# ------------------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("change, message", [
    ({"reference": "dataset", "judge": "reward_model", "prompts": {"source": "alpaca_eval", "path": "x.jsonl"}},
     "implicit_reward needs reference: checkpoint"),
    ({"kind": "reward_models", "prompts": None, "reference": None, "judge": None,
      "pair_sources": [{"name": "toy", "source": "synthetic"}]}, "implicit_reward scores policies"),
])
def test_implicit_reward_needs_a_reference_policy(change, message):
    """The implicit reward is a log-ratio against a reference policy: a dataset reference has none, and a reward_models
    suite scores reward models."""
    with pytest.raises(ValueError, match=message):
        SuiteSpec(**{**POLICY_SUITE, **change, "implicit_reward": {"source": "synthetic"}})
    assert SuiteSpec(**POLICY_SUITE, implicit_reward={"source": "synthetic"}).implicit_reward.n == 256


@pytest.mark.parametrize("block, message", [
    ({"source": "alpaca_eval", "path": "prefs.jsonl"}, "no policy stage holds AlpacaEval pairs out of training"),
    ({"source": "synthetic", "path": "x.jsonl"}, "implicit_reward.path: source synthetic .* reads no file"),
    ({"source": "hh_rlhf"}, "implicit_reward.path: source hh_rlhf needs the data file"),
    ({"source": "hh_rlhf", "path": "hh.jsonl", "seed": 3}, "implicit_reward.seed is not read"),
    ({"source": "synthetic", "pairs": 8}, "pairs"),
])
def test_implicit_reward_block_is_refused_where_its_pairs_could_be_seen_or_a_key_unread(tmp_path, block, message):
    """AlpacaEval pairs are refused: a dpo stage on AlpacaEval trains on every instruction. A suite file's error names
    the file and the key."""
    suite = tmp_path / "mini.yaml"
    suite.write_text(yaml.safe_dump({**POLICY_SUITE, "implicit_reward": block}))
    with pytest.raises(ValueError, match=message) as error:
        load_suite(str(suite))
    assert str(suite) in str(error.value) and "implicit_reward" in str(error.value)


# ------------------------------------------------------------------------------------------------------ the pairs


def test_synthetic_pairs_are_the_eval_stages_held_out_gold_ordered_pairs():
    """The task's held-out split, which no training stage draws from (unlike the reward-model suites' synthetic
    pairs, held out of reward stages only), ordered by gold; seed 4242 by default, as the eval stage."""
    pairs, origin = load_implicit_pairs(ImplicitRewardPairs(source="synthetic", n=40))
    assert pairs == heldout_gold_pairs(40, IMPLICIT_PAIR_SEED)
    assert origin == {"source": "synthetic", "labels": "gold", "seed": IMPLICIT_PAIR_SEED}
    assert all(is_heldout(parse_prompt(p)) and gold_reward(p, c) > gold_reward(p, r) for p, c, r in pairs)
    other, _ = load_implicit_pairs(ImplicitRewardPairs(source="synthetic", n=40, seed=7))
    assert other != pairs and all(is_heldout(parse_prompt(p)) for p, _, _ in other)


def _hh_file(path, n: int = 200):
    """A small HH-RLHF-shaped jsonl.gz: n one-turn dialogues with a chosen and a rejected reply."""
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for i in range(n):
            prompt = f"\n\nHuman: what is item {i}?\n\nAssistant:"
            row = {"chosen": f"{prompt} item {i} is a fine thing", "rejected": f"{prompt} no"}
            handle.write(json.dumps(row) + "\n")
    return path


def test_hh_pairs_come_only_from_the_split_every_hh_stage_holds_out(tmp_path, caplog):
    """What the dpo and reward stages (preference_pairs_for) and the sft stage (load_sft_source) read of an HH file
    shares no prompt with the pairs, which are the first n of the adapter's held-out split."""
    data = _hh_file(tmp_path / "hh.jsonl.gz")
    pairs, origin = load_implicit_pairs(ImplicitRewardPairs(source="hh_rlhf", path=str(data), n=10))
    assert len(pairs) == 10 and all(hh_is_heldout(p, HH_HELDOUT_FRACTION) for p, _, _ in pairs)
    assert origin == {"source": "hh_rlhf", "labels": "human", "heldout_fraction": HH_HELDOUT_FRACTION}
    assert all(c.startswith("item") and r == "no" for _, c, r in pairs)  # chosen first, as the data labels them
    dpo_rows = preference_pairs_for(PreferenceDataSpec(source="hh_rlhf", path=str(data)), DataSpec(), 0)
    sft_rows = load_sft_source("hh_rlhf", data)
    trained = {plain_text(row["prompt"]) for row in dpo_rows} | {turns[0]["content"] for turns in sft_rows}
    assert len(trained) + 10 <= 200 and not trained & {p for p, _, _ in pairs}
    every, _ = load_implicit_pairs(ImplicitRewardPairs(source="hh_rlhf", path=str(data), n=10_000))
    assert every[:10] == pairs and len(every) + len(trained) == 200  # the two parts cover the file
    assert "fewer than n=10000; using them all" in caplog.text


def test_a_dialogue_that_continues_a_held_out_one_is_held_out_too(tmp_path):
    """HH stores one conversation at several depths: a longer row is a held-out row's prompt, one of its replies and
    more turns. The split hashes the conversation's root, so that row is held out with it and no stage trains on it
    (a hash of the whole prompt trained on it, and the suites had to leave the shorter pair out)."""
    data = _hh_file(tmp_path / "hh.jsonl.gz")
    pairs, _ = load_implicit_pairs(ImplicitRewardPairs(source="hh_rlhf", path=str(data), n=3))
    first = pairs[0][0]
    continued = [f"{first} no\n\nHuman: why not{'?' * k}\n\nAssistant:" for k in range(1, 30)]
    with gzip.open(data, "at", encoding="utf-8") as handle:
        for prompt in continued:
            handle.write(json.dumps({"chosen": f"{prompt} fine", "rejected": f"{prompt} never"}) + "\n")
    assert all(hh_is_heldout(prompt, HH_HELDOUT_FRACTION) for prompt in continued)
    trained = {plain_text(row["prompt"]) for row in preference_pairs_for(
        PreferenceDataSpec(source="hh_rlhf", path=str(data)), DataSpec(), 0)}
    assert not any(t.startswith(first) for t in trained)
    again, _ = load_implicit_pairs(ImplicitRewardPairs(source="hh_rlhf", path=str(data), n=3))
    assert again == pairs  # the shorter pair stays: nothing trained on continues it


def test_hh_suite_prompts_are_the_prompts_of_the_adapters_held_out_pairs(tmp_path):
    """A held-out row the adapter skips gives no suite prompt: one whose chosen reply holds a made-up assistant turn
    gave a prompt ending in half that reply (the split at the chosen side's last assistant marker)."""
    from alignpipe.data.hh_rlhf import load_hh_rlhf_pairs
    from alignpipe.evaluation.suites import PromptSet, load_prompts

    data = _hh_file(tmp_path / "hh.jsonl.gz")
    prompt = next(p for p in (f"\n\nHuman: odd {k}?\n\nAssistant:" for k in range(100))
                  if hh_is_heldout(p, HH_HELDOUT_FRACTION))
    with gzip.open(data, "at", encoding="utf-8") as handle:
        handle.write(json.dumps({"chosen": f"{prompt} here:\n\nAssistant: more", "rejected": f"{prompt} no"}) + "\n")
    prompts, references = load_prompts(PromptSet(source="hh_rlhf", path=str(data)))
    heldout = load_hh_rlhf_pairs(data, split="heldout")
    assert prompts == [p.prompt for p in heldout] and references == [p.chosen for p in heldout]
    assert not any("here:" in p for p in prompts) and len(prompts) == sum(
        hh_is_heldout(f"\n\nHuman: what is item {i}?\n\nAssistant:", HH_HELDOUT_FRACTION) for i in range(200))


def test_a_dpo_stage_on_alpaca_eval_trains_on_every_instruction(tmp_path):
    """Why an alpaca_eval implicit_reward block is refused: a dpo stage's AlpacaEval pairs come from every instruction
    of the file (no held-out split), so no pair is known to be unseen by a policy trained on it."""
    rows = [{"instruction": f"Name thing {i}.", "reference": {"text": f"thing {i}"},
             "responses": [{"text": f"answer {j} on {i}", "score": 0.2 + 0.3 * j} for j in range(3)]}
            for i in range(30)]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    pairs = preference_pairs_for(PreferenceDataSpec(source="alpaca_eval", path=str(data)), DataSpec(), 0)
    assert {plain_text(row["prompt"]) for row in pairs} == {row["instruction"] for row in rows}


# --------------------------------------------------------------------------------------------- lengths and cuts


def _dialogue(i: int, turns: int) -> str:
    earlier = "".join(f"\n\nHuman: tell me about item {i}.{t} please\n\nAssistant: item {i}.{t} is fine"
                      for t in range(turns))
    return f"{earlier}\n\nHuman: and the last one, number {i}?\n\nAssistant:"


@pytest.fixture(scope="module")
def dialogue_tokenizer():
    return train_tokenizer([_dialogue(i, 6) for i in range(4)], vocab_size=120)


def test_a_pair_longer_than_the_models_positions_is_an_error_unless_its_prompt_is_cut(dialogue_tokenizer):
    """Past max_position_embeddings a rotary model scores silently at positions it never learned (a learned-position
    one fails): the pair is refused, naming it and the fix; the suite's prompt cut (the left side: the final turn
    stays) makes it fit."""
    tokenizer = dialogue_tokenizer
    pairs = [(_dialogue(0, 6), "item 0 is fine", "no")]
    longest = max(len(tokenizer(tokenizer.apply_chat_template(
        [{"role": "user", "content": pairs[0][0]}, {"role": "assistant", "content": reply}], tokenize=False),
        add_special_tokens=False)["input_ids"]) for reply in pairs[0][1:])  # the scored sequence: the conversation
    assert longest > 48
    with pytest.raises(ValueError, match=rf"pair 0 .*: prompt and reply are {longest} tokens, more than the 48 "
                                         r"positions of policy \(max_position_embeddings\); cut the pairs' prompts"):
        pair_generations(tokenizer, pairs, max_length=48, whose="policy")
    (cut,) = fit_pairs(pairs, tokenizer, 24)
    assert cut[1:] == pairs[0][1:] and pairs[0][0].endswith(cut[0])
    assert cut[0].endswith("\n\nHuman: and the last one, number 0?\n\nAssistant:")
    assert len(pair_generations(tokenizer, [cut], max_length=48)) == 2


@pytest.mark.parametrize("reference_positions, other, message", [
    (48, None, "more than the 48 positions of policy"),
    (512, "short", "more than the 48 positions of short"),
])
def test_a_suite_refuses_pairs_a_model_cannot_score_before_sampling(dialogue_tokenizer, tmp_path, monkeypatch,
                                                                    reference_positions, other, message):
    """A pair too long for the reference or for any policy: refused from configs, before sampling."""
    import alignpipe.evaluation.harness as harness

    def tiny(tokenizer, positions: int, name: str):
        model = build_tiny_model(tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                                 max_position_embeddings=positions, seed=0)
        return Checkpoint(name, str(save_tiny_checkpoint(model, tokenizer, tmp_path / name)))

    checkpoints = [tiny(dialogue_tokenizer, reference_positions, "policy")]
    if other == "short":
        checkpoints.append(tiny(dialogue_tokenizer, 48, "short"))
    data = tmp_path / "hh.jsonl.gz"
    with gzip.open(data, "wt", encoding="utf-8") as handle:
        for d in (d for d in (_dialogue(i, 6) for i in range(100)) if hh_is_heldout(d, HH_HELDOUT_FRACTION)):
            handle.write(json.dumps({"chosen": f"{d} it is fine", "rejected": f"{d} no"}) + "\n")

    def fail(*args, **kwargs):
        raise AssertionError("sampled before the pairs were checked")

    monkeypatch.setattr(harness, "generate", fail)
    spec = SuiteSpec(**{**POLICY_SUITE, "implicit_reward": {"source": "hh_rlhf", "path": str(data), "n": 4}})
    with pytest.raises(ValueError, match=message):
        run_suite(spec, "hash", checkpoints, reference=None, judge_path=None, cache=EvalCache(tmp_path / "cache"))


def test_position_limits_of_configs():
    """A stated table (n_positions is GPT-2's name for it), scaled by a RoPE factor; none for ALiBi or RWKV."""
    from transformers import FalconConfig, GPT2Config, LlamaConfig, RwkvConfig

    from alignpipe.evaluation.harness import position_limit

    assert position_limit(LlamaConfig(max_position_embeddings=2048)) == 2048
    assert position_limit(LlamaConfig(max_position_embeddings=2048,
                                      rope_scaling={"rope_type": "dynamic", "factor": 4.0})) == 8192
    assert position_limit(GPT2Config(n_positions=512)) == 512
    llama3 = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0}  # Llama-3.1: the extended length is stated already
    assert position_limit(LlamaConfig(max_position_embeddings=131072, rope_scaling=llama3)) == 131072
    assert position_limit(FalconConfig(alibi=True)) is None and position_limit(RwkvConfig()) is None


# --------------------------------------------------------------------------------------------------- end to end


def test_run_suite_reports_implicit_reward_accuracy_as_the_eval_stage_does(completed_tiny_run, tmp_path):
    """Every checkpoint but the reference gets implicit_reward_accuracy, on the eval stage's pairs and with its number
    (the tiny recipe's eval stage also measures dpo against sft on 256 held-out pairs of seed 4242); the leaderboard
    records the pairs as the eval stage does."""
    runner, _ = completed_tiny_run
    stage_board = load_leaderboard(runner.run_dir / "leaderboard.json")
    n = stage_board["config"]["implicit_reward_pairs"]["n"]
    spec = SuiteSpec(**{**POLICY_SUITE, "generation": {"max_new_tokens": 4, "batch_size": 8},
                        "diversity": {"samples_per_prompt": 0}, "implicit_reward": {"source": "synthetic", "n": n},
                        "bootstrap_resamples": 100})
    sft, dpo = (Checkpoint(name, str(runner.run_dir / name / "checkpoint")) for name in ("sft", "dpo"))
    board = run_suite(spec, "hash", [sft, dpo], reference=sft, judge_path=None, cache=EvalCache(tmp_path / "cache"))
    rows = {row["name"]: row["results"] for row in board["checkpoints"]}
    assert "implicit_reward_accuracy" not in rows["sft"]  # the reference: every margin 0
    accuracy = rows["dpo"]["implicit_reward_accuracy"]
    assert accuracy["n"] == n and board["higher_is_better"]["implicit_reward_accuracy"] is True
    stage_rows = {row["name"]: row["results"] for row in stage_board["checkpoints"]}
    assert accuracy["value"] == pytest.approx(stage_rows["dpo"]["implicit_reward_accuracy"]["value"])
    assert board["config"]["implicit_reward_pairs"] == stage_board["config"]["implicit_reward_pairs"] == {
        "source": "synthetic", "split": "heldout", "seed": IMPLICIT_PAIR_SEED, "labels": "gold", "n": n,
        "sha256": content_key(heldout_gold_pairs(n, IMPLICIT_PAIR_SEED))[:16]}
    # a merge ranks boards of the suite together only where their pairs agree (or one board drew none)
    same, again = write_leaderboard(board, tmp_path / "a")[0], write_leaderboard(board, tmp_path / "b")[0]
    assert len(merge_leaderboards([same, again])["checkpoints"]) == 4
    other = {**board, "config": {**board["config"], "implicit_reward_pairs": {
        **board["config"]["implicit_reward_pairs"], "n": 64, "sha256": "0" * 16}}}
    with pytest.raises(ValueError, match="implicit-reward pairs"):
        merge_leaderboards([same, write_leaderboard(other, tmp_path / "c")[0]])
    none = {**board, "config": {k: v for k, v in board["config"].items() if k != "implicit_reward_pairs"}}
    assert len(merge_leaderboards([same, write_leaderboard(none, tmp_path / "d")[0]])["checkpoints"]) == 4


@pytest.mark.skipif(not (SHARED / "data" / "hh-rlhf").is_dir(), reason="needs ../shared/data/hh-rlhf (HH-RLHF)")
def test_real_hh_suite_pairs_are_unseen_by_the_smollm2_recipes_stages():
    """On the real file: hh-harmless-vs-base's 256 pairs share no prompt with what the sft and dpo stages of
    recipes/smollm2/hh-harmless-dpo.yaml train on (or could, without their limits)."""
    from alignpipe.recipe import load_recipe

    spec, _ = load_suite("hh-harmless-vs-base")
    pairs, _ = load_implicit_pairs(spec.implicit_reward)
    assert len(pairs) == spec.implicit_reward.n == 256
    recipe = load_recipe(REPO / "recipes" / "smollm2" / "hh-harmless-dpo.yaml")
    dpo, sft = recipe.stage("dpo").dataset, recipe.stage("sft").dataset
    assert dpo.path == sft.path == spec.implicit_reward.path
    unlimited = dpo.model_copy(update={"path": str(REPO / dpo.path), "limit": None})
    trained = {plain_text(row["prompt"]) for row in preference_pairs_for(unlimited, recipe.data, recipe.seed)}
    trained |= {turns[0]["content"] for turns in load_sft_source("hh_rlhf", REPO / sft.path)}
    assert len(trained) > 1000 and not trained & {p for p, _, _ in pairs}
    # nor does any of those prompts continue a pair's dialogue (one holding the pair's prompt as its opening)
    assert not any(t.startswith(p) for t in trained for p, _, _ in pairs)
