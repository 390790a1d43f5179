"""Real-data recipes run end to end on the tiny model (skipped where ../shared/data is absent)."""

from __future__ import annotations

import copy
import json
import os

import pytest
from conftest import REPO, SHARED, TINY_RECIPE, write_recipe

from alignpipe.pipeline.rundir import StageDir
from alignpipe.pipeline.runner import Runner
from alignpipe.recipe import RecipeError, load_recipe

ALPACA = SHARED / "data" / "alpaca-eval-prefs" / "prefs-8models.jsonl.gz"
needs_shared = pytest.mark.skipif(not ALPACA.exists(), reason=f"../shared/data not available ({ALPACA} missing)")


@needs_shared
def test_alpaca_eval_prefs_to_soft_dpo_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipe's data path is relative to the project root, as under launch.sh
    recipe = load_recipe(REPO / "recipes" / "alpaca-eval" / "soft-dpo-tiny.yaml", [
        "data.n_sft=64", "stages.sft.max_steps=2", "stages.dpo.max_steps=3", "stages.dpo.logging_steps=1",
        "stages.dpo.dataset.limit=24", "stages.dpo.max_length=96",
    ])
    runner = Runner(recipe, runs_dir=tmp_path / "runs", in_process=True)
    outcomes = {o.name: o.action for o in runner.run()}
    assert outcomes == {"sft": "ran", "dpo": "ran"}
    logs = [json.loads(line) for line in StageDir(runner.run_dir / "dpo").metrics.read_text().splitlines()]
    targets = [entry["soft/preference"] for entry in logs if "soft/preference" in entry]
    assert targets and all(0.5 < t < 1.0 for t in targets)  # soft strengths reached the loss


def test_preference_dataset_settings_are_checked_before_any_model_loads(tmp_path):
    dpo = {**TINY_RECIPE["stages"][1], "dataset": {"source": "alpaca_eval"}}
    path = write_recipe(tmp_path, {**TINY_RECIPE, "stages": [TINY_RECIPE["stages"][0], dpo]})
    with pytest.raises(RecipeError, match=r"stages\.dpo\.dataset\.path: source 'alpaca_eval' needs a path"):
        load_recipe(path)
    dpo["dataset"] = {"source": "alpaca_eval", "path": "x.jsonl"}
    dpo["loss_type"] = ["ipo"]
    path = write_recipe(tmp_path, {**TINY_RECIPE, "stages": [TINY_RECIPE["stages"][0], dpo]})
    with pytest.raises(RecipeError, match=r"stages\.dpo\.loss_type: soft pair strengths"):
        load_recipe(path)


def test_missing_dataset_file_fails_with_its_path(tmp_path):
    from alignpipe.data.preference import preference_pairs_for
    from alignpipe.recipe import DataSpec, PreferenceDataSpec

    spec = PreferenceDataSpec(source="alpaca_eval", path=os.fspath(tmp_path / "nope.jsonl.gz"))
    with pytest.raises(FileNotFoundError, match="nope.jsonl.gz"):
        preference_pairs_for(spec, DataSpec(), 0)


def _trl_file(tmp_path, rows):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_trl_rows_skip_unusable_pairs_with_counts(tmp_path, caplog):
    from alignpipe.data.preference import preference_pairs_for
    from alignpipe.recipe import DataSpec, PreferenceDataSpec

    rows = [{"prompt": "copy: 1", "chosen": "1", "rejected": "2"},
            {"prompt": "copy: 2", "chosen": "2", "rejected": "2"},      # chosen == rejected
            {"prompt": "copy: 3", "chosen": "", "rejected": "3"}]       # empty response
    spec = PreferenceDataSpec(source="trl", path=str(_trl_file(tmp_path, rows)))
    with caplog.at_level("INFO", logger="alignpipe"):
        dataset = preference_pairs_for(spec, DataSpec(), 0)
    assert dataset["prompt"] == ["copy: 1"]
    assert "skipped 1 with an empty response and 1 with chosen == rejected" in caplog.text


