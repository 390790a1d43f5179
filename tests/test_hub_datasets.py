"""A stage's hub dataset is pinned to one commit for the whole run (data.hub_datasets).

The Hub cannot be reached here, so the caches are real layouts built by the tests and read by the real ``datasets``
and ``huggingface_hub`` code offline, as on a compute node without network: the datasets cache holds the prepared
rows under ``<owner>___<name>/<config>/0.0.0/<commit>/`` (what ``load_dataset`` writes online), the Hugging Face
cache the branch's ref (``datasets--owner--name/refs/main``). The Hub's answers to ``dataset_info`` are stand-ins."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import TINY_RECIPE, write_recipe

from alignpipe.data.errors import DataError
from alignpipe.data.hub_datasets import DatasetPin, check_cached_offline, hub_dataset_id, record_loaded, resolve_dataset
from alignpipe.data.rows import load_rows
from alignpipe.pipeline.preflight import PreflightError
from alignpipe.pipeline.rundir import StageDir, canonical_hash
from alignpipe.pipeline.runner import DATASET, Runner
from alignpipe.pipeline.stage import load_context
from alignpipe.recipe import load_recipe

OLD, NEW = "a" * 40, "b" * 40
ROWS = {OLD: 8, NEW: 12}  # the two commits' row counts: which one was loaded shows


@pytest.fixture
def hub_datasets(tmp_path, monkeypatch):
    """``owner/demos`` (prompt/completion rows) prepared in an offline datasets cache at two commits, ``NEW`` the
    newer copy; the Hugging Face cache's ``main`` names ``NEW`` and the tag ``v1`` names ``OLD``."""
    import datasets
    from huggingface_hub import constants

    prepared = tmp_path / "datasets-cache"
    for age, commit in enumerate((OLD, NEW)):
        source = tmp_path / f"{commit[:4]}.jsonl"
        source.write_text("".join(json.dumps({"prompt": f"sort 3 1 {i}", "completion": f"1 3 {i}"}) + "\n"
                                  for i in range(ROWS[commit])))
        built = datasets.load_dataset("json", data_files={"train": str(source)}, split="train",
                                      cache_dir=str(tmp_path / "scratch"))
        folder = prepared / "owner___demos" / "default" / "0.0.0" / commit
        folder.mkdir(parents=True)
        arrow = built.cache_files[0]["filename"]
        shutil.copy(arrow, folder / "demos-train.arrow")
        info = json.loads((Path(arrow).parent / "dataset_info.json").read_text())
        info.update(config_name="default", dataset_name="demos", builder_name="demos")
        (folder / "dataset_info.json").write_text(json.dumps(info))
        os.utime(folder, (1_700_000_000 + age, 1_700_000_000 + age))  # which copy is newer
    refs = tmp_path / "hf-cache" / "datasets--owner--demos" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(NEW)
    (refs / "v1").write_text(OLD)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", prepared)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return refs


def _rows(name: str) -> int:
    return len(load_rows(name, "train", what="dataset.path", expected="prompt/completion columns"))


def test_what_names_a_hub_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    data = tmp_path / "pairs.jsonl"
    data.write_text("{}\n")
    assert hub_dataset_id("owner/name") == "owner/name"
    for revision in ("refs/pr/1", "refs/convert/parquet", "dev/v2"):  # a revision may hold slashes
        assert hub_dataset_id(f"owner/name@{revision}") == f"owner/name@{revision}"
    assert hub_dataset_id("runs/name@refs/pr/1") == "runs/name@refs/pr/1"
    for local in (str(data), "./data", "runs/exp@lr1e-5/pairs.jsonl", "runs/exp@lr1e-5/pairs",
                  "../shared/data/x.jsonl.gz", None):
        assert hub_dataset_id(local) is None


