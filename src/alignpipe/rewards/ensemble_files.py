"""A saved reward ensemble's files: their names, how the manifest names the backbone (:func:`_backbone_record`) and
where that backbone is when loading (:func:`saved_backbone_location`), and reading the manifest back. The layout is
described in :mod:`alignpipe.rewards.ensemble` (written by ``RewardEnsemble.save``); :func:`read_saved_manifest` and
:func:`recorded_scoring` serve the single-model format too."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from alignpipe.data.rows import looks_like_path
from alignpipe.models.loading import PYPI_PREFIX, remote_code_kwargs
from alignpipe.pipeline.rundir import RUN_FILE, directory_hash, recorded_output_sha256

__all__ = [
    "ENSEMBLE_FORMAT",
    "ENSEMBLE_FORMAT_VERSION",
]

ENSEMBLE_FORMAT = "alignpipe.reward_ensemble"
ENSEMBLE_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
ADAPTERS_DIR = "adapters"
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's, one per member
HEADS_FILE = "heads.safetensors"
BACKBONE_KEY = "backbone"  # manifest: {"relative_to_checkpoint": bool, "sha256": str | None}; absent before


def _local_backbone(backbone: str) -> Path | None:
    """The local directory ``backbone`` names (absolute, symlinks resolved); None for a hub id or ``pypi:`` name."""
    if backbone.startswith(PYPI_PREFIX):
        return None
    path = Path(backbone).expanduser()
    return path.resolve() if path.exists() else None


def _backbone_record(backbone: str, directory: Path) -> tuple[str, dict[str, Any]]:
    """How a saved ensemble at ``directory`` names ``backbone``: (the manifest's ``spec.backbone``, its record).

    A local backbone inside the ensemble's run directory (``directory`` is ``runs/<run>/<stage>/checkpoint`` and
    ``runs/<run>`` holds the runner's ``run.json``) is stored relative to ``directory``, so the run can be moved or
    archived whole; its absolute path is recorded too (``absolute``), for an ensemble copied out of its run. Another
    local backbone is stored by its absolute path; a hub id or ``pypi:`` name as given. The record's ``sha256`` is
    the backbone's ``directory_hash`` when its stage manifest already records it (free to get), else None (hashing a
    large model on every save is not). A hub model's snapshot folder (the runner pins the recipe's hub model to one)
    is recorded with its repo id and commit (``hub``), so another machine finds or downloads the same weights."""
    from alignpipe.models.hub import cached_snapshot_identity

    local = _local_backbone(backbone)
    if local is None:
        return backbone, {"relative_to_checkpoint": False, "sha256": None}
    if (identity := cached_snapshot_identity(local)) is not None:
        repo_id, commit = identity
        return str(local), {"relative_to_checkpoint": False, "sha256": None,
                            "hub": {"repo_id": repo_id, "commit": commit}}
    here = Path(directory).resolve()
    run = here.parent.parent
    relative = local.is_relative_to(run) and (run / RUN_FILE).is_file()
    stored = os.path.relpath(local, here) if relative else str(local)
    record = {"relative_to_checkpoint": relative, "sha256": recorded_output_sha256(local)}
    return stored, {**record, "absolute": str(local)} if relative else record


def _sort_target_modules(config: Path) -> None:
    """Rewrite PEFT's ``adapter_config.json`` with its ``target_modules`` in order. Why: PEFT keeps them as a set
    and writes the set's iteration order, which string hashing randomises per process, so two saves of the same
    weights made different files, and the checkpoint a different hash (its stages downstream re-ran, and boards it
    judged did not merge)."""
    saved = json.loads(config.read_text())
    if isinstance(saved.get("target_modules"), list):
        config.write_text(json.dumps({**saved, "target_modules": sorted(saved["target_modules"])}, indent=2,
                                     sort_keys=True) + "\n")


def saved_backbone_location(directory: Path, manifest: dict[str, Any], stored: str, *,
                            override: str | None) -> str:
    """Where the backbone of the ensemble saved in ``directory`` is now: ``override`` if given (the caller's
    choice: not checked against the recorded hash), else the manifest's ``stored`` name (resolved against
    ``directory`` when recorded relative to it, falling back to the recorded absolute path when the ensemble was
    copied out of its run; manifests written before that record, with absolute paths, are read as they are). A
    local backbone that is missing, or whose weights differ from the hash recorded at save time, is an error naming
    the ensemble and the backbone."""
    record = manifest.get(BACKBONE_KEY)
    record = record if isinstance(record, dict) else {}  # absent before the record existed; or edited by hand
    relative = bool(record.get("relative_to_checkpoint")) and override is None
    loader_fix = ("pass backbone=<the checkpoint it was trained on> to the loader (EnsembleScorer.load, "
                  "load_reward_scorer)")
    if override is not None:
        location = str(override)
        named = f"the backbone given to the loader ({location})"
        missing_fix = "pass the checkpoint the ensemble was trained on"
        record = {}  # an explicit backbone is the caller's decision
    elif relative:
        location = str((directory.resolve() / stored).resolve())
        named = f"its backbone {stored} (relative to the ensemble: {location})"
        missing_fix = ("move or copy the run directory whole (the ensemble names its backbone relative to itself), "
                       f"or {loader_fix}")
        if not Path(location).exists() and record.get("absolute") and Path(record["absolute"]).exists():
            location = record["absolute"]  # copied out of its run, which is still where it was
            named = f"its backbone {location} (where it was at save time)"
    else:
        location = stored
        named = f"its backbone {location}"
        missing_fix = f"put that checkpoint back there, or {loader_fix}"
    path = Path(location).expanduser()
    if not path.exists() and record.get("hub"):  # another machine's Hugging Face cache: this one's, at that commit
        from alignpipe.models.hub import snapshot_here

        path = snapshot_here(record["hub"]["repo_id"], record["hub"]["commit"],
                             gguf_file=(manifest.get("spec") or {}).get("gguf_file"),
                             remote_code=remote_code_kwargs()["trust_remote_code"])
        location = str(path)
    if not path.exists():
        if relative or os.path.isabs(location) or looks_like_path(location):
            raise FileNotFoundError(f"reward ensemble {directory}: {named} does not exist; {missing_fix}")
        return location  # a hub id (owner/name)
    expected = record.get("sha256")
    if expected:
        found = (recorded_output_sha256(path) or directory_hash(path)) if path.is_dir() else None
        if found != expected:
            raise ValueError(
                f"reward ensemble {directory}: {named} holds other weights than the ensemble was trained on (its "
                f"files hash to {str(found)[:16]}, recorded at save time: {expected[:16]}; e.g. the stage that wrote "
                f"it was re-run); {loader_fix}, or re-run the reward stage on this backbone")
    return location


def read_saved_manifest(directory: str | os.PathLike[str], *, what: str, fmt: str, version_key: str,
                        version: int) -> dict[str, Any]:
    """The ``manifest.json`` of a saved reward model of format ``fmt``, with its format and version checked.

    Shared by the ensemble and the single-model loaders; errors name the directory or file and what was expected.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{what} directory {directory} does not exist")
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a saved {what}: it has no {MANIFEST_FILE}")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not readable JSON ({error}); the save may have been cut short, so re-save the "
                         f"{what} or re-run the stage that wrote it") from error
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != fmt:
        raise ValueError(f"{path}: format {manifest.get('format')!r} is not {fmt!r}")
    if manifest.get(version_key) != version:
        raise ValueError(f"{path}: {version_key} {manifest.get(version_key)!r} is not supported (expected {version})")
    return manifest


def recorded_scoring(manifest: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """A saved reward model's ``scoring`` record (empty for one saved without), with its ``max_length`` made the
    default of the scorer's ``kwargs`` (a caller's own wins): both loaders score as the reward stage evaluated."""
    scoring = manifest.get("scoring") or {}
    if scoring.get("max_length"):
        kwargs.setdefault("max_length", scoring["max_length"])
    return scoring


def read_manifest(directory: Path) -> dict[str, Any]:
    """The validated manifest of a saved ensemble; ``FileNotFoundError`` naming the directory when it is absent."""
    manifest = read_saved_manifest(directory, what="reward ensemble", fmt=ENSEMBLE_FORMAT,
                                   version_key="format_version", version=ENSEMBLE_FORMAT_VERSION)
    path = Path(directory) / MANIFEST_FILE
    for key in ("spec", "hidden_size", "members"):
        if key not in manifest:
            raise ValueError(f"{path} is missing {key!r}")
    return manifest