def test_trl_rows_with_a_wrong_type_name_the_row_and_column(tmp_path):
    from alignpipe.data.preference import preference_pairs_for
    from alignpipe.recipe import DataSpec, PreferenceDataSpec

    rows = [{"prompt": "copy: 1", "chosen": 1, "rejected": "2"},   # a numeric column (JSON loaders keep one type)
            {"prompt": "copy: 2", "chosen": 7, "rejected": "2"}]
    spec = PreferenceDataSpec(source="trl", path=str(_trl_file(tmp_path, rows)))
    with pytest.raises(ValueError, match=r"row 0, column 'chosen': expected a string"):
        preference_pairs_for(spec, DataSpec(), 0)


def test_trl_rows_missing_a_column_name_it(tmp_path):
    from alignpipe.data.preference import preference_pairs_for
    from alignpipe.recipe import DataSpec, PreferenceDataSpec

    spec = PreferenceDataSpec(source="trl", path=str(_trl_file(tmp_path, [{"prompt": "p", "chosen": "a"}])))
    with pytest.raises(ValueError, match="rejected"):
        preference_pairs_for(spec, DataSpec(), 0)


def _conversation_rows():
    """UltraFeedback-binarized's train_prefs shape: a string prompt beside whole conversations."""
    rows = []
    for i in range(8):
        user = {"role": "user", "content": f"copy: {i} {i + 1}"}
        rows.append({"prompt": user["content"],
                     "chosen": [user, {"role": "assistant", "content": f"{i} {i + 1}"}],
                     "rejected": [user, {"role": "assistant", "content": f"{i + 1}"}]})
    return rows


def test_whole_conversation_rows_get_an_explicit_prompt_and_train_with_dpo(tmp_path):
    from alignpipe.data.preference import preference_pairs_for
    from alignpipe.recipe import DataSpec, PreferenceDataSpec

    path = _trl_file(tmp_path, _conversation_rows())
    dataset = preference_pairs_for(PreferenceDataSpec(source="trl", path=str(path)), DataSpec(), 0)
    assert dataset[0]["prompt"] == [{"role": "user", "content": "copy: 0 1"}]
    assert dataset[0]["chosen"] == [{"role": "assistant", "content": "0 1"}]
    assert dataset[0]["rejected"] == [{"role": "assistant", "content": "1"}]
    dpo = {**TINY_RECIPE["stages"][1], "max_steps": 2, "save_steps": 2,
           "dataset": {"source": "trl", "path": str(path)}}
    sft = {**TINY_RECIPE["stages"][0], "max_steps": 2, "save_steps": 2}
    recipe = load_recipe(write_recipe(tmp_path, {**TINY_RECIPE, "stages": [sft, dpo]}))
    assert [o.action for o in Runner(recipe, runs_dir=tmp_path / "runs", in_process=True).run()] == ["ran", "ran"]


def test_mixed_string_and_message_rows_become_all_conversational(tmp_path):
    """TRL's DPO and reward trainers concatenate prompt and reply, so a string beside a message list must not reach
    them: a message prompt gets its plain replies wrapped, and single-message replies get the string prompt as
    their user turn (not an empty history)."""
    from alignpipe.data.preference import preference_pairs_for
    from alignpipe.recipe import DataSpec, PreferenceDataSpec

    user = [{"role": "user", "content": "copy: a b"}]
    shapes = {"message prompt": {"prompt": user, "chosen": "a b", "rejected": "b"},
              "string prompt": {"prompt": "copy: a b", "chosen": [{"role": "assistant", "content": "a b"}],
                                "rejected": [{"role": "assistant", "content": "b"}]}}
    for name, row in shapes.items():
        (tmp_path / name).mkdir()
        dataset = preference_pairs_for(PreferenceDataSpec(source="trl", path=str(_trl_file(tmp_path / name, [row]))),
                                       DataSpec(), 0)
        assert dataset[0]["prompt"] == user, name
        assert dataset[0]["chosen"] == [{"role": "assistant", "content": "a b"}], name
        assert dataset[0]["rejected"] == [{"role": "assistant", "content": "b"}], name


def test_hh_preference_pairs_read_the_requested_source_split(tmp_path):
    from alignpipe.data.preference import preference_pairs_for
    from alignpipe.recipe import DataSpec, PreferenceDataSpec

    for split in ("train", "test"):
        lines = [json.dumps({"chosen": f"\n\nHuman: {split} question {i}\n\nAssistant: yes",
                             "rejected": f"\n\nHuman: {split} question {i}\n\nAssistant: no"}) for i in range(20)]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    for split in ("train", "test"):
        dataset = preference_pairs_for(PreferenceDataSpec(source="hh_rlhf", path=str(tmp_path), split=split),
                                       DataSpec(), 0)
        assert len(dataset) > 0 and all(split in row["prompt"][0]["content"] for row in dataset)


