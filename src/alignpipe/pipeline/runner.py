"""The runner: resolves a recipe into stage directories and runs each stage in order, skipping finished ones.

A stage is skipped when its manifest says ``complete`` with the same config hash and the same input hashes (the
content hashes of its inputs' checkpoints); ``--force STAGE`` re-runs it; ``--resume`` continues an interrupted stage
from its last trainer checkpoint. Each stage runs as its own process through ``pipelines/<type>.py`` so it frees its
memory when it ends and can be wrapped by ``accelerate launch``.
"""

from __future__ import annotations

import difflib
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml

from alignpipe.io import atomic_write_json, atomic_write_text
from alignpipe.pipeline.rundir import (
    StageDir,
    canonical_hash,
    directory_hash,
    git_sha,
    package_versions,
    publish_directory,
    utc_now,
)
from alignpipe.recipe import Recipe, recipe_to_dict

log = logging.getLogger("alignpipe")

PIPELINES_DIR = Path(__file__).resolve().parents[3] / "pipelines"
BASE = "base"


class StageFailed(RuntimeError):
    """A stage process exited with an error; its manifest says ``failed`` and its trainer checkpoints are kept."""


@dataclass(frozen=True)
class StageOutcome:
    name: str
    action: str  # "skipped" | "ran" | "resumed"
    seconds: float
    reason: str


