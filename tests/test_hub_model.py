"""A hub model is pinned to one commit for the whole run (models.hub), through the Hub or, offline, the local cache.

The Hub cannot be reached here, so the cache is a real Hugging Face cache layout (``models--owner--name/refs`` and
``snapshots/<commit>``) built by the tests, read with ``HF_HUB_OFFLINE`` on, as on a compute node without network;
the Hub's answers (a listing, a missing repository or revision) are stand-ins for ``HfApi.model_info``."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
from conftest import HUB_COMMITS, TINY_RECIPE, write_recipe
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

from alignpipe.models import hub
from alignpipe.models.loading import ModelError
from alignpipe.pipeline.preflight import PreflightError, preflight
from alignpipe.pipeline.rundir import StageDir, canonical_hash
from alignpipe.pipeline.runner import BACKBONE, Runner
from alignpipe.recipe import RecipeError, load_recipe

FIRST, SECOND = HUB_COMMITS
SUPPORT = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "chat_template.jinja"]


def test_only_what_transformers_loads_is_fetched_and_one_copy_of_the_weights():
    repo = [*SUPPORT, "README.md", ".gitattributes", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "original/consolidated.00.pth", "original/params.json", "onnx/model.onnx", "modeling_custom.py"]
    assert hub.files_to_fetch(repo) == tuple(sorted([
        *SUPPORT, "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json"]))
    assert "modeling_custom.py" in hub.files_to_fetch(repo, remote_code=True)  # the one case it runs

    mistral = [*SUPPORT, "consolidated.safetensors", "params.json", "tokenizer.model.v3",  # a copy for another runtime
               "model.safetensors.index.json", *(f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))]
    assert [name for name in hub.files_to_fetch(mistral) if name.endswith(".safetensors")] == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert hub.files_to_fetch(["config.json", "weights.safetensors"]) == ("config.json", "weights.safetensors")
    templates = [*SUPPORT, "model.safetensors", "additional_chat_templates/tool_use.jinja"]
    assert "additional_chat_templates/tool_use.jinja" in hub.files_to_fetch(templates)  # named chat templates

    older = [*SUPPORT, "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
             "pytorch_model.bin.index.json", "training_args.bin"]
    assert hub.files_to_fetch(older) == tuple(sorted([
        *SUPPORT, "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json"]))


def test_a_gguf_repository_fetches_the_named_file_only():
    repo = ["README.md", "tokenizer.json", "m-Q4_K_M.gguf", "m-Q8_0.gguf", "m-f16.gguf"]
    assert hub.files_to_fetch(repo, gguf_file="m-Q8_0.gguf") == ("m-Q8_0.gguf", "tokenizer.json")
    with pytest.raises(ModelError, match=r"no GGUF file 'm-Q5\.gguf'.*m-Q4_K_M\.gguf, m-Q8_0\.gguf, m-f16\.gguf"):
        hub.files_to_fetch(repo, gguf_file="m-Q5.gguf")
    with pytest.raises(ModelError, match="no weights transformers can load.*needs model.gguf_file"):
        hub.files_to_fetch(repo)


def test_a_hub_id_names_its_revision_after_an_at_sign():
    assert hub.split_revision("owner/name@v1.0") == ("owner/name", "v1.0")
    assert hub.split_revision("owner/name") == ("owner/name", None)
    with pytest.raises(ModelError, match="nothing after '@'; give a branch, tag or commit"):
        hub.split_revision("owner/name@")


def test_a_repository_without_a_config_is_refused():
    with pytest.raises(ModelError, match="no config.json at the top level.*not a dataset or a space"):
        hub.files_to_fetch(["data/train.parquet", "model.safetensors", "README.md"], repo_id="owner/data")
    with pytest.raises(ModelError, match="it holds a PEFT adapter: name its base model here"):
        hub.files_to_fetch(["adapter_config.json", "adapter_model.safetensors"], repo_id="owner/lora")


def test_offline_a_revision_resolves_through_the_cache(hub_cache):
    main = hub.resolve("owner/tiny", None)
    assert (main.commit, main.revision, main.folder) == (SECOND, "main", hub_cache / "snapshots" / SECOND)
    assert hub.fetch(main) == main.folder  # nothing to download
    assert hub.resolve("owner/tiny", "v1").commit == FIRST
    assert hub.resolve("owner/tiny", FIRST).folder == hub_cache / "snapshots" / FIRST
    assert hub.resolve("owner/tiny", FIRST).describe() == f"owner/tiny at commit {FIRST[:12]}"

    for name, revision in (("owner/tiny", "v2"), ("owner/other", None), ("owner/tiny", "3" * 40)):
        with pytest.raises(ModelError, match=r"not in the local Hugging Face cache .*offline mode is on.*hf download"):
            hub.resolve(name, revision)


def test_a_download_records_the_revisions_ref_so_the_cache_resolves_it_offline_later(hub_cache, monkeypatch,
                                                                                      llama_path):
    """huggingface_hub writes a branch's ref only when it resolves the branch itself; ``fetch`` downloads by commit."""
    import huggingface_hub

    shutil.rmtree(hub_cache)
    asked = {}

    def snapshot_download(repo_id, *, revision, allow_patterns):  # the transfer: files land under the commit
        asked.update(revision=revision, allow_patterns=allow_patterns)
        folder = hub_cache / "snapshots" / revision
        shutil.copytree(llama_path, folder)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    files = ("config.json", "model.safetensors", "tokenizer.json", "x[1].json")
    assert hub.fetch(hub.HubSnapshot("owner/tiny", "main", FIRST, files=files)) == hub_cache / "snapshots" / FIRST
    assert asked == {"revision": FIRST,  # escaped: matched as glob patterns, where "[1]" would not match itself
                     "allow_patterns": ["config.json", "model.safetensors", "tokenizer.json", "x[[]1].json"]}
    assert (hub_cache / "refs" / "main").read_text() == FIRST
    assert hub.resolve("owner/tiny", None).commit == FIRST  # offline (the fixture's HF_HUB_OFFLINE)

    (hub_cache / "refs" / "main").unlink()
    with pytest.raises(ModelError, match=f"the cache has it at commit.s. {FIRST} but does not say which is 'main'"):
        hub.resolve("owner/tiny", None)