@pytest.mark.parametrize("in_memory", [False, True], ids=["memory-mapped", "HF_DATASETS_IN_MEMORY_MAX_SIZE"])
def test_offline_a_pinned_commit_loads_that_commits_rows_or_is_refused(hub_datasets, monkeypatch, in_memory):
    """Offline, ``load_dataset`` reads the newest cached copy whatever revision it is given; a pinned commit that is
    not that copy must fail, not hand the stage another commit's rows; also where datasets would keep small rows in
    memory (with no cache files to tell the commit by)."""
    import datasets

    if in_memory:
        monkeypatch.setattr(datasets.config, "IN_MEMORY_MAX_SIZE", 10**9)
    assert _rows(f"owner/demos@{NEW}") == ROWS[NEW]
    with pytest.raises(DataError, match=rf"at commit {OLD} cannot be loaded here: .*newest copy in its cache, which is "
                                        rf"commit {NEW}.*owner/demos@{NEW}"):
        _rows(f"owner/demos@{OLD}")


def test_offline_a_revision_resolves_through_the_caches_refs(hub_datasets):
    assert resolve_dataset("owner/demos", key="k") == DatasetPin(NEW, offline=True)
    assert resolve_dataset("owner/demos@v1", key="k") == DatasetPin(OLD, offline=True)
    assert resolve_dataset(f"owner/demos@{OLD}", key="k") == DatasetPin(OLD, offline=True)
    with pytest.raises(DataError, match=r"cannot tell which commit dataset 'owner/demos' at revision 'v2' is: "
                                        r"offline mode is on .*name the commit in k \(owner/demos@COMMIT\)"):
        resolve_dataset("owner/demos@v2", key="k")
    with pytest.raises(DataError, match=r"'owner/demos@': nothing after '@' in k"):
        resolve_dataset("owner/demos@", key="k")


def test_the_hubs_answers_become_errors_or_a_recorded_ref(hub_datasets, monkeypatch):
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def answer(result):
        def dataset_info(self, repo_id, revision=None, **kwargs):
            if isinstance(result, Exception):
                raise result
            return SimpleNamespace(sha=result)
        monkeypatch.setattr(HfApi, "dataset_info", dataset_info)

    answer(_hub_error(RepositoryNotFoundError))
    with pytest.raises(DataError, match=r"dataset 'owner/gone' is not on the Hugging Face Hub.*HF_TOKEN.*check k"):
        resolve_dataset("owner/gone", key="k")
    answer(_hub_error(RevisionNotFoundError))
    with pytest.raises(DataError, match=r"dataset 'owner/demos' has no revision 'v9' on the Hub.*the '@' of k"):
        resolve_dataset("owner/demos@v9", key="k")
    answer(OLD)  # main moved back upstream: nothing is recorded before a stage has loaded its rows
    assert resolve_dataset("owner/demos", key="k") == DatasetPin(OLD, offline=False)
    assert (hub_datasets / "main").read_text() == NEW
    record_loaded("owner/demos", OLD)  # what the runner does once the stage completed: offline, main is OLD now
    assert (hub_datasets / "main").read_text() == OLD
    record_loaded(f"owner/demos@{NEW}", NEW)  # a commit named: no ref to record
    assert sorted(path.name for path in hub_datasets.iterdir()) == ["main", "v1"]


def _hub_error(kind: type[Exception]) -> Exception:
    error = kind.__new__(kind)
    Exception.__init__(error, "404 Client Error")
    return error


def _sft_recipe(tmp_path, path: str, name: str = "recipe.yaml"):
    sft = {**TINY_RECIPE["stages"][0], "max_steps": 2, "save_steps": 2, "per_device_train_batch_size": 4,
           "dataset": {"source": "trl", "path": path}}
    return write_recipe(tmp_path, {**TINY_RECIPE, "stages": [sft]}, name)