def test_a_score_that_is_not_a_probability_names_the_file_and_the_prompt(tmp_path):
    from alignpipe.data.errors import DataError
    from alignpipe.data.preference import preference_pairs_for
    from alignpipe.recipe import DataSpec, PreferenceDataSpec

    def row(instruction, *scores):
        return {"instruction": instruction, "reference": {"model": "r", "text": "x"},
                "responses": [{"model": f"m{i}", "text": f"reply {i}", "score": s} for i, s in enumerate(scores)]}

    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (row("Good one", 0.9, 0.1), row("Bad one", 7.0, 0.1))))
    with pytest.raises(DataError, match=rf"{path}: set 1 'Bad one': score 7.0 is not a probability"):
        preference_pairs_for(PreferenceDataSpec(source="alpaca_eval", path=str(path)), DataSpec(), 0)


def test_conversations_that_differ_before_the_last_turn_have_no_common_prompt(tmp_path):
    from alignpipe.data.preference import preference_pairs_for
    from alignpipe.recipe import DataSpec, PreferenceDataSpec

    rows = _conversation_rows()
    rows[3]["rejected"][0] = {"role": "user", "content": "something else"}
    spec = PreferenceDataSpec(source="trl", path=str(_trl_file(tmp_path, rows)))
    with pytest.raises(ValueError, match="row 3: chosen and rejected are conversations that differ before their last"):
        preference_pairs_for(spec, DataSpec(), 0)


def _ultrafeedback_file(tmp_path):
    path = tmp_path / "uf.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"reverse: {i} {i + 1}", "completions": [
        {"response": f"{i + 1} {i}", "overall_score": 9.0}, {"response": f"{i} {i + 1}", "overall_score": 3.0},
        {"response": f"{i}", "overall_score": 5.0}]}) + "\n" for i in range(8)))
    return path


@pytest.mark.parametrize("extra", [{"loss_type": ["ipo"]}, {"label_smoothing": 0.1}])
def test_hard_strength_pairs_carry_no_preference_column(tmp_path, extra):
    """strength: hard means labels of 1: like soft_labels: false the pairs carry no `preference` column, so a DPO
    stage whose recipe check allows another loss (or cDPO) gets data its trainer accepts."""
    from trl import DPOConfig

    from alignpipe.data.preference import preference_pairs_for
    from alignpipe.models.tiny import build_tiny_model, train_tokenizer
    from alignpipe.recipe import DataSpec, DPOStage
    from alignpipe.tasks import tokenizer_corpus
    from alignpipe.trainers.soft_dpo import SoftPreferenceDPOTrainer

    stage = DPOStage(name="dpo", inputs=["sft"], dataset={"source": "ultrafeedback", "path": str(
        _ultrafeedback_file(tmp_path)), "strength": "hard"}, **extra)
    dataset = preference_pairs_for(stage.dataset, DataSpec(), 0)
    assert "preference" not in dataset.column_names and len(dataset) > 0
    tokenizer = train_tokenizer(tokenizer_corpus(n=200), 100)
    model = build_tiny_model(tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                             max_position_embeddings=64, seed=0)
    args = DPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to=[], max_length=48,
                     loss_type=list(stage.loss_type), label_smoothing=stage.label_smoothing)
    SoftPreferenceDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=dataset,
                             processing_class=tokenizer)


