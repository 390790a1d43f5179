"""Load any saved reward model as a scorer: a K-member LoRA ensemble or one TRL-trained reward model.

Both directory kinds carry a ``manifest.json`` whose ``format`` says which one it is:
``alignpipe.reward_ensemble`` (:meth:`alignpipe.rewards.ensemble.RewardEnsemble.save`) or
``alignpipe-reward-single`` (:func:`alignpipe.rewards.single.save_single_reward_model`). Both scorers have the same
interface (``score`` → ``EnsembleRewards``, ``pairwise_probabilities``, ``judge_id``, ``encode``), so callers do not
need to care which one they got.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from alignpipe.models.loading import process_device, resolve_dtype
from alignpipe.pipeline.rundir import cached_directory_hash, canonical_hash
from alignpipe.rewards.ensemble_files import ADAPTER_CONFIG, BACKBONE_KEY, ENSEMBLE_FORMAT, MANIFEST_FILE
from alignpipe.rewards.ensemble_scorer import EnsembleScorer
from alignpipe.rewards.single import SINGLE_FORMAT, SingleRewardScorer

__all__ = ["RewardScorer", "load_reward_scorer", "reward_model_format", "reward_model_identity"]

RewardScorer = EnsembleScorer | SingleRewardScorer
_KNOWN = (ENSEMBLE_FORMAT, SINGLE_FORMAT)


def reward_model_format(directory: str | os.PathLike[str]) -> str:
    """The manifest ``format`` of a saved reward model directory.

    Raises ``FileNotFoundError`` when ``directory`` does not exist, and ``ValueError`` naming it when it has no
    readable ``manifest.json`` or the format is not one of the known reward-model formats.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"reward model directory {directory} does not exist")
    path = directory / MANIFEST_FILE
    expected = f"expected a saved reward model (manifest.json with format one of {list(_KNOWN)})"
    if not path.is_file():
        raise ValueError(f"{directory} is not a saved reward model: it has no {MANIFEST_FILE}; {expected}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{directory} is not a saved reward model: cannot read {path} ({exc}); {expected}") from exc
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt not in _KNOWN:
        raise ValueError(f"{directory} is not a saved reward model: {MANIFEST_FILE} has format {fmt!r}; {expected}")
    return fmt


def load_reward_scorer(directory: str | os.PathLike[str], *, device: str | torch.device | None = None,
                       dtype: str | torch.dtype | None = None, **kwargs: Any) -> RewardScorer:
    """An :class:`EnsembleScorer` or a :class:`SingleRewardScorer` for ``directory``, chosen by its manifest.

    ``device`` defaults to the process's (:func:`~alignpipe.models.loading.process_device`: its GPU under a GPU
    launch, else the CPU): a scorer loads onto the CPU and scores where its weights are, so without it a GPU run
    would judge on the CPU. Stages pass their own (``ctx.device``).

    ``dtype`` may be a recipe's ``model.dtype`` name: ``auto`` resolves as it does for the stage that trained the
    model (:func:`~alignpipe.models.loading.resolve_dtype`: bf16 on a bf16-capable GPU, else float32), not as
    transformers' ``"auto"`` (the checkpoint's own dtype), so a bf16-saved backbone trained in float32 on the CPU is
    scored in float32 too. A single reward model trained with ``implementation: trl`` has float32 weights whatever
    the GPU (mixed precision at most), so ``auto`` loads it in float32.

    Without ``dtype``, an ensemble loads in the dtype it was trained in (its manifest's), a single model in float32;
    without ``max_length``, either scores at the length its reward stage trained and evaluated at.

    ``kwargs`` go to ``EnsembleScorer.load`` (``backbone``, ``batch_size``, ``max_length``, ``judge_id``)
    or ``SingleRewardScorer.load`` (``batch_size``, ``max_length``, ``judge_id``, ``text_format``). An
    argument the chosen loader does not take raises ``TypeError``.
    """
    fmt = reward_model_format(directory)
    device = process_device() if device is None else device
    if isinstance(dtype, str):  # the trl path trains float32 weights (bf16 only as autocast), so auto keeps them
        dtype = torch.float32 if dtype == "auto" and fmt == SINGLE_FORMAT else resolve_dtype(dtype)
    if fmt == ENSEMBLE_FORMAT:
        return EnsembleScorer.load(directory, device=device, dtype=dtype, **kwargs)
    return SingleRewardScorer.load(directory, device=device, dtype=dtype or torch.float32, **kwargs)