def test_a_gated_model_says_how_to_get_access(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def snapshot_download(repo_id, **kwargs):
        raise _hub_error(GatedRepoError)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(ModelError, match=r"'owner/llama' is gated: accept its licence .*hf auth login"):
        hub.fetch(hub.HubSnapshot("owner/llama", "main", FIRST, files=("config.json",)))


def test_offline_a_cached_snapshot_missing_a_shard_is_refused(hub_cache):
    folder = hub_cache / "snapshots" / SECOND
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelError, match=r"lacks 1 of its 2 weight shards \(model-00002-of-00002.safetensors"):
        hub.resolve("owner/tiny", None)


def test_offline_a_cached_snapshot_without_weights_is_refused(hub_cache):
    (hub_cache / "snapshots" / SECOND / "model.safetensors").unlink()  # only the config was ever fetched
    with pytest.raises(ModelError, match=r"the cached snapshot of owner/tiny .* has no weights"):
        hub.resolve("owner/tiny", None)


def test_offline_a_cut_short_snapshot_says_what_it_lacks_and_how_to_download_it(hub_cache):
    """A download cut short keeps whatever arrived: a first shard before the index that lists it, weights before the
    tokenizer. Such a snapshot passed for a model and failed only in a stage, told to re-run the stage."""
    folder = hub_cache / "snapshots" / SECOND
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    download = rf"hf download owner/tiny --revision {SECOND}"
    with pytest.raises(ModelError, match=rf"lacks the weight index model.safetensors.index.json, .*{download}"):
        hub.resolve("owner/tiny", None)

    (folder / "model-00001-of-00002.safetensors").rename(folder / "model.safetensors")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match=rf"lacks a tokenizer file \(tokenizer.json, .*{download}"):
        hub.resolve("owner/tiny", None)
    (folder / "spm.model").write_bytes(b"a SentencePiece model under DeBERTa's name")  # a vocabulary, whatever named
    assert hub.resolve("owner/tiny", None).folder == folder


