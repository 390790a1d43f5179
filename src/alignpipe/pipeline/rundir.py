"""The on-disk layout of a run and its manifests.

``runs/<run>/<stage>/`` holds ``config.yaml`` (resolved), ``manifest.json`` (status, hashes, versions, timings),
``metrics.jsonl``, ``checkpoint/`` (``save_pretrained`` format) and ``trainer/`` (trainer checkpoints for
``--resume``). A stage is complete only when its manifest says so; every file is replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from alignpipe.io import atomic_write_json, atomic_write_text

TRACKED_PACKAGES = ("alignpipe", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "tokenizers")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def canonical_hash(obj: Any) -> str:
    """Hash of a JSON-serialisable object that ignores key order (config hashes must be stable across runs)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def directory_hash(directory: Path) -> str:
    """sha256 over every file's relative path and bytes, in sorted order: identifies a checkpoint's content."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_sha(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@dataclass(frozen=True)
class StageDir:
    """Paths of one stage's directory."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint"

    @property
    def trainer(self) -> Path:
        return self.root / "trainer"

    def read_manifest(self) -> dict | None:
        if not self.manifest.exists():
            return None
        try:
            return json.loads(self.manifest.read_text())
        except json.JSONDecodeError:
            return None  # a corrupt manifest means "not complete"

    def write_manifest(self, manifest: dict) -> None:
        atomic_write_json(self.manifest, manifest)

    def update_manifest(self, **fields: Any) -> dict:
        manifest = {**(self.read_manifest() or {}), **fields}
        self.write_manifest(manifest)
        return manifest

    def write_config(self, config: dict) -> None:
        atomic_write_text(self.config, yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict:
        return yaml.safe_load(self.config.read_text())

    def latest_trainer_checkpoint(self) -> Path | None:
        """The highest-step ``trainer/checkpoint-N`` that finished saving (its trainer_state.json exists)."""
        if not self.trainer.is_dir():
            return None
        done = [p for p in self.trainer.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
        return max(done, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)

    def has_progress(self) -> bool:
        """Whether an interrupted attempt left something ``--resume`` can continue from."""
        rounds = self.root / "rounds"
        return self.latest_trainer_checkpoint() is not None or any(rounds.glob("round-*/checkpoint"))

    def reset(self) -> None:
        """Forget a previous attempt (used when a stage starts over rather than resuming)."""
        for path in (self.checkpoint, self.trainer, self.metrics, self.root / "checkpoint.tmp", self.root / "rounds"):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def publish_directory(staging: Path, final: Path) -> None:
    """Move a fully written directory into place so readers never see a half-written checkpoint."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    if old.exists():
        shutil.rmtree(old)