def reward_model_identity(directory: str | os.PathLike[str]) -> str:
    """A saved reward model's content hash that leaves out where its backbone lay when it was saved.

    Why: a board judged by a reward model records the judge's hash, and boards merge only when it is the same. A
    directory hash differed between two copies of one reward model in two run directories, or saved by two runs
    in different places: the files are the same but for absolute paths (an ensemble's manifest ``absolute`` and
    PEFT's ``base_model_name_or_path``; a single model's ``base_model``, which only records what it was trained
    from, its weights being whole). So the JSON files that hold them are hashed without those paths wherever the
    backbone is otherwise identified: by its recorded ``sha256`` or hub commit, or, for PEFT's field, by the
    manifest's own backbone entry. Every other file counts byte for byte (:func:`cached_directory_hash`). A local
    backbone recorded by its path alone (a folder outside any run) counts by its files too, hashed where it lies
    now, so replacing its weights makes another judge (and misses the scores cached for the old one)."""
    directory = Path(directory)
    fmt = reward_model_format(directory)
    described = {MANIFEST_FILE} | ({ADAPTER_CONFIG} if fmt == ENSEMBLE_FORMAT else set())
    files = cached_directory_hash(directory, include=lambda relative: relative.name not in described)
    texts = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name in described):
        try:
            saved = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"reward model {directory}: cannot read {path} ({exc}); save the reward model again") \
                from exc
        texts[path.relative_to(directory).as_posix()] = _without_locations(saved, path.name, fmt)
    backbone = _backbone_named_by_path(directory, texts.get(MANIFEST_FILE)) if fmt == ENSEMBLE_FORMAT else None
    return canonical_hash({"format": fmt, "files": files, "described": texts,
                           **({"backbone_files": cached_directory_hash(backbone)} if backbone else {})})


def _backbone_named_by_path(directory: Path, manifest: Any) -> Path | None:
    """The local folder an ensemble's backbone is, when its manifest names it by path alone (no recorded hash or
    hub commit); None otherwise, or for a hub id. ``FileNotFoundError`` (the loader's) when it is gone."""
    from alignpipe.models.loading import resolve_model_location
    from alignpipe.rewards.ensemble_files import saved_backbone_location

    if not isinstance(manifest, dict) or not isinstance(manifest.get("spec"), dict):
        return None
    record = manifest.get(BACKBONE_KEY)
    if isinstance(record, dict) and (record.get("sha256") or record.get("hub")):
        return None
    stored = str(manifest["spec"].get("backbone"))
    location = Path(resolve_model_location(saved_backbone_location(directory, manifest, stored, override=None)))
    return location if location.is_dir() else None


def _without_locations(saved: Any, name: str, fmt: str) -> Any:
    """``saved`` (a reward model's ``name`` JSON file) without the paths that only say where things lay."""
    if not isinstance(saved, dict):
        return saved
    if name == ADAPTER_CONFIG:  # the ensemble's manifest names the backbone; PEFT's copy is an absolute path
        return {k: v for k, v in saved.items() if k != "base_model_name_or_path"}
    if fmt == SINGLE_FORMAT:
        return {k: v for k, v in saved.items() if k != "base_model"}
    record = saved.get(BACKBONE_KEY)
    if not isinstance(record, dict) or not (record.get("sha256") or record.get("hub")):
        return saved  # the backbone is named by its path alone: where it lies is what identifies it
    spec = saved.get("spec") if isinstance(saved.get("spec"), dict) else {}
    located = not record.get("relative_to_checkpoint")  # a hub snapshot's or an outside folder's absolute path
    return {**saved, BACKBONE_KEY: {k: v for k, v in record.items() if k != "absolute"},
            "spec": {k: v for k, v in spec.items() if not (located and k == "backbone")}}