class Runner:
    def __init__(
        self,
        recipe: Recipe,
        *,
        runs_dir: Path = Path("runs"),
        recipe_path: Path | None = None,
        overrides: Sequence[str] = (),
        force: Sequence[str] = (),
        resume: bool = False,
        in_process: bool = False,
    ):
        names = [s.name for s in recipe.stages]
        for name in force:
            if name not in names:
                hint = difflib.get_close_matches(name, names, n=1)
                suggestion = f"did you mean '{hint[0]}'? " if hint else ""
                raise ValueError(f"--force {name}: no such stage in recipe '{recipe.name}'; {suggestion}stages: {names}")
        self.recipe = recipe
        self.run_dir = Path(runs_dir) / recipe.name
        self.recipe_path = recipe_path
        self.overrides = list(overrides)
        self.force = set(force)
        self.resume = resume
        self.in_process = in_process

    # -- public ------------------------------------------------------------------------------------------------------

    def run(self) -> list[StageOutcome]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._write_run_record()
        outputs: dict[str, tuple[str, str | None]] = {BASE: self._prepare_base()}
        outcomes = []
        for stage in self.recipe.stages:
            outcome = self._run_stage(stage, outputs)
            outcomes.append(outcome)
            log.info("[%s] %s in %.1fs (%s)", stage.name, outcome.action, outcome.seconds, outcome.reason)
        return outcomes

    # -- internals ---------------------------------------------------------------------------------------------------

    def _write_run_record(self) -> None:
        resolved = recipe_to_dict(self.recipe)
        atomic_write_text(self.run_dir / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False))
        atomic_write_json(self.run_dir / "run.json", {
            "run": self.recipe.name,
            "recipe_path": str(self.recipe_path) if self.recipe_path else None,
            "overrides": self.overrides,
            "recipe_sha256": canonical_hash(resolved),
            "git_sha": git_sha(PIPELINES_DIR.parent),
            "versions": package_versions(),
            "updated": utc_now(),
        })

    def _recipe_context(self) -> dict:
        """The recipe-level settings every stage depends on (part of every stage's config hash)."""
        return {
            "seed": self.recipe.seed,
            "model": self.recipe.model.model_dump(mode="json"),
            "data": self.recipe.data.model_dump(mode="json"),
        }

    def _prepare_base(self) -> tuple[str, str | None]:
        """Materialise the recipe's model. The built-in tiny model is created (seeded) under ``runs/<run>/base``."""
        spec = self.recipe.model
        if spec.name_or_path != "tiny":
            from alignpipe.models.loading import resolve_model_location

            return resolve_model_location(spec.name_or_path), canonical_hash(spec.model_dump(mode="json"))
        directory = StageDir(self.run_dir / BASE)
        config_hash = canonical_hash({"base": self._recipe_context()})
        manifest = directory.read_manifest()
        if manifest and manifest.get("status") == "complete" and manifest.get("config_hash") == config_hash \
                and directory.checkpoint.exists():
            return str(directory.checkpoint.resolve()), manifest["output_sha256"]
        from alignpipe.models.factory import create_tiny_base

        started = time.time()
        directory.root.mkdir(parents=True, exist_ok=True)
        staging = directory.root / "checkpoint.tmp"
        create_tiny_base(self.recipe, staging)
        publish_directory(staging, directory.checkpoint)
        sha = directory_hash(directory.checkpoint)
        directory.write_manifest({
            "stage": BASE, "type": "base", "status": "complete", "config_hash": config_hash,
            "output_sha256": sha, "end_time": utc_now(), "wall_time_s": round(time.time() - started, 2),
        })
        log.info("[base] created the tiny model in %.1fs", time.time() - started)
        return str(directory.checkpoint.resolve()), sha

    def _run_stage(self, stage, outputs: dict[str, tuple[str, str | None]]) -> StageOutcome:
        directory = StageDir(self.run_dir / stage.name)
        config_hash = canonical_hash({"stage": stage.model_dump(mode="json"), **self._recipe_context()})
        input_hashes = {BASE: outputs[BASE][1], **{name: outputs[name][1] for name in stage.inputs}}
        manifest = directory.read_manifest() or {}
        same_work = manifest.get("config_hash") == config_hash and manifest.get("input_hashes") == input_hashes

        if same_work and manifest.get("status") == "complete" and stage.name not in self.force:
            outputs[stage.name] = (str(directory.checkpoint.resolve()), manifest.get("output_sha256"))
            return StageOutcome(stage.name, "skipped", 0.0, "complete with the same config and inputs")

        resume = (
            self.resume and same_work and manifest.get("status") != "complete" and directory.has_progress()
        )
        if stage.name in self.force:
            reason = "forced"
        elif resume:
            latest = directory.latest_trainer_checkpoint()
            reason = f"resuming from {latest.name if latest else 'its completed rounds'}"
        elif not manifest:
            reason = "new"
        elif not same_work:
            reason = "config or inputs changed"
        else:
            reason = f"previous attempt {manifest.get('status', 'unknown')}; starting over (use --resume to continue)"
        if not resume:
            directory.reset()
        directory.root.mkdir(parents=True, exist_ok=True)
        directory.write_config({
            "recipe": recipe_to_dict(self.recipe),
            "stage": stage.name,
            "base": outputs[BASE][0],
            "inputs": {name: outputs[name][0] for name in stage.inputs},
        })
        directory.write_manifest({
            "stage": stage.name, "type": stage.type, "status": "running",
            "config_hash": config_hash, "input_hashes": input_hashes,
            "versions": package_versions(), "git_sha": git_sha(PIPELINES_DIR.parent),
            "start_time": utc_now(), "resumed": resume,
        })
        log.info("[%s] running (%s)", stage.name, reason)
        started = time.time()
        try:
            self._launch(stage.type, directory, resume)
        except KeyboardInterrupt:
            directory.update_manifest(status="interrupted", end_time=utc_now())
            raise
        manifest = directory.read_manifest() or {}
        if manifest.get("status") != "complete":
            raise StageFailed(
                f"stage '{stage.name}' ({stage.type}) did not complete; see the log above and {directory.manifest}. "
                "Fix the cause and re-run; add --resume to continue from its last trainer checkpoint."
            )
        outputs[stage.name] = (str(directory.checkpoint.resolve()), manifest.get("output_sha256"))
        return StageOutcome(stage.name, "resumed" if resume else "ran", time.time() - started, reason)

    def _launch(self, stage_type: str, directory: StageDir, resume: bool) -> None:
        if self.in_process:
            from alignpipe.pipeline.stage import execute

            try:
                execute(directory.root, resume=resume)
            except Exception:
                directory.update_manifest(status="failed", end_time=utc_now())
                raise
            return
        script = PIPELINES_DIR / f"{stage_type}.py"
        command = [sys.executable, str(script)] if script.exists() else [
            sys.executable, "-c", f"from alignpipe.pipeline.stage import main; main({stage_type!r})"]
        command += ["--stage-dir", str(directory.root)] + (["--resume"] if resume else [])
        log.info("$ %s", " ".join(command))
        completed = subprocess.run(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if completed.returncode != 0:
            directory.update_manifest(status="failed", end_time=utc_now(), returncode=completed.returncode)
