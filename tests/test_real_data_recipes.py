"""Real-data recipes run end to end on the tiny model (skipped where ../shared/data is absent)."""

from __future__ import annotations

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