def test_a_trl_files_preference_column_reaches_the_soft_preference_loss(tmp_path):
    """A TRL-format file's own `preference` column (P(chosen > rejected), null = 1) is kept as soft labels, as the
    README documents for the soft-DPO trainer; soft_labels: false drops it for hard labels."""
    from alignpipe.data.preference import preference_pairs_for
    from alignpipe.recipe import DataSpec, PreferenceDataSpec

    strengths = [0.7, None, 0.9, 0.6] * 4
    rows = [{"prompt": f"copy: {i} {i + 1}", "chosen": f"{i} {i + 1}", "rejected": f"{i + 1}", "preference": p}
            for i, p in enumerate(strengths)]
    path = _trl_file(tmp_path, rows)
    dataset = preference_pairs_for(PreferenceDataSpec(source="trl", path=str(path)), DataSpec(), 0)
    assert dataset["preference"] == [1.0 if p is None else p for p in strengths]
    hard = preference_pairs_for(PreferenceDataSpec(source="trl", path=str(path), soft_labels=False), DataSpec(), 0)
    assert "preference" not in hard.column_names and hard["prompt"] == dataset["prompt"]

    dpo = {**TINY_RECIPE["stages"][1], "max_steps": 2, "save_steps": 2, "logging_steps": 1,
           "dataset": {"source": "trl", "path": str(path)}}
    sft = {**TINY_RECIPE["stages"][0], "max_steps": 2, "save_steps": 2}
    runner = Runner(load_recipe(write_recipe(tmp_path, {**TINY_RECIPE, "stages": [sft, dpo]})),
                    runs_dir=tmp_path / "runs", in_process=True)
    assert [o.action for o in runner.run()] == ["ran", "ran"]
    logs = [json.loads(line) for line in StageDir(runner.run_dir / "dpo").metrics.read_text().splitlines()]
    targets = [entry["soft/preference"] for entry in logs if "soft/preference" in entry]
    assert targets and all(0.6 <= t < 1.0 for t in targets)  # the file's strengths, not hard labels of 1


@pytest.mark.parametrize(("source", "setting", "key"), [
    ("trl", {"strength": "reward"}, "strength"), ("trl", {"pairing": "all_pairs"}, "pairing"),
    ("trl", {"score_clip": 0.01}, "score_clip"), ("hh_rlhf", {"soft_labels": False}, "soft_labels"),
    ("hh_rlhf", {"temperature": 2.0}, "temperature"), ("synthetic", {"strength": "hard"}, "strength"),
    ("ultrafeedback", {"strength": "reward", "score_clip": 0.01}, "score_clip"),
    ("alpaca_eval", {"temperature": 2.0}, "temperature"),
])
def test_pairing_settings_a_source_does_not_read_are_errors(tmp_path, source, setting, key):
    dataset = {"source": source, **({"path": "pairs.jsonl"} if source != "synthetic" else {}), **setting}
    dpo = {**TINY_RECIPE["stages"][1], "dataset": dataset}
    with pytest.raises(RecipeError, match=rf"stages\.dpo\.dataset\.{key}: is not read: .*; remove it"):
        load_recipe(write_recipe(tmp_path, {**TINY_RECIPE, "stages": [TINY_RECIPE["stages"][0], dpo]}))


def test_a_reward_stage_measures_calibration_against_its_held_out_pairs_soft_labels(tmp_path, monkeypatch):
    """The ensemble trains on soft Bradley-Terry targets; scored against labels of 1, a model that learnt them
    exactly looked miscalibrated and an over-confident one better (tests/test_reward_eval.py has the numbers)."""
    import alignpipe.trainers.reward as reward_stage

    strengths = [0.7, None, 0.9, 0.6] * 16
    rows = [{"prompt": f"copy: {i} {i + 1}", "chosen": f"{i} {i + 1}", "rejected": f"{i + 1}", "preference": p}
            for i, p in enumerate(strengths)]
    path = _trl_file(tmp_path, rows)
    seen = {}
    measure = reward_stage.reward_model_metrics

    def recorded(scorer, pairs, **options):
        seen.update(prompts=[p for p, _, _ in pairs], outcomes=list(options["outcomes"]))
        return measure(scorer, pairs, **options)

    monkeypatch.setattr(reward_stage, "reward_model_metrics", recorded)
    sft = {**TINY_RECIPE["stages"][0], "max_steps": 2, "save_steps": 2}
    reward = {"name": "rm", "type": "reward", "inputs": ["sft"], "members": 2, "top_layers": 1, "max_length": 48,
              "per_device_train_batch_size": 16, "heldout_fraction": 0.25, "dataset": {"source": "trl", "path": str(path)}}
    runner = Runner(load_recipe(write_recipe(tmp_path, {**TINY_RECIPE, "stages": [sft, reward]})),
                    runs_dir=tmp_path / "runs", in_process=True)
    assert [o.action for o in runner.run()] == ["ran", "ran"]
    label = {row["prompt"]: 1.0 if row["preference"] is None else row["preference"] for row in rows}
    assert seen["prompts"] and seen["outcomes"] == [label[p] for p in seen["prompts"]]
    assert len(set(seen["outcomes"])) > 1