def test_a_stage_trains_on_the_pinned_commit_and_an_upstream_push_reruns_it(tmp_path, hub_datasets):
    runs = tmp_path / "runs"
    stage = StageDir(runs / "tiny" / "sft")

    def run(path: str = "owner/demos") -> str:
        return Runner(load_recipe(_sft_recipe(tmp_path, path)), runs_dir=runs, in_process=True).run()[0].action

    assert run() == "ran"
    assert stage.read_config()["pins"] == {"dataset": NEW}
    assert stage.read_manifest()["input_hashes"][DATASET] == canonical_hash({"hub": "owner/demos", "commit": NEW})
    assert load_context(stage.root, resume=False).stage.dataset.path == f"owner/demos@{NEW}"  # what the stage read
    assert run() == "skipped"
    assert run(f"owner/demos@{NEW}") == "skipped"  # main named by its commit: the same data
    recorded = stage.read_manifest()["input_hashes"]
    stage.update_manifest(input_hashes={k: v for k, v in recorded.items() if k != DATASET})  # as recorded before
    assert run() == "skipped"  # hub datasets were pinned: kept, and today's commit adopted
    assert stage.read_manifest()["input_hashes"] == recorded

    (hub_datasets / "main").write_text(OLD)  # upstream moved main (and the cache holds OLD as its newest copy)
    shutil.rmtree(hub_datasets.parent.parent.parent / "datasets-cache" / "owner___demos" / "default" / "0.0.0" / NEW)
    assert run() == "ran"
    assert stage.read_config()["pins"] == {"dataset": OLD}

    (hub_datasets / "main").write_text("c" * 40)  # a commit this machine has no rows of: the stage is left alone
    with pytest.raises(PreflightError, match=rf"stages.sft.dataset.path: offline, and the datasets cache .* cannot "
                                             rf"give 'owner/demos' at commit c{{40}} .*; it holds commit.s. {OLD} as "
                                             "its newest"):
        run()
    assert stage.read_manifest()["status"] == "complete" and stage.read_config()["pins"] == {"dataset": OLD}


def test_offline_a_commit_datasets_would_not_read_stops_the_run_before_the_stage_is_touched(tmp_path, hub_datasets,
                                                                                            monkeypatch):
    runs = tmp_path / "runs"
    assert Runner(load_recipe(_sft_recipe(tmp_path, "owner/demos")), runs_dir=runs, in_process=True).run()[0].action \
        == "ran"
    stage = StageDir(runs / "tiny" / "sft")
    older = load_recipe(_sft_recipe(tmp_path, "owner/demos@v1", "older.yaml"))  # cached, but not the newest copy
    with pytest.raises(PreflightError,
                       match=rf"cannot give 'owner/demos' at commit {OLD} .*commit.s. {NEW} as its newest"):
        Runner(older, runs_dir=runs, in_process=True).run()
    assert stage.read_manifest()["status"] == "complete" and stage.checkpoint.is_dir()


def test_offline_validate_and_data_refuse_a_commit_whose_rows_are_not_cached(tmp_path, hub_datasets, capsys):
    """The ref is in the Hugging Face cache but the datasets cache holds no rows at its commit: the runner would
    refuse the stage when it starts, so validate and data refuse the recipe before any stage runs."""
    from alignpipe.cli import main

    (hub_datasets / "main").write_text("c" * 40)
    path = _sft_recipe(tmp_path, "owner/demos")
    for command in ("validate", "data"):
        assert main([command, str(path)]) == 2
        assert "stages.sft.dataset.path: offline, and the datasets cache" in capsys.readouterr().err


def test_the_offline_check_follows_how_the_commit_was_resolved_and_what_datasets_would_read(hub_datasets,
                                                                                           monkeypatch):
    import datasets
    from huggingface_hub import constants

    check_cached_offline("owner/demos", NEW, key="k")  # the newest copy
    with pytest.raises(DataError, match=f"k: offline, .* cannot give 'owner/demos' at commit {OLD}"):
        check_cached_offline("owner/demos@v1", OLD, key="k")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    check_cached_offline("owner/demos@v1", OLD, key="k")  # online: the stage downloads it
    with pytest.raises(DataError, match="cannot give"):  # no route to the Hub: resolved from the cache's refs
        check_cached_offline("owner/demos@v1", OLD, key="k", offline=True)
    config = Path(datasets.config.HF_DATASETS_CACHE) / "owner___demos" / "default" / "0.0.0"
    (config / NEW).rename(config / ("f" * 64))  # cached by an older datasets release, under a module hash
    check_cached_offline("owner/demos@v1", OLD, key="k", offline=True)  # cannot be told apart: let through