def test_a_cut_short_snapshot_is_completed_when_the_hub_answers(hub_cache, monkeypatch, llama_path):
    """``snapshot_here`` (a pinned backbone, a saved ensemble's) uses a cached snapshot without asking the Hub; one
    that lacks its tokenizer or weight index is downloaded again instead."""
    import huggingface_hub

    folder = hub_cache / "snapshots" / FIRST
    (folder / "tokenizer.json").unlink()
    downloads = []

    def model_info(self, repo_id, revision=None, **kwargs):
        siblings = [SimpleNamespace(rfilename=name) for name in ("config.json", "model.safetensors", "tokenizer.json")]
        return SimpleNamespace(sha=FIRST, siblings=siblings)

    def snapshot_download(repo_id, *, revision, allow_patterns):  # the transfer: the missing files arrive
        downloads.append(revision)
        shutil.copytree(llama_path, folder, dirs_exist_ok=True)
        return str(folder)

    monkeypatch.setattr(HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert hub.snapshot_here("owner/tiny", FIRST) == folder
    assert downloads == [FIRST] and (folder / "tokenizer.json").is_file()
    assert hub.snapshot_here("owner/tiny", FIRST) == folder and downloads == [FIRST]  # complete now: no request


def test_a_gguf_snapshot_needs_no_tokenizer_file(tmp_path, monkeypatch, gguf_model):
    """A GGUF file carries its tokenizer, so a snapshot holding only the file is complete."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    folder = tmp_path / "models--owner--gguf" / "snapshots" / FIRST
    folder.mkdir(parents=True)
    shutil.copy(gguf_model, folder / "tiny.gguf")
    assert hub.resolve("owner/gguf", FIRST, gguf_file="tiny.gguf").folder == folder


def _hub_error(kind: type[Exception]) -> Exception:
    """``kind`` as huggingface_hub raises it, without the HTTP response its constructor takes (which only feeds the
    message), so the test does not depend on the HTTP library huggingface_hub happens to use."""
    error = kind.__new__(kind)
    Exception.__init__(error, "404 Client Error")
    return error


def test_the_hubs_answers_become_errors_that_say_what_to_check(monkeypatch, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache

    def answer(error):
        def model_info(self, repo_id, revision=None, **kwargs):
            if error is None:
                siblings = [SimpleNamespace(rfilename=name) for name in [*SUPPORT, "model.safetensors", "x.onnx"]]
                return SimpleNamespace(sha=FIRST, siblings=siblings)
            raise error
        monkeypatch.setattr(HfApi, "model_info", model_info)

    answer(_hub_error(RepositoryNotFoundError))
    with pytest.raises(ModelError, match=r"'owner/gone' is not on the Hugging Face Hub.*private or gated.*HF_TOKEN"):
        hub.resolve("owner/gone", None)
    answer(_hub_error(RevisionNotFoundError))
    with pytest.raises(ModelError, match=r"'owner/tiny' has no revision 'v9' on the Hub.*a branch, a tag"):
        hub.resolve("owner/tiny", "v9")
    answer(ConnectionError("Name or service not known"))  # no route to the Hub, and nothing cached
    with pytest.raises(ModelError, match=r"Hub could not be reached \(ConnectionError: Name or service not known\)"):
        hub.resolve("owner/tiny", None)

    answer(None)
    snapshot = hub.resolve("owner/tiny", "main")
    assert (snapshot.commit, snapshot.folder) == (FIRST, None)
    assert snapshot.files == tuple(sorted([*SUPPORT, "model.safetensors"]))
    assert hub.snapshot_folder(snapshot) == tmp_path / "models--owner--tiny" / "snapshots" / FIRST


def test_a_revision_is_refused_where_there_is_nothing_to_pin(tmp_path, llama_path):
    recipe = {**TINY_RECIPE, "model": {**TINY_RECIPE["model"], "revision": "main"}}
    with pytest.raises(RecipeError, match="revision.*not with the built-in"):
        load_recipe(write_recipe(tmp_path, recipe))
    local = load_recipe(write_recipe(tmp_path, {**TINY_RECIPE, "model": {"name_or_path": llama_path,
                                                                          "revision": "v1"}}))
    with pytest.raises(PreflightError, match="is a local folder, which has no revisions; drop model.revision"):
        preflight(local)


def test_a_hub_model_that_is_nowhere_fails_the_preflight_before_anything_is_written(tmp_path, hub_cache):
    recipe = load_recipe(_hub_recipe(tmp_path, name_or_path="owner/gone"))
    with pytest.raises(PreflightError, match=r"model.name_or_path: model 'owner/gone' at revision 'main' is not in "):
        Runner(recipe, runs_dir=tmp_path / "runs", in_process=True).run()
    assert not (tmp_path / "runs").exists()


def _hub_recipe(tmp_path, **model):
    sft = {**TINY_RECIPE["stages"][0], "max_steps": 2, "save_steps": 2}
    recipe = {**TINY_RECIPE, "model": {"name_or_path": "owner/tiny", **model}, "stages": [sft]}
    return write_recipe(tmp_path, recipe)


def test_a_run_trains_on_the_pinned_snapshot_and_an_upstream_push_reruns_it(tmp_path, hub_cache):
    runs = tmp_path / "runs"

    def run(dry_run=False, **model):
        recipe = load_recipe(_hub_recipe(tmp_path, **model))
        return {o.name: o for o in Runner(recipe, runs_dir=runs, in_process=True, dry_run=dry_run).run()}

    assert run()["sft"].action == "ran"
    sft = StageDir(runs / "tiny" / "sft")
    assert sft.read_config()["base"] == str(hub_cache / "snapshots" / SECOND)  # main, pinned for every stage
    assert run()["sft"].action == "skipped"
    assert run(revision=SECOND)["sft"].action == "skipped"  # main named by its commit: the same model

    (hub_cache / "refs" / "main").write_text(FIRST)  # upstream moved main
    assert run(dry_run=True)["sft"].reason == "run (config or inputs changed)"
    assert run()["sft"].action == "ran"
    assert sft.read_config()["base"] == str(hub_cache / "snapshots" / FIRST)
    assert run(revision="v1")["sft"].action == "skipped"


def test_a_reward_backbone_on_the_hub_is_pinned_hashed_and_reruns_when_its_tag_moves(tmp_path, hub_cache):
    reward = {"name": "rm", "type": "reward", "inputs": [], "backbone": "owner/tiny@v1", "members": 2,
              "max_length": 48, "per_device_train_batch_size": 32}
    recipe_path = write_recipe(tmp_path, {**TINY_RECIPE, "stages": [reward]})
    runs = tmp_path / "runs"

    def run():
        return Runner(load_recipe(recipe_path), runs_dir=runs, in_process=True).run()[0].action

    assert run() == "ran"
    stage = StageDir(runs / "tiny" / "rm")
    assert stage.read_config()["pins"] == {"backbone": FIRST}
    assert stage.read_manifest()["input_hashes"][BACKBONE] == canonical_hash({"hub": "owner/tiny", "commit": FIRST})
    saved = json.loads((stage.checkpoint / "manifest.json").read_text())
    assert saved["spec"]["backbone"] == str(hub_cache / "snapshots" / FIRST)
    assert saved["backbone"]["hub"] == {"repo_id": "owner/tiny", "commit": FIRST}
    assert run() == "skipped"
    pinned = write_recipe(tmp_path, {**TINY_RECIPE, "stages": [{**reward, "backbone": f"owner/tiny@{FIRST}"}]},
                          "pinned.yaml")  # the tag's commit named instead: the same backbone
    assert Runner(load_recipe(pinned), runs_dir=runs, in_process=True).run()[0].action == "skipped"

    (hub_cache / "refs" / "v1").write_text(SECOND)  # the tag was moved upstream
    assert run() == "ran"
    assert json.loads((stage.checkpoint / "manifest.json").read_text())["backbone"]["hub"]["commit"] == SECOND

    broken = write_recipe(tmp_path, {**TINY_RECIPE, "stages": [{**reward, "backbone": "owner/tiny@v9"}]}, "b.yaml")
    with pytest.raises(PreflightError, match=r"stages.rm.backbone: model 'owner/tiny' at revision 'v9' is not in .*"
                                             r"name one as the @REVISION of stages.rm.backbone"):
        Runner(load_recipe(broken), runs_dir=tmp_path / "other-runs", in_process=True).run()


def test_a_run_asks_the_hub_once_and_trains_the_commit_its_preflight_checked(tmp_path, monkeypatch, llama_path):
    """The preflight resolves the model (to fail before anything is written), and the runner pins it for the stages:
    one request between them, so a push between the two cannot make the run train what the preflight did not see."""
    import huggingface_hub

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    answers = iter([FIRST, SECOND])  # main moves after the first answer

    def model_info(self, repo_id, revision=None, **kwargs):
        siblings = [SimpleNamespace(rfilename=name) for name in (*SUPPORT, "model.safetensors")]
        return SimpleNamespace(sha=next(answers), siblings=siblings)

    def snapshot_download(repo_id, *, revision, allow_patterns):  # the transfer: files land under the commit
        folder = cache / "models--owner--tiny" / "snapshots" / revision
        shutil.copytree(llama_path, folder)
        return str(folder)

    monkeypatch.setattr(HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    runs = tmp_path / "runs"
    assert Runner(load_recipe(_hub_recipe(tmp_path)), runs_dir=runs, in_process=True).run()[0].action == "ran"
    assert StageDir(runs / "tiny" / "sft").read_config()["base"] == str(cache / "models--owner--tiny" / "snapshots" /
                                                                         FIRST)
    assert next(answers) == SECOND, "the run asked the Hub more than once"
