"""Evaluation suites as data: every suite file validates, the synthetic suite matches the eval stage's harness, and
the alpaca-eval suite runs end to end on the tiny model with a reward-model judge (cached on re-run)."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest
import torch
import yaml
from conftest import REPO, TINY_RECIPE, write_recipe
from pydantic import ValidationError

from alignpipe.cli import main
from alignpipe.data.preference import is_reward_heldout
from alignpipe.evaluation.reward_suite import load_pair_source
from alignpipe.evaluation.suites import (
    SUITES_DIR,
    PairSource,
    SuiteSpec,
    fit_prompts,
    load_prompts,
    load_suite,
)
from alignpipe.models.tiny import build_tiny_model, save_tiny_checkpoint, train_tokenizer
from alignpipe.rewards.ensemble import EnsembleSpec, RewardEnsemble
from alignpipe.tasks import preference_pairs

SHARED = REPO.parent / "shared" / "data"


def _random_reward_judge(backbone: str, directory, seed: int = 0):
    """A saved 2-member reward ensemble with random heads: a judge whose scores differ between responses."""
    ensemble = RewardEnsemble.create(EnsembleSpec(backbone=backbone, members=2, lora_r=4, lora_alpha=8,
                                                  top_layers=1, seed=0))
    with torch.no_grad():
        for head in ensemble.heads:
            head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
    return ensemble.save(directory)


def test_every_suite_file_validates():
    names = sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))
    assert {"synthetic", "alpaca-eval", "hh-harmless"} <= set(names)
    for name in names:
        spec, digest = load_suite(name)
        assert spec.name == name and len(digest) == 64


def test_unknown_suite_and_bad_suite_file_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="known suites"):
        load_suite("no-such-suite")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad", "prompts": {"source": "synthetic", "n": 4}, "reference": "checkpoint",
                                   "judge": "gold", "primary_metric": "gold_reward", "colour": "red"}))
    with pytest.raises(ValueError, match="colour"):
        load_suite(str(bad))


def test_a_suite_ranked_on_the_lc_win_rate_needs_two_prompts():
    """With one prompt the length GLM cannot be fitted, so the LC win rate is left out of the metrics: a suite ranked
    on it is refused when loaded, not after every checkpoint was sampled and judged."""
    spec = {"name": "one", "prompts": {"source": "synthetic", "n": 1}, "reference": "checkpoint", "judge": "gold"}
    with pytest.raises(ValueError, match="lc_win_rate_vs_ref needs at least 2 prompts"):
        SuiteSpec(**spec, primary_metric="lc_win_rate_vs_ref")
    assert SuiteSpec(**spec, primary_metric="gold_reward").prompts.n == 1
    assert SuiteSpec(**{**spec, "prompts": {"source": "synthetic", "n": 2}}, primary_metric="lc_win_rate_vs_ref")


def test_an_hh_suite_draws_only_from_the_prompts_every_hh_stage_holds_out(tmp_path):
    """HH stages train on the adapter's prompts outside its held-out 0.2; a suite with a larger share scored prompts
    the policies and a reward-model judge trained on, silently. Its prompts are a subset of the held-out part."""
    from alignpipe.data.hh_rlhf import HH_HELDOUT_FRACTION, load_hh_rlhf_pairs

    rows = [{"chosen": f"\n\nHuman: question {i}?\n\nAssistant: yes {i}",
             "rejected": f"\n\nHuman: question {i}?\n\nAssistant: no {i}"} for i in range(200)]
    data = tmp_path / "hh.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    suite = {"name": "hh", "prompts": {"source": "hh_rlhf", "path": str(data), "heldout_fraction": 0.5},
             "reference": "dataset", "judge": "reward_model", "primary_metric": "win_rate"}
    (tmp_path / "wide.yaml").write_text(yaml.safe_dump(suite))
    with pytest.raises(ValueError, match=r"prompts\.heldout_fraction 0\.5 is above 0\.2: every HH stage trains on "):
        load_suite(str(tmp_path / "wide.yaml"))

    suite["prompts"]["heldout_fraction"] = 0.1
    (tmp_path / "narrow.yaml").write_text(yaml.safe_dump(suite))
    prompts, _ = load_prompts(load_suite(str(tmp_path / "narrow.yaml"))[0].prompts)
    trained = {p.prompt for p in load_hh_rlhf_pairs(data, split="train", heldout_fraction=HH_HELDOUT_FRACTION)}
    assert prompts and not set(prompts) & trained


def test_synthetic_suite_through_the_cli(completed_tiny_run, tmp_path):
    runner, _ = completed_tiny_run
    suite = tmp_path / "mini.yaml"
    spec = yaml.safe_load((SUITES_DIR / "synthetic.yaml").read_text())
    spec["prompts"]["n"], spec["generation"]["max_new_tokens"] = 12, 8
    suite.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    assert main(["eval", str(runner.run_dir), "--reference", str(runner.run_dir / "sft" / "checkpoint"),
                 "--suite", str(suite), "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    board = json.loads((out / "leaderboard.json").read_text())
    rows = {c["name"]: c["results"] for c in board["checkpoints"]}
    assert rows["sft"]["win_rate_vs_ref"]["value"] == 0.5 and rows["dpo"]["gold_reward"]["n"] == 12
    assert {"lc_win_rate_vs_ref", "len_tokens_delta_vs_ref", "distinct_2", "repetition_4"} <= set(rows["dpo"])
    assert rows["sft"]["len_tokens_delta_vs_ref"]["value"] == 0.0  # the reference against itself
    # the suite's implicit-reward pairs: every checkpoint but the reference scored as a reward model on them
    assert "implicit_reward_accuracy" not in rows["sft"] and rows["dpo"]["implicit_reward_accuracy"]["n"] == 256
    assert board["config"]["implicit_reward_pairs"]["n"] == 256
    assert board["run"]["suite_sha256"] and (out / "leaderboard.csv").exists()
    (recorded,) = json.loads((out / "results" / "dpo.json").read_text())["checkpoints"]
    assert recorded["name"] == "dpo"
    # every row traceable (EVALUATION §10): its samples beside the table, named by both records, linked in the md
    dpo = next(c for c in board["checkpoints"] if c["name"] == "dpo")
    assert dpo["samples"] == "samples/dpo.jsonl" and recorded["samples"] == "../samples/dpo.jsonl"
    assert (out / "results" / recorded["samples"]).samefile(out / dpo["samples"])
    samples = [json.loads(line) for line in (out / dpo["samples"]).read_text().splitlines()]
    assert len(samples) == 12
    assert sum(r["gold_reward"] for r in samples) / 12 == pytest.approx(rows["dpo"]["gold_reward"]["value"])
    implicit = (out / "samples" / "dpo.implicit.jsonl").read_text().splitlines()
    assert len(implicit) == 256 and not (out / "samples" / "sft.implicit.jsonl").exists()
    assert "[samples](./samples/dpo.jsonl)" in (out / "leaderboard.md").read_text()


@pytest.mark.skipif(not (SHARED / "alpaca-eval-prefs").exists(), reason="../shared/data/alpaca-eval-prefs is absent")
def test_alpaca_eval_suite_end_to_end_with_a_reward_judge(completed_tiny_run, llama_path, tmp_path, monkeypatch):
    runner, _ = completed_tiny_run
    judge = _random_reward_judge(llama_path, tmp_path / "judge")
    spec = yaml.safe_load((SUITES_DIR / "alpaca-eval.yaml").read_text())
    spec["prompts"]["n"], spec["prompts"]["path"] = 24, str(SHARED / "alpaca-eval-prefs" / "prefs-8models.jsonl.gz")
    spec["generation"].update(max_new_tokens=8, max_prompt_tokens=24)
    suite = tmp_path / "alpaca-mini.yaml"
    suite.write_text(yaml.safe_dump(spec))
    args = ["eval", f"sft={runner.run_dir / 'sft' / 'checkpoint'}", "--suite", str(suite), "--judge", str(judge),
            "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    board = json.loads((tmp_path / "a" / "leaderboard.json").read_text())
    (row,) = board["checkpoints"]
    assert board["suite"]["primary_metric"] == "lc_win_rate_vs_ref"
    assert row["results"]["win_rate_vs_ref"]["n"] == 24 and 0 <= row["results"]["lc_win_rate_vs_ref"]["value"] <= 1
    assert row["results"]["len_chars_delta_vs_ref"]["n"] == 24  # characters: the references are texts
    prompts, references = load_prompts(load_suite(str(suite))[0].prompts)
    assert len(prompts) == len(references) == 24
    samples = [json.loads(line) for line in (tmp_path / "a" / row["samples"]).read_text().splitlines()]
    assert [r["reference_output"] for r in samples] == references  # each reply beside what it was judged against
    assert sum(r["judge_reward"] for r in samples) / 24 == pytest.approx(row["results"]["judge_reward"]["value"])
    win_rate = row["results"]["win_rate_vs_ref"]["value"]
    assert sum(r["preference_vs_ref"] for r in samples) / 24 == pytest.approx(win_rate)

    import alignpipe.evaluation.harness as harness
    import alignpipe.evaluation.suites as suites

    def fail(*a, **k):
        raise AssertionError("a cached suite evaluation generated, loaded a policy or scored again")

    monkeypatch.setattr(harness, "generate", fail)
    monkeypatch.setattr(harness, "load_causal_lm", fail)
    monkeypatch.setattr(suites.RewardJudge, "score", fail)
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    first, second = (json.loads((tmp_path / d / "leaderboard.json").read_text()) for d in ("a", "b"))
    first.pop("date"), second.pop("date")
    assert first == second
    shutil.rmtree(tmp_path / "cache")


def test_reward_models_suite_scores_every_model_on_every_source(llama_path, tmp_path):
    models = {}
    for seed in (0, 1):
        ensemble = RewardEnsemble.create(EnsembleSpec(backbone=llama_path, members=2, lora_r=4, lora_alpha=8,
                                                      top_layers=1, seed=seed))
        with torch.no_grad():
            for head in ensemble.heads:
                head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(seed))
        models[f"rm{seed}"] = ensemble.save(tmp_path / f"rm{seed}")
    suite = tmp_path / "rms.yaml"
    suite.write_text(yaml.safe_dump({
        "name": "rms", "kind": "reward_models", "primary_metric": "toy/accuracy", "bootstrap_resamples": 100,
        "pair_sources": [{"name": "toy", "source": "synthetic", "n": 24, "seed": 7}]}))
    out = tmp_path / "out"
    assert main(["eval", *(f"{k}={v}" for k, v in models.items()), "--suite", str(suite), "--out", str(out)]) == 0
    board = json.loads((out / "leaderboard.json").read_text())
    assert {c["name"] for c in board["checkpoints"]} == {"rm0", "rm1"}
    for row in board["checkpoints"]:
        res = row["results"]
        assert {"toy/accuracy", "toy/ece", "toy/brier", "toy/nll", "toy/uncertainty_auroc"} <= set(res)
        assert res["toy/accuracy"]["n"] == 24
    with pytest.raises(ValueError, match="pair_sources"):
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({"name": "bad", "kind": "reward_models", "primary_metric": "x"}))
        load_suite(str(bad))


def test_synthetic_pair_source_holds_out_what_reward_stages_train_on():
    # A reward stage trains on the prompts is_reward_heldout rejects; the suite may only use the others, and its
    # pairs are the first n of the stream that pass (exactly n, however many draws that takes).
    source = PairSource(name="toy", source="synthetic", n=40, seed=7, heldout_fraction=0.1)
    triples = load_pair_source(source)
    assert len(triples) == 40 and all(is_reward_heldout(p, 0.1) for p, _, _ in triples)
    stream = [(r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"])
              for r in preference_pairs(2000, 7, noise=0.5, temperature=0.1)]
    assert triples == [t for t in stream if is_reward_heldout(t[0], 0.1)][:40]
    # Held out at 0.1 means held out by every stage with a larger fraction too (a threshold on one hash).
    assert all(is_reward_heldout(p, 0.3) for p, _, _ in triples)


@pytest.mark.skipif(not (SHARED / "alpaca-eval-prefs").exists(), reason="../shared/data/alpaca-eval-prefs is absent")
def test_alpaca_eval_pair_source_keeps_only_held_out_prompts():
    path = str(SHARED / "alpaca-eval-prefs" / "prefs-8models.jsonl.gz")
    kept = load_pair_source(PairSource(name="a", source="alpaca_eval", path=path, heldout_fraction=0.1))
    wider = load_pair_source(PairSource(name="a", source="alpaca_eval", path=path, heldout_fraction=0.5))
    assert kept and all(is_reward_heldout(p, 0.1) for p, _, _ in kept)
    assert set(kept) < set(wider)


def test_policy_reference_suite_with_a_reward_judge(completed_tiny_run, llama_path, tmp_path):
    """reference: checkpoint + judge: reward_model (eval/suites/hh-harmless-vs-base.yaml's shape): the win rate of a
    checkpoint against itself is exactly 1/2, against another one it is the Bradley-Terry mean of the judge's scores."""
    runner, _ = completed_tiny_run
    judge = _random_reward_judge(llama_path, tmp_path / "judge")
    spec = {"name": "vs-policy", "prompts": {"source": "synthetic", "n": 16},
            "generation": {"max_new_tokens": 8, "batch_size": 16}, "reference": "checkpoint",
            "judge": "reward_model", "primary_metric": "win_rate_vs_ref"}
    suite = tmp_path / "vs-policy.yaml"
    suite.write_text(yaml.safe_dump(spec))
    sft, dpo = runner.run_dir / "sft" / "checkpoint", runner.run_dir / "dpo" / "checkpoint"
    assert main(["eval", f"sft={sft}", f"dpo={dpo}", "--suite", str(suite), "--judge", str(judge),
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]) == 0
    rows = {r["name"]: r["results"] for r in json.loads((tmp_path / "out" / "leaderboard.json").read_text())
            ["checkpoints"]}
    assert rows["sft"]["win_rate_vs_ref"]["value"] == pytest.approx(0.5)
    assert 0 < rows["dpo"]["win_rate_vs_ref"]["value"] < 1 and rows["dpo"]["win_rate_vs_ref"]["n"] == 16
    # the reward model's score is a proxy: recorded as judge_reward, in the table and in every sample row
    assert "judge_reward" in rows["dpo"] and "judge_reward_delta_vs_ref" in rows["dpo"]
    assert not any(key.startswith("gold_reward") for key in rows["dpo"])
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples" / "dpo.jsonl").read_text().splitlines()]
    assert len(samples) == 16 and all("judge_reward" in r and "gold_reward" not in r for r in samples)


@pytest.mark.parametrize(("judge", "reference", "metric", "fix"), [
    ("reward_model", "checkpoint", "gold_reward", "judge_reward"),
    ("reward_model", "checkpoint", "gold_reward_delta_vs_ref", "judge_reward_delta_vs_ref"),
    ("gold", "checkpoint", "judge_reward", "gold_reward"),
    ("reward_model", "dataset", "gold_reward", "judge_reward"),
])
def test_a_primary_metric_naming_the_other_reward_is_refused(judge, reference, metric, fix):
    """gold_reward only for the gold judge against a checkpoint; otherwise the rows hold judge_reward, so a suite
    ranking by the other name would fail after every checkpoint was sampled: refused when loaded, naming the fix."""
    source = {"source": "synthetic", "n": 8} if reference == "checkpoint" else {"source": "alpaca_eval", "path": "x"}
    spec = {"name": "s", "prompts": source, "reference": reference, "judge": judge, "primary_metric": metric}
    with pytest.raises(ValidationError, match=f"primary_metric {metric}: .* write {fix} "):
        SuiteSpec.model_validate(spec)
    assert SuiteSpec.model_validate({**spec, "primary_metric": fix}).primary_metric == fix


def test_boards_judged_by_different_reward_models_saved_under_one_name_are_not_merged(llama_path, tmp_path):
    """Every reward stage saves its model to .../checkpoint, so judge ids name only that directory: the board records
    the judge's weights hash, and the merge compares that."""
    from alignpipe.evaluation.leaderboard import merge_leaderboards

    suite = tmp_path / "vs-self.yaml"
    suite.write_text(yaml.safe_dump({"name": "vs-self", "prompts": {"source": "synthetic", "n": 4},
                                     "generation": {"max_new_tokens": 2, "batch_size": 4}, "reference": "checkpoint",
                                     "judge": "reward_model", "primary_metric": "win_rate_vs_ref"}))
    boards = {}
    for run, seed in (("a", 0), ("b", 1)):
        judge = _random_reward_judge(llama_path, tmp_path / f"judge-{run}" / "checkpoint", seed=seed)
        assert main(["eval", f"policy={llama_path}", "--suite", str(suite), "--judge", str(judge), "--cache-dir",
                     str(tmp_path / "cache"), "--out", str(tmp_path / run)]) == 0
        boards[run] = tmp_path / run / "leaderboard.json"
    with pytest.raises(ValueError, match="they differ in judge"):
        merge_leaderboards([boards["a"], boards["b"]])
    judges = [json.loads(boards[run].read_text())["config"]["judge"] for run in "ab"]
    assert judges[0]["id"] == judges[1]["id"] and judges[0]["weights_sha256"] != judges[1]["weights_sha256"]
    (tmp_path / "again").mkdir()
    boards["again"] = shutil.copy(boards["a"], tmp_path / "again" / "leaderboard.json")  # the same judge's weights
    assert len(merge_leaderboards([boards["a"], boards["again"]])["checkpoints"]) == 2
    # a copy of judge a under another name is judge a: its id differs (the directory's name), its identity does not
    renamed = shutil.copytree(tmp_path / "judge-a" / "checkpoint", tmp_path / "judges" / "rm-v1")
    assert main(["eval", f"policy={llama_path}", "--suite", str(suite), "--judge", str(renamed), "--cache-dir",
                 str(tmp_path / "cache"), "--out", str(tmp_path / "renamed")]) == 0
    board = tmp_path / "renamed" / "leaderboard.json"
    assert json.loads(board.read_text())["config"]["judge"]["id"] != judges[0]["id"]
    assert len(merge_leaderboards([boards["a"], board])["checkpoints"]) == 2


def test_policy_reference_suite_cuts_prompts_to_max_prompt_tokens(completed_tiny_run, llama_path, tmp_path):
    """max_prompt_tokens applies with a policy reference too: the prompt set the leaderboard records is the cut one."""
    runner, _ = completed_tiny_run
    judge = _random_reward_judge(llama_path, tmp_path / "judge")
    sft = runner.run_dir / "sft" / "checkpoint"
    ids = []
    for cut in (None, 3):
        generation = {"max_new_tokens": 4, "batch_size": 8, **({"max_prompt_tokens": cut} if cut else {})}
        suite = tmp_path / f"cut-{cut}.yaml"
        suite.write_text(yaml.safe_dump({"name": "cut", "prompts": {"source": "synthetic", "n": 8},
                                         "generation": generation, "reference": "checkpoint",
                                         "judge": "reward_model", "primary_metric": "win_rate_vs_ref"}))
        out = tmp_path / f"out-{cut}"
        assert main(["eval", f"sft={sft}", "--suite", str(suite), "--judge", str(judge), "--cache-dir",
                     str(tmp_path / "cache"), "--out", str(out)]) == 0
        config = json.loads((out / "leaderboard.json").read_text())["config"]
        ids.append(config["prompt_set"]["id"])
    assert ids[0] != ids[1]


def _dialogue(i: int, turns: int) -> str:
    """A multi-turn HH-style prompt whose last Human turn is the one to answer."""
    earlier = "".join(f"\n\nHuman: tell me about item {i}.{t} please\n\nAssistant: item {i}.{t} is fine"
                      for t in range(turns))
    return f"{earlier}\n\nHuman: and what about the last one, number {i}?\n\nAssistant:"


def test_fit_prompts_keeps_the_final_turn_of_a_long_dialogue():
    """A dialogue over the budget loses its earliest turns, never its final Human turn or the closing "Assistant:"
    the policy answers; a prompt within the budget is unchanged."""
    long, short = _dialogue(0, 6), _dialogue(1, 0)
    tokenizer = train_tokenizer([long, short], vocab_size=120)
    n_short = len(tokenizer(short, add_special_tokens=False)["input_ids"])
    budget = n_short + 4
    cut, kept = fit_prompts([long, short], tokenizer, budget)
    assert kept == short
    assert long.endswith(cut) and len(cut) < len(long)
    assert cut.endswith("\n\nHuman: and what about the last one, number 0?\n\nAssistant:")
    assert "item 0.0" not in cut


def test_fit_prompts_right_side_keeps_an_instructions_task_statement():
    """A single instruction keeps its beginning (the task) and loses the pasted input after it; the AlpacaEval
    suite cuts this way, the HH suites the other way."""
    instruction = "Summarise the following text in one sentence: " + " ".join(f"word{i}" for i in range(40))
    tokenizer = train_tokenizer([instruction], vocab_size=120)
    (cut,) = fit_prompts([instruction], tokenizer, 12, side="right")
    assert cut.startswith("Summarise the following") and "word39" not in cut and len(cut) < len(instruction)
    (left,) = fit_prompts([instruction], tokenizer, 12)
    assert left.endswith("word39") and "Summarise" not in left
    with pytest.raises(ValueError, match="truncation side"):
        fit_prompts([instruction], tokenizer, 12, side="middle")
    assert load_suite("alpaca-eval")[0].generation.truncation_side == "right"
    assert load_suite("hh-harmless-vs-base")[0].generation.truncation_side == "left"


def test_dataset_reference_judge_sees_the_prompts_the_policy_answered(llama_path, tmp_path, monkeypatch):
    """With max_prompt_tokens, the judge scores each reply (and the dataset's) against the cut prompt the policy
    was given, which still ends in the dialogue's final turn."""
    import alignpipe.evaluation.harness as harness
    import alignpipe.evaluation.suites as suites
    from alignpipe.data.hh_rlhf import HH_HELDOUT_FRACTION, hh_is_heldout

    dialogues = [d for d in (_dialogue(i, 5) for i in range(200)) if hh_is_heldout(d, HH_HELDOUT_FRACTION)][:6]
    data = tmp_path / "hh.jsonl.gz"
    with gzip.open(data, "wt", encoding="utf-8") as handle:
        for d in dialogues:
            handle.write(json.dumps({"chosen": f"{d} it is fine", "rejected": f"{d} no"}) + "\n")
    tokenizer = train_tokenizer(dialogues, vocab_size=120)
    policy = save_tiny_checkpoint(build_tiny_model(tokenizer, hidden_size=32, num_layers=1, num_heads=2,
                                                   intermediate_size=64, max_position_embeddings=128, seed=0),
                                  tokenizer, tmp_path / "policy")
    budget = len(tokenizer(_dialogue(0, 1), add_special_tokens=False)["input_ids"])
    suite = tmp_path / "hh-mini.yaml"
    suite.write_text(yaml.safe_dump({
        "name": "hh-mini", "prompts": {"source": "hh_rlhf", "path": str(data)},  # every dialogue held out
        "generation": {"max_new_tokens": 4, "batch_size": 8, "max_prompt_tokens": budget},
        "diversity": {"samples_per_prompt": 2, "prompts": 3},
        "reference": "dataset", "judge": "reward_model", "primary_metric": "win_rate_vs_ref",
        "bootstrap_resamples": 100}))
    generated, judged = [], []
    generate, score = harness.generate, suites.RewardJudge.score

    def spy_generate(model, tok, prompts, settings, **kwargs):
        generated.extend(prompts)
        return generate(model, tok, prompts, settings, **kwargs)

    def spy_score(self, prompts, responses):
        judged.extend(prompts)
        return score(self, prompts, responses)

    monkeypatch.setattr(harness, "generate", spy_generate)
    monkeypatch.setattr(suites.RewardJudge, "score", spy_score)
    judge = _random_reward_judge(llama_path, tmp_path / "judge")
    assert main(["eval", f"policy={policy}", "--suite", str(suite), "--judge", str(judge), "--cache-dir",
                 str(tmp_path / "cache"), "--out", str(tmp_path / "out")]) == 0
    # the diversity samples (2 on each of 3 prompts spread over the 6) answer the same cut prompts
    assert len(generated) == len(dialogues) + 2 * 3 and set(judged) == set(generated)
    for prompt, dialogue in zip(generated, dialogues):
        assert len(prompt) < len(dialogue) and dialogue.endswith(prompt)
        assert prompt.endswith(dialogue[dialogue.rfind("\n\nHuman:"):])


def _alpaca_file(path, n: int = 40):
    """A small prefs-8models.jsonl-shaped file: n instructions, each with a reference and three scored answers."""
    rows = [{"instruction": f"Name thing number {i} of the list, briefly.", "source": "test",
             "reference": {"model": "ref", "text": f"thing {i}"},
             "responses": [{"model": f"m{j}", "text": f"answer {j} about thing {i}", "score": 0.2 + 0.3 * j}
                           for j in range(3)]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, [r["instruction"] for r in rows]


def _stage_judge(tmp_path, llama_path, data, dataset_source="alpaca_eval", fraction=0.25):
    """A judge saved as a run's reward stage checkpoint, beside the resolved config.yaml the runner writes there;
    returns it and the prompts that stage trains on, found as the reward stage finds them."""
    from alignpipe.data.pairing import plain_text
    from alignpipe.data.preference import preference_pairs_for
    from alignpipe.pipeline.rundir import StageDir
    from alignpipe.recipe import load_recipe, recipe_to_dict

    tmp_path.mkdir(parents=True, exist_ok=True)
    dataset = {"source": dataset_source, "path": str(data)} if dataset_source != "synthetic" else {}
    recipe = load_recipe(write_recipe(tmp_path, {**TINY_RECIPE, "stages": [
        {"name": "rm", "type": "reward", "inputs": [], "heldout_fraction": fraction, "dataset": dataset}]}))
    stage = StageDir(tmp_path / "run" / "rm")
    stage.root.mkdir(parents=True)
    stage.write_config({"recipe": recipe_to_dict(recipe), "stage": "rm", "base": "tiny", "inputs": {}})
    rows = preference_pairs_for(recipe.stages[0].dataset, recipe.data, recipe.seed)
    trained = {p for p in (plain_text(r["prompt"]) for r in rows) if not is_reward_heldout(p, fraction)}
    return _random_reward_judge(llama_path, stage.checkpoint), trained


def _alpaca_suite(tmp_path, data) -> str:
    suite = tmp_path / "alpaca-local.yaml"
    suite.write_text(yaml.safe_dump({
        "name": "alpaca-local", "prompts": {"source": "alpaca_eval", "path": str(data)},
        "generation": {"max_new_tokens": 4, "batch_size": 16, "truncation_side": "right"}, "reference": "dataset",
        "judge": "reward_model", "primary_metric": "lc_win_rate_vs_ref", "bootstrap_resamples": 100}))
    return str(suite)


def test_alpaca_suite_leaves_out_the_prompts_its_judge_trained_on(llama_path, tmp_path, monkeypatch, caplog):
    """A judge whose reward stage trained on the suite's own AlpacaEval instructions answers only for those the stage
    held out: the policy is sampled on exactly those, and the leaderboard says so."""
    import alignpipe.evaluation.harness as harness

    data, instructions = _alpaca_file(tmp_path / "prefs.jsonl")
    judge, trained = _stage_judge(tmp_path, llama_path, data)
    held_out = [p for p in instructions if p not in trained]
    assert trained and held_out  # 40 instructions split 75/25 by the stage's hash
    generated = []
    generate = harness.generate

    def spy_generate(model, tok, prompts, settings, **kwargs):
        generated.extend(prompts)
        return generate(model, tok, prompts, settings, **kwargs)

    monkeypatch.setattr(harness, "generate", spy_generate)
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="alignpipe"):
        assert main(["eval", f"policy={llama_path}", "--suite", _alpaca_suite(tmp_path, data), "--judge", str(judge),
                     "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    assert generated[: len(held_out)] == held_out and set(generated) == set(held_out)  # diversity samples too
    board = json.loads((out / "leaderboard.json").read_text())
    assert board["config"]["prompt_set"]["n"] == len(held_out) and board["config"]["prompt_set"]["held_out_by_judge"]
    assert board["config"]["judge"]["trained_on"]["stage"] == "rm"
    assert board["checkpoints"][0]["results"]["win_rate_vs_ref"]["n"] == len(held_out)
    assert f"evaluating only the {len(held_out)} it held out" in caplog.text


def test_judge_provenance_decides_which_alpaca_prompts_count(llama_path, tmp_path, caplog):
    """No config beside the judge: every prompt, with a warning that the overlap cannot be checked; trained on another
    source: every prompt; trained on AlpacaEval without a held-out fraction: a clear error."""
    from alignpipe.evaluation.judge_training import unseen_by_judge
    from alignpipe.pipeline.rundir import StageDir

    data, instructions = _alpaca_file(tmp_path / "prefs.jsonl", n=8)
    bare = _random_reward_judge(llama_path, tmp_path / "bare")
    with caplog.at_level("WARNING", logger="alignpipe"):
        assert unseen_by_judge("alpaca_eval", bare) == (None, None)
    assert "cannot tell what the judge" in caplog.text
    synthetic, _ = _stage_judge(tmp_path / "a", llama_path, data, dataset_source="synthetic")
    keep, trained_on = unseen_by_judge("alpaca_eval", synthetic)
    assert keep is None and trained_on.source == "synthetic"
    assert load_prompts(load_suite(_alpaca_suite(tmp_path, data))[0].prompts, keep=keep)[0] == instructions
    judge, _ = _stage_judge(tmp_path / "b", llama_path, data)
    stage = StageDir(judge.parent)
    config = stage.read_config()
    config["recipe"]["stages"][0]["heldout_fraction"] = None
    stage.write_config(config)
    with pytest.raises(ValueError, match=r"trained on alpaca_eval prompts \(reward stage 'rm'\).*no heldout_fraction"):
        unseen_by_judge("alpaca_eval", judge)


@pytest.mark.skipif(not (SHARED / "alpaca-eval-prefs").exists(), reason="../shared/data/alpaca-eval-prefs is absent")
def test_real_alpaca_suite_and_reward_recipe_share_no_prompt_once_split():
    """On the real files: the alpaca-eval suite judged by recipes/alpaca-eval/reward-ensemble.yaml's stage keeps
    none of the instructions that stage trains on (its pairs' prompts are the suite's instruction strings)."""
    from alignpipe.data.pairing import plain_text
    from alignpipe.data.preference import preference_pairs_for
    from alignpipe.evaluation.suites import PromptSet
    from alignpipe.recipe import load_recipe

    path = str(SHARED / "alpaca-eval-prefs" / "prefs-8models.jsonl.gz")
    recipe = load_recipe(REPO / "recipes" / "alpaca-eval" / "reward-ensemble.yaml",
                         [f"stages.reward.dataset.path={path}"])
    stage = recipe.stages[0]
    prompts = {plain_text(r["prompt"]) for r in preference_pairs_for(stage.dataset, recipe.data, recipe.seed)}
    trained = {p for p in prompts if not is_reward_heldout(p, stage.heldout_fraction)}
    everything, _ = load_prompts(PromptSet(source="alpaca_eval", path=path))
    kept, _ = load_prompts(PromptSet(source="alpaca_eval", path=path),
                           keep=lambda p: is_reward_heldout(p, stage.heldout_fraction))
    assert len(everything) == 805 and trained and kept and not trained & set(kept)
    assert trained <= set(everything)  # the stage's prompts are the suite's instructions, character for character


def test_a_suite_data_path_under_the_home_directory_is_found(tmp_path, monkeypatch):
    from alignpipe.evaluation.suites import PromptSet, data_path

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "prompts.jsonl").write_text("{}\n")
    assert data_path(PromptSet(source="alpaca_eval", path="~/prompts.jsonl")) == tmp_path / "prompts.jsonl"


def test_a_dataset_reference_suite_checks_every_checkpoints_positions_before_sampling(llama_path, tmp_path,
                                                                                      monkeypatch):
    """Each policy answers the prompts cut with its own tokenizer; one whose prompt and max_new_tokens exceed its
    positions is refused before any checkpoint is sampled (the first one too)."""
    import alignpipe.evaluation.harness as harness
    from alignpipe.evaluation.cache import EvalCache
    from alignpipe.evaluation.harness import Checkpoint
    from alignpipe.evaluation.suites import run_suite

    def fail(*a, **k):
        raise AssertionError("a checkpoint was sampled before every one was checked")

    monkeypatch.setattr(harness, "generate", fail)
    short = shutil.copytree(llama_path, tmp_path / "short")  # the same model, with 64 positions instead of 128
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    data, _ = _alpaca_file(tmp_path / "prefs.jsonl", n=4)  # prompts of 42 tokens, rendered: 82 fit 128, not 64
    spec = SuiteSpec.model_validate({
        "name": "long", "prompts": {"source": "alpaca_eval", "path": str(data)}, "reference": "dataset",
        "judge": "gold", "primary_metric": "judge_reward", "generation": {"max_new_tokens": 40, "batch_size": 4}})
    with pytest.raises(ValueError, match=r"checkpoint 'b' .* has 64 positions .* generation.max_new_tokens"):
        run_suite(spec, "hash", [Checkpoint("a", llama_path), Checkpoint("b", str(short))], reference=None,
                  judge_path=None, cache=EvalCache(tmp_path / "cache"))


def test_suite_files_read_numbers_as_recipes_do(tmp_path):
    """A suite's seed 01234 was read as octal 668 and n: 0x100 as 256, silently, where a recipe refuses both; suites
    are read by the recipe loader now, which also refuses a key written twice."""
    base = ("name: s\nprompts: {source: synthetic, n: 8, seed: 7}\nreference: checkpoint\njudge: gold\n"
            "primary_metric: gold_reward\n")
    assert load_suite(str(write_text(tmp_path / "ok.yaml", base)))[0].prompts.seed == 7
    for bad, key in (("seed: 7", "seed: 01234"), ("n: 8", "n: 0x100")):
        path = write_text(tmp_path / "bad.yaml", base.replace(bad, key))
        with pytest.raises(ValueError, match=rf"suite file {path} is invalid: (?s:.*)prompts\.{key.split(':')[0]}"):
            load_suite(str(path))
    twice = write_text(tmp_path / "twice.yaml", base + "judge: reward_model\n")
    with pytest.raises(ValueError, match="suite file .* is invalid: (?s:.*)judge"):
        load_suite(str(twice))


def write_text(path, text: str):
    path.write_text(text)
    return path