def test_a_run_records_the_revision_once_its_stage_loaded_the_rows_and_a_dry_run_writes_nothing(
        tmp_path, hub_datasets, monkeypatch, capsys):
    from huggingface_hub import HfApi, constants

    from alignpipe.cli import main

    (hub_datasets / "main").unlink()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the Hub answers; the rows come from the cache
    answers = {"main": NEW}
    monkeypatch.setattr(HfApi, "dataset_info",
                        lambda self, repo_id, revision=None, **kwargs: SimpleNamespace(sha=answers[revision]))
    recipe_path, runs = _sft_recipe(tmp_path, "owner/demos"), tmp_path / "runs"
    assert Runner(load_recipe(recipe_path), runs_dir=runs, in_process=True).run()[0].action == "ran"
    assert (hub_datasets / "main").read_text() == NEW

    answers["main"] = OLD  # pushed upstream: a dry run says so, and records nothing
    assert main(["run", str(recipe_path), "--dry-run", "--runs-dir", str(runs)]) == 0
    assert "[dry-run] sft (sft): run (config or inputs changed)" in capsys.readouterr().out
    assert (hub_datasets / "main").read_text() == NEW


def test_an_unfinished_stage_recorded_before_hub_datasets_were_pinned_resumes(tmp_path, hub_datasets):
    runs = tmp_path / "runs"
    sft = {**TINY_RECIPE["stages"][0], "max_steps": 4, "save_steps": 2, "save_total_limit": 3,
           "per_device_train_batch_size": 4, "dataset": {"source": "trl", "path": "owner/demos"}}
    recipe = load_recipe(write_recipe(tmp_path, {**TINY_RECIPE, "stages": [sft]}))
    assert Runner(recipe, runs_dir=runs, in_process=True).run()[0].action == "ran"
    stage = StageDir(runs / "tiny" / "sft")
    manifest = stage.read_manifest()
    older = {k: v for k, v in manifest["input_hashes"].items() if k != DATASET}  # no hub dataset hash then
    stage.write_manifest({**manifest, "status": "interrupted", "input_hashes": older, "output_sha256": None})
    shutil.rmtree(stage.checkpoint)  # killed after a trainer checkpoint, before publishing
    assert Runner(recipe, runs_dir=runs, in_process=True, resume=True).run()[0].action == "resumed"


def test_a_hub_dataset_that_cannot_be_resolved_fails_the_preflight_before_anything_is_written(tmp_path,
                                                                                              hub_datasets):
    recipe = load_recipe(_sft_recipe(tmp_path, "owner/demos@v7"))
    with pytest.raises(PreflightError, match=r"stages.sft.dataset: cannot tell which commit .*'v7'"):
        Runner(recipe, runs_dir=tmp_path / "runs", in_process=True).run()
    assert not (tmp_path / "runs").exists()


def test_only_rows_from_another_commits_folder_are_refused():
    """A copy that an older datasets release cached under a module hash (not a commit) cannot be told apart, and a
    dataset built in memory has no files: neither is refused."""
    from alignpipe.data.hub_datasets import check_loaded_commit

    def rows(*folders):
        return SimpleNamespace(cache_files=[{"filename": f"/cache/owner___demos/default/0.0.0/{f}/x.arrow"}
                                            for f in folders])

    check_loaded_commit(rows(NEW), "owner/demos", NEW, what="w")
    check_loaded_commit(rows("f" * 64), "owner/demos", NEW, what="w")  # a module hash
    check_loaded_commit(rows(), "owner/demos", NEW, what="w")
    check_loaded_commit(rows(OLD), "owner/demos", "main", what="w")  # not pinned: nothing to check against
    with pytest.raises(DataError, match=f"w: dataset 'owner/demos' at commit {NEW} cannot be loaded here"):
        check_loaded_commit(rows(OLD), "owner/demos", NEW, what="w")


def test_a_ref_that_cannot_be_recorded_is_a_warning_not_a_failure(hub_datasets, caplog):
    """The stage has completed when its ref is recorded: a Hugging Face cache that cannot be written (a shared one
    mounted read-only; here its refs folder is a file) must not fail the run."""
    shutil.rmtree(hub_datasets)
    hub_datasets.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="alignpipe"):
        record_loaded("owner/demos", OLD)
    assert f"could not record that dataset owner/demos at main is commit {OLD[:12]}" in caplog.text
